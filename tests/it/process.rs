//! Tests against the built `storelink` binary: what retail IT and systemd see.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{AgentProcess as Agent, write_config};
use common::*;
use jiff::Timestamp;
use storelink::sim::{JsonlClient, SimRegister};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_transactions_survive_sigkill_and_arrive_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = local(free_port());
    // The agent reaches the broker through a proxy, so central can subscribe before the agent
    // sees the broker come up; otherwise central would miss what is sent in between.
    let proxy = Proxy::new(broker);
    let register_port = free_port();
    let config = write_config(
        dir.path(),
        &config_text(
            &dir.path().join("data"),
            proxy.addr,
            free_port(),
            &[("lane-3", register_port)],
        ),
    );

    // Broker stopped: 1,000 transactions are acknowledged, so they must be on disk.
    let agent = Agent::spawn(&config);
    let mut client = JsonlClient::connect_patiently(local(register_port), Duration::from_secs(10))
        .await
        .unwrap();
    let mut register = SimRegister::new("s042", "lane-3", Some("3"), 9);
    let start: Timestamp = "2026-11-22T08:00:00Z".parse().unwrap();
    let mut acked = Vec::new();
    let mut sent = Vec::new();
    for i in 0..1000 {
        let tx = register.next(start + jiff::SignedDuration::from_secs(i * 7));
        client.send(&tx).await.unwrap();
        sent.push(tx.id);
    }
    for id in &sent {
        let reply = client.reply().await.unwrap();
        assert_eq!(reply, format!("ok {id}"));
        acked.push(id.clone());
    }
    assert_eq!(acked.len(), 1000);

    agent.kill9();

    // Restart the agent, then start the broker: everything acknowledged arrives.
    let _agent = Agent::spawn(&config);
    storelink::demo::start_broker(broker).unwrap();
    let central = Central::subscribe(broker, "storelink/v1/acme/+/events/#").await;
    proxy.open().await;
    central
        .wait_for_ids("storelink.transaction.v1", 1000, Duration::from_secs(60))
        .await;
    let got = central.ids("storelink.transaction.v1");
    for id in &acked {
        assert!(
            got.contains_key(id),
            "{id} was acknowledged but never arrived"
        );
    }
    assert_eq!(got.len(), 1000, "no foreign ids");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_within_five_seconds() {
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, "storelink/v1/acme/s042/status").await;
    let dir = tempfile::tempdir().unwrap();
    let register_port = free_port();
    let api_port = free_port();
    let config = write_config(
        dir.path(),
        &config_text(
            &dir.path().join("data"),
            broker,
            api_port,
            &[("lane-1", register_port)],
        ),
    );
    let mut agent = Agent::spawn(&config);
    let mut client = JsonlClient::connect_patiently(local(register_port), Duration::from_secs(10))
        .await
        .unwrap();
    let tx = SimRegister::new("s042", "lane-1", Some("1"), 1).next(Timestamp::now());
    assert!(client.submit(&tx).await.unwrap().starts_with("ok "));

    nix::sys::signal::kill(agent.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    // A graceful stop replaces the retained status with "offline".
    common::eventually("offline status", Duration::from_secs(5), || {
        central
            .all()
            .iter()
            .any(|r| r.event["data"]["state"] == "offline")
    })
    .await;
    // And the listener is gone.
    assert!(std::net::TcpStream::connect(local(register_port)).is_err());
}

/// Checks a config as systemd would run it: with the secrets file the package makes.
fn check_config(path: &std::path::Path) -> (i32, String) {
    check_config_with(
        path,
        &[
            ("STORELINK_ADMIN_TOKEN", "an-admin-token-for-tests"),
            ("STORELINK_LANE_SECRET", "a-lane-secret-for-tests"),
        ],
    )
}

fn check_config_with(path: &std::path::Path, env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(binary())
        .arg("check-config")
        .arg(path)
        .env_remove("STORELINK_ADMIN_TOKEN")
        .env_remove("STORELINK_LANE_SECRET")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn shipped_example_config_is_valid() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/storelink.toml");
    let (code, stderr) = check_config(&example);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_missing_admin_token_exits_2_and_names_its_key() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/storelink.toml");
    let (code, stderr) = check_config_with(
        &example,
        &[("STORELINK_LANE_SECRET", "a-lane-secret-for-tests")],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "cashier.admin_token_env: environment variable STORELINK_ADMIN_TOKEN is not set"
        ),
        "{stderr}"
    );
}

#[test]
fn each_kind_of_config_error_exits_2_and_names_the_key() {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/storelink.toml"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown key",
            example.replace("tenant = \"acme\"", "tenant = \"acme\"\nregion = \"north\""),
            "store.region: unknown key",
        ),
        (
            "wrong type",
            example.replace("keep_alive_s = 30", "keep_alive_s = \"thirty\""),
            "central.mqtt.keep_alive_s: invalid type",
        ),
        (
            "missing key",
            example.replace("id = \"s042\"", ""),
            "store.id: missing required key",
        ),
        (
            "invalid value",
            example.replace("bind = \"0.0.0.0:8080\"", "bind = \"0.0.0.0:70000\""),
            "cashier.bind: port 70000 is out of range",
        ),
    ];
    for (what, text, expected) in cases {
        let path = dir.path().join(format!("{}.toml", what.replace(' ', "-")));
        std::fs::write(&path, text).unwrap();
        let (code, stderr) = check_config(&path);
        assert_eq!(code, 2, "{what}: {stderr}");
        let expected = format!("{}: {expected}", path.display());
        assert!(
            stderr.contains(&expected),
            "{what}: expected {expected:?} in {stderr:?}"
        );
    }
    let (code, stderr) = check_config(&dir.path().join("absent.toml"));
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn run_with_a_bad_config_exits_2_before_opening_the_store_or_binding() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let text = config_text(&data, local(1883), free_port(), &[("lane-1", port)])
        .replace("[cashier]", "[cashier]\ncolour = \"red\"");
    let config = write_config(dir.path(), &text);
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cashier.colour: unknown key"));
    assert!(!data.exists(), "the store was not created");
}

#[test]
fn a_second_agent_on_the_same_store_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = local(free_port());
    let first = write_config(
        dir.path(),
        &config_text(&data, broker, free_port(), &[("lane-1", free_port())]),
    );
    let _running = Agent::spawn(&first);
    let api = std::fs::read_to_string(&first).unwrap();
    let api_port = api
        .split("bind = \"127.0.0.1:")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    wait_for_port(local(api_port), Duration::from_secs(10));

    let second_dir = tempfile::tempdir().unwrap();
    let second = write_config(
        second_dir.path(),
        &config_text(&data, broker, free_port(), &[("lane-1", free_port())]),
    );
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&second)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("locked by another process"), "{stderr}");
}

#[test]
fn version_flag_prints_the_version() {
    let out = Command::new(binary()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("storelink {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_without_flags_delivers_transactions_within_ten_seconds_presence_and_offers() {
    let started = Instant::now();
    let mut demo = Command::new(binary())
        .arg("demo")
        .env("RUST_LOG", "warn,rumqttd=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.trim().strip_prefix("broker     mqtt://127.0.0.1:") {
                let port: u16 = rest.split_whitespace().next().unwrap().parse().unwrap();
                let _ = port_tx.send(port);
            }
        }
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("demo prints its broker");
    let central = Central::subscribe(local(port), "storelink/v1/acme/#").await;
    let remaining = Duration::from_secs(10).saturating_sub(started.elapsed());
    central
        .wait_for_ids("storelink.transaction.v1", 1, remaining)
        .await;
    // The demo's phones walk in from the start: presence arrives too.
    central
        .wait_for_ids("storelink.presence.v1", 1, Duration::from_secs(15))
        .await;
    let presence = central.of_type("storelink.presence.v1");
    assert_eq!(presence[0]["data"]["event"], "entered", "{presence:?}");
    // The demo's central publishes the example campaigns: a customer who walks in is offered
    // the welcome-back push (or held back as control).
    central
        .wait_for_ids("storelink.offer.v1", 1, Duration::from_secs(15))
        .await;
    let offer = &central.of_type("storelink.offer.v1")[0]["data"];
    let decided: Vec<&str> = ["offers", "controls"]
        .iter()
        .flat_map(|k| offer[k].as_array().into_iter().flatten())
        .filter_map(|o| o["campaign"].as_str())
        .collect();
    assert!(decided.contains(&"welcome-back"), "{offer}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let deadline = Instant::now() + Duration::from_secs(6);
    while demo.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(demo.wait().unwrap().success());
}

#[test]
fn pos_parse_prints_a_shipped_receipt_capture_and_names_failures() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let capture = root.join("tests/fixtures/receipts/supermarket_sale.bin");
    let out = Command::new(binary())
        .args([
            "pos",
            "parse",
            "--format",
            "receipt",
            "--timezone",
            "Europe/Berlin",
            "--template",
        ])
        .arg(root.join("config/receipts/supermarket.toml"))
        .arg(&capture)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let json_start = text.find('{').unwrap();
    let tx: storelink::model::transaction::Transaction =
        serde_json::from_str(&text[json_start..]).unwrap();
    assert_eq!(tx.total, 1175);
    assert_eq!(tx.lines_total(), 1175);
    assert_eq!(tx.lines.len(), 11);
    assert_eq!(tx.lines[1].description, "Bananen");
    assert_eq!(tx.lines[1].quantity.to_string(), "0.532");
    assert_eq!(
        tx.started_at.to_string(),
        "2026-11-22T13:32:05Z",
        "14:32 in Berlin"
    );

    // The wrong template: exit 1, and the error says which rule failed.
    let out = Command::new(binary())
        .args(["pos", "parse", "--format", "receipt", "--template"])
        .arg(root.join("config/receipts/electronics.toml"))
        .arg(&capture)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("frame 1 (1988 bytes): error: "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pos_record_captures_a_register_and_pos_replay_plays_it_to_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let register_port = free_port();
    let config = write_config(
        dir.path(),
        &config_text(
            &dir.path().join("data"),
            local(1),
            free_port(),
            &[("lane-4", register_port)],
        ),
    );
    let capture = dir.path().join("lane-4.capture");
    let recorder = Command::new(binary())
        .args([
            "pos",
            "record",
            "--register",
            "lane-4",
            "--seconds",
            "3",
            "--config",
        ])
        .arg(&config)
        .arg("--out")
        .arg(&capture)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The register: three transactions and a garbage line, in awkward pieces.
    let txs: Vec<_> = {
        let mut sim = SimRegister::new("s042", "lane-4", Some("4"), 5);
        (0..3)
            .map(|i| sim.next(Timestamp::from_second(1_795_000_000 + i).unwrap()))
            .collect()
    };
    let mut bytes = Vec::new();
    for t in &txs {
        bytes.extend(serde_json::to_vec(t).unwrap());
        bytes.push(b'\n');
    }
    bytes.extend(b"garbage\n");
    let mut client = JsonlClient::connect_patiently(local(register_port), Duration::from_secs(10))
        .await
        .unwrap();
    for piece in bytes.chunks(100) {
        client.send_raw(piece).await.unwrap();
    }
    drop(client);
    let out = recorder.wait_with_output().unwrap();
    assert!(out.status.success());
    let verdicts = String::from_utf8(out.stdout).unwrap();
    assert!(
        verdicts.contains(&format!(
            "frame 1 ({} bytes): {}",
            serde_json::to_vec(&txs[0]).unwrap().len(),
            txs[0].id
        )),
        "{verdicts}"
    );
    assert!(verdicts.contains("frame 4 (7 bytes): error:"), "{verdicts}");
    // The capture holds the bytes exactly as sent.
    let recorded = storelink::pos::capture::stream_of(&std::fs::read(&capture).unwrap()).unwrap();
    assert_eq!(recorded, bytes);

    // Replay it to a running agent: the three transactions reach central, the garbage is a
    // dead letter there too.
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, "storelink/v1/acme/#").await;
    let agent_port = free_port();
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        config_text(
            &dir.path().join("data2"),
            broker,
            free_port(),
            &[("lane-4", agent_port)],
        ),
    )
    .unwrap();
    let _agent = Agent::spawn(&agent_config);
    wait_for_port(local(agent_port), Duration::from_secs(10));
    let status = Command::new(binary())
        .args(["pos", "replay"])
        .arg(&capture)
        .args(["--to", &local(agent_port).to_string()])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    central
        .wait_for_ids("storelink.transaction.v1", 3, Duration::from_secs(15))
        .await;
    central
        .wait_for_ids("storelink.deadletter.v1", 1, Duration::from_secs(5))
        .await;
    let got = central.ids("storelink.transaction.v1");
    for t in &txs {
        assert!(got.contains_key(&t.id));
    }
}

/// CI has no Bluetooth adapter and no system D-Bus: the agent must keep running, with presence
/// reported as degraded and a reason an admin can act on, and must still do its other jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_btleplug_and_no_adapter_keeps_running_and_reports_presence_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_rumqttd();
    let api_port = free_port();
    let register_port = free_port();
    let text = config_text(dir.path(), broker, api_port, &[("lane-1", register_port)])
        + r#"
[presence]
source = "btleplug"
service_uuid = "6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11"

[[presence.zones]]
name = "lane-1"
lane = "1"
scanners = ["local"]
enter_m = 1.5
exit_m = 2.5
"#;
    let config = write_config(dir.path(), &text);
    let mut agent = Agent::spawn(&config);
    let url = format!("http://127.0.0.1:{api_port}/api/v1/status");
    let deadline = Instant::now() + Duration::from_secs(15);
    let source = loop {
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "the agent exited without an adapter"
        );
        if let Ok(r) = get(&url).await
            && let Ok(v) = r.json::<serde_json::Value>().await
            && let Some(s) = v["components"].get("presence.source")
            && s["state"] == "degraded"
        {
            break s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "presence.source never became degraded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = source["detail"].as_str().unwrap_or_default().to_string()
        + source["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("adapter") || reason.contains("D-Bus"),
        "the reason names what is missing: {source}"
    );

    // Still alive a while later, and still taking transactions.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(agent.child.try_wait().unwrap().is_none());
    let mut client = JsonlClient::connect_patiently(local(register_port), Duration::from_secs(5))
        .await
        .unwrap();
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 11);
    let reply = client
        .submit(&register.next(Timestamp::now()))
        .await
        .unwrap();
    assert!(reply.starts_with("ok"), "{reply}");
    let _ = nix::sys::signal::kill(agent.pid(), nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(6);
    while agent.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no clean stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_shipped_bridge_config_checks_and_a_bad_one_exits_2_naming_the_key() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bridge.toml");
    let check = |path: &std::path::Path| {
        let out = Command::new(binary())
            .args(["bridge", "--check", "--config"])
            .arg(path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = check(&example);
    assert_eq!(code, Some(0), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bridge.toml");
    let text = std::fs::read_to_string(&example)
        .unwrap()
        .replace("batch_max = 1000", "batch_max = 0\nbatch_mx = 5");
    std::fs::write(&bad, text).unwrap();
    let (code, stderr) = check(&bad);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: postgres.batch_mx", bad.display())),
        "{stderr}"
    );
    std::fs::write(
        &bad,
        std::fs::read_to_string(&example)
            .unwrap()
            .replace("batch_max = 1000", "batch_max = 0"),
    )
    .unwrap();
    let (code, stderr) = check(&bad);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: postgres.batch_max: must be 1-10000",
            bad.display()
        )),
        "{stderr}"
    );
}

#[test]
fn bridge_status_without_a_running_bridge_exits_1_naming_where_it_asked() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bridge.toml");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bridge.toml");
    let port = common::free_port();
    let text = std::fs::read_to_string(&example).unwrap().replace(
        "bind = \"127.0.0.1:9400\"",
        &format!("bind = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&config, text).unwrap();
    let out = Command::new(binary())
        .args(["bridge", "status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("http://127.0.0.1:{port}/status")),
        "{stderr}"
    );
    // Neither a config nor a subcommand: a usage error, exit 2.
    let out = Command::new(binary()).arg("bridge").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
