//! The client workloads. Clients talk to any running node, as behind a load balancer.
//!
//! * **Registers**: clients write unique integers to a few (concept_path, predicate) keys and
//!   read them back with the recency lens at `linearizable` consistency; every operation's
//!   invoke and complete times go into the history.
//! * **Set**: each client appends unique values to its own concept_path with a `request_id`,
//!   retrying an indeterminate write with the same `request_id` until it is acknowledged or
//!   refused. At the end, every acknowledged value must be there exactly once.
//! * **Unkeyed set**: clients add unique values to a few shared keys *without* a `request_id`,
//!   each write sent once and never retried. At the end, no value may be there twice and every
//!   acknowledged one must be there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::history::{Op, OpKind, Outcome};

/// The nodes clients may talk to right now (client API base URLs by node id).
pub type Targets = Arc<std::sync::RwLock<BTreeMap<u64, String>>>;

pub const PREDICATE: &str = "value";

/// How long a client waits for one answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The register history: an append-only log of operations, each with a unique id.
#[derive(Default)]
pub struct History {
    ops: std::sync::Mutex<Vec<Op>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl History {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    pub fn record(&self, op: Op) {
        if let Ok(mut ops) = self.ops.lock() {
            ops.push(op);
        }
    }

    /// Every operation recorded, by id.
    pub fn take(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().map(|mut ops| std::mem::take(&mut *ops)).unwrap_or_default();
        ops.sort_by_key(|o| o.id);
        ops
    }
}

/// A client request's result as the checkers classify it.
enum Answer {
    Ok(Value),
    /// Definitely not applied (4xx other than 408/429).
    Refused(String),
    /// Unknown.
    Unknown(String),
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> Answer {
    match client.post(url).json(body).timeout(REQUEST_TIMEOUT).send().await {
        Err(error) => Answer::Unknown(format!("transport: {error}")),
        Ok(response) => {
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            match status {
                200 | 201 => Answer::Ok(body),
                408 | 429 => Answer::Unknown(format!("{status} {}", body["error"]["code"])),
                400..=499 => Answer::Refused(format!("{status} {}", body["error"]["code"])),
                _ => Answer::Unknown(format!("{status} {}", body["error"]["code"])),
            }
        }
    }
}

fn pick_target(targets: &Targets, rng: &mut StdRng) -> Option<(u64, String)> {
    let targets = targets.read().ok()?;
    if targets.is_empty() {
        return None;
    }
    let index = rng.random_range(0..targets.len());
    targets.iter().nth(index).map(|(id, url)| (*id, url.clone()))
}

/// What the clients of one workload share.
#[derive(Clone)]
pub struct Clients {
    /// The keys they operate on.
    pub keys: Arc<Vec<String>>,
    pub targets: Targets,
    /// Where their operations are recorded.
    pub history: Arc<History>,
    /// Time zero of the histories.
    pub started: Instant,
    /// When they stop.
    pub deadline: Instant,
    pub seed: u64,
    pub client: reqwest::Client,
}

/// Runs one register client until the deadline.
pub async fn register_client(process: u32, clients: Clients) {
    let Clients { keys, targets, history, started, deadline, seed, client } = clients;
    let mut rng = StdRng::seed_from_u64(seed ^ (process as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut counter = 0i64;
    while Instant::now() < deadline {
        let Some((node, base)) = pick_target(&targets, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let key = keys[rng.random_range(0..keys.len())].clone();
        if rng.random_bool(0.5) {
            counter += 1;
            let value = process as i64 * 1_000_000_000 + counter;
            let body = assertion(&key, value, &format!("chaos-{process}"), Some(&format!("reg-{process}-{counter}")));
            write_once(&client, &base, Sent { process, node, key, value }, &body, &history, started).await;
        } else {
            read_recorded(&client, &base, Sent { process, node, key, value: 0 }, &history, started).await;
        }
    }
}

/// The body of `POST /v1/assert` of `value` on (`key`, [`PREDICATE`]).
pub fn assertion(key: &str, value: i64, agent_id: &str, request_id: Option<&str>) -> Value {
    let mut body = json!({"concept_path": key, "predicate": PREDICATE, "value": value, "agent_id": agent_id});
    if let Some(request_id) = request_id {
        body["request_id"] = json!(request_id);
    }
    body
}

/// One request as a client sends it: who, through which node, on which key (and for a write,
/// the value).
pub struct Sent {
    pub process: u32,
    pub node: u64,
    pub key: String,
    pub value: i64,
}

/// Sends `body` (an assertion of `sent.value` on `sent.key`) to the node at `base` exactly once
/// and records it in `history`: acknowledged, refused, or indeterminate when the answer proves
/// nothing either way. Returns the outcome.
pub async fn write_once(
    client: &reqwest::Client,
    base: &str,
    sent: Sent,
    body: &Value,
    history: &History,
    started: Instant,
) -> Outcome {
    let id = history.next_id();
    let invoke_us = started.elapsed().as_micros() as u64;
    let answer = post(client, &format!("{base}/v1/assert"), body).await;
    let answered_us = started.elapsed().as_micros() as u64;
    let (outcome, complete_us, error) = match answer {
        Answer::Ok(_) => (Outcome::Ok, Some(answered_us), None),
        Answer::Refused(e) => (Outcome::Fail, Some(answered_us), Some(e)),
        Answer::Unknown(e) => (Outcome::Indeterminate, None, Some(e)),
    };
    history.record(Op {
        id,
        process: sent.process,
        key: sent.key,
        kind: OpKind::Write,
        value: Some(sent.value),
        invoke_us,
        complete_us,
        answered_us,
        outcome,
        node: sent.node,
        error,
    });
    outcome
}

/// Reads the register `key` through the node at `base` at `consistency`: the recency winner's
/// value (`null` when the register is empty), or why it could not.
pub async fn read_register(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    consistency: &str,
) -> Result<Value, String> {
    let body = json!({"concept_path": key, "predicate": PREDICATE, "lens": "recency", "consistency": consistency});
    match post(client, &format!("{base}/v1/query"), &body).await {
        Answer::Ok(body) => Ok(body["results"]
            .as_array()
            .and_then(|r| r.first())
            .map(|r| r["winner"]["value"].clone())
            .unwrap_or(Value::Null)),
        Answer::Refused(e) | Answer::Unknown(e) => Err(e),
    }
}

/// A linearizable read of `sent.key` through the node at `base`, recorded in `history` (a read
/// that failed had no effect: `fail`). Returns what it recorded.
pub async fn read_recorded(
    client: &reqwest::Client,
    base: &str,
    sent: Sent,
    history: &History,
    started: Instant,
) -> (Outcome, Option<i64>) {
    let id = history.next_id();
    let invoke_us = started.elapsed().as_micros() as u64;
    let answer = read_register(client, base, &sent.key, "linearizable").await;
    let answered_us = started.elapsed().as_micros() as u64;
    let (outcome, value, error) = match answer {
        Ok(Value::Null) => (Outcome::Ok, None, None),
        Ok(Value::Number(n)) if n.as_i64().is_some() => (Outcome::Ok, n.as_i64(), None),
        // Nobody writes anything but integers here: read as the empty register, which the
        // checkers then report (the value was written, so "empty" cannot be linearized).
        Ok(other) => (Outcome::Ok, None, Some(format!("unexpected value {other}"))),
        Err(e) => (Outcome::Fail, None, Some(e)),
    };
    history.record(Op {
        id,
        process: sent.process,
        key: sent.key,
        kind: OpKind::Read,
        value,
        invoke_us,
        complete_us: Some(answered_us),
        answered_us,
        outcome,
        node: sent.node,
        error,
    });
    (outcome, value)
}

/// Sends the assertion `body` (which must carry a `request_id`, so retries write at most once)
/// through the node `next_target` names for each attempt, again every 100 ms while the answer
/// proves nothing, until it is acknowledged (`ok`) or refused (`fail`), or `until` passes
/// (`indeterminate`).
pub async fn write_until_settled(
    client: &reqwest::Client,
    body: &Value,
    until: Instant,
    mut next_target: impl FnMut() -> Option<(u64, String)>,
) -> Outcome {
    while Instant::now() < until {
        let Some((_, base)) = next_target() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match post(client, &format!("{base}/v1/assert"), body).await {
            Answer::Ok(_) => return Outcome::Ok,
            Answer::Refused(_) => return Outcome::Fail,
            Answer::Unknown(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Outcome::Indeterminate
}

/// Runs one unkeyed-set client until the deadline: each write adds a value unique in the run to a
/// random key, through a random node, **without a `request_id`**, and is sent exactly once
/// (never retried, whatever the answer). Nothing on the client side can then make a value land
/// twice: a value read back more than once was applied twice by the cluster (a forwarded write
/// replayed after the shard leader died, paused or was cut off, for instance).
pub async fn unkeyed_client(process: u32, clients: Clients) {
    let Clients { keys, targets, history, started, deadline, seed, client } = clients;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0c_e000_0000 ^ (process as u64) << 44);
    let mut counter = 0i64;
    while Instant::now() < deadline {
        let Some((node, base)) = pick_target(&targets, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        counter += 1;
        let key = keys[rng.random_range(0..keys.len())].clone();
        let value = process as i64 * 1_000_000_000 + counter;
        // No request_id: the point of this workload.
        let body = assertion(&key, value, &format!("chaos-unkeyed-{process}"), None);
        write_once(&client, &base, Sent { process, node, key, value }, &body, &history, started).await;
    }
}

/// What one set client did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SetClientLog {
    pub concept_path: String,
    /// Values acknowledged (201).
    pub acknowledged: Vec<i64>,
    /// Values refused (4xx): must not appear.
    pub refused: Vec<i64>,
    /// Values whose outcome stayed unknown at the deadline: may appear, at most once.
    pub unknown: Vec<i64>,
}

/// Runs one set client until `deadline`: sequential writes, each retried with its request_id
/// until acknowledged or refused.
pub async fn set_client(
    process: u32,
    concept_path: String,
    targets: Targets,
    deadline: Instant,
    seed: u64,
    client: reqwest::Client,
) -> SetClientLog {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5e7 ^ (process as u64) << 20);
    let mut log = SetClientLog { concept_path: concept_path.clone(), ..Default::default() };
    let mut value = 0i64;
    while Instant::now() < deadline {
        value += 1;
        let body =
            assertion(&concept_path, value, &format!("chaos-set-{process}"), Some(&format!("set-{process}-{value}")));
        // Retries continue a little past the deadline so most writes end settled.
        let until = deadline + Duration::from_secs(10);
        match write_until_settled(&client, &body, until, || pick_target(&targets, &mut rng)).await {
            Outcome::Ok => log.acknowledged.push(value),
            Outcome::Fail => log.refused.push(value),
            Outcome::Indeterminate => log.unknown.push(value),
        }
    }
    log
}
