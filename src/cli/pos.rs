//! `pos`: record a register's output, replay it, parse a capture offline.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{block_on, exit_with, out};
use crate::config::{Config, RegisterConfig, RegisterFormat};
use crate::pos::framing::Frame;
use crate::pos::receipt::{self, ReceiptTemplate};
use crate::pos::{FrameParser, Identity, capture};

#[derive(clap::Subcommand)]
pub enum PosCommand {
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
        /// IANA time zone for times without an offset, when no config is given.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Store id in the transaction ids, when no config is given.
        #[arg(long, default_value = "capture")]
        store: String,
        /// ISO 4217 currency for sources that do not say, when no config is given.
        #[arg(long, default_value = "EUR")]
        currency: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Jsonl,
    Poslog,
    Receipt,
}

pub fn pos(command: PosCommand) -> ExitCode {
    match command {
        PosCommand::Record {
            config,
            register,
            out,
            seconds,
        } => {
            let (parser, id, transport) = match configured(&config, &register) {
                Ok((parser, id, register)) => (parser, id, register.transport),
                Err(code) => return code,
            };
            exit_with(block_on(|token| async move {
                if let Some(s) = seconds {
                    let t = token.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(s)).await;
                        t.cancel();
                    });
                }
                eprintln!(
                    "recording register {} into {} (Ctrl-C to stop)",
                    id.register,
                    out.display()
                );
                // Frame what arrives, so the technician sees verdicts as the register prints.
                let mut stream = parser.stream();
                let mut shown = 0;
                let total = capture::record(&transport, &out, &token, |chunk| {
                    for frame in stream.push(&chunk.raw) {
                        shown += 1;
                        print_verdict(shown, &parser, &frame, &id);
                    }
                })
                .await?;
                for frame in stream.finish() {
                    shown += 1;
                    print_verdict(shown, &parser, &frame, &id);
                }
                eprintln!("recorded {total} bytes, {shown} frames");
                Ok(())
            }))
        }
        PosCommand::Replay {
            file,
            to,
            as_recorded,
        } => exit_with(block_on(|token| async move {
            let pace = if as_recorded {
                capture::Pace::AsRecorded
            } else {
                capture::Pace::Fast
            };
            let sent = capture::replay(&file, &to, pace, &token).await?;
            eprintln!("sent {sent} bytes to {to}");
            Ok(())
        })),
        PosCommand::Parse {
            file,
            config,
            register,
            format,
            template,
            timezone,
            store,
            currency,
        } => {
            let found = match (config, register) {
                (Some(config), Some(register)) => {
                    configured(&config, &register).map(|(parser, id, _)| (parser, id))
                }
                _ => from_flags(format, template, &timezone, store, currency)
                    .map_err(super::config_error),
            };
            let (parser, id) = match found {
                Ok(pair) => pair,
                Err(code) => return code,
            };
            parse(&file, &parser, &id)
        }
    }
}

/// `pos parse`: every frame's verdict; exit 1 when any failed or there were none.
fn parse(file: &std::path::Path, parser: &FrameParser, id: &Identity) -> ExitCode {
    let frames = std::fs::read(file)
        .map_err(|e| e.to_string())
        .and_then(|bytes| capture::parse(&bytes, parser, id).map_err(|e| e.to_string()));
    let frames = match frames {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for f in &frames {
        failed |= !print_verdict(f.index, parser, &f.frame, id);
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

/// The parser and identity of register `name` in the config at `path`, as the agent would
/// build them.
fn configured(
    path: &std::path::Path,
    name: &str,
) -> Result<(FrameParser, Identity, RegisterConfig), ExitCode> {
    let config: Config = crate::daemon::load_config(path).map_err(super::config_error)?;
    let register = config
        .registers
        .iter()
        .find(|r| r.name == name)
        .cloned()
        .ok_or_else(|| {
            super::config_error(format!("{}: no register named {name:?}", path.display()))
        })?;
    let parser =
        FrameParser::for_register(&register, config.time_zone()).map_err(super::config_error)?;
    Ok((parser, Identity::of(&config, &register), register))
}

/// The parser and identity `pos parse` uses without a config: a register with every default,
/// in the format, template and time zone the flags give.
fn from_flags(
    format: Option<Format>,
    template: Option<PathBuf>,
    timezone: &str,
    store: String,
    currency: String,
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
    if format == RegisterFormat::Receipt && template.is_none() {
        return Err("--format receipt needs --template FILE".into());
    }
    if let Some(path) = &template {
        // Checked here so the error names the flag rather than a register.
        ReceiptTemplate::load(path).map_err(|e| format!("--template {}: {e}", path.display()))?;
    }
    let tz =
        jiff::tz::TimeZone::get(timezone).map_err(|e| format!("--timezone {timezone}: {e}"))?;
    let register = RegisterConfig::new("capture", format, template);
    let parser = FrameParser::for_register(&register, tz)?;
    let id = Identity {
        store,
        register: register.name,
        lane: None,
        currency,
    };
    Ok((parser, id))
}

/// Prints one frame's verdict; returns whether it parsed cleanly.
fn print_verdict(index: usize, parser: &FrameParser, frame: &Frame, id: &Identity) -> bool {
    let bytes = match frame {
        Frame::Data(b) | Frame::Rejected { raw: b, .. } => b.len() as u64,
        Frame::Oversized { len, .. } => *len,
    };
    let describe_error = |e: &str| {
        out!("frame {index} ({bytes} bytes): error: {e}");
        // For receipts, show the decoded line the error names.
        if let (Frame::Data(raw), Some(template)) = (frame, parser.template.as_ref())
            && let Some(n) = receipt::error_line(e)
        {
            let lines = receipt::text_lines(raw, template);
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
