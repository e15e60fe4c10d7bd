//! The CLI's output commands behave like Unix tools when their reader goes away
//! (`stemedb check-config F | head -1`): they end quietly with success instead of panicking on
//! the broken pipe (exit code 101 before).

use std::process::{Command, Stdio};

fn stemedb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stemedb"))
}

/// Runs `command` with its stdout a pipe whose read end is closed at once (before the child
/// has started writing), and returns its exit status and stderr.
fn with_closed_stdout(mut command: Command) -> (std::process::ExitStatus, String) {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn stemedb");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait for stemedb");
    (output.status, String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/single-node.toml");
    let mut check = stemedb();
    check.arg("check-config").arg(&config);
    let mut sample = stemedb();
    sample.arg("print-sample-config");
    for (name, command) in [("check-config", check), ("print-sample-config", sample)] {
        let (status, stderr) = with_closed_stdout(command);
        assert!(status.success(), "{name} exited {status:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
}
