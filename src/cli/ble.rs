//! `ble`: the rotating identifier a presence key yields, and recording what the adapter hears.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{EXIT_CONFIG, block_on, exit_with, out};
use crate::model::customer;
use crate::presence::source::{BtleSettings, btle};

#[derive(clap::Subcommand)]
pub enum BleCommand {
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

pub fn ble(command: BleCommand) -> ExitCode {
    match command {
        BleCommand::Record {
            out,
            adapter,
            seconds,
        } => exit_with(block_on(|token| async move {
            let settings = BtleSettings {
                adapter,
                ..Default::default()
            };
            eprintln!(
                "recording advertisements into {} (Ctrl-C to stop)",
                out.display()
            );
            let lines = btle::record(
                &settings,
                out,
                seconds.map(std::time::Duration::from_secs),
                crate::clock::system(),
                token,
            )
            .await?;
            eprintln!("recorded {lines} advertisements");
            Ok(())
        })),
        BleCommand::Eid {
            key,
            at,
            rotation_s,
        } => {
            let key = match customer::parse_key(&key) {
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
            let window = customer::window_of(at, rotation_s);
            let eid = customer::eid(&key, window);
            let (major, minor) = customer::ibeacon_major_minor(&eid);
            out!("window {window} ({rotation_s} s)");
            out!("eid {}", customer::hex(&eid));
            out!(
                "service data {}",
                customer::hex(&customer::service_data(&eid))
            );
            out!("ibeacon major {major} minor {minor}");
            ExitCode::SUCCESS
        }
    }
}
