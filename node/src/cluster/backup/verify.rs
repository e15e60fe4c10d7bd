//! Reading backups back: listing them, and verifying one without restoring it. `verify`
//! re-reads every file, checks its SHA-256 and records, and recomputes each shard's digest
//! from the records to compare with the manifest; it names the shard and file of any damage.
//! It also re-reads every archived log segment after the backup (`archive`) and names a damaged
//! one, or a gap in the archived log (entries a restore could not replay).

use futures::stream::{self, StreamExt};
use serde::Serialize;

use super::chunk::{read_file, FileDamage, STATE_MACHINE};
use super::manifest::{file_path, manifest_path, valid_id, GroupBackup, Manifest};
use super::store::BackupStore;
use super::BackupError;
use crate::raft::types::group_of_shard;
use crate::shard::digest::{valid_bucket_count, DigestWalk};
use crate::shard::keys;

/// Files read at the same time by a verify or a restore.
pub const FILES_AT_ONCE: usize = 8;

/// Reads and checks the manifest of backup `id`.
pub async fn read_manifest(store: &BackupStore, id: &str) -> Result<Manifest, BackupError> {
    if !valid_id(id) {
        return Err(BackupError::NotFound(id.to_string()));
    }
    let path = manifest_path(id);
    let bytes = store.get(&path).await?.ok_or_else(|| BackupError::NotFound(id.to_string()))?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| BackupError::Damaged(format!("manifest {path}: {e}")))?;
    if manifest.id != id {
        return Err(BackupError::Damaged(format!("manifest {path} names backup {}", manifest.id)));
    }
    manifest.check().map_err(|e| BackupError::Damaged(format!("manifest {path}: {e}")))?;
    Ok(manifest)
}

/// One line of `backup list`.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub id: String,
    pub started_at: Option<String>,
    pub cluster_id: Option<String>,
    pub shards: Option<u16>,
    pub files: Option<usize>,
    pub bytes: Option<u64>,
    pub records: Option<u64>,
    /// Why the manifest could not be read, if it could not.
    pub error: Option<String>,
}

/// Every backup in the store (every manifest), oldest first.
pub async fn list(store: &BackupStore) -> Result<Vec<Listed>, BackupError> {
    let mut ids: Vec<String> = store
        .list("manifests")
        .await?
        .into_iter()
        .filter_map(|o| o.path.strip_prefix("manifests/")?.strip_suffix(".json").map(str::to_string))
        .collect();
    ids.sort();
    let mut listed = Vec::with_capacity(ids.len());
    for id in ids {
        listed.push(match read_manifest(store, &id).await {
            Ok(m) => Listed {
                id,
                started_at: Some(m.started_at.clone()),
                cluster_id: Some(m.cluster_id.clone()),
                shards: Some(m.shards),
                files: Some(m.files().count()),
                bytes: Some(m.bytes),
                records: Some(m.groups.iter().map(|g| g.records).sum()),
                error: None,
            },
            Err(error) => Listed {
                id,
                started_at: None,
                cluster_id: None,
                shards: None,
                files: None,
                bytes: None,
                records: None,
                error: Some(error.to_string()),
            },
        });
    }
    Ok(listed)
}

/// The newest backup whose manifest reads.
pub async fn latest(store: &BackupStore) -> Result<String, BackupError> {
    list(store)
        .await?
        .into_iter()
        .rev()
        .find(|l| l.error.is_none())
        .map(|l| l.id)
        .ok_or_else(|| BackupError::NotFound(format!("(none in {})", store.name)))
}

/// Damage found by a verify.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Damage {
    /// `shard N` or `meta`.
    pub group: String,
    /// The file's path in the store, or `null` for the shard as a whole (its digest).
    pub file: Option<String>,
    pub problem: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub id: String,
    pub ok: bool,
    pub groups: usize,
    pub files: usize,
    pub bytes: u64,
    pub records: u64,
    /// Archived log segments after the backup (`archive`), each re-read and checked.
    pub log_segments: usize,
    pub damage: Vec<Damage>,
}

/// Why a group could not be read back: damage in the backup, or a store that did not answer
/// (which says nothing about the backup).
#[derive(Debug)]
pub enum ReadFailure {
    Damaged(Damage),
    Store(BackupError),
}

impl From<Damage> for ReadFailure {
    fn from(damage: Damage) -> ReadFailure {
        ReadFailure::Damaged(damage)
    }
}

/// Reads every file of `group` (`FILES_AT_ONCE` at a time), checking each; feeds `visit` the
/// records of each file in the manifest's order.
pub async fn read_group(
    store: &BackupStore,
    group: &GroupBackup,
    mut visit: impl FnMut(u8, &[u8], &[u8]) -> Result<(), FileDamage>,
) -> Result<(), ReadFailure> {
    let prefix = keys::group_prefix(group_of_shard(group.shard));
    let damage = |file: &str, problem: String| Damage { group: group.label(), file: Some(file.to_string()), problem };
    let mut fetched = stream::iter(group.files.iter())
        .map(|f| async move { (f, store.get(&file_path(&f.sha256)).await) })
        .buffered(FILES_AT_ONCE);
    while let Some((file, bytes)) = fetched.next().await {
        let path = file_path(&file.sha256);
        let bytes = match bytes {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(damage(&path, "missing".into()).into()),
            Err(error) => return Err(ReadFailure::Store(error)),
        };
        let records = read_file(&bytes, &file.sha256, |family, key, value| {
            if !key.starts_with(&prefix) {
                return Err(FileDamage::Malformed("a record of another group"));
            }
            visit(family, key, value)
        })
        .map_err(|e| damage(&path, e.to_string()))?;
        if records != file.records {
            let problem = FileDamage::Records { expected: file.records, found: records }.to_string();
            return Err(damage(&path, problem).into());
        }
    }
    let listed: u64 = group.files.iter().map(|f| f.records).sum();
    if listed != group.records {
        let problem = format!("its files hold {listed} records, the manifest says {}", group.records);
        return Err(Damage { group: group.label(), file: None, problem }.into());
    }
    Ok(())
}

/// Checks one group: its files, then its digest against the manifest.
async fn verify_group(store: &BackupStore, group: &GroupBackup) -> Result<(), ReadFailure> {
    let mut walk = DigestWalk::new(group_of_shard(group.shard));
    read_group(store, group, |family, key, value| {
        if family == STATE_MACHINE {
            walk.record(key, value);
        }
        Ok(())
    })
    .await?;
    Ok(check_digest(group, &walk)?)
}

/// Whether the records walked hash to the manifest's digest (and to the digests they carry).
pub fn check_digest(group: &GroupBackup, walk: &DigestWalk) -> Result<(), Damage> {
    let whole = |problem: String| Damage { group: group.label(), file: None, problem };
    let count = group.digest_buckets as usize;
    if !valid_bucket_count(count) {
        return Err(whole(format!("the manifest's bucket count {count} is not valid")));
    }
    let root = hex::encode(walk.recomputed(count).tree().root());
    if root != group.digest_root {
        return Err(whole(format!("the records' digest is {root}, the manifest says {}", group.digest_root)));
    }
    match walk.stored() {
        None => Err(whole("the records carry no complete digests".into())),
        Some(stored) if stored != walk.recomputed(stored.count()) => {
            Err(whole("the records do not match the digests they carry".into()))
        }
        Some(_) => Ok(()),
    }
}

/// Verifies backup `id` (the newest when `None`) without restoring it.
pub async fn verify(store: &BackupStore, id: Option<&str>) -> Result<VerifyReport, BackupError> {
    let id = match id {
        Some(id) => id.to_string(),
        None => latest(store).await?,
    };
    let manifest = read_manifest(store, &id).await?;
    let results: Vec<Result<(), ReadFailure>> =
        stream::iter(manifest.groups.iter()).map(|g| verify_group(store, g)).buffered(4).collect().await;
    let mut damage = Vec::new();
    for result in results {
        match result {
            Ok(()) => {}
            Err(ReadFailure::Damaged(found)) => damage.push(found),
            // The store did not answer: nothing is known about the backup.
            Err(ReadFailure::Store(error)) => return Err(error),
        }
    }
    let mut log_segments = 0;
    for group in &manifest.groups {
        let segments = super::archive::list_segments(store, &manifest.cluster_id, group.shard).await?;
        let mut next = group.applied_index + 1;
        for (first, last, path) in segments.into_iter().filter(|(_, last, _)| *last > group.applied_index) {
            if first > next {
                damage.push(Damage {
                    group: group.label(),
                    file: None,
                    problem: format!(
                        "the archived log misses entries {next}-{} after the backup: a restore replays only through {}",
                        first - 1,
                        next - 1
                    ),
                });
            }
            next = next.max(last + 1);
            log_segments += 1;
            let bytes = store.get(&path).await?.unwrap_or_default();
            if let Err(problem) = super::archive::decode_entries(&bytes, (group.shard, first, last)) {
                damage.push(Damage { group: group.label(), file: Some(path), problem });
            }
        }
    }
    Ok(VerifyReport {
        log_segments,
        id,
        ok: damage.is_empty(),
        groups: manifest.groups.len(),
        files: manifest.files().count(),
        bytes: manifest.bytes,
        records: manifest.groups.iter().map(|g| g.records).sum(),
        damage,
    })
}
