//! The node's background tasks. Every task a node starts (write batchers, index repair, breaker
//! proposals, the placement driver, hibernation, claims-cache sharing, leadership clocks, ...) is
//! spawned through one [`NodeTasks`], so shutdown can tell them all to stop and wait until they
//! have, with a bound, before it closes the storage they use.

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

#[cfg(test)]
mod tests {
    use super::*;

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
