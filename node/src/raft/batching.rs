//! Coalescing of concurrent requests to the same shard.
//!
//! **Writes.** Single assertions arriving for a shard while earlier proposals are in flight are
//! gathered into one `ShardCommand::Assert` entry (up to [`MAX_BATCH_ITEMS`]); each caller gets
//! its own item's result. One Raft entry, one log append and one apply then serve many clients,
//! which is where a write's cost is. At most [`MAX_IN_FLIGHT`] proposals per shard run at once;
//! requests arriving meanwhile wait and form the next batch.
//!
//! **Linearizable reads.** A read barrier started after a caller arrived is valid for it: callers
//! that arrive while a barrier is in flight share the next one instead of each asking Raft.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::shards::{ConsensusError, ShardSet};
use super::types::{AssertOutcome, ShardCommand, ShardResponse};
use crate::model::assertion::AssertionDraft;
use crate::model::id::now_us;
use crate::model::ModelError;

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
    senders: Vec<mpsc::UnboundedSender<PendingWrite>>,
}

impl WriteBatchers {
    /// Starts one batcher task per shard. They stop when the shard set is dropped.
    pub fn start(shards: &Arc<ShardSet>) -> WriteBatchers {
        let senders = (0..shards.shard_count())
            .map(|shard| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run_batcher(Arc::downgrade(shards), shard, rx));
                tx
            })
            .collect();
        WriteBatchers { senders }
    }

    /// Proposes one assertion to `shard` as part of the next batch.
    pub async fn assert(&self, shard: u16, draft: AssertionDraft, timeout: Duration) -> ItemResult {
        let sender = self.senders.get(shard as usize).ok_or(ConsensusError::UnknownShard { shard })?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(PendingWrite { draft, deadline: Instant::now() + timeout, reply })
            .map_err(|_| ConsensusError::ShuttingDown { shard })?;
        answer.await.map_err(|_| ConsensusError::ShuttingDown { shard })?
    }
}

async fn run_batcher(
    shards: std::sync::Weak<ShardSet>,
    shard: u16,
    mut requests: mpsc::UnboundedReceiver<PendingWrite>,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        // Wait for a free proposal slot first, so requests pile up into the next batch meanwhile.
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let Some(first) = requests.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_ITEMS {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let Some(shards) = shards.upgrade() else { return };
        tokio::spawn(async move {
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

/// Shares linearizable read barriers among concurrent readers of a shard; `E` is the barrier's
/// error, handed to every caller it served.
pub struct ReadBarrierGroup<E> {
    state: parking_lot::Mutex<BarrierState<E>>,
}

struct BarrierState<E> {
    /// Barriers started so far; a caller needs one started after it arrived.
    started: u64,
    running: bool,
    /// Callers waiting for the barrier with generation > the value they recorded.
    waiters: Vec<(u64, oneshot::Sender<Result<u64, E>>)>,
}

impl<E> Default for ReadBarrierGroup<E> {
    fn default() -> Self {
        ReadBarrierGroup {
            state: parking_lot::Mutex::new(BarrierState { started: 0, running: false, waiters: Vec::new() }),
        }
    }
}

impl<E: Clone> ReadBarrierGroup<E> {
    /// How many barriers have started so far.
    pub fn started_count(&self) -> u64 {
        self.state.lock().started
    }

    /// Runs `barrier` for this caller, or waits for one that started after it arrived. Returns
    /// the number of the barrier that served it.
    ///
    /// Cancellation-safe: the caller running barriers for the others may be dropped at any
    /// await (a client that hung up). Its guard then hands the job back: `running` is cleared
    /// and every waiter is woken to run `run` again, one of them leading. Without this a single
    /// cancelled reader left the shard's linearizable reads waiting forever on this node.
    pub async fn run<F, Fut>(&self, barrier: F) -> Result<u64, E>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        loop {
            let (tx, rx) = oneshot::channel();
            let lead = {
                let mut state = self.state.lock();
                let needed = state.started + 1;
                state.waiters.push((needed, tx));
                !std::mem::replace(&mut state.running, true)
            };
            if lead {
                let mut guard = LeadGuard { group: self, armed: true };
                loop {
                    let generation = {
                        let mut state = self.state.lock();
                        state.started += 1;
                        state.started
                    };
                    let result = barrier().await.map(|()| generation);
                    let mut state = self.state.lock();
                    let (done, rest): (Vec<_>, Vec<_>) =
                        state.waiters.drain(..).partition(|(needed, _)| *needed <= generation);
                    state.waiters = rest;
                    for (_, waiter) in done {
                        let _ = waiter.send(result.clone());
                    }
                    if state.waiters.is_empty() {
                        state.running = false;
                        break;
                    }
                }
                guard.armed = false;
            }
            match rx.await {
                Ok(result) => return result,
                // The leading caller was cancelled before serving us: start over.
                Err(_) => continue,
            }
        }
    }
}

/// Clears a cancelled leader's claim and wakes the waiters (their senders drop).
struct LeadGuard<'a, E> {
    group: &'a ReadBarrierGroup<E>,
    armed: bool,
}

impl<E> Drop for LeadGuard<'_, E> {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.group.state.lock();
            state.running = false;
            state.waiters.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_share_barriers_started_after_they_arrived() {
        let group = Arc::new(ReadBarrierGroup::<String>::default());
        let calls = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..50u64 {
            let (group, calls) = (group.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(200 * (i % 10))).await;
                let started_before_arrival = group.started_count();
                let served_by = group
                    .run(|| {
                        let calls = calls.clone();
                        async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            Ok::<(), String>(())
                        }
                    })
                    .await
                    .expect("barrier");
                (started_before_arrival, served_by)
            }));
        }
        for task in tasks {
            let (started_before_arrival, served_by) = task.await.expect("join");
            assert!(served_by > started_before_arrival, "served by barrier {served_by}, which started before arrival");
        }
        assert!(calls.load(Ordering::SeqCst) < 50, "barriers were shared");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_leader_does_not_strand_the_others() {
        let group = Arc::new(ReadBarrierGroup::<String>::default());
        // The first caller leads a barrier that never finishes, and is cancelled (timeout).
        let stuck = tokio::time::timeout(
            Duration::from_millis(50),
            group.run(|| async {
                std::future::pending::<()>().await;
                Ok::<(), String>(())
            }),
        );
        // A second caller arrives while it runs, and must be served once the first is gone.
        let second = {
            let group = group.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                group.run(|| async { Ok::<(), String>(()) }).await
            })
        };
        assert!(stuck.await.is_err(), "the first caller timed out");
        let served = tokio::time::timeout(Duration::from_secs(5), second).await;
        assert!(matches!(served, Ok(Ok(Ok(_)))), "the second caller was stranded: {served:?}");
        // And later callers run barriers again.
        let later = tokio::time::timeout(Duration::from_secs(5), group.run(|| async { Ok::<(), String>(()) })).await;
        assert!(matches!(later, Ok(Ok(_))));
    }
}
