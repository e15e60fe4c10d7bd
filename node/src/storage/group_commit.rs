//! Group commit: one fsync for every Raft log append that arrived while the previous fsync ran.
//!
//! Appends are written to RocksDB with a buffered WAL write (readable at once; the WAL record
//! waits in RocksDB's buffer, `manual_wal_flush`), then their completion callbacks queue here. A
//! dedicated thread takes everything queued, writes the WAL buffer out and syncs it once
//! (`FlushWAL`), and fires the callbacks; Raft acknowledges a write only after its callback ran, so every
//! acknowledged write is on disk while concurrent shards share the cost of one sync.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use rocksdb::DB;

use super::metrics;

/// Called once the writes before it are durable (or failed to become so).
pub type DurableCallback = Box<dyn FnOnce(Result<(), io::Error>) + Send>;

struct Queue {
    pending: Vec<DurableCallback>,
    stopped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

pub(super) struct GroupCommitter {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl GroupCommitter {
    pub(super) fn start(db: Arc<DB>, fsync: bool) -> GroupCommitter {
        let shared =
            Arc::new(Shared { queue: Mutex::new(Queue { pending: Vec::new(), stopped: false }), wake: Condvar::new() });
        let worker_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("stemedb-group-commit".into())
            .spawn(move || run(worker_shared, db, fsync))
            .ok();
        if thread.is_none() {
            tracing::error!("could not start the group commit thread; appends will sync inline");
        }
        GroupCommitter { shared, thread: Mutex::new(thread) }
    }

    pub(super) fn enqueue(&self, callback: DurableCallback) {
        let mut queue = self.shared.queue.lock();
        if queue.stopped {
            drop(queue);
            callback(Err(io::Error::other("storage is shutting down")));
            return;
        }
        queue.pending.push(callback);
        drop(queue);
        self.shared.wake.notify_one();
    }

    pub(super) fn stop(&self) {
        self.shared.queue.lock().stopped = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for GroupCommitter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: Arc<Shared>, db: Arc<DB>, fsync: bool) {
    loop {
        let batch = {
            let mut queue = shared.queue.lock();
            while queue.pending.is_empty() && !queue.stopped {
                shared.wake.wait(&mut queue);
            }
            if queue.pending.is_empty() && queue.stopped {
                return;
            }
            std::mem::take(&mut queue.pending)
        };
        let started = Instant::now();
        metrics::OPS_FSYNC.inc();
        let result = db.flush_wal(fsync);
        metrics::LOG_FSYNC_DURATION.observe(started.elapsed().as_secs_f64());
        metrics::GROUP_COMMIT_SIZE.observe(batch.len() as f64);
        match result {
            Ok(()) => batch.into_iter().for_each(|callback| callback(Ok(()))),
            Err(error) => {
                metrics::STORAGE_OPERATION_ERRORS.with_label_values(&["fsync", super::error_kind(&error)]).inc();
                tracing::error!(error = %error, "raft log fsync failed");
                let message = error.into_string();
                batch.into_iter().for_each(|callback| callback(Err(io::Error::other(message.clone()))));
            }
        }
    }
}
