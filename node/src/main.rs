//! The `stemedb` binary: parses flags, sets up tracing and signals, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stemedb::config::{Config, FlagOverrides};
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc malloc: the read path allocates many short-lived buffers per
/// request, and a loaded node answers as many authority-lens queries as with mimalloc and
/// more than with glibc (docs/performance.md); jemalloc also has the sampling heap profiler
/// behind `/v1/admin/debug/heap-profile` (`stemedb::metrics::heap_profile`). It replaces
/// `malloc` for the whole process, so RocksDB's allocations are profiled too.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "stemedb", version, about = "StemeDB: a replicated database of agent assertions read through lenses")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (with no flags: a single node in ./stemedb-data on 127.0.0.1).
    Serve(ServeArgs),
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print a sample config file with every key and its default.
    PrintSampleConfig,
    /// Load-test a running node.
    Bench(stemedb::bench::BenchArgs),
    /// Ask or change the cluster through any node's cluster admin API (port 18181).
    Cluster(stemedb::ctl::ClusterArgs),
    /// Back up the cluster (through a node), and list, verify or restore backups.
    Backup(stemedb::backup_ctl::BackupArgs),
    /// Run a local cluster of N nodes on 127.0.0.1, 127.0.0.2, ... (default ports) until Ctrl-C.
    DevCluster(DevClusterArgs),
    /// Make bearer tokens for the HTTP APIs (`[[security.tokens]]`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Make a development cluster CA and node certificates (TLS of 18180/18181, mutual TLS of
    /// 18182). Production clusters should use their own PKI.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Verify and repair the secondary indexes of a stopped node's data dir from its records.
    Rebuild {
        /// The node's data dir; the node must be stopped. Default: node.data_dir of the config.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The node's config file, for its storage settings (caches, memtables) and data dir
        /// (default: /etc/stemedb/stemedb.toml when present; STEMEDB_* variables apply too).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new random token (once: it is stored nowhere) and the `[[security.tokens]]`
    /// table, holding only its SHA-256, to add to every node's config (then SIGHUP them).
    Create {
        /// The holder's name, as logs, metrics and the audit log show it.
        #[arg(long)]
        name: String,
        /// read, write or admin (each includes the ones before it).
        #[arg(long, value_parser = ["read", "write", "admin"])]
        role: String,
        /// An agent id the token may write as; repeat for more. None: any agent.
        #[arg(long = "agent")]
        agents: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a new CA: DIR/ca.pem and DIR/ca-key.pem (0600). Existing files are never overwritten.
    CreateCa {
        #[arg(long, default_value = "./stemedb-ca")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "StemeDB cluster CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Write a node certificate signed by the CA: OUT/NAME.pem and OUT/NAME-key.pem, valid for
    /// the DNS name stemedb-node (which nodes check on each other) and every --host.
    CreateNode {
        /// The CA's directory (ca.pem, ca-key.pem).
        #[arg(long, default_value = "./stemedb-ca")]
        ca: PathBuf,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// File name and common name, e.g. node1.
        #[arg(long)]
        name: String,
        /// A host name or IP address clients use to reach the node; repeat for more.
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(clap::Args)]
struct DevClusterArgs {
    /// Number of nodes (each on its own loopback address 127.0.0.N).
    #[arg(long, default_value_t = 3)]
    nodes: u8,
    /// Parent directory of the nodes' data dirs (node1, node2, ...).
    #[arg(long, default_value = "./stemedb-dev")]
    data_dir: PathBuf,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Config file (default: /etc/stemedb/stemedb.toml when present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (node.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node id (node.id).
    #[arg(long)]
    node_id: Option<u64>,
    /// Client API address (server.api_addr).
    #[arg(long)]
    api_addr: Option<String>,
    /// Cluster admin address (server.admin_addr).
    #[arg(long)]
    admin_addr: Option<String>,
    /// Inter-node gRPC address (server.raft_addr).
    #[arg(long)]
    raft_addr: Option<String>,
    /// Web dashboard address: HOST:PORT, auto or off (server.dashboard_addr).
    #[arg(long)]
    dashboard_addr: Option<String>,
    /// Form a new cluster: ID=HOST:PORT,... of every founding node's Raft address
    /// (cluster.initial_cluster).
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Join a running cluster through the cluster admin address of any member (cluster.join).
    #[arg(long)]
    join: Option<String>,
}

fn init_tracing(level: &str, format: &str) {
    let filter = EnvFilter::try_from_env("STEMEDB_LOG").unwrap_or_else(|_| {
        EnvFilter::try_new(format!("{level},openraft=warn")).unwrap_or_else(|_| EnvFilter::new("info"))
    });
    // Colour codes only on a terminal: a file, a pipe or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

async fn rebuild(data_dir: Option<PathBuf>, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    // Logs to stderr: stdout carries the JSON report.
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("STEMEDB_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} shards {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let flags = FlagOverrides { data_dir, ..FlagOverrides::default() };
    let config = Config::load(config_file.as_deref(), &flags)?;
    let report = stemedb::server::rebuild_offline(&config, |shard, total, report| {
        bar.set_length(total as u64);
        bar.inc(1);
        bar.set_message(format!("shard {shard}: {} assertions", report.assertions));
    })
    .await?;
    bar.finish_and_clear();
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "index rebuild complete");
    print_out(&format!("{}\n", serde_json::to_string_pretty(&report)?))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let flags = FlagOverrides {
        data_dir: args.data_dir,
        node_id: args.node_id,
        api_addr: args.api_addr,
        admin_addr: args.admin_addr,
        raft_addr: args.raft_addr,
        dashboard_addr: args.dashboard_addr,
        initial_cluster: args.initial_cluster,
        join: args.join,
    };
    let config = Config::load(args.config.as_deref(), &flags)?;
    init_tracing(&config.logging.level, &config.logging.format);
    let listeners = stemedb::Listeners::bind(&config).await?;
    let api_addr = listeners.api.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let raft_addr = listeners.raft.local_addr()?;
    let scheme = if config.server.tls_cert_file.is_empty() { "http" } else { "https" };
    let mtls = if config.cluster.tls_ca_file.is_empty() { "" } else { " (mutual TLS)" };
    let dashboard = match listeners.dashboard.as_ref().map(|listener| listener.local_addr()) {
        Some(addr) => format!(", dashboard {scheme}://{}/", addr?),
        None => String::new(),
    };
    eprintln!(
        "stemedb node {} starting: client API {scheme}://{api_addr}, cluster admin {scheme}://{admin_addr}{dashboard}, raft {raft_addr}{mtls} (data dir {})",
        config.node.id,
        config.node.data_dir.display()
    );
    // SIGHUP: read the config again; a valid one reaches the node, which takes what can change
    // while it runs (tokens, rate limits). An invalid one is refused and the node keeps its own.
    let (reloads, reloaded) = tokio::sync::mpsc::channel(4);
    #[cfg(unix)]
    if let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let config_file = args.config.clone();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match Config::load(config_file.as_deref(), &flags) {
                    Ok(config) => {
                        tracing::info!("SIGHUP: config read again");
                        if reloads.send(config).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        tracing::error!(error = %error, "SIGHUP: the config is invalid; keeping the running one")
                    }
                }
            }
        });
    }
    stemedb::run_with_reloads(config, listeners, shutdown_signal(), reloaded).await?;
    Ok(())
}

/// Starts `args.nodes` child processes of this binary as a local cluster and stops them (SIGTERM)
/// on Ctrl-C or SIGTERM.
async fn dev_cluster(args: DevClusterArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=9).contains(&args.nodes), "--nodes must be between 1 and 9");
    let exe = std::env::current_exe()?;
    let initial_cluster: Vec<String> = (1..=args.nodes).map(|i| format!("{i}=127.0.0.{i}:18182")).collect();
    let initial_cluster = initial_cluster.join(",");
    let mut children = Vec::new();
    for i in 1..=args.nodes {
        let data_dir = args.data_dir.join(format!("node{i}"));
        std::fs::create_dir_all(&data_dir)?;
        let log = std::fs::File::create(args.data_dir.join(format!("node{i}.log")))?;
        let child = std::process::Command::new(&exe)
            .arg("serve")
            .arg("--node-id")
            .arg(i.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--api-addr", &format!("127.0.0.{i}:18180")])
            .args(["--admin-addr", &format!("127.0.0.{i}:18181")])
            .args(["--raft-addr", &format!("127.0.0.{i}:18182")])
            .args(["--initial-cluster", &initial_cluster])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        children.push(child);
    }
    println!("stemedb dev cluster: {} nodes (logs and data under {})", args.nodes, args.data_dir.display());
    for i in 1..=args.nodes {
        println!("  node {i}: client API http://127.0.0.{i}:18180   cluster admin http://127.0.0.{i}:18181");
    }
    println!("try:  curl -s http://127.0.0.1:18181/cluster/health");
    println!("      curl -s -X POST http://127.0.0.2:18180/v1/assert -d '{{\"concept_path\": \"test/disk\", \"predicate\": \"space_ok\", \"value\": true}}'");
    println!("      curl -s -X POST http://127.0.0.3:18180/v1/query -d '{{\"concept_path\": \"test/disk\"}}'");
    println!("Ctrl-C stops every node.");
    shutdown_signal().await;
    for child in &children {
        // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }
    for mut child in children {
        let _ = child.wait();
    }
    Ok(())
}

/// Writes a command's output to stdout. A reader that stopped reading (`stemedb check-config F |
/// head -1`) ends the output quietly, as for any Unix tool; `println!` would panic.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
            Command::Serve(args) => serve(args).await,
            Command::CheckConfig { file } => {
                let config = Config::check_file(&file)?;
                let effective = toml::to_string_pretty(&config)?;
                print_out(&format!("{} is valid; effective configuration:\n\n{effective}\n", file.display()))
            }
            Command::PrintSampleConfig => print_out(&Config::sample_toml()),
            Command::Bench(args) => stemedb::bench::run(args).await,
            Command::Cluster(args) => {
                let report = stemedb::ctl::run(args).await?;
                print_out(&report.output)?;
                match report.failure {
                    Some(failure) => Err(anyhow::anyhow!(failure)),
                    None => Ok(()),
                }
            }
            Command::Backup(args) => {
                // Logs (a restore's progress) go to stderr: stdout carries the report.
                tracing_subscriber::fmt()
                    .with_env_filter(EnvFilter::try_from_env("STEMEDB_LOG").unwrap_or_else(|_| EnvFilter::new("warn")))
                    .with_target(false)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr)
                    .init();
                let report = stemedb::backup_ctl::run(args).await?;
                print_out(&report.output)?;
                match report.failure {
                    Some(failure) => Err(anyhow::anyhow!(failure)),
                    None => Ok(()),
                }
            }
            Command::DevCluster(args) => dev_cluster(args).await,
            Command::Rebuild { data_dir, config } => rebuild(data_dir, config).await,
            Command::Certs(CertsCommand::CreateCa { dir, name, days }) => {
                let written = stemedb::tls::create_ca(&dir, &name, days)?;
                print_out(&format!("{}\n{}\n", written.cert.display(), written.key.display()))
            }
            Command::Certs(CertsCommand::CreateNode { ca, out, name, hosts, days }) => {
                let written = stemedb::tls::create_node(&ca, &out, &name, &hosts, days, false)?;
                print_out(&format!("{}\n{}\n", written.cert.display(), written.key.display()))
            }
            Command::Token(TokenCommand::Create { name, role, agents }) => {
                let role = match role.as_str() {
                    "read" => stemedb::config::TokenRole::Read,
                    "write" => stemedb::config::TokenRole::Write,
                    _ => stemedb::config::TokenRole::Admin,
                };
                let (token, table) = stemedb::api::access::create_token(&name, role, &agents);
                eprintln!("the token (shown once; give it to {name}, keep it out of configs and logs):");
                print_out(&format!("{token}\n"))?;
                eprintln!("\nadd to every node's config, then reload them (systemctl reload stemedb, or kill -HUP):\n\n{table}");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
