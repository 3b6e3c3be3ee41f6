//! The `storelink` command line. Parses arguments, sets up logging, loads the config, and
//! calls into the library; nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use storelink::config::{Config, RegisterConfig, RegisterFormat};
use storelink::pos::{FrameParser, Identity, capture};
use storelink::{clock, daemon, demo};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Prints a line to stdout; a reader that went away (`| head`) ends the program quietly
/// instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout().lock(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// Exit code for configuration errors; retail IT scripts and systemd's ExecStartPre rely on it.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "storelink",
    version,
    about = "In-store edge agent: registers, presence, profiles and offers, streamed to central"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 when valid, 2 with `FILE: key.path: what is wrong` when not.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Run the whole pipeline on embedded defaults: a broker, simulated registers, the agent.
    Demo {
        #[arg(long)]
        mqtt_port: Option<u16>,
        #[arg(long)]
        http_port: Option<u16>,
    },
    /// How the running agent is: components, queue depth, last contact with central.
    /// Exit code 0 healthy, 1 degraded (or still starting), 2 unreachable.
    Status {
        /// The agent's local API (`cashier.bind`).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Needed only from another machine; on the gateway itself loopback is trusted.
        #[arg(long, env = "STORELINK_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print the agent's JSON instead of the summary.
        #[arg(long)]
        json: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_s: u64,
    },
    /// The lane display URL (with its token) for every lane the config names: open each on
    /// that lane's screen.
    Lanes {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, env = "STORELINK_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Drive a running agent like a busy store (registers, phones, card scans) and check what
    /// reaches central: sent, acknowledged, delivered, lost (must be 0), duplicates, latency.
    /// `--smoke` sends a few test transactions and checks they arrive: exit 0 when they all
    /// did, 1 when something was lost or refused, 2 when the simulator could not start.
    Sim(SimArgs),
    /// Register tools: record a register's output, replay it, check a format or template.
    #[command(subcommand)]
    Pos(PosCommand),
    /// Bluetooth LE presence tools.
    #[command(subcommand)]
    Ble(BleCommand),
    /// What the running agent knows about customers, read from its local API.
    #[command(subcommand)]
    Profiles(ProfilesCommand),
    /// Campaigns and offer decisions: explain a decision, campaign statistics, check a set.
    #[command(subcommand)]
    Offers(OffersCommand),
}

#[derive(clap::Args)]
struct SimArgs {
    /// A few test transactions (marked `test`, no loyalty card), checked to reach central.
    #[arg(long)]
    smoke: bool,
    /// The agent's local API (`cashier.bind`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    agent: String,
    /// Needed only from another machine.
    #[arg(long, env = "STORELINK_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where to read central's feed (plain mqtt://host:port; `none` to watch HTTPS only);
    /// default the agent's broker.
    #[arg(long)]
    broker: Option<String>,
    /// Also play central's HTTPS batch endpoint on this address (the agent's
    /// central.https.base_url must point here and trust the certificate).
    #[arg(long, value_name = "ADDR", requires_all = ["https_cert", "https_key"])]
    https_listen: Option<String>,
    /// PEM certificate (chain) for --https-listen.
    #[arg(long, value_name = "FILE")]
    https_cert: Option<PathBuf>,
    /// PEM private key for --https-listen.
    #[arg(long, value_name = "FILE")]
    https_key: Option<PathBuf>,
    /// The broker the room scanners publish to (mqtt://host:port); default the central broker.
    #[arg(long)]
    scanner_broker: Option<String>,
    /// Stand in for serial registers whose device is absent: a pseudo-terminal linked at the
    /// configured path (never over an existing device).
    #[arg(long)]
    serial_pty: bool,
    /// Transactions per second over all registers (the day's mean with --day-s).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Play a trading day (8:00-20:00, lunch and after-work peaks) compressed into this many
    /// seconds, over and over; without it the rate is flat.
    #[arg(long)]
    day_s: Option<u64>,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// Loyalty customers with phones in the store (profiles sent down, scanner reports sent).
    #[arg(long, default_value_t = 0)]
    phones: usize,
    /// The ESPresense rooms (the agent's zone scanners), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "entrance,aisle,lane-1,lane-2,lane-3"
    )]
    scanners: Vec<String>,
    /// The topic ESPresense scanners publish under.
    #[arg(long, default_value = "espresense/devices")]
    scanner_topic: String,
    /// The loyalty app's service UUID (`presence.service_uuid`).
    #[arg(long, default_value = "6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11")]
    service_uuid: uuid::Uuid,
    /// `presence.rotation_s` of the agent.
    #[arg(long, default_value_t = 900)]
    rotation_s: u32,
    /// Card scans at lanes per second (timed until the prompt comes back).
    #[arg(long, default_value_t = 0.0)]
    card_scans: f64,
    /// Seconds to wait after sending for everything to reach central.
    #[arg(long)]
    settle_s: Option<u64>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum OffersCommand {
    /// Why each campaign would or would not be chosen for a customer now (nothing is recorded).
    Explain {
        /// Customer id or loyalty card.
        #[arg(value_name = "CUSTOMER")]
        customer: String,
        /// Trigger names, comma-separated: store_entered, zone_dwelling, lane_arrived,
        /// transaction_started, transaction_completed, birthday_visit, winback_due.
        #[arg(long, default_value = "store_entered")]
        trigger: String,
        #[arg(long)]
        zone: Option<String>,
        #[arg(long)]
        lane: Option<String>,
        /// Product group for winback_due.
        #[arg(long)]
        group: Option<String>,
        /// Decide as of this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
        /// Print the JSON the agent answered.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Per campaign and variant: shown, control, redeemed, revenue, and the uplift test.
    Stats {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Compile a campaign set file as the agent would: exit 0 when every campaign goes live, 1
    /// when some are rejected (each named with its field), 2 when the file is not a set.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ProfilesCommand {
    /// One customer's profile and KPIs (the presence key is never shown).
    Show {
        #[arg(value_name = "ID")]
        id: String,
        /// The agent's local API (`cashier.bind`).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// How many profiles, keys, KPI records and tombstones the agent holds.
    Stats {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
}

#[derive(Subcommand)]
enum BleCommand {
    /// Print the rotating identifier (EID) a presence key yields at a time, so app developers
    /// can check their implementation: the EID, the service data to advertise, and the
    /// iBeacon major and minor.
    Eid {
        /// The customer's presence key, 64 hex digits.
        #[arg(long)]
        key: String,
        /// RFC 3339 time, e.g. 2026-11-22T10:00:00Z.
        #[arg(long)]
        at: String,
        /// Rotation period in seconds (presence.rotation_s).
        #[arg(long, default_value_t = 900)]
        rotation_s: u32,
    },
    /// Record every advertisement the local adapter hears, in the replay format
    /// (`[presence.replay]`), for calibration and for app developers. Device addresses are
    /// never written: each device gets a salted hash that changes with every recording.
    /// Ctrl-C ends the recording.
    Record {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Adapter name as BlueZ calls it (hci0); default the first one.
        #[arg(long)]
        adapter: Option<String>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
}

#[derive(Subcommand)]
enum PosCommand {
    /// Record what a configured register sends, byte for byte, without ingesting it. Stop the
    /// agent first if it uses the same port. Ctrl-C ends the recording.
    Record {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        register: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Send a capture (or a raw file) to an agent's register port over TCP.
    Replay {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// Keep the recorded gaps between reads instead of sending as fast as possible.
        #[arg(long)]
        as_recorded: bool,
    },
    /// Parse a capture offline and print the canonical transactions, or say exactly which
    /// frame (and for receipts, which line) failed and why. Exit 1 if any frame failed.
    Parse {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Use a configured register's format, framing and template.
        #[arg(long, value_name = "FILE", requires = "register")]
        config: Option<PathBuf>,
        #[arg(long)]
        register: Option<String>,
        /// Format, when no config is given: jsonl, poslog or receipt.
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Receipt template (TOML), for --format receipt.
        #[arg(long, value_name = "FILE")]
        template: Option<PathBuf>,
        /// IANA time zone for times without an offset.
        #[arg(long, default_value = "UTC")]
        timezone: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Jsonl,
    Poslog,
    Receipt,
}

fn main() -> ExitCode {
    // Where the host's THP setting is "always", the kernel backs every aligned 2 MiB of
    // mimalloc's arenas with a huge page on first touch, tripling the agent's idle RSS. The
    // flag applies to mappings that already exist, so setting it here is early enough. It is
    // a footprint choice, not a correctness one: failing to set it changes nothing else.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
    let cli = Cli::parse();
    init_logging(cli.log_format);
    storelink::install_crypto_provider();
    match cli.command {
        Command::CheckConfig { file } => match storelink::daemon::load_config(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => {
            let config = match storelink::daemon::load_config(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            exit_with(runtime().and_then(|rt| {
                rt.block_on(async {
                    let token = CancellationToken::new();
                    tokio::spawn(daemon::cancel_on_signal(token.clone()));
                    daemon::run(config, clock::system(), token).await?;
                    Ok(())
                })
            }))
        }
        Command::Demo {
            mqtt_port,
            http_port,
        } => exit_with(runtime().and_then(|rt| {
            rt.block_on(async {
                let token = CancellationToken::new();
                tokio::spawn(daemon::cancel_on_signal(token.clone()));
                demo::run(
                    demo::DemoOptions {
                        mqtt_port,
                        http_port,
                    },
                    token,
                )
                .await?;
                Ok(())
            })
        })),
        Command::Status {
            url,
            token,
            json,
            timeout_s,
        } => status(&url, token.as_deref(), json, timeout_s),
        Command::Lanes { url, token } => lanes(&url, token.as_deref()),
        Command::Sim(args) => sim(args),
        Command::Pos(command) => pos(command),
        Command::Ble(command) => ble(command),
        Command::Profiles(command) => profiles(command),
        Command::Offers(command) => offers(command),
    }
}

fn status(url: &str, token: Option<&str>, json: bool, timeout_s: u64) -> ExitCode {
    use storelink::cashier::report;
    let value = match api_request(url, "/api/v1/status", &[], token, timeout_s) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("storelink: UNREACHABLE: {e:#}");
            return ExitCode::from(report::EXIT_UNREACHABLE);
        }
    };
    let (text, code) = report::summarize(&value, jiff::Timestamp::now());
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        out!("{}", text.trim_end());
    }
    ExitCode::from(code)
}

fn lanes(url: &str, token: Option<&str>) -> ExitCode {
    let base = url.trim_end_matches('/');
    let answer = api_request(url, "/api/v1/lanes", &[], token, 10);
    match answer {
        Ok(v) => {
            let lanes = v["lanes"].as_array().cloned().unwrap_or_default();
            if lanes.is_empty() {
                out!("no lanes in the config (registers' and presence zones' `lane`)");
            }
            for l in lanes {
                out!(
                    "lane {:6} {base}{}",
                    l["lane"].as_str().unwrap_or("?"),
                    l["display"].as_str().unwrap_or("")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("storelink: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn sim(args: SimArgs) -> ExitCode {
    use storelink::sim::drive::{self, SimOptions};
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
    let report = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            let token = CancellationToken::new();
            tokio::spawn(daemon::cancel_on_signal(token.clone()));
            drive::run(&options, token).await.map_err(|e| e.to_string())
        })
    });
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

/// GETs `path` from the agent's local API and parses the JSON answer.
fn api_get(url: &str, path: &str, query: &[(&str, String)]) -> anyhow::Result<serde_json::Value> {
    api_request(url, path, query, None, 30)
}

/// GETs `path` from the agent's local API, with the admin token when given.
fn api_request(
    url: &str,
    path: &str,
    query: &[(&str, String)],
    token: Option<&str>,
    timeout_s: u64,
) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", url.trim_end_matches('/'));
    runtime()?.block_on(async {
        let mut request = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(timeout_s.max(1)))
            .build()?
            .get(&url)
            .query(query);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{url}: {e} (is the agent running? --url)"))?;
        let status = response.status();
        let body = response.text().await?;
        if !status.is_success() {
            anyhow::bail!("{url}: {status}: {}", body.trim());
        }
        Ok(serde_json::from_str(&body)?)
    })
}

fn offers(command: OffersCommand) -> ExitCode {
    match command {
        OffersCommand::Check { file } => {
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let set: storelink::offers::campaign::CampaignSet = match serde_json::from_slice(&bytes)
            {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{}: not a campaign set: {e}", file.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let compiled = storelink::offers::campaign::CompiledSet::compile(set);
            for r in &compiled.rejected {
                eprintln!("{}: {r}", file.display());
            }
            out!(
                "{}: version {}: {} live, {} rejected",
                file.display(),
                compiled.version,
                compiled.live.len(),
                compiled.rejected.len()
            );
            if compiled.rejected.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        OffersCommand::Explain {
            customer,
            trigger,
            zone,
            lane,
            group,
            at,
            json,
            url,
        } => {
            let mut query = vec![("trigger", trigger)];
            for (k, v) in [("zone", zone), ("lane", lane), ("group", group), ("at", at)] {
                if let Some(v) = v {
                    query.push((k, v));
                }
            }
            exit_with(
                api_get(&url, &format!("/api/v1/offers/explain/{customer}"), &query).and_then(
                    |v| {
                        if json {
                            out!("{}", serde_json::to_string_pretty(&v)?);
                        } else {
                            out!("{}", storelink::offers::report::explanation(&v));
                        }
                        Ok(())
                    },
                ),
            )
        }
        OffersCommand::Stats { json, url } => {
            exit_with(api_get(&url, "/api/v1/offers/stats", &[]).and_then(|v| {
                if json {
                    out!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    out!("{}", storelink::offers::report::stats(&v));
                }
                Ok(())
            }))
        }
    }
}

fn profiles(command: ProfilesCommand) -> ExitCode {
    let (url, path) = match &command {
        ProfilesCommand::Show { id, url } => (url, format!("/api/v1/profiles/{id}")),
        ProfilesCommand::Stats { url } => (url, "/api/v1/profiles/stats".to_string()),
    };
    exit_with(api_get(url, &path, &[]).and_then(|value| {
        out!("{}", serde_json::to_string_pretty(&value)?);
        Ok(())
    }))
}

fn ble(command: BleCommand) -> ExitCode {
    use storelink::presence::identity;
    match command {
        BleCommand::Record {
            out,
            adapter,
            seconds,
        } => exit_with(runtime().and_then(|rt| {
            rt.block_on(async {
                let token = CancellationToken::new();
                tokio::spawn(daemon::cancel_on_signal(token.clone()));
                let settings = storelink::presence::source::BtleSettings {
                    adapter,
                    ..Default::default()
                };
                eprintln!(
                    "recording advertisements into {} (Ctrl-C to stop)",
                    out.display()
                );
                let lines = storelink::presence::source::btle::record(
                    &settings,
                    out,
                    seconds.map(std::time::Duration::from_secs),
                    storelink::clock::system(),
                    token,
                )
                .await?;
                eprintln!("recorded {lines} advertisements");
                Ok(())
            })
        })),
        BleCommand::Eid {
            key,
            at,
            rotation_s,
        } => {
            let key = match identity::parse_key(&key) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("--key: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let at: jiff::Timestamp = match at.parse() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("--at: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if rotation_s == 0 {
                eprintln!("--rotation-s: must be at least 1");
                return ExitCode::from(EXIT_CONFIG);
            }
            let window = identity::window_of(at, rotation_s);
            let eid = identity::eid(&key, window);
            out!("window {window} ({rotation_s} s)");
            out!("eid {}", identity::hex(&eid));
            out!("service data 01{}", identity::hex(&eid));
            out!(
                "ibeacon major {} minor {}",
                u16::from_be_bytes([eid[0], eid[1]]),
                u16::from_be_bytes([eid[2], eid[3]])
            );
            ExitCode::SUCCESS
        }
    }
}

fn pos(command: PosCommand) -> ExitCode {
    match command {
        PosCommand::Record {
            config,
            register,
            out,
            seconds,
        } => {
            let (config, register) = match load_register(&config, &register) {
                Ok(pair) => pair,
                Err(code) => return code,
            };
            let parser = match FrameParser::for_register(&config, &register) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let id = identity(&config, &register);
            exit_with(runtime().and_then(|rt| {
                rt.block_on(async {
                    let token = CancellationToken::new();
                    tokio::spawn(daemon::cancel_on_signal(token.clone()));
                    if let Some(s) = seconds {
                        let t = token.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(std::time::Duration::from_secs(s)).await;
                            t.cancel();
                        });
                    }
                    eprintln!(
                        "recording register {} into {} (Ctrl-C to stop)",
                        register.name,
                        out.display()
                    );
                    // Frame what arrives, so the technician sees verdicts as the register prints.
                    let mut stream = Vec::new();
                    let mut shown = 0;
                    let total = capture::record(&register.transport, &out, &token, |chunk| {
                        stream.extend_from_slice(&chunk.raw);
                        let frames = parser.frames(&stream);
                        // The last frame may be incomplete; report the ones before it.
                        for f in frames
                            .iter()
                            .take(frames.len().saturating_sub(1))
                            .skip(shown)
                        {
                            print_verdict(shown + 1, &parser, f, &id);
                            shown += 1;
                        }
                    })
                    .await?;
                    let frames = parser.frames(&stream);
                    for f in frames.iter().skip(shown) {
                        shown += 1;
                        print_verdict(shown, &parser, f, &id);
                    }
                    eprintln!("recorded {total} bytes, {shown} frames");
                    Ok(())
                })
            }))
        }
        PosCommand::Replay {
            file,
            to,
            as_recorded,
        } => exit_with(runtime().and_then(|rt| {
            rt.block_on(async {
                let token = CancellationToken::new();
                tokio::spawn(daemon::cancel_on_signal(token.clone()));
                let pace = if as_recorded {
                    capture::Pace::AsRecorded
                } else {
                    capture::Pace::Fast
                };
                let sent = capture::replay(&file, &to, pace, &token).await?;
                eprintln!("sent {sent} bytes to {to}");
                Ok(())
            })
        })),
        PosCommand::Parse {
            file,
            config,
            register,
            format,
            template,
            timezone,
        } => {
            let (parser, id) = match (config, register) {
                (Some(config), Some(register)) => {
                    let (config, register) = match load_register(&config, &register) {
                        Ok(pair) => pair,
                        Err(code) => return code,
                    };
                    match FrameParser::for_register(&config, &register) {
                        Ok(p) => (p, identity(&config, &register)),
                        Err(e) => {
                            eprintln!("{e}");
                            return ExitCode::from(EXIT_CONFIG);
                        }
                    }
                }
                _ => match parser_from_flags(format, template, &timezone) {
                    Ok(pair) => pair,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
            };
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            let frames = match capture::parse(&bytes, &parser, &id) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            let mut failed = false;
            for f in &frames {
                failed |= !print_verdict(f.index, &parser, &f.frame, &id);
            }
            if frames.is_empty() {
                out!("{}: no frames found", file.display());
                failed = true;
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

fn load_register(path: &std::path::Path, name: &str) -> Result<(Config, RegisterConfig), ExitCode> {
    let config = storelink::daemon::load_config(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    let register = config
        .registers
        .iter()
        .find(|r| r.name == name)
        .cloned()
        .ok_or_else(|| {
            eprintln!("{}: no register named {name:?}", path.display());
            ExitCode::from(EXIT_CONFIG)
        })?;
    Ok((config, register))
}

fn identity(config: &Config, register: &RegisterConfig) -> Identity {
    Identity {
        store: config.store.id.clone(),
        register: register.name.clone(),
        lane: register.lane.clone(),
        currency: config.store.currency.clone(),
    }
}

fn parser_from_flags(
    format: Option<Format>,
    template: Option<PathBuf>,
    timezone: &str,
) -> Result<(FrameParser, Identity), String> {
    let format = match format {
        Some(Format::Jsonl) => RegisterFormat::Jsonl,
        Some(Format::Poslog) => RegisterFormat::Poslog,
        Some(Format::Receipt) => RegisterFormat::Receipt,
        None => {
            return Err(
                "give --format (jsonl, poslog, receipt) or --config with --register".into(),
            );
        }
    };
    let template = match (format, template) {
        (RegisterFormat::Receipt, None) => {
            return Err("--format receipt needs --template FILE".into());
        }
        (_, Some(path)) => Some(std::sync::Arc::new(
            storelink::pos::receipt::ReceiptTemplate::load(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?,
        )),
        (_, None) => None,
    };
    let tz =
        jiff::tz::TimeZone::get(timezone).map_err(|e| format!("--timezone {timezone}: {e}"))?;
    let register = RegisterConfig {
        name: "capture".into(),
        lane: None,
        format,
        transport: storelink::config::Transport::Http,
        framing: None,
        template: None,
        max_frame_bytes: 1024 * 1024,
        replies: None,
    };
    let parser = FrameParser {
        format,
        framing: register.framing(),
        template,
        tz,
        max_frame: register.max_frame_bytes,
    };
    let id = Identity {
        store: "store".into(),
        register: "capture".into(),
        lane: None,
        currency: "EUR".into(),
    };
    Ok((parser, id))
}

/// Prints one frame's verdict; returns whether it parsed cleanly.
fn print_verdict(
    index: usize,
    parser: &FrameParser,
    frame: &storelink::pos::framing::Frame,
    id: &Identity,
) -> bool {
    use storelink::pos::framing::Frame;
    let bytes = match frame {
        Frame::Data(b) | Frame::Rejected { raw: b, .. } => b.len() as u64,
        Frame::Oversized { len, .. } => *len,
    };
    let describe_error = |e: &str| {
        out!("frame {index} ({bytes} bytes): error: {e}");
        // For receipts, show the decoded line the error names.
        if let (Frame::Data(raw), Some(template)) = (frame, parser.template.as_ref())
            && let Some(n) = e
                .split("line ")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<usize>().ok())
        {
            let lines = storelink::pos::receipt::text_lines(raw, template);
            if let Some(text) = n.checked_sub(1).and_then(|i| lines.get(i)) {
                out!("    line {n}: {text}");
            }
        }
    };
    match parser.parse_frame(frame, id) {
        Err(e) => {
            describe_error(&e);
            false
        }
        Ok(results) if results.is_empty() => {
            out!("frame {index} ({bytes} bytes): no transaction");
            true
        }
        Ok(results) => {
            let mut ok = true;
            for r in results {
                match r {
                    Ok(tx) => {
                        out!("frame {index} ({bytes} bytes): {}", tx.id);
                        out!(
                            "{}",
                            serde_json::to_string_pretty(&tx).expect("transactions serialise")
                        );
                    }
                    Err(e) => {
                        describe_error(&e);
                        ok = false;
                    }
                }
            }
            ok
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("storelink")
        .build()?)
}

fn exit_with(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("storelink: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off,rumqttc=warn,sled=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Under systemd the journal stamps each line itself and shows no colours.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, journal) {
        (LogFormat::Text, false) => builder.init(),
        (LogFormat::Text, true) => builder.without_time().with_ansi(false).init(),
        (LogFormat::Json, _) => builder.json().init(),
    }
}
