//! Metrics of backups (`cluster::backup`). The coordinator of a backup records its outcome; a
//! dashboard or alert takes the newest over the nodes (`max(...)`).

use std::sync::LazyLock;

use prometheus::{Gauge, IntCounterVec, Opts};

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

pub fn collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    // Both series exist from the start, so rates and alerts see zeros rather than nothing.
    for result in ["success", "failure"] {
        BACKUPS.with_label_values(&[result]);
    }
    for outcome in ["uploaded", "reused"] {
        FILE_BYTES.with_label_values(&[outcome]);
    }
    vec![
        Box::new(LAST_SUCCESS.clone()),
        Box::new(DURATION.clone()),
        Box::new(LAST_BYTES.clone()),
        Box::new(BACKUPS.clone()),
        Box::new(FILE_BYTES.clone()),
    ]
}
