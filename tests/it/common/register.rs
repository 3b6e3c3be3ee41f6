//! A register under load, shared by the chaos and power-cut suites: it rings up transactions
//! at a steady rate over the jsonl TCP protocol, pipelined, with in-order answers, and like a
//! real register keeps every transaction until the agent answers `ok`, sending all of them
//! again (same transactions, same ids) after a lost connection or a refusal.
//!
//! Invariant: an id is in [`Totals::acked`] (and in the live [`Acks`]) only once the agent
//! answered `ok` for it; what the register sent and what it was told are the suites' ground
//! truth for "lost" and "counted twice".
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use storelink::model::transaction::{Transaction, TransactionKind};
use storelink::sim::{JsonlClient, SimRegister};
use tokio_util::sync::CancellationToken;

/// What a register saw.
#[derive(Debug, Default)]
pub struct Totals {
    pub sent: u64,
    pub acked: BTreeSet<String>,
    pub refusals: Vec<String>,
    /// Still not acknowledged when the load stopped.
    pub unacked: usize,
}

/// What an acknowledged transaction was, for checks of what the agent derived from it.
#[derive(Debug, Clone)]
pub struct Acked {
    /// When the register read the `ok`.
    pub at: Instant,
    pub loyalty_id: Option<String>,
    pub kind: TransactionKind,
    pub total: i64,
}

/// Every `ok` so far, readable while the load runs.
pub type Acks = Arc<Mutex<BTreeMap<String, Acked>>>;

/// A register that keeps ringing up at `rate` per second; see the module header.
pub struct Load {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Totals>,
    pub acks: Acks,
}

impl Load {
    pub fn start(addr: SocketAddr, register: &str, rate: f64) -> Load {
        let stop = CancellationToken::new();
        let acks = Acks::default();
        let task = tokio::spawn(ring(
            addr,
            register.to_string(),
            rate,
            stop.clone(),
            acks.clone(),
        ));
        Load { stop, task, acks }
    }

    /// Stops ringing up and waits (up to a minute) until everything sent is acknowledged.
    pub async fn finish(self) -> Totals {
        self.stop.cancel();
        self.task.await.unwrap()
    }

    /// The acknowledged ids so far.
    pub fn acked_ids(&self) -> BTreeSet<String> {
        self.acks.lock().unwrap().keys().cloned().collect()
    }
}

async fn ring(
    addr: SocketAddr,
    name: String,
    rate: f64,
    stop: CancellationToken,
    acks: Acks,
) -> Totals {
    let mut totals = Totals::default();
    let first = Timestamp::now().as_millisecond() as u64 * 1000;
    let lane = name.trim_start_matches("lane-").to_string();
    let mut register = SimRegister::new("s042", &name, Some(&lane), first).with_sequence(first);
    let mut unacked: VecDeque<Transaction> = VecDeque::new();
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut next = tokio::time::Instant::now();
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    'connection: loop {
        if stop.is_cancelled() {
            let deadline = *drain_deadline
                .get_or_insert(tokio::time::Instant::now() + Duration::from_secs(60));
            if unacked.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        let Ok(client) = JsonlClient::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (mut sender, mut replies) = client.split();
        let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(8192);
        let reader = tokio::spawn(async move {
            while let Ok(line) = replies.reply().await {
                if lines_tx.send(line).await.is_err() {
                    break;
                }
            }
        });
        let mut owed: VecDeque<String> = VecDeque::new();
        for t in &unacked {
            if sender.send(t).await.is_err() {
                reader.abort();
                continue 'connection;
            }
            owed.push_back(t.id.clone());
        }
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let stopping = stop.is_cancelled();
            if stopping && unacked.is_empty() {
                break;
            }
            if let Some(d) = drain_deadline
                && tokio::time::Instant::now() >= d
            {
                break;
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(next), if !stopping => {
                    next += period;
                    let t = register.next(Timestamp::now());
                    totals.sent += 1;
                    owed.push_back(t.id.clone());
                    unacked.push_back(t);
                    if sender.send(unacked.back().expect("just pushed")).await.is_err() {
                        break;
                    }
                }
                line = lines.recv() => {
                    let (Some(line), Some(id)) = (line, owed.pop_front()) else { break };
                    if line.starts_with("ok") {
                        if let Some(i) = unacked.iter().position(|t| t.id == id) {
                            let t = unacked.remove(i).expect("found above");
                            acks.lock().unwrap().entry(id.clone()).or_insert(Acked {
                                at: Instant::now(),
                                loyalty_id: t.loyalty_id.clone(),
                                kind: t.kind,
                                total: t.total,
                            });
                        }
                        totals.acked.insert(id);
                    } else {
                        if totals.refusals.len() < 1000 {
                            totals.refusals.push(line);
                        }
                        // Try again in a second, as a register's retry would.
                        retry_at.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                }
                _ = retry => break,
                _ = stop.cancelled(), if !stopping => {
                    drain_deadline.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(60));
                }
            }
        }
        reader.abort();
        if !(stop.is_cancelled() && unacked.is_empty()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    totals.unacked = unacked.len();
    totals
}
