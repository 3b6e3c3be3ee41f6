//! The `storelink` command line: every command's arguments and what it does, one file per
//! command family, so that tests reach them as library code. `main.rs` only parses and
//! dispatches.
//!
//! Invariants:
//! - Exit codes are a contract with retail IT's scripts and systemd: 0 success, 1 a check
//!   that failed (lost transactions, a frame that did not parse, a rejected campaign), 2 a
//!   config or argument error ([`EXIT_CONFIG`]); `status` adds its own (see
//!   [`crate::cashier::report`]).
//! - Every command that runs async work builds its runtime and its Ctrl-C/SIGTERM handling in
//!   one place, [`block_on`]; one [`CancellationToken`] per command stops it.
//! - Output goes through [`out!`]: a reader that went away (`| head`) ends the program
//!   quietly instead of a panic.

use std::future::Future;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

pub mod agent;
pub mod api;
pub mod ble;
pub mod bridge;
pub mod offers;
pub mod pos;
pub mod sim;
pub mod status;

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
pub(crate) use out;

/// Exit code for configuration and argument errors; retail IT scripts and systemd's
/// ExecStartPre rely on it.
pub const EXIT_CONFIG: u8 = 2;

/// Why a command failed, as printed on its last line.
pub type Failure = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(
    name = "storelink",
    version,
    about = "In-store edge agent: registers, presence, profiles and offers, streamed to central"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent.
    Run(agent::RunArgs),
    /// Validate a config file: exit 0 when valid, 2 with `FILE: key.path: what is wrong` when not.
    CheckConfig(agent::CheckConfigArgs),
    /// Run the whole pipeline on embedded defaults: a broker, simulated registers, the agent.
    Demo(agent::DemoArgs),
    /// How the running agent is: components, queue depth, last contact with central.
    /// Exit code 0 healthy, 1 degraded (or still starting), 2 unreachable.
    Status(status::StatusArgs),
    /// The lane display URL (with its token) for every lane the config names: open each on
    /// that lane's screen.
    Lanes(status::LanesArgs),
    /// Drive a running agent like a busy store (registers, phones, card scans) and check what
    /// reaches central: sent, acknowledged, delivered, lost (must be 0), duplicates, latency.
    /// `--smoke` sends a few test transactions and checks they arrive: exit 0 when they all
    /// did, 1 when something was lost or refused, 2 when the simulator could not start.
    Sim(sim::SimArgs),
    /// Register tools: record a register's output, replay it, check a format or template.
    #[command(subcommand)]
    Pos(pos::PosCommand),
    /// Bluetooth LE presence tools.
    #[command(subcommand)]
    Ble(ble::BleCommand),
    /// What the running agent knows about customers, read from its local API.
    #[command(subcommand)]
    Profiles(status::ProfilesCommand),
    /// Campaigns and offer decisions: explain a decision, campaign statistics, check a set.
    #[command(subcommand)]
    Offers(offers::OffersCommand),
    /// Central's side: subscribe to the stores' feeds on the broker and write them,
    /// de-duplicated and validated, into PostgreSQL for the BI tool.
    Bridge(bridge::BridgeArgs),
}

/// Runs the command the line asked for.
pub fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run(args) => agent::run(args),
        Command::CheckConfig(args) => agent::check_config(args),
        Command::Demo(args) => agent::demo(args),
        Command::Status(args) => status::status(args),
        Command::Lanes(args) => status::lanes(args),
        Command::Sim(args) => sim::sim(args),
        Command::Pos(command) => pos::pos(command),
        Command::Ble(command) => ble::ble(command),
        Command::Profiles(command) => status::profiles(command),
        Command::Offers(command) => offers::offers(command),
        Command::Bridge(args) => bridge::bridge(args),
    }
}

/// Runs `work` on a fresh multi-threaded runtime, with a token that Ctrl-C or SIGTERM
/// cancels.
pub fn block_on<T, F, Fut>(work: F) -> Result<T, Failure>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("storelink")
        .build()?;
    runtime.block_on(async {
        let token = CancellationToken::new();
        tokio::spawn(crate::daemon::cancel_on_signal(token.clone()));
        work(token).await
    })
}

/// Success, or the error on stderr (and in the log) and exit 1.
pub fn exit_with(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("storelink: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A config or argument error: printed as it is, exit 2.
pub fn config_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("{message}");
    ExitCode::from(EXIT_CONFIG)
}

/// Logging on stderr, filtered by `RUST_LOG`.
pub fn init_logging(format: LogFormat) {
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
