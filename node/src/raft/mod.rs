//! Raft: one openraft group per shard over the node's RocksDB. Owns the type configuration, the
//! log store, the state machine, the transport and the set of local groups with its write and
//! read-barrier paths. It does not know about HTTP.

pub mod batching;
pub mod handoff;
pub mod hibernation;
pub mod log_store;
pub mod metrics;
pub mod network;
pub mod shards;
pub mod state_machine;
pub mod takeover;
pub mod types;

pub use shards::{RaftSettings, ShardGroup, ShardSet};
