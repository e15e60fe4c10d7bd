//! The node's background tasks. Every task a node starts (write batchers, index repair, breaker
//! proposals, the placement driver, hibernation, claims-cache sharing, leadership clocks, ...) is
//! spawned through one [`NodeTasks`], so shutdown can tell them all to stop and wait until they
//! have, with a bound, before it closes the storage they use. [`yield_while_arriving`] is how a
//! task that coalesces work (write batches, read barriers, the AppendEntries sent to a peer)
//! lets the work ready to join it do so before it closes a batch.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// A tracker of the node's tasks and the token that tells them to stop. Clones share both.
#[derive(Clone, Default)]
pub struct NodeTasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl NodeTasks {
    pub fn new() -> NodeTasks {
        NodeTasks::default()
    }

    /// Spawns a tracked task. Loops must end by themselves when [`NodeTasks::stopped`] fires.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Spawns a tracked task that is dropped at its next await point once the node stops its
    /// tasks: for loops with nothing to finish.
    pub fn spawn_until_stopped<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = stop.cancelled() => {}
            }
        })
    }

    /// Runs blocking work (RocksDB scans and compactions) on the blocking pool, tracked.
    pub fn spawn_blocking<F, T>(&self, work: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.tracker.spawn_blocking(work)
    }

    /// Resolves once the node stops its background tasks.
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// Whether the node is stopping its background tasks (for blocking work, between steps).
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// A token cancelled with this one, that can also be cancelled earlier on its own.
    pub fn child_token(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Tells every task to stop and waits up to `bound` for all of them to end. Returns how many
    /// are still running then (blocking work cannot be interrupted, only asked between steps).
    pub async fn stop_and_wait(&self, bound: Duration) -> usize {
        self.stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(bound, self.tracker.wait()).await;
        self.tracker.len()
    }
}

/// The most turns [`yield_while_arriving`] gives the rest of a worker's ready tasks.
pub const MAX_GATHER_TURNS: usize = 8;

/// Gives the other ready tasks of this worker a turn, and again while each turn makes
/// `arrived()` grow, up to [`MAX_GATHER_TURNS`] turns or until it reaches `limit`.
///
/// A coalescing task (a shard's write batcher, a peer's AppendEntries batcher) is woken by the
/// first request's send into its worker's next-task slot, so it runs before the request
/// handlers queued behind it, which are about to send to it too, and closes a batch of one. The
/// leader of a read barrier runs in its first reader's own task, ahead of the readers queued
/// behind it in the same way. Each turn puts the task behind them instead. A turn lasts until
/// the worker has nothing else ready, or at most until Tokio's routine check (every 61 tasks
/// run); the worker also polls the network then, so requests just arrived can join. The wait
/// adapts to the load: on an idle node nothing else is ready, the first turn brings nothing
/// and it returns at once; under load, requests keep arriving while there are any. On one node
/// with 16 shards and 64 writers, an apply carried 2.9 writes instead of 2.0 and a write cost
/// a quarter less CPU (docs/performance.md).
pub async fn yield_while_arriving(limit: usize, mut arrived: impl FnMut() -> usize) {
    let mut seen = arrived();
    for _ in 0..MAX_GATHER_TURNS {
        if seen >= limit {
            return;
        }
        tokio::task::yield_now().await;
        let now = arrived();
        if now == seen {
            return;
        }
        seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The case the turns exist for: on a multi-threaded runtime the first send wakes the
    /// gatherer into the worker's next-task slot, ahead of the senders already queued. One
    /// worker makes the order deterministic. Without the turns the batch holds one request.
    #[test]
    fn a_gatherer_woken_by_the_first_send_collects_the_sends_already_queued() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().expect("runtime");
        let batch = runtime.block_on(async {
            tokio::spawn(async {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
                let gatherer = tokio::spawn(async move {
                    let mut batch = vec![rx.recv().await.expect("first")];
                    yield_while_arriving(100, || {
                        while let Ok(item) = rx.try_recv() {
                            batch.push(item);
                        }
                        batch.len()
                    })
                    .await;
                    batch
                });
                // Let the gatherer wait on the channel before the senders exist.
                tokio::task::yield_now().await;
                for item in 0..5 {
                    let tx = tx.clone();
                    tokio::spawn(async move { tx.send(item) });
                }
                gatherer.await.expect("gatherer")
            })
            .await
            .expect("driver")
        });
        assert_eq!(batch.len(), 5, "gathered {batch:?}");
    }

    #[tokio::test]
    async fn gathering_takes_one_turn_when_nothing_arrives_and_none_at_the_limit() {
        let mut calls = 0;
        yield_while_arriving(10, || {
            calls += 1;
            1
        })
        .await;
        assert_eq!(calls, 2, "the count before and after one turn");
        let mut calls = 0;
        yield_while_arriving(10, || {
            calls += 1;
            10
        })
        .await;
        assert_eq!(calls, 1, "a full batch takes no turn");
        let mut count = 0;
        yield_while_arriving(usize::MAX, || {
            count += 1;
            count
        })
        .await;
        assert_eq!(count, MAX_GATHER_TURNS + 1, "arrivals that never stop are cut after the most turns");
    }

    #[tokio::test]
    async fn stop_and_wait_ends_loops_and_reports_stragglers() {
        let tasks = NodeTasks::new();
        tasks.spawn_until_stopped(std::future::pending());
        let clone = tasks.clone();
        tasks.spawn(async move { clone.stopped().await });
        assert_eq!(tasks.running(), 2);
        assert_eq!(tasks.stop_and_wait(Duration::from_secs(5)).await, 0);

        let stuck = NodeTasks::new();
        let (_keep, rx) = tokio::sync::oneshot::channel::<()>();
        stuck.spawn(async move {
            let _ = rx.await;
        });
        assert_eq!(stuck.stop_and_wait(Duration::from_millis(50)).await, 1, "a task that ignores the stop is reported");
    }
}
