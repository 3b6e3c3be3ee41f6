//! The one HTTP client of the command line: GETs from the running agent's local API
//! (`cashier.bind`), for `status`, `lanes`, `profiles` and `offers`, and from a bridge's
//! `http.bind` for `bridge status`.

use std::time::Duration;

use super::{Failure, block_on};

/// Where the agent's local API listens unless `--url` says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// GETs `path` from the agent at `url`, with the admin token when given, and parses the JSON
/// answer. A refused connection says to check that the agent runs; an error status carries
/// the agent's own message.
pub fn get(
    url: &str,
    path: &str,
    query: &[(&str, String)],
    admin_token: Option<&str>,
    timeout: Duration,
) -> Result<serde_json::Value, Failure> {
    let url = format!("{}{path}", url.trim_end_matches('/'));
    block_on(|stop| async move {
        // `block_on` took over Ctrl-C; a question to the agent must still end on it.
        tokio::select! {
            answer = ask(&url, query, admin_token, timeout) => answer,
            _ = stop.cancelled() => Err(format!("{url}: interrupted").into()),
        }
    })
}

async fn ask(
    url: &str,
    query: &[(&str, String)],
    token: Option<&str>,
    timeout: Duration,
) -> Result<serde_json::Value, Failure> {
    let mut request = reqwest::Client::builder()
        .timeout(timeout.max(Duration::from_secs(1)))
        .build()?
        .get(url)
        .query(query);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("{url}: {e} (is it running, at this address?)"))?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        return Err(format!("{url}: {status}: {}", body.trim()).into());
    }
    Ok(serde_json::from_str(&body)?)
}
