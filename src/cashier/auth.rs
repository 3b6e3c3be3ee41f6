//! Who may use the local HTTP server.
//!
//! - Lane displays and their buttons need that lane's token, in the URL (`?token=`) once and
//!   then in a cookie scoped to the lane's path. A lane's token is an HMAC of the lane name
//!   under one secret, so retail IT configures one secret per store rather than one per lane,
//!   and a token for lane 3 opens nothing else.
//! - The API, metrics and register endpoints answer loopback peers freely (the gateway itself:
//!   `storelink status`, a local scraper) and everyone else only with the admin token as
//!   `Authorization: Bearer`.
//!
//! Invariant: tokens are compared in constant time and never logged.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::Secret;
use crate::store::{Commit, LogTable, Store, StoreError};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC a lane token carries (hex-encoded: twice as many characters).
const LANE_TOKEN_BYTES: usize = 16;

/// Where a secret made by the agent itself is kept.
const LANE_SECRET_KEY: &[u8] = b"cashier.lane_secret";

/// Derives and checks lane tokens.
#[derive(Clone)]
pub struct LaneAuth {
    secret: Vec<u8>,
}

impl LaneAuth {
    pub fn new(secret: &[u8]) -> LaneAuth {
        LaneAuth {
            secret: secret.to_vec(),
        }
    }

    /// The configured secret, or the one this agent made on its first start (kept in the
    /// store, so display URLs survive restarts and upgrades).
    pub fn open(configured: Option<&Secret>, store: &Store) -> Result<LaneAuth, StoreError> {
        if let Some(secret) = configured {
            return Ok(LaneAuth::new(secret.expose().as_bytes()));
        }
        if let Some(kept) = store.view(LogTable::Meta)?.get(LANE_SECRET_KEY)? {
            return Ok(LaneAuth::new(kept.bytes()));
        }
        let made: [u8; 32] = rand::random();
        // Durable at once: a secret lost to a power cut would change every display's URL.
        store.write(Commit::Durable, |w| {
            w.table(LogTable::Meta)?.insert(LANE_SECRET_KEY, &made)
        })?;
        Ok(LaneAuth::new(&made))
    }

    fn mac(&self, lane: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(b"storelink lane display\0");
        mac.update(lane.as_bytes());
        mac
    }

    /// The token that opens `lane`'s display.
    pub fn token(&self, lane: &str) -> String {
        let tag = self.mac(lane).finalize().into_bytes();
        tag[..LANE_TOKEN_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn check(&self, lane: &str, token: &str) -> bool {
        let Some(bytes) = decode_hex(token) else {
            return false;
        };
        bytes.len() == LANE_TOKEN_BYTES && self.mac(lane).verify_truncated_left(&bytes).is_ok()
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The name of the cookie that carries a lane's token.
pub const LANE_COOKIE: &str = "storelink_lane";

/// The lane token a request carries: `?token=` first, then the cookie.
pub fn lane_token(query_token: Option<&str>, headers: &HeaderMap) -> Option<String> {
    if let Some(t) = query_token {
        return Some(t.to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == LANE_COOKIE)
        .map(|(_, value)| value.to_string())
}

/// The admin token, if one is configured.
#[derive(Clone)]
pub struct AdminAuth {
    /// SHA-256 of the token: comparing digests takes the same time whatever the guess.
    digest: Option<[u8; 32]>,
}

impl AdminAuth {
    pub fn new(token: Option<&Secret>) -> AdminAuth {
        AdminAuth {
            digest: token.map(|t| Sha256::digest(t.expose().as_bytes()).into()),
        }
    }

    fn allows(&self, peer: SocketAddr, headers: &HeaderMap) -> bool {
        if peer.ip().is_loopback() {
            return true;
        }
        let Some(expected) = &self.digest else {
            return false;
        };
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
        given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Middleware for the admin routes.
pub async fn require_admin(
    State(auth): State<AdminAuth>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if auth.allows(peer, request.headers()) {
        return next.run(request).await;
    }
    metrics::counter!("storelink_api_refused_total", "reason" => "admin_token").increment(1);
    tracing::info!(%peer, path = %request.uri().path(), "refused a request without the admin token");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"storelink\"")],
        axum::Json(serde_json::json!({
            "error": "this endpoint needs the admin token (Authorization: Bearer …) from anywhere but the gateway itself"
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_token_opens_its_lane_only() {
        let auth = LaneAuth::new(b"0123456789abcdef0123456789abcdef");
        let t3 = auth.token("3");
        assert_eq!(t3.len(), 2 * LANE_TOKEN_BYTES);
        assert!(auth.check("3", &t3));
        assert!(!auth.check("4", &t3));
        assert!(!auth.check("3", &t3[..30]));
        assert!(!auth.check("3", "zz"));
        assert!(!auth.check("3", ""));
        let other = LaneAuth::new(b"another secret, another store!!");
        assert!(!other.check("3", &t3));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=1; storelink_lane=abcd; b=2".parse().unwrap(),
        );
        assert_eq!(lane_token(None, &headers).as_deref(), Some("abcd"));
        assert_eq!(lane_token(Some("q"), &headers).as_deref(), Some("q"));
        assert_eq!(lane_token(None, &HeaderMap::new()), None);
    }

    #[test]
    fn admin_needs_the_token_off_the_gateway() {
        let token = Secret::new("a-long-admin-token-1234");
        let auth = AdminAuth::new(Some(&token));
        let lan: SocketAddr = "192.168.1.20:5000".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut headers = HeaderMap::new();
        assert!(auth.allows(lo, &headers));
        assert!(!auth.allows(lan, &headers));
        headers.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert!(!auth.allows(lan, &headers));
        headers.insert(
            header::AUTHORIZATION,
            "Bearer a-long-admin-token-1234".parse().unwrap(),
        );
        assert!(auth.allows(lan, &headers));
        assert!(!AdminAuth::new(None).allows(lan, &headers));
    }
}
