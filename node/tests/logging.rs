//! What a node writes when its output is not a terminal (a file, a pipe, journald): plain text
//! without colour codes, or one JSON object per line with `logging.format = "json"`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts a node with its output on a pipe, reads lines until storage is open (at most 60 s),
/// stops it, and returns what it wrote.
fn first_lines(env: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_stemedb"));
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--api-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--raft-addr", "127.0.0.1:0"])
        .env_remove("STEMEDB_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn stemedb serve");
    let stdout = child.stdout.take().expect("stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    while let Ok(line) = receiver.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let opened = line.contains("storage opened");
        lines.push(line);
        if opened {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(lines.iter().any(|l| l.contains("storage opened")), "no `storage opened` line in 60 s: {lines:?}");
    lines
}

#[test]
fn logs_on_a_pipe_are_plain_text() {
    let lines = first_lines(&[]);
    let coloured: Vec<&String> = lines.iter().filter(|l| l.contains('\u{1b}')).collect();
    assert!(coloured.is_empty(), "colour codes written to a pipe: {coloured:?}");
    assert!(lines.iter().any(|l| l.contains(" INFO ") && l.contains("storage opened path=")), "{lines:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let lines = first_lines(&[("STEMEDB_LOGGING_FORMAT", "json")]);
    for line in lines.iter().filter(|l| l.starts_with('{')) {
        let object: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(object["level"].is_string() && object["fields"].is_object(), "{line}");
    }
    assert!(lines.iter().any(|l| l.starts_with('{') && l.contains("storage opened")), "{lines:?}");
}
