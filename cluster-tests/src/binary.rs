//! The `stemedb` binary the tests run, built from the code being tested.
//!
//! `cargo test -p stemedb-cluster-tests` builds this crate and the `stemedb` library, not the
//! `stemedb` binary, so a binary left in the target dir by an earlier build would be tested
//! instead of the code. The first test of a process that needs the binary therefore runs
//! `cargo build` for it, with the profile and target dir of the running test executable
//! (a no-op of about a second when it is fresh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

/// The longest the build may take: in a fresh target dir it compiles RocksDB (about 20 minutes
/// on 2 cores), and other builds may hold cargo's lock on the target dir first.
const BUILD_TIMEOUT: Duration = Duration::from_secs(90 * 60);

/// The `stemedb` binary: `STEMEDB_BIN` when set (used as it is), else this workspace's, built
/// first (once per test process) next to the running test executable.
pub fn stemedb_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("STEMEDB_BIN") {
        return Ok(PathBuf::from(path));
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(|| build().map_err(|error| format!("{error:#}"))).clone().map_err(anyhow::Error::msg)
}

/// `cargo build -p stemedb --bin stemedb` into the target dir and profile of the running test
/// executable, `<target dir>/<profile dir>/deps/<test>-<hash>`; returns the binary's path.
fn build() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("the test executable's path")?;
    let profile_dir =
        exe.parent().and_then(Path::parent).context("the test executable is not in <target>/<profile>/deps")?;
    let target_dir = profile_dir.parent().context("no target dir above the profile dir")?;
    // cargo's dev profile (and the test profile, which inherits it) builds into `debug`; every
    // other profile into a directory of its name.
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => bail!("the profile dir of {} has no name", exe.display()),
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("cluster-tests is not in a workspace")?
        .join("Cargo.toml");
    // cargo runs tests with CARGO set to itself, so the same toolchain builds the binary.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .args(["build", "--locked", "--profile", profile, "-p", "stemedb", "--bin", "stemedb"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    let described = format!("{command:?}");
    let mut child = command.spawn().with_context(|| format!("run {described}"))?;
    let deadline = Instant::now() + BUILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("wait for {described}"))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{described} took more than {BUILD_TIMEOUT:?}; set STEMEDB_BIN to test a binary built beforehand");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(status.success(), "{described} failed ({status}); see cargo's output above");
    let binary = profile_dir.join("stemedb");
    ensure!(binary.exists(), "{described} succeeded, but {} does not exist", binary.display());
    Ok(binary)
}
