//! The node's metrics registry and the metrics of the request path. Each layer keeps its own
//! metrics next to its code (`storage::metrics`, `raft::metrics`); this module registers them
//! all, adds process metrics, and renders Prometheus text for `/metrics`.
//!
//! `stemedb_query_latency_seconds` is a summary with `quantile` labels because the runbooks and
//! alert rules read it that way (`{quantile="0.99"}`); its quantiles cover a sliding window of
//! about a minute. `stemedb_query_duration_seconds` is the same measurement as a histogram with
//! buckets at the SLO thresholds, for aggregation across nodes.

pub mod heap_profile;

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use crate::model::lens::Lens;
use hdrhistogram::Histogram as Hdr;
use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};
use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

const WINDOW: Duration = Duration::from_secs(30);
const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// A summary over a sliding window: two HdrHistograms in rotation, so quantiles reflect the last
/// 30-60 seconds while `_sum` and `_count` are cumulative as Prometheus expects.
pub struct WindowedSummary {
    desc: Desc,
    state: Mutex<WindowState>,
}

struct WindowState {
    current: Hdr<u64>,
    previous: Hdr<u64>,
    rotated_at: Instant,
    count: u64,
    sum_seconds: f64,
}

fn new_hdr() -> Hdr<u64> {
    // 1 µs to 1 hour at 3 significant digits; creation cannot fail with these bounds.
    Hdr::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Hdr::new(3).expect("hdr histogram"))
}

impl WindowedSummary {
    pub fn new(name: &str, help: &str) -> WindowedSummary {
        WindowedSummary {
            desc: Desc::new(name.into(), help.into(), vec![], Default::default()).expect("valid metric desc"),
            state: Mutex::new(WindowState {
                current: new_hdr(),
                previous: new_hdr(),
                rotated_at: Instant::now(),
                count: 0,
                sum_seconds: 0.0,
            }),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let mut state = self.state.lock();
        state.rotate_if_due();
        let micros = (elapsed.as_micros() as u64).max(1);
        let _ = state.current.record(micros.min(3_600_000_000));
        state.count += 1;
        state.sum_seconds += elapsed.as_secs_f64();
    }
}

impl WindowState {
    fn rotate_if_due(&mut self) {
        if self.rotated_at.elapsed() >= WINDOW {
            self.previous = std::mem::replace(&mut self.current, new_hdr());
            if self.rotated_at.elapsed() >= WINDOW * 2 {
                self.previous.reset();
            }
            self.rotated_at = Instant::now();
        }
    }
}

impl Collector for WindowedSummary {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut state = self.state.lock();
        state.rotate_if_due();
        let mut merged = state.previous.clone();
        let _ = merged.add(&state.current);
        let quantiles = QUANTILES
            .iter()
            .map(|&q| (q, if merged.is_empty() { 0.0 } else { merged.value_at_quantile(q) as f64 / 1e6 }))
            .collect();
        vec![summary_family(&self.desc, state.count, state.sum_seconds, quantiles)]
    }
}

/// One summary without labels as a metric family: cumulative count and sum, and quantiles
/// given as (quantile, value) pairs.
fn summary_family(desc: &Desc, count: u64, sum: f64, quantiles: Vec<(f64, f64)>) -> MetricFamily {
    let mut summary = Summary::default();
    summary.set_sample_count(count);
    summary.set_sample_sum(sum);
    summary.set_quantile(
        quantiles
            .into_iter()
            .map(|(q, v)| {
                let mut quantile = Quantile::default();
                quantile.set_quantile(q);
                quantile.set_value(v);
                quantile
            })
            .collect(),
    );
    let mut metric = Metric::default();
    metric.set_summary(summary);
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(MetricType::SUMMARY);
    family.set_metric(vec![metric]);
    family
}

pub static QUERY_LATENCY: LazyLock<Arc<WindowedSummary>> = LazyLock::new(|| {
    Arc::new(WindowedSummary::new(
        "stemedb_query_latency_seconds",
        "Query latency over the last 30-60 s, as quantiles (cumulative sum and count)",
    ))
});

pub static QUERY_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        HistogramOpts::new("stemedb_query_duration_seconds", "Query latency, bucketed at the SLO thresholds")
            .buckets(vec![0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0]),
        &["lens"],
    )
    .expect("valid metric")
});

pub static QUERY_TOTAL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(Opts::new("stemedb_query_total", "Queries answered by this node"), &["node"])
        .expect("valid metric")
});

pub static SLOW_QUERIES: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    prometheus::IntCounter::new("stemedb_slow_queries_total", "Queries that took at least query.slow_query_ms")
        .expect("valid metric")
});

pub static QUERY_MEMORY_EXCEEDED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    prometheus::IntCounter::new(
        "stemedb_query_memory_exceeded_total",
        "Queries refused for holding more than query.max_memory_per_query_mb",
    )
    .expect("valid metric")
});

pub static QUERY_TIMEOUTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new("stemedb_query_timeout_total", "Queries that exceeded query.query_timeout_seconds"),
        &["node"],
    )
    .expect("valid metric")
});

pub static WRITE_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new("stemedb_write_duration_seconds", "Latency of assert, vote and retract requests")
            .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0, 5.0]),
    )
    .expect("valid metric")
});

pub static WRITE_LATENCY: LazyLock<Arc<WindowedSummary>> = LazyLock::new(|| {
    Arc::new(WindowedSummary::new("stemedb_write_latency_seconds", "Write latency over the last 30-60 s, as quantiles"))
});

/// Requests refused before any work because a bounded queue or limit was full, by `limit`
/// (`concurrency`: `server.max_concurrent_requests`; `write_queue`:
/// `limits.max_queued_writes_per_shard`; `read_pool`: the storage read queue).
pub static REQUESTS_SHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new("stemedb_requests_shed_total", "Requests answered 503 overloaded because a bound was reached"),
        &["limit"],
    )
    .expect("valid metric")
});

/// A node's metrics registry.
pub struct Metrics {
    registry: Registry,
    pub node_label: String,
    /// `stemedb_query_total` for this node and `stemedb_query_duration_seconds` per lens,
    /// resolved once: a label lookup hashes and locks on every query otherwise.
    query_total: prometheus::IntCounter,
    /// Indexed by `Lens as usize`, like `Lens::NAMES`.
    query_duration_by_lens: Vec<Histogram>,
}

impl Metrics {
    /// Builds the registry with this module's collectors, `layers`' (each layer's metrics live
    /// beside its code and are handed in by the node: nothing here imports a layer above) and
    /// the process collector.
    pub fn new(node_id: u64, layers: Vec<Box<dyn Collector>>) -> Metrics {
        let registry = Registry::new();
        let mut collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(ArcCollector(QUERY_LATENCY.clone())),
            Box::new(ArcCollector(WRITE_LATENCY.clone())),
            Box::new(QUERY_DURATION.clone()),
            Box::new(QUERY_TOTAL.clone()),
            Box::new(QUERY_TIMEOUTS.clone()),
            Box::new(SLOW_QUERIES.clone()),
            Box::new(QUERY_MEMORY_EXCEEDED.clone()),
            Box::new(WRITE_DURATION.clone()),
            Box::new(REQUESTS_SHED.clone()),
        ];
        collectors.extend(layers);
        #[cfg(target_os = "linux")]
        collectors.push(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        for collector in collectors {
            if let Err(error) = registry.register(collector) {
                tracing::warn!(error = %error, "metric registration failed");
            }
        }
        let node_label = node_id.to_string();
        // Every known label value exists from the start at 0: a dashboard shows 0, not "no
        // data", and `increase()` sees the first event after a start.
        QUERY_TIMEOUTS.with_label_values(&[&node_label]);
        for limit in ["concurrency", "write_queue", "read_pool", "transport"] {
            REQUESTS_SHED.with_label_values(&[limit]);
        }
        let query_total = QUERY_TOTAL.with_label_values(&[&node_label]);
        let query_duration_by_lens = Lens::NAMES.iter().map(|lens| QUERY_DURATION.with_label_values(&[lens])).collect();
        Metrics { registry, node_label, query_total, query_duration_by_lens }
    }

    /// Registers an extra collector (gauges computed at scrape time).
    pub fn register(&self, collector: Box<dyn Collector>) {
        if let Err(error) = self.registry.register(collector) {
            tracing::warn!(error = %error, "metric registration failed");
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %error, "metrics encoding failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    pub fn observe_query(&self, lens: Lens, elapsed: Duration) {
        QUERY_LATENCY.observe(elapsed);
        if let Some(histogram) = self.query_duration_by_lens.get(lens as usize) {
            histogram.observe(elapsed.as_secs_f64());
        }
        self.query_total.inc();
    }

    pub fn observe_write(&self, elapsed: Duration) {
        WRITE_LATENCY.observe(elapsed);
        WRITE_DURATION.observe(elapsed.as_secs_f64());
    }
}

/// Lets a shared summary be registered.
struct ArcCollector(Arc<WindowedSummary>);

impl Collector for ArcCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }
    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

/// A summary without labels whose count, sum and quantiles are computed when scraped, for
/// durations another component already aggregates (RocksDB's compaction times).
pub struct ComputedSummary {
    desc: Desc,
    compute: SummaryFn,
}

/// Returns (count, sum of seconds, [(quantile, seconds)]), or `None` to export nothing.
type SummaryFn = Box<dyn Fn() -> Option<(u64, f64, Vec<(f64, f64)>)> + Send + Sync>;

impl ComputedSummary {
    pub fn new(name: &str, help: &str, compute: SummaryFn) -> ComputedSummary {
        let desc = Desc::new(name.into(), help.into(), vec![], Default::default()).expect("valid metric desc");
        ComputedSummary { desc, compute }
    }
}

impl Collector for ComputedSummary {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some((count, sum, quantiles)) = (self.compute)() else { return vec![] };
        vec![summary_family(&self.desc, count, sum, quantiles)]
    }
}

/// A gauge family whose values are computed when scraped (or a counter family, made with
/// [`ComputedGauges::into_counter`], whose values only grow).
pub struct ComputedGauges {
    desc: Desc,
    labels: Vec<&'static str>,
    compute: GaugeFn,
    kind: MetricType,
}

type GaugeFn = Box<dyn Fn() -> Vec<(Vec<String>, f64)> + Send + Sync>;

impl ComputedGauges {
    /// A family with one label (or none when `label` is empty).
    pub fn new(
        name: &str,
        help: &str,
        label: &'static str,
        compute: Box<dyn Fn() -> Vec<(String, f64)> + Send + Sync>,
    ) -> ComputedGauges {
        let labels = if label.is_empty() { vec![] } else { vec![label] };
        let single = !label.is_empty();
        Self::with_labels(
            name,
            help,
            labels,
            Box::new(move || compute().into_iter().map(|(v, x)| (if single { vec![v] } else { vec![] }, x)).collect()),
        )
    }

    /// A family with several labels; `compute` returns label values in `labels` order.
    pub fn with_labels(name: &str, help: &str, labels: Vec<&'static str>, compute: GaugeFn) -> ComputedGauges {
        ComputedGauges {
            desc: Desc::new(
                name.into(),
                help.into(),
                labels.iter().map(|l| l.to_string()).collect(),
                Default::default(),
            )
            .expect("valid metric desc"),
            labels,
            compute,
            kind: MetricType::GAUGE,
        }
    }

    /// The same family typed as a counter: every series must never go down (but for a restart
    /// or a replaced shard group, which Prometheus reads as a counter reset).
    pub fn into_counter(self) -> ComputedGauges {
        ComputedGauges { kind: MetricType::COUNTER, ..self }
    }
}

impl Collector for ComputedGauges {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let metrics = (self.compute)()
            .into_iter()
            .map(|(label_values, value)| {
                let mut metric = Metric::default();
                if self.kind == MetricType::COUNTER {
                    let mut counter = prometheus::proto::Counter::default();
                    counter.set_value(value);
                    metric.set_counter(counter);
                } else {
                    let mut gauge = prometheus::proto::Gauge::default();
                    gauge.set_value(value);
                    metric.set_gauge(gauge);
                }
                let pairs = self
                    .labels
                    .iter()
                    .zip(label_values)
                    .map(|(name, value)| {
                        let mut pair = LabelPair::default();
                        pair.set_name(name.to_string());
                        pair.set_value(value);
                        pair
                    })
                    .collect();
                metric.set_label(pairs);
                metric
            })
            .collect();
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(self.kind);
        family.set_metric(metrics);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_renders_quantiles_the_runbooks_read() {
        let metrics = Metrics::new(1, Vec::new());
        for ms in 1..=100 {
            metrics.observe_query(Lens::Recency, Duration::from_millis(ms));
        }
        let text = metrics.render();
        let line =
            text.lines().find(|l| l.starts_with("stemedb_query_latency_seconds{quantile=\"0.99\"}")).expect("p99 line");
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("value");
        assert!((0.098..=0.101).contains(&value), "{line}");
        assert!(text.contains("stemedb_query_total{node=\"1\"}"));
        assert!(text.contains("stemedb_query_duration_seconds_bucket{lens=\"recency\",le=\"0.02\"}"));
        assert!(text.contains("process_resident_memory_bytes"));
    }
}
