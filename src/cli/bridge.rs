//! `storelink bridge`: central's side, the stores' feeds into the BI database
//! ([`crate::bridge`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{block_on, config_error, exit_with};
use crate::bridge::{self, config::BridgeConfig};

#[derive(Args)]
pub struct BridgeArgs {
    /// The bridge's config file (see config/bridge.toml).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Validate the config and exit: 0 when valid, 2 naming the key when not.
    #[arg(long)]
    pub check: bool,
}

pub fn bridge(args: BridgeArgs) -> ExitCode {
    let config = match BridgeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    if args.check {
        super::out!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    exit_with(block_on(|token| async move {
        let totals = bridge::run(config, token).await?;
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
