//! Anti-entropy (issue 16): damage injected into one stopped replica is found and repaired
//! without any operator call, copying only the damaged buckets; bit rot in its table files never
//! keeps it from starting (the damaged replicas are re-seeded); a restarted replica neither
//! serves nor leads before its start-up check; and checks every second under a write load with
//! leader changes and a snapshot install raise no false alarm.
//!
//! The damage is written into the stopped node's RocksDB through StemeDB's own storage layer
//! (the test is the hook: nothing in a release build's API can change a record behind the
//! applier's back).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stemedb::shard::command::group_of_shard;
use stemedb::shard::{digest, keys};
use stemedb::storage::{ColumnFamily, Durability, Storage, StorageOptions, WriteBatch};
use stemedb_cluster_tests::{ClusterOptions, TestCluster};

const SHARDS: u16 = 2;

fn fast_checks() -> Vec<(String, String)> {
    vec![
        ("STEMEDB_ANTI_ENTROPY_INTERVAL_SECONDS".into(), "1".into()),
        ("STEMEDB_ANTI_ENTROPY_SCRUB_INTERVAL_SECONDS".into(), "2".into()),
    ]
}

/// Writes `count` assertions under `prefix{i % 4}` through node 1; returns (path, value) pairs.
async fn write_claims(cluster: &TestCluster, prefix: &str, count: usize) -> anyhow::Result<Vec<(String, i64)>> {
    let mut written = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(16) {
        let writes = chunk.iter().map(|i| {
            let path = format!("{prefix}{}", i % 4);
            async move { cluster.assert_value(1, &path, json!(*i as i64)).await.map(|_| (path, *i as i64)) }
        });
        for result in futures_join(writes).await {
            written.push(result?);
        }
    }
    Ok(written)
}

async fn futures_join<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<F> = futures.into_iter().collect();
    let mut out = Vec::with_capacity(handles.len());
    for f in handles {
        out.push(f.await);
    }
    out
}

/// Polls node `via`'s `/cluster/sync_status` until `done` holds (or fails after `timeout`).
async fn wait_sync(
    cluster: &TestCluster,
    via: u64,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = cluster.admin_get(via, "/cluster/sync_status").await?;
        if status == 200 && done(&body) {
            return Ok(body);
        }
        anyhow::ensure!(Instant::now() < deadline, "node {via}: {what} not reached within {timeout:?}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn all_agree(body: &Value) -> bool {
    body["shards"].as_array().is_some_and(|s| !s.is_empty() && s.iter().all(|s| s["agreement"] == "agree"))
}

fn shard_entry(body: &Value, shard: u16) -> Value {
    body["shards"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["shard"] == json!(shard)).cloned())
        .unwrap_or(Value::Null)
}

/// The assertion records (`A`) of a shard in a stopped node's data dir.
fn assertion_records(storage: &Storage, shard: u16) -> Vec<(Vec<u8>, Vec<u8>)> {
    let prefix = keys::assertions_prefix(group_of_shard(shard));
    storage.scan(ColumnFamily::StateMachine, &prefix, &keys::prefix_end(&prefix), usize::MAX).expect("scan")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_records_are_found_and_repaired_without_an_operator() -> anyhow::Result<()> {
    let mut cluster =
        TestCluster::start(ClusterOptions { nodes: 3, shards: SHARDS, env: fast_checks(), ..Default::default() })
            .await?;
    let written = write_claims(&cluster, "ae/claims", 200).await?;
    // Every replica compared equal at a check entry before anything is damaged.
    wait_sync(&cluster, 1, Duration::from_secs(30), "all shards agree", all_agree).await?;

    let victim = 3;
    cluster.terminate(victim, Duration::from_secs(20)).await?;
    let data_dir = cluster.node(victim).data_dir.clone();
    let (scrub_shard, check_shard) = (cluster.shard_of("ae/claims0"), 1 - cluster.shard_of("ae/claims0"));
    let (damaged_by_scrub, damaged_at_check) = {
        let storage = Storage::open(&data_dir, StorageOptions::default())?;
        // Shard A: one record changed and one deleted behind the applier's back (bit rot and a
        // lost record): the scrub finds them, since the kept digests still describe the truth.
        let records = assertion_records(&storage, scrub_shard);
        anyhow::ensure!(records.len() > 10, "shard {scrub_shard} holds {} records", records.len());
        let (changed, deleted) = (records[3].clone(), records[7].clone());
        let mut rotten = changed.1.clone();
        let last = rotten.len() - 1;
        rotten[last] ^= 0x5a;
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::StateMachine, changed.0.clone(), rotten);
        batch.delete(ColumnFamily::StateMachine, deleted.0.clone());
        // Shard B: a record changed *and* its bucket's digest changed to match, as a replica
        // that applied differently would hold: only comparing with the other replicas finds it.
        let records = assertion_records(&storage, check_shard);
        anyhow::ensure!(records.len() > 10, "shard {check_shard} holds {} records", records.len());
        let (key, value) = records[5].clone();
        let mut diverged = value.clone();
        let last = diverged.len() - 1;
        diverged[last] ^= 0x33;
        let group = group_of_shard(check_shard);
        let buckets = digest::load(&storage, group, digest::DEFAULT_BUCKETS)?.expect("kept digests");
        let bucket = digest::bucket_of(&key, buckets.count());
        let fixed = buckets.get(bucket) ^ digest::record_hash(&key, &value) ^ digest::record_hash(&key, &diverged);
        batch.put(ColumnFamily::StateMachine, key.clone(), diverged);
        digest::put_bucket(&mut batch, group, bucket, fixed);
        storage.write(batch, Durability::Synced)?;
        storage.close()?;
        let scrub_buckets: BTreeSet<usize> =
            [&changed.0, &deleted.0].iter().map(|k| digest::bucket_of(k, digest::DEFAULT_BUCKETS)).collect();
        (scrub_buckets, bucket)
    };
    cluster.restart(victim).await?;

    // Found and repaired by the node itself: the scrub after start, and the next check.
    let repaired = wait_sync(&cluster, victim, Duration::from_secs(60), "both shards repaired and agreeing", |body| {
        all_agree(body)
            && shard_entry(body, scrub_shard)["repairs"].as_u64() >= Some(1)
            && shard_entry(body, check_shard)["repairs"].as_u64() >= Some(1)
    })
    .await?;
    let scrub_repair = &shard_entry(&repaired, scrub_shard)["last_repair"];
    assert_eq!(scrub_repair["cause"], "scrub", "{scrub_repair}");
    assert_eq!(scrub_repair["kind"], "buckets", "{scrub_repair}");
    assert_eq!(
        scrub_repair["buckets"].as_u64(),
        Some(damaged_by_scrub.len() as u64),
        "only the damaged buckets: {scrub_repair}"
    );
    assert_eq!(scrub_repair["written"].as_u64(), Some(2), "the changed and the deleted record: {scrub_repair}");
    let check_repair = &shard_entry(&repaired, check_shard)["last_repair"];
    assert_eq!(check_repair["cause"], "check", "{check_repair}");
    assert_eq!(
        check_repair["buckets"].as_u64(),
        Some(1),
        "the one diverged bucket ({damaged_at_check}): {check_repair}"
    );
    assert_eq!(check_repair["written"].as_u64(), Some(1), "{check_repair}");
    let repaired_keys = cluster.metric(victim, "stemedb_antientropy_repaired_keys_total").await?.unwrap_or(0.0);
    assert_eq!(repaired_keys, 3.0, "only the three damaged records were rewritten");
    for node in [1, 2] {
        let repairs = cluster.metric(node, "stemedb_antientropy_repairs_total{kind=\"buckets\",result=\"ok\"}").await?;
        assert_eq!(repairs.unwrap_or(0.0), 0.0, "healthy node {node} repaired nothing");
    }

    // Every acknowledged write reads back on the repaired node (its own replica: stale reads).
    for k in 0..4 {
        let path = format!("ae/claims{k}");
        let (status, body) = cluster
            .post(victim, "/v1/query", &json!({"concept_path": path, "lens": "history", "consistency": "stale"}))
            .await?;
        anyhow::ensure!(status == 200, "query {path} on node {victim}: {status} {body}");
        let values: BTreeSet<i64> = body["results"][0]["assertions"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["value"].as_i64()).collect())
            .unwrap_or_default();
        let expected: BTreeSet<i64> = written.iter().filter(|(p, _)| *p == path).map(|(_, v)| *v).collect();
        assert_eq!(values, expected, "node {victim} lost or changed acknowledged writes of {path}");
    }
    // And the replicas' full digests agree at the same applied index.
    for shard in 0..SHARDS {
        let digests = futures_join((1..=3).map(|n| {
            let path = format!("/cluster/shards/{shard}/digest");
            let cluster = &cluster;
            async move { cluster.admin_get(n, &path).await }
        }))
        .await;
        let seen: BTreeSet<(u64, String)> = digests
            .into_iter()
            .map(|d| d.map(|(_, b)| (b["applied_index"].as_u64().unwrap_or(0), b["digest"].to_string())))
            .collect::<Result<_, _>>()?;
        let indexes: BTreeSet<u64> = seen.iter().map(|(i, _)| *i).collect();
        if indexes.len() == 1 {
            assert_eq!(seen.len(), 1, "shard {shard}: replicas at the same index differ: {seen:?}");
        }
    }
    Ok(())
}

/// The sum over every series of a metric family in node `id`'s `/metrics`.
async fn metric_sum(cluster: &TestCluster, id: u64, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{}/metrics", cluster.node(id).api())).await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum())
}

/// Issue 16 §7: bit rot in a stopped node's table files (bytes flipped in every file, a run of
/// blocks zeroed) never keeps the node from starting. The damaged files are set aside at start,
/// the replicas that had keys in them are dropped and re-seeded from their peers (log and
/// state), and afterwards every replica agrees and every acknowledged write reads back on the
/// damaged node, which takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotten_table_files_never_take_the_node_down() -> anyhow::Result<()> {
    let mut cluster =
        TestCluster::start(ClusterOptions { nodes: 3, shards: SHARDS, env: fast_checks(), ..Default::default() })
            .await?;
    let written = write_claims(&cluster, "rot/claims", 400).await?;
    wait_sync(&cluster, 1, Duration::from_secs(30), "all shards agree", all_agree).await?;

    let victim = 3;
    // The newest check index of every shard before the damage: agreement must come from later ones.
    let (_, before) = cluster.admin_get(1, "/cluster/sync_status").await?;
    let checked_before: Vec<u64> =
        (0..SHARDS).map(|s| shard_entry(&before, s)["check_index"].as_u64().unwrap_or(0)).collect();
    cluster.terminate(victim, Duration::from_secs(20)).await?;
    let (files, bytes) = stemedb_cluster_tests::rot_table_files(&cluster.node(victim).data_dir, 24)?;
    eprintln!("damaged {files} table files ({bytes} bytes changed)");
    // It starts (before this change it exited: "raft group failed to start ... Corruption").
    let restarted = Instant::now();
    cluster.restart(victim).await?;
    let lost = metric_sum(&cluster, victim, "stemedb_storage_lost_files_total").await?;
    let dropped = metric_sum(&cluster, victim, "stemedb_damaged_replicas_total").await?;
    anyhow::ensure!(lost >= 1.0 && dropped >= 1.0, "lost files {lost}, dropped replicas {dropped}");
    let log = std::fs::read_to_string(cluster.node(victim).data_dir.with_extension("log"))?;
    anyhow::ensure!(
        log.contains("damaged table file set aside") && log.contains("replica damaged on disk"),
        "the log names the files and the shards"
    );

    // Re-seeded by its peers: every replica agrees again, as the damaged node itself sees it.
    let fresh = |body: &Value| {
        (0..SHARDS).all(|s| shard_entry(body, s)["check_index"].as_u64() > Some(checked_before[s as usize]))
    };
    // A fresh check of every shard now: without writes (or a leader change) no leader proposes
    // one by itself, and the wait below would see only the checks from before the kill.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let url = format!("{}/cluster/sync", cluster.node(1).admin());
        let sent = cluster.client.post(url).json(&json!({"target_node": victim, "force": true})).send().await?;
        if sent.status().is_success() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "POST /cluster/sync answered {}", sent.status());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_sync(&cluster, victim, Duration::from_secs(90), "every shard agreeing at a check after the re-seed", |b| {
        all_agree(b) && fresh(b)
    })
    .await?;
    eprintln!(
        "{lost} files set aside, {dropped} replica drops; every replica agrees {:.2} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    for k in 0..4 {
        let path = format!("rot/claims{k}");
        let expected: BTreeSet<i64> = written.iter().filter(|(p, _)| *p == path).map(|(_, v)| *v).collect();
        loop {
            let (status, body) = cluster
                .post(victim, "/v1/query", &json!({"concept_path": path, "lens": "history", "consistency": "stale"}))
                .await?;
            let values: BTreeSet<i64> = body["results"][0]["assertions"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x["value"].as_i64()).collect())
                .unwrap_or_default();
            if status == 200 && values == expected {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {victim} lost acknowledged writes of {path}: {status}, {} of {} values",
                values.len(),
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // And it takes writes again: a compaction over what was set aside cannot stop them.
    for i in 0..20 {
        cluster.assert_value(victim, &format!("rot/after{}", i % 4), json!(i)).await?;
    }
    Ok(())
}

/// Issue 16 §7, damage met while running: a running node's table files rot under it and a
/// manual compaction reads the damaged blocks. RocksDB stops the node's writes; the first Raft
/// append that fails stops the node (exit with an error, for systemd's `Restart=on-failure`);
/// started again, it sets the damaged files aside and is re-seeded by its peers, losing nothing
/// acknowledged. The rest of the cluster takes writes throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_met_while_running_heals_through_a_restart() -> anyhow::Result<()> {
    let mut cluster =
        TestCluster::start(ClusterOptions { nodes: 3, shards: SHARDS, env: fast_checks(), ..Default::default() })
            .await?;
    let mut written = write_claims(&cluster, "live/claims", 400).await?;
    wait_sync(&cluster, 1, Duration::from_secs(30), "all shards agree", all_agree).await?;
    let victim = 3;
    // Everything on disk first, then rot it under the running node.
    let compact = format!("{}/v1/admin/storage/compact", cluster.node(victim).api());
    let response = cluster.client.post(&compact).send().await?;
    anyhow::ensure!(response.status().as_u16() == 202, "compaction: {}", response.text().await?);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, stats) = cluster.get(victim, "/v1/admin/storage/stats").await?;
        let compaction = &stats["manual_compaction"];
        if compaction["running"] == json!(false) && compaction["last_finished_at_us"].is_u64() {
            anyhow::ensure!(compaction["last_error"].is_null(), "compaction failed: {compaction}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the compaction did not finish: {compaction}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (files, bytes) = stemedb_cluster_tests::rot_table_files(&cluster.node(victim).data_dir, 24)?;
    eprintln!("rotted {files} table files of running node {victim} ({bytes} bytes)");
    let _ = cluster.client.post(&compact).send().await?;
    // Writes go on through the other nodes; node 3 stops when its storage refuses a write.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0i64;
    let stopped_after = loop {
        let path = format!("live/after{}", i % 4);
        if cluster.assert_value(1 + (i as u64 % 2), &path, json!(1000 + i)).await.is_ok() {
            written.push((path, 1000 + i));
        }
        i += 1;
        if cluster.reap().contains(&victim) {
            break i;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {victim} neither stopped nor failed: {}",
            cluster.log_tail(victim, 5)
        );
    };
    let log = std::fs::read_to_string(cluster.node(victim).data_dir.with_extension("log"))?;
    anyhow::ensure!(log.contains("raft group stopped on a fatal error"), "node {victim} stopped without saying why");
    eprintln!("node {victim} stopped on its storage error after {stopped_after} writes");
    // Restarted (as systemd would), it heals by itself.
    let restarted = Instant::now();
    cluster.restart(victim).await?;
    let lost = metric_sum(&cluster, victim, "stemedb_storage_lost_files_total").await?;
    anyhow::ensure!(lost >= 1.0, "the restart set no damaged file aside");
    wait_sync(&cluster, victim, Duration::from_secs(90), "every shard agreeing after the re-seed", all_agree).await?;
    eprintln!(
        "{lost} files set aside; every replica agrees {:.2} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let paths: BTreeSet<String> = written.iter().map(|(p, _)| p.clone()).collect();
    for path in paths {
        let expected: BTreeSet<i64> = written.iter().filter(|(p, _)| *p == path).map(|(_, v)| *v).collect();
        loop {
            let (status, values) = stale_values(&cluster, victim, &path).await?;
            if status == 200 && expected.is_subset(&values) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "node {victim} lost acknowledged writes of {path}: {status}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

/// The values of `path`'s claims that node `via` answers with a stale (local) read.
async fn stale_values(cluster: &TestCluster, via: u64, path: &str) -> anyhow::Result<(u16, BTreeSet<i64>)> {
    let (status, body) = cluster
        .post(via, "/v1/query", &json!({"concept_path": path, "lens": "history", "consistency": "stale"}))
        .await?;
    let values = body["results"][0]["assertions"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["value"].as_i64()).collect())
        .unwrap_or_default();
    Ok((status, values))
}

/// Issue 16 §3: before a restarted node's replica is checked it neither serves nor leads. The
/// start-up scrub is held back (`testing.start_up_scrub_delay_ms`) on a node whose replica lost
/// records while it was stopped: meanwhile its stale reads still return every acknowledged
/// write (sent on to a checked replica, not served from the damaged one), a leader transfer to
/// it is refused, and `sync_status` shows the replica unchecked; then the scrub runs, repairs
/// it, and it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchecked_replica_neither_serves_nor_leads() -> anyhow::Result<()> {
    let mut cluster =
        TestCluster::start(ClusterOptions { nodes: 3, shards: SHARDS, env: fast_checks(), ..Default::default() })
            .await?;
    let written = write_claims(&cluster, "gate/claims", 120).await?;
    wait_sync(&cluster, 1, Duration::from_secs(30), "all shards agree", all_agree).await?;
    let expected =
        |path: &str| -> BTreeSet<i64> { written.iter().filter(|(p, _)| p == path).map(|(_, v)| *v).collect() };

    let victim = 3;
    let shard = cluster.shard_of("gate/claims0");
    cluster.terminate(victim, Duration::from_secs(20)).await?;
    {
        let storage = Storage::open(&cluster.node(victim).data_dir, StorageOptions::default())?;
        let records = assertion_records(&storage, shard);
        anyhow::ensure!(records.len() > 20, "shard {shard} holds {} records", records.len());
        let mut batch = WriteBatch::new();
        for (key, _) in records.iter().step_by(records.len() / 4).take(4) {
            batch.delete(ColumnFamily::StateMachine, key.clone());
        }
        storage.write(batch, Durability::Synced)?;
        storage.close()?;
    }
    let delay = Duration::from_secs(8);
    cluster.set_env("STEMEDB_TESTING_START_UP_SCRUB_DELAY_MS", Some(&delay.as_millis().to_string()));
    let restarted = Instant::now();
    cluster.restart(victim).await?;
    cluster.set_env("STEMEDB_TESTING_START_UP_SCRUB_DELAY_MS", None);

    // Unchecked: reported so, its reads served by a checked replica, and it does not lead.
    let (_, status) = cluster.admin_get(victim, "/cluster/sync_status").await?;
    assert_eq!(shard_entry(&status, shard)["checked"], json!(false), "{status}");
    for k in 0..4 {
        let path = format!("gate/claims{k}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (code, values) = stale_values(&cluster, victim, &path).await?;
            if code == 200 {
                assert_eq!(values, expected(&path), "unchecked node {victim} served its damaged replica of {path}");
                break;
            }
            // No leader known yet right after the restart: the read waits, then answers 503.
            anyhow::ensure!(Instant::now() < deadline, "stale read of {path} on node {victim}: {code}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (code, body) = {
        let url = format!("{}/admin/shards/{shard}/transfer-leader", cluster.node(1).admin());
        let response = reqwest::Client::new().post(url).json(&json!({"target_node": victim})).send().await?;
        (response.status().as_u16(), response.text().await?)
    };
    assert_ne!(code, 200, "a leader transfer to an unchecked replica succeeded: {body}");
    assert_ne!(cluster.leader_seen_by(1, shard).await, Some(victim), "unchecked node {victim} leads shard {shard}");
    let (_, status) = cluster.admin_get(victim, "/cluster/sync_status").await?;
    anyhow::ensure!(
        shard_entry(&status, shard)["checked"] == json!(false) && restarted.elapsed() < delay,
        "the checks above ran past the start-up scrub's delay ({:.1} s): they proved nothing",
        restarted.elapsed().as_secs_f64()
    );
    eprintln!("unchecked window observed for {:.2} s after the restart", restarted.elapsed().as_secs_f64());

    // Then the scrub finds the lost records, the replica is repaired, checked, and serves.
    wait_sync(&cluster, victim, Duration::from_secs(60), "repaired, checked and agreeing", |body| {
        let entry = shard_entry(body, shard);
        all_agree(body) && entry["checked"] == json!(true) && entry["repairs"].as_u64() >= Some(1)
    })
    .await?;
    for k in 0..4 {
        let path = format!("gate/claims{k}");
        let (code, values) = stale_values(&cluster, victim, &path).await?;
        assert_eq!((code, values), (200, expected(&path)), "node {victim} after its repair, {path}");
    }
    Ok(())
}

/// Writes through nodes 1 and 2 (two sequential clients) for `length`; halfway through, runs
/// `middle` beside them. Returns the writes made and what `middle` returned.
async fn load_phase<T>(
    cluster: &TestCluster,
    length: Duration,
    middle: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(u64, T)> {
    let until = Instant::now() + length;
    let writer = |client: u64| async move {
        let mut i = 0u64;
        while Instant::now() < until {
            let node = 1 + (client + i) % 2;
            cluster.assert_value(node, &format!("fp/load{}", i % 8), json!(i)).await?;
            i += 1;
        }
        anyhow::Ok(i)
    };
    let middle = async {
        tokio::time::sleep(length / 2).await;
        middle.await
    };
    let (a, b, middle) = tokio::join!(writer(0), writer(1), middle);
    Ok((a? + b?, middle?))
}

/// Moves the leadership of `shard` from its leader to another of nodes 1 and 2; the answer's status.
async fn transfer_leader(cluster: &TestCluster, shard: u16) -> anyhow::Result<u16> {
    let leader = cluster.wait_for_leader(shard, Duration::from_secs(10)).await?;
    let target = if leader == 1 { 2 } else { 1 };
    let response = cluster
        .client
        .post(format!("{}/admin/shards/{shard}/transfer-leader", cluster.node(leader).admin()))
        .json(&json!({"target_node": target}))
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// Issue 16, zero false positives: checks every second and scrubs every 2 s for
/// `FALSE_ALARM_RUN_SECONDS` (20 s by default; `scripts/anti-entropy-long.sh` runs 300) under a
/// write load, with two leader changes and a snapshot install in the middle: node 3 is killed
/// while the shards take a snapshot every 100 entries and drop the log it lacks, and it catches
/// up by snapshot when it returns. No check and no scrub may find a mismatch, and nothing may be
/// repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_under_load_leader_changes_and_a_snapshot_install_raise_no_false_alarm() -> anyhow::Result<()> {
    let mut env = fast_checks();
    env.push(("STEMEDB_RAFT_SNAPSHOT_LOGS_SINCE_LAST".into(), "100".into()));
    env.push(("STEMEDB_RAFT_LOGS_TO_KEEP_AFTER_SNAPSHOT".into(), "10".into()));
    let mut cluster =
        TestCluster::start(ClusterOptions { nodes: 3, shards: SHARDS, env, ..Default::default() }).await?;
    let seconds: u64 = std::env::var("FALSE_ALARM_RUN_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20).max(8);
    let run = Duration::from_secs(seconds);
    let started = Instant::now();
    let (before, first) = load_phase(&cluster, run / 4, transfer_leader(&cluster, 0)).await?;
    cluster.kill(3);
    let (while_down, ()) = load_phase(&cluster, run / 4, async { Ok(()) }).await?;
    cluster.restart(3).await?;
    let (after, second) = load_phase(&cluster, run / 2, transfer_leader(&cluster, 1)).await?;
    eprintln!(
        "{} writes in {:.1} s ({while_down} while node 3 was down); leader transfers answered {first} and {second}",
        before + while_down + after,
        started.elapsed().as_secs_f64()
    );
    let installed = cluster.metric(3, "stemedb_raft_snapshots_total{event=\"installed\"}").await?.unwrap_or(0.0);
    assert!(installed >= 1.0, "node 3 caught up without a snapshot install: the run did not test one");
    wait_sync(&cluster, 1, Duration::from_secs(30), "all shards agree after the load", all_agree).await?;
    let mut agreed = 0.0;
    for node in 1..=3 {
        let checks = cluster.metric(node, "stemedb_antientropy_checks_total{result=\"mismatch\"}").await?;
        assert_eq!(checks.unwrap_or(0.0), 0.0, "node {node}: a check raised a false alarm");
        let scrubs = cluster.metric(node, "stemedb_antientropy_scrubs_total{result=\"mismatch\"}").await?;
        assert_eq!(scrubs.unwrap_or(0.0), 0.0, "node {node}: a scrub raised a false alarm");
        let unreadable = cluster.metric(node, "stemedb_antientropy_scrubs_total{result=\"unreadable\"}").await?;
        assert_eq!(unreadable.unwrap_or(0.0), 0.0, "node {node}: a scrub found healthy storage unreadable");
        let repairs = cluster.metric(node, "stemedb_antientropy_repaired_keys_total").await?;
        assert_eq!(repairs.unwrap_or(0.0), 0.0, "node {node} repaired a healthy replica");
        agreed += cluster.metric(node, "stemedb_antientropy_checks_total{result=\"agree\"}").await?.unwrap_or(0.0);
    }
    eprintln!("node 3 installed {installed} snapshots; {agreed} checks agreed, none mismatched");
    assert!(agreed >= 10.0, "only {agreed} checks agreed in {run:?} of checks every second");
    Ok(())
}

/// Loads `total` assertions (256-byte values) through node 1 in batches of 1000.
async fn load(cluster: &TestCluster, total: usize) -> anyhow::Result<()> {
    let value = "x".repeat(256);
    for batch in 0..total.div_ceil(1000) {
        let items: Vec<Value> = (0..1000.min(total - batch * 1000))
            .map(|i| {
                let n = batch * 1000 + i;
                // Many agents: one agent's writes past circuit_breaker.max_writes_per_sec trip it.
                json!({"concept_path": format!("bench/c{}", n % 5000), "predicate": "p", "value": format!("{value}{i}"), "agent_id": format!("bench-{}", n % 500)})
            })
            .collect();
        let (status, body) = cluster.post(1, "/v1/assert/batch", &json!({"assertions": items})).await?;
        anyhow::ensure!(status == 200 && body["rejected"] == 0, "batch {batch}: {status} {}", body["results"][0]);
    }
    Ok(())
}

/// p50/p99/p999 (ms) and throughput of single writes by `clients` clients for `seconds`.
async fn write_latencies(cluster: &TestCluster, clients: usize, seconds: u64) -> anyhow::Result<(f64, f64, f64, f64)> {
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks = (0..clients).map(|c| async move {
        let mut samples = Vec::new();
        let mut i = 0u64;
        while Instant::now() < until {
            let body = json!({"concept_path": format!("lat/c{c}"), "predicate": "p", "value": i, "agent_id": "lat"});
            let t = Instant::now();
            let (status, _) = cluster.post(1 + (c as u64 % 3), "/v1/assert", &body).await?;
            if status == 201 {
                samples.push(t.elapsed().as_secs_f64() * 1e3);
            }
            i += 1;
        }
        anyhow::Ok(samples)
    });
    let mut all = Vec::new();
    for samples in futures_all(tasks).await {
        all.extend(samples?);
    }
    all.sort_by(|a, b| a.total_cmp(b));
    let at =
        |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0.0);
    Ok((all.len() as f64 / started.elapsed().as_secs_f64(), at(0.5), at(0.99), at(0.999)))
}

/// Runs futures concurrently on the current task.
async fn futures_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut futures: Vec<Option<std::pin::Pin<Box<F>>>> = futures.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, slot) in futures.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(out) => {
                        outputs[i] = Some(out);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("every future finished")).collect()
}

/// Damages `per_mille`‰ of node `id`'s assertion records (each changed in its last byte)
/// while it is stopped; returns how many.
async fn damage_share(
    cluster: &mut TestCluster,
    id: u64,
    shards: u16,
    per_mille: usize,
) -> anyhow::Result<(usize, Instant)> {
    cluster.terminate(id, Duration::from_secs(30)).await?;
    let storage = Storage::open(&cluster.node(id).data_dir, StorageOptions::default())?;
    let mut batch = WriteBatch::new();
    let mut damaged = 0;
    for shard in 0..shards {
        for (n, (key, mut value)) in assertion_records(&storage, shard).into_iter().enumerate() {
            if n % 1000 < per_mille {
                let last = value.len() - 1;
                value[last] ^= 0x5a;
                batch.put(ColumnFamily::StateMachine, key, value);
                damaged += 1;
            }
        }
    }
    storage.write(batch, Durability::Synced)?;
    storage.close()?;
    drop(storage);
    let restarted = Instant::now();
    cluster.restart(id).await?;
    Ok((damaged, restarted))
}

/// The anti-entropy benchmark of issue 16 (docs/performance.md): run with
/// `cargo test --release -p stemedb-cluster-tests --test t65_anti_entropy -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_anti_entropy() -> anyhow::Result<()> {
    const BENCH_SHARDS: u16 = 16;
    let total: usize = std::env::var("AE_BENCH_ASSERTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let mut cluster =
        TestCluster::start(ClusterOptions { nodes: 3, shards: BENCH_SHARDS, ..Default::default() }).await?;
    let loaded = Instant::now();
    load(&cluster, total).await?;
    println!("loaded {total} assertions in {:.1} s", loaded.elapsed().as_secs_f64());
    wait_sync(&cluster, 3, Duration::from_secs(120), "all agree", all_agree).await?;
    let memory = cluster.metric(3, "stemedb_antientropy_digest_memory_bytes").await?.unwrap_or(0.0);
    let replicas = BENCH_SHARDS as f64 + 1.0;
    println!(
        "digest memory: {memory:.0} bytes on node 3 for {replicas} replicas = {:.1} KiB per replica",
        memory / replicas / 1024.0
    );

    // One damaged record (one bucket) of shard 0.
    cluster.terminate(3, Duration::from_secs(30)).await?;
    {
        let storage = Storage::open(&cluster.node(3).data_dir, StorageOptions::default())?;
        let (key, mut value) = assertion_records(&storage, 0).into_iter().next().expect("a record");
        let last = value.len() - 1;
        value[last] ^= 0x5a;
        let mut batch = WriteBatch::new();
        batch.put(ColumnFamily::StateMachine, key, value);
        storage.write(batch, Durability::Synced)?;
        storage.close()?;
    }
    let restarted = Instant::now();
    cluster.restart(3).await?;
    let up = restarted.elapsed();
    let body = wait_sync(&cluster, 3, Duration::from_secs(60), "shard 0 repaired", |b| {
        shard_entry(b, 0)["repairs"].as_u64() >= Some(1)
    })
    .await?;
    let repair = shard_entry(&body, 0)["last_repair"].clone();
    println!(
        "one damaged bucket: node API up after {:.2} s, repaired {:.2} s after the restart began; repair took {:.1} ms ({} bucket, {} written, cause {})",
        up.as_secs_f64(),
        restarted.elapsed().as_secs_f64(),
        repair["duration_ms"].as_f64().unwrap_or(0.0),
        repair["buckets"],
        repair["written"],
        repair["cause"]
    );

    // 1% of every replica's records damaged.
    let (damaged, restarted) = damage_share(&mut cluster, 3, BENCH_SHARDS, 10).await?;
    let up = restarted.elapsed();
    let body = wait_sync(&cluster, 3, Duration::from_secs(120), "every shard repaired", |b| {
        (0..BENCH_SHARDS).all(|s| shard_entry(b, s)["repairs"].as_u64() >= Some(1)) && b["summary"]["suspect"] == 0
    })
    .await?;
    let slowest = (0..BENCH_SHARDS)
        .map(|s| shard_entry(&body, s)["last_repair"]["duration_ms"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    let written: u64 =
        (0..BENCH_SHARDS).map(|s| shard_entry(&body, s)["last_repair"]["written"].as_u64().unwrap_or(0)).sum();
    let buckets: u64 =
        (0..BENCH_SHARDS).map(|s| shard_entry(&body, s)["last_repair"]["buckets"].as_u64().unwrap_or(0)).sum();
    println!(
        "1% damaged ({damaged} records over {BENCH_SHARDS} shards): API up after {:.2} s, all repaired {:.2} s after the restart began; slowest shard repair {slowest:.1} ms; {buckets} buckets copied, {written} records written",
        up.as_secs_f64(),
        restarted.elapsed().as_secs_f64()
    );
    drop(cluster);

    // Added write latency: checks every 10 s (the default) against anti-entropy off.
    for (name, enabled) in [("anti-entropy off", "false"), ("checks every 10 s", "true")] {
        let env = vec![("STEMEDB_ANTI_ENTROPY_ENABLED".to_string(), enabled.to_string())];
        let cluster =
            TestCluster::start(ClusterOptions { nodes: 3, shards: BENCH_SHARDS, env, ..Default::default() }).await?;
        let (rate, p50, p99, p999) = write_latencies(&cluster, 16, 30).await?;
        println!("{name}: {rate:.0} writes/s, p50 {p50:.2} ms, p99 {p99:.2} ms, p999 {p999:.2} ms (16 clients, 30 s)");
    }
    Ok(())
}
