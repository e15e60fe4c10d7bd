//! Generates the inter-node gRPC code with a vendored `protoc`, so building needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; PROTOC is read by prost-build below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/log.proto",
            "proto/request.proto",
            "proto/raft.proto",
            "proto/antientropy.proto",
            "proto/backup.proto",
        ],
        &["proto"],
    )?;
    // etcd's KV service, client side only: the reference of the side-by-side benchmark.
    tonic_prost_build::configure().build_server(false).compile_protos(&["proto/etcd.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
