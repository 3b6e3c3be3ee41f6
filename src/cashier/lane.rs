//! The lane display: one page per lane, served from the binary, live over Server-Sent Events.
//!
//! - `GET /lanes/{lane}`: the page (HTML, CSS and script inline; no external assets).
//! - `GET /lanes/{lane}/events`: the lane's prompt now, then every change, and a `ping`
//!   every [`PING`] so the page can tell a quiet lane from a lost agent.
//! - `POST /lanes/{lane}/prompts/{id}/{action}`: accepted, dismissed or redeemed; each
//!   becomes a `storelink.prompt.v1` event.
//!
//! Invariants: every route checks the lane's token (see [`super::auth`]); the page is never
//! sent a customer id or loyalty id, only what the cashier needs to read out; a stream ends
//! when the agent shuts down, so shutdown never waits on an open display.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::auth::{LANE_COOKIE, LaneAuth, lane_token};
use crate::offers::live::{LaneUpdate, Offers, OffersError, Prompt, PromptAction, Recognised};

/// How often a display hears from the agent when nothing changes. The page shows the offline
/// banner after missing about two of these.
pub const PING: Duration = Duration::from_secs(10);

const PAGE: &str = include_str!("lane.html");

/// What the lane routes read.
#[derive(Clone)]
pub struct LaneState {
    pub offers: Offers,
    pub auth: LaneAuth,
    pub store: String,
    /// Language → key → text.
    pub texts: Arc<BTreeMap<String, BTreeMap<String, String>>>,
    pub language: String,
    pub token: CancellationToken,
}

/// A prompt as the display shows it: no customer or loyalty id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptView {
    pub id: String,
    pub first_name: Option<String>,
    pub tier: Option<String>,
    pub points: i64,
    pub ask_for_card: bool,
    pub recognised: Recognised,
    /// Language → offer text.
    pub offer: Option<BTreeMap<String, String>>,
    pub code: Option<String>,
    pub barcode: Option<String>,
    /// Class, last visit, last category and the follow-up to ask about (no ids).
    pub insight: Option<crate::offers::live::Insight>,
}

impl From<&Prompt> for PromptView {
    fn from(p: &Prompt) -> Self {
        PromptView {
            id: p.id.clone(),
            first_name: p.first_name.clone(),
            tier: p.tier.clone(),
            points: p.points,
            ask_for_card: p.ask_for_card,
            recognised: p.recognised,
            offer: p.offer.as_ref().map(|o| o.text.clone()),
            code: p.offer.as_ref().and_then(|o| o.code.clone()),
            barcode: p.offer.as_ref().and_then(|o| o.barcode.clone()),
            insight: p.insight.clone(),
        }
    }
}

pub fn router(state: LaneState) -> Router {
    Router::new()
        .route("/lanes/{lane}", get(page))
        .route("/lanes/{lane}/events", get(events))
        .route("/lanes/{lane}/prompts/{id}/{action}", post(action))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    token: Option<String>,
    lang: Option<String>,
}

fn unauthorised(lane: &str) -> Response {
    metrics::counter!("storelink_api_refused_total", "reason" => "lane_token").increment(1);
    tracing::info!(
        lane,
        "refused a lane display request with a missing or wrong token"
    );
    (
        StatusCode::UNAUTHORIZED,
        Html(format!(
            "<!doctype html><meta charset=utf-8><title>storelink</title><h1>401</h1><p>This display needs the token for lane {}: open the URL retail IT gave for this lane.</p>",
            html_escape(lane)
        )),
    )
        .into_response()
}

fn authorised(state: &LaneState, lane: &str, query: Option<&str>, headers: &HeaderMap) -> bool {
    lane_token(query, headers).is_some_and(|t| state.auth.check(lane, &t))
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JSON safe to place inside a `<script>` element.
fn script_json(value: &impl Serialize) -> String {
    serde_json::to_string(value)
        .unwrap_or_else(|_| "null".into())
        .replace('<', "\\u003c")
}

async fn page(
    State(state): State<LaneState>,
    Path(lane): Path<String>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    if !authorised(&state, &lane, q.token.as_deref(), &headers) {
        return unauthorised(&lane);
    }
    let language = q
        .lang
        .filter(|l| state.texts.contains_key(l))
        .unwrap_or_else(|| state.language.clone());
    let boot = serde_json::json!({
        "lane": lane,
        "store": state.store,
        "language": language,
        "texts": state.texts.get(&language),
        "fallback": state.language,
        "ping_ms": PING.as_millis() as u64,
    });
    let body = PAGE
        .replace("{{LANG}}", &html_escape(&language))
        .replace("{{TITLE}}", &html_escape(&format!("storelink · {lane}")))
        .replace("{{BOOT}}", &script_json(&boot));
    let mut response = Html(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
        ),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Some(token) = q.token {
        // The token moves from the URL to a cookie the page's own requests carry; the path
        // keeps it from being sent for another lane.
        let cookie = format!(
            "{LANE_COOKIE}={token}; Path=/lanes/{}; Max-Age=31536000; HttpOnly; SameSite=Strict",
            percent_path(&lane)
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            headers.insert(header::SET_COOKIE, v);
        }
    }
    response
}

/// A lane name as it appears in a URL path.
fn percent_path(lane: &str) -> String {
    lane.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn prompt_event(prompt: Option<&Prompt>) -> Event {
    let view = prompt.map(PromptView::from);
    Event::default()
        .event("prompt")
        .data(serde_json::to_string(&view).unwrap_or_else(|_| "null".into()))
}

struct Follow {
    lane: String,
    offers: Offers,
    updates: broadcast::Receiver<LaneUpdate>,
    ping: tokio::time::Interval,
    token: CancellationToken,
    /// The prompt id last sent; `Some(None)` for idle, `None` before the first event.
    sent: Option<Option<String>>,
}

impl Follow {
    fn send(&mut self, prompt: Option<&Prompt>) -> Event {
        self.sent = Some(prompt.map(|p| p.id.clone()));
        prompt_event(prompt)
    }

    async fn next(&mut self) -> Option<Event> {
        if self.sent.is_none() {
            let now = self.offers.lane_prompt(&self.lane);
            return Some(self.send(now.as_ref()));
        }
        loop {
            tokio::select! {
                _ = self.token.cancelled() => return None,
                update = self.updates.recv() => match update {
                    Ok(u) if u.lane == self.lane => return Some(self.send(u.prompt.as_ref())),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let now = self.offers.lane_prompt(&self.lane);
                        return Some(self.send(now.as_ref()));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.ping.tick() => {
                    // A prompt can also end by itself (its time to live); the tick notices.
                    let now = self.offers.lane_prompt(&self.lane);
                    if self.sent.as_ref() != Some(&now.as_ref().map(|p| p.id.clone())) {
                        return Some(self.send(now.as_ref()));
                    }
                    return Some(Event::default().event("ping").data(""));
                }
            }
        }
    }
}

async fn events(
    State(state): State<LaneState>,
    Path(lane): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    if !authorised(&state, &lane, q.token.as_deref(), &headers) {
        return unauthorised(&lane);
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING, PING);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let follow = Follow {
        updates: state.offers.subscribe_lanes(),
        offers: state.offers.clone(),
        lane,
        ping,
        token: state.token.clone(),
        sent: None,
    };
    metrics::gauge!("storelink_lane_displays").increment(1.0);
    let stream =
        futures_util::stream::unfold((follow, DisplayGauge), |(mut follow, gauge)| async move {
            let event = follow.next().await?;
            Some((Ok::<_, Infallible>(event), (follow, gauge)))
        });
    let mut response = Sse::new(stream).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Counts open displays down when their stream is dropped, however it ends.
struct DisplayGauge;

impl Drop for DisplayGauge {
    fn drop(&mut self) {
        metrics::gauge!("storelink_lane_displays").decrement(1.0);
    }
}

async fn action(
    State(state): State<LaneState>,
    Path((lane, id, action)): Path<(String, String, String)>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    if !authorised(&state, &lane, q.token.as_deref(), &headers) {
        return unauthorised(&lane);
    }
    let Some(action) = PromptAction::reported(&action) else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": format!("no action {action:?}; use accepted, dismissed or redeemed")
            })),
        )
            .into_response();
    };
    match state.offers.prompt_action(&lane, &id, action).await {
        Ok(p) => Json(PromptView::from(&p)).into_response(),
        Err(OffersError::BadRequest(m)) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({ "error": m })),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(lane, error = %e, "could not record a cashier's action");
            let mut r = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "error": e.to_string() })),
            )
                .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            r
        }
    }
}

/// The display URL path (with its token) for a lane.
pub fn display_path(auth: &LaneAuth, lane: &str) -> String {
    format!("/lanes/{}?token={}", percent_path(lane), auth.token(lane))
}
