//! `run`, `check-config` and `demo`: the agent itself.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{block_on, config_error, exit_with};
use crate::{clock, daemon, demo as demo_mode};

#[derive(clap::Args)]
pub struct RunArgs {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

#[derive(clap::Args)]
pub struct CheckConfigArgs {
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(clap::Args)]
pub struct DemoArgs {
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    #[arg(long)]
    pub http_port: Option<u16>,
}

pub fn run(args: RunArgs) -> ExitCode {
    let config = match daemon::load_config(&args.config) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    exit_with(block_on(|token| async move {
        daemon::run(config, clock::system(), token).await?;
        Ok(())
    }))
}

pub fn check_config(args: CheckConfigArgs) -> ExitCode {
    match daemon::load_config(&args.file) {
        Ok(_) => {
            super::out!("{}: ok", args.file.display());
            ExitCode::SUCCESS
        }
        Err(e) => config_error(e),
    }
}

pub fn demo(args: DemoArgs) -> ExitCode {
    let options = demo_mode::DemoOptions {
        mqtt_port: args.mqtt_port,
        http_port: args.http_port,
    };
    exit_with(block_on(|token| async move {
        demo_mode::run(options, token).await?;
        Ok(())
    }))
}
