//! Cluster concerns: the identity a data dir remembers (node id, cluster id, shard count), the
//! cluster metadata the meta group replicates (nodes, shard placement, rebalances) and the
//! placement driver that moves replicas to match it, and the cluster-wide policy (authority
//! grants, circuit breakers) the meta group replicates as well.

pub mod identity;
pub mod meta;
pub mod placement;
pub mod policy;
pub mod quarantine;
