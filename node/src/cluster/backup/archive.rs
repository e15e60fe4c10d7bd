//! Continuous Raft log archival (`backup.archive_enabled`, docs/backup.md): the leader of every
//! group this node leads ships the entries its group committed since the last segment to the
//! backup store, every `backup.archive_interval_ms`, as **segments**:
//! `archive/<cluster id>/<shard>/<first index>-<last index>.seg` (the meta group is shard
//! 65535). A restore replays them after a backup's copy, up to `--as-of` (`restore`).
//!
//! - A segment holds whole entries in their stored binary form (`raft::wire`), at most
//!   [`SEGMENT_MAX_BYTES`] of them, with a header naming its group and range and the SHA-256 of
//!   its body; `verify` checks every segment.
//! - Only committed entries are shipped (through the leader's applied index), so two leaders
//!   that ship the same range ship the same bytes, and segments that overlap agree.
//! - No replica purges a log entry before it is archived: openraft purges only when the
//!   archiver asks (`raft.max_in_snapshot_log_to_keep` is unbounded with archival), through
//!   what is archived and snapshotted less `raft.logs_to_keep_after_snapshot`, so openraft's
//!   idea of the log is what is kept, and a lagging follower is sent entries rather than a
//!   snapshot; and the log store refuses to purge past the archive anyway
//!   (`LogStore::keep_unarchived`). A leader knows what it shipped; a follower learns the
//!   archive's end by listing it every [`FOLLOWER_RELIST`] (so a new leader finds its log
//!   still holds what was not shipped yet).
//! - A leader whose log no longer holds the next entry (a snapshot was installed on it before
//!   it led) ships from its first entry and counts a gap
//!   (`stemedb_backup_archive_gaps_total`); a restore stops replaying at a gap.
//! - The archive is namespaced by cluster id: a cluster restored from a backup archives beside
//!   the old cluster's log, never over it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::store::BackupStore;
use super::BackupError;
use crate::config::BackupSection;
use crate::raft::ShardSet;

/// Stored bytes of entries one segment holds (beyond its first entry).
pub const SEGMENT_MAX_BYTES: usize = 4 << 20;
/// Segments one group's leader ships per tick (a backlog is shipped over several ticks).
const SEGMENTS_PER_TICK: usize = 8;
/// How often a follower lists the archive to learn how far its group's log may be purged.
pub const FOLLOWER_RELIST: Duration = Duration::from_secs(10);
/// Longest a listing or an upload may take: one that hangs must not stop every other group.
const STORE_TIMEOUT: Duration = Duration::from_secs(30);

/// `call` within [`STORE_TIMEOUT`], a store failure otherwise.
async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, BackupError>>,
) -> Result<T, BackupError> {
    match tokio::time::timeout(STORE_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(BackupError::Store(format!("{what}: no answer within {}s", STORE_TIMEOUT.as_secs()))),
    }
}

const MAGIC: &[u8; 6] = b"STMLOG";
const VERSION: u8 = 1;
const FLAG_LZ4: u8 = 1;
/// magic, version, flags, shard (u16), first (u64), last (u64), count (u32), raw body length
/// (u32), SHA-256 of the header before it and the stored body.
const HEADER_BYTES: usize = 6 + 1 + 1 + 2 + 8 + 8 + 4 + 4 + 32;

/// The directory of `shard`'s segments in the archive of `cluster_id`.
pub fn segment_dir(cluster_id: &str, shard: u16) -> String {
    format!("archive/{cluster_id}/{shard:05}")
}

pub fn segment_path(cluster_id: &str, shard: u16, first: u64, last: u64) -> String {
    format!("{}/{first:020}-{last:020}.seg", segment_dir(cluster_id, shard))
}

/// (first, last) of a segment's path, `None` for anything else.
pub fn segment_range(path: &str) -> Option<(u64, u64)> {
    let name = path.rsplit('/').next()?.strip_suffix(".seg")?;
    let (first, last) = name.split_once('-')?;
    let (first, last) = (first.parse().ok()?, last.parse().ok()?);
    (first <= last).then_some((first, last))
}

/// A decoded segment: its entries (index, stored bytes), in index order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub shard: u16,
    pub first: u64,
    pub last: u64,
    pub entries: Vec<(u64, Vec<u8>)>,
}

/// Encodes `entries` (in index order, at least one) of `shard` as a segment.
pub fn encode_segment(shard: u16, entries: &[(u64, Vec<u8>)], compress: bool) -> Vec<u8> {
    let mut raw = Vec::with_capacity(entries.iter().map(|(_, e)| e.len() + 12).sum());
    for (index, bytes) in entries {
        raw.extend_from_slice(&index.to_be_bytes());
        raw.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        raw.extend_from_slice(bytes);
    }
    let body = if compress { lz4_flex::block::compress(&raw) } else { raw.clone() };
    let first = entries.first().map(|(i, _)| *i).unwrap_or(0);
    let last = entries.last().map(|(i, _)| *i).unwrap_or(0);
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(if compress { FLAG_LZ4 } else { 0 });
    out.extend_from_slice(&shard.to_be_bytes());
    out.extend_from_slice(&first.to_be_bytes());
    out.extend_from_slice(&last.to_be_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    let checksum = Sha256::new().chain_update(&out).chain_update(&body).finalize();
    out.extend_from_slice(&checksum);
    out.extend_from_slice(&body);
    out
}

/// Decodes and checks a segment stored at a path naming `expected` (shard, first, last): the
/// checksum, the header against the name, and the entries (strictly increasing, within the
/// range, as many as the header says). The error says what is wrong.
pub fn decode_segment(bytes: &[u8], expected: (u16, u64, u64)) -> Result<Segment, String> {
    let header = bytes.get(..HEADER_BYTES).ok_or("shorter than a segment header")?;
    if &header[..6] != MAGIC {
        return Err("not a log segment (bad magic)".into());
    }
    if header[6] != VERSION {
        return Err(format!("segment format {} (this version reads {VERSION})", header[6]));
    }
    let u64_at = |at: usize| header.get(at..at + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes);
    let u32_at = |at: usize| header.get(at..at + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_be_bytes);
    let shard = u16::from_be_bytes([header[8], header[9]]);
    let (first, last) = (u64_at(10).unwrap_or(0), u64_at(18).unwrap_or(0));
    let (count, raw_len) = (u32_at(26).unwrap_or(0) as usize, u32_at(30).unwrap_or(0) as usize);
    let body = &bytes[HEADER_BYTES..];
    let checksum = Sha256::new().chain_update(&header[..34]).chain_update(body).finalize();
    if checksum.as_slice() != &header[34..66] {
        return Err("checksum mismatch: the segment's body was changed or cut".into());
    }
    if (shard, first, last) != expected {
        return Err(format!(
            "header says shard {shard} entries {first}-{last}, its name says shard {} entries {}-{}",
            expected.0, expected.1, expected.2
        ));
    }
    // LZ4 expands at most about 255 times: a header claiming more is not believed (nor is a
    // count of entries the body cannot hold), so a crafted segment cannot make us allocate.
    if raw_len > body.len().saturating_mul(255).saturating_add(64) {
        return Err(format!("claims {raw_len} bytes uncompressed from a {}-byte body", body.len()));
    }
    let raw = if header[7] & FLAG_LZ4 != 0 {
        lz4_flex::block::decompress(body, raw_len).map_err(|e| format!("decompressing: {e}"))?
    } else {
        body.to_vec()
    };
    let mut entries = Vec::with_capacity(count.min(raw.len() / 12));
    let mut at = 0usize;
    while at < raw.len() {
        let index = raw.get(at..at + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes);
        let len = raw.get(at + 8..at + 12).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_be_bytes);
        let (Some(index), Some(len)) = (index, len) else { return Err("an entry's header is cut".into()) };
        let bytes = raw.get(at + 12..at + 12 + len as usize).ok_or("an entry is cut")?;
        if entries.last().is_some_and(|(previous, _)| *previous >= index) || index < first || index > last {
            return Err(format!("entry {index} is out of order or outside {first}-{last}"));
        }
        entries.push((index, bytes.to_vec()));
        at += 12 + len as usize;
    }
    if entries.len() != count
        || entries.first().map(|e| e.0) != Some(first)
        || entries.last().map(|e| e.0) != Some(last)
    {
        return Err(format!("holds {} entries, its header says {count} from {first} to {last}", entries.len()));
    }
    Ok(Segment { shard, first, last, entries })
}

/// A stored segment (see [`decode_segment`]) with each entry decoded: (index, entry, when it
/// was proposed if it is a client command). The error says what is wrong.
pub fn decode_entries(
    bytes: &[u8],
    expected: (u16, u64, u64),
) -> Result<Vec<(u64, crate::raft::types::Entry, Option<u64>)>, String> {
    decode_segment(bytes, expected)?
        .entries
        .into_iter()
        .map(|(index, stored)| {
            let (entry, at) =
                crate::raft::restore::decode_stored(&stored).map_err(|e| format!("entry {index}: {e}"))?;
            Ok((index, entry, at))
        })
        .collect()
}

/// The segments of `shard` in the archive of `cluster_id`: (first, last, path), by first index.
pub async fn list_segments(
    store: &BackupStore,
    cluster_id: &str,
    shard: u16,
) -> Result<Vec<(u64, u64, String)>, BackupError> {
    let mut segments: Vec<(u64, u64, String)> = store
        .list(&segment_dir(cluster_id, shard))
        .await?
        .into_iter()
        .filter_map(|listed| segment_range(&listed.path).map(|(first, last)| (first, last, listed.path)))
        .collect();
    segments.sort();
    Ok(segments)
}

/// What this node knows of one group's archive.
#[derive(Default, Clone)]
struct GroupArchive {
    /// The last index known to be archived; `None`: list the archive first.
    archived: Option<u64>,
    /// Whether this node led the group at the last tick.
    leading: bool,
    listed_at: Option<Instant>,
    /// When the archive last held everything the group applied (leader side).
    caught_up_at: Option<Instant>,
}

/// The archiver of one node. See the module doc.
pub struct Archiver {
    shards: Arc<ShardSet>,
    store: BackupStore,
    cluster_id: String,
    interval: Duration,
    compress: bool,
    /// `raft.logs_to_keep_after_snapshot`: entries kept behind the snapshot after a purge.
    logs_to_keep: u64,
    /// One entry per group this node hosts (bounded by the shard count).
    groups: Mutex<HashMap<u16, GroupArchive>>,
}

impl Archiver {
    /// The archiver of this node when `backup.archive_enabled`, started as a node task.
    pub fn start(
        shards: Arc<ShardSet>,
        settings: &BackupSection,
        logs_to_keep: u64,
        cluster_id: String,
    ) -> Result<Option<Arc<Archiver>>, BackupError> {
        if !settings.archive_enabled {
            return Ok(None);
        }
        let store = crate::storage::blocking(|| BackupStore::open(&settings.destination, settings, true))?;
        let archiver = Arc::new(Archiver {
            shards: shards.clone(),
            store,
            cluster_id,
            interval: Duration::from_millis(settings.archive_interval_ms),
            compress: settings.compression_enabled,
            logs_to_keep,
            groups: Mutex::new(HashMap::new()),
        });
        let running = archiver.clone();
        shards.tasks.spawn_until_stopped(async move {
            let mut ticks = tokio::time::interval(running.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                running.tick().await;
            }
        });
        tracing::info!(destination = %settings.destination, interval_ms = settings.archive_interval_ms, "raft log archival on");
        Ok(Some(archiver))
    }

    /// One round over every group this node hosts.
    async fn tick(&self) {
        let (mut lag_entries, mut lag_seconds) = (0u64, 0f64);
        for group in self.shards.all_groups() {
            let shard = group.shard;
            let (leading, applied, snapshot, purged) = {
                let metrics = group.raft.metrics();
                let metrics = metrics.borrow();
                (
                    metrics.current_leader == Some(self.shards.node_id),
                    metrics.last_applied.map(|l| l.index).unwrap_or(0),
                    metrics.snapshot.map(|l| l.index),
                    metrics.purged.map(|l| l.index),
                )
            };
            let mut state = self.groups.lock().get(&shard).cloned().unwrap_or_default();
            if leading != state.leading {
                // A new leader learns what its predecessor shipped.
                state = GroupArchive { leading, caught_up_at: Some(Instant::now()), ..GroupArchive::default() };
            }
            let relist = state.archived.is_none()
                || (!leading && state.listed_at.is_none_or(|t| t.elapsed() >= FOLLOWER_RELIST));
            if relist {
                match bounded("listing the archive", list_segments(&self.store, &self.cluster_id, shard)).await {
                    Ok(segments) => {
                        state.archived = Some(segments.iter().map(|(_, last, _)| *last).max().unwrap_or(0));
                        state.listed_at = Some(Instant::now());
                    }
                    Err(error) => {
                        super::metrics::ARCHIVE_SEGMENTS.with_label_values(&["failed"]).inc();
                        tracing::warn!(shard, error = %error, "listing the log archive failed");
                        self.groups.lock().insert(shard, state);
                        continue;
                    }
                }
            }
            let mut archived = state.archived.unwrap_or(0);
            if leading {
                archived = self.ship(&group, archived, applied).await;
                if archived >= applied {
                    state.caught_up_at = Some(Instant::now());
                }
                lag_entries += applied.saturating_sub(archived);
                // The age of the oldest entry not archived yet, from its proposal time when it
                // is a client command (true after a leader change too), else since the archive
                // last caught up here.
                let oldest = match archived < applied {
                    true => {
                        let log = group.log().clone();
                        tokio::task::spawn_blocking(move || log.proposed_at_us(archived + 1))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .flatten()
                    }
                    false => None,
                };
                let behind = match oldest {
                    Some(at) => crate::model::id::now_us().saturating_sub(at) as f64 / 1e6,
                    None => state.caught_up_at.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0),
                };
                lag_seconds = lag_seconds.max(if archived >= applied { 0.0 } else { behind });
            }
            state.archived = Some(archived);
            group.log().archived_through(archived);
            self.groups.lock().insert(shard, state);
            // What is archived and in the snapshot, less the entries kept behind it.
            let upto = snapshot.map(|s| s.saturating_sub(self.logs_to_keep).min(archived)).unwrap_or(0);
            if upto > purged.unwrap_or(0) {
                if let Err(error) = group.raft.trigger().purge_log(upto).await {
                    tracing::warn!(shard, error = %error, "asking for a log purge failed");
                }
            }
        }
        super::metrics::ARCHIVE_LAG_ENTRIES.set(lag_entries as f64);
        super::metrics::ARCHIVE_LAG_SECONDS.set(lag_seconds);
    }

    /// Ships `group`'s entries after `archived` through `applied`; returns the new archived index.
    async fn ship(&self, group: &crate::raft::ShardGroup, mut archived: u64, applied: u64) -> u64 {
        let shard = group.shard;
        for _ in 0..SEGMENTS_PER_TICK {
            if archived >= applied {
                break;
            }
            let (log, compress, from) = (group.log().clone(), self.compress, archived + 1);
            let read = tokio::task::spawn_blocking(move || {
                let entries = log.stored_entries(from, applied, SEGMENT_MAX_BYTES)?;
                let encoded = (!entries.is_empty()).then(|| encode_segment(shard, &entries, compress));
                Ok::<_, crate::storage::StorageError>(encoded.map(|bytes| {
                    (entries.first().map(|e| e.0).unwrap_or(0), entries.last().map(|e| e.0).unwrap_or(0), bytes)
                }))
            })
            .await;
            let (first, last, bytes) = match read {
                Ok(Ok(Some(segment))) => segment,
                Ok(Ok(None)) => break,
                Ok(Err(error)) => {
                    tracing::warn!(shard, error = %error, "reading the log to archive failed");
                    break;
                }
                Err(error) => {
                    tracing::warn!(shard, error = %error, "the archive read stopped");
                    break;
                }
            };
            if first != from && archived > 0 {
                super::metrics::ARCHIVE_GAPS.inc();
                tracing::warn!(shard, missing_from = from, resumes_at = first, "the log no longer holds entries not archived yet (a snapshot was installed before this node led): the archive has a gap, a restore stops before it");
            }
            let size = bytes.len() as u64;
            let path = segment_path(&self.cluster_id, shard, first, last);
            match bounded("shipping a segment", self.store.put(&path, bytes)).await {
                Ok(()) => {
                    super::metrics::ARCHIVE_SEGMENTS.with_label_values(&["uploaded"]).inc();
                    super::metrics::ARCHIVE_BYTES.inc_by(size);
                    archived = last;
                }
                Err(error) => {
                    super::metrics::ARCHIVE_SEGMENTS.with_label_values(&["failed"]).inc();
                    tracing::warn!(shard, error = %error, "shipping a log segment failed; retried next tick");
                    break;
                }
            }
        }
        archived
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
        range.map(|i| (i, format!("entry {i}").repeat(i as usize % 7 + 1).into_bytes())).collect()
    }

    #[test]
    fn segments_round_trip_and_name_their_range() {
        for compress in [false, true] {
            let written = entries(5..=40);
            let bytes = encode_segment(3, &written, compress);
            let segment = decode_segment(&bytes, (3, 5, 40)).expect("decodes");
            assert_eq!(segment, Segment { shard: 3, first: 5, last: 40, entries: written.clone() });
            assert!(decode_segment(&bytes, (3, 5, 41)).expect_err("wrong name").contains("its name says"));
            assert!(decode_segment(&bytes, (4, 5, 40)).is_err());
        }
        let path = segment_path("c-1", 65535, 7, 12);
        assert_eq!(path, "archive/c-1/65535/00000000000000000007-00000000000000000012.seg");
        assert_eq!(segment_range(&path), Some((7, 12)));
        assert_eq!(segment_range("archive/c-1/00001/x.seg"), None);
        assert_eq!(segment_range("archive/c-1/00001/9-3.seg"), None);
    }

    #[test]
    fn any_flipped_byte_or_cut_is_caught() {
        let bytes = encode_segment(1, &entries(1..=20), true);
        for at in (0..bytes.len()).step_by(7) {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(decode_segment(&damaged, (1, 1, 20)).is_err(), "flipped byte {at} not caught");
        }
        for len in [0, 10, HEADER_BYTES, bytes.len() - 1] {
            assert!(decode_segment(&bytes[..len], (1, 1, 20)).is_err(), "cut at {len} not caught");
        }
    }
}
