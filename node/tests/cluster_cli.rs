//! `stemedb cluster` against a live node: status, members, shards and anti-entropy (sync-status,
//! sync) as tables and as JSON, and refusals printed with their error code and a non-zero exit.

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cluster(admin: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stemedb"))
        .arg("cluster")
        .args(["--admin", admin])
        .args(args)
        .output()
        .expect("run stemedb cluster")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn cluster_commands_against_a_live_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (api, admin, raft) = (free_port(), free_port(), free_port());
    let node = Command::new(env!("CARGO_BIN_EXE_stemedb"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--api-addr", &format!("127.0.0.1:{api}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--raft-addr", &format!("127.0.0.1:{raft}")])
        .env_remove("STEMEDB_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn stemedb serve");
    let _node = Node(node);
    let admin = format!("http://127.0.0.1:{admin}");

    // `status` fails until every shard has a leader: poll it (at most 60 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let output = cluster(&admin, &["status"]);
        if output.status.success() {
            break output;
        }
        assert!(
            Instant::now() < deadline,
            "the node never became healthy: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = stdout(&status);
    assert!(text.contains(": healthy"), "{text}");
    assert!(text.contains("nodes up: 1 of 1"), "{text}");

    let members = stdout(&cluster(&admin, &["members"]));
    let lines: Vec<&str> = members.lines().collect();
    assert!(lines[0].starts_with("ID  RAFT ADDRESS"), "{members}");
    assert!(lines[1].contains("UP") && lines[1].contains("(this node)"), "{members}");

    let shards = cluster(&admin, &["shards", "--json"]);
    assert!(shards.status.success());
    let answer: serde_json::Value = serde_json::from_slice(&shards.stdout).expect("JSON");
    let count = answer["shards"].as_array().map(Vec::len).unwrap_or(0);
    assert!(count > 0, "{answer}");
    let table = stdout(&cluster(&admin, &["shards"]));
    assert_eq!(table.lines().count(), count + 1, "a header and a line per shard: {table}");

    // Anti-entropy: every replica of a single node agrees with itself once it recorded a check
    // (the node asks for one at start); `sync` starts a check of this node now.
    let sync = cluster(&admin, &["sync", "--target-node", "1", "--force", "--json"]);
    assert!(sync.status.success(), "{}", String::from_utf8_lossy(&sync.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&sync.stdout).expect("JSON");
    assert_eq!(answer["status"], "started", "{answer}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let table = stdout(&cluster(&admin, &["sync-status"]));
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("SHARD  AGREEMENT"), "{table}");
        // A header and a line per shard and the meta group, each agreeing.
        if lines.len() == count + 2 && lines[1..].iter().all(|l| l.contains(" agree ")) {
            break;
        }
        assert!(Instant::now() < deadline, "the replicas never agreed: {table}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let refused = cluster(&admin, &["sync", "--target-node", "99"]);
    assert!(!refused.status.success(), "syncing an unknown node must fail");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("404 unknown_member"));

    let refused = cluster(&admin, &["remove-node", "99"]);
    assert!(!refused.status.success(), "removing an unknown node must fail");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("404 unknown_member"), "{stderr}");
}
