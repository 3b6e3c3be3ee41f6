//! The integration tests: one crate, one binary, one module per area.
//!
//! One binary because each test binary links the whole library again: twenty of them made a
//! fresh `cargo test` spend most of its time linking. Run one area with
//! `cargo test --test it uplink_mqtt::` (or any test name filter; the long chaos and power-cut
//! suites are `#[ignore]`d: add `-- --ignored` for them).
//!
//! Tests that need an external program (mosquitto, PostgreSQL, chromium, FUSE, qemu-user,
//! python3-dbusmock) skip with a message when it is absent, and fail instead when
//! `STORELINK_REQUIRE_EXTERNAL=1` (CI); see [`common::require_external`].

mod common;

mod bridge;
mod bridge_day;
mod bridge_email;
mod cashier;
mod chaos;
mod contract;
mod eid;
mod kpi_known_answers;
mod mosquitto;
mod offers;
mod pipeline;
mod powercut;
mod presence;
mod presence_sources;
mod presence_zones;
mod process;
mod profile_sync;
mod profiles;
mod registers;
mod rfm_crosscheck;
mod signals;
mod sim;
mod storage;
mod uplink_drain;
mod uplink_https;
mod uplink_mqtt;
