//! `stemedb cluster`: an operator's client of the cluster admin API on port 18181. Each
//! subcommand is one request to one node (`--admin`, any node will do: every node serves the
//! cluster's view as it knows it), printed as a readable table or, with `--json`, as the node's
//! JSON answer unchanged. A refusal prints the node's error code and message and exits non-zero.
//! Like `bench`, it uses no other module of the node but `tls` (the CA it trusts for HTTPS): only
//! the HTTP API.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// The cluster admin address of any node (https://... where the nodes have server.tls_*).
    #[arg(long, global = true, default_value = "http://127.0.0.1:18181")]
    pub admin: String,
    /// A PEM CA certificate to trust for https:// (besides the system's roots): the CA that
    /// signed the nodes' server.tls_cert_file.
    #[arg(long, global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// A bearer token: `security.admin_token` or an admin token of `security.tokens` for the
    /// commands that change the cluster; with `security.tokens`, a `read` token at least for the
    /// others.
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// Print the node's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Cluster health: members up, shards with and without a leader.
    Status,
    /// Every member with its status, shards hosted and led, and replication lag.
    Members,
    /// Every shard the node hosts: leader, term, voters, placement, lag, rebalance.
    Shards,
    /// Add a node; it receives its share of the replicas (waits while it joins).
    AddNode {
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// The new node's Raft address (HOST:18182).
        #[arg(long)]
        raft_addr: String,
    },
    /// Decommission a node: its replicas move away, then it is removed.
    RemoveNode {
        /// The node's id.
        id: u64,
    },
    /// Move one replica of a shard to another node.
    Rebalance {
        /// The shard.
        #[arg(long)]
        shard: u16,
        /// The node that receives the replica.
        #[arg(long)]
        to: u64,
        /// The node whose replica moves away (default: the one holding the most replicas).
        #[arg(long)]
        from: Option<u64>,
    },
    /// Move a shard's leadership to another voter.
    TransferLeader {
        /// The shard.
        #[arg(long)]
        shard: u16,
        /// The voter that becomes leader.
        #[arg(long)]
        to: u64,
    },
    /// Anti-entropy of the shards the node hosts: replicas' roots, agreement, repairs, scrubs.
    SyncStatus,
    /// Check and repair a node's replicas now (anti-entropy) instead of at the next interval.
    Sync {
        /// The node whose replicas to check.
        #[arg(long)]
        target_node: u64,
        /// Only this shard.
        #[arg(long)]
        shard: Option<u16>,
        /// Also have each shard's leader propose a fresh check now.
        #[arg(long)]
        force: bool,
    },
}

/// What a command prints, and why it fails after printing (an unhealthy cluster's status).
pub struct Report {
    pub output: String,
    pub failure: Option<String>,
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<Report> {
    let client = crate::tls::http_client(args.ca.as_deref(), Duration::from_secs(120))?.build()?;
    let base = args.admin.trim_end_matches('/').to_string();
    let base = if base.contains("://") { base } else { format!("http://{base}") };
    let (method, path, body) = match &args.command {
        ClusterCommand::Status => (reqwest::Method::GET, "/cluster/health".to_string(), None),
        ClusterCommand::Members => (reqwest::Method::GET, "/cluster/members".to_string(), None),
        ClusterCommand::Shards => (reqwest::Method::GET, "/cluster/shards".to_string(), None),
        ClusterCommand::AddNode { id, raft_addr } => {
            (reqwest::Method::POST, "/cluster/members".to_string(), Some(json!({"id": id, "raft_addr": raft_addr})))
        }
        ClusterCommand::RemoveNode { id } => (reqwest::Method::DELETE, format!("/cluster/members/{id}"), None),
        ClusterCommand::Rebalance { shard, to, from } => {
            let mut body = json!({"shard_id": shard, "target_node": to});
            if let Some(from) = from {
                body["from_node"] = json!(from);
            }
            (reqwest::Method::POST, "/admin/shards/rebalance".to_string(), Some(body))
        }
        ClusterCommand::TransferLeader { shard, to } => {
            (reqwest::Method::POST, format!("/admin/shards/{shard}/transfer-leader"), Some(json!({"target_node": to})))
        }
        ClusterCommand::SyncStatus => (reqwest::Method::GET, "/cluster/sync_status".to_string(), None),
        ClusterCommand::Sync { target_node, shard, force } => {
            let mut body = json!({"target_node": target_node, "force": force});
            if let Some(shard) = shard {
                body["shard_id"] = json!(shard);
            }
            (reqwest::Method::POST, "/cluster/sync".to_string(), Some(body))
        }
    };
    let mut request = client.request(method, format!("{base}{path}"));
    if let Some(token) = &args.token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.with_context(|| format!("cannot reach the cluster admin API at {base}"))?;
    let status = response.status();
    let text = response.text().await.context("reading the answer")?;
    let answer: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    // /cluster/health answers 503 with its usual body when a shard has no leader: a report.
    let report = matches!(args.command, ClusterCommand::Status) && answer.get("status").is_some();
    if !status.is_success() && !report {
        let code = answer.pointer("/error/code").and_then(Value::as_str).unwrap_or("error");
        let message = answer.pointer("/error/message").and_then(Value::as_str).map(str::to_string);
        bail!("{} {code}: {}", status.as_u16(), message.unwrap_or_else(|| answer.to_string()));
    }
    let output = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&answer)?)
    } else {
        render(&args.command, status, &answer)
    };
    let failure = (report && !status.is_success())
        .then(|| format!("the cluster is {}", answer["status"].as_str().unwrap_or("unhealthy")));
    Ok(Report { output, failure })
}

/// The readable form of an answer.
fn render(command: &ClusterCommand, status: reqwest::StatusCode, answer: &Value) -> String {
    match command {
        ClusterCommand::Status => {
            let without = list(&answer["shards_without_leader"]);
            format!(
                "cluster {}: {}\nnodes up: {} of {}\nshards with a leader: {} of {}{}\n",
                text(&answer["cluster_id"]),
                text(&answer["status"]),
                text(&answer["nodes_up"]),
                text(&answer["nodes_total"]),
                text(&answer["shards_with_leader"]),
                text(&answer["shards_total"]),
                if without.is_empty() { String::new() } else { format!(" (without: {without})") },
            )
        }
        ClusterCommand::Members => table(
            &["ID", "RAFT ADDRESS", "STATUS", "SHARDS", "LED", "LAG S", ""],
            rows(&answer["members"])
                .map(|m| {
                    vec![
                        text(&m["id"]),
                        text(&m["raft_addr"]),
                        text(&m["status"]),
                        text(&m["shards_hosted"]),
                        text(&m["shards_led"]),
                        seconds(&m["replication_lag"]),
                        if m["self"] == json!(true) { "(this node)".into() } else { String::new() },
                    ]
                })
                .collect(),
        ),
        ClusterCommand::Shards => table(
            &["SHARD", "LEADER", "TERM", "VOTERS", "PLACEMENT", "APPLIED", "MAX LAG S", "REBALANCE"],
            rows(&answer["shards"])
                .map(|s| {
                    let lag = rows(&s["replication"]).filter_map(|r| r["lag_seconds"].as_f64()).fold(0.0, f64::max);
                    vec![
                        text(&s["shard"]),
                        text(&s["leader"]),
                        text(&s["term"]),
                        list(&s["voters"]),
                        list(&s["placement"]),
                        text(&s["applied_index"]),
                        format!("{lag:.3}"),
                        text(&s["rebalance_status"]),
                    ]
                })
                .collect(),
        ),
        ClusterCommand::SyncStatus => table(
            &[
                "SHARD",
                "AGREEMENT",
                "CHECK INDEX",
                "ROOTS",
                "MISMATCHED",
                "REPAIRS",
                "REPAIRED KEYS",
                "SCRUBS",
                "SUSPECT",
            ],
            rows(&answer["shards"])
                .map(|s| {
                    let roots: Vec<String> = rows(&s["replicas"])
                        .map(|r| {
                            let root = r["root"].as_str().map_or("-".to_string(), |h| h.chars().take(8).collect());
                            format!("{}:{}@{}", text(&r["node"]), root, text(&r["check_index"]))
                        })
                        .collect();
                    vec![
                        text(&s["shard"]),
                        text(&s["agreement"]),
                        text(&s["check_index"]),
                        roots.join(" "),
                        text(&s["mismatched_buckets"]),
                        text(&s["repairs"]),
                        text(&s["repaired_keys"]),
                        text(&s["scrub"]["passes"]),
                        text(&s["suspect"]),
                    ]
                })
                .collect(),
        ),
        _ => {
            let state = if status == reqwest::StatusCode::ACCEPTED { "accepted, in progress" } else { "done" };
            format!("{state}: {}\n", answer)
        }
    }
}

fn rows(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn seconds(value: &Value) -> String {
    value.as_f64().map(|s| format!("{s:.3}")).unwrap_or_else(|| "-".into())
}

fn list(value: &Value) -> String {
    rows(value).map(text).collect::<Vec<_>>().join(",")
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_and_members_render() {
        let answer = json!({"members": [
            {"id": 1, "raft_addr": "10.0.0.1:18182", "status": "UP", "shards_hosted": 16, "shards_led": 6,
             "replication_lag": 0.0, "self": true},
            {"id": 12, "raft_addr": "10.0.0.12:18182", "status": "DOWN", "shards_hosted": 16, "shards_led": 0,
             "replication_lag": 7.5, "self": false},
        ]});
        let out = render(&ClusterCommand::Members, reqwest::StatusCode::OK, &answer);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "ID  RAFT ADDRESS     STATUS  SHARDS  LED  LAG S");
        assert_eq!(lines[1], "1   10.0.0.1:18182   UP      16      6    0.000  (this node)");
        assert_eq!(lines[2], "12  10.0.0.12:18182  DOWN    16      0    7.500");
    }
}
