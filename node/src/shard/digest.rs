//! Digests of a shard replica's state, for anti-entropy: a fixed, power-of-two number of bucket
//! digests over the replica's records, and the Merkle tree over them.
//!
//! A record is a key/value of the shard's `state_machine` range, except the ones that are not
//! the shard's data: the applied state (`M`, it changes with every entry), the forwarded
//! proposals' responses (`T`, each replica forgets them on its own schedule) and the digests
//! themselves (`D`). The index family is derived from the records and has its own repair
//! (`index_repair`). A record falls in the bucket a hash of its key names; a bucket's digest is
//! the XOR of its records' hashes (key and value), so an insert, a change or a delete costs one
//! XOR each way and the applier keeps the digests in the same write batch as the entry
//! (`apply`). The tree is built on demand with `merkle_light` from the bucket digests: the
//! bucket count is a power of two of at least 16, so the tree is full and never meets the
//! crate's limits (more than one leaf, an odd last node duplicated).
//!
//! Stored per replica under `group, D`: the bucket count (4 bytes), then one key per bucket
//! (`group, D, bucket(4)`) holding its digest (8 bytes, big-endian).

use std::hash::Hasher;

use merkle_light::hash::Algorithm;
use merkle_light::merkle::MerkleTree;
use sha2::{Digest as _, Sha256};

use super::command::GroupId;
use super::keys;
use crate::storage::{ColumnFamily, Storage, StorageError, WriteBatch};

/// Buckets per replica unless `anti_entropy.buckets` says otherwise, and the bounds it is
/// checked against (defined with the config).
pub use crate::config::{
    DEFAULT_DIGEST_BUCKETS as DEFAULT_BUCKETS, MAX_DIGEST_BUCKETS as MAX_BUCKETS, MIN_DIGEST_BUCKETS as MIN_BUCKETS,
};

/// A node of the Merkle tree: the first 16 bytes of a SHA-256.
pub type NodeHash = [u8; 16];

/// Tags of the `state_machine` keys that are not digested (see the module doc).
const UNDIGESTED_TAGS: [u8; 3] = [b'M', b'T', b'D'];

/// Whether a `state_machine` key of a group is one of the shard's digested records.
pub fn digested(key: &[u8]) -> bool {
    key.len() > 4 && !UNDIGESTED_TAGS.contains(&key[4])
}

/// The bucket of a record's key, for `count` buckets (a power of two).
pub fn bucket_of(key: &[u8], count: usize) -> usize {
    let hash = Sha256::digest(key);
    (u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]) as usize) & (count - 1)
}

/// The hash of one record: its key (length-prefixed) and value.
pub fn record_hash(key: &[u8], value: &[u8]) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update((key.len() as u32).to_be_bytes());
    hasher.update(key);
    hasher.update(value);
    let hash = hasher.finalize();
    u64::from_be_bytes([hash[0], hash[1], hash[2], hash[3], hash[4], hash[5], hash[6], hash[7]])
}

/// Whether `count` is a bucket count anti-entropy accepts.
pub fn valid_bucket_count(count: usize) -> bool {
    crate::config::valid_digest_bucket_count(count)
}

/// The bucket digests of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    values: Vec<u64>,
}

impl Buckets {
    /// `count` empty buckets (`count` must pass [`valid_bucket_count`]).
    pub fn empty(count: usize) -> Buckets {
        Buckets { values: vec![0; count] }
    }

    pub fn from_values(values: Vec<u64>) -> Option<Buckets> {
        valid_bucket_count(values.len()).then_some(Buckets { values })
    }

    pub fn count(&self) -> usize {
        self.values.len()
    }

    pub fn values(&self) -> &[u64] {
        &self.values
    }

    pub fn get(&self, bucket: usize) -> u64 {
        self.values[bucket]
    }

    /// Adds a record if absent, removes it if present (XOR).
    pub fn toggle(&mut self, key: &[u8], value: &[u8]) {
        let bucket = bucket_of(key, self.count());
        self.values[bucket] ^= record_hash(key, value);
    }

    pub fn xor(&mut self, bucket: usize, hash: u64) {
        self.values[bucket] ^= hash;
    }

    pub fn set(&mut self, bucket: usize, value: u64) {
        self.values[bucket] = value;
    }

    /// The buckets whose digests differ (both must have the same count).
    pub fn differing(&self, other: &Buckets) -> Vec<usize> {
        self.values.iter().zip(&other.values).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect()
    }

    /// The Merkle tree over the buckets.
    pub fn tree(&self) -> Tree {
        let leaves = self.values.iter().map(|v| {
            let mut leaf = [0u8; 16];
            leaf[..8].copy_from_slice(&v.to_be_bytes());
            leaf
        });
        Tree { tree: MerkleTree::from_iter(leaves), leaves: self.count() }
    }

    /// Bytes of memory the digests take.
    pub fn memory_bytes(&self) -> usize {
        self.values.len() * std::mem::size_of::<u64>()
    }

    /// The digests of the records `visit` is fed (the scrub and the rebuild).
    pub fn recompute(count: usize, records: impl FnOnce(&mut dyn FnMut(&[u8], &[u8]))) -> Buckets {
        let mut buckets = Buckets::empty(count);
        records(&mut |key, value| {
            if digested(key) {
                buckets.toggle(key, value)
            }
        });
        buckets
    }
}

/// The hash merkle_light builds the tree with: SHA-256, cut to 16 bytes.
#[derive(Default, Clone)]
pub struct TreeHasher(Sha256);

impl Hasher for TreeHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let hash = self.0.clone().finalize();
        u64::from_be_bytes([hash[0], hash[1], hash[2], hash[3], hash[4], hash[5], hash[6], hash[7]])
    }
}

impl Algorithm<NodeHash> for TreeHasher {
    fn hash(&mut self) -> NodeHash {
        let hash = self.0.finalize_reset();
        let mut node = [0u8; 16];
        node.copy_from_slice(&hash[..16]);
        node
    }
}

/// The Merkle tree over a replica's buckets. Levels count from the leaves (0) to the root
/// (`levels() - 1`); level `l` has `leaves >> l` nodes.
pub struct Tree {
    tree: MerkleTree<NodeHash, TreeHasher>,
    leaves: usize,
}

impl Tree {
    pub fn root(&self) -> NodeHash {
        self.tree.root()
    }

    pub fn levels(&self) -> usize {
        self.leaves.trailing_zeros() as usize + 1
    }

    /// The node at `position` of `level`, if there is one.
    pub fn node(&self, level: usize, position: usize) -> Option<NodeHash> {
        if level >= self.levels() || position >= self.leaves >> level {
            return None;
        }
        // merkle_light lays the levels out one after the other, leaves first.
        let offset: usize = (0..level).map(|l| self.leaves >> l).sum();
        self.tree.as_slice().get(offset + position).copied()
    }
}

fn header_key(group: GroupId) -> Vec<u8> {
    keys::state_key(group, b'D')
}

fn bucket_key(group: GroupId, bucket: usize) -> Vec<u8> {
    let mut key = header_key(group);
    key.extend_from_slice(&(bucket as u32).to_be_bytes());
    key
}

/// Puts one bucket's digest into `batch`.
pub fn put_bucket(batch: &mut WriteBatch, group: GroupId, bucket: usize, value: u64) {
    batch.put(ColumnFamily::StateMachine, bucket_key(group, bucket), value.to_be_bytes().to_vec());
}

/// Puts every bucket, and the count, into `batch` (after a rebuild or a repair).
pub fn put_all(batch: &mut WriteBatch, group: GroupId, buckets: &Buckets) {
    batch.put(ColumnFamily::StateMachine, header_key(group), (buckets.count() as u32).to_be_bytes().to_vec());
    for (bucket, value) in buckets.values().iter().enumerate() {
        put_bucket(batch, group, bucket, *value);
    }
}

/// The stored digests of `group`, if they are complete and have `count` buckets.
pub fn load(storage: &Storage, group: GroupId, count: usize) -> Result<Option<Buckets>, StorageError> {
    let prefix = header_key(group);
    let Some(header) = storage.get(ColumnFamily::StateMachine, &prefix)? else {
        return Ok(None);
    };
    if header.len() != 4 || u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize != count {
        return Ok(None);
    }
    let mut buckets = Buckets::empty(count);
    let mut seen = 0usize;
    let mut malformed = false;
    let from = bucket_key(group, 0);
    storage.for_each_in_range(ColumnFamily::StateMachine, &from, &keys::prefix_end(&prefix), |key, value| {
        let Some(bucket) = key.get(prefix.len()..).and_then(|b| <[u8; 4]>::try_from(b).ok()) else {
            malformed = true;
            return false;
        };
        let (bucket, Ok(value)) = (u32::from_be_bytes(bucket) as usize, <[u8; 8]>::try_from(value)) else {
            malformed = true;
            return false;
        };
        if bucket >= count {
            malformed = true;
            return false;
        }
        buckets.set(bucket, u64::from_be_bytes(value));
        seen += 1;
        true
    })?;
    Ok((!malformed && seen == count).then_some(buckets))
}

/// Recomputes the digests of `group` from its records as stored now (nothing may write the
/// group meanwhile).
pub fn rebuild(storage: &Storage, group: GroupId, count: usize) -> Result<Buckets, StorageError> {
    let mut scanned = Ok(());
    let buckets = Buckets::recompute(count, |visit| {
        scanned = storage.for_each_in_range(
            ColumnFamily::StateMachine,
            &keys::group_prefix(group),
            &keys::group_end(group),
            |k, v| {
                visit(k, v);
                true
            },
        );
    });
    scanned.map(|()| buckets)
}

/// The digests of `group` as stored, or rebuilt from its records (and stored) when they are
/// missing, incomplete or of another bucket count. For opening a replica and after a snapshot
/// install, when nothing else writes the group.
pub fn load_or_rebuild(storage: &Storage, group: GroupId, count: usize) -> Result<Buckets, StorageError> {
    if let Some(buckets) = load(storage, group, count)? {
        return Ok(buckets);
    }
    let buckets = rebuild(storage, group, count)?;
    let mut batch = WriteBatch::new();
    let prefix = header_key(group);
    batch.delete_range(ColumnFamily::StateMachine, prefix.clone(), keys::prefix_end(&prefix));
    put_all(&mut batch, group, &buckets);
    storage.write(batch, crate::storage::Durability::Buffered)?;
    Ok(buckets)
}

/// Digests of one replica's `state_machine` range computed in one walk over its records in key
/// order, when the bucket count is only known once the stored digests (`D` records) are met:
/// records are digested at the finest count ([`MAX_BUCKETS`]) and folded down at the end (a
/// bucket at count `c` is the XOR of the fine buckets with the same low bits). Backups use it
/// to check the replica they copy and `backup verify` to check what they stored.
pub struct DigestWalk {
    header: Vec<u8>,
    fine: Vec<u64>,
    stored_count: Option<usize>,
    stored: Vec<(usize, u64)>,
    malformed: bool,
}

impl DigestWalk {
    pub fn new(group: GroupId) -> DigestWalk {
        DigestWalk {
            header: header_key(group),
            fine: vec![0; MAX_BUCKETS],
            stored_count: None,
            stored: Vec::new(),
            malformed: false,
        }
    }

    /// Feeds one record of the group's `state_machine` range.
    pub fn record(&mut self, key: &[u8], value: &[u8]) {
        if digested(key) {
            self.fine[bucket_of(key, MAX_BUCKETS)] ^= record_hash(key, value);
        } else if key == self.header.as_slice() {
            match <[u8; 4]>::try_from(value) {
                Ok(count) => self.stored_count = Some(u32::from_be_bytes(count) as usize),
                Err(_) => self.malformed = true,
            }
        } else if let Some(bucket) = key.strip_prefix(self.header.as_slice()) {
            match (<[u8; 4]>::try_from(bucket), <[u8; 8]>::try_from(value)) {
                (Ok(b), Ok(v)) => self.stored.push((u32::from_be_bytes(b) as usize, u64::from_be_bytes(v))),
                _ => self.malformed = true,
            }
        }
    }

    /// The digests recomputed from the records, at `count` buckets (a valid count).
    pub fn recomputed(&self, count: usize) -> Buckets {
        let mut buckets = Buckets::empty(count);
        for (fine, value) in self.fine.iter().enumerate() {
            buckets.xor(fine & (count - 1), *value);
        }
        buckets
    }

    /// The digests the replica stored, if they are complete and well-formed.
    pub fn stored(&self) -> Option<Buckets> {
        let count = self.stored_count.filter(|c| valid_bucket_count(*c))?;
        if self.malformed || self.stored.len() != count {
            return None;
        }
        let mut buckets = Buckets::empty(count);
        for (bucket, value) in &self.stored {
            if *bucket >= count {
                return None;
            }
            buckets.set(*bucket, *value);
        }
        Some(buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(group: GroupId, tag: u8, n: u32) -> Vec<u8> {
        let mut k = keys::state_key(group, tag);
        k.extend_from_slice(&n.to_be_bytes());
        k
    }

    #[test]
    fn only_the_shards_data_is_digested() {
        assert!(digested(&key(3, b'A', 1)));
        assert!(digested(&key(3, b'E', 1)));
        assert!(!digested(&key(3, b'M', 1)));
        assert!(!digested(&key(3, b'T', 1)));
        assert!(!digested(&key(3, b'D', 1)));
        assert!(!digested(&[0, 0, 0, 3]));
    }

    #[test]
    fn tree_nodes_are_laid_out_by_level() {
        let mut buckets = Buckets::empty(16);
        buckets.set(5, 42);
        let tree = buckets.tree();
        assert_eq!(tree.levels(), 5);
        assert_eq!(tree.node(4, 0), Some(tree.root()));
        assert_eq!(tree.node(4, 1), None);
        assert_eq!(tree.node(5, 0), None);
        // A leaf differs from its untouched neighbour, and the parents above it from theirs.
        assert_ne!(tree.node(0, 5), tree.node(0, 4));
        assert_ne!(tree.node(1, 2), tree.node(1, 3));
        assert_eq!(tree.node(1, 0), tree.node(1, 1));
        let other = Buckets::empty(16).tree();
        assert_ne!(other.root(), tree.root());
        assert_eq!(other.node(2, 0), tree.node(2, 0));
        assert_ne!(other.node(2, 1), tree.node(2, 1));
    }

    #[test]
    fn stored_digests_round_trip_and_a_missing_bucket_means_rebuild() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), Default::default()).expect("open");
        let mut batch = WriteBatch::new();
        for n in 0..200u32 {
            batch.put(ColumnFamily::StateMachine, key(7, b'A', n), n.to_be_bytes().to_vec());
        }
        batch.put(ColumnFamily::StateMachine, key(7, b'M', 0), b"applied".to_vec());
        batch.put(ColumnFamily::StateMachine, key(8, b'A', 0), b"other group".to_vec());
        storage.write(batch, crate::storage::Durability::Buffered).expect("write");
        assert_eq!(load(&storage, 7, 64).expect("load"), None);
        let built = load_or_rebuild(&storage, 7, 64).expect("rebuild");
        let mut expected = Buckets::empty(64);
        for n in 0..200u32 {
            expected.toggle(&key(7, b'A', n), &n.to_be_bytes());
        }
        assert_eq!(built, expected);
        assert_eq!(load(&storage, 7, 64).expect("load"), Some(expected.clone()));
        // Another count is not these digests.
        assert_eq!(load(&storage, 7, 128).expect("load"), None);
        let mut batch = WriteBatch::new();
        batch.delete(ColumnFamily::StateMachine, bucket_key(7, 9));
        storage.write(batch, crate::storage::Durability::Buffered).expect("write");
        assert_eq!(load(&storage, 7, 64).expect("load"), None);
        assert_eq!(load_or_rebuild(&storage, 7, 64).expect("rebuild"), expected);
    }

    proptest! {
        /// Kept incrementally through inserts, changes and deletes, the digests equal the ones
        /// recomputed from the final records.
        #[test]
        fn incremental_digests_equal_recomputed_ones(
            ops in proptest::collection::vec((0u32..40, proptest::option::of(any::<u8>())), 0..200)
        ) {
            let mut records = std::collections::BTreeMap::new();
            let mut kept = Buckets::empty(16);
            for (n, value) in ops {
                let k = key(1, b'A', n);
                if let Some(old) = records.remove(&k) {
                    kept.toggle(&k, &[old]);
                }
                if let Some(v) = value {
                    kept.toggle(&k, &[v]);
                    records.insert(k, v);
                }
            }
            let recomputed = Buckets::recompute(16, |visit| {
                for (k, v) in &records {
                    visit(k, &[*v]);
                }
            });
            prop_assert_eq!(&kept, &recomputed);
            prop_assert_eq!(kept.tree().root(), recomputed.tree().root());
        }
    }

    #[test]
    fn a_walk_folds_to_the_digests_of_any_count() {
        let group = 5;
        let records: Vec<(Vec<u8>, Vec<u8>)> =
            (0..300u32).map(|n| (key(group, b'A', n), format!("value {n}").into_bytes())).collect();
        for count in [16usize, 4096, MAX_BUCKETS] {
            let mut expected = Buckets::empty(count);
            let mut walk = DigestWalk::new(group);
            for (k, v) in &records {
                expected.toggle(k, v);
                walk.record(k, v);
            }
            assert_eq!(walk.recomputed(count), expected, "{count} buckets");
            // The stored digests (the records `put_all` writes) are read back by the walk.
            walk.record(&header_key(group), &(count as u32).to_be_bytes());
            for (bucket, value) in expected.values().iter().enumerate() {
                walk.record(&bucket_key(group, bucket), &value.to_be_bytes());
            }
            assert_eq!(walk.stored(), Some(expected));
        }
        let mut incomplete = DigestWalk::new(group);
        incomplete.record(&header_key(group), &16u32.to_be_bytes());
        incomplete.record(&bucket_key(group, 0), &1u64.to_be_bytes());
        assert_eq!(incomplete.stored(), None);
    }
}
