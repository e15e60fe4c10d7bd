//! openraft's storage conformance suite against the RocksDB log store and shard state machine.

use openraft::testing::{StoreBuilder, Suite};
use stemedb::raft::log_store::LogStore;
use stemedb::raft::state_machine::ShardStateMachine;
use stemedb::raft::types::{NodeId, TypeConfig};
use stemedb::storage::{Storage, StorageOptions};

struct RocksStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, ShardStateMachine, tempfile::TempDir> for RocksStoreBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, ShardStateMachine), openraft::StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open storage");
        // Group 3 (shard 2): keys of other groups must never leak into it.
        let log_store = LogStore::new(storage.clone(), 3);
        let state_machine = ShardStateMachine::open(storage, 2, 3, stemedb::shard::digest::DEFAULT_BUCKETS)?;
        Ok((dir, log_store, state_machine))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), openraft::StorageError<NodeId>> {
    Suite::test_all(RocksStoreBuilder)
}
