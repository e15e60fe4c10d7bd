//! Inter-node protocol of StemeDB: generated tonic/prost types for the Raft transport on port 18182.
pub mod raft {
    tonic::include_proto!("stemedb.raft.v1");
}
