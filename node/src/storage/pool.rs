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
//!
//! Each pool reports the jobs waiting for a thread (`stemedb_storage_pool_queued_jobs`), its
//! queue's size (`stemedb_storage_pool_queue_capacity`), how long jobs waited before a thread took
//! them (`stemedb_storage_pool_wait_seconds`) and the jobs run in place because the queue was
//! full (`stemedb_storage_pool_ran_in_place_total`), each labelled `pool="read"` or
//! `pool="apply"`.

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use prometheus::{Histogram, IntCounter, IntGauge};

use super::metrics;

type Job = Box<dyn FnOnce() + Send>;

/// Reads waiting for a pool thread at most.
pub const READ_QUEUE: usize = 4096;

/// Applies waiting for a pool thread at most. Each caller (a Raft group's state machine) has at
/// most one in flight, and a node hosts at most 4,096 shards and the meta group
/// (`cluster.shards`), so the queue never fills.
pub const APPLY_QUEUE: usize = 8192;

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
    /// Each job with the moment it was queued.
    queue: Mutex<VecDeque<(Instant, Job)>>,
    ready: Condvar,
    capacity: usize,
    queued: IntGauge,
    wait: Histogram,
    ran_in_place: IntCounter,
}

impl Jobs {
    /// Queues `job`, or gives it back when `capacity` jobs are waiting.
    fn try_push(&self, job: Job) -> Result<(), Job> {
        let mut queue = self.queue.lock();
        if queue.len() >= self.capacity {
            return Err(job);
        }
        queue.push_back((Instant::now(), job));
        self.queued.set(queue.len() as i64);
        drop(queue);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, waiting for one.
    fn take(&self) -> Job {
        let mut queue = self.queue.lock();
        loop {
            if let Some((queued_at, job)) = queue.pop_front() {
                self.queued.set(queue.len() as i64);
                drop(queue);
                self.wait.observe(queued_at.elapsed().as_secs_f64());
                return job;
            }
            self.ready.wait(&mut queue);
        }
    }
}

fn pool_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2)
}

static READS: LazyLock<Pool> = LazyLock::new(|| Pool::start("stemedb-read", "read", pool_threads(), READ_QUEUE));

static APPLIES: LazyLock<Pool> = LazyLock::new(|| Pool::start("stemedb-apply", "apply", pool_threads(), APPLY_QUEUE));

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
    /// `name` names the threads; `label` is the metrics' `pool` label.
    fn start(name: &str, label: &str, threads: usize, queue: usize) -> Pool {
        let jobs = Arc::new(Jobs {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            capacity: queue,
            queued: metrics::POOL_QUEUED_JOBS.with_label_values(&[label]),
            wait: metrics::POOL_WAIT.with_label_values(&[label]),
            ran_in_place: metrics::POOL_RAN_IN_PLACE.with_label_values(&[label]),
        });
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
            self.jobs.ran_in_place.inc();
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

    /// Occupies one thread of `pool` with a job that holds it until `release` is sent (or 10 s
    /// pass); returns once the job is running. The handle answers whether it was released.
    async fn occupy(pool: &Arc<Pool>) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<bool>) {
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run_or_block(move || {
                    let _ = started_tx.send(());
                    wait.recv_timeout(Duration::from_secs(10)).is_ok()
                })
                .await
            }
        });
        while started.recv_timeout(Duration::from_millis(10)).is_err() {
            tokio::task::yield_now().await;
        }
        (release, busy)
    }

    /// A panicking job fails its caller; the pool's only thread stays and runs the next job.
    #[tokio::test]
    async fn a_panicking_job_leaves_the_thread_for_the_next() {
        let pool = Pool::start("stemedb-test", "test", 1, 4);
        assert!(pool.run(|| -> u8 { panic!("injected job panic") }).await.is_err());
        assert_eq!(pool.run(|| 7).await.expect("the thread took the next job"), 7);
    }

    /// Each queued job wakes an idle thread: the first job waits for the second, which only
    /// another thread can run. A lost wake-up leaves the first waiting until its timeout.
    #[tokio::test]
    async fn two_jobs_run_at_once_on_two_threads() {
        let pool = Arc::new(Pool::start("stemedb-test-pair", "test", 2, 4));
        let (signal, wait) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(move || wait.recv_timeout(Duration::from_secs(10)).is_ok()).await }
        });
        let second = pool.run(move || signal.send(()).is_ok()).await.expect("ran");
        assert!(second);
        assert!(first.await.expect("joined").expect("ran"), "the second job ran while the first waited");
    }

    /// The queue's metrics follow its jobs: a job waiting for the busy thread is counted queued
    /// until a thread takes it, each taken job's wait is observed, and a job that finds the queue
    /// full is counted as run in place (and runs at once, while the thread is still busy).
    #[tokio::test]
    async fn the_queue_reports_waiting_jobs_their_wait_and_overflow() {
        let label = "test-metrics";
        let queued = super::metrics::POOL_QUEUED_JOBS.with_label_values(&[label]);
        let waits = super::metrics::POOL_WAIT.with_label_values(&[label]);
        let in_place = super::metrics::POOL_RAN_IN_PLACE.with_label_values(&[label]);
        let pool = Arc::new(Pool::start("stemedb-test-metrics", label, 1, 1));
        let (release, busy) = occupy(&pool).await;
        assert_eq!(queued.get(), 0, "the running job is not waiting");
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run_or_block(|| 7).await }
        });
        for _ in 0..1000 {
            if queued.get() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(queued.get(), 1, "the second job waits for the only thread");
        assert_eq!(pool.run_or_block(|| 9).await, 9, "a job beyond the queue runs at once");
        assert_eq!(in_place.get(), 1);
        release.send(()).expect("release");
        assert!(busy.await.expect("joined"));
        assert_eq!(waiting.await.expect("joined"), 7);
        assert_eq!(queued.get(), 0);
        assert_eq!(waits.get_sample_count(), 2, "both queued jobs had their wait observed");
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
        let pool = Arc::new(Pool::start("stemedb-read", "test-read", 1, 1));
        assert_eq!(pool.run(|| 21 * 2).await.expect("ran"), 42);
        let name = pool.run(|| std::thread::current().name().map(String::from)).await.expect("ran");
        assert_eq!(name.as_deref(), Some("stemedb-read-0"));
        // Occupy the only thread, then the only queue slot: the next read is refused at once.
        let (release, first) = occupy(&pool).await;
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
        assert!(first.await.expect("joined"), "the first read was released");
        let _ = queued.await.expect("joined");
    }
}
