//! The nemesis: injects one fault at a time into the cluster, holds it, heals it, and records
//! what it did and when. Faults: process crashes (kill -9) and pauses (SIGSTOP), network
//! partitions through the link proxies (isolate a shard leader, majority/minority, bridge,
//! ring), slow, lossy and blackholed links, leader transfers in a loop, a node added and
//! removed under load, a node restarted with its data dir wiped, and a stopped node's replica
//! damaged (a record changed, another deleted) before it restarts, which anti-entropy must
//! find and repair by itself (the run's replica check then sees every replica equal).
//!
//! Faults come in rounds: every kind of the scenario once, in an order the seed shuffles, before
//! any kind repeats, so a run long enough for one round exercises every fault it names. The
//! partition faults that cut one node off from the majority also run the stale-read probe
//! (see `probe.rs`) when it is enabled.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::Serialize;
use serde_json::json;
use stemedb_cluster_tests::{LinkFault, TestCluster};

use crate::probe::{Prepared, Probe};
use crate::workload::Targets;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    Kill,
    Pause,
    PartitionLeader,
    MajorityMinority,
    Bridge,
    Ring,
    SlowLinks,
    LossyLinks,
    Blackhole,
    TransferLeader,
    Membership,
    Wipe,
    DiskFull,
    Corrupt,
    Rot,
}

impl FaultKind {
    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    }
}

/// One injected fault.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: FaultKind,
    /// Seconds since the run started.
    pub at_s: f64,
    pub healed_at_s: Option<f64>,
    pub detail: String,
    /// The nodes the fault hit: killed, paused, wiped, given bad links or a full disk, or cut
    /// off from the majority. Requests through the other nodes are the ones that should not
    /// notice more than a leader election (the failover measurement).
    pub nodes: Vec<u64>,
}

/// The nemesis's state over one run.
pub struct Nemesis<'a> {
    pub cluster: &'a mut TestCluster,
    pub targets: Targets,
    pub rng: StdRng,
    pub started: Instant,
    pub records: Vec<FaultRecord>,
    shards: u16,
    /// Nodes whose data dir is a small filesystem of its own (for disk-full faults).
    pub small_disks: Vec<u64>,
    /// Nodes that exited by themselves (crashed) during the run.
    pub crashed: Vec<u64>,
    /// Nodes a membership fault decommissioned (they stay down).
    removed: Vec<u64>,
    /// The fault kinds left in the current round.
    round: Vec<FaultKind>,
    /// Runs around partitions that cut a node off, when set.
    pub probe: Option<Probe>,
    /// When the fault being injected took effect, if not when its injection began.
    took_effect_s: Option<f64>,
}

impl<'a> Nemesis<'a> {
    pub fn new(cluster: &'a mut TestCluster, targets: Targets, rng: StdRng, started: Instant, shards: u16) -> Self {
        Nemesis {
            cluster,
            targets,
            rng,
            started,
            records: Vec::new(),
            shards,
            small_disks: Vec::new(),
            crashed: Vec::new(),
            removed: Vec::new(),
            round: Vec::new(),
            probe: None,
            took_effect_s: None,
        }
    }

    /// The next fault kind: the rest of the current round, or a new round, shuffled.
    fn next_kind(&mut self, kinds: &[FaultKind]) -> FaultKind {
        if self.round.is_empty() {
            self.round = kinds.to_vec();
            self.round.shuffle(&mut self.rng);
            // Popped from the end: reverse so the round runs in the shuffled order as printed.
            self.round.reverse();
        }
        self.round.pop().unwrap_or(kinds[0])
    }

    fn now_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn node_ids(&self) -> Vec<u64> {
        self.cluster.nodes.keys().copied().collect()
    }

    fn random_running(&mut self) -> Option<u64> {
        let running = self.cluster.running();
        running.choose(&mut self.rng).copied()
    }

    fn set_target(&self, id: u64, present: bool) {
        if let Ok(mut targets) = self.targets.write() {
            if present {
                targets.insert(id, self.cluster.node(id).api());
            } else {
                targets.remove(&id);
            }
        }
    }

    /// Runs faults from `kinds` until `deadline`: a quiet gap, a fault held for a few seconds,
    /// its heal.
    pub async fn run(&mut self, kinds: &[FaultKind], deadline: Instant) {
        while Instant::now() + Duration::from_secs(4) < deadline && !kinds.is_empty() {
            let quiet = Duration::from_millis(self.rng.random_range(1000..3000));
            tokio::time::sleep(quiet.min(deadline.saturating_duration_since(Instant::now()))).await;
            let kind = self.next_kind(kinds);
            let hold = Duration::from_millis(self.rng.random_range(3000..8000));
            let hold_until = (Instant::now() + hold).min(deadline);
            let chosen_s = self.now_s();
            let probes_before = self.probe.as_ref().map_or(0, |p| p.records.len());
            self.took_effect_s = None;
            let (mut detail, nodes) = self.inject(kind, hold_until).await;
            // A fault with a probe takes effect after the probe's first write, not when chosen.
            let at_s = self.took_effect_s.take().unwrap_or(chosen_s);
            if let Some(probe) = self.probe.as_ref().and_then(|p| p.records.get(probes_before)) {
                detail.push_str(&format!("; probe on shard {}: {} ({})", probe.shard, probe.result, probe.detail));
            }
            println!("[{at_s:7.1}s] fault {}: {detail}", kind.name());
            tokio::time::sleep(hold_until.saturating_duration_since(Instant::now())).await;
            self.heal(kind).await;
            let healed_at_s = self.now_s();
            println!("[{healed_at_s:7.1}s] healed {}", kind.name());
            self.records.push(FaultRecord { kind, at_s, healed_at_s: Some(healed_at_s), detail, nodes });
        }
    }

    /// Injects one fault; returns what it did and the nodes it hit.
    async fn inject(&mut self, kind: FaultKind, hold_until: Instant) -> (String, Vec<u64>) {
        let none = |detail: &str| (detail.to_string(), Vec::new());
        let ids = self.node_ids();
        match kind {
            FaultKind::Kill => {
                // Never more than a minority down at once: one fault at a time, so one node.
                let Some(id) = self.random_running() else { return none("no running node") };
                self.cluster.kill(id);
                self.set_target(id, false);
                (format!("killed node {id}"), vec![id])
            }
            FaultKind::Pause => {
                let Some(id) = self.random_running() else { return none("no running node") };
                self.cluster.pause(id);
                (format!("paused node {id}"), vec![id])
            }
            FaultKind::PartitionLeader => {
                let shard = self.rng.random_range(0..self.shards);
                // Right after a heal the shard may still be electing: wait for a leader.
                let leader = self.wait_leader_of(shard, Duration::from_secs(10)).await;
                match leader {
                    Some(leader) => {
                        let prepared = self.probe_prepare(kind, shard, leader).await;
                        self.took_effect_s = Some(self.now_s());
                        self.cluster.isolate(leader);
                        let majority: Vec<u64> = ids.iter().copied().filter(|id| *id != leader).collect();
                        self.probe_finish(prepared, &majority).await;
                        (format!("isolated node {leader}, leader of shard {shard}"), vec![leader])
                    }
                    None => none("no leader found"),
                }
            }
            FaultKind::MajorityMinority => {
                let mut shuffled = ids.clone();
                shuffled.shuffle(&mut self.rng);
                let (minority, majority) = shuffled.split_at(ids.len() / 2);
                // The probe reads through one minority node, on a shard it hosts.
                let mut prepared = None;
                if let Some(cut) = minority.first().copied() {
                    if let Some(shard) = self.random_hosted_shard(cut).await {
                        prepared = self.probe_prepare(kind, shard, cut).await;
                    }
                }
                self.took_effect_s = Some(self.now_s());
                self.cluster.partition(minority, majority);
                self.probe_finish(prepared, majority).await;
                (format!("split {minority:?} | {majority:?}"), minority.to_vec())
            }
            FaultKind::Bridge => {
                let mut shuffled = ids.clone();
                shuffled.shuffle(&mut self.rng);
                let bridge = shuffled[0];
                let rest = &shuffled[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                self.cluster.partition(a, b);
                // Each half still reaches a majority through the bridge: no node is cut off.
                (format!("bridge {bridge} between {a:?} and {b:?}"), Vec::new())
            }
            FaultKind::Ring => {
                let mut ring = ids.clone();
                ring.shuffle(&mut self.rng);
                let n = ring.len();
                for i in 0..n {
                    for j in 0..n {
                        let neighbours = (i + 1) % n == j || (j + 1) % n == i || i == j;
                        if !neighbours {
                            self.cluster.set_link_fault(ring[i], ring[j], LinkFault::Block);
                        }
                    }
                }
                // Each node still reaches a majority (itself and two neighbours of 3 to 5 nodes).
                (format!("ring {ring:?} (each node reaches only its neighbours)"), Vec::new())
            }
            FaultKind::SlowLinks | FaultKind::LossyLinks | FaultKind::Blackhole => {
                let Some(id) = ids.choose(&mut self.rng).copied() else { return none("") };
                let fault = match kind {
                    FaultKind::SlowLinks => LinkFault::Delay { base_ms: 100, jitter_ms: 80 },
                    FaultKind::LossyLinks => LinkFault::Lossy { per_mille: 30, delay_ms: 5 },
                    _ => LinkFault::Blackhole,
                };
                for (from, to) in self.cluster.links() {
                    if from == id || to == id {
                        self.cluster.set_link_fault(from, to, fault);
                    }
                }
                (format!("links of node {id}: {fault:?}"), vec![id])
            }
            FaultKind::TransferLeader => {
                let mut transfers = 0;
                while Instant::now() < hold_until {
                    let shard = self.rng.random_range(0..self.shards);
                    if let Some(leader) = self.leader_of(shard).await {
                        let others: Vec<u64> = self.cluster.running().into_iter().filter(|id| *id != leader).collect();
                        if let Some(target) = others.choose(&mut self.rng).copied() {
                            let url =
                                format!("{}/admin/shards/{shard}/transfer-leader", self.cluster.node(leader).admin());
                            let request = self.cluster.client.post(url).json(&json!({"target_node": target}));
                            if request.send().await.is_ok() {
                                transfers += 1;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                none(&format!("{transfers} leader transfers requested"))
            }
            FaultKind::Membership => {
                let Some(via) = self.random_running() else { return none("no running node") };
                match self.cluster.add_joining_node(via).await {
                    Ok(id) => {
                        self.set_target(id, true);
                        none(&format!("added node {id} through node {via}"))
                    }
                    Err(error) => none(&format!("adding a node failed: {error}")),
                }
            }
            FaultKind::DiskFull => {
                let Some(id) = self.small_disks.choose(&mut self.rng).copied() else {
                    return none("no node has a small disk (mounting one needs root); skipped");
                };
                let ballast = self.cluster.node(id).data_dir.join("ballast");
                let written = fill(&ballast);
                (format!("filled node {id}'s disk ({} MiB of ballast)", written >> 20), vec![id])
            }
            FaultKind::Corrupt => {
                let Some(id) = self.random_running() else { return none("no running node") };
                let Some(shard) = self.random_hosted_shard(id).await else {
                    return none(&format!("node {id} hosts no shard"));
                };
                self.set_target(id, false);
                let pick = self.rng.random_range(0..1_000_000u64);
                let done = self.cluster.damage_records(id, shard, pick).await;
                self.set_target(id, true);
                match done {
                    Ok(detail) => (detail, vec![id]),
                    Err(error) => (format!("damaging node {id} failed: {error}"), vec![id]),
                }
            }
            FaultKind::Rot => {
                let Some(id) = self.random_running() else { return none("no running node") };
                self.set_target(id, false);
                let ranges = self.rng.random_range(4..32usize);
                let done = self.cluster.rot_tables(id, ranges).await;
                self.set_target(id, true);
                match done {
                    Ok(detail) => (detail, vec![id]),
                    Err(error) => (format!("rotting node {id}'s table files failed: {error}"), vec![id]),
                }
            }
            FaultKind::Wipe => {
                let Some(id) = self.random_running() else { return none("no running node") };
                let Some(via) = self.cluster.running().into_iter().find(|other| *other != id) else {
                    return none("no other node");
                };
                self.set_target(id, false);
                // What the other replicas have applied now: the wiped node must get there.
                let targets = self.applied_elsewhere(id).await;
                match self.cluster.wipe_and_rejoin(id, via).await {
                    Ok(()) => {
                        self.set_target(id, true);
                        // One disk lost at a time: losing a second replica before the first has
                        // been rebuilt loses a majority's data, which no RF-3 system survives.
                        let started = Instant::now();
                        let caught_up = self.wait_caught_up(id, &targets, Duration::from_secs(120)).await;
                        let detail = format!(
                            "wiped node {id} and rejoined it through node {via}; {} after {:.1} s",
                            if caught_up { "caught up" } else { "NOT caught up" },
                            started.elapsed().as_secs_f64()
                        );
                        (detail, vec![id])
                    }
                    Err(error) => (format!("wiping node {id} failed: {error}"), vec![id]),
                }
            }
        }
    }

    /// The probe's step before a fault that cuts `node` off (nothing without a probe).
    async fn probe_prepare(&mut self, fault: FaultKind, shard: u16, node: u64) -> Option<Prepared> {
        self.probe.as_mut()?.prepare(self.cluster, fault, shard, node).await
    }

    /// The probe's steps once the node is cut off: a write through a random node of `majority`,
    /// then the read through the cut-off node.
    async fn probe_finish(&mut self, prepared: Option<Prepared>, majority: &[u64]) {
        let (Some(prepared), Some(probe)) = (prepared, self.probe.as_mut()) else { return };
        if let Some(via) = majority.choose(&mut self.rng).copied() {
            probe.finish(self.cluster, prepared, via).await;
        }
    }

    /// A random shard that `node` hosts (as `node` sees it), if any.
    async fn random_hosted_shard(&mut self, node: u64) -> Option<u16> {
        let mut shards: Vec<u16> = (0..self.shards).collect();
        shards.shuffle(&mut self.rng);
        for shard in shards {
            if let Some((true, _)) = self.cluster.shard_view(node, shard).await {
                return Some(shard);
            }
        }
        None
    }

    async fn heal(&mut self, kind: FaultKind) {
        match kind {
            FaultKind::Kill => self.heal_all().await,
            FaultKind::Membership => {
                // Remove the newest joined node again (its replicas move away first).
                let newest = self
                    .cluster
                    .nodes
                    .values()
                    .filter(|n| n.join_via.is_some() && !self.removed.contains(&n.id))
                    .map(|n| n.id)
                    .max();
                if let Some(id) = newest {
                    if let Some(via) = self.cluster.running().into_iter().find(|other| *other != id) {
                        let removed = matches!(self.cluster.decommission(via, id).await, Ok((200, _)));
                        if removed {
                            self.set_target(id, false);
                            self.cluster.kill(id);
                            self.removed.push(id);
                        }
                    }
                }
            }
            _ => self.heal_all().await,
        }
    }

    /// Every fault undone: links pass, paused nodes continue, killed nodes restart.
    pub async fn heal_all(&mut self) {
        for id in self.small_disks.clone() {
            let _ = std::fs::remove_file(self.cluster.node(id).data_dir.join("ballast"));
        }
        for id in self.cluster.reap() {
            println!("[{:7.1}s] node {id} had exited by itself", self.now_s());
            self.crashed.push(id);
        }
        for (from, to) in self.cluster.links() {
            self.cluster.set_link_fault(from, to, LinkFault::Pass);
        }
        for id in self.node_ids() {
            let node = self.cluster.node(id);
            if node.is_paused() {
                self.cluster.resume(id);
            }
        }
        for id in self.node_ids() {
            let node = self.cluster.node(id);
            // Nodes a membership fault removed stay down; every other node comes back (a joined
            // node whose removal failed is still a member and holds replicas).
            if !node.is_running() && !self.removed.contains(&id) {
                if let Err(error) = self.cluster.restart(id).await {
                    println!("restarting node {id} failed: {error}");
                }
                self.set_target(id, true);
            }
        }
    }

    /// For each shard, the highest applied index among the running nodes other than `id`.
    async fn applied_elsewhere(&self, id: u64) -> Vec<(u16, u64)> {
        let mut targets = Vec::new();
        for shard in 0..self.shards {
            let mut best = 0;
            for via in self.cluster.running().into_iter().filter(|n| *n != id) {
                if let Ok((200, body)) = self.cluster.admin_get(via, &format!("/cluster/shards/{shard}/digest")).await {
                    best = best.max(body["applied_index"].as_u64().unwrap_or(0));
                }
            }
            targets.push((shard, best));
        }
        targets
    }

    /// Waits until node `id` serves every shard it holds at or beyond `targets`' applied indexes.
    async fn wait_caught_up(&self, id: u64, targets: &[(u16, u64)], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        // The placement as a node that was not wiped knows it (the wiped one may not have its
        // metadata back yet, and an empty placement would make this wait vacuous).
        let reference = self.cluster.running().into_iter().find(|n| *n != id).unwrap_or(id);
        let placed: Vec<u16> = match self.cluster.admin_get(reference, "/cluster/meta").await {
            Ok((200, meta)) => (0..self.shards)
                .filter(|s| {
                    meta["placement"][s.to_string()]
                        .as_array()
                        .is_some_and(|r| r.iter().any(|n| n.as_u64() == Some(id)))
                })
                .collect(),
            _ => (0..self.shards).collect(),
        };
        loop {
            let mut done = true;
            for (shard, target) in targets.iter().filter(|(s, _)| placed.contains(s)) {
                let applied = match self.cluster.admin_get(id, &format!("/cluster/shards/{shard}/digest")).await {
                    Ok((200, body)) => body["applied_index"].as_u64().unwrap_or(0),
                    _ => 0,
                };
                if applied < *target {
                    done = false;
                    break;
                }
            }
            if done {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// [`Nemesis::leader_of`], asked again every 100 ms until `timeout`.
    async fn wait_leader_of(&self, shard: u16, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let leader = self.leader_of(shard).await;
            if leader.is_some() || Instant::now() > deadline {
                return leader;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn leader_of(&self, shard: u16) -> Option<u64> {
        for id in self.cluster.running() {
            if let Some((true, Some(leader))) = self.cluster.shard_view(id, shard).await {
                return Some(leader);
            }
        }
        None
    }
}

/// Writes zeros to `path` until the filesystem is full; returns the bytes written.
fn fill(path: &std::path::Path) -> u64 {
    use std::io::Write;
    let Ok(mut file) = std::fs::File::create(path) else { return 0 };
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    while file.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    let _ = file.sync_all();
    written
}
