//! Backup files: a shard replica's records cut into files at boundaries the keys choose.
//!
//! A file holds consecutive records of one family of one group, in key order. A record ends a
//! file when a hash of its key has its low [`BOUNDARY_BITS`] bits clear (or the file reached
//! [`MAX_RAW_BYTES`]), so boundaries depend on the keys alone, not on where the walk started:
//! a write changes the file its key falls in and leaves the others byte for byte the same.
//! Files are named by the SHA-256 of their bytes, so the next backup finds them already stored
//! and uploads only the files that changed, and a restore never replays a chain of increments.
//!
//! Layout (big-endian integers):
//!
//! ```text
//! magic "STMBKF01" | flags u8 (bit 0: LZ4) | raw_len u64 | body
//! body: raw, or raw compressed with LZ4 (block format)
//! raw:  { family u8 (0 state_machine, 1 index) | key_len u32 | key | value_len u32 | value }*
//! ```

use sha2::{Digest as _, Sha256};

const MAGIC: &[u8; 8] = b"STMBKF01";
const FLAG_LZ4: u8 = 1;
const HEADER_BYTES: usize = 8 + 1 + 8;
/// A key whose hash has this many low bits clear ends a file: about one record in 2048.
pub const BOUNDARY_BITS: u32 = 11;
/// A file is cut at this size of raw records whatever its keys.
pub const MAX_RAW_BYTES: usize = 8 << 20;
/// Keys and values are bounded like snapshot records: longer length fields mean damage.
const MAX_KEY_BYTES: usize = 64 << 10;
const MAX_VALUE_BYTES: usize = 256 << 20;

/// The family tags of records (the same as shard snapshots').
pub const STATE_MACHINE: u8 = 0;
pub const INDEX: u8 = 1;

/// A finished file: its bytes as stored and what they hold.
#[derive(Debug, Clone)]
pub struct SealedFile {
    pub bytes: Vec<u8>,
    pub sha256: String,
    pub records: u64,
    pub raw_bytes: u64,
}

/// Collects records into files.
pub struct FileBuilder {
    raw: Vec<u8>,
    records: u64,
    compress: bool,
}

fn ends_file(key: &[u8]) -> bool {
    crate::model::id::fnv1a64(key).trailing_zeros() >= BOUNDARY_BITS
}

impl FileBuilder {
    pub fn new(compress: bool) -> FileBuilder {
        FileBuilder { raw: Vec::new(), records: 0, compress }
    }

    /// Adds a record; returns the finished file when this record ends one.
    pub fn push(&mut self, family: u8, key: &[u8], value: &[u8]) -> Option<SealedFile> {
        self.raw.push(family);
        self.raw.extend_from_slice(&(key.len() as u32).to_be_bytes());
        self.raw.extend_from_slice(key);
        self.raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
        self.raw.extend_from_slice(value);
        self.records += 1;
        (ends_file(key) || self.raw.len() >= MAX_RAW_BYTES).then(|| self.seal()).flatten()
    }

    /// Finishes the file being built, if it holds any record.
    pub fn seal(&mut self) -> Option<SealedFile> {
        if self.records == 0 {
            return None;
        }
        let raw = std::mem::take(&mut self.raw);
        let records = std::mem::take(&mut self.records);
        let mut bytes = Vec::with_capacity(HEADER_BYTES + raw.len() / 2);
        bytes.extend_from_slice(MAGIC);
        bytes.push(if self.compress { FLAG_LZ4 } else { 0 });
        bytes.extend_from_slice(&(raw.len() as u64).to_be_bytes());
        if self.compress {
            bytes.extend_from_slice(&lz4_flex::block::compress(&raw));
        } else {
            bytes.extend_from_slice(&raw);
        }
        Some(SealedFile { sha256: sha256_hex(&bytes), records, raw_bytes: raw.len() as u64, bytes })
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Why a stored file could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileDamage {
    #[error("its SHA-256 is {found}, not the {expected} it is stored under")]
    Checksum { expected: String, found: String },
    #[error("it is not a backup file ({0})")]
    Malformed(&'static str),
    #[error("it holds {found} records, the manifest says {expected}")]
    Records { expected: u64, found: u64 },
}

/// Checks `bytes` against the SHA-256 they are stored under, then calls `visit` on each record.
pub fn read_file(
    bytes: &[u8],
    sha256: &str,
    mut visit: impl FnMut(u8, &[u8], &[u8]) -> Result<(), FileDamage>,
) -> Result<u64, FileDamage> {
    let found = sha256_hex(bytes);
    if found != sha256 {
        return Err(FileDamage::Checksum { expected: sha256.to_string(), found });
    }
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        return Err(FileDamage::Malformed("no header"));
    }
    let flags = bytes[8];
    let raw_len = u64::from_be_bytes(bytes[9..17].try_into().map_err(|_| FileDamage::Malformed("header"))?);
    if raw_len > (MAX_RAW_BYTES + MAX_KEY_BYTES + MAX_VALUE_BYTES) as u64 {
        return Err(FileDamage::Malformed("raw length out of bounds"));
    }
    let body = &bytes[HEADER_BYTES..];
    let decompressed;
    let raw: &[u8] = match flags {
        0 => body,
        FLAG_LZ4 => {
            decompressed = lz4_flex::block::decompress(body, raw_len as usize)
                .map_err(|_| FileDamage::Malformed("LZ4 body does not decompress"))?;
            &decompressed
        }
        _ => return Err(FileDamage::Malformed("unknown flags")),
    };
    if raw.len() as u64 != raw_len {
        return Err(FileDamage::Malformed("raw length differs from the header"));
    }
    let mut at = 0usize;
    let mut records = 0u64;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], FileDamage> {
        let end = at.checked_add(n).filter(|end| *end <= raw.len()).ok_or(FileDamage::Malformed("truncated record"))?;
        let slice = &raw[*at..end];
        *at = end;
        Ok(slice)
    };
    while at < raw.len() {
        let family = take(&mut at, 1)?[0];
        if family > INDEX {
            return Err(FileDamage::Malformed("unknown family"));
        }
        let key_len = u32::from_be_bytes(take(&mut at, 4)?.try_into().map_err(|_| FileDamage::Malformed("key"))?);
        if key_len as usize > MAX_KEY_BYTES {
            return Err(FileDamage::Malformed("key length out of bounds"));
        }
        let key = take(&mut at, key_len as usize)?;
        let value_len = u32::from_be_bytes(take(&mut at, 4)?.try_into().map_err(|_| FileDamage::Malformed("value"))?);
        if value_len as usize > MAX_VALUE_BYTES {
            return Err(FileDamage::Malformed("value length out of bounds"));
        }
        let value = take(&mut at, value_len as usize)?;
        visit(family, key, value)?;
        records += 1;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn files_of(records: &[(Vec<u8>, Vec<u8>)], compress: bool) -> Vec<SealedFile> {
        let mut builder = FileBuilder::new(compress);
        let mut files: Vec<SealedFile> =
            records.iter().filter_map(|(k, v)| builder.push(STATE_MACHINE, k, v)).collect();
        files.extend(builder.seal());
        files
    }

    fn records(n: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..n).map(|i| (format!("key-{i:08}").into_bytes(), format!("value {i}").repeat(3).into_bytes())).collect()
    }

    #[test]
    fn a_change_touches_only_the_file_its_key_falls_in() {
        let before = records(20_000);
        let mut after = before.clone();
        after[10_000].1 = b"changed".to_vec();
        let (a, b) = (files_of(&before, true), files_of(&after, true));
        assert!(a.len() > 3, "{} files", a.len());
        assert_eq!(a.len(), b.len());
        let differing = a.iter().zip(&b).filter(|(x, y)| x.sha256 != y.sha256).count();
        assert_eq!(differing, 1);
        // An insert shifts nothing either: boundaries are chosen by keys.
        let mut inserted = before.clone();
        inserted.insert(5_000, (b"key-00004999a".to_vec(), b"new".to_vec()));
        let c = files_of(&inserted, true);
        let shared = c.iter().filter(|f| a.iter().any(|g| g.sha256 == f.sha256)).count();
        assert!(shared >= a.len() - 1, "{shared} of {} files shared", a.len());
    }

    #[test]
    fn damage_is_named() {
        let file = files_of(&records(10), false).remove(0);
        let mut bytes = file.bytes.clone();
        bytes[30] ^= 1;
        assert!(matches!(read_file(&bytes, &file.sha256, |_, _, _| Ok(())), Err(FileDamage::Checksum { .. })));
        let truncated = &file.bytes[..file.bytes.len() - 3];
        let sha = sha256_hex(truncated);
        assert!(matches!(read_file(truncated, &sha, |_, _, _| Ok(())), Err(FileDamage::Malformed(_))));
    }

    proptest! {
        #[test]
        fn files_read_back_what_was_written(
            entries in proptest::collection::btree_map(
                proptest::collection::vec(any::<u8>(), 1..40),
                proptest::collection::vec(any::<u8>(), 0..200),
                0..300,
            ),
            compress in any::<bool>(),
        ) {
            let records: Vec<(Vec<u8>, Vec<u8>)> = entries.into_iter().collect();
            let mut read = Vec::new();
            for file in files_of(&records, compress) {
                let count = read_file(&file.bytes, &file.sha256, |family, k, v| {
                    assert_eq!(family, STATE_MACHINE);
                    read.push((k.to_vec(), v.to_vec()));
                    Ok(())
                }).expect("reads back");
                prop_assert_eq!(count, file.records);
            }
            prop_assert_eq!(read, records);
        }
    }
}
