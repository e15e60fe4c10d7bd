//! The audit log of admin actions: every request that changes something through an admin
//! endpoint of 18180 or 18181 (quarantine decisions, breaker trips and resets, root
//! authorities, compaction, index rebuilds, backups, heap-profile sampling, membership changes,
//! replica moves, leader transfers, anti-entropy runs) and every grant or revocation of
//! authority, with who sent it (the token's name), from where, what it asked (its JSON body,
//! secrets redacted), and how it ended (its status), refused ones included.
//!
//! Each node records the actions it received, in its `meta` column family under `audit/` +
//! time + sequence (synced before the response leaves), keeps the newest [`KEEP`], logs each
//! one (`admin action`, with `audit = true`), and lists them newest first at
//! `GET /v1/admin/audit`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use axum::http::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{metrics, Caller};
use crate::storage::{ColumnFamily, Durability, Storage, StorageError, WriteBatch};

/// Entries a node keeps; older ones are deleted as new ones come.
pub const KEEP: usize = 10_000;

/// The status recorded for an action whose client went away before the answer (nginx's 499):
/// the action may still have happened.
pub const CANCELLED: u16 = 499;

/// The most of a request body an entry keeps; a larger body is noted by its size only.
pub const KEPT_BODY_BYTES: usize = 4 << 10;

/// Why a listing failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cursor {0:?} is not one this endpoint gave")]
    BadCursor(String),
    #[error("reading the audit log: {0}")]
    Storage(String),
}

impl AuditError {
    pub fn code(&self) -> crate::error::ErrorCode {
        match self {
            AuditError::BadCursor(_) => crate::error::ErrorCode::InvalidCursor,
            AuditError::Storage(_) => crate::error::ErrorCode::StorageError,
        }
    }
}

const PREFIX: &[u8] = b"audit/";
/// The first key past every audit key.
const PREFIX_END: &[u8] = b"audit0";

/// Where entries live: the node's storage, or (tests) memory.
enum Store {
    Disk(Arc<Storage>),
    Memory(parking_lot::Mutex<std::collections::BTreeMap<Vec<u8>, Vec<u8>>>),
}

pub struct AuditLog {
    store: Store,
    node: u64,
    keep: usize,
    sequence: AtomicU32,
    /// The keys held, oldest first (to delete the oldest past `keep`).
    keys: parking_lot::Mutex<VecDeque<Vec<u8>>>,
}

fn key(at_us: u64, sequence: u32) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(&at_us.to_be_bytes());
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// The cursor of an entry: its key past the prefix, in hex.
fn cursor_of(key: &[u8]) -> String {
    hex::encode(&key[PREFIX.len()..])
}

/// Replaces the values of fields whose names say they hold a secret.
fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (name, field) in map.iter_mut() {
                let lower = name.to_ascii_lowercase();
                if ["secret", "token", "password", "credential", "private"].iter().any(|s| lower.contains(s)) {
                    *field = json!("[redacted]");
                } else {
                    redact(field);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// One admin action as the log keeps it (`GET /v1/admin/audit`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// RFC 3339, UTC, milliseconds.
    #[schema(required = true)]
    pub at: Option<String>,
    pub at_us: u64,
    /// The node that received it.
    pub node: u64,
    /// The token's name, `admin_token`, or `anonymous`.
    pub caller: String,
    /// `read`, `write` or `admin`: the token's role.
    #[schema(required = true)]
    pub role: Option<String>,
    #[schema(required = true)]
    pub peer: Option<String>,
    pub method: String,
    /// The path with its query.
    pub path: String,
    /// The answer's HTTP status (499: the client went away mid-request).
    pub status: u16,
    /// `done`, `refused`, `failed` or `cancelled` (`unreadable` for a damaged entry).
    pub outcome: String,
    /// The request's body with secrets redacted, or its size when not kept.
    #[schema(required = true, value_type = Option<serde_json::Value>)]
    pub request: Option<Value>,
    /// This entry's position, for `cursor` of the next page (only in listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cursor: Option<String>,
}

impl AuditLog {
    /// The log of a node, on its storage: reads the keys it already holds (at most [`KEEP`]
    /// entries of at most [`KEPT_BODY_BYTES`] of body each).
    pub fn open(storage: Arc<Storage>, node: u64) -> Result<AuditLog, StorageError> {
        let mut keys = VecDeque::new();
        crate::storage::blocking(|| {
            storage.for_each_in_range(ColumnFamily::Meta, PREFIX, PREFIX_END, |k, _| {
                keys.push_back(k.to_vec());
                true
            })
        })?;
        Ok(AuditLog {
            store: Store::Disk(storage),
            node,
            keep: KEEP,
            sequence: AtomicU32::new(0),
            keys: parking_lot::Mutex::new(keys),
        })
    }

    /// A log in memory keeping `keep` entries (tests).
    pub fn in_memory(node: u64) -> AuditLog {
        AuditLog {
            store: Store::Memory(parking_lot::Mutex::new(Default::default())),
            node,
            keep: KEEP,
            sequence: AtomicU32::new(0),
            keys: parking_lot::Mutex::new(VecDeque::new()),
        }
    }

    /// Records one admin action and logs it. A failure to store it is logged and counted, never
    /// turned into the request's failure (the action has happened by then).
    pub async fn record(&self, caller: &Caller, method: &Method, path: &str, status: u16, body: Option<&[u8]>) {
        let at_us = crate::model::id::now_us();
        let outcome = match status {
            200..=299 => "done",
            CANCELLED => "cancelled",
            400..=499 => "refused",
            _ => "failed",
        };
        let request = body.filter(|b| !b.is_empty()).map(|bytes| match serde_json::from_slice::<Value>(bytes) {
            Ok(_) if bytes.len() > KEPT_BODY_BYTES => json!({"body_bytes": bytes.len()}),
            Ok(mut value) => {
                redact(&mut value);
                value
            }
            Err(_) => json!({"unparsed_bytes": bytes.len()}),
        });
        let entry = AuditEntry {
            at: chrono::DateTime::<chrono::Utc>::from_timestamp_micros(at_us as i64)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            at_us,
            node: self.node,
            caller: caller.name.clone(),
            role: caller.role.map(|r| r.as_str().to_string()),
            peer: caller.peer.map(|p: SocketAddr| p.ip().to_canonical().to_string()),
            method: method.as_str().to_string(),
            path: path.to_string(),
            status,
            outcome: outcome.to_string(),
            request,
            cursor: None,
        };
        tracing::info!(
            audit = true,
            caller = %caller.name,
            method = %method,
            path,
            status,
            outcome,
            "admin action"
        );
        let key = key(at_us, self.sequence.fetch_add(1, Ordering::Relaxed));
        let stored = match serde_json::to_vec(&entry) {
            Ok(bytes) => self.put(key, bytes).await,
            Err(error) => Err(error.to_string()),
        };
        match stored {
            Ok(()) => metrics::AUDIT_ENTRIES.with_label_values(&[outcome]).inc(),
            Err(error) => {
                metrics::AUDIT_ENTRIES.with_label_values(&["unrecorded"]).inc();
                tracing::error!(%error, path, "could not store an audit entry");
            }
        }
    }

    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        let evicted: Vec<Vec<u8>> = {
            let mut keys = self.keys.lock();
            keys.push_back(key.clone());
            let over = keys.len().saturating_sub(self.keep);
            keys.drain(..over).collect()
        };
        match &self.store {
            Store::Memory(map) => {
                let mut map = map.lock();
                map.insert(key, value);
                for old in evicted {
                    map.remove(&old);
                }
                Ok(())
            }
            Store::Disk(storage) => {
                let storage = storage.clone();
                let mut batch = WriteBatch::new();
                batch.put(ColumnFamily::Meta, key, value);
                for old in evicted {
                    batch.delete(ColumnFamily::Meta, old);
                }
                tokio::task::spawn_blocking(move || storage.write(batch, Durability::Synced))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Up to `limit` entries, newest first, older than `before` (a cursor this returned), and
    /// the cursor of the next page when there may be more.
    pub fn list(&self, limit: usize, before: Option<&str>) -> Result<(Vec<AuditEntry>, Option<String>), AuditError> {
        let upper = match before {
            None => PREFIX_END.to_vec(),
            Some(cursor) => {
                let bytes = hex::decode(cursor).map_err(|_| AuditError::BadCursor(cursor.to_string()))?;
                if bytes.len() != 12 {
                    return Err(AuditError::BadCursor(cursor.to_string()));
                }
                [PREFIX, bytes.as_slice()].concat()
            }
        };
        let rows: Vec<(Vec<u8>, Vec<u8>)> = match &self.store {
            Store::Memory(map) => map
                .lock()
                .range(PREFIX.to_vec()..upper)
                .rev()
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            Store::Disk(storage) => {
                crate::storage::blocking(|| storage.scan_reverse(ColumnFamily::Meta, PREFIX, &upper, limit))
                    .map_err(|e| AuditError::Storage(e.to_string()))?
            }
        };
        let next = (rows.len() == limit).then(|| rows.last().map(|(k, _)| cursor_of(k))).flatten();
        let entries = rows
            .into_iter()
            .map(|(k, v)| {
                let mut entry = serde_json::from_slice::<AuditEntry>(&v)
                    .unwrap_or_else(|_| AuditEntry { outcome: "unreadable".into(), ..AuditEntry::default() });
                entry.cursor = Some(cursor_of(&k));
                entry
            })
            .collect();
        Ok((entries, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values((entries, next): (Vec<AuditEntry>, Option<String>)) -> (Vec<Value>, Option<String>) {
        (entries.into_iter().map(|e| serde_json::to_value(e).expect("an entry")).collect(), next)
    }
    use crate::config::TokenRole;

    fn caller() -> Caller {
        Caller { name: "ops".into(), role: Some(TokenRole::Admin), agents: Vec::new(), peer: None }
    }

    #[tokio::test]
    async fn entries_list_newest_first_in_pages_with_secrets_redacted() {
        let log = AuditLog::in_memory(1);
        for i in 0..5 {
            let body =
                format!(r#"{{"agent_id": "a{i}", "s3_secret_access_key": "hidden", "nested": {{"token": "t"}}}}"#);
            log.record(&caller(), &Method::POST, "/v1/admin/circuit-breaker/trip", 200, Some(body.as_bytes())).await;
        }
        let (first, next) = log.list(3, None).map(values).expect("list");
        assert_eq!(first.len(), 3);
        assert_eq!(first[0]["request"]["agent_id"], json!("a4"), "newest first");
        assert_eq!(first[0]["request"]["s3_secret_access_key"], json!("[redacted]"));
        assert_eq!(first[0]["request"]["nested"]["token"], json!("[redacted]"));
        assert_eq!(first[0]["caller"], json!("ops"));
        let (rest, end) = log.list(3, next.as_deref()).map(values).expect("second page");
        assert_eq!(
            rest.iter().map(|e| e["request"]["agent_id"].clone()).collect::<Vec<_>>(),
            vec![json!("a1"), json!("a0")]
        );
        assert_eq!(end, None);
        assert!(log.list(3, Some("zz")).is_err(), "a cursor it did not give");
    }

    #[tokio::test]
    async fn only_the_newest_entries_are_kept() {
        let mut log = AuditLog::in_memory(1);
        log.keep = 3;
        for status in [200, 403, 500, 200, 201] {
            log.record(&caller(), &Method::DELETE, "/cluster/members/4", status, None).await;
        }
        let (entries, _) = log.list(10, None).map(values).expect("list");
        let statuses: Vec<_> = entries.iter().map(|e| e["status"].clone()).collect();
        assert_eq!(statuses, vec![json!(201), json!(200), json!(500)]);
        assert_eq!(entries[2]["outcome"], json!("failed"));
    }

    #[tokio::test]
    async fn entries_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), crate::storage::StorageOptions::default()).expect("open");
        let log = AuditLog::open(storage.clone(), 2).expect("audit");
        log.record(&caller(), &Method::POST, "/v1/admin/storage/compact", 202, None).await;
        drop(log);
        let log = AuditLog::open(storage, 2).expect("reopen");
        let (entries, _) = log.list(10, None).map(values).expect("list");
        assert_eq!(entries.len(), 1);
        assert_eq!(
            (entries[0]["node"].clone(), entries[0]["path"].clone()),
            (json!(2), json!("/v1/admin/storage/compact"))
        );
    }
}
