//! `sim`: drives a running agent like a busy store and checks what reaches central.

use std::path::PathBuf;
use std::process::ExitCode;

use super::api::DEFAULT_URL;
use super::{block_on, out};
use crate::sim::drive::{self, SimOptions};

#[derive(clap::Args)]
pub struct SimArgs {
    /// A few test transactions (marked `test`, no loyalty card), checked to reach central.
    #[arg(long)]
    pub smoke: bool,
    /// The agent's local API (`cashier.bind`).
    #[arg(long, default_value = DEFAULT_URL)]
    pub agent: String,
    /// Needed only from another machine.
    #[arg(long, env = "STORELINK_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where to read central's feed (plain mqtt://host:port; `none` to watch HTTPS only);
    /// default the agent's broker.
    #[arg(long)]
    pub broker: Option<String>,
    /// Also play central's HTTPS batch endpoint on this address (the agent's
    /// central.https.base_url must point here and trust the certificate).
    #[arg(long, value_name = "ADDR", requires_all = ["https_cert", "https_key"])]
    pub https_listen: Option<String>,
    /// PEM certificate (chain) for --https-listen.
    #[arg(long, value_name = "FILE")]
    pub https_cert: Option<PathBuf>,
    /// PEM private key for --https-listen.
    #[arg(long, value_name = "FILE")]
    pub https_key: Option<PathBuf>,
    /// The broker the room scanners publish to (mqtt://host:port); default the central broker.
    #[arg(long)]
    pub scanner_broker: Option<String>,
    /// Stand in for serial registers whose device is absent: a pseudo-terminal linked at the
    /// configured path (never over an existing device).
    #[arg(long)]
    pub serial_pty: bool,
    /// Transactions per second over all registers (the day's mean with --day-s).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Play a trading day (8:00-20:00, lunch and after-work peaks) compressed into this many
    /// seconds, over and over; without it the rate is flat.
    #[arg(long)]
    pub day_s: Option<u64>,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 60)]
    pub duration_s: u64,
    /// Loyalty customers with phones in the store (profiles sent down, scanner reports sent).
    #[arg(long, default_value_t = 0)]
    pub phones: usize,
    /// The ESPresense rooms (the agent's zone scanners), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "entrance,aisle,lane-1,lane-2,lane-3"
    )]
    pub scanners: Vec<String>,
    /// The topic ESPresense scanners publish under.
    #[arg(long, default_value = "espresense/devices")]
    pub scanner_topic: String,
    /// The loyalty app's service UUID (`presence.service_uuid`).
    #[arg(long, default_value = "6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11")]
    pub service_uuid: uuid::Uuid,
    /// `presence.rotation_s` of the agent.
    #[arg(long, default_value_t = 900)]
    pub rotation_s: u32,
    /// Card scans at lanes per second (timed until the prompt comes back).
    #[arg(long, default_value_t = 0.0)]
    pub card_scans: f64,
    /// Seconds to wait after sending for everything to reach central.
    #[arg(long)]
    pub settle_s: Option<u64>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn sim(args: SimArgs) -> ExitCode {
    let options = SimOptions {
        agent: args.agent,
        token: args.token,
        broker: args.broker,
        https_listen: args.https_listen,
        https_cert: args.https_cert,
        https_key: args.https_key,
        scanner_broker: args.scanner_broker,
        serial_pty: args.serial_pty,
        smoke: args.smoke,
        rate: args.rate,
        day: args.day_s.map(std::time::Duration::from_secs),
        duration: std::time::Duration::from_secs(args.duration_s),
        phones: args.phones,
        scanners: args.scanners,
        scanner_topic: args.scanner_topic,
        service_uuid: args.service_uuid,
        rotation_s: args.rotation_s,
        card_scans: args.card_scans,
        settle: std::time::Duration::from_secs(args.settle_s.unwrap_or(if args.smoke {
            30
        } else {
            60
        })),
        seed: args.seed,
    };
    let report = block_on(|token| async move { Ok(drive::run(&options, token).await?) });
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("storelink sim: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        out!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        out!("{}", report.summary().trim_end());
    }
    if report.passed() {
        if report.mode == "smoke" && !args.json {
            out!(
                "SMOKE TEST PASSED: {} test transactions reached central",
                report.delivered
            );
        }
        ExitCode::SUCCESS
    } else {
        let what = if report.mode == "smoke" {
            "SMOKE TEST FAILED"
        } else {
            "SIMULATION FAILED"
        };
        eprintln!(
            "{what}: {} of {} acknowledged transactions did not reach central within the settle time; {} refused, {} unanswered. Check the uplink above and `storelink status`.",
            report.lost, report.acknowledged, report.refused, report.unanswered
        );
        ExitCode::from(1)
    }
}
