//! The client workloads. Clients talk to any running node, as behind a load balancer.
//!
//! * **Registers**: clients write unique integers to a few (concept_path, predicate) keys and
//!   read them back with the recency lens at `linearizable` consistency; every operation's
//!   invoke and complete times go into the history.
//! * **Set**: each client appends unique values to its own concept_path with a `request_id`,
//!   retrying an indeterminate write with the same `request_id` until it is acknowledged or
//!   refused. At the end, every acknowledged value must be there exactly once.

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

/// Runs one register client until `deadline`.
#[allow(clippy::too_many_arguments)]
pub async fn register_client(
    process: u32,
    keys: Arc<Vec<String>>,
    targets: Targets,
    history: Arc<History>,
    started: Instant,
    deadline: Instant,
    seed: u64,
    client: reqwest::Client,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (process as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut counter = 0i64;
    let now_us = || started.elapsed().as_micros() as u64;
    while Instant::now() < deadline {
        let Some((node, base)) = pick_target(&targets, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let key = keys[rng.random_range(0..keys.len())].clone();
        let id = history.next_id();
        if rng.random_bool(0.5) {
            counter += 1;
            let value = process as i64 * 1_000_000_000 + counter;
            let body = json!({
                "concept_path": key,
                "predicate": PREDICATE,
                "value": value,
                "agent_id": format!("chaos-{process}"),
                "request_id": format!("reg-{process}-{counter}"),
            });
            let invoke_us = now_us();
            let answer = post(&client, &format!("{base}/v1/assert"), &body).await;
            let (outcome, complete_us, error) = match answer {
                Answer::Ok(_) => (Outcome::Ok, Some(now_us()), None),
                Answer::Refused(e) => (Outcome::Fail, Some(now_us()), Some(e)),
                Answer::Unknown(e) => (Outcome::Indeterminate, None, Some(e)),
            };
            history.record(Op {
                id,
                process,
                key,
                kind: OpKind::Write,
                value: Some(value),
                invoke_us,
                complete_us,
                outcome,
                node,
                error,
            });
        } else {
            let body =
                json!({"concept_path": key, "predicate": PREDICATE, "lens": "recency", "consistency": "linearizable"});
            let invoke_us = now_us();
            let answer = post(&client, &format!("{base}/v1/query"), &body).await;
            let complete_us = Some(now_us());
            let (outcome, value, error) = match answer {
                Answer::Ok(body) => {
                    let value =
                        body["results"].as_array().and_then(|r| r.first()).map(|r| r["winner"]["value"].clone());
                    match value {
                        None | Some(Value::Null) => (Outcome::Ok, None, None),
                        Some(Value::Number(n)) if n.as_i64().is_some() => (Outcome::Ok, n.as_i64(), None),
                        Some(other) => (Outcome::Ok, None, Some(format!("unexpected value {other}"))),
                    }
                }
                Answer::Refused(e) | Answer::Unknown(e) => (Outcome::Fail, None, Some(e)),
            };
            history.record(Op {
                id,
                process,
                key,
                kind: OpKind::Read,
                value,
                invoke_us,
                complete_us,
                outcome,
                node,
                error,
            });
        }
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
        let body = json!({
            "concept_path": concept_path,
            "predicate": PREDICATE,
            "value": value,
            "agent_id": format!("chaos-set-{process}"),
            "request_id": format!("set-{process}-{value}"),
        });
        let mut settled = false;
        // Retries continue a little past the deadline so most writes end settled.
        while Instant::now() < deadline + Duration::from_secs(10) {
            let Some((_, base)) = pick_target(&targets, &mut rng) else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match post(&client, &format!("{base}/v1/assert"), &body).await {
                Answer::Ok(_) => {
                    log.acknowledged.push(value);
                    settled = true;
                    break;
                }
                Answer::Refused(_) => {
                    log.refused.push(value);
                    settled = true;
                    break;
                }
                Answer::Unknown(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        if !settled {
            log.unknown.push(value);
        }
    }
    log
}
