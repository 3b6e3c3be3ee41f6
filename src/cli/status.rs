//! `status`, `lanes` and `profiles`: what the running agent says about itself and its
//! customers.

use std::process::ExitCode;
use std::time::Duration;

use super::api::{self, DEFAULT_URL};
use super::{exit_with, out};
use crate::cashier::report;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The agent's local API (`cashier.bind`).
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// Needed only from another machine; on the gateway itself loopback is trusted.
    #[arg(long, env = "STORELINK_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the agent's JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5)]
    pub timeout_s: u64,
}

#[derive(clap::Args)]
pub struct LanesArgs {
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    #[arg(long, env = "STORELINK_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum ProfilesCommand {
    /// One customer's profile and KPIs (the presence key is never shown).
    Show {
        #[arg(value_name = "ID")]
        id: String,
        /// The agent's local API (`cashier.bind`).
        #[arg(long, default_value = DEFAULT_URL)]
        url: String,
    },
    /// How many profiles, keys, KPI records and tombstones the agent holds.
    Stats {
        #[arg(long, default_value = DEFAULT_URL)]
        url: String,
    },
}

pub fn status(args: StatusArgs) -> ExitCode {
    let timeout = Duration::from_secs(args.timeout_s);
    let value = match api::get(
        &args.url,
        "/api/v1/status",
        &[],
        args.token.as_deref(),
        timeout,
    ) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("storelink: UNREACHABLE: {e}");
            return ExitCode::from(report::EXIT_UNREACHABLE);
        }
    };
    let (text, code) = report::summarize(&value, jiff::Timestamp::now());
    if args.json {
        out!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        out!("{}", text.trim_end());
    }
    ExitCode::from(code)
}

pub fn lanes(args: LanesArgs) -> ExitCode {
    let base = args.url.trim_end_matches('/');
    let answer = api::get(
        &args.url,
        "/api/v1/lanes",
        &[],
        args.token.as_deref(),
        Duration::from_secs(10),
    );
    exit_with(answer.map(|v| {
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
    }))
}

pub fn profiles(command: ProfilesCommand) -> ExitCode {
    let (url, path) = match &command {
        ProfilesCommand::Show { id, url } => (url, format!("/api/v1/profiles/{id}")),
        ProfilesCommand::Stats { url } => (url, "/api/v1/profiles/stats".to_string()),
    };
    exit_with(
        api::get(url, &path, &[], None, Duration::from_secs(30)).and_then(|value| {
            out!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }),
    )
}
