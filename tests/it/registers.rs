//! Register transports end to end: serial through a real pseudo-terminal, a journal port the
//! agent connects to, and registers that post over HTTP. Each checks that garbage never stops
//! the agent and that nothing is lost or counted twice.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;
use jiff::Timestamp;
use storelink::model::transaction::Transaction;
use storelink::pos::framing::StxEtxFramer;
use storelink::sim::SimRegister;
use storelink::supervisor::ComponentState;

fn start() -> Timestamp {
    "2026-11-22T09:00:00Z".parse().unwrap()
}

fn transactions(register: &str, n: i64, seed: u64) -> Vec<Transaction> {
    let mut sim = SimRegister::new("s042", register, None, seed);
    (0..n)
        .map(|i| sim.next(start() + jiff::SignedDuration::from_secs(i * 60)))
        .collect()
}

/// A pseudo-terminal standing in for a USB-serial adapter (the simulator's).
struct FakeSerial(storelink::sim::serial::PtyLine);

impl FakeSerial {
    fn new(dir: &Path) -> FakeSerial {
        Self::named(dir, "ttyUSB0")
    }

    fn named(dir: &Path, name: &str) -> FakeSerial {
        FakeSerial(storelink::sim::serial::PtyLine::plug_in_at(&dir.join(name)).unwrap())
    }

    fn plug_in(&mut self) {
        self.0.plug_in().unwrap();
    }

    fn unplug(&mut self) {
        self.0.unplug();
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.0.send(bytes).await.unwrap();
    }
}

fn stx_xor(payload: &[u8]) -> Vec<u8> {
    let mut covered = payload.to_vec();
    covered.push(0x03);
    let mut v = vec![0x02];
    v.extend_from_slice(&covered);
    v.extend(StxEtxFramer::check_byte(
        storelink::config::Checksum::Xor,
        &covered,
    ));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_register_survives_noise_a_cut_frame_and_an_unplug() {
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, "storelink/v1/acme/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut serial = FakeSerial::new(dir.path());
    let extra = format!(
        r#"
[[registers]]
name = "till-7"
lane = "7"
format = "jsonl"
framing = {{ kind = "stx-etx", checksum = "xor" }}
transport = {{ kind = "serial", port = "{}", baud = 9600 }}
"#,
        serial.0.path().display()
    );
    let agent = TestAgent::start_with(broker, &[], &extra).await;
    common::eventually("serial port open", Duration::from_secs(10), || {
        agent.board.get("register.till-7").map(|c| c.state) == Some(ComponentState::Running)
    })
    .await;

    let txs = transactions("till-7", 6, 21);
    let json = |t: &Transaction| serde_json::to_vec(t).unwrap();
    // Two good frames with line noise between them.
    serial.send(&stx_xor(&json(&txs[0]))).await;
    serial.send(b"\x00\xff\x13noise").await;
    serial.send(&stx_xor(&json(&txs[1]))).await;
    // A frame cut in half by a new frame, then a frame with a bad checksum.
    let half = stx_xor(&json(&txs[2]));
    serial.send(&half[..half.len() / 2]).await;
    serial.send(&stx_xor(&json(&txs[3]))).await;
    let mut bad = stx_xor(&json(&txs[2]));
    *bad.last_mut().unwrap() ^= 0xff;
    serial.send(&bad).await;
    central
        .wait_for_ids("storelink.transaction.v1", 3, Duration::from_secs(10))
        .await;

    // Unplug in the middle of a frame; the agent waits, then picks the new device up.
    let partial = stx_xor(&json(&txs[4]));
    serial.send(&partial[..20]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    serial.unplug();
    common::eventually("degraded while unplugged", Duration::from_secs(10), || {
        agent.board.get("register.till-7").map(|c| c.state) == Some(ComponentState::Degraded)
    })
    .await;
    serial.plug_in();
    common::eventually("reopened after replug", Duration::from_secs(15), || {
        agent.board.get("register.till-7").map(|c| c.state) == Some(ComponentState::Running)
    })
    .await;
    serial.send(&stx_xor(&json(&txs[4]))).await;
    serial.send(&stx_xor(&json(&txs[5]))).await;

    central
        .wait_for_ids("storelink.transaction.v1", 5, Duration::from_secs(10))
        .await;
    let got = central.ids("storelink.transaction.v1");
    for i in [0, 1, 3, 4, 5] {
        assert_eq!(got.get(&txs[i].id), Some(&1), "{} arrives once", txs[i].id);
    }
    assert!(
        !got.contains_key(&txs[2].id),
        "the cut and the corrupted copy are not transactions"
    );
    // Noise, the cut frame, the bad checksum and the frame cut by the unplug are dead letters.
    common::eventually("dead letters", Duration::from_secs(5), || {
        agent.deadletters.len() >= 4
    })
    .await;
    let reasons: Vec<String> = agent
        .deadletters
        .recent(10)
        .unwrap()
        .into_iter()
        .map(|d| d.reason)
        .collect();
    for expected in [
        "noise outside",
        "STX before ETX",
        "bad checksum",
        "stream ended before ETX",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "{expected} in {reasons:?}"
        );
    }
    agent.stop().await;
}

/// A register's journal port: sends the day's transactions from the start on every
/// connection, and drops the first connection mid-stream.
async fn journal_server(lines: Vec<Vec<u8>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut connection = 0;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            connection += 1;
            let lines = lines.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let upto = if connection == 1 {
                    lines.len() / 2
                } else {
                    lines.len()
                };
                for line in &lines[..upto] {
                    if stream.write_all(line).await.is_err() {
                        return;
                    }
                }
                if connection == 1 {
                    // Half a line, then the connection drops.
                    let _ = stream.write_all(&lines[upto][..10]).await;
                    return;
                }
                // Later connections stay open, as a live journal does.
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connect_resumes_after_a_drop_without_losing_or_doubling() {
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, "storelink/v1/acme/#").await;
    let txs = transactions("pos-srv", 40, 31);
    let lines: Vec<Vec<u8>> = txs
        .iter()
        .map(|t| {
            let mut l = serde_json::to_vec(t).unwrap();
            l.push(b'\n');
            l
        })
        .collect();
    let journal = journal_server(lines).await;
    let extra = format!(
        "\n[[registers]]\nname = \"pos-srv\"\nformat = \"jsonl\"\ntransport = {{ kind = \"tcp-connect\", addr = \"{journal}\" }}\n"
    );
    let agent = TestAgent::start_with(broker, &[], &extra).await;
    central
        .wait_for_ids("storelink.transaction.v1", 40, Duration::from_secs(20))
        .await;
    let got = central.ids("storelink.transaction.v1");
    for tx in &txs {
        assert_eq!(got.get(&tx.id), Some(&1), "{} exactly once", tx.id);
    }
    // The first half was sent twice by the journal; the agent counted it once.
    common::eventually("outbox drained", Duration::from_secs(10), || {
        agent.outbox.depth() == 0
    })
    .await;
    assert_eq!(
        agent.outbox.seen_count(),
        40 + agent.deadletters.len() as u64
    );
    // The half line at the drop is a dead letter, not a transaction.
    assert!(agent.deadletters.len() <= 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_register_posts_get_ids_and_clear_errors() {
    let broker = start_rumqttd();
    let extra = r#"
[[registers]]
name = "web-1"
format = "jsonl"
transport = { kind = "http" }
"#;
    let agent = TestAgent::start_with(broker, &[], extra).await;
    let url = format!("{}/pos/v1/transactions", agent.api());
    let http = reqwest::Client::new();
    let txs = transactions("web-1", 3, 41);
    let mut body = Vec::new();
    for t in &txs[..2] {
        body.extend(serde_json::to_vec(t).unwrap());
        body.push(b'\n');
    }
    body.extend(b"{not json}\n");
    body.extend(serde_json::to_vec(&txs[2]).unwrap());

    let post = |body: Vec<u8>, url: String| {
        let http = http.clone();
        async move {
            let r = http.post(url).body(body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, answer) = post(body.clone(), url.clone()).await;
    assert_eq!(status, 422, "{answer}");
    let accepted: Vec<&str> = answer["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        accepted,
        txs.iter().map(|t| t.id.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(answer["rejected"][0]["frame"], 3);
    assert!(
        answer["rejected"][0]["error"]
            .as_str()
            .unwrap()
            .contains("syntax error")
    );
    assert_eq!(agent.deadletters.len(), 1);

    // Posting the same transactions again: the same ids, nothing stored twice.
    let stored = agent.outbox.seen_count();
    let mut good = Vec::new();
    for t in &txs {
        good.extend(serde_json::to_vec(t).unwrap());
        good.push(b'\n');
    }
    let (status, answer) = post(good, url.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"].as_array().unwrap().len(), 3);
    assert_eq!(agent.outbox.seen_count(), stored, "nothing new stored");

    let (status, answer) = post(Vec::new(), url.clone()).await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("empty body"));
    let (status, answer) = post(body, format!("{url}?register=lane-9")).await;
    assert_eq!(status, 404);
    assert!(answer["error"].as_str().unwrap().contains("lane-9"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_sent_again_after_delivery_and_restart_is_forwarded_once() {
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, "storelink/v1/acme/#").await;
    let agent = TestAgent::start(broker, &["lane-1"]).await;
    let txs = transactions("lane-1", 5, 51);
    let mut client = agent.client(0).await;
    for t in &txs {
        assert_eq!(client.submit(t).await.unwrap(), format!("ok {}", t.id));
    }
    central
        .wait_for_ids("storelink.transaction.v1", 5, Duration::from_secs(10))
        .await;
    common::eventually("delivered", Duration::from_secs(10), || {
        agent.outbox.depth() == 0
    })
    .await;
    drop(client);
    let dir = agent.stop_keep().await;

    let agent = TestAgent::start_in(dir, broker, &["lane-1"], "").await;
    let mut client = agent.client(0).await;
    for t in &txs {
        // Acknowledged again, with the same id...
        assert_eq!(client.submit(t).await.unwrap(), format!("ok {}", t.id));
    }
    // ...but neither stored nor forwarded again.
    assert_eq!(agent.outbox.depth(), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, n) in central.ids("storelink.transaction.v1") {
        assert_eq!(n, 1, "{id} forwarded {n} times");
    }
    agent.stop().await;
}

const SALE: &[u8] = include_bytes!("../fixtures/receipts/supermarket_sale.bin");
const MULTI: &[u8] = include_bytes!("../fixtures/receipts/supermarket_multi_tender.bin");
const RETURN: &[u8] = include_bytes!("../fixtures/receipts/supermarket_return.bin");

fn receipt_register(name: &str, port: &Path) -> String {
    format!(
        r#"
[[registers]]
name = "{name}"
lane = "2"
format = "receipt"
template = "{}/config/receipts/supermarket.toml"
transport = {{ kind = "serial", port = "{}", baud = 9600 }}
"#,
        env!("CARGO_MANIFEST_DIR"),
        port.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_printer_tap_over_serial_with_noise_and_an_unplug_mid_receipt() {
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, "storelink/v1/acme/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut serial = FakeSerial::new(dir.path());
    let agent =
        TestAgent::start_with(broker, &[], &receipt_register("printer-2", serial.0.path())).await;
    common::eventually("serial port open", Duration::from_secs(10), || {
        agent.board.get("register.printer-2").map(|c| c.state) == Some(ComponentState::Running)
    })
    .await;

    serial.send(SALE).await;
    serial.send(b"\x00\x00\x10\x04\x01").await; // line noise and a status query between receipts
    serial.send(MULTI).await;
    // The cable is pulled halfway through the return receipt.
    serial.send(&RETURN[..RETURN.len() / 2]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    serial.unplug();
    common::eventually("degraded while unplugged", Duration::from_secs(10), || {
        agent.board.get("register.printer-2").map(|c| c.state) == Some(ComponentState::Degraded)
    })
    .await;
    serial.plug_in();
    common::eventually("reopened", Duration::from_secs(15), || {
        agent.board.get("register.printer-2").map(|c| c.state) == Some(ComponentState::Running)
    })
    .await;
    // The register prints the return again after the printer comes back.
    serial.send(RETURN).await;

    central
        .wait_for_ids("storelink.transaction.v1", 3, Duration::from_secs(15))
        .await;
    let totals: std::collections::BTreeMap<String, i64> = central
        .of_type("storelink.transaction.v1")
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["data"]["total"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        totals,
        [
            ("s042:printer-2:20261122:4711".to_string(), 1175),
            ("s042:printer-2:20261122:4802".to_string(), 1347),
            ("s042:printer-2:20261123:4817".to_string(), 378),
        ]
        .into()
    );
    let ret = central
        .of_type("storelink.transaction.v1")
        .into_iter()
        .find(|e| e["data"]["kind"] == "return")
        .unwrap();
    assert_eq!(ret["data"]["lane"], "2");
    assert_eq!(ret["data"]["source_format"], "receipt");
    // The half receipt cut off by the unplug is a dead letter with its bytes.
    common::eventually("dead letter", Duration::from_secs(5), || {
        !agent.deadletters.is_empty()
    })
    .await;
    let letters = agent.deadletters.recent(5).unwrap();
    assert!(
        letters.iter().any(|d| d.raw == RETURN[..RETURN.len() / 2]),
        "{letters:?}"
    );
    agent.stop().await;
}

fn poslog_fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/poslog/{name}.xml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// POSLog fixtures with their totals, as written in the documents (checked by hand in the
/// POSLog unit tests).
const POSLOG: &[(&str, &str, i64)] = &[
    ("sale", "s042:lane-3:20261122:4711", 587),
    ("return", "s042:lane-3:20261122:4712", 2499),
    ("void", "s042:lane-3:20261122:4713", 119),
    ("loyalty", "s042:lane-3:20261122:4715", 398),
    ("weighted", "s042:lane-3:20261122:4716", 324),
    ("multi_tender", "s042:lane-3:20261122:4717", 2749),
    ("discount", "s042:lane-3:20261122:4718", 1110),
    ("prefixed", "s042:lane-3:20261122:4719", 890),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_ends_as_correct_transactions_on_the_broker() {
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, "storelink/v1/acme/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut till = FakeSerial::named(dir.path(), "ttyS0");
    let mut printer = FakeSerial::named(dir.path(), "ttyUSB1");
    let poslog_port = free_port();
    let extra = format!(
        r#"
[[registers]]
name = "till-1"
lane = "1"
format = "jsonl"
framing = {{ kind = "stx-etx", checksum = "xor" }}
transport = {{ kind = "serial", port = "{}", baud = 9600 }}

[[registers]]
name = "pos-3"
lane = "3"
format = "poslog"
transport = {{ kind = "tcp-listen", bind = "127.0.0.1:{poslog_port}" }}
{}"#,
        till.0.path().display(),
        receipt_register("printer-2", printer.0.path())
    );
    let agent = TestAgent::start_with(broker, &[], &extra).await;
    for r in ["register.till-1", "register.printer-2"] {
        common::eventually(r, Duration::from_secs(10), || {
            agent.board.get(r).map(|c| c.state) == Some(ComponentState::Running)
        })
        .await;
    }
    let mut expected: std::collections::BTreeMap<String, i64> = Default::default();

    // Serial till: JSON lines in STX/ETX frames.
    for tx in transactions("till-1", 10, 61) {
        till.send(&stx_xor(&serde_json::to_vec(&tx).unwrap())).await;
        expected.insert(tx.id.clone(), tx.total);
    }
    // POSLog register: documents back to back in awkward pieces, with garbage in between.
    let mut stream = Vec::new();
    for (name, id, total) in POSLOG {
        stream.extend(poslog_fixture(name));
        stream.extend(b"\r\n");
        expected.insert(id.to_string(), *total);
    }
    stream.extend(b"not xml at all\n<Broken><Doc></Oops>\n");
    let mut pos =
        storelink::sim::JsonlClient::connect_patiently(local(poslog_port), Duration::from_secs(5))
            .await
            .unwrap();
    for piece in stream.chunks(333) {
        pos.send_raw(piece).await.unwrap();
    }
    for (_, id, _) in POSLOG {
        assert_eq!(pos.reply().await.unwrap(), format!("ok {id}"));
    }
    let garbage = pos.reply().await.unwrap();
    assert!(
        garbage.starts_with("err text outside an XML document"),
        "{garbage}"
    );
    // Receipt printer tap.
    for (capture, id, total) in [
        (SALE, "s042:printer-2:20261122:4711", 1175),
        (MULTI, "s042:printer-2:20261122:4802", 1347),
        (RETURN, "s042:printer-2:20261123:4817", 378),
    ] {
        printer.send(capture).await;
        expected.insert(id.to_string(), total);
    }

    central
        .wait_for_ids(
            "storelink.transaction.v1",
            expected.len(),
            Duration::from_secs(20),
        )
        .await;
    let arrived: std::collections::BTreeMap<String, i64> = central
        .of_type("storelink.transaction.v1")
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["data"]["total"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        arrived, expected,
        "every transaction, each total to the cent"
    );
    let sum = |m: &std::collections::BTreeMap<String, i64>| m.values().sum::<i64>();
    assert_eq!(sum(&arrived), sum(&expected));
    // Each source format is labelled, and the lanes come from config.
    for e in central.of_type("storelink.transaction.v1") {
        let (format, lane) = match e["data"]["register"].as_str().unwrap() {
            "till-1" => ("jsonl", "1"),
            "lane-3" => ("poslog", "3"),
            "printer-2" => ("receipt", "2"),
            other => panic!("unexpected register {other}"),
        };
        assert_eq!(e["data"]["source_format"], format);
        assert_eq!(e["data"]["lane"], lane);
    }
    // The garbage reached central as dead letters, not as transactions.
    central
        .wait_for_ids("storelink.deadletter.v1", 1, Duration::from_secs(5))
        .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_poslog_sent_twice_and_after_a_restart_is_stored_and_forwarded_once() {
    let broker = start_rumqttd();
    let central = Central::subscribe(broker, "storelink/v1/acme/#").await;
    let port = free_port();
    let extra = format!(
        "\n[[registers]]\nname = \"pos-3\"\nformat = \"poslog\"\ntransport = {{ kind = \"tcp-listen\", bind = \"127.0.0.1:{port}\" }}\n"
    );
    let doc = poslog_fixture("several");
    let send_twice = |doc: Vec<u8>| async move {
        let mut c =
            storelink::sim::JsonlClient::connect_patiently(local(port), Duration::from_secs(5))
                .await
                .unwrap();
        c.send_raw(&doc).await.unwrap();
        let first = c.reply().await.unwrap();
        c.send_raw(&doc).await.unwrap();
        let second = c.reply().await.unwrap();
        (first, second)
    };
    let agent = TestAgent::start_with(broker, &[], &extra).await;
    let (first, second) = send_twice(doc.clone()).await;
    assert!(first.starts_with("ok "), "{first}");
    assert_eq!(first, second, "acknowledged again with the same ids");
    let ids: Vec<String> = first[3..].split(' ').map(String::from).collect();
    assert!(ids.len() >= 2, "{ids:?}");
    central
        .wait_for_ids(
            "storelink.transaction.v1",
            ids.len(),
            Duration::from_secs(10),
        )
        .await;
    common::eventually("delivered", Duration::from_secs(10), || {
        agent.outbox.depth() == 0
    })
    .await;
    let dir = agent.stop_keep().await;

    let agent = TestAgent::start_in(dir, broker, &[], &extra).await;
    let (again, _) = send_twice(doc).await;
    assert_eq!(again, first);
    assert_eq!(agent.outbox.depth(), 0, "nothing stored again");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = central.ids("storelink.transaction.v1");
    for id in &ids {
        assert_eq!(got.get(id), Some(&1), "{id} forwarded once");
    }
    agent.stop().await;
}
