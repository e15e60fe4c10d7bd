//! Replicas whose storage was damaged: found at start, dropped, re-seeded by their peers.
//!
//! `storage` reads every table file when it opens (`storage.verify_on_start`) and sets aside the
//! files it cannot read whole ([`LostFile`]). Every group with a key in such a file's range has
//! lost part of its Raft log or state, so its replica on this node is dropped whole here, before
//! the groups open: log, hard state (the vote excepted), state machine, indexes, snapshot. The
//! group then opens empty and without bootstrapping, and its leader re-seeds it (a snapshot,
//! then the log) as it would a new replica; its vote guard keeps it from voting until it has
//! applied what that leader had committed, since it forgot entries it acknowledged. The other
//! groups of the node start and serve as usual.
//!
//! Deleting a replica's data whole ([`clear_replica`]) also serves a replica that a move took
//! away from this node (`ShardSet::retire_replica`).

use crate::shard::command::{group_of_shard, GroupId};
use crate::shard::keys;
use crate::storage::{ColumnFamily, Durability, LostFile, Storage, StorageError, WriteBatch};
use std::collections::BTreeMap;

/// The families whose keys start with the group id.
const GROUP_FAMILIES: [ColumnFamily; 4] =
    [ColumnFamily::RaftLog, ColumnFamily::RaftState, ColumnFamily::StateMachine, ColumnFamily::Index];

/// The groups (of `shards` shards and the meta group) that held a key of a lost file, each with
/// the files that make it damaged. A lost file of the `meta` family (snapshot-install markers,
/// the node's identity), or of no known family, damages every group: what it held cannot be
/// told apart per group.
pub fn damaged_groups(lost: &[LostFile], shards: u16) -> BTreeMap<GroupId, Vec<String>> {
    let groups = std::iter::once(0).chain((0..shards).map(group_of_shard));
    let mut damaged: BTreeMap<GroupId, Vec<String>> = BTreeMap::new();
    for group in groups {
        let (from, to) = (keys::group_prefix(group), keys::group_end(group));
        for file in lost {
            let hit = matches!(file.cf, None | Some(ColumnFamily::Meta))
                || GROUP_FAMILIES.iter().any(|cf| file.overlaps(*cf, &from, &to));
            if hit {
                damaged.entry(group).or_default().push(file.name.clone());
            }
        }
    }
    damaged
}

/// Drops this node's replica of `group` whole, keeping only its vote: the group opens empty
/// and its leader re-seeds it. Runs on a blocking thread (RocksDB, file removal).
pub fn drop_replica(storage: &Storage, group: GroupId, files: &[String]) -> Result<(), StorageError> {
    clear_replica(storage, group, true, true)?;
    let shard = crate::shard::command::shard_of_group(group)
        .map(|s| if s == crate::meta::META_SHARD { "meta".to_string() } else { s.to_string() })
        .unwrap_or_else(|| group.to_string());
    for file in files {
        super::metrics::DAMAGED_REPLICAS.with_label_values(&[&shard, file]).inc();
    }
    tracing::error!(
        shard = %shard,
        group,
        files = %files.join(","),
        "replica damaged on disk: dropped it to be re-seeded from its peers (log and state)"
    );
    Ok(())
}

/// Deletes everything of this node's replica of `group` but, with `keep_vote`, its vote (a
/// voter must never vote twice in a term): Raft log and hard state, state machine, indexes,
/// snapshot. The group never bootstraps itself again at a later start (a marker says so).
/// With `forgot_acknowledged` (a damaged replica that was a voter), the node also holds its
/// votes back at its next start until it has caught up. Its Raft must not run. Runs on a
/// blocking thread.
///
/// A replica moved away is cleared without its vote: the group's committed membership no
/// longer holds this node, so no vote of its counts in any election. A removed voter that did
/// not learn its removal may have campaigned alone for terms above the group's; kept, that vote
/// would make the group's leader step down the moment a later move adds the node back as a
/// learner (openraft reverts a leader that sees a higher vote), failing that move.
pub fn clear_replica(
    storage: &Storage,
    group: GroupId,
    forgot_acknowledged: bool,
    keep_vote: bool,
) -> Result<(), StorageError> {
    // The group's Raft has stopped, but an append it queued just before may not be written
    // yet: it must land before the deletion below, not after it.
    storage.settle_appends();
    let vote_key = keys::state_key(group, super::log_store::VOTE_TAG);
    // The vote is kept: a voter must never vote twice in a term. Of its two copies (one may
    // have been in the lost file, leaving an older version to read back), the newer.
    let vote = if keep_vote {
        newer_vote(
            storage.get(ColumnFamily::RaftState, &vote_key)?,
            storage.get(ColumnFamily::Meta, &keys::vote_copy_key(group))?,
        )
    } else {
        None
    };
    // The snapshot first (and durably): a crash after the batch must not find it again.
    let dir = storage.data_dir().join("snapshots");
    let snapshot = crate::shard::snapshot::snapshot_path(&dir, group);
    let fs_error = |path: &std::path::Path, error: std::io::Error| StorageError::DataDir {
        path: path.to_path_buf(),
        message: format!("removing a dropped replica's snapshot: {error}"),
    };
    match std::fs::remove_file(&snapshot) {
        Ok(()) => std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| fs_error(&dir, e))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(fs_error(&snapshot, error)),
    }
    let mut batch = WriteBatch::new();
    // In the same synced batch as the drop: a crash right after it must still find the node
    // holding its votes back and the group never bootstrapping itself again.
    if forgot_acknowledged {
        batch.put(ColumnFamily::Meta, keys::RECOVERING_KEY.to_vec(), b"1".to_vec());
    }
    batch.put(ColumnFamily::Meta, keys::reseed_marker_key(group), b"1".to_vec());
    for cf in GROUP_FAMILIES {
        batch.delete_range(cf, keys::group_prefix(group), keys::group_end(group));
    }
    batch.delete(ColumnFamily::Meta, keys::install_marker_key(group));
    batch.delete(ColumnFamily::Meta, keys::snapshot_key(group));
    match vote {
        Some(vote) => {
            batch.put(ColumnFamily::Meta, keys::vote_copy_key(group), vote.clone());
            batch.put(ColumnFamily::RaftState, vote_key, vote);
        }
        None => batch.delete(ColumnFamily::Meta, keys::vote_copy_key(group)),
    }
    storage.write(batch, Durability::Synced)
}

/// The newer of two stored votes (JSON): the higher term, then a committed one. A copy that
/// does not decode counts as absent.
fn newer_vote(a: Option<Vec<u8>>, b: Option<Vec<u8>>) -> Option<Vec<u8>> {
    let rank = |bytes: &Vec<u8>| {
        serde_json::from_slice::<openraft::Vote<super::types::NodeId>>(bytes)
            .ok()
            .map(|v| (v.leader_id.term, v.committed))
    };
    match (a, b) {
        (Some(a), Some(b)) => match (rank(&a), rank(&b)) {
            (Some(ra), Some(rb)) if rb > ra => Some(b),
            (None, Some(_)) => Some(b),
            _ => Some(a),
        },
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(cf: ColumnFamily, first: Vec<u8>, last: Vec<u8>) -> LostFile {
        LostFile { cf: Some(cf), name: "000009.sst".into(), first_key: first, last_key: last }
    }

    #[test]
    fn a_lost_file_damages_exactly_the_groups_in_its_range() {
        // Group 2's log tail to group 3's first entry (shards 1 and 2).
        let file = lost(ColumnFamily::RaftLog, keys::log_key(2, 7), keys::log_key(3, 1));
        let damaged = damaged_groups(&[file], 4);
        assert_eq!(damaged.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        // The same range in another family damages the same groups.
        let file = lost(ColumnFamily::Index, keys::group_prefix(1), keys::group_prefix(1));
        assert_eq!(damaged_groups(&[file], 4).keys().copied().collect::<Vec<_>>(), vec![1]);
        // Keys beyond the last shard's group name no group.
        let file = lost(ColumnFamily::StateMachine, keys::group_prefix(9), keys::group_prefix(10));
        assert!(damaged_groups(&[file], 4).is_empty());
        // A lost meta-family file damages every group, the meta group included.
        let file = lost(ColumnFamily::Meta, b"install/".to_vec(), b"snapshot/".to_vec());
        assert_eq!(damaged_groups(&[file], 2).len(), 3);
        // So does a file too damaged to open, whose range is unknown.
        let file = LostFile { cf: None, name: "000011.sst".into(), first_key: Vec::new(), last_key: Vec::new() };
        assert_eq!(damaged_groups(&[file], 2).len(), 3);
    }

    #[test]
    fn the_newer_of_the_two_vote_copies_is_kept() {
        let vote = |term: u64, node: u64, committed: bool| {
            let mut v = openraft::Vote::new(term, node);
            v.committed = committed;
            Some(serde_json::to_vec(&v).expect("json"))
        };
        assert_eq!(newer_vote(vote(3, 1, false), vote(5, 2, false)), vote(5, 2, false));
        assert_eq!(newer_vote(vote(5, 2, false), vote(3, 1, false)), vote(5, 2, false));
        assert_eq!(newer_vote(vote(5, 2, false), vote(5, 2, true)), vote(5, 2, true));
        assert_eq!(newer_vote(None, vote(4, 1, false)), vote(4, 1, false));
        assert_eq!(newer_vote(Some(b"garbage".to_vec()), vote(4, 1, false)), vote(4, 1, false));
        assert_eq!(newer_vote(None, None), None);
    }

    #[test]
    fn dropping_a_replica_keeps_its_vote_and_no_other_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), crate::storage::StorageOptions::default()).expect("open");
        let mut batch = WriteBatch::new();
        for group in [1, 2] {
            batch.put(ColumnFamily::RaftLog, keys::log_key(group, 1), b"entry".to_vec());
            batch.put(
                ColumnFamily::RaftState,
                keys::state_key(group, super::super::log_store::VOTE_TAG),
                b"vote".to_vec(),
            );
            batch.put(ColumnFamily::StateMachine, keys::applied_key(group), b"applied".to_vec());
            batch.put(ColumnFamily::Index, keys::quarantine_prefix(group), Vec::new());
        }
        storage.write(batch, Durability::Synced).expect("write");
        drop_replica(&storage, 1, &["000009.sst".to_string()]).expect("drop");
        for cf in GROUP_FAMILIES {
            let left = storage.scan(cf, &keys::group_prefix(1), &keys::group_end(1), 10).expect("scan");
            let expected = usize::from(cf == ColumnFamily::RaftState);
            assert_eq!(left.len(), expected, "group 1 in {}: {left:?}", cf.name());
            let other = storage.scan(cf, &keys::group_prefix(2), &keys::group_end(2), 10).expect("scan");
            assert_eq!(other.len(), 1, "group 2 untouched in {}", cf.name());
        }
        let vote = storage.get(ColumnFamily::RaftState, &keys::state_key(1, super::super::log_store::VOTE_TAG));
        assert_eq!(vote.expect("get"), Some(b"vote".to_vec()));
        // Durable with the drop: the node holds its votes back, the group never re-bootstraps.
        assert!(storage.get(ColumnFamily::Meta, keys::RECOVERING_KEY).expect("get").is_some());
        assert!(storage.get(ColumnFamily::Meta, &keys::reseed_marker_key(1)).expect("get").is_some());
        assert!(storage.get(ColumnFamily::Meta, &keys::reseed_marker_key(2)).expect("get").is_none());
    }

    #[test]
    fn a_vote_that_reads_back_older_than_its_copy_is_replaced_by_the_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), crate::storage::StorageOptions::default()).expect("open");
        let older = serde_json::to_vec(&openraft::Vote::new(3u64, 1u64)).expect("json");
        let newer = serde_json::to_vec(&openraft::Vote::new(5u64, 2u64)).expect("json");
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::RaftState, keys::state_key(1, super::super::log_store::VOTE_TAG), older);
        batch.put(ColumnFamily::Meta, keys::vote_copy_key(1), newer.clone());
        storage.write(batch, Durability::Synced).expect("write");
        drop_replica(&storage, 1, &[]).expect("drop");
        let kept = storage.get(ColumnFamily::RaftState, &keys::state_key(1, super::super::log_store::VOTE_TAG));
        assert_eq!(kept.expect("get"), Some(newer.clone()));
        assert_eq!(storage.get(ColumnFamily::Meta, &keys::vote_copy_key(1)).expect("get"), Some(newer));
    }
}
