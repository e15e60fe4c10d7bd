//! `stemedb bench`: a load generator against any node's client API. Concurrent writers (single
//! assertions or batches) and/or readers for a fixed duration; prints throughput, latency
//! percentiles (HdrHistogram) and errors by kind. `--target etcd` runs the same load shape against
//! an etcd cluster's gRPC KV service, the reference of `scripts/bench-vs-etcd.sh`.
//!
//! Two load models. Closed loop (the default): every client sends its next request as soon as
//! the previous answer arrives, so the run measures the most the node serves, and the latency
//! at that saturation follows from it (Little's law: mean latency = clients / throughput).
//! Open loop (`--rate`): clients send on a fixed schedule, whatever the node does, and a
//! request's latency counts from when it was due, not from when a client that was still
//! waiting for an earlier answer got round to sending it (the coordinated-omission correction
//! of wrk2). That is the latency users see at a given load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// What `stemedb bench` loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// StemeDB's client API: single assertions or batches, and lens queries.
    Stemedb,
    /// An etcd cluster's v3 KV service over gRPC (the reference of scripts/bench-vs-etcd.sh):
    /// writes are `Put`s of `--value-size` bytes, reads are `Range`s of one key, linearizable
    /// unless `--consistency stale` (then serializable).
    Etcd,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Client API base URLs of the node(s) to load, comma separated; clients are spread over them.
    /// With `--target etcd`: etcd client URLs (http://127.0.0.1:2379,...).
    #[arg(long, default_value = "http://127.0.0.1:18180", value_delimiter = ',')]
    pub url: Vec<String>,
    /// The system to load.
    #[arg(long, value_enum, default_value = "stemedb")]
    pub target: Target,
    /// A bearer token for nodes with `security.tokens` (a `write` token; `admin` with
    /// `--authority-grants`, which sets a root authority).
    #[arg(long)]
    pub token: Option<String>,
    /// The PEM CA certificate that signed the nodes' server.tls_cert_file: needed for https://
    /// URLs (the load connections trust only it).
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// Concurrent writer clients.
    #[arg(long, default_value_t = 64)]
    pub writers: usize,
    /// Concurrent reader clients.
    #[arg(long, default_value_t = 0)]
    pub readers: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Bytes of each assertion's value (a JSON string of this length).
    #[arg(long, default_value_t = 64)]
    pub value_size: usize,
    /// Distinct concept paths written and read.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Items per write: 1 uses `/v1/assert`, more uses `/v1/assert/batch`.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Lens the readers query with.
    #[arg(long, default_value = "recency")]
    pub lens: String,
    /// Read consistency: linearizable or stale.
    #[arg(long, default_value = "linearizable")]
    pub consistency: String,
    /// Concept path prefix, so runs do not mix their data.
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Seed the read key space with one assertion per key before measuring.
    #[arg(long)]
    pub preload: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Before measuring, create this many authority grants (chains from a root `bench-root`
    /// under the prefix) and, with --preload, give every key claims by chain-end agents: the
    /// setup of the authority-lens benchmark (DESIGN §2; docs/performance.md).
    #[arg(long, default_value_t = 0)]
    pub authority_grants: usize,
    /// Grants per chain (the depth of the chain-end agents' authority).
    #[arg(long, default_value_t = 8)]
    pub authority_depth: usize,
    /// With --authority-grants and --preload: claims per key, by distinct chain-end agents
    /// (plus one by an agent without authority).
    #[arg(long, default_value_t = 4)]
    pub claims_per_key: usize,
    /// Open loop: the total requests per second to send, spread evenly over all clients, each
    /// request's latency counted from when it was due. Without it, every client sends its next
    /// request as soon as its previous answer arrives (closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// How each client spreads its requests over the `--url` endpoints: `connection` keeps a
    /// client to one endpoint (client i to endpoint i mod n); `request` sends a client's requests
    /// to every endpoint in turn, from endpoint i mod n, as etcd's Go client (a round-robin pick
    /// per request) and a load balancer that balances requests do. Both spread many clients
    /// evenly; they differ for few clients (one client of `connection` meets one node only).
    #[arg(long, value_enum, default_value = "connection")]
    pub spread: Spread,
}

/// How a client spreads its requests over the endpoints (`--spread`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Spread {
    /// Every request of a client to the same endpoint.
    Connection,
    /// A client's requests to every endpoint in turn.
    Request,
}

/// The endpoints (indexes into `--url`) that `client` sends to, in the order of its requests:
/// its k-th request goes to the (k mod len)-th.
fn client_endpoints(spread: Spread, client: usize, endpoints: usize) -> Vec<usize> {
    let n = endpoints.max(1);
    match spread {
        Spread::Connection => vec![client % n],
        Spread::Request => (0..n).map(|turn| (client + turn) % n).collect(),
    }
}

#[derive(Default)]
struct Side {
    histogram: Option<Histogram<u64>>,
    ops: u64,
    items: u64,
    errors: BTreeMap<String, u64>,
}

impl Side {
    fn merge(&mut self, other: Side) {
        if let Some(h) = other.histogram {
            match &mut self.histogram {
                Some(mine) => {
                    let _ = mine.add(&h);
                }
                None => self.histogram = Some(h),
            }
        }
        self.ops += other.ops;
        self.items += other.items;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    fn report(&self, name: &str, seconds: f64) -> serde_json::Value {
        let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let (p50, p90, p99, p999, max) = match &self.histogram {
            Some(h) if !h.is_empty() => (q(h, 0.5), q(h, 0.9), q(h, 0.99), q(h, 0.999), h.max() as f64 / 1000.0),
            _ => (0.0, 0.0, 0.0, 0.0, 0.0),
        };
        json!({
            "name": name,
            "ops": self.ops,
            "ops_per_sec": self.ops as f64 / seconds,
            "items_per_sec": self.items as f64 / seconds,
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "p999_ms": p999, "max_ms": max,
            "errors": self.errors,
        })
    }
}

/// One client's send schedule under `--rate`: request k is due at `first + k * interval`.
#[derive(Debug, Clone)]
struct Pacer {
    interval: Duration,
    next_due: Instant,
}

impl Pacer {
    /// The schedule of client `client` of `clients` sharing `rate` requests per second; the
    /// clients' first requests are spread over one interval so that they do not all fire at once.
    fn new(rate: f64, client: usize, clients: usize, start: Instant) -> Pacer {
        let interval = Duration::from_secs_f64(clients as f64 / rate);
        Pacer { interval, next_due: start + interval.mul_f64(client as f64 / clients as f64) }
    }

    /// Waits until the next request is due and returns the instant its latency counts from.
    ///
    /// A client that is on time sleeps until the due time and counts from when it actually
    /// sends: the timer's lateness (tokio's timer ticks in milliseconds) is the load
    /// generator's, not the node's. A client that is late, because the node held its previous
    /// request past this one's due time, sends at once and counts from the due time, so a stall
    /// shows in the latency of every request it delayed, not just the one that stalled.
    async fn wait(&mut self) -> Instant {
        let due = self.next_due;
        self.next_due += self.interval;
        if Instant::now() >= due {
            return due;
        }
        tokio::time::sleep_until(due.into()).await;
        Instant::now()
    }
}

/// When the next request of a client starts counting: at once in a closed loop, on its
/// schedule in an open one. `None` when the run is over: at the deadline, even for a client
/// still behind its schedule, so that a node that stalls cannot stretch the run.
async fn next_start(pacer: &mut Option<Pacer>, deadline: Instant) -> Option<Instant> {
    if Instant::now() >= deadline {
        return None;
    }
    match pacer {
        Some(pacer) if pacer.next_due >= deadline => None,
        Some(pacer) => Some(pacer.wait().await),
        None => Some(Instant::now()),
    }
}

/// Counts the requests an open-loop client had due before the deadline but never sent, because
/// the node was still answering earlier ones: they are load the node did not take.
fn count_unsent(side: &mut Side, pacer: Option<Pacer>, deadline: Instant) {
    if let Some(pacer) = pacer {
        let unsent = unsent_requests(&pacer, deadline);
        if unsent > 0 {
            *side.errors.entry("unsent_at_deadline".to_string()).or_default() += unsent;
        }
    }
}

/// The due times of `pacer` in `[next_due, deadline)`. In whole nanoseconds: with seconds as
/// floats, 140 ms behind a 20 ms schedule came out as 7.000000000000001 intervals, one request
/// too many, and sent + unsent must equal the schedule exactly.
fn unsent_requests(pacer: &Pacer, deadline: Instant) -> u64 {
    let behind = deadline.saturating_duration_since(pacer.next_due).as_nanos();
    let unsent = behind.div_ceil(pacer.interval.as_nanos().max(1));
    u64::try_from(unsent).unwrap_or(u64::MAX)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

/// How long one measured request may take before it counts as a `timeout` error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A load connection's byte stream: plain TCP, or TLS over it for an https:// URL.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Where load connections go: `host:port`, and for an https:// URL the TLS client side.
#[derive(Clone)]
struct Endpoint {
    authority: String,
    tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
}

/// One load worker's keep-alive HTTP/1.1 connection.
///
/// The measured loops speak HTTP/1.1 over a plain `TcpStream` (or TLS over it for https://), one
/// request at a time, with the request bytes written by hand and the answer's head parsed by
/// `httparse`. On a shared machine every CPU cycle the load generator takes is one the node does
/// not get, and the latency it reports includes its own queueing: reqwest cost 48 µs of client CPU per request
/// and hyper's connection-level client 29 µs; this one 18 µs, like wrk (17-20 µs). Only the
/// framing the node's answers use is supported (`Content-Length` bodies); anything else counts
/// as an error.
struct BenchConnection {
    /// Where it connects; its `authority` is sent as the Host header.
    endpoint: Endpoint,
    /// The `Authorization` header line with its CRLF (`--token`), or empty.
    auth: String,
    stream: Option<Box<dyn Io>>,
    /// The request being sent, rebuilt in place for each request.
    request: Vec<u8>,
    /// Bytes read from the connection and not yet consumed.
    answer: Vec<u8>,
}

/// Largest answer head (status line and headers) the load generator accepts.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest answer body it accepts (more is counted as `bad_answer`, not buffered).
const MAX_BODY_BYTES: usize = 256 << 20;

/// The endpoint of a `--url`, checked once before any worker starts: https:// needs `tls` (the
/// client config of `--ca`).
fn url_endpoint(base_url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> anyhow::Result<Endpoint> {
    let uri: axum::http::Uri = base_url.parse().map_err(|e| anyhow::anyhow!("--url {base_url:?}: {e}"))?;
    let host = uri.host().ok_or_else(|| anyhow::anyhow!("--url {base_url:?} has no host"))?;
    let (tls, default_port) = match uri.scheme_str() {
        Some("http") => (None, 80),
        Some("https") => {
            let config = tls.ok_or_else(|| anyhow::anyhow!("--url {base_url:?}: https:// needs --ca"))?;
            let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let name = rustls::pki_types::ServerName::try_from(bare)
                .map_err(|e| anyhow::anyhow!("--url {base_url:?}: {e}"))?;
            (Some((tokio_rustls::TlsConnector::from(config.clone()), name)), 443)
        }
        _ => anyhow::bail!("--url {base_url:?}: only http:// and https:// are supported"),
    };
    Ok(Endpoint { authority: format!("{host}:{}", uri.port_u16().unwrap_or(default_port)), tls })
}

/// What the head of an answer says about its framing.
struct AnswerHead {
    status: u16,
    head_len: usize,
    body_len: usize,
    /// The server will close the connection after this answer.
    close: bool,
}

/// Parses an answer head from `buffer`: `Ok(None)` while it is incomplete, `Err` with the error
/// kind to count when it is malformed or framed in a way the load generator does not support.
fn parse_answer_head(buffer: &[u8]) -> Result<Option<AnswerHead>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD_BYTES => return Ok(None),
        Ok(httparse::Status::Partial) | Err(_) => return Err("bad_answer"),
    };
    let status = response.code.ok_or("bad_answer")?;
    // HTTP/1.0 closes unless the server says keep-alive; HTTP/1.1 keeps the connection open
    // unless it says close.
    let (mut body_len, mut close) = (None, response.version == Some(0));
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(header.value).map_err(|_| "bad_answer")?;
            let len = text.trim().parse::<usize>().map_err(|_| "bad_answer")?;
            if len > MAX_BODY_BYTES {
                return Err("bad_answer");
            }
            body_len = Some(len);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("unsupported_framing");
        } else if header.name.eq_ignore_ascii_case("connection") {
            let has =
                |token: &[u8]| header.value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token));
            close = has(b"close") || (close && !has(b"keep-alive"));
        }
    }
    Ok(Some(AnswerHead { status, head_len, body_len: body_len.ok_or("unsupported_framing")?, close }))
}

impl BenchConnection {
    fn new(endpoint: Endpoint, token: Option<&str>) -> BenchConnection {
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        BenchConnection {
            endpoint,
            auth,
            stream: None,
            request: Vec::with_capacity(512),
            answer: Vec::with_capacity(8192),
        }
    }

    /// POSTs a JSON body and reads the whole answer; `Err` is the error kind to count. After a
    /// transport error or a timeout the connection is dropped and the next request opens a
    /// fresh one.
    async fn post(&mut self, path: &'static str, body: &[u8]) -> Result<(), String> {
        let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(path, body)).await {
            Ok(Ok((status, close))) => {
                if close {
                    self.stream = None;
                }
                if (200..300).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("http_{status}"))
                }
            }
            Ok(Err(kind)) => Err(kind.to_string()),
            Err(_) => Err("timeout".to_string()),
        };
        if matches!(&outcome, Err(kind) if !kind.starts_with("http_")) {
            self.stream = None;
        }
        outcome
    }

    /// Sends one request and reads its answer: the status and whether the server closes.
    async fn exchange(&mut self, path: &str, body: &[u8]) -> Result<(u16, bool), &'static str> {
        use std::io::Write;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if self.stream.is_none() {
            let stream = tokio::net::TcpStream::connect(&self.endpoint.authority).await.map_err(|_| "connect")?;
            let _ = stream.set_nodelay(true);
            self.stream = Some(match &self.endpoint.tls {
                None => Box::new(stream),
                Some((connector, name)) => Box::new(connector.connect(name.clone(), stream).await.map_err(|_| "tls")?),
            });
            self.answer.clear();
        }
        let Some(stream) = self.stream.as_mut() else { return Err("connect") };
        self.request.clear();
        write!(
            self.request,
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.endpoint.authority,
            self.auth,
            body.len()
        )
        .map_err(|_| "request")?;
        self.request.extend_from_slice(body);
        stream.write_all(&self.request).await.map_err(|_| "transport")?;
        // TLS may hold the request's last bytes until flushed.
        stream.flush().await.map_err(|_| "transport")?;
        let head = loop {
            if let Some(head) = parse_answer_head(&self.answer)? {
                break head;
            }
            if stream.read_buf(&mut self.answer).await.map_err(|_| "transport")? == 0 {
                return Err("transport");
            }
        };
        let total = head.head_len + head.body_len;
        while self.answer.len() < total {
            self.answer.reserve(total - self.answer.len());
            if stream.read_buf(&mut self.answer).await.map_err(|_| "transport")? == 0 {
                return Err("transport");
            }
        }
        // One request at a time: anything past this answer would be a protocol error, but
        // keep it rather than lose sync with the stream.
        self.answer.drain(..total);
        Ok((head.status, head.close))
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.url.is_empty(), "--url needs at least one URL");
    anyhow::ensure!(args.writers + args.readers > 0, "need at least one writer or reader");
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    if let Some(rate) = args.rate {
        let clients = (args.writers + args.readers) as f64;
        anyhow::ensure!(rate.is_finite() && rate > 0.0, "--rate must be a positive number of requests per second");
        anyhow::ensure!(rate <= 1e9, "--rate {rate} is more than one request per nanosecond");
        anyhow::ensure!(
            clients / rate <= args.duration as f64,
            "--rate {rate} is too low for {clients} clients over {} s: each client must send at least once",
            args.duration
        );
    }
    let tls = args.ca.as_deref().map(crate::tls::client_config).transpose()?;
    let authorities =
        Arc::new(args.url.iter().map(|url| url_endpoint(url, tls.as_ref())).collect::<anyhow::Result<Vec<_>>>()?);
    if args.target == Target::Etcd {
        anyhow::ensure!(args.batch == 1, "--target etcd sends single puts: --batch must be 1");
        anyhow::ensure!(args.authority_grants == 0, "--authority-grants is for StemeDB only");
    }
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &args.token {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| anyhow::anyhow!("--token holds characters a header cannot carry"))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = crate::tls::http_client(args.ca.as_deref(), Duration::from_secs(30))?
        .default_headers(headers)
        .pool_max_idle_per_host(args.writers + args.readers + 8)
        .build()?;
    let value = "x".repeat(args.value_size);
    let chains = if args.authority_grants > 0 { setup_authority(&client, &args).await? } else { 0 };
    if args.preload {
        match args.target {
            Target::Stemedb => preload(&client, &args, &value, chains).await?,
            Target::Etcd => etcd::preload(&args, value.as_bytes()).await?,
        }
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.duration);
    let completed = Arc::new(AtomicU64::new(0));
    let clients = args.writers + args.readers;
    let pacer = |client: usize| args.rate.map(|rate| Pacer::new(rate, client, clients, start));
    let mut writers = Vec::new();
    for worker in 0..args.writers {
        let (authorities, args, value, completed, pacer) =
            (authorities.clone(), args.clone(), value.clone(), completed.clone(), pacer(worker));
        writers.push(tokio::spawn(async move {
            match args.target {
                Target::Stemedb => write_loop(worker, authorities, args, value, deadline, pacer, completed).await,
                Target::Etcd => etcd::write_loop(worker, args, value.into_bytes(), deadline, pacer, completed).await,
            }
        }));
    }
    let mut readers = Vec::new();
    for worker in 0..args.readers {
        let (authorities, args, completed, pacer) =
            (authorities.clone(), args.clone(), completed.clone(), pacer(args.writers + worker));
        readers.push(tokio::spawn(async move {
            match args.target {
                Target::Stemedb => read_loop(worker, authorities, args, deadline, pacer, completed).await,
                Target::Etcd => etcd::read_loop(worker, args, deadline, pacer, completed).await,
            }
        }));
    }
    let progress = ProgressBar::new(args.duration);
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let cpu_before = host_cpu_ticks();
    let mut last = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = completed.load(Ordering::Relaxed);
        progress.set_position(start.elapsed().as_secs().min(args.duration));
        progress.set_message(format!("{} ops/s", now - last));
        last = now;
    }
    progress.finish_and_clear();
    let mut write_side = Side::default();
    for handle in writers {
        write_side.merge(handle.await?);
    }
    let mut read_side = Side::default();
    for handle in readers {
        read_side.merge(handle.await?);
    }
    let seconds = start.elapsed().as_secs_f64();
    let steal_percent = host_steal_percent(cpu_before, host_cpu_ticks());
    let mut sides = Vec::new();
    if args.writers > 0 {
        sides.push(write_side.report(if args.batch > 1 { "batch_write" } else { "write" }, seconds));
    }
    if args.readers > 0 {
        sides.push(read_side.report("read", seconds));
    }
    let report = json!({
        "target": format!("{:?}", args.target).to_lowercase(), "url": args.url, "spread": format!("{:?}", args.spread).to_lowercase(), "writers": args.writers, "readers": args.readers, "duration_s": seconds,
        "batch": args.batch, "value_size": args.value_size, "keys": args.keys, "lens": args.lens,
        "consistency": args.consistency, "authority_grants": args.authority_grants,
        "authority_depth": args.authority_depth, "rate": args.rate,
        "host_steal_percent": steal_percent, "results": sides,
    });
    if let Some(rate) = args.rate {
        let served = (write_side.ops + read_side.ops) as f64 / seconds;
        if served < 0.95 * rate {
            eprintln!(
                "the node answered {served:.0} of the {rate:.0} ops/s asked for: the latencies include the backlog, \
                 and requests still due at the end count as unsent_at_deadline errors"
            );
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let load = match args.rate {
            Some(rate) => format!("open loop at {rate:.0} ops/s"),
            None => "closed loop".to_string(),
        };
        let target = match args.target {
            Target::Stemedb => "stemedb",
            Target::Etcd => "etcd",
        };
        println!(
            "stemedb bench ({target}): {} writers, {} readers, {load}, {:.1}s, batch {}, value {} B, {} keys",
            args.writers, args.readers, seconds, args.batch, args.value_size, args.keys
        );
        println!(
            "{:<12} {:>10} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9}  errors",
            "op", "ops", "ops/s", "items/s", "p50 ms", "p99 ms", "p999 ms", "max ms"
        );
        for side in &sides {
            println!(
                "{:<12} {:>10} {:>12.0} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2}  {}",
                side["name"].as_str().unwrap_or(""),
                side["ops"],
                side["ops_per_sec"].as_f64().unwrap_or(0.0),
                side["items_per_sec"].as_f64().unwrap_or(0.0),
                side["p50_ms"].as_f64().unwrap_or(0.0),
                side["p99_ms"].as_f64().unwrap_or(0.0),
                side["p999_ms"].as_f64().unwrap_or(0.0),
                side["max_ms"].as_f64().unwrap_or(0.0),
                side["errors"],
            );
        }
        if let Some(steal) = steal_percent {
            println!("host steal time during the run: {steal:.1}% of CPU time");
        }
    }
    Ok(())
}

/// The host's CPU time so far, from `/proc/stat`: (all ticks, steal ticks). `None` where there
/// is no such file.
fn host_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_ticks(&stat)
}

/// The aggregate `cpu` line of `/proc/stat`: user nice system idle iowait irq softirq steal ...
fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|t| t.parse().ok()).collect::<Option<_>>()?;
    // guest and guest_nice (fields 9 and 10) are already counted in user and nice.
    Some((ticks.iter().take(8).sum(), *ticks.get(7)?))
}

/// The share of CPU time the hypervisor gave to other guests between two readings: a virtual
/// machine's benchmark figures are only comparable between runs with similar steal.
fn host_steal_percent(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((total0, steal0), (total1, steal1)) = (before?, after?);
    let total = total1.checked_sub(total0).filter(|t| *t > 0)?;
    Some(steal1.saturating_sub(steal0) as f64 * 100.0 / total as f64)
}

fn concept(args: &BenchArgs, key: u64) -> String {
    format!("{}/k{key}", args.prefix)
}

async fn preload(client: &reqwest::Client, args: &BenchArgs, value: &str, chains: usize) -> anyhow::Result<()> {
    let url = format!("{}/v1/assert/batch", args.url[0]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut items = Vec::new();
    for key in 0..args.keys {
        let concept_path = concept(args, key);
        if chains == 0 {
            // One agent per 1,000 keys: a single agent would trip its circuit breaker
            // (circuit_breaker.max_writes_per_sec) during a fast preload.
            let agent = format!("bench-preload-{}", key / 1000);
            items.push(json!({"concept_path": concept_path, "predicate": "value", "value": value, "agent_id": agent}));
        } else {
            // Claims by chain-end agents (authority through `depth` grants) and one without.
            for n in 0..args.claims_per_key {
                let chain = rng.random_range(0..chains);
                let agent = chain_agent(args, chain, args.authority_depth);
                items.push(json!({"concept_path": concept_path, "predicate": "value", "value": format!("{n}"), "agent_id": agent}));
            }
            items.push(json!({"concept_path": concept_path, "predicate": "value", "value": "none", "agent_id": format!("bench-nobody-{}", key % 50)}));
        }
        if items.len() >= 500 || key + 1 == args.keys {
            let response = client.post(&url).json(&json!({"assertions": std::mem::take(&mut items)})).send().await?;
            anyhow::ensure!(response.status().is_success(), "preload failed: {}", response.status());
            let answer: serde_json::Value = response.json().await?;
            let refused = answer["results"].as_array().and_then(|r| r.iter().find(|i| i["status"] != json!(201)));
            anyhow::ensure!(
                refused.is_none(),
                "preload: an item was refused: {}",
                refused.cloned().unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn chain_agent(args: &BenchArgs, chain: usize, depth: usize) -> String {
    if depth == 0 {
        "bench-root".into()
    } else {
        format!("{}-c{chain}-d{depth}", args.prefix)
    }
}

/// Creates `--authority-grants` grants as chains of `--authority-depth` from the root
/// `bench-root` (level 100) over the prefix; chains are built in parallel, each in order.
/// Returns the number of chains.
async fn setup_authority(client: &reqwest::Client, args: &BenchArgs) -> anyhow::Result<usize> {
    anyhow::ensure!(args.authority_depth >= 1, "--authority-depth must be at least 1");
    let base = args.url[0].clone();
    let root = client
        .post(format!("{base}/v1/admin/authority/roots"))
        .json(&json!({"agent_id": "bench-root", "level": 100}))
        .send()
        .await?;
    anyhow::ensure!(root.status().is_success(), "setting the root failed: {} (admin rights needed)", root.status());
    let chains = args.authority_grants.div_ceil(args.authority_depth);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (client, args, base, next) = (client.clone(), args.clone(), base.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let chain = next.fetch_add(1, Ordering::Relaxed) as usize;
                if chain >= chains {
                    return Ok::<(), anyhow::Error>(());
                }
                for depth in 1..=args.authority_depth {
                    let body = json!({
                        "grantor": chain_agent(&args, chain, depth - 1),
                        "grantee": chain_agent(&args, chain, depth),
                        "concept_prefix": args.prefix,
                        // Non-increasing along the chain: a grantor delegates at most its own level.
                        "level": 100usize.saturating_sub(chain % 40 + depth),
                    });
                    let response = client.post(format!("{base}/v1/authority/grants")).json(&body).send().await?;
                    anyhow::ensure!(response.status().is_success(), "grant failed: {}", response.text().await?);
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    eprintln!(
        "authority setup: {} grants in {chains} chains of depth {} in {:.1}s",
        chains * args.authority_depth,
        args.authority_depth,
        started.elapsed().as_secs_f64()
    );
    Ok(chains)
}

async fn write_loop(
    worker: usize,
    authorities: Arc<Vec<Endpoint>>,
    args: BenchArgs,
    value: String,
    deadline: Instant,
    mut pacer: Option<Pacer>,
    completed: Arc<AtomicU64>,
) -> Side {
    let mut side = Side { histogram: Some(new_histogram()), ..Default::default() };
    let mut connections = client_connections(&authorities, &args, worker);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    for turn in 0.. {
        let item = |rng: &mut rand::rngs::StdRng| json!({"concept_path": concept(&args, rng.random_range(0..args.keys.max(1))), "predicate": "value", "value": value, "agent_id": format!("bench-{worker}-{}", rng.random_range(0..32))});
        let (path, body) = if args.batch > 1 {
            let items: Vec<_> = (0..args.batch).map(|_| item(&mut rng)).collect();
            ("/v1/assert/batch", json!({"assertions": items}))
        } else {
            ("/v1/assert", item(&mut rng))
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let Some(started) = next_start(&mut pacer, deadline).await else { break };
        let connection = turn % connections.len();
        let kind = connections[connection].post(path, &body).await.err();
        record(&mut side, started, kind, args.batch as u64);
        completed.fetch_add(1, Ordering::Relaxed);
    }
    count_unsent(&mut side, pacer, deadline);
    side
}

/// One connection per endpoint that `client` sends to, in the order of its turns.
fn client_connections(authorities: &[Endpoint], args: &BenchArgs, client: usize) -> Vec<BenchConnection> {
    client_endpoints(args.spread, client, authorities.len())
        .into_iter()
        .map(|endpoint| BenchConnection::new(authorities[endpoint].clone(), args.token.as_deref()))
        .collect()
}

async fn read_loop(
    worker: usize,
    authorities: Arc<Vec<Endpoint>>,
    args: BenchArgs,
    deadline: Instant,
    mut pacer: Option<Pacer>,
    completed: Arc<AtomicU64>,
) -> Side {
    let mut side = Side { histogram: Some(new_histogram()), ..Default::default() };
    let mut connections = client_connections(&authorities, &args, worker + args.writers);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut body = Vec::with_capacity(256);
    for turn in 0.. {
        body.clear();
        let query = json!({"concept_path": concept(&args, rng.random_range(0..args.keys.max(1))), "lens": args.lens, "consistency": args.consistency});
        let _ = serde_json::to_writer(&mut body, &query);
        let Some(started) = next_start(&mut pacer, deadline).await else { break };
        let connection = turn % connections.len();
        let kind = connections[connection].post("/v1/query", &body).await.err();
        record(&mut side, started, kind, 1);
        completed.fetch_add(1, Ordering::Relaxed);
    }
    count_unsent(&mut side, pacer, deadline);
    side
}

/// The etcd side of the side-by-side benchmark: the same clients, pacing and histograms as the
/// StemeDB loops, over etcd's gRPC KV service. One gRPC channel (one HTTP/2 connection) per
/// client, as the StemeDB loops hold one HTTP/1.1 connection per client.
mod etcd {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rand::{Rng, SeedableRng};
    use stemedb_proto::etcd::kv_client::KvClient;
    use stemedb_proto::etcd::{PutRequest, RangeRequest};
    use tonic::transport::Channel;

    use super::{count_unsent, new_histogram, next_start, record, BenchArgs, Pacer, Side};

    fn key(args: &BenchArgs, key: u64) -> Vec<u8> {
        super::concept(args, key).into_bytes()
    }

    fn channel(url: &str) -> Result<KvClient<Channel>, String> {
        let endpoint = Channel::from_shared(url.to_string()).map_err(|e| format!("bad_url: {e}"))?;
        let channel = endpoint.timeout(Duration::from_secs(30)).connect_lazy();
        Ok(KvClient::new(channel))
    }

    /// One channel per endpoint that `client` sends to (`--spread`), in the order of its turns.
    fn channels(args: &BenchArgs, client: usize) -> Result<Vec<KvClient<Channel>>, String> {
        super::client_endpoints(args.spread, client, args.url.len())
            .into_iter()
            .map(|endpoint| channel(&args.url[endpoint]))
            .collect()
    }

    /// A client's empty results and its channels, or the results that record why there are none.
    fn start(args: &BenchArgs, client: usize) -> Result<(Side, Vec<KvClient<Channel>>), Side> {
        let mut side = Side { histogram: Some(new_histogram()), ..Default::default() };
        match channels(args, client) {
            Ok(kv) => Ok((side, kv)),
            Err(error) => {
                side.errors.insert(error, 1);
                Err(side)
            }
        }
    }

    /// gRPC status code names, as the error kinds of the report.
    fn kind(status: &tonic::Status) -> String {
        format!("grpc_{:?}", status.code()).to_lowercase()
    }

    /// Puts every key once, 16 at a time.
    pub async fn preload(args: &BenchArgs, value: &[u8]) -> anyhow::Result<()> {
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for client in 0..16 {
            let (args, value, next) = (args.clone(), value.to_vec(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut kv = channel(&args.url[client % args.url.len()]).map_err(anyhow::Error::msg)?;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= args.keys {
                        return anyhow::Ok(());
                    }
                    let request = PutRequest { key: key(&args, n), value: value.clone(), ..Default::default() };
                    kv.put(request).await.map_err(|e| anyhow::anyhow!("etcd preload put: {e}"))?;
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(())
    }

    pub async fn write_loop(
        worker: usize,
        args: BenchArgs,
        value: Vec<u8>,
        deadline: Instant,
        mut pacer: Option<Pacer>,
        completed: Arc<AtomicU64>,
    ) -> Side {
        let (mut side, mut kv) = match start(&args, worker) {
            Ok(started) => started,
            Err(side) => return side,
        };
        let mut rng = rand::rngs::StdRng::from_os_rng();
        for turn in 0.. {
            let request = PutRequest {
                key: key(&args, rng.random_range(0..args.keys.max(1))),
                value: value.clone(),
                ..Default::default()
            };
            let Some(started) = next_start(&mut pacer, deadline).await else { break };
            let channel = turn % kv.len();
            let error = kv[channel].put(request).await.err().map(|status| kind(&status));
            record(&mut side, started, error, 1);
            completed.fetch_add(1, Ordering::Relaxed);
        }
        count_unsent(&mut side, pacer, deadline);
        side
    }

    pub async fn read_loop(
        worker: usize,
        args: BenchArgs,
        deadline: Instant,
        mut pacer: Option<Pacer>,
        completed: Arc<AtomicU64>,
    ) -> Side {
        let (mut side, mut kv) = match start(&args, worker + args.writers) {
            Ok(started) => started,
            Err(side) => return side,
        };
        let serializable = args.consistency == "stale";
        let mut rng = rand::rngs::StdRng::from_os_rng();
        for turn in 0.. {
            let request = RangeRequest {
                key: key(&args, rng.random_range(0..args.keys.max(1))),
                serializable,
                ..Default::default()
            };
            let Some(started) = next_start(&mut pacer, deadline).await else { break };
            let channel = turn % kv.len();
            let error = kv[channel].range(request).await.err().map(|status| kind(&status));
            record(&mut side, started, error, 1);
            completed.fetch_add(1, Ordering::Relaxed);
        }
        count_unsent(&mut side, pacer, deadline);
        side
    }
}

fn record(side: &mut Side, started: Instant, error: Option<String>, items: u64) {
    match error {
        None => {
            if let Some(h) = &mut side.histogram {
                // Past the histogram's 120 s top (an open loop far over capacity), counted at the
                // top rather than dropped.
                h.saturating_record((started.elapsed().as_micros() as u64).max(1));
            }
            side.ops += 1;
            side.items += items;
        }
        Some(kind) => *side.errors.entry(kind).or_default() += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::{client_endpoints, host_steal_percent, parse_answer_head, parse_cpu_ticks, Pacer, Spread};
    use std::time::{Duration, Instant};

    #[test]
    fn clients_spread_by_connection_or_by_request() {
        assert_eq!(client_endpoints(Spread::Connection, 0, 3), vec![0]);
        assert_eq!(client_endpoints(Spread::Connection, 4, 3), vec![1], "client i keeps to endpoint i mod n");
        assert_eq!(client_endpoints(Spread::Request, 0, 3), vec![0, 1, 2], "one client meets every endpoint");
        assert_eq!(client_endpoints(Spread::Request, 4, 3), vec![1, 2, 0], "each client starts at its own");
        assert_eq!(client_endpoints(Spread::Request, 7, 1), vec![0]);
        assert_eq!(client_endpoints(Spread::Request, 2, 0), vec![0], "no endpoints is refused before, never a panic");
        // Many clients load every endpoint alike either way.
        for spread in [Spread::Connection, Spread::Request] {
            let mut first = [0; 3];
            for client in 0..64 {
                first[client_endpoints(spread, client, 3)[0]] += 1;
            }
            assert_eq!(first, [22, 21, 21]);
        }
    }

    #[test]
    fn steal_time_is_read_from_proc_stat() {
        let stat = "cpu  100 5 50 800 10 2 3 30 7 0\ncpu0 50 2 25 400 5 1 2 15 0 0\nintr 1\n";
        assert_eq!(parse_cpu_ticks(stat), Some((1000, 30)), "guest time is not counted twice");
        assert_eq!(parse_cpu_ticks("cpu  1 2 3\n"), None, "a kernel without steal accounting");
        assert_eq!(parse_cpu_ticks("intr 1\n"), None);
        assert_eq!(host_steal_percent(Some((1000, 30)), Some((3000, 130))), Some(5.0));
        assert_eq!(host_steal_percent(Some((1000, 30)), Some((1000, 30))), None, "no time passed");
        assert_eq!(host_steal_percent(None, Some((1000, 30))), None);
    }

    #[test]
    fn paced_clients_share_the_rate_and_start_spread_over_one_interval() {
        let start = Instant::now();
        let pacers: Vec<Pacer> = (0..4).map(|client| Pacer::new(1000.0, client, 4, start)).collect();
        for (client, pacer) in pacers.iter().enumerate() {
            assert_eq!(pacer.interval, Duration::from_millis(4), "4 clients at 1000/s: one request each 4 ms");
            assert_eq!(pacer.next_due - start, Duration::from_millis(client as u64), "first requests 1 ms apart");
        }
    }

    #[test]
    fn requests_left_unsent_are_counted_exactly() {
        let start = Instant::now();
        let pacer = Pacer::new(50.0, 0, 1, start);
        assert_eq!(pacer.interval, Duration::from_millis(20));
        for behind in 0..2000u32 {
            let deadline = pacer.next_due + Duration::from_millis(20) * behind;
            assert_eq!(super::unsent_requests(&pacer, deadline), u64::from(behind), "{behind} intervals behind");
            let just_after = deadline + Duration::from_nanos(1);
            assert_eq!(super::unsent_requests(&pacer, just_after), u64::from(behind) + 1, "one more is due");
        }
        assert_eq!(super::unsent_requests(&pacer, start), 0, "a deadline before the next due time");
    }

    #[tokio::test]
    async fn a_late_request_counts_from_when_it_was_due() {
        // Started 2.25 s ago at 2/s: five requests are overdue. Each is sent at once and its
        // latency counts from its due time, not from now.
        let start = Instant::now() - Duration::from_millis(2250);
        let mut pacer = Pacer::new(2.0, 0, 1, start);
        for k in 0..5u32 {
            assert_eq!(pacer.wait().await, start + Duration::from_millis(500) * k, "request {k}");
        }
        // The sixth is due 250 ms from now: the client sleeps until then and counts from the
        // send (a test thread held up for longer than that would find it overdue instead).
        let before = Instant::now();
        let counted_from = pacer.wait().await;
        assert!(counted_from >= start + Duration::from_millis(2500), "not sent before it was due");
        assert!(counted_from >= before, "an on-time request counts from when it is sent");
    }

    #[test]
    fn an_answer_head_is_parsed_only_once_complete() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        let head = parse_answer_head(answer).expect("valid").expect("complete");
        assert_eq!((head.status, head.head_len, head.body_len, head.close), (200, answer.len() - 2, 2, false));
        for cut in [0, 10, answer.len() - 3] {
            assert!(matches!(parse_answer_head(&answer[..cut]), Ok(None)), "partial head at {cut}");
        }
        let closing = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        let head = parse_answer_head(closing).expect("valid").expect("complete");
        assert_eq!((head.status, head.body_len, head.close), (503, 0, true));
        let listed = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_answer_head(listed).expect("valid").expect("complete").close, "close among other tokens");
        let old = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_answer_head(old).expect("valid").expect("complete").close, "HTTP/1.0 closes by default");
        let kept = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n";
        assert!(!parse_answer_head(kept).expect("valid").expect("complete").close, "unless it keeps alive");
    }

    #[test]
    fn unsupported_or_malformed_answers_are_errors_not_hangs() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(parse_answer_head(chunked).err(), Some("unsupported_framing"));
        let unframed = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n";
        assert_eq!(parse_answer_head(unframed).err(), Some("unsupported_framing"));
        let bad_length = b"HTTP/1.1 200 OK\r\ncontent-length: lots\r\n\r\n";
        assert_eq!(parse_answer_head(bad_length).err(), Some("bad_answer"));
        let huge = b"HTTP/1.1 200 OK\r\ncontent-length: 1099511627776\r\n\r\n";
        assert_eq!(parse_answer_head(huge).err(), Some("bad_answer"), "not buffered");
        assert_eq!(parse_answer_head(b"SMTP ready\r\n\r\n").err(), Some("bad_answer"));
        let endless = [b"HTTP/1.1 200 OK\r\n".as_slice(), &[b'x'; super::MAX_HEAD_BYTES]].concat();
        assert_eq!(parse_answer_head(&endless).err(), Some("bad_answer"), "a head past the limit");
    }
}
