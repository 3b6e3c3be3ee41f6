//! `GET /healthz`, `GET /readyz`, `GET /api/v1/status` and `GET /metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use jiff::Timestamp;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::deadletter::DeadLetters;
use crate::supervisor::{Component, ComponentState, ComponentStatus, StatusBoard};
use crate::uplink::outbox::{Outbox, OutboxStats};

/// The process-wide Prometheus recorder. Installed once; later calls share it, so several
/// agents in one test process all render.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Facts about this agent that do not change while it runs.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    pub version: &'static str,
    pub store: String,
    pub tenant: String,
    pub started_at: Timestamp,
}

/// What the API reads.
#[derive(Clone)]
pub struct ApiState {
    pub info: AgentInfo,
    pub board: StatusBoard,
    pub outbox: Arc<Outbox>,
    pub deadletters: Arc<DeadLetters>,
    /// Set once the store is open and every source has been started.
    pub ready: Arc<AtomicBool>,
    pub clock: SharedClock,
    pub metrics: PrometheusHandle,
}

/// Overall health, as `storelink status` and monitoring read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Degraded,
}

/// The body of `GET /api/v1/status`.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub agent: AgentInfo,
    pub uptime_s: f64,
    pub ready: bool,
    pub health: Health,
    pub components: BTreeMap<String, ComponentStatus>,
    pub outbox: Option<OutboxStats>,
    pub deadletters_stored: usize,
    /// When central last acknowledged anything, over any path.
    pub central_last_contact: Option<Timestamp>,
}

impl ApiState {
    pub fn report(&self) -> StatusReport {
        let components = self.board.snapshot();
        let healthy = components
            .values()
            .all(|c| matches!(c.state, ComponentState::Running | ComponentState::Stopped));
        let central_last_contact = components
            .iter()
            .filter(|(name, _)| name.starts_with("uplink"))
            .filter_map(|(_, c)| c.last_success_at)
            .max();
        let outbox = match self.outbox.stats() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "could not read outbox statistics");
                None
            }
        };
        StatusReport {
            uptime_s: self
                .clock
                .now()
                .duration_since(self.info.started_at)
                .as_secs_f64()
                .max(0.0),
            agent: self.info.clone(),
            ready: self.ready.load(Ordering::SeqCst),
            health: if healthy && outbox.is_some() {
                Health::Healthy
            } else {
                Health::Degraded
            },
            components,
            outbox,
            deadletters_stored: self.deadletters.len(),
            central_last_contact,
        }
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn status(State(state): State<ApiState>) -> Json<StatusReport> {
    Json(state.report())
}

async fn metrics_text(State(state): State<ApiState>) -> Response {
    // Outbox ages are computed on demand; refresh them for this scrape.
    let _ = state.outbox.stats();
    state.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("local API server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Serves the API until cancelled.
pub async fn serve(
    bind: SocketAddr,
    state: ApiState,
    component: Component,
    token: CancellationToken,
) -> Result<(), ApiError> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|source| ApiError::Bind { addr: bind, source })?;
    let local = listener.local_addr().unwrap_or(bind);
    tracing::info!(%local, "local API ready");
    component.running(Some(format!("listening on {local}")));
    axum::serve(listener, router(state))
        .with_graceful_shutdown(token.cancelled_owned())
        .await
        .map_err(ApiError::Serve)
}
