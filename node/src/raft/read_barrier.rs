//! Linearizable read barriers shared among concurrent readers of a shard: a barrier started
//! after a caller arrived is valid for it, so callers that arrive while a barrier is in flight
//! share the next one instead of each asking Raft. A leader lets the other ready tasks of its
//! worker run first, for as long as they bring more readers (`tasks::yield_while_arriving`).

use tokio::sync::oneshot;

use crate::tasks::yield_while_arriving;

/// Shares linearizable read barriers among concurrent readers of a shard; `E` is the barrier's
/// error, handed to every caller it served.
pub struct ReadBarrierGroup<E> {
    state: parking_lot::Mutex<BarrierState<E>>,
}

/// What a waiting caller is woken with.
enum Wake<E> {
    /// A barrier that started after the caller arrived finished.
    Served(Result<u64, E>),
    /// The previous leader is done (or gone): this caller runs the next barrier.
    Lead,
}

struct BarrierState<E> {
    /// Barriers started so far; a caller needs one started after it arrived.
    started: u64,
    running: bool,
    /// Callers waiting for the barrier with generation > the value they recorded, in arrival
    /// order.
    waiters: std::collections::VecDeque<Waiter<E>>,
    /// Numbers the callers, so a leader can find its own entry.
    next_ticket: u64,
}

struct Waiter<E> {
    ticket: u64,
    needed: u64,
    wake: oneshot::Sender<Wake<E>>,
}

impl<E> BarrierState<E> {
    /// Makes the longest-waiting caller that is still there the leader; none left: idle.
    fn hand_over(&mut self) {
        // A failed send is a caller that was cancelled while waiting: skip it.
        while let Some(waiter) = self.waiters.pop_front() {
            if waiter.wake.send(Wake::Lead).is_ok() {
                return;
            }
        }
        self.running = false;
    }
}

impl<E> Default for ReadBarrierGroup<E> {
    fn default() -> Self {
        ReadBarrierGroup {
            state: parking_lot::Mutex::new(BarrierState {
                started: 0,
                running: false,
                waiters: std::collections::VecDeque::new(),
                next_ticket: 0,
            }),
        }
    }
}

impl<E: Clone> ReadBarrierGroup<E> {
    /// How many barriers have started so far.
    pub fn started_count(&self) -> u64 {
        self.state.lock().started
    }

    /// [`ReadBarrierGroup::run`] within this caller's `deadline`: the time spent waiting for a
    /// barrier another caller leads counts too. `None` when the deadline passed first (the
    /// caller's place is given up as when it is cancelled).
    pub async fn run_until<F, Fut>(&self, deadline: tokio::time::Instant, barrier: F) -> Option<Result<u64, E>>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        tokio::time::timeout_at(deadline, self.run(barrier)).await.ok()
    }

    /// Runs `barrier` for this caller, or waits for one that started after it arrived. Returns
    /// the number of the barrier that served it.
    ///
    /// A leader runs one barrier, serves every caller that arrived before it started, and hands
    /// the lead to the longest-waiting remaining caller, so no caller waits for more than two
    /// barriers. Cancellation-safe: a caller dropped while it leads, or after the lead was
    /// handed to it (a client that hung up), passes the lead on from its [`Turn`]; without
    /// that, one cancelled reader left the shard's linearizable reads waiting forever.
    pub async fn run<F, Fut>(&self, barrier: F) -> Result<u64, E>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let mut turn = {
            let (tx, rx) = oneshot::channel();
            let mut state = self.state.lock();
            let needed = state.started + 1;
            state.next_ticket += 1;
            let ticket = state.next_ticket;
            state.waiters.push_back(Waiter { ticket, needed, wake: tx });
            let leading = !std::mem::replace(&mut state.running, true);
            Turn { group: self, ticket, needed, rx, leading }
        };
        loop {
            if turn.leading {
                // Readers ready to arrive (queued on this worker, or from the network meanwhile)
                // join this barrier, not the next.
                yield_while_arriving(usize::MAX, || self.state.lock().waiters.len()).await;
                let generation = {
                    let mut state = self.state.lock();
                    state.started += 1;
                    state.started
                };
                let result = barrier().await.map(|()| generation);
                let mut state = self.state.lock();
                let (done, rest): (std::collections::VecDeque<_>, std::collections::VecDeque<_>) =
                    state.waiters.drain(..).partition(|waiter| waiter.needed <= generation);
                state.waiters = rest;
                for waiter in done {
                    let _ = waiter.wake.send(Wake::Served(result.clone()));
                }
                state.hand_over();
                turn.leading = false;
            }
            match (&mut turn.rx).await {
                Ok(Wake::Served(result)) => return result,
                Ok(Wake::Lead) => {
                    // The previous leader handed over (`running` stays set): lead the next
                    // barrier, which also serves this caller.
                    let (tx, fresh) = oneshot::channel();
                    self.state.lock().waiters.push_front(Waiter { ticket: turn.ticket, needed: turn.needed, wake: tx });
                    turn.rx = fresh;
                    turn.leading = true;
                }
                Err(_) => {
                    // Our sender went away unanswered: register again.
                    let (tx, fresh) = oneshot::channel();
                    let mut state = self.state.lock();
                    state.waiters.push_back(Waiter { ticket: turn.ticket, needed: turn.needed, wake: tx });
                    turn.leading = !std::mem::replace(&mut state.running, true);
                    turn.rx = fresh;
                }
            }
        }
    }
}

/// One caller's place in a [`ReadBarrierGroup`]. Dropping it before the caller was served
/// (the request was cancelled) passes the lead on when the caller held it: while it ran a
/// barrier (its own waiter entry is removed first, else the lead would go to that entry and
/// vanish), or after the lead was handed to it and before it was polled again (the receiver is
/// closed first, so no lead can arrive after the check).
struct Turn<'a, E> {
    group: &'a ReadBarrierGroup<E>,
    ticket: u64,
    /// The barrier generation that serves this caller.
    needed: u64,
    rx: oneshot::Receiver<Wake<E>>,
    leading: bool,
}

impl<E> Drop for Turn<'_, E> {
    fn drop(&mut self) {
        if self.leading {
            let mut state = self.group.state.lock();
            state.waiters.retain(|waiter| waiter.ticket != self.ticket);
            state.hand_over();
            return;
        }
        self.rx.close();
        if let Ok(Wake::Lead) = self.rx.try_recv() {
            self.group.state.lock().hand_over();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

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

    /// Callers cancelled at random points (clients hanging up mid-read) never strand the shard:
    /// in particular a waiter cancelled after it was handed the lead but before it took it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_cancelled_at_random_never_strand_the_shard() {
        use rand::{Rng, SeedableRng};
        let group = Arc::new(ReadBarrierGroup::<String>::default());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..40 {
            let mut tasks = Vec::new();
            for _ in 0..64 {
                let group = group.clone();
                let patience = Duration::from_micros(rng.random_range(50..3000));
                let delay = Duration::from_micros(rng.random_range(0..500));
                let task = tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = group
                        .run(|| async {
                            tokio::time::sleep(Duration::from_micros(300)).await;
                            Ok::<(), String>(())
                        })
                        .await;
                });
                // Aborted from outside, like a connection task dropping its request: the reader
                // may be woken and never polled again.
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(patience).await;
                    task.abort();
                }));
            }
            for task in tasks {
                task.await.expect("join");
            }
            let after =
                tokio::time::timeout(Duration::from_secs(2), group.run(|| async { Ok::<(), String>(()) })).await;
            assert!(matches!(after, Ok(Ok(_))), "round {round}: a reader after the cancellations was stranded");
        }
    }

    /// A reader waiting behind a barrier that does not finish gives up at its own deadline,
    /// not when the barrier's leader does; the leader is still served by its barrier once it
    /// finishes, and a later reader runs the next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_reader_gives_up_at_its_own_deadline() {
        let group = Arc::new(ReadBarrierGroup::<String>::default());
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(tokio::sync::Mutex::new(Some(finished)));
        let leader = {
            let group = group.clone();
            tokio::spawn(async move {
                group
                    .run(|| {
                        let finished = finished.clone();
                        async move {
                            if let Some(finished) = finished.lock().await.take() {
                                let _ = finished.await;
                            }
                            Ok::<(), String>(())
                        }
                    })
                    .await
            })
        };
        while group.started_count() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        // Bounded here so that a reader that waits for the barrier fails the test, not hangs it.
        let waited =
            tokio::time::timeout(Duration::from_secs(5), group.run_until(deadline, || async { Ok::<(), String>(()) }))
                .await
                .expect("the reader gave up at its deadline, not with the barrier");
        assert!(waited.is_none(), "the waiting reader was served by a barrier that never finished: {waited:?}");
        finish.send(()).expect("the leader is still running its barrier");
        assert!(matches!(leader.await, Ok(Ok(1))), "the leader is served by its own barrier");
        let later = tokio::time::timeout(Duration::from_secs(5), group.run(|| async { Ok::<(), String>(()) })).await;
        assert!(matches!(later, Ok(Ok(2))), "a later reader runs the next barrier: {later:?}");
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
