//! deploy/ is tested, not decoration: every sample config passes the node's own validation and
//! each multi-node set describes one cluster; `.env.example` names exactly the environment
//! variables a node reads; the systemd unit keeps what the runbooks rely on and, where
//! `systemd-analyze` exists, passes `systemd-analyze verify`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use stemedb::config::Config;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn tomls(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_sample_config_is_valid_and_each_set_is_one_cluster() {
    let config_dir = deploy().join("config");
    let single = Config::check_file(&config_dir.join("single-node.toml")).expect("single-node.toml").into_inner();
    assert_eq!(single.cluster.replication_factor, 1);
    for (set, nodes) in [("three-node", 3usize), ("five-node", 5)] {
        let files = tomls(&config_dir.join(set));
        assert_eq!(files.len(), nodes, "{set}: one file per node");
        let configs: Vec<Config> = files
            .iter()
            .map(|f| Config::check_file(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())).into_inner())
            .collect();
        let members = configs[0].initial_members().expect("members");
        assert_eq!(members.len(), nodes, "{set}: initial_cluster names every node");
        let mut ids = BTreeSet::new();
        for config in &configs {
            assert_eq!(config.cluster.initial_cluster, configs[0].cluster.initial_cluster, "{set}: one cluster");
            assert_eq!(config.cluster.shards, configs[0].cluster.shards, "{set}: one shard count");
            assert!(ids.insert(config.node.id), "{set}: node id {} twice", config.node.id);
            assert_eq!(
                members.get(&config.node.id),
                Some(&config.server.raft_addr),
                "{set}: node {}'s raft_addr is its initial_cluster entry",
                config.node.id
            );
        }
    }
}

/// `STEMEDB_<SECTION>_<KEY>` of every key of the configuration, from its serialized defaults.
fn config_variables() -> BTreeSet<String> {
    let text = toml::to_string(&Config::default()).expect("serialize defaults");
    let table: BTreeMap<String, toml::Value> = toml::from_str(&text).expect("parse defaults");
    let mut names = BTreeSet::new();
    for (section, keys) in table {
        let keys = keys.as_table().unwrap_or_else(|| panic!("[{section}] is a table"));
        for key in keys.keys() {
            names.insert(format!("STEMEDB_{}_{}", section.to_uppercase(), key.to_uppercase()));
        }
    }
    names
}

#[test]
fn env_example_names_exactly_the_variables_a_node_reads() {
    let text = std::fs::read_to_string(deploy().join(".env.example")).expect("deploy/.env.example");
    let listed: BTreeSet<String> = text
        .lines()
        .map(|line| line.trim_start_matches('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(name, _)| name.to_string())
        .filter(|name| name.starts_with("STEMEDB_") && !name.contains(' '))
        .collect();
    let mut expected = config_variables();
    // The runbooks' alias of storage.max_cache_size_mb, and the tracing filter.
    expected.extend(["STEMEDB_CACHE_SIZE_MB".to_string(), "STEMEDB_LOG".to_string()]);
    let missing: Vec<_> = expected.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&expected).collect();
    assert!(missing.is_empty() && unknown.is_empty(), "missing from .env.example: {missing:?}; not read: {unknown:?}");
}

#[test]
fn the_systemd_unit_keeps_what_the_runbooks_rely_on() {
    let path = deploy().join("systemd/stemedb.service");
    let unit = std::fs::read_to_string(&path).expect("deploy/systemd/stemedb.service");
    for line in [
        "ExecStart=/usr/bin/stemedb serve --config /etc/stemedb/stemedb.toml",
        "EnvironmentFile=-/etc/stemedb/stemedb.env",
        "OOMScoreAdjust=-500",
        "KillSignal=SIGTERM",
        "StateDirectory=stemedb",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == line), "{} lacks `{line}`", path.display());
    }
    // The stop timeout must cover the shutdown order's bounds (docs/architecture.md): hand-over
    // (at most 2 leases + 2 s), the drain (server.shutdown_grace_seconds, 10 s), tasks (5 s).
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec in seconds");
    assert!(stop >= 2 + 10 + 5 + 5, "TimeoutStopSec={stop} is shorter than a clean shutdown may take");
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze not installed: the unit's syntax is not verified here");
        return;
    };
    // verify wants ExecStart's binary to exist: point it at this build's.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("stemedb.service");
    std::fs::write(&copy, unit.replace("/usr/bin/stemedb", env!("CARGO_BIN_EXE_stemedb"))).expect("write copy");
    let output = std::process::Command::new(analyze).arg("verify").arg(&copy).output().expect("systemd-analyze");
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_backup_timer_runs_a_backup_through_the_local_node() {
    let service = std::fs::read_to_string(deploy().join("systemd/stemedb-backup.service")).expect("backup service");
    let timer = std::fs::read_to_string(deploy().join("systemd/stemedb-backup.timer")).expect("backup timer");
    assert!(
        service.contains(r#"/usr/bin/stemedb backup create --node "$${BACKUP_NODE:-http://127.0.0.1:18180}""#),
        "{service}"
    );
    assert!(service.lines().any(|l| l == "Type=oneshot"), "{service}");
    assert!(timer.lines().any(|l| l.starts_with("OnCalendar=")) && timer.lines().any(|l| l == "Persistent=true"));
    // The command line the unit runs parses (clap refuses unknown flags).
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stemedb"))
        .args(["backup", "create", "--node", "http://127.0.0.1:1", "--ca", "ca.pem", "--token", "t", "--help"])
        .output()
        .expect("stemedb backup create --help");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze not installed: the units' syntax is not verified here");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["stemedb-backup.service", "stemedb-backup.timer"] {
        let text = std::fs::read_to_string(deploy().join("systemd").join(name)).expect("unit");
        std::fs::write(dir.path().join(name), text.replace("/usr/bin/stemedb", env!("CARGO_BIN_EXE_stemedb")))
            .expect("write copy");
    }
    let output = std::process::Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("stemedb-backup.service"))
        .arg(dir.path().join("stemedb-backup.timer"))
        .output()
        .expect("systemd-analyze");
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `program` in /usr/sbin, /usr/bin (where Debian installs, whatever PATH says) or on PATH.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/usr/bin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// A program the set-up script installs.
fn installed(program: &str) -> PathBuf {
    which(program).unwrap_or_else(|| panic!("{program} is not installed: run scripts/setup.sh"))
}

#[test]
fn the_nginx_config_passes_nginx_t() {
    let dir = tempfile::tempdir().expect("tempdir");
    let include = deploy().join("nginx/stemedb.conf");
    // The shipped file is an http-level include; listen on a loopback port for the check.
    let site = std::fs::read_to_string(&include)
        .expect("deploy/nginx/stemedb.conf")
        .replace("listen 80;", "listen 127.0.0.1:18999;");
    std::fs::write(dir.path().join("stemedb.conf"), site).expect("write site");
    let main = format!(
        "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  include {d}/stemedb.conf;\n}}\n",
        d = dir.path().display()
    );
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, main).expect("write nginx.conf");
    let output = std::process::Command::new(installed("nginx"))
        .args(["-t", "-q", "-p"])
        .arg(dir.path())
        .arg("-c")
        .arg(&conf)
        .output()
        .expect("run nginx -t");
    assert!(output.status.success(), "nginx -t: {}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn the_haproxy_config_passes_haproxy_c() {
    let output = std::process::Command::new(installed("haproxy"))
        .arg("-c")
        .arg("-f")
        .arg(deploy().join("haproxy/haproxy.cfg"))
        .output()
        .expect("run haproxy -c");
    assert!(
        output.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
