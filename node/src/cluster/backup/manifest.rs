//! The manifest of a backup: what it holds, and the commit point. It is written last, under
//! `manifests/<id>.json`, once every file it names is stored; a backup without a manifest
//! does not exist (its files are shared or collected later).

use serde::{Deserialize, Serialize};

use crate::meta::META_SHARD;

pub const FORMAT: u32 = 1;

/// Where the files of a backup store live, under its prefix.
pub fn file_path(sha256: &str) -> String {
    let fan = sha256.get(..2).unwrap_or("00");
    format!("files/{fan}/{sha256}")
}

pub fn manifest_path(id: &str) -> String {
    format!("manifests/{id}.json")
}

/// Written when a backup starts and removed when it ends: peers check they see the same store,
/// and pruning leaves files alone while a backup is pending.
pub fn pending_path(id: &str) -> String {
    format!("pending/{id}")
}

/// A new backup id: its UTC start time (so ids sort by age) and a random suffix.
pub fn new_id(now_us: u64) -> String {
    let at = chrono::DateTime::from_timestamp_micros(now_us as i64).unwrap_or_default();
    format!("{}-{:04x}", at.format("%Y%m%dT%H%M%SZ"), rand::random::<u16>())
}

/// Whether `id` is a backup id (so it can be part of a path).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// SHA-256 of the stored bytes, hex: the file's name.
    pub sha256: String,
    /// Stored size.
    pub bytes: u64,
    pub records: u64,
}

/// One shard's copy (or the meta group's, `shard` 65535).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupBackup {
    pub shard: u16,
    /// The node whose replica was copied.
    pub node: u64,
    pub applied_index: u64,
    pub applied_term: u64,
    /// The group's voters when it was copied (the restored cluster gets its own).
    pub voters: Vec<u64>,
    /// Root of the Merkle tree over the replica's bucket digests, recomputed from the records
    /// copied (and equal to the digests the replica kept), hex.
    pub digest_root: String,
    pub digest_buckets: u32,
    pub records: u64,
    /// Bytes of the records before compression.
    pub raw_bytes: u64,
    pub files: Vec<FileRef>,
}

impl GroupBackup {
    pub fn is_meta(&self) -> bool {
        self.shard == META_SHARD
    }

    pub fn label(&self) -> String {
        if self.is_meta() {
            "meta".into()
        } else {
            format!("shard {}", self.shard)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub cluster_id: String,
    pub shards: u16,
    /// The node that coordinated the backup.
    pub coordinator: u64,
    pub started_at: String,
    pub started_at_us: u64,
    pub finished_at_us: u64,
    /// Every data shard, then the meta group.
    pub groups: Vec<GroupBackup>,
    /// Bytes of every file the backup uses, and of those this backup uploaded.
    pub bytes: u64,
    pub uploaded_bytes: u64,
    pub compression: bool,
}

impl Manifest {
    /// Every file the backup uses (a file shared by groups appears once per group).
    pub fn files(&self) -> impl Iterator<Item = (&GroupBackup, &FileRef)> {
        self.groups.iter().flat_map(|g| g.files.iter().map(move |f| (g, f)))
    }

    /// Checks that the manifest describes a whole backup of `shards` shards plus the meta group.
    pub fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("manifest format {} (this version reads {FORMAT})", self.format));
        }
        let mut expected: Vec<u16> = (0..self.shards).collect();
        expected.push(META_SHARD);
        let found: Vec<u16> = self.groups.iter().map(|g| g.shard).collect();
        if found != expected {
            return Err(format!(
                "manifest lists groups {found:?}, expected shards 0..{} and the meta group",
                self.shards
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_are_path_safe() {
        let a = new_id(1_700_000_000_000_000);
        let b = new_id(1_700_000_001_000_000);
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with("20231114T221320Z-"), "{a}");
        assert!(valid_id(&a) && valid_id(&b));
        assert!(!valid_id("../etc") && !valid_id("") && !valid_id("a/b"));
        assert_eq!(file_path("abcdef"), "files/ab/abcdef");
    }
}
