//! `offers`: check a campaign set offline, explain a decision, campaign statistics.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::api::{self, DEFAULT_URL};
use super::{EXIT_CONFIG, exit_with, out};
use crate::offers::campaign::{CampaignSet, CompiledSet};
use crate::offers::report;

/// Explaining a decision reads the customer's profile and every campaign; give it time.
const API_PATIENCE: Duration = Duration::from_secs(30);

#[derive(clap::Subcommand)]
pub enum OffersCommand {
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
        #[arg(long, default_value = DEFAULT_URL)]
        url: String,
    },
    /// Per campaign and variant: shown, control, redeemed, revenue, and the uplift test.
    Stats {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_URL)]
        url: String,
    },
    /// Compile a campaign set file as the agent would: exit 0 when every campaign goes live, 1
    /// when some are rejected (each named with its field), 2 when the file is not a set.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

pub fn offers(command: OffersCommand) -> ExitCode {
    match command {
        OffersCommand::Check { file } => {
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let set = match CampaignSet::from_json(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{}: not a campaign set: {e}", file.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let compiled = CompiledSet::compile(set);
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
                api::get(
                    &url,
                    &format!("/api/v1/offers/explain/{customer}"),
                    &query,
                    None,
                    API_PATIENCE,
                )
                .and_then(|v| {
                    if json {
                        out!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        out!("{}", report::explanation(&v));
                    }
                    Ok(())
                }),
            )
        }
        OffersCommand::Stats { json, url } => exit_with(
            api::get(&url, "/api/v1/offers/stats", &[], None, API_PATIENCE).and_then(|v| {
                if json {
                    out!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    out!("{}", report::stats(&v));
                }
                Ok(())
            }),
        ),
    }
}
