//! Metrics of backups (`cluster::backup`). The coordinator of a backup records its outcome; a
//! dashboard or alert takes the newest over the nodes (`max(...)`).

use std::sync::LazyLock;

use prometheus::{Gauge, IntCounter, IntCounterVec, Opts};

pub static LAST_SUCCESS: LazyLock<Gauge> = LazyLock::new(|| {
    Gauge::new(
        "stemedb_backup_last_success_timestamp_seconds",
        "Unix time at which the last backup this node coordinated finished successfully (0: none; kept across restarts)",
    )
    .expect("valid metric")
});

pub static DURATION: LazyLock<Gauge> = LazyLock::new(|| {
    Gauge::new("stemedb_backup_duration_seconds", "Duration of the last successful backup this node coordinated")
        .expect("valid metric")
});

pub static LAST_BYTES: LazyLock<Gauge> = LazyLock::new(|| {
    Gauge::new(
        "stemedb_backup_size_bytes",
        "Stored bytes of every file the last successful backup this node coordinated uses (shared files included)",
    )
    .expect("valid metric")
});

pub static BACKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new("stemedb_backups_total", "Backups this node coordinated, by result (success, failure)"),
        &["result"],
    )
    .expect("valid metric")
});

pub static FILE_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_backup_file_bytes_total",
            "Bytes of backup files this node's replica copies produced, by outcome (uploaded; reused: the store held the same file already)",
        ),
        &["outcome"],
    )
    .expect("valid metric")
});

pub static ARCHIVE_LAG_ENTRIES: LazyLock<Gauge> = LazyLock::new(|| {
    Gauge::new(
        "stemedb_backup_archive_lag_entries",
        "Committed log entries of the groups this node leads that are not archived yet (backup.archive_enabled)",
    )
    .expect("valid metric")
});

pub static ARCHIVE_LAG_SECONDS: LazyLock<Gauge> = LazyLock::new(|| {
    Gauge::new(
        "stemedb_backup_archive_lag_seconds",
        "Longest time since the log archive last held everything a group this node leads applied (0: caught up or archival off)",
    )
    .expect("valid metric")
});

pub static ARCHIVE_SEGMENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_backup_archive_segments_total",
            "Log segments this node shipped to the archive, by result (uploaded, failed: an upload or listing failed)",
        ),
        &["result"],
    )
    .expect("valid metric")
});

pub static ARCHIVE_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new("stemedb_backup_archive_bytes_total", "Bytes of log segments this node shipped to the archive")
        .expect("valid metric")
});

pub static ARCHIVE_GAPS: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_backup_archive_gaps_total",
        "Times a leader found its log no longer held entries not archived yet (a restore stops replaying at such a gap)",
    )
    .expect("valid metric")
});

pub fn collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    // Both series exist from the start, so rates and alerts see zeros rather than nothing.
    for result in ["success", "failure"] {
        BACKUPS.with_label_values(&[result]);
    }
    for outcome in ["uploaded", "reused"] {
        FILE_BYTES.with_label_values(&[outcome]);
    }
    for result in ["uploaded", "failed"] {
        ARCHIVE_SEGMENTS.with_label_values(&[result]);
    }
    vec![
        Box::new(LAST_SUCCESS.clone()),
        Box::new(DURATION.clone()),
        Box::new(LAST_BYTES.clone()),
        Box::new(BACKUPS.clone()),
        Box::new(FILE_BYTES.clone()),
        Box::new(ARCHIVE_LAG_ENTRIES.clone()),
        Box::new(ARCHIVE_LAG_SECONDS.clone()),
        Box::new(ARCHIVE_SEGMENTS.clone()),
        Box::new(ARCHIVE_BYTES.clone()),
        Box::new(ARCHIVE_GAPS.clone()),
    ]
}
