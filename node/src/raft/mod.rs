//! Raft: one openraft group per shard over the node's RocksDB. Owns the type configuration
//! (`types`), the log store, the state machine adapter (apply and snapshots, over the state of
//! `shard` and `meta`), the transport (`network`, its messages' protobuf form in `wire`, the
//! frame connections that carry its hot requests in `frames`, a leader's early AppendEntries
//! in `early`, and the requests one node sends another about a shard in `forward`), the set of
//! local groups (`shards`: routing, membership, local proposals, read barriers shared via
//! `read_barrier`, leaders' read leases in `lease`), hibernation, takeover and leader
//! hand-over, dropping at start the replicas whose table files were damaged (`damage`), and
//! what anti-entropy established about each replica since start (`replica_health`: checked,
//! suspect). It does not know about HTTP, and never calls `coordinator`.

pub mod damage;
pub mod early;
pub mod forward;
pub mod frames;
pub mod handoff;
pub mod hibernation;
pub mod lease;
pub mod log_store;
pub mod metrics;
pub mod network;
pub mod read_barrier;
pub mod replica_health;
pub mod restore;
pub mod shards;
pub mod state_machine;
pub mod takeover;
pub mod types;
pub mod wire;

pub use shards::{RaftSettings, ShardGroup, ShardSet};
