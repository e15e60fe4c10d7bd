//! Coalescing of concurrent writes to the same shard. Single assertions arriving for a shard
//! while earlier proposals are in flight are gathered into one `ShardCommand::Assert` entry (up
//! to [`MAX_BATCH_ITEMS`]); each caller gets its own item's result. One Raft entry, one log
//! append and one apply then serve many clients, which is where a write's cost is. A node that
//! leads the shard has one proposal in flight per shard; one that does not forwards its batches
//! to the leader, [`FORWARDS_IN_FLIGHT`] at most at once. Requests arriving meanwhile wait and
//! form the next batch. Before it closes a batch, the batcher lets the other ready tasks of its
//! worker run for as long as they bring more requests (`tasks::yield_while_arriving`). (Read
//! barriers are shared the same way in `raft::read_barrier`.)
//!
//! On the shard's leader the batcher also takes the batches other nodes forward to it
//! ([`WriteBatchers::forwarded`], from the Propose rpc), each in its idempotency token, and puts
//! them in the same entry as its own (`ShardCommand::Parts`). openraft 0.9 syncs a group's log
//! once per entry, one entry after another, so every forwarded batch that would have been an
//! entry of its own costs the group a sync and a round (docs/performance.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::Coordinator;
use crate::model::assertion::{AssertionDraft, MAX_ENTRY_BYTES};
use crate::model::id::now_us;
use crate::model::ModelError;
use crate::raft::ShardSet;
use crate::shard::command::{AssertOutcome, ProposalToken, ShardCommand, ShardResponse};
use crate::shard::ConsensusError;
use crate::tasks::yield_while_arriving;

pub const MAX_BATCH_ITEMS: usize = 256;
/// Batches a node that does not lead the shard forwards to the leader at once. They meet the
/// leader's own in its next entry, so more of them in flight means fewer entries, not more.
/// (With one, 64 writers over 3 nodes made 2,892-3,212 writes/s; with four, 3,522-3,551.)
pub const FORWARDS_IN_FLIGHT: usize = 4;
/// Items in one entry at most, the forwarded batches included: a forwarded batch joins the
/// batcher only when it has at most [`MAX_BATCH_ITEMS`] items, so an entry has room for its own
/// batch and at least seven forwarded ones. An entry is also cut at about [`MAX_ENTRY_BYTES`].
pub const MAX_ENTRY_ITEMS: usize = 8 * MAX_BATCH_ITEMS;
const _: () = assert!(MAX_ENTRY_ITEMS <= crate::model::id::MAX_ITEMS_PER_ENTRY);

type ItemResult = Result<Result<AssertOutcome, ModelError>, ConsensusError>;
type PartResult = Result<ShardResponse, ConsensusError>;

struct PendingWrite {
    draft: AssertionDraft,
    deadline: Instant,
    reply: oneshot::Sender<ItemResult>,
}

/// A batch another node forwarded to this node, the shard's leader, in its token.
struct ForwardedPart {
    token: ProposalToken,
    proposed_at_us: u64,
    items: Vec<AssertionDraft>,
    deadline: Instant,
    reply: oneshot::Sender<PartResult>,
}

enum Queued {
    Write(PendingWrite),
    Forwarded(ForwardedPart),
}

impl Queued {
    /// The items it adds to an entry (an empty forwarded batch counts one: it is a part).
    fn items(&self) -> usize {
        match self {
            Queued::Write(_) => 1,
            Queued::Forwarded(part) => part.items.len().max(1),
        }
    }

    /// The bytes it adds to an entry, estimated.
    fn bytes(&self) -> usize {
        match self {
            Queued::Write(write) => write.draft.estimated_bytes(),
            Queued::Forwarded(part) => part.items.iter().map(AssertionDraft::estimated_bytes).sum(),
        }
    }

    fn deadline(&self) -> Instant {
        match self {
            Queued::Write(write) => write.deadline,
            Queued::Forwarded(part) => part.deadline,
        }
    }
}

/// The write batchers of every shard.
#[derive(Clone)]
pub struct WriteBatchers {
    senders: Vec<mpsc::Sender<Queued>>,
    capacity: usize,
}

impl WriteBatchers {
    /// Starts one batcher task per shard, each queue holding at most `capacity` waiting writes
    /// and forwarded batches. They stop with the node's tasks, or when the shard set is dropped.
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
        let (reply, answer) = oneshot::channel();
        self.queue(shard, Queued::Write(PendingWrite { draft, deadline: Instant::now() + timeout, reply }))?;
        answer.await.map_err(|_| ConsensusError::ShuttingDown { shard })?
    }

    /// Proposes a command another node forwarded to this node, the leader of `shard`, as part of
    /// its next entry, when it is a batch of at most [`MAX_BATCH_ITEMS`] assertions in a token;
    /// its answer is the part's (`ShardResponse::Asserted`, or the first copy's answer for a
    /// token seen before). Any other command is given back, to be proposed alone.
    pub async fn forwarded(
        &self,
        shard: u16,
        command: ShardCommand,
        timeout: Duration,
    ) -> Result<PartResult, ShardCommand> {
        let ShardCommand::Once { token, command } = command else { return Err(command) };
        let (proposed_at_us, items) = match *command {
            ShardCommand::Assert { proposed_at_us, items } if items.len() <= MAX_BATCH_ITEMS => (proposed_at_us, items),
            command => return Err(ShardCommand::Once { token, command: Box::new(command) }),
        };
        let (reply, answer) = oneshot::channel();
        let part = ForwardedPart { token, proposed_at_us, items, deadline: Instant::now() + timeout, reply };
        if let Err(error) = self.queue(shard, Queued::Forwarded(part)) {
            return Ok(Err(error));
        }
        // Dropped unanswered (the node is stopping): it may have been proposed, so the forwarding
        // node must not take it for a refusal.
        let timeout_ms = timeout.as_millis() as u64;
        Ok(answer.await.unwrap_or(Err(ConsensusError::Timeout { shard, timeout_ms })))
    }

    fn queue(&self, shard: u16, queued: Queued) -> Result<(), ConsensusError> {
        let sender = self.senders.get(shard as usize).ok_or(ConsensusError::UnknownShard { shard })?;
        sender.try_send(queued).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                crate::metrics::REQUESTS_SHED.with_label_values(&["write_queue"]).inc();
                ConsensusError::Overloaded { shard, queued: self.capacity }
            }
            mpsc::error::TrySendError::Closed(_) => ConsensusError::ShuttingDown { shard },
        })
    }
}

async fn run_batcher(shards: std::sync::Weak<ShardSet>, shard: u16, mut requests: mpsc::Receiver<Queued>) {
    let in_flight = Arc::new(Semaphore::new(FORWARDS_IN_FLIGHT));
    // What did not fit in the last entry: it starts the next.
    let mut carried: Option<Queued> = None;
    loop {
        // Wait for a free proposal slot first, so requests pile up into the next batch meanwhile.
        // The leader takes every slot: one entry in flight.
        let leads = shards.upgrade().is_some_and(|s| s.leads(shard));
        let slots = if leads { FORWARDS_IN_FLIGHT as u32 } else { 1 };
        let Ok(permit) = in_flight.clone().acquire_many_owned(slots).await else { return };
        let first = match carried.take() {
            Some(first) => first,
            None => match requests.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut batch = vec![first];
        carried = gather(&mut requests, &mut batch).await;
        let Some(shards) = shards.upgrade() else { return };
        let tasks = shards.tasks.clone();
        tasks.spawn(async move {
            propose(&shards, shard, batch).await;
            drop(permit);
        });
    }
}

/// Proposes a gathered batch and answers each caller. Without forwarded batches, the writes go
/// as one `Assert` through [`Coordinator::propose`], which sends them to the leader wherever
/// it is. With them, this node proposes the entry itself (`ShardSet::propose_local`): the
/// forwarded batches came because it leads the shard, and if it no longer does they are
/// refused with `not_leader`, which their nodes retry elsewhere with the same tokens. This
/// node's own writes are then proposed again alone, the usual way.
async fn propose(shards: &ShardSet, shard: u16, batch: Vec<Queued>) {
    let deadline = batch.iter().map(Queued::deadline).max().unwrap_or_else(Instant::now);
    let timeout = deadline.saturating_duration_since(Instant::now());
    let mut writes = Vec::new();
    let mut forwarded = Vec::new();
    for queued in batch {
        match queued {
            Queued::Write(write) => writes.push(write),
            Queued::Forwarded(part) => forwarded.push(part),
        }
    }
    if forwarded.is_empty() {
        propose_writes(shards, shard, writes, timeout).await;
        return;
    }
    crate::raft::metrics::ENTRY_PARTS.observe((forwarded.len() + usize::from(!writes.is_empty())) as f64);
    if !writes.is_empty() {
        // The shard's write rate counts proposals (`Coordinator::propose` does, on the other path).
        if let Ok(group) = shards.group(shard) {
            group.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let own = writes.len();
    let mut items = Vec::with_capacity(own);
    let mut deadlines = Vec::with_capacity(own);
    let mut replies = Vec::with_capacity(own);
    for write in writes {
        items.push(write.draft);
        deadlines.push(write.deadline);
        replies.push(write.reply);
    }
    let (mut part_replies, forwarded): (Vec<_>, Vec<_>) =
        forwarded.into_iter().map(|part| (part.reply, (part.token, part.proposed_at_us, part.items))).unzip();
    let command = Arc::new(entry_of(items, forwarded));
    match shards.propose_local(shard, Arc::clone(&command), timeout).await {
        Ok(ShardResponse::Parts(mut responses)) if responses.len() == part_replies.len() + usize::from(own > 0) => {
            if own > 0 {
                answer_writes(shard, replies, Ok(responses.remove(0)));
            }
            for (reply, response) in part_replies.into_iter().zip(responses) {
                let _ = reply.send(Ok(response));
            }
        }
        Ok(response) if own == 0 && part_replies.len() == 1 => {
            if let Some(reply) = part_replies.pop() {
                let _ = reply.send(Ok(response));
            }
        }
        // The whole entry refused (as every replica refuses it): nothing was applied.
        Ok(ShardResponse::Refused(error)) => {
            for reply in part_replies {
                let _ = reply.send(Ok(ShardResponse::Refused(error.clone())));
            }
            answer_writes(shard, replies, Ok(ShardResponse::Refused(error)));
        }
        Ok(_) => {
            let error = ConsensusError::Internal { shard, message: "unexpected state machine answer".into() };
            answer_writes(shard, replies, Err(error.clone()));
            for reply in part_replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
        Err(error) => {
            // The forwarded parts carry tokens, so their nodes may send them again whatever
            // became of this entry: an outcome unknown here (an entry appended, then lost with
            // the leadership, which a later leader may still commit) is for them a refusal.
            let refusal = match &error {
                ConsensusError::OutcomeUnknown { .. } => ConsensusError::NotLeader { shard, leader: None },
                other => other.clone(),
            };
            for reply in part_replies {
                let _ = reply.send(Err(refusal.clone()));
            }
            if matches!(error, ConsensusError::NotLeader { .. } | ConsensusError::NoQuorum { .. }) && own > 0 {
                // Refused before anything was appended: this node's writes go the usual way.
                // (Usually the only holder of the entry by now; openraft may still hold a refused
                // one for a moment, and then this copies it.)
                let items = own_items(Arc::unwrap_or_clone(command));
                if items.len() != replies.len() {
                    let message = format!("{} drafts taken back for {} writes", items.len(), replies.len());
                    answer_writes(shard, replies, Err(ConsensusError::Internal { shard, message }));
                    return;
                }
                let writes = items
                    .into_iter()
                    .zip(deadlines)
                    .zip(replies)
                    .map(|((draft, deadline), reply)| PendingWrite { draft, deadline, reply })
                    .collect();
                propose_writes(shards, shard, writes, deadline.saturating_duration_since(Instant::now())).await;
            } else {
                answer_writes(shard, replies, Err(error));
            }
        }
    }
}

/// The entry of a gathered batch: this node's own writes first (when it has any), then each
/// forwarded batch in its token; a single part is the entry itself.
fn entry_of(own: Vec<AssertionDraft>, forwarded: Vec<(ProposalToken, u64, Vec<AssertionDraft>)>) -> ShardCommand {
    let mut parts = Vec::with_capacity(forwarded.len() + 1);
    if !own.is_empty() {
        parts.push(ShardCommand::Assert { proposed_at_us: now_us(), items: own });
    }
    for (token, proposed_at_us, items) in forwarded {
        let assert = ShardCommand::Assert { proposed_at_us, items };
        parts.push(ShardCommand::Once { token, command: Box::new(assert) });
    }
    if parts.len() == 1 {
        parts.remove(0)
    } else {
        ShardCommand::Parts { parts }
    }
}

/// This node's own drafts in an entry [`entry_of`] built with some: its first part, or the
/// whole entry when it has no other.
fn own_items(command: ShardCommand) -> Vec<AssertionDraft> {
    match command {
        ShardCommand::Assert { items, .. } => items,
        ShardCommand::Parts { parts } => parts.into_iter().next().map(own_items).unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Proposes this node's own writes as one `Assert` and answers each.
async fn propose_writes(shards: &ShardSet, shard: u16, writes: Vec<PendingWrite>, timeout: Duration) {
    if writes.is_empty() {
        return;
    }
    let (drafts, replies): (Vec<_>, Vec<_>) = writes.into_iter().map(|p| (p.draft, p.reply)).unzip();
    let command = ShardCommand::Assert { proposed_at_us: now_us(), items: drafts };
    answer_writes(shard, replies, shards.propose(shard, command, timeout).await);
}

/// Hands each writer its item's result from the answer to their `Assert`.
fn answer_writes(shard: u16, replies: Vec<oneshot::Sender<ItemResult>>, answer: PartResult) {
    match answer {
        Ok(ShardResponse::Asserted(results)) if results.len() == replies.len() => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Ok(ShardResponse::Refused(error)) => {
            for reply in replies {
                let _ = reply.send(Err(ConsensusError::Refused { shard, error: error.clone() }));
            }
        }
        Ok(_) => {
            for reply in replies {
                let _ = reply
                    .send(Err(ConsensusError::Internal { shard, message: "unexpected state machine answer".into() }));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// Fills `batch` with the requests waiting in `requests`, up to [`MAX_BATCH_ITEMS`] writes of
/// this node, [`MAX_ENTRY_ITEMS`] items and about [`MAX_ENTRY_BYTES`] in all, and keeps doing so
/// while letting the worker's other ready tasks run, as long as they bring more
/// ([`yield_while_arriving`]). Returns a request taken that did not fit.
async fn gather(requests: &mut mpsc::Receiver<Queued>, batch: &mut Vec<Queued>) -> Option<Queued> {
    let mut items: usize = batch.iter().map(Queued::items).sum();
    let mut bytes: usize = batch.iter().map(Queued::bytes).sum();
    let mut writes = batch.iter().filter(|q| matches!(q, Queued::Write(_))).count();
    let mut carried = None;
    yield_while_arriving(usize::MAX, || {
        while carried.is_none() && writes < MAX_BATCH_ITEMS {
            match requests.try_recv() {
                Ok(request)
                    if items + request.items() > MAX_ENTRY_ITEMS || bytes + request.bytes() > MAX_ENTRY_BYTES =>
                {
                    carried = Some(request)
                }
                Ok(request) => {
                    items += request.items();
                    bytes += request.bytes();
                    writes += usize::from(matches!(request, Queued::Write(_)));
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        // Full (or something waits for the next entry): no more turns.
        if carried.is_some() || writes >= MAX_BATCH_ITEMS {
            usize::MAX
        } else {
            batch.len()
        }
    })
    .await;
    carried
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(items: usize, value_bytes: usize) -> (Queued, oneshot::Receiver<PartResult>) {
        let value = format!("\"{}\"", "x".repeat(value_bytes));
        let items = (0..items).map(|_| AssertionDraft::for_test("a/b", "p", "agent", &value)).collect();
        let (reply, answer) = oneshot::channel();
        let token = ProposalToken::new();
        let part = ForwardedPart { token, proposed_at_us: 1, items, deadline: Instant::now(), reply };
        (Queued::Forwarded(part), answer)
    }

    async fn gathered(queued: Vec<Queued>) -> (Vec<Queued>, Option<Queued>, usize) {
        let (tx, mut rx) = mpsc::channel(64);
        let mut queued = queued.into_iter();
        let first = queued.next().expect("one at least");
        for q in queued {
            assert!(tx.try_send(q).is_ok());
        }
        let mut batch = vec![first];
        let carried = gather(&mut rx, &mut batch).await;
        let left = std::iter::from_fn(|| rx.try_recv().ok()).count();
        (batch, carried, left)
    }

    /// An entry takes forwarded batches up to its item bound, and the one that does not fit
    /// starts the next entry instead of being lost or split.
    #[tokio::test]
    async fn an_entry_stops_at_its_item_bound_and_carries_the_next() {
        let (queued, _answers): (Vec<_>, Vec<_>) = (0..10).map(|_| part(MAX_BATCH_ITEMS, 1)).unzip();
        let (batch, carried, left) = gathered(queued).await;
        assert_eq!(batch.len(), MAX_ENTRY_ITEMS / MAX_BATCH_ITEMS);
        assert!(carried.is_some(), "the ninth batch waits for the next entry");
        assert_eq!(left, 1);
    }

    /// And at about MAX_ENTRY_BYTES: two batches of 400 KB go together, the third waits.
    #[tokio::test]
    async fn an_entry_stops_at_its_byte_bound() {
        let (queued, _answers): (Vec<_>, Vec<_>) = (0..3).map(|_| part(1, 400 * 1024)).unzip();
        let (batch, carried, left) = gathered(queued).await;
        assert_eq!(batch.len(), 2);
        assert!(batch.iter().map(Queued::bytes).sum::<usize>() <= MAX_ENTRY_BYTES);
        assert!(carried.is_some());
        assert_eq!(left, 0);
    }

    /// The leader's own writes come back out of the entry built with them, whatever else it
    /// holds, so a refused entry's writes can be proposed again without a copy kept aside.
    #[test]
    fn own_writes_come_back_out_of_their_entry() {
        let drafts = |n: usize, agent: &str| -> Vec<AssertionDraft> {
            (0..n).map(|i| AssertionDraft::for_test("a/b", "p", agent, &i.to_string())).collect()
        };
        let values = |items: &[AssertionDraft]| -> Vec<(String, String)> {
            items.iter().map(|d| (d.agent_id.clone(), d.value.get().to_string())).collect()
        };
        for forwarded in [0, 1, 3] {
            let parts = (0..forwarded).map(|_| (ProposalToken::new(), 1, drafts(2, "forwarded"))).collect();
            let own = drafts(3, "own");
            let entry = entry_of(own.clone(), parts);
            assert_eq!(entry.item_count(), 3 + 2 * forwarded);
            assert_eq!(values(&own_items(entry)), values(&own), "{forwarded} forwarded parts");
        }
        // Only forwarded parts: none of them is this node's.
        let entry = entry_of(Vec::new(), vec![(ProposalToken::new(), 1, drafts(2, "forwarded"))]);
        assert!(matches!(entry, ShardCommand::Once { .. }));
        assert!(own_items(entry).is_empty());
    }

    /// An empty forwarded batch still counts as a part, so parts per entry stay bounded.
    #[tokio::test]
    async fn empty_forwarded_batches_count_against_the_bound() {
        let (queued, _answers): (Vec<_>, Vec<_>) = (0..MAX_ENTRY_ITEMS + 5).map(|_| part(0, 1)).unzip();
        let (tx, mut rx) = mpsc::channel(MAX_ENTRY_ITEMS + 8);
        let mut queued = queued.into_iter();
        let mut batch = vec![queued.next().expect("one")];
        for q in queued {
            assert!(tx.try_send(q).is_ok());
        }
        let carried = gather(&mut rx, &mut batch).await;
        assert_eq!(batch.len(), MAX_ENTRY_ITEMS);
        assert!(carried.is_some());
    }
}
