//! Central's HTTPS batch endpoint, served by `storelink sim --https-listen` so a lab run can
//! play central on both paths, and by the tests' central.
//!
//! `POST /v1/stores/{store}/events:batch` takes `application/cloudevents-batch+json`, gzipped
//! or not, records each event's arrival and answers 200: the contract in docs/central.md,
//! minus central's own de-duplication, which is exactly what the simulator wants to count.
//!
//! Invariants: a batch that is not valid (bad gzip, not a JSON array) is answered 400 and
//! recorded nowhere; TLS is rustls with the process's ring provider.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use super::SimError;
use super::central::Arrivals;

/// A TLS server config from a certificate chain and key.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, String> {
    crate::install_crypto_provider();
    ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not make a TLS server: {e}"))
}

/// A TLS server config from PEM files.
pub fn server_config_from_files(cert: &Path, key: &Path) -> Result<ServerConfig, String> {
    let certs = crate::tls::read_certs(cert)?;
    let key = crate::tls::read_identity(cert, key)
        .map(|(_, k)| k)
        .map_err(|e| e.message)?;
    server_config(certs, key)
}

/// Serves `app` over TLS on `listener` until `token` is cancelled, each connection on its
/// own task (HTTP/1.1, or HTTP/2 when `config` offers it by ALPN).
pub fn serve_tls(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    app: Router,
    token: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                _ = token.cancelled() => return,
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    })
}

/// The CloudEvents of a batch body: gunzipped when the request says gzip, then a JSON array.
pub fn decode_batch(headers: &HeaderMap, body: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    let gzip = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let raw = if gzip {
        let mut out = Vec::new();
        use std::io::Read as _;
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut out)
            .map_err(|e| format!("bad gzip: {e}"))?;
        out
    } else {
        body.to_vec()
    };
    match serde_json::from_slice(&raw) {
        Ok(serde_json::Value::Array(events)) => Ok(events),
        Ok(_) => Err("not a JSON array of CloudEvents".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// Starts the simulator's HTTPS central on `bind`; returns the bound address.
pub async fn start(
    bind: &str,
    config: ServerConfig,
    arrivals: Arc<Arrivals>,
    token: CancellationToken,
) -> Result<SocketAddr, SimError> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| SimError::Setup(format!("cannot listen on {bind}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| SimError::Setup(e.to_string()))?;
    let app = Router::new()
        .route("/v1/stores/{store}/{action}", axum::routing::post(batch))
        .with_state(arrivals);
    serve_tls(listener, config, app, token);
    Ok(addr)
}

async fn batch(
    State(arrivals): State<Arc<Arrivals>>,
    axum::extract::Path((_store, action)): axum::extract::Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if action != "events:batch" {
        return StatusCode::NOT_FOUND.into_response();
    }
    match decode_batch(&headers, &body) {
        Ok(events) => {
            for e in &events {
                arrivals.record_event(e, super::central::Path::Https);
            }
            StatusCode::OK.into_response()
        }
        Err(why) => (StatusCode::BAD_REQUEST, why).into_response(),
    }
}
