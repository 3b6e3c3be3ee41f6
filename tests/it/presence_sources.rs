//! Presence sources end to end: a replay file, ESPresense scanners through a real in-process
//! broker, and the local adapter on a machine without Bluetooth.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use proptest::prelude::*;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use storelink::clock::{ManualClock, SharedClock};
use storelink::presence::advert::{Advertisement, Payload};
use storelink::presence::source::espresense::{self, EspresenseError};
use storelink::presence::source::replay::{
    Hex, ParsedLine, RecordedAdvert, parse_line, read_line, write_line,
};
use storelink::presence::source::{self, BtleSettings, Feed, Source, SourceError, SourceSettings};
use storelink::presence::source::{ReplaySettings, ScannerSettings};
use storelink::supervisor::{Component, ComponentState, StatusBoard};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn tenant() -> uuid::Uuid {
    uuid::Uuid::parse_str("6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11").unwrap()
}

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

/// Spawns `settings`' source for the test tenant, as the agent's supervisor does.
fn spawn_source(
    settings: SourceSettings,
    out: mpsc::Sender<Advertisement>,
    clock: SharedClock,
    component: &Component,
    token: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), SourceError>> {
    let (component, token) = (component.clone(), token.clone());
    tokio::spawn(async move {
        let feed = Feed {
            tenant: tenant(),
            out,
            clock,
            component,
            token,
        };
        settings.run(feed).await
    })
}

/// A running source with its channel, status and token.
struct Running {
    rx: mpsc::Receiver<Advertisement>,
    board: StatusBoard,
    component: Component,
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), SourceError>>,
}

impl Running {
    fn start(settings: SourceSettings, clock: SharedClock, capacity: usize) -> Running {
        let (tx, rx) = mpsc::channel(capacity);
        // The status board keeps its own time: only the source reads the clock under test.
        let board = StatusBoard::new(storelink::clock::system());
        let component = board.component("presence");
        let token = CancellationToken::new();
        let task = spawn_source(settings, tx, clock, &component, &token);
        Running {
            rx,
            board,
            component,
            token,
            task,
        }
    }

    async fn next(&mut self) -> Advertisement {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("an advertisement within 10 s")
            .expect("the source is running")
    }

    /// Cancels and asserts the source stops cleanly within a second.
    async fn stop(self) {
        self.token.cancel();
        let outcome = tokio::time::timeout(Duration::from_secs(1), self.task)
            .await
            .expect("the source stops within a second of cancellation")
            .expect("no panic");
        assert!(outcome.is_ok(), "{outcome:?}");
    }

    fn status(&self) -> storelink::supervisor::ComponentStatus {
        self.board.get("presence").expect("registered")
    }
}

fn replay_settings(speed: f64, rebase: bool, looped: bool) -> SourceSettings {
    SourceSettings::Replay(ReplaySettings {
        file: fixture("replay/lane3.jsonl"),
        speed,
        rebase_to_now: rebase,
        loop_: looped,
    })
}

fn eid(bytes: [u8; 8]) -> Payload {
    Payload::Eid(bytes)
}

const FIRST_EID: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
const SECOND_EID: [u8; 8] = [0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18];
const BEACON: [u8; 4] = [0xab, 0xcd, 0x01, 0x02];

#[tokio::test]
async fn replay_hands_on_ours_in_order_and_skips_the_rest() {
    let clock: SharedClock = Arc::new(ManualClock::new(ts("2030-01-01T00:00:00Z")));
    let mut run = Running::start(replay_settings(0.0, false, false), clock, 16);
    let a = run.next().await;
    assert_eq!(a.payload, eid(FIRST_EID));
    assert_eq!(a.at, ts("2026-11-22T08:00:01Z"));
    assert_eq!(&*a.scanner, "lane-3");
    assert_eq!(
        (a.rssi, a.tx_power, a.distance_m),
        (-61, Some(-59), Some(1.2))
    );
    let b = run.next().await;
    assert_eq!(b.payload, Payload::IBeacon(BEACON));
    assert_eq!(b.at, ts("2026-11-22T08:00:03.5Z"));
    assert_eq!(b.tx_power, Some(-59), "the iBeacon's calibrated power");
    let c = run.next().await;
    assert_eq!(c.payload, eid(SECOND_EID));
    assert_eq!(&*c.scanner, "entrance");
    // Nothing else: the wrong version byte, another service, a phone, and two malformed lines.
    let more = tokio::time::timeout(Duration::from_millis(300), run.rx.recv()).await;
    assert!(more.is_err(), "nothing after the three of ours: {more:?}");
    assert_eq!(run.status().state, ComponentState::Running);
    run.stop().await;
}

#[tokio::test]
async fn replay_reports_how_many_it_played_when_the_file_ends() {
    let clock = storelink::clock::system();
    let board = StatusBoard::new(clock.clone());
    let component = board.component("presence");
    let (tx, mut rx) = mpsc::channel(16);
    let token = CancellationToken::new();
    let settings = replay_settings(0.0, true, false);
    let task = spawn_source(settings, tx, clock, &component, &token);
    for _ in 0..3 {
        rx.recv().await.unwrap();
    }
    common::eventually("the replay to finish", Duration::from_secs(5), || {
        board
            .get("presence")
            .and_then(|s| s.detail)
            .is_some_and(|d| d.ends_with("finished: 3 advertisements"))
    })
    .await;
    assert!(
        !task.is_finished(),
        "a finished replay idles until cancelled"
    );
    token.cancel();
    assert!(task.await.unwrap().is_ok());
}

#[tokio::test]
async fn rebase_moves_the_first_line_to_now_and_keeps_the_gaps() {
    let now = ts("2030-01-01T12:00:00Z");
    let clock: SharedClock = Arc::new(ManualClock::new(now));
    let mut run = Running::start(replay_settings(0.0, true, false), clock, 16);
    // The first line (not ours) is at 08:00:00; ours follow 1 s, 3.5 s and 6 s later.
    let at: Vec<Timestamp> = [run.next().await, run.next().await, run.next().await]
        .iter()
        .map(|a| a.at)
        .collect();
    assert_eq!(
        at,
        vec![
            ts("2030-01-01T12:00:01Z"),
            ts("2030-01-01T12:00:03.5Z"),
            ts("2030-01-01T12:00:06Z")
        ]
    );
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn replay_is_paced_by_the_gaps_divided_by_speed() {
    for (speed, expected) in [(1.0, [1.0, 3.5, 6.0]), (2.0, [0.5, 1.75, 3.0])] {
        let clock = storelink::clock::system();
        let started = tokio::time::Instant::now();
        let mut run = Running::start(replay_settings(speed, true, false), clock, 16);
        for want in expected {
            run.next().await;
            let got = started.elapsed().as_secs_f64();
            assert!(
                (got - want).abs() < 0.05,
                "speed {speed}: expected at {want} s, got {got} s"
            );
        }
        run.stop().await;
    }
}

/// A clock an hour later each time it is read; replay reads it once per pass, to rebase.
#[derive(Debug)]
struct HourPerRead(std::sync::atomic::AtomicI64);

impl storelink::clock::Clock for HourPerRead {
    fn now(&self) -> Timestamp {
        let hours = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ts("2030-01-01T00:00:00Z") + jiff::SignedDuration::from_hours(hours)
    }
}

#[tokio::test]
async fn speed_zero_is_fast_and_loop_starts_again_rebased() {
    let clock: SharedClock = Arc::new(HourPerRead(0.into()));
    let started = std::time::Instant::now();
    let mut run = Running::start(replay_settings(0.0, true, true), clock, 4);
    let mut seen = Vec::new();
    for _ in 0..9 {
        seen.push(run.next().await);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "speed 0 does not sleep"
    );
    let payloads: Vec<Payload> = seen.iter().map(|a| a.payload).collect();
    let one_pass = [eid(FIRST_EID), Payload::IBeacon(BEACON), eid(SECOND_EID)];
    assert_eq!(payloads, [one_pass, one_pass, one_pass].concat());
    let firsts: Vec<Timestamp> = seen.iter().step_by(3).map(|a| a.at).collect();
    assert_eq!(
        firsts,
        [
            ts("2030-01-01T00:00:01Z"),
            ts("2030-01-01T01:00:01Z"),
            ts("2030-01-01T02:00:01Z")
        ],
        "each pass is rebased to the clock as it is then"
    );
    run.stop().await;
}

#[tokio::test]
async fn cancellation_stops_a_replay_that_waits_or_is_blocked() {
    // Waiting for a line an hour away.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.jsonl");
    let line = |t: &str| {
        write_line(&RecordedAdvert {
            t: ts(t),
            scanner: "lane-1".into(),
            rssi: -60,
            tx_power: None,
            distance: None,
            service_data: [(tenant(), Hex(vec![1, 1, 2, 3, 4, 5, 6, 7, 8]))].into(),
            manufacturer_data: Default::default(),
            device: None,
        })
    };
    std::fs::write(
        &file,
        line("2026-11-22T08:00:00Z") + &line("2026-11-22T09:00:00Z"),
    )
    .unwrap();
    let settings = SourceSettings::Replay(ReplaySettings::new(&file));
    let mut run = Running::start(settings.clone(), storelink::clock::system(), 4);
    run.next().await;
    run.stop().await;

    // Blocked on a full channel that nobody reads (speed 0, capacity 1).
    let settings = SourceSettings::Replay(ReplaySettings {
        speed: 0.0,
        loop_: true,
        ..ReplaySettings::new(&file)
    });
    let run = Running::start(settings, storelink::clock::system(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    run.stop().await;
}

#[tokio::test]
async fn a_missing_replay_file_is_an_error_naming_it() {
    let settings = SourceSettings::Replay(ReplaySettings::new("/nonexistent/replay.jsonl"));
    let run = Running::start(settings, storelink::clock::system(), 1);
    let e = run.task.await.unwrap().unwrap_err().to_string();
    assert!(
        e.starts_with("replay file /nonexistent/replay.jsonl: "),
        "{e}"
    );
}

#[test]
fn replay_lines_ours_not_ours_blank_and_malformed() {
    let t = tenant();
    let lines: Vec<String> = std::fs::read_to_string(fixture("replay/lane3.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| match parse_line(l, &t) {
            Ok(ParsedLine::Blank) => "blank",
            Ok(ParsedLine::NotOurs { .. }) => "not ours",
            Ok(ParsedLine::Ours(_)) => "ours",
            Err(_) => "malformed",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "not ours",
            "ours",
            "malformed",
            "blank",
            "not ours",
            "ours",
            "malformed",
            "ours",
            "not ours"
        ]
    );
    let e = parse_line(&lines[2], &t).unwrap_err().to_string();
    assert!(e.len() <= 80 && !e.is_empty(), "{e}");
}

// ---------------------------------------------------------------------------------------------
// ESPresense

struct Capture {
    topic: String,
    payload: Vec<u8>,
}

fn capture(name: &str) -> Capture {
    let text = std::fs::read_to_string(fixture(&format!("espresense/{name}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    Capture {
        topic: v["topic"].as_str().unwrap().to_string(),
        payload: serde_json::to_vec(&v["payload"]).unwrap(),
    }
}

const CAPTURES: [&str; 5] = [
    "ibeacon_ours_v4",
    "ibeacon_ours_v3",
    "ibeacon_other_uuid",
    "apple_nearby",
    "msft_cdp",
];

#[test]
fn each_captured_report_parses_as_expected() {
    let t = tenant();
    let now = ts("2026-11-22T08:00:00Z");
    let parse = |name| {
        let c = capture(name);
        espresense::parse(&c.topic, &c.payload, &t, now)
    };
    let v4 = parse("ibeacon_ours_v4").unwrap().unwrap();
    assert_eq!(
        v4,
        Advertisement {
            at: now,
            scanner: Arc::from("lane-3"),
            rssi: -63,
            tx_power: Some(-59),
            distance_m: Some(1.27),
            payload: Payload::IBeacon(BEACON),
        }
    );
    let v3 = parse("ibeacon_ours_v3").unwrap().unwrap();
    assert_eq!(&*v3.scanner, "entrance");
    assert_eq!(
        (v3.rssi, v3.tx_power, v3.distance_m),
        (-74, Some(-61), Some(2.84))
    );
    assert_eq!(v3.payload, Payload::IBeacon([0x12, 0x34, 0x56, 0x78]));
    for name in ["ibeacon_other_uuid", "apple_nearby", "msft_cdp"] {
        assert_eq!(parse(name), Ok(None), "{name}");
    }
}

#[test]
fn garbage_from_a_scanner_is_an_error_without_its_content() {
    let t = tenant();
    let now = ts("2026-11-22T08:00:00Z");
    let ours = capture("ibeacon_ours_v4").topic;
    for payload in [
        &b"\x00\xffgarbage"[..],
        b"{\"rssi\":",
        b"{\"mac\":\"6e41c09b27d5\",\"rssi\":\"6e41c09b27d5\"}",
        b"[]",
        b"",
    ] {
        let e = espresense::parse(&ours, payload, &t, now).unwrap_err();
        assert!(!e.to_string().contains("6e41"), "{e}");
        assert!(
            matches!(
                e,
                EspresenseError::Payload { .. } | EspresenseError::MissingRssi { .. }
            ),
            "{e:?}"
        );
    }
    // Garbage under a topic that is not ours is never even parsed.
    let theirs = capture("apple_nearby").topic;
    assert_eq!(espresense::parse(&theirs, b"\x00\xff", &t, now), Ok(None));
}

fn scanner_settings(broker: std::net::SocketAddr) -> SourceSettings {
    SourceSettings::Scanners(ScannerSettings {
        url: format!("mqtt://{broker}"),
        ..ScannerSettings::default()
    })
}

/// Publishes like an ESPresense node: QoS 0, not retained.
async fn publisher(broker: std::net::SocketAddr) -> AsyncClient {
    let mut options = MqttOptions::new("espresense-lane-3", broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 32);
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    client
}

#[tokio::test]
async fn scanner_reports_arrive_through_a_real_broker() {
    let broker = common::start_rumqttd();
    let mut run = Running::start(scanner_settings(broker), storelink::clock::system(), 16);
    let component = run.component.clone();
    common::eventually("the subscription", Duration::from_secs(10), || {
        component.state() == Some(ComponentState::Running)
    })
    .await;
    let node = publisher(broker).await;
    for name in CAPTURES {
        let c = capture(name);
        node.publish(c.topic, QoS::AtMostOnce, false, c.payload)
            .await
            .unwrap();
    }
    let first = run.next().await;
    let second = run.next().await;
    assert_eq!(
        (&*first.scanner, first.payload),
        ("lane-3", Payload::IBeacon(BEACON))
    );
    assert_eq!(
        (&*second.scanner, second.payload),
        ("entrance", Payload::IBeacon([0x12, 0x34, 0x56, 0x78]))
    );
    let more = tokio::time::timeout(Duration::from_millis(300), run.rx.recv()).await;
    assert!(more.is_err(), "only the two of ours: {more:?}");
    run.stop().await;
}

#[tokio::test]
async fn an_unreachable_broker_degrades_the_source_until_it_comes() {
    let addr = common::local(common::free_port());
    let run = Running::start(scanner_settings(addr), storelink::clock::system(), 16);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(run.component.state(), Some(ComponentState::Degraded));
    assert!(!run.task.is_finished(), "retries inside the task");
    storelink::demo::start_broker(addr).expect("rumqttd starts");
    let component = run.component.clone();
    common::eventually("the subscription", Duration::from_secs(40), || {
        component.state() == Some(ComponentState::Running)
    })
    .await;
    run.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The local adapter, on a machine without Bluetooth or a system bus

fn is_clear_bluetooth_error(message: &str) -> bool {
    message.starts_with("D-Bus unavailable: ") || message.starts_with("no Bluetooth adapter: ")
}

#[tokio::test]
async fn without_bluetooth_the_adapter_source_stays_degraded_and_stops_on_cancel() {
    let board = StatusBoard::new(storelink::clock::system());
    let component = board.component("presence");
    let token = CancellationToken::new();
    let (tx, _rx) = mpsc::channel(16);
    let settings = SourceSettings::Btleplug(BtleSettings::default());
    let task = spawn_source(settings, tx, storelink::clock::system(), &component, &token);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = board.get("presence").unwrap();
    if status.state == ComponentState::Running {
        // A machine with BlueZ and an adapter scans instead; this test is about one without.
        eprintln!("this machine has Bluetooth: {status:?}");
        token.cancel();
        return;
    }
    assert!(
        !task.is_finished(),
        "the source gave up instead of waiting for an adapter"
    );
    assert_eq!(status.state, ComponentState::Degraded, "{status:?}");
    let last = status.last_error.unwrap_or_default();
    assert!(is_clear_bluetooth_error(&last), "{last}");
    token.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops promptly on cancel")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn recording_without_bluetooth_fails_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rec.jsonl");
    let outcome = tokio::time::timeout(
        Duration::from_secs(2),
        source::btle::record(
            &BtleSettings::default(),
            out.clone(),
            Some(Duration::from_millis(500)),
            storelink::clock::system(),
            CancellationToken::new(),
        ),
    )
    .await;
    let Ok(Err(e)) = outcome else {
        eprintln!("this machine has Bluetooth: {outcome:?}");
        return;
    };
    assert!(is_clear_bluetooth_error(&e.to_string()), "{e}");
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// The recording format round-trips

fn recorded_advert() -> impl Strategy<Value = RecordedAdvert> {
    (
        (0i64..4_102_444_800, 0i32..1_000_000_000),
        "[a-z0-9-]{1,16}",
        -127i16..=20,
        proptest::option::of(-127i16..=20),
        proptest::option::of((0u32..100_000).prop_map(|cm| cm as f32 / 100.0)),
        proptest::collection::btree_map(
            any::<u128>().prop_map(uuid::Uuid::from_u128),
            proptest::collection::vec(any::<u8>(), 0..24).prop_map(Hex),
            0..3,
        ),
        proptest::collection::btree_map(
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..30).prop_map(Hex),
            0..3,
        ),
        proptest::option::of("[0-9a-f]{16}"),
    )
        .prop_map(
            |(
                (secs, nanos),
                scanner,
                rssi,
                tx_power,
                distance,
                service_data,
                manufacturer_data,
                device,
            )| {
                RecordedAdvert {
                    t: Timestamp::new(secs, nanos).unwrap(),
                    scanner,
                    rssi,
                    tx_power,
                    distance,
                    service_data,
                    manufacturer_data,
                    device,
                }
            },
        )
}

proptest! {
    #[test]
    fn write_line_and_parse_line_agree(mut record in recorded_advert(), eid in any::<[u8; 8]>(), ours in any::<bool>()) {
        if ours {
            let mut data = vec![0x01];
            data.extend(eid);
            record.service_data.insert(tenant(), Hex(data));
        }
        let line = write_line(&record);
        prop_assert!(line.ends_with('\n'));
        prop_assert_eq!(line.matches('\n').count(), 1);
        prop_assert_eq!(read_line(&line).unwrap(), Some(record.clone()));
        match parse_line(&line, &tenant()).unwrap() {
            ParsedLine::Ours(advert) => {
                prop_assert_eq!(Some(advert.clone()), record.advertisement(&tenant()));
                prop_assert_eq!(advert.at, record.t);
                prop_assert_eq!(&*advert.scanner, record.scanner.as_str());
                if ours {
                    prop_assert_eq!(advert.payload, Payload::Eid(eid));
                }
            }
            ParsedLine::NotOurs { at } => {
                prop_assert!(!ours);
                prop_assert_eq!(at, record.t);
                prop_assert_eq!(record.advertisement(&tenant()), None);
            }
            ParsedLine::Blank => prop_assert!(false, "a written line is never blank"),
        }
    }
}
