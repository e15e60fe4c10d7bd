//! StemeDB: a replicated, sharded database of assertions that agents make about concepts, read
//! through lenses. See `docs/architecture.md` for how the modules fit together.

pub mod admin;
pub mod api;
pub mod backup_ctl;
pub mod bench;
pub mod cluster;
pub mod config;
pub mod coordinator;
pub mod ctl;
pub mod dashboard;
pub mod error;
pub mod listener;
pub mod meta;
pub mod metrics;
pub mod model;
pub mod raft;
pub mod rpc;
pub mod server;
pub mod shard;
pub mod storage;
pub mod tasks;
pub mod tls;

pub use config::Config;
pub use server::{run, run_with_reloads, Listeners, NodeError};
