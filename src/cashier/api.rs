//! The local HTTP server's routes: health and readiness (open to all), the admin API,
//! metrics and the register endpoints (loopback or admin token, see [`super::auth`]), and the
//! lane displays (lane token, see [`super::lane`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use jiff::Timestamp;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::auth::{self, AdminAuth};
use super::lane::{self, LaneState};
use crate::clock::SharedClock;
use crate::deadletter::DeadLetters;
use crate::offers::campaign::Trigger;
use crate::offers::live::{Offers, OffersError, PromptAction, RegisterEvent};
use crate::pos::RegisterContext;
use crate::profiles::kpi::{KpiConfig, KpiView, Kpis};
use crate::profiles::{Profile, ProfileStats, ProfileStore};
use crate::supervisor::{Component, ComponentState, ComponentStatus, StatusBoard};
use crate::uplink::outbox::{Outbox, OutboxStats};

/// Facts about this agent that do not change while it runs.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    pub version: &'static str,
    pub store: String,
    pub tenant: String,
    pub started_at: Timestamp,
    /// Where central reads this store's feed: the MQTT topic prefix, and the broker without
    /// credentials. `storelink sim` uses them to check what arrives.
    pub topic_prefix: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub central_mqtt: Option<String>,
    /// The registers the config names and how each one reaches the agent.
    pub registers: Vec<RegisterInfo>,
}

/// One register as `storelink sim` and retail IT see it in the status report.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RegisterInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    /// `jsonl`, `poslog` or `receipt`.
    pub format: String,
    /// `tcp-listen`, `tcp-connect`, `serial` or `http`.
    pub transport: String,
    /// The listening address, the journal port or the serial device; none for `http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl RegisterInfo {
    pub fn of(register: &crate::config::RegisterConfig) -> RegisterInfo {
        use crate::config::{RegisterFormat, Transport};
        let (transport, address) = match &register.transport {
            Transport::TcpListen { bind } => ("tcp-listen", Some(bind.clone())),
            Transport::TcpConnect { addr } => ("tcp-connect", Some(addr.clone())),
            Transport::Serial { port, .. } => ("serial", Some(port.display().to_string())),
            Transport::Http => ("http", None),
        };
        RegisterInfo {
            name: register.name.clone(),
            lane: register.lane.clone(),
            format: match register.format {
                RegisterFormat::Jsonl => "jsonl",
                RegisterFormat::Poslog => "poslog",
                RegisterFormat::Receipt => "receipt",
            }
            .to_string(),
            transport: transport.to_string(),
            address,
        }
    }
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
    /// Registers whose transport is `http`, by name.
    pub registers: Arc<BTreeMap<String, RegisterContext>>,
    pub profiles: ProfileStore,
    /// The store's time zone: KPIs are viewed as of the store's today.
    pub tz: jiff::tz::TimeZone,
    /// Activity thresholds and CLV settings from `[profiles.kpi]`.
    pub kpi: KpiConfig,
    pub offers: Offers,
    pub admin: AdminAuth,
    pub lanes: LaneState,
    /// Lanes the config names (registers and presence zones), for `GET /api/v1/lanes`.
    pub known_lanes: Arc<Vec<String>>,
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
    let admin = Router::new()
        .route("/api/v1/status", get(status))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/profiles/stats", get(profile_stats))
        .route("/api/v1/profiles/{id}", get(profile_show))
        .route(
            "/pos/v1/transactions",
            post(post_transactions).layer(DefaultBodyLimit::max(MAX_REGISTER_BODY)),
        )
        .route(
            "/pos/v1/events",
            post(post_register_event).layer(DefaultBodyLimit::max(MAX_EVENT_BODY)),
        )
        .route("/api/v1/lanes", get(lanes_list))
        .route("/api/v1/lanes/{lane}/prompt", get(lane_prompt))
        .route(
            "/api/v1/lanes/{lane}/prompts/{id}/{action}",
            post(prompt_action),
        )
        .route("/api/v1/offers/stats", get(offer_stats))
        .route("/api/v1/offers/campaigns", get(offer_campaigns))
        .route("/api/v1/offers/explain/{customer}", get(offer_explain))
        .route_layer(axum::middleware::from_fn_with_state(
            state.admin.clone(),
            auth::require_admin,
        ))
        .with_state(state.clone());
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state.clone())
        .merge(admin)
        .merge(lane::router(state.lanes.clone()))
}

/// Every lane the config names, with its display path (token included): what retail IT sets
/// up on each lane's screen.
async fn lanes_list(State(state): State<ApiState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "lanes": state.known_lanes.iter().map(|l| serde_json::json!({
            "lane": l,
            "display": lane::display_path(&state.lanes.auth, l),
        })).collect::<Vec<_>>()
    }))
}

/// A live register event is small: a card number, a basket of lines.
const MAX_EVENT_BODY: usize = 1024 * 1024;

fn offers_error(e: OffersError) -> Response {
    match e {
        OffersError::BadRequest(m) => error_answer(StatusCode::BAD_REQUEST, m),
        OffersError::Malformed(e) => error_answer(StatusCode::BAD_REQUEST, e.to_string()),
        OffersError::Store(e) => {
            tracing::error!(error = %e, "offers: storage failed");
            let mut r = error_answer(StatusCode::SERVICE_UNAVAILABLE, format!("storage: {e}"));
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            r
        }
    }
}

/// A live register event; the answer carries the lane's prompt and the offers as effects.
async fn post_register_event(State(state): State<ApiState>, body: axum::body::Bytes) -> Response {
    let event: RegisterEvent = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return error_answer(
                StatusCode::BAD_REQUEST,
                format!(
                    "not a register event ({{\"type\": \"customer_identified\" | \"transaction_started\" | \"basket_updated\" | \"transaction_ended\", \"lane\" or \"register\", …}}): {e}"
                ),
            );
        }
    };
    match state.offers.on_register_event(event).await {
        Ok(effects) => Json(effects).into_response(),
        Err(e) => offers_error(e),
    }
}

async fn lane_prompt(State(state): State<ApiState>, Path(lane): Path<String>) -> Response {
    match state.offers.lane_prompt(&lane) {
        Some(p) => Json(p).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn prompt_action(
    State(state): State<ApiState>,
    Path((lane, id, action)): Path<(String, String, String)>,
) -> Response {
    let Some(action) = PromptAction::reported(&action) else {
        return error_answer(
            StatusCode::NOT_FOUND,
            format!("no action {action:?}; use accepted, dismissed or redeemed"),
        );
    };
    match state.offers.prompt_action(&lane, &id, action).await {
        Ok(p) => Json(p).into_response(),
        Err(OffersError::BadRequest(m)) => error_answer(StatusCode::CONFLICT, m),
        Err(e) => offers_error(e),
    }
}

async fn offer_stats(State(state): State<ApiState>) -> Response {
    match state.offers.stats() {
        Ok(s) => Json(s).into_response(),
        Err(e) => offers_error(OffersError::Store(e)),
    }
}

async fn offer_campaigns(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let set = state.offers.campaigns();
    Json(serde_json::json!({
        "version": set.version,
        "slots": state.offers.versions(),
        "live": set.live.iter().map(|c| serde_json::json!({
            "id": c.campaign.id,
            "name": c.campaign.name,
            "trigger": c.campaign.trigger.name(),
            "valid_from": c.campaign.valid_from,
            "valid_until": c.campaign.valid_until,
        })).collect::<Vec<_>>(),
        "rejected": set.rejected,
    }))
}

#[derive(Debug, serde::Deserialize)]
struct ExplainQuery {
    /// Comma-separated trigger names.
    trigger: Option<String>,
    zone: Option<String>,
    lane: Option<String>,
    /// The product group for `winback_due`.
    group: Option<String>,
    at: Option<Timestamp>,
}

async fn offer_explain(
    State(state): State<ApiState>,
    Path(customer): Path<String>,
    Query(q): Query<ExplainQuery>,
) -> Response {
    let names = q.trigger.as_deref().unwrap_or("store_entered");
    let mut triggers = Vec::new();
    for name in names.split(',').map(str::trim) {
        match Trigger::parse(name, q.zone.as_deref(), q.group.as_deref()) {
            Ok(t) => triggers.push(t),
            Err(m) => return error_answer(StatusCode::BAD_REQUEST, m),
        }
    }
    match state
        .offers
        .explain(&customer, triggers, q.zone, q.lane, q.at)
    {
        Ok(x) if !x.customer_found => {
            error_answer(StatusCode::NOT_FOUND, "no such customer here".into())
        }
        Ok(x) => Json(x).into_response(),
        Err(e) => offers_error(e),
    }
}

/// What support sees of one customer: the profile without its presence key, and the KPIs as
/// of the store's today.
#[derive(Debug, Serialize)]
struct ProfileReport {
    profile: Profile,
    has_presence_key: bool,
    /// A stub made from a transaction, waiting for sync.
    stub: bool,
    kpis: Option<Kpis>,
    as_of: jiff::civil::Date,
    view: Option<KpiView>,
    /// Whether `view` used central's BG/NBD parameters or the fallback CLV.
    model_shipped: bool,
}

async fn profile_show(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ProfileReport>, (StatusCode, String)> {
    let storage = |e: crate::store::StoreError| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    // Support often has the card in hand rather than the id.
    let id = state.profiles.resolve_card(&id).map_err(storage)?;
    let Some(mut profile) = state.profiles.get(&id).map_err(storage)? else {
        return Err(match state.profiles.tombstone(&id).map_err(storage)? {
            Some(_) => (StatusCode::GONE, "this customer was erased\n".to_string()),
            None => (StatusCode::NOT_FOUND, "no such customer here\n".to_string()),
        });
    };
    let has_presence_key = profile.presence_key.take().is_some();
    let kpis = state.profiles.kpis(&id).map_err(storage)?;
    let as_of = state.clock.now().to_zoned(state.tz.clone()).date();
    let model = state.profiles.model().map_err(storage)?;
    let rfm = state.profiles.rfm_breakpoints().map_err(storage)?;
    let view = kpis
        .as_ref()
        .map(|k| k.view(as_of, &state.kpi, model.as_ref(), rfm.as_ref()));
    Ok(Json(ProfileReport {
        stub: profile.version == 0,
        profile,
        has_presence_key,
        kpis,
        as_of,
        view,
        model_shipped: model.is_some(),
    }))
}

async fn profile_stats(
    State(state): State<ApiState>,
) -> Result<Json<ProfileStats>, (StatusCode, String)> {
    state
        .profiles
        .stats()
        .map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Largest request body a register may post: the largest frame cap config allows.
const MAX_REGISTER_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug, serde::Deserialize)]
struct RegisterQuery {
    register: Option<String>,
}

/// One refused frame in a register's request.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct FrameError {
    /// 1-based position of the frame in the body.
    pub frame: usize,
    pub error: String,
}

/// The answer to `POST /pos/v1/transactions`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct PostAnswer {
    pub register: String,
    /// Ids now held durably (including ones already seen).
    pub accepted: Vec<String>,
    /// Bad input: kept as dead letters; sending it again will not help.
    pub rejected: Vec<FrameError>,
    /// The agent could not take good input now; send it again later.
    pub failed: Vec<FrameError>,
}

fn error_answer(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Completed transactions from a register that speaks HTTP, in its configured format: one or
/// more frames in the body (JSON lines, POSLog documents, receipts).
async fn post_transactions(
    State(state): State<ApiState>,
    Query(query): Query<RegisterQuery>,
    body: axum::body::Bytes,
) -> Response {
    let ctx = match (query.register.as_deref(), state.registers.len()) {
        (Some(name), _) => match state.registers.get(name) {
            Some(ctx) => ctx,
            None => {
                return error_answer(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no register named {name:?} takes transactions over HTTP; set its transport to {{ kind = \"http\" }}"
                    ),
                );
            }
        },
        (None, 1) => state.registers.values().next().expect("one register"),
        (None, 0) => {
            return error_answer(
                StatusCode::NOT_FOUND,
                "no register takes transactions over HTTP; set a register's transport to { kind = \"http\" }".into(),
            );
        }
        (None, _) => {
            return error_answer(
                StatusCode::BAD_REQUEST,
                "several registers take HTTP: name one with ?register=NAME".into(),
            );
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return error_answer(
            StatusCode::BAD_REQUEST,
            format!(
                "empty body: send transactions in the {:?} format",
                ctx.parser.format
            ),
        );
    }
    let outcomes = ctx.submit_all(&body).await;
    let mut answer = PostAnswer {
        register: ctx.id.register.clone(),
        accepted: Vec::new(),
        rejected: Vec::new(),
        failed: Vec::new(),
    };
    for (i, outcome) in outcomes.into_iter().enumerate() {
        answer.accepted.extend(outcome.ids);
        if let Some(error) = outcome.refused {
            answer.rejected.push(FrameError {
                frame: i + 1,
                error,
            });
        }
        if let Some(error) = outcome.failed {
            answer.failed.push(FrameError {
                frame: i + 1,
                error,
            });
        }
    }
    let status = if !answer.failed.is_empty() {
        StatusCode::SERVICE_UNAVAILABLE
    } else if !answer.rejected.is_empty() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    let mut response = (status, Json(answer)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    }
    response
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
    // Outbox ages and campaign figures are computed on demand; refresh them for this scrape.
    let _ = state.outbox.stats();
    state.offers.export_stats();
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

/// Serves the API until cancelled. `listening` is told the address once the port is bound.
pub async fn serve(
    bind: SocketAddr,
    state: ApiState,
    component: Component,
    token: CancellationToken,
    listening: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ApiError> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|source| ApiError::Bind { addr: bind, source })?;
    let local = listener.local_addr().unwrap_or(bind);
    tracing::info!(%local, "local API ready");
    component.running(Some(format!("listening on {local}")));
    if let Some(tx) = listening {
        let _ = tx.send(local);
    }
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(token.cancelled_owned())
    .await
    .map_err(ApiError::Serve)
}
