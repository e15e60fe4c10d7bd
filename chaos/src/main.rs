//! `stemedb-chaos`: list the scenarios, or run one against a fresh cluster of `stemedb`
//! processes and report. Exits 0 only when no anomaly was found.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use stemedb_chaos::run::{run, summary, RunOptions};
use stemedb_chaos::scenario::{self, SCENARIOS};

#[derive(Parser)]
#[command(name = "stemedb-chaos", about = "Fault injection and correctness checks for StemeDB clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Names and describes the scenarios.
    List,
    /// Runs one scenario and checks the histories.
    Run {
        #[arg(long, default_value = "smoke")]
        scenario: String,
        /// Seconds of workload under faults.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Nodes (default: the scenario's).
        #[arg(long)]
        nodes: Option<u64>,
        #[arg(long, default_value_t = 8)]
        shards: u16,
        /// Seed of the nemesis and the workloads (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Register clients.
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// Set-workload clients.
        #[arg(long, default_value_t = 2)]
        set_clients: u32,
        /// Unkeyed-set clients: writes without a request_id, each sent once (default: the
        /// scenario's; 0 turns the workload off).
        #[arg(long)]
        unkeyed_clients: Option<u32>,
        /// Register keys, and keys of the unkeyed set.
        #[arg(long, default_value_t = 4)]
        keys: u32,
        #[command(flatten)]
        io: RunIo,
        /// Plant a bug in the nodes to prove the checkers catch it: `stale-reads` (linearizable
        /// reads served from the local replica without a read barrier) or `no-anti-entropy`
        /// (damaged replicas never repaired: the `corrupt` scenario must fail).
        #[arg(long)]
        plant_bug: Option<String>,
        /// Run the nodes' transport (18182) with mutual TLS: a CA and a node certificate are
        /// made for the run (`cluster.tls_*`).
        #[arg(long)]
        mutual_tls: bool,
        /// Replicas per shard (`cluster.replication_factor`; default: the node's, 3). With 5,
        /// a leader can be elected without an entry that one follower still holds, which a
        /// later leader may commit: the case where a lost leader's own writes must not be
        /// proposed again.
        #[arg(long)]
        replication_factor: Option<u16>,
        /// Build each group's snapshot every N log entries (`raft.snapshot_logs_since_last`,
        /// default 20,000) and keep N/4 after it (`raft.logs_to_keep_after_snapshot`): builds
        /// then run beside applies, installs and replica moves all through the run, and a node
        /// back from a fault catches up by snapshot rather than by log.
        #[arg(long)]
        snapshot_every: Option<u64>,
    },
    /// The disaster-recovery drill: writes, a backup at a random moment, every node's data
    /// destroyed at a later one, a new cluster restored from the backup; checks what came back
    /// and measures RPO and RTO.
    DrDrill {
        /// Seconds from the first write to the destruction.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        #[arg(long, default_value_t = 8)]
        shards: u16,
        #[arg(long)]
        seed: Option<u64>,
        /// Writing clients.
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// Continuous log archival's interval (`backup.archive_interval_ms`) on the cluster.
        #[arg(long, default_value_t = 1000)]
        archive_interval_ms: u64,
        /// Run without log archival: the restore brings back the backup alone.
        #[arg(long)]
        no_archive: bool,
        #[command(flatten)]
        io: RunIo,
    },
}

/// Where a run's binary, data and report are.
#[derive(clap::Args)]
struct RunIo {
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The stemedb binary (default: the one next to this executable).
    #[arg(long)]
    stemedb: Option<PathBuf>,
    /// Keep data dirs, node logs (and a drill's backup store) here (default: a temporary
    /// directory, removed).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn stemedb_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let stemedb = match given {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("stemedb"),
    };
    anyhow::ensure!(stemedb.exists(), "no stemedb binary at {} (build it, or pass --stemedb)", stemedb.display());
    Ok(stemedb)
}

fn seed_or_clock(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::List => {
            for scenario in SCENARIOS {
                let faults: Vec<String> = scenario.faults.iter().map(|f| f.name()).collect();
                println!("{:<12} {} nodes  {}", scenario.name, scenario.default_nodes, scenario.description);
                if scenario.unkeyed_clients > 0 {
                    println!("{:<12}          + {} unkeyed-set clients", "", scenario.unkeyed_clients);
                }
                println!("{:<12}          faults: {}", "", faults.join(", "));
            }
            Ok(())
        }
        Command::Run {
            scenario,
            duration,
            nodes,
            shards,
            seed,
            clients,
            set_clients,
            unkeyed_clients,
            keys,
            io: RunIo { report, stemedb, data_dir },
            plant_bug,
            mutual_tls,
            replication_factor,
            snapshot_every,
        } => {
            let scenario = scenario::find(&scenario).with_context(|| {
                let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
                format!("no scenario {scenario:?}; scenarios: {}", names.join(", "))
            })?;
            let stemedb = stemedb_binary(stemedb)?;
            let mut env = Vec::new();
            match plant_bug.as_deref() {
                None => {}
                Some("stale-reads") => env.push(("STEMEDB_TESTING_UNSAFE_SKIP_READ_BARRIER".into(), "true".into())),
                // Damaged replicas are never found nor repaired: the `corrupt` fault must fail
                // the run.
                Some("no-anti-entropy") => env.push(("STEMEDB_ANTI_ENTROPY_ENABLED".into(), "false".into())),
                Some(other) => anyhow::bail!("unknown bug {other:?}; known: stale-reads, no-anti-entropy"),
            }
            // Kept until the run ends: the nodes read the files at start and on restarts.
            let pki = tempfile::tempdir()?;
            if mutual_tls {
                stemedb::tls::create_ca(&pki.path().join("ca"), "chaos CA", 30)?;
                let node = stemedb::tls::create_node(&pki.path().join("ca"), pki.path(), "node", &[], 30, false)?;
                let ca = pki.path().join("ca").join("ca.pem");
                for (key, path) in [
                    ("STEMEDB_CLUSTER_TLS_CA_FILE", &ca),
                    ("STEMEDB_CLUSTER_TLS_CERT_FILE", &node.cert),
                    ("STEMEDB_CLUSTER_TLS_KEY_FILE", &node.key),
                ] {
                    env.push((key.to_string(), path.to_string_lossy().to_string()));
                }
                println!("transport: mutual TLS with a CA made for this run");
            }
            if let Some(replicas) = replication_factor {
                anyhow::ensure!(replicas > 0, "--replication-factor must be positive");
                env.push(("STEMEDB_CLUSTER_REPLICATION_FACTOR".into(), replicas.to_string()));
                println!("replication factor: {replicas}");
            }
            if let Some(every) = snapshot_every {
                anyhow::ensure!(every > 0, "--snapshot-every must be positive");
                env.push(("STEMEDB_RAFT_SNAPSHOT_LOGS_SINCE_LAST".into(), every.to_string()));
                env.push(("STEMEDB_RAFT_LOGS_TO_KEEP_AFTER_SNAPSHOT".into(), (every / 4).to_string()));
                println!("snapshots: every {every} entries, {} kept after each", every / 4);
            }
            let seed = seed_or_clock(seed);
            anyhow::ensure!(keys > 0 && duration > 0, "--keys and --duration must be positive");
            let outcome = run(RunOptions {
                scenario,
                duration: Duration::from_secs(duration),
                nodes: nodes.unwrap_or(scenario.default_nodes).max(1),
                shards: shards.max(1),
                seed,
                register_clients: clients,
                set_clients,
                unkeyed_clients: unkeyed_clients.unwrap_or(scenario.unkeyed_clients),
                keys,
                stemedb,
                data_root: data_dir,
                env,
            })
            .await?;
            print!("{}", summary(&outcome));
            if let Some(path) = report {
                std::fs::write(&path, serde_json::to_vec_pretty(&outcome)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("report: {}", path.display());
            }
            // 0: checked, no anomaly; 1: anomalies; 2: no anomaly, but some key's history was
            // too large to check within the search budget.
            match outcome.result {
                "pass" => Ok(()),
                "inconclusive" => std::process::exit(2),
                _ => std::process::exit(1),
            }
        }
        Command::DrDrill {
            duration,
            shards,
            seed,
            clients,
            archive_interval_ms,
            no_archive,
            io: RunIo { report, stemedb, data_dir },
        } => {
            anyhow::ensure!(duration >= 5 && clients > 0, "--duration must be at least 5 and --clients positive");
            let outcome = stemedb_chaos::dr_drill::dr_drill(stemedb_chaos::dr_drill::DrillOptions {
                duration: Duration::from_secs(duration),
                shards: shards.max(1),
                seed: seed_or_clock(seed),
                clients,
                stemedb: stemedb_binary(stemedb)?,
                data_root: data_dir,
                archive_interval: (!no_archive).then(|| Duration::from_millis(archive_interval_ms.max(100))),
            })
            .await?;
            println!(
                "dr-drill: {} writes acknowledged ({} before the backup, {} of them missing), {} after it came back and {} did not, {} duplicates; RPO {:.2}s, RTO {:.2}s (restore and start {:.2}s); {} of {} shard digests match ({})",
                outcome.writes_acknowledged,
                outcome.acknowledged_before_backup,
                outcome.missing_before_backup,
                outcome.restored_after_backup,
                outcome.missing_after_backup,
                outcome.duplicates,
                outcome.rpo_seconds,
                outcome.rto_seconds,
                outcome.restore_seconds,
                outcome.digests_matching,
                outcome.shards_checked,
                if outcome.archive { "every replica agrees, and verify matched the backup's digests" } else { "the manifest" }
            );
            for anomaly in &outcome.anomalies {
                println!("ANOMALY {anomaly}");
            }
            if let Some(path) = report {
                std::fs::write(&path, serde_json::to_vec_pretty(&outcome)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("report: {}", path.display());
            }
            if outcome.anomalies.is_empty() {
                println!("result: PASS");
                Ok(())
            } else {
                println!("result: FAIL ({} anomalies)", outcome.anomalies.len());
                std::process::exit(1)
            }
        }
    }
}
