//! Cluster concerns: the identity a data dir remembers (node id, cluster id, shard count).
//! Membership, placement and anti-entropy join this module with the cluster issue.

pub mod identity;
