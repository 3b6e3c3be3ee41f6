//! storelink: the in-store edge agent.
//!
//! Data flows one way: register sources ([`pos`]) turn bytes into domain events; the core
//! ([`engine`]) makes them durable and decides; sinks ([`uplink`], [`cashier`]) deliver them.
//! [`store`] is the only module that touches the database; [`clock`] is the only source of
//! wall-clock time; [`supervisor`] owns every task.
//!
//! [`cli`] holds the command line's commands; `main.rs` only parses the arguments and dispatches
//! to it.

pub mod bridge;
pub mod cashier;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod deadletter;
pub mod demo;
pub mod engine;
pub mod events;
pub mod model;
pub mod occasions;
pub mod offers;
pub mod pos;
pub mod presence;
pub mod profiles;
pub mod signals;
pub mod sim;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod uplink;

/// Installs ring as the process's rustls provider. reqwest and rustls are built without a
/// bundled provider (see Cargo.toml), and any HTTP client, even one that only talks plain
/// HTTP to the local API, needs one. Idempotent; the first install wins.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
