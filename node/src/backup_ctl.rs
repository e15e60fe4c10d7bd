//! `stemedb backup`: creating a backup through a node's admin API (the node coordinates the
//! cluster's backup), and listing, verifying and restoring backups straight from the store
//! (`cluster::backup`), without a running node. Output is readable text or, with `--json`,
//! JSON; a failure exits non-zero.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cluster::backup::restore::{restore, RestoreRequest};
use crate::cluster::backup::store::BackupStore;
use crate::cluster::backup::verify;
use crate::config::{Config, FlagOverrides, ValidatedConfig};

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// The node's config file: `[backup]` (destination, S3 settings) and, for a restore, the
    /// node's id, data dir and initial cluster. Default: `/etc/stemedb/stemedb.toml` if present.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: BackupCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum BackupCommand {
    /// Back up the whole cluster, online, through one node's admin API; waits until it is done.
    Create {
        /// A directory or s3://bucket/prefix (default: backup.destination of the node).
        #[arg(long)]
        to: Option<String>,
        /// The client API (and node admin) address of the node that coordinates the backup.
        #[arg(long, default_value = "http://127.0.0.1:18180")]
        node: String,
        /// The admin token (`security.admin_token`).
        #[arg(long)]
        token: Option<String>,
        /// A PEM CA certificate to trust for an https:// --node (besides the system's roots).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Start it and print its id without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// List the backups in a store, oldest first.
    List {
        /// A directory or s3://bucket/prefix (default: backup.destination).
        #[arg(long)]
        from: Option<String>,
    },
    /// Re-read every file of a backup and recompute every shard's digest, without restoring.
    Verify {
        #[arg(long)]
        from: Option<String>,
        /// The backup id (default: the newest).
        #[arg(long)]
        backup: Option<String>,
    },
    /// Build this node's data dir of a NEW cluster from a backup (run it on every new node).
    Restore {
        #[arg(long)]
        from: Option<String>,
        /// The backup id (default: the newest).
        #[arg(long)]
        backup: Option<String>,
        /// The new node's data dir (must hold no node yet).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        node_id: Option<u64>,
        /// The new cluster's members, `ID=HOST:PORT,...` (Raft addresses); as `serve` takes it.
        #[arg(long)]
        initial_cluster: Option<String>,
        /// This node's Raft address (for a single-node restore without --initial-cluster).
        #[arg(long)]
        raft_addr: Option<String>,
        /// Restore the cluster as it was at this time: RFC 3339 (`2026-12-04T18:00:00Z`) or
        /// Unix seconds. Uses the newest backup finished by then, and replays the archived log
        /// up to it. Give every node of the new cluster the same value. Default: everything.
        #[arg(long, value_parser = parse_as_of)]
        as_of: Option<u64>,
        /// Do not replay the archived log: restore exactly the backup.
        #[arg(long)]
        no_log: bool,
    },
}

/// `--as-of`: RFC 3339 or Unix seconds, as µs since the epoch.
fn parse_as_of(text: &str) -> Result<u64, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 && seconds < 1e11 {
            return Ok((seconds * 1e6) as u64);
        }
        return Err(format!("{text}: not a time (Unix seconds after 1970)"));
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .and_then(|at| u64::try_from(at.timestamp_micros()).ok())
        .ok_or_else(|| format!("{text}: expected RFC 3339 (2026-12-04T18:00:00Z) or Unix seconds"))
}

/// What the command printed, and whether it failed.
pub struct Report {
    pub output: String,
    pub failure: Option<String>,
}

fn config(file: Option<&std::path::Path>, flags: &FlagOverrides) -> anyhow::Result<ValidatedConfig> {
    Ok(Config::load(file, flags)?)
}

fn source(given: Option<String>, config: &Config) -> anyhow::Result<String> {
    match given {
        Some(source) => Ok(source),
        None if !config.backup.destination.is_empty() => Ok(config.backup.destination.clone()),
        None => bail!("no backup store: give --from (or set backup.destination in the config)"),
    }
}

fn text_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub async fn run(args: BackupArgs) -> anyhow::Result<Report> {
    let json_out = args.json;
    match args.command {
        BackupCommand::Create { to, node, token, ca, no_wait } => {
            create(to, &node, token, ca.as_deref(), no_wait, json_out).await
        }
        BackupCommand::List { from } => {
            let config = config(args.config.as_deref(), &FlagOverrides::default())?;
            let store = BackupStore::open(&source(from, &config)?, &config.backup, false)?;
            let listed = verify::list(&store).await?;
            if json_out {
                return Ok(Report { output: format!("{}\n", json!({"backups": listed})), failure: None });
            }
            let mut output = format!(
                "{:<24} {:<26} {:>7} {:>6} {:>10} {:>10}\n",
                "ID", "STARTED", "SHARDS", "FILES", "RECORDS", "SIZE"
            );
            for l in &listed {
                match &l.error {
                    None => output.push_str(&format!(
                        "{:<24} {:<26} {:>7} {:>6} {:>10} {:>10}\n",
                        l.id,
                        l.started_at.clone().unwrap_or_default(),
                        l.shards.unwrap_or(0),
                        l.files.unwrap_or(0),
                        l.records.unwrap_or(0),
                        text_bytes(l.bytes.unwrap_or(0)),
                    )),
                    Some(error) => output.push_str(&format!("{:<24} unreadable: {error}\n", l.id)),
                }
            }
            if listed.is_empty() {
                output.push_str("(no backups)\n");
            }
            Ok(Report { output, failure: None })
        }
        BackupCommand::Verify { from, backup } => {
            let config = config(args.config.as_deref(), &FlagOverrides::default())?;
            let store = BackupStore::open(&source(from, &config)?, &config.backup, false)?;
            let started = Instant::now();
            let report = verify::verify(&store, backup.as_deref()).await?;
            let failure = (!report.ok).then(|| format!("backup {} is damaged", report.id));
            if json_out {
                return Ok(Report { output: format!("{}\n", serde_json::to_string(&report)?), failure });
            }
            let mut output = format!(
                "backup {}: {} groups, {} files, {} records, {}, {} archived log segments after it, read in {:.1}s\n",
                report.id,
                report.groups,
                report.files,
                report.records,
                text_bytes(report.bytes),
                report.log_segments,
                started.elapsed().as_secs_f64()
            );
            for d in &report.damage {
                output.push_str(&format!(
                    "DAMAGED {}{}: {}\n",
                    d.group,
                    d.file.as_ref().map(|f| format!(" file {f}")).unwrap_or_default(),
                    d.problem
                ));
            }
            if report.ok {
                output.push_str("ok: every file matches its checksum and every shard its digest\n");
            }
            Ok(Report { output, failure })
        }
        BackupCommand::Restore { from, backup, data_dir, node_id, initial_cluster, raft_addr, as_of, no_log } => {
            let flags = FlagOverrides { data_dir, node_id, initial_cluster, raft_addr, ..FlagOverrides::default() };
            let config = config(args.config.as_deref(), &flags)?;
            let store = BackupStore::open(&source(from, &config)?, &config.backup, false)?;
            let request = RestoreRequest {
                store,
                backup_id: backup,
                data_dir: config.node.data_dir.clone(),
                node_id: config.node.id,
                members: config.initial_members()?,
                replication_factor: config.cluster.replication_factor,
                storage: crate::server::storage_options(&config),
                replay_log: !no_log,
                as_of_us: as_of,
            };
            let report = restore(request).await?;
            if json_out {
                return Ok(Report { output: format!("{}\n", serde_json::to_string(&report)?), failure: None });
            }
            Ok(Report {
                output: format!(
                    "restored backup {} (cluster {}) into {} as node {} of the new cluster {}: {} groups, {} records, {} in {:.1}s\nstart the node with the same --initial-cluster; it checks its replicas before it serves\n",
                    report.backup_id,
                    report.backed_up_cluster_id,
                    report.data_dir.display(),
                    report.node_id,
                    report.cluster_id,
                    report.groups.len(),
                    report.records,
                    text_bytes(report.bytes),
                    report.elapsed_ms as f64 / 1000.0
                ) + &replayed_text(&report.replayed),
                failure: None,
            })
        }
    }
}

fn replayed_text(replayed: &[crate::cluster::backup::restore::ReplayedGroup]) -> String {
    if replayed.is_empty() {
        return "no archived log after the backup was replayed\n".into();
    }
    let entries: u64 = replayed.iter().map(|g| g.entries).sum();
    let newest = replayed.iter().filter_map(|g| g.last_proposed_at_us).max();
    let mut text = format!("replayed {entries} archived log entries over {} groups", replayed.len());
    if let Some(at) = newest.and_then(|us| chrono::DateTime::from_timestamp_micros(us as i64)) {
        text.push_str(&format!("; the newest write restored was proposed at {}", at.to_rfc3339()));
    }
    text.push('\n');
    for group in replayed.iter().filter(|g| g.stopped_at == "gap") {
        text.push_str(&format!(
            "WARNING shard {}: the archive has a gap after index {}; later entries were not replayed\n",
            group.shard, group.to_index
        ));
    }
    text
}

/// A node's refusal as `STATUS code: message` (its error body `{"error": {"code", "message"}}`).
fn refusal(status: reqwest::StatusCode, answer: &Value) -> String {
    let error = &answer["error"];
    format!(
        "{} {}: {}",
        status.as_u16(),
        error["code"].as_str().unwrap_or("?"),
        error["message"].as_str().unwrap_or("")
    )
}

async fn create(
    to: Option<String>,
    node: &str,
    token: Option<String>,
    ca: Option<&Path>,
    no_wait: bool,
    json_out: bool,
) -> anyhow::Result<Report> {
    let client = crate::tls::http_client(ca, Duration::from_secs(30))?.build()?;
    let node = node.trim_end_matches('/');
    let with_token = |request: reqwest::RequestBuilder| match &token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let body = match &to {
        Some(to) => json!({"destination": to}),
        None => json!({}),
    };
    let response = with_token(client.post(format!("{node}/v1/admin/backup")).json(&body))
        .send()
        .await
        .with_context(|| format!("reaching {node}"))?;
    let status = response.status();
    let started: Value = response.json().await.with_context(|| format!("reading {node}'s answer"))?;
    if status.as_u16() != 202 {
        return Ok(Report { output: String::new(), failure: Some(refusal(status, &started)) });
    }
    let id = started["id"].as_str().context("the node's answer has no backup id")?.to_string();
    if no_wait {
        let output = if json_out { format!("{started}\n") } else { format!("backup {id} started\n") };
        return Ok(Report { output, failure: None });
    }
    // Bounded: a backup that neither finishes nor fails within a day is reported as such. A poll
    // that fails for a while (the node busy, rate limited or restarting, the network) is tried
    // again for up to POLL_PATIENCE; the backup goes on on the node meanwhile.
    const POLL_PATIENCE: Duration = Duration::from_secs(60);
    let deadline = Instant::now() + Duration::from_secs(86_400);
    let mut failing_since: Option<Instant> = None;
    let progress = loop {
        let poll = async {
            let response = with_token(client.get(format!("{node}/v1/admin/backup/{id}"))).send().await?;
            let status = response.status();
            Ok::<_, reqwest::Error>((status, response.json::<Value>().await.unwrap_or(Value::Null)))
        };
        let retry = match poll.await {
            Ok((status, progress)) if status.is_success() => {
                if progress["state"] != "running" {
                    break progress;
                }
                failing_since = None;
                None
            }
            Ok((status, answer)) if status.as_u16() == 404 => bail!(
                "{node} no longer knows backup {id} ({}); if the node restarted, the backup was abandoned: \
                 see `stemedb backup list`",
                refusal(status, &answer)
            ),
            Ok((status, answer)) if matches!(status.as_u16(), 429 | 502 | 503 | 504) => Some(refusal(status, &answer)),
            Ok((status, answer)) => bail!("asking {node} for backup {id}'s progress: {}", refusal(status, &answer)),
            Err(error) => Some(format!("{error}")),
        };
        if let Some(why) = retry {
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() > POLL_PATIENCE {
                bail!("cannot ask {node} for backup {id}'s progress for {}s: {why}", POLL_PATIENCE.as_secs());
            }
        }
        if Instant::now() > deadline {
            bail!("backup {id} still running after a day");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let failure = (progress["state"] != "succeeded").then(|| {
        format!(
            "backup {id} failed: {} {}",
            progress["error_code"].as_str().unwrap_or("?"),
            progress["error"].as_str().unwrap_or("")
        )
    });
    let output = if json_out {
        format!("{progress}\n")
    } else if failure.is_none() {
        let seconds = (progress["finished_at_us"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(progress["started_at_us"].as_u64().unwrap_or(0))) as f64
            / 1e6;
        format!(
            "backup {id} done in {seconds:.1}s: {} groups into {} ({} files uploaded, {} already stored)\n",
            progress["groups_done"],
            progress["destination"].as_str().unwrap_or(""),
            progress["files_uploaded"],
            progress["files_reused"]
        )
    } else {
        String::new()
    };
    Ok(Report { output, failure })
}
