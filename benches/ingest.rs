//! End-to-end durable ingest: transactions/s from register clients over TCP, through framing,
//! parsing, normalisation, the outbox (fsynced in group commits) and the acknowledgement back
//! to the register. Every transaction is acknowledged only after it is on disk.
//!
//! `cargo bench --bench ingest [-- --transactions N --connections C --runs R --broker --cache-bytes B
//! --loyalty-share F]`
//!
//! With `--broker`, an in-process broker drains the outbox at the same time, so the figure
//! includes the uplink competing for the two cores.

use std::time::{Duration, Instant};

mod common;
use common::free_port;

use storelink::config::Config;
use storelink::sim::{JsonlClient, SimRegister};
use tokio_util::sync::CancellationToken;

// The same allocator as the shipped binary, so the figure is the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `cargo bench --bench ingest -- [flags]`
#[derive(clap::Parser)]
struct Args {
    #[arg(long, default_value_t = 50_000)]
    transactions: usize,
    /// Register connections sending at once.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Drain the outbox to an in-process broker at the same time.
    #[arg(long)]
    broker: bool,
    /// `storage.cache_bytes`; the config default without it.
    #[arg(long)]
    cache_bytes: Option<u64>,
    /// Share of transactions with a loyalty card (each updates its customer's KPIs); the
    /// simulator's 40 % without it.
    #[arg(long)]
    loyalty_share: Option<f64>,
}

async fn run_once(args: &Args) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let broker = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    if args.broker {
        storelink::demo::start_broker(broker).unwrap();
    }
    let mut text = format!(
        "[store]\nid = \"s042\"\ntenant = \"acme\"\n[storage]\npath = \"{}\"\n{}[central.mqtt]\nurl = \"mqtt://{broker}\"\n[cashier]\nbind = \"127.0.0.1:{}\"\n",
        dir.path().display(),
        args.cache_bytes
            .map(|b| format!("cache_bytes = {b}\n"))
            .unwrap_or_default(),
        free_port()
    );
    let mut addrs = Vec::new();
    for i in 0..args.connections {
        let port = free_port();
        text.push_str(&format!(
            "[[registers]]\nname = \"lane-{i}\"\nformat = \"jsonl\"\ntransport = {{ kind = \"tcp-listen\", bind = \"127.0.0.1:{port}\" }}\n"
        ));
        addrs.push(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let config = Config::parse(&text, "bench.toml", &std::collections::HashMap::new()).unwrap();
    let token = CancellationToken::new();
    let agent = storelink::daemon::start(config, storelink::clock::system(), token.clone())
        .await
        .unwrap();

    // Pre-render the lines so the clients measure the agent, not serde.
    let per = args.transactions / args.connections;
    let start: jiff::Timestamp = "2026-11-22T08:00:00Z".parse().unwrap();
    let mut work = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut sim = SimRegister::new("s042", &format!("lane-{i}"), None, i as u64);
        if let Some(share) = args.loyalty_share {
            sim.loyalty_share = share;
        }
        let lines: Vec<Vec<u8>> = (0..per)
            .map(|n| {
                let mut l = serde_json::to_vec(
                    &sim.next(start + jiff::SignedDuration::from_secs(n as i64)),
                )
                .unwrap();
                l.push(b'\n');
                l
            })
            .collect();
        work.push((*addr, lines));
    }

    let began = Instant::now();
    let mut clients = Vec::new();
    for (addr, lines) in work {
        clients.push(tokio::spawn(async move {
            let mut c = JsonlClient::connect_patiently(addr, Duration::from_secs(5))
                .await
                .unwrap();
            let n = lines.len();
            // Pipeline: keep up to 512 lines ahead of the replies.
            let mut sent = 0;
            let mut acked = 0;
            while acked < n {
                while sent < n && sent - acked < 512 {
                    c.send_raw(&lines[sent]).await.unwrap();
                    sent += 1;
                }
                let reply = c.reply().await.unwrap();
                assert!(reply.starts_with("ok "), "{reply}");
                acked += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    let elapsed = began.elapsed();
    token.cancel();
    agent.shutdown().await.unwrap();
    total as f64 / elapsed.as_secs_f64()
}

fn main() {
    let args: Args = common::args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rates: Vec<f64> = (0..args.runs)
        .map(|_| rt.block_on(run_once(&args)))
        .collect();
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = rates[rates.len() / 2];
    println!(
        "ingest: {} transactions over {} connections{}: median {:.0} tx/s (runs: {})",
        args.transactions,
        args.connections,
        if args.broker { ", broker draining" } else { "" },
        median,
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
