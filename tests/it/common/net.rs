//! Network fixtures for the uplink tests: certificates for a TLS mosquitto (server, client,
//! a stranger CA), mosquitto with mqtts/mTLS and WebSocket listeners, an HTTP CONNECT proxy,
//! a proxy that cuts and stalls, and an agent started on a custom `[central.mqtt]`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{TestAgent, config_text, find_program, free_port, local, wait_for_port};

/// PEM files of a test PKI, in one directory.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here: configuring it must fail with "unknown CA".
    pub stranger_ca: PathBuf,
    /// A server certificate with no subjectAltName, and one that expired, both by `ca`, each
    /// with its key.
    pub no_san_cert: (PathBuf, PathBuf),
    pub expired_cert: (PathBuf, PathBuf),
    pub dir: tempfile::TempDir,
}

fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}

impl TlsFiles {
    pub fn generate() -> TlsFiles {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let (issuer, ca_pem) = ca("storelink test broker CA");
        let (_, stranger_pem) = ca("someone else's CA");
        let leaf = |mut params: CertificateParams| {
            let key = KeyPair::generate().unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "127.0.0.1");
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        server
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let (server_pem, server_key) = leaf(server);
        let (client_pem, client_key) =
            leaf(CertificateParams::new(vec!["store-s042".to_string()]).unwrap());
        let (no_san_pem, no_san_key) = leaf(CertificateParams::new(Vec::<String>::new()).unwrap());
        let mut expired = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        expired
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let (expired_pem, expired_key) = leaf(expired);
        TlsFiles {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_pem),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_pem),
            client_key: write("client.key", &client_key),
            stranger_ca: write("stranger-ca.pem", &stranger_pem),
            no_san_cert: (
                write("no-san.pem", &no_san_pem),
                write("no-san.key", &no_san_key),
            ),
            expired_cert: (
                write("expired.pem", &expired_pem),
                write("expired.key", &expired_key),
            ),
            dir,
        }
    }
}

/// Mosquitto with a plain listener (for the test's central), an mqtts listener that requires a
/// client certificate, a wss listener, and a plain WebSocket one.
pub struct TlsMosquitto {
    pub plain: SocketAddr,
    pub mtls: SocketAddr,
    pub wss: SocketAddr,
    pub ws: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TlsMosquitto {
    pub fn start(pki: &TlsFiles) -> TlsMosquitto {
        Self::start_serving(pki, (&pki.server_cert, &pki.server_key))
    }

    /// Serves another certificate and key: a broken one (no SAN, expired).
    pub fn start_serving(
        pki: &TlsFiles,
        (server_cert, server_key): (&Path, &Path),
    ) -> TlsMosquitto {
        let dir = tempfile::tempdir().unwrap();
        let (plain, mtls, wss, ws) = (free_port(), free_port(), free_port(), free_port());
        let tls = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            pki.ca.display(),
            server_cert.display(),
            server_key.display()
        );
        // The plain listener comes first: mosquitto 2.0.11 will not start with only
        // WebSocket listeners.
        let conf = format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 0\n\
             listener {plain} 127.0.0.1\n\
             listener {mtls} 127.0.0.1\n{tls}require_certificate true\n\
             listener {wss} 127.0.0.1\nprotocol websockets\n{tls}\
             listener {ws} 127.0.0.1\nprotocol websockets\n"
        );
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(find_program("mosquitto").expect("mosquitto is installed"))
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        for port in [plain, mtls, wss, ws] {
            wait_for_port(local(port), Duration::from_secs(10));
        }
        TlsMosquitto {
            plain: local(plain),
            mtls: local(mtls),
            wss: local(wss),
            ws: local(ws),
            child,
            _dir: dir,
        }
    }
}

impl Drop for TlsMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an agent whose `[central.mqtt]` url line is replaced by `mqtt_lines`, with `env` as
/// its environment (for `HTTPS_PROXY`).
pub async fn agent_with_mqtt(
    mqtt_lines: &str,
    registers: &[&str],
    extra: &str,
    env: &HashMap<String, String>,
) -> TestAgent {
    agent_with_clock(
        mqtt_lines,
        registers,
        extra,
        env,
        storelink::clock::system(),
    )
    .await
}

/// [`agent_with_mqtt`] on a given clock (a `ManualClock` to simulate long outages).
pub async fn agent_with_clock(
    mqtt_lines: &str,
    registers: &[&str],
    extra: &str,
    env: &HashMap<String, String>,
    clock: storelink::clock::SharedClock,
) -> TestAgent {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(&str, u16)> = registers.iter().map(|r| (*r, free_port())).collect();
    let placeholder = local(1);
    let text = config_text(dir.path(), placeholder, free_port(), &ports)
        .replace(&format!("url = \"mqtt://{placeholder}\""), mqtt_lines)
        + extra;
    TestAgent::from_text(dir, &ports, &text, env, clock).await
}

/// An HTTP CONNECT proxy, as stores run them; remembers every target it was asked for.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    pub targets: Arc<Mutex<Vec<String>>>,
    token: CancellationToken,
}

impl ConnectProxy {
    pub async fn start() -> ConnectProxy {
        let listener = TcpListener::bind(local(0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let targets = Arc::new(Mutex::new(Vec::new()));
        let token = CancellationToken::new();
        let (seen, stop) = (targets.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                    _ = stop.cancelled() => return,
                };
                let seen = seen.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                        if inbound.read_exact(&mut byte).await.is_err() {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let Some(target) = text
                        .lines()
                        .next()
                        .and_then(|l| l.strip_prefix("CONNECT "))
                        .and_then(|l| l.split(' ').next())
                        .map(str::to_string)
                    else {
                        let _ = inbound
                            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                            .await;
                        return;
                    };
                    seen.lock().unwrap().push(target.clone());
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        let _ = inbound.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    if inbound
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        ConnectProxy {
            addr,
            targets,
            token,
        }
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A TCP proxy that can cut every connection at once or stall them (stop forwarding while
/// keeping them open, as a dead NAT mapping does).
pub struct FaultProxy {
    pub addr: SocketAddr,
    stalled: Arc<AtomicBool>,
    /// Chunks still to be thrown away, agent to broker: the stream is corrupted, not closed.
    dropping: Arc<AtomicUsize>,
    generation: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    token: CancellationToken,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind(local(0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let dropping = Arc::new(AtomicUsize::new(0));
        let generation = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let token = CancellationToken::new();
        let drops = dropping.clone();
        let (st, gen_, conns, stop) = (
            stalled.clone(),
            generation.clone(),
            connections.clone(),
            token.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                    _ = stop.cancelled() => return,
                };
                let Ok(outbound) = TcpStream::connect(upstream).await else {
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let born = gen_.load(Ordering::SeqCst);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                for (upward, mut r, mut w) in [
                    (
                        true,
                        Box::new(ri) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    ),
                    (false, Box::new(ro), Box::new(wi)),
                ] {
                    let (st, gen_, stop, drops) =
                        (st.clone(), gen_.clone(), stop.clone(), drops.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            if gen_.load(Ordering::SeqCst) != born || stop.is_cancelled() {
                                return;
                            }
                            if st.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                            let n = tokio::select! {
                                n = r.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
                                _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
                            };
                            if upward
                                && drops
                                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                                        d.checked_sub(1)
                                    })
                                    .is_ok()
                            {
                                continue;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        FaultProxy {
            addr,
            stalled,
            dropping,
            generation,
            connections,
            token,
        }
    }

    /// Drops every live connection (both directions end at once).
    pub fn cut(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Throws away the next `chunks` reads from the agent's side: bytes lost mid-stream, which
    /// the broker sees as a malformed packet.
    pub fn drop_chunks(&self, chunks: usize) {
        self.dropping.fetch_add(chunks, Ordering::SeqCst);
    }

    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Sends `n` transactions to the agent's first register, pipelined in chunks of 100, each
/// ended `spacing` after the previous one from `start`; returns the ids in order. `between`
/// runs after each chunk (to move a manual clock).
pub async fn ring_up_with(
    agent: &TestAgent,
    register: &mut storelink::sim::SimRegister,
    n: usize,
    start: jiff::Timestamp,
    mut between: impl FnMut(),
) -> Vec<String> {
    let mut client = agent.client(0).await;
    let mut ids = Vec::with_capacity(n);
    let mut i = 0i64;
    while ids.len() < n {
        let mut sent = Vec::new();
        for _ in 0..(n - ids.len()).min(100) {
            let tx = register.next(start + jiff::SignedDuration::from_millis(i * 10));
            i += 1;
            client.send(&tx).await.unwrap();
            sent.push(tx.id);
        }
        for id in sent {
            assert_eq!(client.reply().await.unwrap(), format!("ok {id}"));
            ids.push(id);
        }
        between();
    }
    ids
}
