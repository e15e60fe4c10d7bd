//! Storage metrics, registered in the node's registry by [`crate::metrics`].

use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

pub static STORAGE_OPERATION_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_storage_operation_errors_total",
            "Storage operations that failed, by operation and kind (corruption: damaged data on disk; io: an I/O error such as a full disk; other)",
        ),
        &["operation", "kind"],
    )
    .expect("valid metric")
});

/// The `kind` label values of `stemedb_storage_operation_errors_total`.
pub const ERROR_KINDS: [&str; 3] = ["corruption", "io", "other"];

pub static LOST_FILES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_storage_lost_files_total",
            "Table files found damaged at start and set aside by a repair (storage.verify_on_start), by column family and file",
        ),
        &["family", "file"],
    )
    .expect("valid metric")
});

pub static STORAGE_OPERATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_storage_operations_total",
            "Storage operations attempted, by operation (get: one per key read; scan: one per range read; put: one \
             per write batch; sync, fsync, flush: one per call); the denominator of the storage error rate",
        ),
        &["operation"],
    )
    .expect("valid metric")
});

/// The counter of one operation, looked up once (the hot paths count every call).
macro_rules! operation_counter {
    ($name:ident, $label:literal) => {
        pub static $name: LazyLock<IntCounter> = LazyLock::new(|| STORAGE_OPERATIONS.with_label_values(&[$label]));
    };
}
operation_counter!(OPS_GET, "get");
operation_counter!(OPS_SCAN, "scan");
operation_counter!(OPS_PUT, "put");
operation_counter!(OPS_SYNC, "sync");
operation_counter!(OPS_FLUSH, "flush");
operation_counter!(OPS_FSYNC, "fsync");

pub static STORAGE_PUT_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new("stemedb_storage_put_duration_seconds", "Duration of one storage write batch")
            .buckets(vec![0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5]),
    )
    .expect("valid metric")
});

pub static STORAGE_WRITTEN_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_storage_written_bytes_total",
        "Key and value bytes written to storage (deletes: their keys; range deletes: both bounds)",
    )
    .expect("valid metric")
});

pub static LOG_FSYNC_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "stemedb_raft_log_fsync_duration_seconds",
            "Duration of one group-commit sync of the Raft log (writing out the WAL buffer, then fsync)",
        )
        .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5]),
    )
    .expect("valid metric")
});

pub static GROUP_COMMIT_SIZE: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "stemedb_raft_log_group_commit_appends",
            "Raft log appends written and made durable by one group-commit round",
        )
        .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
    )
    .expect("valid metric")
});

/// The storage pools' queues (`storage::pool`), by pool (`read`, `apply`).
pub static POOL_QUEUED_JOBS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new("stemedb_storage_pool_queued_jobs", "Jobs waiting for a thread of a storage pool, by pool"),
        &["pool"],
    )
    .expect("valid metric")
});

pub static POOL_QUEUE_CAPACITY: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new(
            "stemedb_storage_pool_queue_capacity",
            "Jobs a storage pool's queue holds; past it reads are refused 503 overloaded and applies run in place",
        ),
        &["pool"],
    )
    .expect("valid metric")
});

pub static POOL_WAIT: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        HistogramOpts::new(
            "stemedb_storage_pool_wait_seconds",
            "Time a storage pool job waited in the queue before a thread took it, by pool",
        )
        .buckets(vec![
            0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["pool"],
    )
    .expect("valid metric")
});

pub static POOL_RAN_IN_PLACE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "stemedb_storage_pool_ran_in_place_total",
            "Storage pool jobs run on a blocking thread of their own because the pool's queue was full, by pool",
        ),
        &["pool"],
    )
    .expect("valid metric")
});

/// A gauge of the disk-space floor (`storage::disk`).
macro_rules! disk_gauge {
    ($name:ident, $metric:literal, $help:literal) => {
        pub static $name: LazyLock<IntGauge> = LazyLock::new(|| IntGauge::new($metric, $help).expect("valid metric"));
    };
}
disk_gauge!(
    DISK_FREE_BYTES,
    "stemedb_storage_disk_free_bytes",
    "Bytes free for the node on the data dir's filesystem (statvfs f_bavail), sampled every second"
);
disk_gauge!(DISK_SIZE_BYTES, "stemedb_storage_disk_size_bytes", "Size of the data dir's filesystem in bytes");
disk_gauge!(
    DISK_FLOOR_BYTES,
    "stemedb_storage_disk_floor_bytes",
    "The free-space floor in bytes: the greater of storage.min_free_bytes and storage.min_free_percent of the size (0: off)"
);
disk_gauge!(
    BELOW_DISK_FLOOR,
    "stemedb_storage_below_disk_floor",
    "1 while the data dir's free space is below the floor and writes are refused (507 insufficient_storage), else 0"
);

pub static WRITES_REFUSED_BELOW_FLOOR: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "stemedb_storage_floor_refused_writes_total",
        "Writes refused with 507 insufficient_storage because the data dir's free space was below the floor",
    )
    .expect("valid metric")
});

/// Every storage collector, for registration. The known label values start at 0.
pub fn collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    for operation in ["get", "scan", "put", "sync", "flush", "fsync"] {
        for kind in ERROR_KINDS {
            STORAGE_OPERATION_ERRORS.with_label_values(&[operation, kind]);
        }
        STORAGE_OPERATIONS.with_label_values(&[operation]);
    }
    for (pool, capacity) in [("read", super::pool::READ_QUEUE), ("apply", super::pool::APPLY_QUEUE)] {
        POOL_QUEUE_CAPACITY.with_label_values(&[pool]).set(capacity as i64);
        POOL_QUEUED_JOBS.with_label_values(&[pool]);
        POOL_WAIT.with_label_values(&[pool]);
        POOL_RAN_IN_PLACE.with_label_values(&[pool]);
    }
    vec![
        Box::new(POOL_QUEUED_JOBS.clone()),
        Box::new(POOL_QUEUE_CAPACITY.clone()),
        Box::new(POOL_WAIT.clone()),
        Box::new(POOL_RAN_IN_PLACE.clone()),
        Box::new(STORAGE_OPERATION_ERRORS.clone()),
        Box::new(STORAGE_OPERATIONS.clone()),
        Box::new(LOST_FILES.clone()),
        Box::new(STORAGE_PUT_DURATION.clone()),
        Box::new(STORAGE_WRITTEN_BYTES.clone()),
        Box::new(LOG_FSYNC_DURATION.clone()),
        Box::new(GROUP_COMMIT_SIZE.clone()),
        Box::new(DISK_FREE_BYTES.clone()),
        Box::new(DISK_SIZE_BYTES.clone()),
        Box::new(DISK_FLOOR_BYTES.clone()),
        Box::new(BELOW_DISK_FLOOR.clone()),
        Box::new(WRITES_REFUSED_BELOW_FLOOR.clone()),
    ]
}
