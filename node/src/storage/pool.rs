//! Fixed pools of threads for RocksDB work on the request path: one for reads, one for the
//! state machines' applies.
//!
//! A query's reads usually hit the block cache and take microseconds, but a cold block or a slow
//! disk can take milliseconds, which must not stall an async worker. `block_in_place` on every
//! read made the runtime hand each worker's queue to a new thread per call: under 64 concurrent
//! queries the node ran 300+ threads and query p99 doubled. The same hand-over on every apply
//! cost a single node about 20 µs of CPU per write at 16 shards (131-137 µs against 112-113 on
//! this pool; 3.4-3.5 context switches per write against 2.7-2.8). Each pool keeps its thread
//! count fixed (one per core, at least two) and its queue bounded: a full read queue is refused
//! at once ([`ReadPoolFull`], answered `503 overloaded` and counted in
//! `stemedb_requests_shed_total{limit="read_pool"}`), never an unbounded backlog. The apply
//! pool's callers keep at most one job each in flight, fewer than its queue holds; if it were
//! full, the apply would run in place. A job that panics fails its caller, not the pool: the
//! thread logs it and takes the next job.

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock};

use parking_lot::{Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// Reads waiting for a pool thread at most.
pub const READ_QUEUE: usize = 4096;

/// Applies waiting for a pool thread at most. Each caller (a Raft group's state machine) has at
/// most one in flight, and a node hosts at most 4,096 shards and the meta group
/// (`cluster.shards`), so the queue never fills.
const APPLY_QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
#[error("the storage read queue is full ({READ_QUEUE} reads waiting)")]
pub struct ReadPoolFull;

pub struct Pool {
    jobs: Arc<Jobs>,
}

/// A pool's bounded queue. Idle threads wait on `ready`, and each job wakes one of them. (Threads
/// taking turns at one channel receiver behind a mutex woke the next waiter at every job, for
/// nothing: two context switches per job more.)
struct Jobs {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    capacity: usize,
}

impl Jobs {
    /// Queues `job`, or gives it back when `capacity` jobs are waiting.
    fn try_push(&self, job: Job) -> Result<(), Job> {
        let mut queue = self.queue.lock();
        if queue.len() >= self.capacity {
            return Err(job);
        }
        queue.push_back(job);
        drop(queue);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, waiting for one.
    fn take(&self) -> Job {
        let mut queue = self.queue.lock();
        loop {
            if let Some(job) = queue.pop_front() {
                return job;
            }
            self.ready.wait(&mut queue);
        }
    }
}

fn pool_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2)
}

static READS: LazyLock<Pool> = LazyLock::new(|| Pool::start("stemedb-read", pool_threads(), READ_QUEUE));

static APPLIES: LazyLock<Pool> = LazyLock::new(|| Pool::start("stemedb-apply", pool_threads(), APPLY_QUEUE));

/// The node's read pool.
pub fn read_pool() -> &'static Pool {
    &READS
}

/// The node's apply pool: Raft state machines apply committed entries on it
/// ([`Pool::run_or_block`]).
pub fn apply_pool() -> &'static Pool {
    &APPLIES
}

impl Pool {
    fn start(name: &str, threads: usize, queue: usize) -> Pool {
        let jobs = Arc::new(Jobs { queue: Mutex::new(VecDeque::new()), ready: Condvar::new(), capacity: queue });
        for index in 0..threads {
            let jobs = jobs.clone();
            let pool = name.to_string();
            let spawned = std::thread::Builder::new().name(format!("{name}-{index}")).spawn(move || loop {
                let job = jobs.take();
                // The panic drops the job's reply, which fails its caller (the panic message
                // went to the panic hook); the thread stays for the next job.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                    tracing::error!(pool = %pool, "a storage pool job panicked; its caller fails, the thread goes on");
                }
            });
            if let Err(error) = spawned {
                tracing::error!(error = %error, pool = name, "cannot start a storage pool thread");
            }
        }
        Pool { jobs }
    }

    /// Runs `read` on a pool thread and returns its result.
    pub async fn run<R: Send + 'static>(&self, read: impl FnOnce() -> R + Send + 'static) -> Result<R, ReadPoolFull> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(read());
        });
        self.jobs.try_push(job).map_err(|_| {
            crate::metrics::REQUESTS_SHED.with_label_values(&["read_pool"]).inc();
            ReadPoolFull
        })?;
        // A panicking read drops `reply`: reported like a full pool rather than hanging.
        answer.await.map_err(|_| ReadPoolFull)
    }

    /// Runs `read` on a pool thread, or, when the queue is full, right here off the async
    /// worker ([`super::blocking`]): for work whose failure would cost more than waiting (a
    /// Raft group's log reads and applies, where a storage error is fatal to the group).
    pub async fn run_or_block<R: Send + 'static>(&self, read: impl FnOnce() -> R + Send + 'static) -> R {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(read());
        });
        if let Err(job) = self.jobs.try_push(job) {
            super::blocking(job);
        }
        match answer.await {
            Ok(value) => value,
            // Only a panicking job drops its reply: the caller sees the panic, as if inline.
            Err(_) => panic!("a storage pool job panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::Pool;

    /// A panicking job fails its caller; the pool's only thread stays and runs the next job.
    #[tokio::test]
    async fn a_panicking_job_leaves_the_thread_for_the_next() {
        let pool = Pool::start("stemedb-test", 1, 4);
        assert!(pool.run(|| -> u8 { panic!("injected job panic") }).await.is_err());
        assert_eq!(pool.run(|| 7).await.expect("the thread took the next job"), 7);
    }

    /// Each queued job wakes an idle thread: the first job waits for the second, which only
    /// another thread can run. A lost wake-up leaves the first waiting until its timeout.
    #[tokio::test]
    async fn two_jobs_run_at_once_on_two_threads() {
        let pool = Arc::new(Pool::start("stemedb-test-pair", 2, 4));
        let (signal, wait) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(move || wait.recv_timeout(Duration::from_secs(10)).is_ok()).await }
        });
        let second = pool.run(move || signal.send(()).is_ok()).await.expect("ran");
        assert!(second);
        assert!(first.await.expect("joined").expect("ran"), "the second job ran while the first waited");
    }

    #[tokio::test]
    async fn applies_run_on_their_own_pool() {
        let name = super::apply_pool().run_or_block(|| std::thread::current().name().map(String::from)).await;
        assert!(name.as_deref().is_some_and(|n| n.starts_with("stemedb-apply-")), "ran on {name:?}");
        let name = super::read_pool().run(|| std::thread::current().name().map(String::from)).await.expect("ran");
        assert!(name.as_deref().is_some_and(|n| n.starts_with("stemedb-read-")), "ran on {name:?}");
    }

    #[tokio::test]
    async fn reads_run_on_the_pool_and_a_full_queue_is_refused() {
        let pool = Arc::new(Pool::start("stemedb-read", 1, 1));
        assert_eq!(pool.run(|| 21 * 2).await.expect("ran"), 42);
        let name = pool.run(|| std::thread::current().name().map(String::from)).await.expect("ran");
        assert_eq!(name.as_deref(), Some("stemedb-read-0"));
        // Occupy the only thread, then the only queue slot: the next read is refused at once.
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(move || {
                    let _ = started_tx.send(());
                    wait.recv().is_ok()
                })
                .await
            }
        });
        while started.recv_timeout(Duration::from_millis(10)).is_err() {
            tokio::task::yield_now().await;
        }
        let queued = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(|| 7).await }
        });
        let mut refused = false;
        for _ in 0..1000 {
            tokio::task::yield_now().await;
            // Once the queued read holds the only slot, the next one is refused at once. (A
            // probe that got in before it just waits in the queue, cut short here.)
            if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(5), pool.run(|| 0)).await {
                refused = true;
                break;
            }
        }
        assert!(refused, "a read beyond the queue is refused, not queued");
        release.send(()).expect("release");
        assert!(first.await.expect("joined").expect("first read ran"));
        let _ = queued.await.expect("joined");
    }
}
