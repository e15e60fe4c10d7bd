//! Group commit: one RocksDB write and one fsync for every Raft log append that arrived while
//! the previous ones were being written and synced.
//!
//! An append's batch queues here with its completion callback; the caller returns at once. A
//! dedicated thread takes everything queued, writes all the batches as one RocksDB write
//! (buffered; the WAL record waits in RocksDB's buffer, `manual_wal_flush`), writes the WAL
//! buffer out and syncs it once (`FlushWAL`), and fires the callbacks. So an async worker never
//! waits in RocksDB's write path for an append, and the shards' appends share one write-group
//! entry, one WAL record and one memtable pass. Raft acknowledges a write only after its
//! callback ran, so every acknowledged write is on disk. A batch is readable only once its
//! callback runs: the Raft log store serves the entries meanwhile from its in-memory tail.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rocksdb::DB;

use super::{metrics, WriteBatch};

/// Called once the writes before it are durable (or failed to become so).
pub type DurableCallback = Box<dyn FnOnce(Result<(), io::Error>) + Send>;

struct Queue {
    /// Batches to write, each with the callback to fire once it is durable, in arrival order.
    pending: Vec<(WriteBatch, DurableCallback)>,
    stopped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

pub(super) struct GroupCommitter {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set when the thread could not be started: each append is then written and synced by
    /// its caller.
    inline: Option<(Arc<DB>, bool)>,
}

impl GroupCommitter {
    /// `delay` holds each round before its write (`testing.log_sync_delay_ms`; zero otherwise).
    pub(super) fn start(db: Arc<DB>, fsync: bool, delay: Duration) -> GroupCommitter {
        let shared =
            Arc::new(Shared { queue: Mutex::new(Queue { pending: Vec::new(), stopped: false }), wake: Condvar::new() });
        let (worker_shared, worker_db) = (shared.clone(), db.clone());
        let thread = std::thread::Builder::new()
            .name("stemedb-group-commit".into())
            .spawn(move || run(worker_shared, worker_db, fsync, delay))
            .ok();
        let inline = match thread {
            Some(_) => None,
            None => {
                tracing::error!("could not start the group commit thread; appends will sync inline");
                Some((db, fsync))
            }
        };
        GroupCommitter { shared, thread: Mutex::new(thread), inline }
    }

    pub(super) fn enqueue(&self, batch: WriteBatch, callback: DurableCallback) {
        let mut queue = self.shared.queue.lock();
        if queue.stopped {
            drop(queue);
            callback(Err(io::Error::other("storage is shutting down")));
            return;
        }
        if let Some((db, fsync)) = &self.inline {
            drop(queue);
            commit(db, *fsync, vec![(batch, callback)]);
            return;
        }
        queue.pending.push((batch, callback));
        drop(queue);
        self.shared.wake.notify_one();
    }

    pub(super) fn stop(&self) {
        self.shared.queue.lock().stopped = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.lock().take() {
            // Dropped from a callback, on the committer's own thread: it ends by itself once the
            // callbacks return (joining itself would panic).
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for GroupCommitter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: Arc<Shared>, db: Arc<DB>, fsync: bool, delay: Duration) {
    loop {
        let taken = {
            let mut queue = shared.queue.lock();
            while queue.pending.is_empty() && !queue.stopped {
                shared.wake.wait(&mut queue);
            }
            if queue.pending.is_empty() && queue.stopped {
                return;
            }
            std::mem::take(&mut queue.pending)
        };
        if !delay.is_zero() {
            // A planted delay (tests only), on this thread of its own.
            std::thread::sleep(delay);
        }
        commit(&db, fsync, taken);
    }
}

/// Writes the batches `taken` as one RocksDB write, in their order, syncs, and calls their
/// callbacks with the outcome.
fn commit(db: &DB, fsync: bool, taken: Vec<(WriteBatch, DurableCallback)>) {
    let mut batch = WriteBatch::new();
    let mut callbacks = Vec::with_capacity(taken.len());
    // `Storage::settle_appends` queues empty markers; they are not appends.
    let appends = taken.iter().filter(|(appended, _)| !appended.is_empty()).count();
    for (appended, callback) in taken {
        batch.absorb(appended);
        callbacks.push(callback);
    }
    metrics::GROUP_COMMIT_SIZE.observe(appends as f64);
    let result = match super::write_batch(db, batch, false) {
        Ok(()) => {
            let started = Instant::now();
            metrics::OPS_FSYNC.inc();
            let synced = db.flush_wal(fsync);
            metrics::LOG_FSYNC_DURATION.observe(started.elapsed().as_secs_f64());
            synced.map_err(|error| {
                metrics::STORAGE_OPERATION_ERRORS.with_label_values(&["fsync", super::error_kind(&error)]).inc();
                tracing::error!(error = %error, "raft log fsync failed");
                error.into_string()
            })
        }
        // Counted and logged by `write_batch`.
        Err(error) => Err(error.to_string()),
    };
    match result {
        Ok(()) => callbacks.into_iter().for_each(|callback| callback(Ok(()))),
        Err(message) => callbacks.into_iter().for_each(|callback| callback(Err(io::Error::other(message.clone())))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_batches_are_written_in_order_before_their_callbacks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = super::super::Storage::open(dir.path(), super::super::StorageOptions::default()).expect("open");
        let cf = super::super::ColumnFamily::RaftLog;
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0u8..10 {
            let mut batch = WriteBatch::new();
            batch.put(cf, vec![b'k'], vec![i]);
            batch.put(cf, vec![b'n', i], vec![i]);
            let tx = tx.clone();
            let reader = storage.clone();
            storage
                .write_group_commit(
                    batch,
                    Box::new(move |result| {
                        // Readable once the callback runs.
                        let own = reader.get(cf, &[b'n', i]).expect("get");
                        // Released before the test can go on, so the storage is never dropped
                        // (and its committer joined) on the committer's own thread.
                        drop(reader);
                        tx.send((result.is_ok(), own)).expect("send");
                    }),
                )
                .expect("queue");
        }
        for i in 0u8..10 {
            let (ok, own) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("callback");
            assert!(ok);
            assert_eq!(own, Some(vec![i]), "batch {i}'s keys are readable when its callback runs");
        }
        // The last batch queued wrote the shared key last.
        assert_eq!(storage.get(cf, b"k").expect("get"), Some(vec![9]));
    }
}
