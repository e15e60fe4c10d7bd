//! The heap profiler and the allocator's own statistics. The binary allocates through jemalloc,
//! built with its sampling heap profiler (`--enable-prof`) and configured at build time with
//! `prof:true,prof_active:false,lg_prof_sample:19` (`.cargo/config.toml`): profiling is
//! compiled in, and this module switches sampling on at start-up when `debug.heap_profiling` is
//! set. A sampled allocation (one per 512 KiB allocated, on average) records its call stack;
//! a dump writes every live sampled stack, scaled to estimated bytes, in jemalloc's heap-profile
//! format, which `jeprof` reads together with the `stemedb` binary.
//!
//! This module is the only one that talks to the allocator's control interface (`mallctl`).
//! Dumps go to `<data_dir>/heap-profiles/heap-<UTC time>.prof`; the newest
//! `debug.heap_profiles_kept` are kept and older ones are deleted.
//!
//! Environment overrides work as jemalloc documents them: `MALLOC_CONF=lg_prof_sample:17` makes
//! sampling finer, `MALLOC_CONF=prof:false` turns the profiler off (dumps then answer 501).

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::ErrorCode;
use parking_lot::Mutex;
use serde::Serialize;

/// Heap-profiling failures, each with one stable code and HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum HeapProfileError {
    /// The running binary's allocator has no profiler (`MALLOC_CONF=prof:false`, or a build
    /// without jemalloc's profiling).
    #[error("heap profiling is not available in this process: {reason}")]
    Unavailable { reason: String },
    #[error("no heap profile has been taken yet: take one with POST /v1/admin/debug/heap-profile")]
    NoProfile,
    #[error("heap profile {name:?} does not exist (GET /v1/admin/debug/heap-profile lists them)")]
    UnknownProfile { name: String },
    #[error("{name:?} is not a heap profile name: expected heap-<time>.prof as listed")]
    BadName { name: String },
    #[error("heap profile {path}: {message}")]
    Io { path: String, message: String },
    #[error("the allocator refused {control}: {message}")]
    Allocator { control: &'static str, message: String },
}

impl HeapProfileError {
    pub fn code(&self) -> ErrorCode {
        match self {
            HeapProfileError::Unavailable { .. } => ErrorCode::HeapProfilingUnavailable,
            HeapProfileError::NoProfile => ErrorCode::NoHeapProfile,
            HeapProfileError::UnknownProfile { .. } => ErrorCode::HeapProfileNotFound,
            HeapProfileError::BadName { .. } => ErrorCode::InvalidHeapProfileName,
            HeapProfileError::Io { .. } | HeapProfileError::Allocator { .. } => ErrorCode::HeapProfileFailed,
        }
    }

    fn io(path: &Path, error: std::io::Error) -> HeapProfileError {
        HeapProfileError::Io { path: path.display().to_string(), message: error.to_string() }
    }
}

/// One dump on disk.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ProfileFile {
    pub name: String,
    pub path: String,
    pub bytes: u64,
    /// RFC 3339 time of the dump (from the file's name).
    pub taken_at: String,
}

/// What `GET /v1/admin/debug/heap-profile` reports.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HeapProfileStatus {
    /// Whether the allocator has a profiler at all.
    pub available: bool,
    /// Whether allocations are being sampled now.
    pub sampling: bool,
    /// When sampling was last switched on by this node (RFC 3339), if it was.
    #[schema(required = true)]
    pub sampling_since: Option<String>,
    /// Average bytes allocated between two samples.
    #[schema(required = true)]
    pub sample_interval_bytes: Option<u64>,
    /// Dumps on disk, newest first.
    pub profiles: Vec<ProfileFile>,
    /// The running binary, which `jeprof` needs to name the functions in a profile.
    #[schema(required = true)]
    pub binary: Option<String>,
}

/// The allocator's statistics (jemalloc `stats.*`), for the process metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AllocatorStats {
    /// Bytes allocated by the program and not yet freed.
    pub allocated: u64,
    /// Bytes in pages that hold allocations (allocated plus fragmentation within them).
    pub active: u64,
    /// Bytes in physically resident pages the allocator maps, metadata included.
    pub resident: u64,
    /// Bytes the allocator uses for its own metadata (the profiler's included).
    pub metadata: u64,
}

/// Reads the allocator's statistics as of now, or `None` when the allocator is not jemalloc
/// with statistics.
pub fn allocator_stats() -> Option<AllocatorStats> {
    // Statistics are cached by jemalloc and refreshed when the epoch advances.
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    Some(AllocatorStats {
        allocated: tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64,
        active: tikv_jemalloc_ctl::stats::active::read().ok()? as u64,
        resident: tikv_jemalloc_ctl::stats::resident::read().ok()? as u64,
        metadata: tikv_jemalloc_ctl::stats::metadata::read().ok()? as u64,
    })
}

/// The node's heap profiler: sampling control and dumps, one dump at a time.
pub struct HeapProfiler {
    dir: PathBuf,
    keep: usize,
    /// When this node last switched sampling on; held only briefly, so status answers never
    /// wait for a dump.
    sampling_since: Mutex<Option<SystemTime>>,
    /// Serializes dumps and pruning, which take milliseconds to hundreds of milliseconds.
    dumping: Mutex<()>,
}

const PROFILE_PREFIX: &str = "heap-";
const PROFILE_SUFFIX: &str = ".prof";
/// Name layout: `heap-YYYYmmddTHHMMSS.mmmZ.prof`; lexical order is time order.
const NAME_TIME_FORMAT: &str = "%Y%m%dT%H%M%S%.3fZ";

impl HeapProfiler {
    /// A profiler that writes dumps to `dir` and keeps the newest `keep` of them.
    pub fn new(dir: PathBuf, keep: usize) -> HeapProfiler {
        HeapProfiler { dir, keep: keep.max(1), sampling_since: Mutex::new(None), dumping: Mutex::new(()) }
    }

    /// Whether the allocator has a profiler (jemalloc's `opt.prof`).
    pub fn available() -> bool {
        tikv_jemalloc_ctl::profiling::prof::read().unwrap_or(false)
    }

    /// Whether allocations are being sampled now (`prof.active`).
    pub fn sampling() -> bool {
        // SAFETY: `prof.active` is a bool control; reading it has no side effects.
        Self::available() && unsafe { tikv_jemalloc_ctl::raw::read::<bool>(b"prof.active\0") }.unwrap_or(false)
    }

    /// Switches sampling on or off. Samples already taken stay in later dumps while their
    /// allocations live.
    pub fn set_sampling(&self, on: bool) -> Result<(), HeapProfileError> {
        require_available()?;
        let mut sampling_since = self.sampling_since.lock();
        // SAFETY: `prof.active` takes a bool.
        unsafe { tikv_jemalloc_ctl::raw::write(b"prof.active\0", on) }
            .map_err(|e| HeapProfileError::Allocator { control: "prof.active", message: e.to_string() })?;
        if on && sampling_since.is_none() {
            *sampling_since = Some(SystemTime::now());
        } else if !on {
            *sampling_since = None;
        }
        tracing::info!(sampling = on, "heap profile sampling switched");
        Ok(())
    }

    /// Average bytes between samples (`2^prof.lg_sample`).
    pub fn sample_interval_bytes() -> Option<u64> {
        // SAFETY: `prof.lg_sample` is a size_t control; reading it has no side effects.
        let lg = unsafe { tikv_jemalloc_ctl::raw::read::<libc::size_t>(b"prof.lg_sample\0") }.ok()?;
        1u64.checked_shl(lg as u32)
    }

    /// When this node last switched sampling on (RFC 3339), if it is on.
    pub fn sampling_since(&self) -> Option<String> {
        self.sampling_since.lock().map(rfc3339)
    }

    /// The running binary, which `jeprof` needs to name the functions in a profile.
    pub fn binary() -> Option<String> {
        std::env::current_exe().ok().map(|p| p.display().to_string())
    }

    pub fn status(&self) -> HeapProfileStatus {
        let available = Self::available();
        HeapProfileStatus {
            available,
            sampling: Self::sampling(),
            sampling_since: self.sampling_since(),
            sample_interval_bytes: if available { Self::sample_interval_bytes() } else { None },
            profiles: self.list().unwrap_or_default(),
            binary: Self::binary(),
        }
    }

    /// Dumps the live sampled allocations to a new file and prunes old dumps. Blocking (it
    /// walks every sampled stack and writes a file): call it off the async workers.
    pub fn dump(&self) -> Result<ProfileFile, HeapProfileError> {
        require_available()?;
        let _serialized = self.dumping.lock();
        std::fs::create_dir_all(&self.dir).map_err(|e| HeapProfileError::io(&self.dir, e))?;
        let mut at = chrono::Utc::now();
        let mut path = self.dir.join(profile_name(at));
        // Two dumps within one millisecond: the second takes the next free millisecond's name.
        while path.exists() {
            at += chrono::Duration::milliseconds(1);
            path = self.dir.join(profile_name(at));
        }
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| HeapProfileError::Io { path: path.display().to_string(), message: "path has a NUL".into() })?;
        let pointer: *const c_char = c_path.as_ptr();
        // SAFETY: `prof.dump` takes a `const char *` file name; `c_path` outlives the call and
        // jemalloc does not keep the pointer.
        unsafe { tikv_jemalloc_ctl::raw::write(b"prof.dump\0", pointer) }
            .map_err(|e| HeapProfileError::Allocator { control: "prof.dump", message: e.to_string() })?;
        let file = describe(&path)?;
        tracing::info!(path = %file.path, bytes = file.bytes, "heap profile written");
        self.prune()?;
        Ok(file)
    }

    /// Dumps on disk, newest first.
    pub fn list(&self) -> Result<Vec<ProfileFile>, HeapProfileError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HeapProfileError::io(&self.dir, e)),
        };
        let mut files = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if parse_profile_time(&name).is_some() {
                files.push(describe(&entry.path())?);
            }
        }
        files.sort_by(|a, b| b.name.cmp(&a.name));
        Ok(files)
    }

    /// The path of the named dump, or of the newest one when `name` is `None`.
    pub fn find(&self, name: Option<&str>) -> Result<PathBuf, HeapProfileError> {
        match name {
            Some(name) => {
                if parse_profile_time(name).is_none() {
                    return Err(HeapProfileError::BadName { name: name.to_string() });
                }
                let path = self.dir.join(name);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(HeapProfileError::UnknownProfile { name: name.to_string() })
                }
            }
            None => self.list()?.first().map(|f| PathBuf::from(&f.path)).ok_or(HeapProfileError::NoProfile),
        }
    }

    /// The named dump's (or the newest dump's) file name and bytes. Blocking. A dump pruned
    /// between finding and reading it is reported as missing, not as a failure.
    pub fn read(&self, name: Option<&str>) -> Result<(String, Vec<u8>), HeapProfileError> {
        let path = self.find(name)?;
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match std::fs::read(&path) {
            Ok(bytes) => Ok((file_name, bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(HeapProfileError::UnknownProfile { name: file_name })
            }
            Err(e) => Err(HeapProfileError::io(&path, e)),
        }
    }

    fn prune(&self) -> Result<(), HeapProfileError> {
        for old in self.list()?.iter().skip(self.keep) {
            let path = Path::new(&old.path);
            std::fs::remove_file(path).map_err(|e| HeapProfileError::io(path, e))?;
        }
        Ok(())
    }
}

fn require_available() -> Result<(), HeapProfileError> {
    if HeapProfiler::available() {
        return Ok(());
    }
    Err(HeapProfileError::Unavailable {
        reason: "the allocator's profiler is off (MALLOC_CONF=prof:false, or a build without jemalloc profiling)"
            .into(),
    })
}

fn profile_name(at: chrono::DateTime<chrono::Utc>) -> String {
    format!("{PROFILE_PREFIX}{}{PROFILE_SUFFIX}", at.format(NAME_TIME_FORMAT))
}

/// The time in a dump's file name, or `None` when the name is not one this module writes
/// (which also rejects path separators and `..`).
fn parse_profile_time(name: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let stamp = name.strip_prefix(PROFILE_PREFIX)?.strip_suffix(PROFILE_SUFFIX)?;
    let naive = chrono::NaiveDateTime::parse_from_str(stamp.strip_suffix('Z')?, "%Y%m%dT%H%M%S%.3f").ok()?;
    let at = naive.and_utc();
    (profile_name(at) == name).then_some(at)
}

fn describe(path: &Path) -> Result<ProfileFile, HeapProfileError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let bytes = std::fs::metadata(path).map_err(|e| HeapProfileError::io(path, e))?.len();
    let taken_at =
        parse_profile_time(&name).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).unwrap_or_default();
    Ok(ProfileFile { name, path: path.display().to_string(), bytes, taken_at })
}

fn rfc3339(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_names_round_trip_and_sort_by_time() {
        let earlier = chrono::DateTime::parse_from_rfc3339("2026-11-23T09:05:01.007Z").unwrap().to_utc();
        let later = earlier + chrono::Duration::milliseconds(995);
        assert_eq!(profile_name(earlier), "heap-20261123T090501.007Z.prof");
        assert_eq!(parse_profile_time(&profile_name(earlier)), Some(earlier));
        assert!(profile_name(later) > profile_name(earlier));
    }

    #[test]
    fn names_this_module_does_not_write_are_refused() {
        for name in [
            "",
            "heap-.prof",
            "../heap-20261123T090501.007Z.prof",
            "heap-20261123T090501.007Z.prof/x",
            "heap-20261123T090501Z.prof",
            "heap-20261123T090501.007Z.heap",
            "heap-20261323T090501.007Z.prof",
            "jeprof.123.0.m0.heap",
        ] {
            assert_eq!(parse_profile_time(name), None, "{name:?}");
        }
    }

    #[test]
    fn dumps_are_listed_newest_first_and_pruned_to_the_kept_number() {
        // Every binary of this crate allocates through jemalloc with the profiler compiled in
        // (`.cargo/config.toml`), the test binaries included.
        assert!(HeapProfiler::available(), "jemalloc's profiler is not compiled in");
        let dir = tempfile::tempdir().unwrap();
        let profiler = HeapProfiler::new(dir.path().join("heap-profiles"), 2);
        assert!(matches!(profiler.find(None), Err(HeapProfileError::NoProfile)));
        profiler.set_sampling(true).unwrap();
        assert!(HeapProfiler::sampling());
        assert_eq!(HeapProfiler::sample_interval_bytes(), Some(1 << 19));
        let taken: Vec<ProfileFile> = (0..3).map(|_| profiler.dump().unwrap()).collect();
        let text = std::fs::read_to_string(&taken[2].path).unwrap();
        assert!(text.starts_with("heap_v2/524288"), "{}", &text[..text.len().min(80)]);
        assert!(text.contains("MAPPED_LIBRARIES:"));
        let listed = profiler.status().profiles;
        assert_eq!(listed, vec![taken[2].clone(), taken[1].clone()], "newest two kept, newest first");
        assert!(!Path::new(&taken[0].path).exists());
        assert_eq!(profiler.find(None).unwrap(), PathBuf::from(&taken[2].path));
        let (newest, bytes) = profiler.read(None).unwrap();
        assert_eq!((newest.as_str(), bytes.as_slice()), (taken[2].name.as_str(), text.as_bytes()));
        assert_eq!(profiler.find(Some(&taken[1].name)).unwrap(), PathBuf::from(&taken[1].path));
        assert!(matches!(profiler.find(Some(&taken[0].name)), Err(HeapProfileError::UnknownProfile { .. })));
        assert!(matches!(profiler.find(Some("../etc/passwd")), Err(HeapProfileError::BadName { .. })));
    }
}
