//! A fault-injecting TCP proxy for one directed link between two nodes (`tc netem` is not
//! available on our machines). Connections the source node opens to the target's Raft port go
//! through it, and a [`LinkFault`] decides what happens to their bytes, in both directions:
//! passed, refused and cut (a dead peer), swallowed (a blackhole: the sender only sees
//! timeouts), delayed with jitter (order kept), or cut at random (a lossy link, as TCP sees
//! loss it cannot recover from: resets).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// What a link does to its traffic.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LinkFault {
    /// Traffic flows.
    Pass,
    /// New connections are refused and open ones cut.
    Block,
    /// Connections are accepted and kept, but nothing is delivered.
    Blackhole,
    /// Every chunk is delivered `base_ms` ± `jitter_ms` late, in order.
    Delay { base_ms: u64, jitter_ms: u64 },
    /// Each chunk cuts its connection with probability `per_mille`/1000; the rest are delayed
    /// by `delay_ms`.
    Lossy { per_mille: u16, delay_ms: u64 },
}

/// A proxy for one directed link.
pub struct LinkProxy {
    pub listen_port: u16,
    fault: Arc<Mutex<LinkFault>>,
    /// Bumped to cut every open connection.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    pub async fn start(target: String) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let listen_port = listener.local_addr().expect("addr").port();
        let fault = Arc::new(Mutex::new(LinkFault::Pass));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let task = {
            let (fault, generation) = (fault.clone(), generation.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else { continue };
                    if *fault.lock() == LinkFault::Block {
                        let _ = inbound.shutdown().await;
                        continue;
                    }
                    let target = target.clone();
                    let mut cut = generation.subscribe();
                    let fault = fault.clone();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(&target).await else { return };
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let (in_read, in_write) = inbound.into_split();
                        let (out_read, out_write) = outbound.into_split();
                        tokio::select! {
                            _ = pump(in_read, out_write, fault.clone()) => {}
                            _ = pump(out_read, in_write, fault) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            })
        };
        LinkProxy { listen_port, fault, generation, task }
    }

    /// Sets the link's fault; blocking cuts open connections.
    pub fn set_fault(&self, fault: LinkFault) {
        let previous = std::mem::replace(&mut *self.fault.lock(), fault);
        // Blocking cuts open connections. So does leaving a blackhole: the bytes it swallowed
        // are gone, and resuming the stream after the gap would corrupt it (real TCP would
        // retransmit them; a cut connection is the honest equivalent).
        let cut = (fault == LinkFault::Block && previous != LinkFault::Block)
            || (previous == LinkFault::Blackhole && fault != LinkFault::Blackhole);
        if cut {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    pub fn fault(&self) -> LinkFault {
        *self.fault.lock()
    }

    pub fn block(&self) {
        self.set_fault(LinkFault::Block);
    }

    pub fn unblock(&self) {
        self.set_fault(LinkFault::Pass);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction of a connection, applying the link's fault to each chunk. Delivery is
/// decoupled from reading so a delay does not slow the reader down, and deliveries keep their
/// order. Returns when either side closes or the fault cuts the connection.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    fault: Arc<Mutex<LinkFault>>,
) {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, chunk)) = receiver.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut last_delivery = Instant::now();
        loop {
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let current = *fault.lock();
            let delay = match current {
                LinkFault::Pass => Duration::ZERO,
                LinkFault::Block => return,
                LinkFault::Blackhole => continue,
                LinkFault::Delay { base_ms, jitter_ms } => {
                    let jitter = if jitter_ms == 0 { 0 } else { rand::rng().random_range(0..=2 * jitter_ms) };
                    Duration::from_millis((base_ms + jitter).saturating_sub(jitter_ms))
                }
                LinkFault::Lossy { per_mille, delay_ms } => {
                    if rand::rng().random_range(0..1000u16) < per_mille {
                        return;
                    }
                    Duration::from_millis(delay_ms)
                }
            };
            let at = (Instant::now() + delay).max(last_delivery);
            last_delivery = at;
            if sender.send((at, buffer[..read].to_vec())).is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
}
