//! Ports for test nodes that nothing else takes while a test holds them.
//!
//! A test cluster must know its nodes' ports before it starts them (every founding node lists
//! the others' Raft addresses, the link proxies forward to them) and a restarted node binds the
//! same ports again. A port picked with `bind(0)` and released for the node comes from the
//! kernel's ephemeral range, where any outgoing connection (a proxy's, a client's, another test
//! process's) can be given it as its local port before the node binds it, or while the node is
//! down. So ports are leased from below the ephemeral range, where the kernel hands out none, and
//! each lease holds an exclusive `flock` on a file named after the port, which every test thread
//! and process that leases ports respects. The lock goes with the lease, or with the process if
//! it dies.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use anyhow::{bail, Context};
use rand::Rng;

/// Ports below this are left alone: well-known services and StemeDB's own defaults (18180-18182)
/// live there.
const LOWEST_PORT: u16 = 20_000;

/// One port, reserved for as long as the lease lives.
#[derive(Debug)]
pub struct PortLease {
    pub port: u16,
    /// Holds the `flock`; closing it releases the port.
    _lock: File,
}

/// Leases a port no other lease holds and nothing listens on.
pub fn lease_port() -> anyhow::Result<PortLease> {
    let range = lease_range()?;
    let dir = std::env::temp_dir().join("stemedb-test-ports");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let span = u32::from(range.1 - range.0);
    let first = rand::rng().random_range(0..span);
    // Every port of the range at most once, from a random start so that concurrent tests rarely
    // try the same ports: bounded however many are taken.
    for offset in 0..span {
        let port = range.0 + ((first + offset) % span) as u16;
        if let Some(lease) = try_lease(dir.join(format!("{port}.lock")), port)? {
            return Ok(lease);
        }
    }
    bail!("no free port in {}-{}: every one is leased or in use", range.0, range.1 - 1)
}

fn try_lease(path: PathBuf, port: u16) -> anyhow::Result<Option<PortLease>> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(None);
    }
    // Leased, but a process that takes no leases (or a node left over from a crashed test
    // process) may listen on it.
    if TcpListener::bind(("127.0.0.1", port)).is_err() {
        return Ok(None);
    }
    Ok(Some(PortLease { port, _lock: lock }))
}

/// `[from, to)`: from [`LOWEST_PORT`] up to the kernel's ephemeral range.
fn lease_range() -> anyhow::Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    Ok((LOWEST_PORT, ephemeral_low(&text)?))
}

/// The first port of the ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), when at
/// least 1000 ports lie between [`LOWEST_PORT`] and it; Linux's default when the file is missing.
fn ephemeral_low(range_file: &str) -> anyhow::Result<u16> {
    let low = match range_file.split_whitespace().next() {
        Some(low) => low.parse().with_context(|| format!("ip_local_port_range {range_file:?}"))?,
        None => 32_768,
    };
    if low < LOWEST_PORT.saturating_add(1000) {
        bail!("the ephemeral port range starts at {low}: test nodes need ports {LOWEST_PORT}-{low} (at least 1000)");
    }
    Ok(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_and_below_the_ephemeral_range() {
        let low = lease_range().expect("range").1;
        let leases: Vec<PortLease> = (0..50).map(|_| lease_port().expect("a port")).collect();
        let mut ports: Vec<u16> = leases.iter().map(|l| l.port).collect();
        assert!(ports.iter().all(|p| (LOWEST_PORT..low).contains(p)), "{ports:?}");
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 50, "a port leased twice");
        let port = leases[0].port;
        let path = std::env::temp_dir().join("stemedb-test-ports").join(format!("{port}.lock"));
        assert!(try_lease(path.clone(), port).expect("try").is_none(), "a held lease is refused");
        drop(leases);
        assert!(try_lease(path, port).expect("try").is_some(), "a dropped lease is free again");
    }

    #[test]
    fn the_range_ends_where_the_kernel_starts_handing_out_ports() {
        assert_eq!(ephemeral_low("32768\t60999\n").expect("default"), 32768);
        assert_eq!(ephemeral_low("").expect("missing file"), 32768);
        assert!(ephemeral_low("20500 60999").is_err(), "too few ports below it");
        assert!(ephemeral_low("x 60999").is_err());
    }
}
