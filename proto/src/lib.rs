//! Inter-node protocol of StemeDB: generated tonic/prost types for the Raft transport on port 18182,
//! and a minimal client of etcd's KV service for `stemedb bench --target etcd`.
pub mod raft {
    tonic::include_proto!("stemedb.raft.v1");
}

/// etcd's v3 KV service (Put and Range only), client side: the benchmark's reference.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}
