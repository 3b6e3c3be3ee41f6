//! `storelink bridge`: central's side, the stores' feeds into the BI database and the email
//! tools ([`crate::bridge`]); `storelink bridge status`: what a running bridge says.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{block_on, config_error, exit_with, out};
use crate::bridge::{self, config::BridgeConfig, ops};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BridgeArgs {
    /// The bridge's config file (see config/bridge.toml).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Validate the config and exit: 0 when valid, 2 naming the key when not.
    #[arg(long)]
    pub check: bool,
    #[command(subcommand)]
    pub command: Option<BridgeCommand>,
}

#[derive(Subcommand)]
pub enum BridgeCommand {
    /// What the running bridge says: subscription, database, totals, each email tool's queue.
    /// Exit 0 when ready, 1 when not (or not answering).
    Status {
        /// The bridge's config file: its `http.bind` is asked.
        #[arg(long, short)]
        config: PathBuf,
        /// Print the bridge's JSON instead of the summary.
        #[arg(long)]
        json: bool,
    },
}

pub fn bridge(args: BridgeArgs) -> ExitCode {
    if let Some(BridgeCommand::Status { config, json }) = args.command {
        return status(&config, json);
    }
    let Some(path) = args.config else {
        return config_error("storelink bridge: --config FILE is needed (see config/bridge.toml)");
    };
    let config = match BridgeConfig::load(&path) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    if args.check {
        out!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    exit_with(block_on(|token| async move {
        let addr = config
            .http
            .addr
            .expect("a validated config has its address");
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("http.bind {addr}: {e}"))?;
        let watch = bridge::Watch::default();
        let state = ops::OpsState {
            subscribed: watch.subscribed.subscribe(),
            totals: watch.totals.subscribe(),
            started_at: jiff::Timestamp::now(),
            postgres: config.postgres.clone(),
            sinks: config.email.iter().map(|e| e.name.clone()).collect(),
            metrics: crate::telemetry::metrics_handle(),
        };
        let server = ops::serve(listener, state, token.clone());
        tracing::info!(%addr, "bridge status on /healthz, /readyz, /metrics, /status");
        let result = bridge::run_with(config, token.clone(), watch).await;
        token.cancel();
        let _ = server.await;
        let totals = result?;
        tracing::info!(
            received = totals.received,
            new = totals.new,
            duplicates = totals.duplicates,
            dead_letters = totals.dead_letters,
            "bridge stopped"
        );
        Ok(())
    }))
}

fn status(path: &std::path::Path, json: bool) -> ExitCode {
    let config = match BridgeConfig::load(path) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    let addr = config
        .http
        .addr
        .expect("a validated config has its address");
    let url = format!("http://{addr}");
    let answer = match super::api::get(&url, "/status", &[], None, Duration::from_secs(5)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("storelink bridge status: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
    }
    let s: ops::Status = match serde_json::from_value(answer) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("storelink bridge status: {url}/status: not a bridge's answer: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !json {
        out!("{}", summary(&s));
    }
    if s.subscribed && s.database.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The status as an operator reads it.
pub fn summary(s: &ops::Status) -> String {
    let mut out = format!(
        "storelink bridge {} since {}\n  broker:   {}\n  postgres: {}\n  events:   {} received, {} new, {} duplicates, {} dead letters, {} batches\n",
        s.version,
        s.started_at,
        if s.subscribed {
            "subscribed"
        } else {
            "NOT subscribed"
        },
        match &s.database {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("NOT reachable: {e}"),
        },
        s.received,
        s.new,
        s.duplicates,
        s.dead_letters,
        s.batches,
    );
    for e in &s.email {
        out.push_str(&format!(
            "  email {}: {} pending{}, {} sent, {} without consent, {} without contact, {} failed\n",
            e.sink,
            e.pending,
            e.oldest_pending_s
                .map(|a| format!(" (oldest {a:.0} s)"))
                .unwrap_or_default(),
            e.sent,
            e.no_consent,
            e.no_contact,
            e.failed,
        ));
    }
    out.trim_end().to_string()
}
