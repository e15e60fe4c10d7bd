//! Coalescing of concurrent writes to the same shard. Single assertions arriving for a shard
//! while earlier proposals are in flight are gathered into one `ShardCommand::Assert` entry (up
//! to [`MAX_BATCH_ITEMS`]); each caller gets its own item's result. One Raft entry, one log
//! append and one apply then serve many clients, which is where a write's cost is. At most
//! [`MAX_IN_FLIGHT`] proposals per shard run at once; requests arriving meanwhile wait and form
//! the next batch. Before it closes a batch, the batcher lets the other ready tasks of its
//! worker run for as long as they bring more requests (`tasks::yield_while_arriving`). (Read
//! barriers are shared the same way in `raft::read_barrier`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::Coordinator;
use crate::model::assertion::AssertionDraft;
use crate::model::id::now_us;
use crate::model::ModelError;
use crate::raft::ShardSet;
use crate::shard::command::{AssertOutcome, ShardCommand, ShardResponse};
use crate::shard::ConsensusError;
use crate::tasks::yield_while_arriving;

pub const MAX_BATCH_ITEMS: usize = 256;
pub const MAX_IN_FLIGHT: usize = 1;

type ItemResult = Result<Result<AssertOutcome, ModelError>, ConsensusError>;

struct PendingWrite {
    draft: AssertionDraft,
    deadline: Instant,
    reply: oneshot::Sender<ItemResult>,
}

/// The write batchers of every shard.
pub struct WriteBatchers {
    senders: Vec<mpsc::Sender<PendingWrite>>,
    capacity: usize,
}

impl WriteBatchers {
    /// Starts one batcher task per shard, each queue holding at most `capacity` waiting writes.
    /// They stop with the node's tasks, or when the shard set is dropped.
    pub fn start(shards: &Arc<ShardSet>, capacity: usize) -> WriteBatchers {
        let capacity = capacity.max(1);
        let senders = (0..shards.shard_count())
            .map(|shard| {
                let (tx, rx) = mpsc::channel(capacity);
                shards.tasks.spawn_until_stopped(run_batcher(Arc::downgrade(shards), shard, rx));
                tx
            })
            .collect();
        WriteBatchers { senders, capacity }
    }

    /// Proposes one assertion to `shard` as part of the next batch; refused at once with
    /// [`ConsensusError::Overloaded`] when the shard's queue is full.
    pub async fn assert(&self, shard: u16, draft: AssertionDraft, timeout: Duration) -> ItemResult {
        let sender = self.senders.get(shard as usize).ok_or(ConsensusError::UnknownShard { shard })?;
        let (reply, answer) = oneshot::channel();
        sender.try_send(PendingWrite { draft, deadline: Instant::now() + timeout, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                crate::metrics::REQUESTS_SHED.with_label_values(&["write_queue"]).inc();
                ConsensusError::Overloaded { shard, queued: self.capacity }
            }
            mpsc::error::TrySendError::Closed(_) => ConsensusError::ShuttingDown { shard },
        })?;
        answer.await.map_err(|_| ConsensusError::ShuttingDown { shard })?
    }
}

async fn run_batcher(shards: std::sync::Weak<ShardSet>, shard: u16, mut requests: mpsc::Receiver<PendingWrite>) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        // Wait for a free proposal slot first, so requests pile up into the next batch meanwhile.
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let Some(first) = requests.recv().await else { return };
        let mut batch = vec![first];
        gather(&mut requests, &mut batch).await;
        let Some(shards) = shards.upgrade() else { return };
        let tasks = shards.tasks.clone();
        tasks.spawn(async move {
            let deadline = batch.iter().map(|p| p.deadline).max().unwrap_or_else(Instant::now);
            let timeout = deadline.saturating_duration_since(Instant::now());
            let (drafts, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.draft, p.reply)).unzip();
            let expected = drafts.len();
            let command = ShardCommand::Assert { proposed_at_us: now_us(), items: drafts };
            match shards.propose(shard, command, timeout).await {
                Ok(ShardResponse::Asserted(results)) if results.len() == expected => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(result));
                    }
                }
                Ok(_) => {
                    for reply in replies {
                        let _ = reply.send(Err(ConsensusError::Internal {
                            shard,
                            message: "unexpected state machine answer".into(),
                        }));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Fills `batch` with the requests waiting in `requests`, up to [`MAX_BATCH_ITEMS`], and keeps
/// doing so while letting the worker's other ready tasks run, as long as they bring more
/// ([`yield_while_arriving`]).
async fn gather(requests: &mut mpsc::Receiver<PendingWrite>, batch: &mut Vec<PendingWrite>) {
    yield_while_arriving(MAX_BATCH_ITEMS, || {
        while batch.len() < MAX_BATCH_ITEMS {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        batch.len()
    })
    .await;
}
