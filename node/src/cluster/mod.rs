//! Cluster concerns: the identity a data dir remembers (node id, cluster id, shard count), the
//! cluster metadata the meta group replicates (nodes, shard placement, rebalances) and the
//! placement driver that moves replicas to match it.

pub mod identity;
pub mod meta;
pub mod placement;
