//! The disk-space floor: the free space of the data dir's filesystem, sampled once a second
//! on a thread of its own, against `storage.min_free_bytes` and `storage.min_free_percent`.
//!
//! Below the floor the layers above refuse the writes that grow the data (new claims, votes,
//! retractions) with `507 insufficient_storage`; everything else goes on: reads, admin,
//! compaction, backups, and every write Raft makes for itself (votes, log truncation,
//! membership, the applies of entries already committed). The space the floor keeps free is
//! that reserve. When space comes back the next sample lifts the refusal: nothing has to be
//! restarted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::metrics;

/// How often the free space is sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// The configured floor: the greater of the two applies; both 0 turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DiskFloor {
    pub min_free_bytes: u64,
    /// Percent (0 to 50, as the config allows) of the filesystem's size.
    pub min_free_percent: f64,
}

impl DiskFloor {
    /// The floor in bytes on a filesystem of `size_bytes`.
    pub fn bytes(&self, size_bytes: u64) -> u64 {
        let by_percent = (size_bytes as f64 * self.min_free_percent / 100.0).ceil() as u64;
        self.min_free_bytes.max(by_percent)
    }

    pub fn is_off(&self) -> bool {
        self.min_free_bytes == 0 && self.min_free_percent <= 0.0
    }
}

/// Free space below the floor at the last sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BelowFloor {
    pub free_bytes: u64,
    pub floor_bytes: u64,
}

/// One reading of a filesystem: bytes an unprivileged writer may still use, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub available_bytes: u64,
    pub size_bytes: u64,
}

/// Reads the usage of the filesystem holding `path`.
pub fn usage(path: &Path) -> std::io::Result<Usage> {
    let stat = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    let unit = stat.f_frsize.max(1);
    Ok(Usage { available_bytes: stat.f_bavail.saturating_mul(unit), size_bytes: stat.f_blocks.saturating_mul(unit) })
}

/// The data dir's free space as last sampled, and whether it is below the floor.
#[derive(Debug)]
pub struct DiskSpace {
    path: PathBuf,
    floor: DiskFloor,
    free_bytes: AtomicU64,
    size_bytes: AtomicU64,
    below: AtomicBool,
}

impl DiskSpace {
    /// Samples `path` once (so the state is right from the start) and returns the monitor.
    pub fn new(path: &Path, floor: DiskFloor) -> Arc<DiskSpace> {
        let space = Arc::new(DiskSpace {
            path: path.to_path_buf(),
            floor,
            free_bytes: AtomicU64::new(u64::MAX),
            size_bytes: AtomicU64::new(0),
            below: AtomicBool::new(false),
        });
        space.sample();
        space
    }

    /// Reads the filesystem now and updates the state and the metrics. A failed read keeps the
    /// last state (and logs): a transient error never starts or lifts a refusal by itself.
    pub fn sample(&self) {
        match usage(&self.path) {
            Ok(usage) => self.record(usage),
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "could not read the data dir's free space")
            }
        }
    }

    fn record(&self, usage: Usage) {
        let floor = self.floor.bytes(usage.size_bytes);
        self.free_bytes.store(usage.available_bytes, Ordering::Release);
        self.size_bytes.store(usage.size_bytes, Ordering::Release);
        let below = !self.floor.is_off() && usage.available_bytes < floor;
        let was = self.below.swap(below, Ordering::AcqRel);
        metrics::DISK_FREE_BYTES.set(usage.available_bytes as i64);
        metrics::DISK_SIZE_BYTES.set(usage.size_bytes as i64);
        metrics::DISK_FLOOR_BYTES.set(if self.floor.is_off() { 0 } else { floor as i64 });
        metrics::BELOW_DISK_FLOOR.set(i64::from(below));
        if below && !was {
            tracing::error!(
                path = %self.path.display(),
                free_bytes = usage.available_bytes,
                floor_bytes = floor,
                "free space below the floor (storage.min_free_bytes, storage.min_free_percent): refusing writes; reads go on"
            );
        } else if was && !below {
            tracing::info!(
                path = %self.path.display(),
                free_bytes = usage.available_bytes,
                floor_bytes = floor,
                "free space back above the floor: taking writes again"
            );
        }
    }

    /// `Some` while the last sample was below the floor.
    pub fn below_floor(&self) -> Option<BelowFloor> {
        if !self.below.load(Ordering::Acquire) {
            return None;
        }
        let free_bytes = self.free_bytes.load(Ordering::Acquire);
        Some(BelowFloor { free_bytes, floor_bytes: self.floor.bytes(self.size_bytes.load(Ordering::Acquire)) })
    }

    /// Samples every [`SAMPLE_INTERVAL`] on a thread of its own until the returned sender is
    /// dropped.
    pub fn start_sampling(self: &Arc<DiskSpace>) -> std::sync::mpsc::Sender<()> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let space = self.clone();
        let spawned = std::thread::Builder::new().name("stemedb-disk".into()).spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(SAMPLE_INTERVAL) {
                space.sample();
            }
        });
        if let Err(error) = spawned {
            tracing::error!(%error, "could not start the free-space sampler; the floor is checked only at start");
        }
        stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_greater_of_the_two_limits_is_the_floor() {
        let floor = DiskFloor { min_free_bytes: 100, min_free_percent: 10.0 };
        assert_eq!(floor.bytes(500), 100);
        assert_eq!(floor.bytes(5_000), 500);
        assert_eq!(DiskFloor { min_free_bytes: 0, min_free_percent: 0.5 }.bytes(1_001), 6, "rounded up");
        assert!(DiskFloor::default().is_off());
        assert!(!floor.is_off());
    }

    #[test]
    fn the_state_follows_the_samples_both_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        let space = DiskSpace::new(dir.path(), DiskFloor { min_free_bytes: 1_000, min_free_percent: 0.0 });
        space.record(Usage { available_bytes: 999, size_bytes: 10_000 });
        assert_eq!(space.below_floor(), Some(BelowFloor { free_bytes: 999, floor_bytes: 1_000 }));
        space.record(Usage { available_bytes: 1_000, size_bytes: 10_000 });
        assert_eq!(space.below_floor(), None, "at the floor is not below it");
        let off = DiskSpace::new(dir.path(), DiskFloor::default());
        off.record(Usage { available_bytes: 0, size_bytes: 10_000 });
        assert_eq!(off.below_floor(), None, "no floor configured");
    }

    #[test]
    fn a_real_filesystem_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let usage = usage(dir.path()).expect("statvfs");
        assert!(usage.size_bytes > 0 && usage.available_bytes <= usage.size_bytes);
        let huge = DiskSpace::new(dir.path(), DiskFloor { min_free_bytes: u64::MAX, min_free_percent: 0.0 });
        assert!(huge.below_floor().is_some(), "no disk has u64::MAX bytes free");
    }
}
