//! The `storelink` command line. Parses arguments, sets up logging, loads the config, and
//! calls into the library; nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use storelink::config::Config;
use storelink::{clock, daemon, demo};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
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
            let config = match Config::load(&config) {
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
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
