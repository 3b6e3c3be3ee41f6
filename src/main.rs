//! The `storelink` command line: parses the arguments, sets up logging and dispatches to
//! [`storelink::cli`], where every command lives.

use std::process::ExitCode;

use clap::Parser;
use storelink::cli::{self, Cli};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Where the host's THP setting is "always", the kernel backs every aligned 2 MiB of
    // mimalloc's arenas with a huge page on first touch, tripling the agent's idle RSS. The
    // flag applies to mappings that already exist, so setting it here is early enough. It is
    // a footprint choice, not a correctness one: failing to set it changes nothing else.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
    let args = Cli::parse();
    cli::init_logging(args.log_format);
    storelink::install_crypto_provider();
    cli::dispatch(args.command)
}
