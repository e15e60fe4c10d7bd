//! A data shard's replicated state, independent of consensus: the commands its log holds and the
//! answers applying them gives (`command`), the protobuf form of the commands, of the stored
//! assertions and of what the transport carries about a shard: answers, errors and reads
//! (`codec`, one submodule per message family), applying commands at their log position
//! (`apply`) and the counters it raises (`metrics`), the replica's anti-entropy digests and their
//! Merkle tree (`digest`), the key layout of the groups in the column
//! families (`keys`), the progress the state machine shares with its readers (`progress`), the
//! readers (`reader`) and their claims cache (`claims_cache`), index verification and repair
//! (`index_repair`), the scrub and the bucket copies of anti-entropy repair (`repair`), the snapshot file format and its streaming (`snapshot`), and the errors of
//! the request path (`ConsensusError`, in `error`).
//! It knows nothing of openraft: the adapters from openraft's traits to this state are in `raft`.

pub mod apply;
pub mod claims_cache;
pub mod codec;
pub mod command;
pub mod digest;
pub mod error;
pub mod index_repair;
pub mod keys;
pub mod metrics;
pub mod progress;
pub mod reader;
pub mod repair;
pub mod snapshot;

pub use error::{ConsensusError, GroupLabel};
