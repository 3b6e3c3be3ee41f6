//! `storelink sim`, the real binary, against real agents: the smoke test passes on the demo and
//! fails loudly when the uplink is broken; the load mode drives registers, phones (through
//! ESPresense reports) and card scans, and accounts for every transaction.

use crate::common;
use crate::common::https;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// Runs `storelink sim` with `args` off the async threads.
async fn sim(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(binary())
            .arg("sim")
            .args(&args)
            .env_remove("STORELINK_ADMIN_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Stops a child process with SIGTERM, as systemd or Ctrl-C would.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_test_against_the_demo_passes() {
    let (mqtt, http) = (free_port(), free_port());
    let demo = Stopped(
        Command::new(binary())
            .args([
                "demo",
                "--mqtt-port",
                &mqtt.to_string(),
                "--http-port",
                &http.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let agent = format!("http://127.0.0.1:{http}");
    let ready = format!("{agent}/readyz");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !get(&ready).await.is_ok_and(|r| r.status().is_success()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the demo did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = sim(vec!["--smoke".into(), "--agent".into(), agent]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("SMOKE TEST PASSED: 3 test transactions reached central"));
    assert!(stdout.contains("lost 0"), "{stdout}");
    drop(demo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_test_fails_loudly_when_the_uplink_is_broken() {
    // Central's broker is up (the simulator watches it), but the agent points at a port where
    // nothing listens: everything is taken at the register and nothing reaches central.
    let central = start_rumqttd();
    let nowhere = local(free_port());
    let agent = TestAgent::start(nowhere, &["lane-1", "lane-2"]).await;
    let out = sim(vec![
        "--smoke".into(),
        "--agent".into(),
        agent.api(),
        "--broker".into(),
        format!("mqtt://{central}"),
        "--settle-s".into(),
        "3".into(),
    ])
    .await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("SMOKE TEST FAILED"), "{stderr}");
    assert!(stdout.contains("acknowledged 3"), "{stdout}");
    assert!(stdout.contains("lost 3"), "{stdout}");
    assert!(
        stdout.contains("uplink.mqtt: degraded") && stdout.contains(&nowhere.to_string()),
        "the report says why: {stdout}"
    );
    // The test transactions are in the outbox, marked, waiting for central.
    assert_eq!(agent.outbox.depth(), 3);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_says_why_it_cannot_start() {
    let out = sim(vec![
        "--smoke".into(),
        "--agent".into(),
        format!("http://127.0.0.1:{}", free_port()),
    ])
    .await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("cannot reach the agent") && stderr.contains("--agent"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_mode_drives_registers_phones_and_card_scans_and_accounts_for_everything() {
    let broker = start_rumqttd();
    let extra = format!(
        r#"
[presence]
source = "mqtt-scanners"
service_uuid = "6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11"

[presence.scanners]
url = "mqtt://{broker}"

[[presence.zones]]
name = "lane-1"
lane = "1"
scanners = ["lane-1"]
enter_m = 3.5
exit_m = 5.0

[[presence.zones]]
name = "lane-2"
lane = "2"
scanners = ["lane-2"]
enter_m = 3.5
exit_m = 5.0
"#
    );
    let agent = TestAgent::start_with(broker, &["lane-1", "lane-2"], &extra).await;
    let out = sim(vec![
        "--agent".into(),
        agent.api(),
        "--rate".into(),
        "40".into(),
        "--duration-s".into(),
        "5".into(),
        "--phones".into(),
        "20".into(),
        "--scanners".into(),
        "lane-1,lane-2".into(),
        "--card-scans".into(),
        "4".into(),
        "--json".into(),
    ])
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let n = |k: &str| report[k].as_u64().unwrap();
    assert!(n("sent") > 100, "about 200 at 40/s for 5 s: {report}");
    assert_eq!(n("acknowledged"), n("sent"));
    assert_eq!(n("delivered"), n("sent"));
    assert_eq!(n("lost"), 0);
    assert_eq!(report["end_to_end_ms"]["count"].as_u64(), Some(n("sent")));
    assert!(n("scanner_reports") >= 20 * 4, "{report}");
    assert!(
        report["other_events"]["storelink.presence.v1"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "the phones were recognised and their presence reached central: {report}"
    );
    assert!(report["prompt_ms"]["count"].as_u64().unwrap() >= 10);
    assert!(
        n("prompts_shown") > 0,
        "cards of known customers prompt: {report}"
    );
    assert!(agent.profiles.get("sim-020").unwrap().is_some());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_plays_central_over_https_too() {
    // The agent's broker is unreachable, so after 5 s its HTTPS path takes over; the simulator
    // serves that endpoint and sees the test transactions arrive there.
    let pki = https::Pki::generate();
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.write_ca(dir.path());
    let (cert, key) = (
        dir.path().join("central.pem"),
        dir.path().join("central.key"),
    );
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let port = free_port();
    let extra = format!(
        "\n[central.https]\nbase_url = \"https://127.0.0.1:{port}\"\nca_file = \"{}\"\nmqtt_down_after_s = 5\n",
        ca.display()
    );
    let agent = TestAgent::start_with(local(free_port()), &["lane-1"], &extra).await;
    let out = sim(vec![
        "--smoke".into(),
        "--agent".into(),
        agent.api(),
        "--broker".into(),
        "none".into(),
        "--https-listen".into(),
        format!("127.0.0.1:{port}"),
        "--https-cert".into(),
        cert.display().to_string(),
        "--https-key".into(),
        key.display().to_string(),
        "--json".into(),
    ])
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["delivered"], 3, "{report}");
    assert_eq!(report["delivered_over_https"], 3, "{report}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_in_every_format_and_transport_the_simulator_can_stand_in_for() {
    // POSLog over TCP, jsonl over HTTP, and jsonl on a serial line the simulator provides as
    // a pseudo-terminal, alongside the usual jsonl over TCP.
    let broker = start_rumqttd();
    let dir = tempfile::tempdir().unwrap();
    let tty = dir.path().join("ttyUSB7");
    let (poslog_port, jsonl_port) = (free_port(), free_port());
    let extra = format!(
        r#"
[[registers]]
name = "pos-7"
lane = "7"
format = "poslog"
transport = {{ kind = "tcp-listen", bind = "127.0.0.1:{poslog_port}" }}

[[registers]]
name = "web-8"
format = "jsonl"
transport = {{ kind = "http" }}

[[registers]]
name = "till-9"
format = "jsonl"
transport = {{ kind = "serial", port = "{}" }}
"#,
        tty.display()
    );
    let config = config_text(dir.path(), broker, free_port(), &[("lane-1", jsonl_port)]) + &extra;
    let agent = TestAgent::from_text(
        tempfile::tempdir().unwrap(),
        &[("lane-1", jsonl_port)],
        &config,
        &Default::default(),
        storelink::clock::system(),
    )
    .await;
    let out = sim(vec![
        "--agent".into(),
        agent.api(),
        "--serial-pty".into(),
        "--rate".into(),
        "40".into(),
        "--duration-s".into(),
        "4".into(),
        "--json".into(),
    ])
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let registers: Vec<&str> = report["registers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(registers, ["lane-1", "pos-7", "web-8", "till-9"]);
    assert_eq!(report["lost"], 0, "{report}");
    assert!(report["serial_sent"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["delivered"], report["sent"], "{report}");
    assert!(!tty.exists(), "the simulated line is unplugged at the end");
    // Every register's transactions reached the agent by its own route.
    let stats: serde_json::Value = get(format!("{}/metrics", agent.api()))
        .await
        .unwrap()
        .text()
        .await
        .map(serde_json::Value::String)
        .unwrap();
    for r in ["lane-1", "pos-7", "web-8", "till-9"] {
        assert!(
            stats
                .as_str()
                .unwrap()
                .contains(&format!("storelink_transactions_total{{register=\"{r}\"}}")),
            "{r}"
        );
    }
    agent.stop().await;
}
