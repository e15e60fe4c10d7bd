//! Cluster concerns above the Raft groups: the identity a data dir remembers (node id, cluster
//! id, shard count), the placement driver that moves replicas to match the cluster metadata
//! (which the meta group replicates: see `meta`), and anti-entropy, which finds and repairs
//! replicas whose data differs from their shard's majority (`anti_entropy`), and backups: copies
//! of the cluster into a directory or S3, verified and restored into a new cluster (`backup`).

pub mod anti_entropy;
pub mod backup;
pub mod identity;
pub mod placement;
