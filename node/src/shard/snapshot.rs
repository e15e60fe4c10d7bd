//! Shard snapshots as files, streamed: a snapshot is written record by record from the shard's
//! key range, sent in chunks by openraft, received chunk by chunk into a file, checked whole,
//! and installed in bounded write batches. Memory use is a few buffers, never the shard's size.
//!
//! File layout (`<data_dir>/snapshots/group-<G>.snap`, big-endian integers):
//!
//! ```text
//! magic "STMSNAP1" | meta_len u32 | meta (JSON SnapshotMeta)
//! { family u8 (0 state_machine, 1 index) | key_len u32 | key | value_len u32 | value }*
//! 0xFF | records u64 | fnv1a64 of every byte before the 0xFF
//! ```
//!
//! A file is written under a temporary name, fsynced, then renamed over the last snapshot of its
//! group and the directory fsynced: the persisted snapshot is always a complete one.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::command::GroupId;
use crate::model::id::Fnv1a64 as Fnv;

const MAGIC: &[u8; 8] = b"STMSNAP1";
const END: u8 = 0xFF;
/// Keys are short; a longer length field means the file is damaged.
const MAX_KEY_BYTES: usize = 64 << 10;
/// Values hold one record; a longer length field means the file is damaged.
const MAX_VALUE_BYTES: usize = 256 << 20;
const MAX_META_BYTES: usize = 64 << 20;

fn damaged(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Where a group's snapshots live.
pub fn snapshot_path(dir: &Path, group: GroupId) -> PathBuf {
    dir.join(format!("group-{group}.snap"))
}

/// A fresh name for a snapshot being received for `group`.
pub fn receiving_path(dir: &Path, group: GroupId) -> PathBuf {
    dir.join(format!("recv-{group}-{:016x}.part", rand::random::<u64>()))
}

/// Removes snapshots of `group` that were being received or written when the node stopped.
pub fn remove_partial(dir: &Path, group: GroupId) {
    remove_matching(dir, &[format!("recv-{group}-"), format!("group-{group}.snap.")]);
}

/// Removes the snapshots of `group` that were being received, and leaves one being written
/// (a build runs beside the state machine and may be writing one now).
pub fn remove_partial_received(dir: &Path, group: GroupId) {
    remove_matching(dir, &[format!("recv-{group}-")]);
}

fn remove_matching(dir: &Path, prefixes: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|prefix| name.starts_with(prefix.as_str())) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Fsyncs a directory, so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes one snapshot file.
pub struct SnapshotWriter {
    out: BufWriter<File>,
    hash: Fnv,
    records: u64,
    temporary: PathBuf,
    destination: PathBuf,
}

impl SnapshotWriter {
    /// Starts the snapshot of `group` in `dir` with its metadata (JSON).
    pub fn create(dir: &Path, group: GroupId, meta: &[u8]) -> io::Result<SnapshotWriter> {
        std::fs::create_dir_all(dir)?;
        let destination = snapshot_path(dir, group);
        let temporary = destination.with_extension(format!("snap.{:016x}.tmp", rand::random::<u64>()));
        let file = OpenOptions::new().write(true).create_new(true).open(&temporary)?;
        let mut writer = SnapshotWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            hash: Fnv::new(),
            records: 0,
            temporary,
            destination,
        };
        let meta_len = u32::try_from(meta.len()).map_err(|_| damaged("snapshot metadata too large"))?;
        writer.put(MAGIC)?;
        writer.put(&meta_len.to_be_bytes())?;
        writer.put(meta)?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hash.feed(bytes);
        self.out.write_all(bytes)
    }

    /// Appends one key/value of `family` (0: state machine, 1: index).
    pub fn record(&mut self, family: u8, key: &[u8], value: &[u8]) -> io::Result<()> {
        if key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES {
            return Err(damaged(format!("record too large for a snapshot ({} + {} bytes)", key.len(), value.len())));
        }
        self.put(&[family])?;
        self.put(&(key.len() as u32).to_be_bytes())?;
        self.put(key)?;
        self.put(&(value.len() as u32).to_be_bytes())?;
        self.put(value)?;
        self.records += 1;
        Ok(())
    }

    /// Ends the file, makes it durable and puts it in place of the group's last snapshot.
    pub fn finish(self) -> io::Result<PathBuf> {
        let path = self.seal()?.publish()?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(path)
    }

    /// Ends the file and makes it durable under its temporary name: [`Sealed::publish`] then
    /// puts it in place, or [`Sealed::discard`] drops it.
    pub fn seal(mut self) -> io::Result<Sealed> {
        let result = (|| {
            self.out.write_all(&[END])?;
            self.out.write_all(&self.records.to_be_bytes())?;
            self.out.write_all(&self.hash.finish().to_be_bytes())?;
            self.out.flush()?;
            self.out.get_ref().sync_all()
        })();
        match result {
            Ok(()) => Ok(Sealed { temporary: Some(self.temporary.clone()), destination: self.destination.clone() }),
            Err(error) => {
                let _ = std::fs::remove_file(&self.temporary);
                Err(error)
            }
        }
    }

    /// Gives up: removes the temporary file.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.temporary);
    }
}

/// A complete, durable snapshot file under its temporary name; removed when dropped unless
/// published.
pub struct Sealed {
    temporary: Option<PathBuf>,
    destination: PathBuf,
}

impl Sealed {
    /// Puts the file in place of the group's last snapshot. Durable once the directory is
    /// synced ([`sync_dir`]), which the caller does, outside any lock it holds.
    pub fn publish(mut self) -> io::Result<PathBuf> {
        if let Some(temporary) = self.temporary.take() {
            if let Err(error) = std::fs::rename(&temporary, &self.destination) {
                let _ = std::fs::remove_file(&temporary);
                return Err(error);
            }
        }
        Ok(self.destination.clone())
    }

    /// Drops the file: a newer snapshot took its place meanwhile.
    pub fn discard(self) {}
}

impl Drop for Sealed {
    fn drop(&mut self) {
        if let Some(temporary) = self.temporary.take() {
            let _ = std::fs::remove_file(temporary);
        }
    }
}

/// Reads one snapshot file record by record, checking its trailer at the end.
pub struct SnapshotReader {
    input: BufReader<File>,
    hash: Fnv,
    records: u64,
    done: bool,
}

impl SnapshotReader {
    /// Opens a snapshot file and returns its metadata (JSON).
    pub fn open(path: &Path) -> io::Result<(SnapshotReader, Vec<u8>)> {
        SnapshotReader::from_file(File::open(path)?)
    }

    /// Reads a snapshot from `file` (from where it stands: its start for a file just opened)
    /// and returns its metadata (JSON).
    pub fn from_file(file: File) -> io::Result<(SnapshotReader, Vec<u8>)> {
        let mut reader = SnapshotReader {
            input: BufReader::with_capacity(1 << 20, file),
            hash: Fnv::new(),
            records: 0,
            done: false,
        };
        let mut magic = [0u8; 8];
        reader.take(&mut magic)?;
        if &magic != MAGIC {
            return Err(damaged("not a StemeDB snapshot file"));
        }
        let meta_len = reader.length(MAX_META_BYTES)?;
        let mut meta = vec![0u8; meta_len];
        reader.take(&mut meta)?;
        Ok((reader, meta))
    }

    fn take(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => damaged("snapshot file is truncated"),
            _ => e,
        })?;
        self.hash.feed(buf);
        Ok(())
    }

    fn length(&mut self, limit: usize) -> io::Result<usize> {
        let mut bytes = [0u8; 4];
        self.take(&mut bytes)?;
        let length = u32::from_be_bytes(bytes) as usize;
        if length > limit {
            return Err(damaged(format!("snapshot record length {length} is over {limit}")));
        }
        Ok(length)
    }

    /// The next record `(family, key, value)`, or `None` after the last one once the trailer
    /// (record count and checksum) matched.
    pub fn next_record(&mut self) -> io::Result<Option<(u8, Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let mut family = [0u8; 1];
        let hash_before = self.hash;
        self.take(&mut family)?;
        if family[0] == END {
            let mut trailer = [0u8; 16];
            self.input.read_exact(&mut trailer).map_err(|_| damaged("snapshot trailer is truncated"))?;
            let records = u64::from_be_bytes(trailer[..8].try_into().map_err(|_| damaged("trailer"))?);
            let checksum = u64::from_be_bytes(trailer[8..].try_into().map_err(|_| damaged("trailer"))?);
            if records != self.records || checksum != hash_before.finish() {
                return Err(damaged(format!(
                    "snapshot checksum mismatch ({} records read, {records} expected)",
                    self.records
                )));
            }
            let mut rest = [0u8; 1];
            if self.input.read(&mut rest)? != 0 {
                return Err(damaged("bytes after the snapshot trailer"));
            }
            self.done = true;
            return Ok(None);
        }
        if family[0] > 1 {
            return Err(damaged(format!("unknown column family tag {} in snapshot", family[0])));
        }
        let key_len = self.length(MAX_KEY_BYTES)?;
        let mut key = vec![0u8; key_len];
        self.take(&mut key)?;
        let value_len = self.length(MAX_VALUE_BYTES)?;
        let mut value = vec![0u8; value_len];
        self.take(&mut value)?;
        self.records += 1;
        Ok(Some((family[0], key, value)))
    }
}

/// Reads a whole snapshot file to check it (every record, the count and the checksum) before
/// anything is changed; returns its metadata and record count.
pub fn verify(path: &Path) -> io::Result<(Vec<u8>, u64)> {
    let (mut reader, meta) = SnapshotReader::open(path)?;
    while reader.next_record()?.is_some() {}
    Ok((meta, reader.records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, records: &[(u8, &[u8], &[u8])]) -> PathBuf {
        let mut writer = SnapshotWriter::create(dir, 7, b"{\"m\":1}").expect("create");
        for (family, key, value) in records {
            writer.record(*family, key, value).expect("record");
        }
        writer.finish().expect("finish")
    }

    #[test]
    fn a_snapshot_file_round_trips_record_by_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = vec![7u8; 3 << 20];
        let path = write(dir.path(), &[(0, b"a", b"1"), (1, b"b", &big), (0, b"", b"")]);
        assert_eq!(path, snapshot_path(dir.path(), 7));
        let (mut reader, meta) = SnapshotReader::open(&path).expect("open");
        assert_eq!(meta, b"{\"m\":1}");
        let mut seen = Vec::new();
        while let Some(record) = reader.next_record().expect("record") {
            seen.push(record);
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[1], (1, b"b".to_vec(), big));
        assert_eq!(verify(&path).expect("verify").1, 3);
    }

    #[test]
    fn damaged_or_truncated_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), &[(0, b"key", b"value"), (1, b"k2", b"v2")]);
        let good = std::fs::read(&path).expect("read");
        for cut in [4, 20, good.len() - 20, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).expect("write");
            assert!(verify(&path).is_err(), "truncated at {cut}");
        }
        let mut flipped = good.clone();
        let at = good.len() / 2;
        flipped[at] ^= 0x40;
        std::fs::write(&path, &flipped).expect("write");
        assert!(verify(&path).is_err(), "a flipped byte");
        let mut longer = good.clone();
        longer.push(0);
        std::fs::write(&path, &longer).expect("write");
        assert!(verify(&path).is_err(), "trailing garbage");
    }

    #[test]
    fn an_abandoned_or_failed_write_leaves_the_last_snapshot_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), &[(0, b"old", b"1")]);
        let mut writer = SnapshotWriter::create(dir.path(), 7, b"{}").expect("create");
        writer.record(0, b"new", b"2").expect("record");
        writer.abandon();
        let (mut reader, _) = SnapshotReader::open(&path).expect("open");
        assert_eq!(reader.next_record().expect("record").map(|r| r.1), Some(b"old".to_vec()));
        remove_partial(dir.path(), 7);
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "only the complete snapshot: {left:?}");
    }
}
