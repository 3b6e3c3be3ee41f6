//! The bridge's face for operators, over HTTP on `http.bind`: `/healthz` (the process
//! answers), `/readyz` (the broker holds the subscription and PostgreSQL answers), `/metrics`
//! (Prometheus) and `/status` (JSON, what `storelink bridge status` prints).
//!
//! Invariants: nothing here writes; nothing here names a customer (the email queue is shown
//! as counts per sink and state); a slow or absent database makes `/readyz` and `/status`
//! answer within their timeout, never hang a probe.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use jiff::Timestamp;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Totals;
use super::config::PostgresSection;

/// How long `/readyz` and `/status` wait for PostgreSQL.
const DB_TIMEOUT: Duration = Duration::from_secs(3);

/// What the HTTP face reads.
#[derive(Clone)]
pub struct OpsState {
    pub subscribed: watch::Receiver<bool>,
    pub totals: watch::Receiver<Totals>,
    pub started_at: Timestamp,
    pub postgres: PostgresSection,
    pub sinks: Vec<String>,
    pub metrics: PrometheusHandle,
}

/// One email sink's queue, by state.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct SinkStatus {
    pub sink: String,
    pub pending: i64,
    pub sent: i64,
    pub no_consent: i64,
    pub no_contact: i64,
    pub failed: i64,
    /// Age of the oldest pending trigger, in seconds: the sink's lag.
    pub oldest_pending_s: Option<f64>,
}

/// `/status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub version: String,
    pub started_at: String,
    pub subscribed: bool,
    pub database: Result<(), String>,
    pub received: u64,
    pub new: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
    pub batches: u64,
    pub email: Vec<SinkStatus>,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(Arc::new(state))
}

/// Serves the router on `listener` until `token` is cancelled.
pub fn serve(
    listener: tokio::net::TcpListener,
    state: OpsState,
    token: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let app = router(state);
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(token.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the bridge's HTTP server stopped");
        }
    })
}

async fn readyz(State(s): State<Arc<OpsState>>) -> Response {
    if !*s.subscribed.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the broker does not hold the subscription\n",
        )
            .into_response();
    }
    match database(&s.postgres, &[]).await {
        Ok(_) => "ready\n".into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: postgres: {e}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Arc<OpsState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn status(State(s): State<Arc<OpsState>>) -> Json<Status> {
    let t = *s.totals.borrow();
    let (database, email) = match database(&s.postgres, &s.sinks).await {
        Ok(email) => (Ok(()), email),
        Err(e) => (Err(e), Vec::new()),
    };
    Json(Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: s.started_at.to_string(),
        subscribed: *s.subscribed.borrow(),
        database,
        received: t.received,
        new: t.new,
        duplicates: t.duplicates,
        dead_letters: t.dead_letters,
        batches: t.batches,
        email,
    })
}

/// Asks PostgreSQL for the sinks' queues (nothing for none): whether it answers at all is
/// readiness.
async fn database(pg: &PostgresSection, sinks: &[String]) -> Result<Vec<SinkStatus>, String> {
    let ask = async {
        let (client, connection) =
            super::postgres::connect(&pg.url, pg.password.as_ref(), pg.ca_file.as_deref())
                .await
                .map_err(|e| e.to_string())?;
        let result = async {
            if sinks.is_empty() {
                client.simple_query("SELECT 1").await?;
                return Ok(Vec::new());
            }
            let rows = client
                .query(
                    "SELECT s.sink,
                         count(q.*) FILTER (WHERE q.state = 'pending'),
                         count(q.*) FILTER (WHERE q.state = 'sent'),
                         count(q.*) FILTER (WHERE q.state = 'no_consent'),
                         count(q.*) FILTER (WHERE q.state = 'no_contact'),
                         count(q.*) FILTER (WHERE q.state = 'failed'),
                         extract(epoch FROM now() - min(q.enqueued_at)
                             FILTER (WHERE q.state = 'pending'))::float8
                     FROM unnest($1::text[]) AS s(sink)
                     LEFT JOIN storelink.email_queue q ON q.sink = s.sink
                     GROUP BY s.sink ORDER BY s.sink",
                    &[&sinks],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| SinkStatus {
                    sink: r.get(0),
                    pending: r.get(1),
                    sent: r.get(2),
                    no_consent: r.get(3),
                    no_contact: r.get(4),
                    failed: r.get(5),
                    oldest_pending_s: r.get(6),
                })
                .collect())
        }
        .await
        .map_err(|e: tokio_postgres::Error| e.to_string());
        connection.abort();
        result
    };
    tokio::time::timeout(DB_TIMEOUT, ask)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {DB_TIMEOUT:?}")))
}
