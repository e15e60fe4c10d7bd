//! Cluster concerns above the Raft groups: the identity a data dir remembers (node id, cluster
//! id, shard count) and the placement driver that moves replicas to match the cluster metadata
//! (which the meta group replicates: see `meta`).

pub mod identity;
pub mod placement;
