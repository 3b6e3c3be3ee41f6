//! Network registers.
//!
//! - `tcp-listen`: registers connect to the agent. Each frame gets one reply line, `ok <ids>`
//!   or `err <reason>`, in order, once its outcome is durable. Connections are limited by a
//!   semaphore, as in mini-redis.
//! - `tcp-connect`: the agent connects to a register's or POS server's journal port and
//!   reconnects with backoff when the connection drops. A journal usually replays from where it
//!   likes after a reconnect; transactions already seen are recognised by id and not counted
//!   again, so resuming never duplicates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{RegisterContext, SourceError, pump};
use crate::config::parse_socket_addr;
use crate::supervisor::{Backoff, Component};

/// Connections per register listener. A register needs one; a POS server a few.
pub const MAX_CONNECTIONS: usize = 64;

fn span(ctx: &RegisterContext, peer: &str) -> tracing::Span {
    tracing::info_span!(
        "register",
        store = %ctx.id.store,
        register = %ctx.id.register,
        lane = ctx.id.lane.as_deref().unwrap_or("-"),
        %peer
    )
}

pub async fn listen(
    bind: &str,
    replies: bool,
    ctx: RegisterContext,
    component: Component,
    token: CancellationToken,
) -> Result<(), SourceError> {
    let addr = parse_socket_addr(bind).map_err(SourceError::Address)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SourceError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(register = %ctx.id.register, %local, "register listener ready");
    component.running(Some(format!("listening on {local}")));

    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = token.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = token.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Usually file-descriptor exhaustion; pausing lets connections close.
                tracing::warn!(register = %ctx.id.register, error = %e, "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let span = span(&ctx, &peer.to_string());
        let ctx = ctx.clone();
        let token = token.clone();
        connections.spawn(
            async move {
                serve(stream, peer, replies, &ctx, &token).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Connects to `addr` and reads frames until cancelled, reconnecting with backoff.
pub async fn connect(
    addr: &str,
    replies: bool,
    ctx: RegisterContext,
    component: Component,
    token: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut failing = false;
    let mut short_lived = false;
    loop {
        let attempt = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)) => r,
            _ = token.cancelled() => return,
        };
        match attempt {
            Ok(Ok(stream)) => {
                // No backoff reset here: a peer that accepts and at once resets would
                // otherwise be redialled several times a second. Only a connection that lived
                // a while ends the streak (below).
                failing = false;
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| addr.to_string());
                component.running(Some(format!("connected to {peer}")));
                let span = span(&ctx, &peer);
                let started = tokio::time::Instant::now();
                async {
                    tracing::info!("connected to the register's journal port");
                    let (read, write) = stream.into_split();
                    pump(read, replies.then_some(write), &ctx, &token).await;
                }
                .instrument(span)
                .await;
                if token.is_cancelled() {
                    return;
                }
                component.degraded(format!("{addr}: connection closed; reconnecting"));
                // A connection that lived a while is not a failure streak; a streak of
                // short-lived ones is one warning, then debug.
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                    short_lived = false;
                }
                if short_lived {
                    tracing::debug!(register = %ctx.id.register, %addr, "journal connection closed again at once; reconnecting");
                } else {
                    tracing::warn!(register = %ctx.id.register, %addr, "journal connection closed; reconnecting");
                }
                short_lived = started.elapsed() <= Duration::from_secs(30);
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(register = %ctx.id.register, %addr, error = %e, "cannot reach the register; retrying");
                }
                failing = true;
                component.degraded(format!("{addr}: {e}"));
            }
            Err(_) => {
                failing = true;
                component.degraded(format!("{addr}: connect timed out"));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = token.cancelled() => return,
        }
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    replies: bool,
    ctx: &RegisterContext,
    token: &CancellationToken,
) {
    tracing::info!("register connected");
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    pump(read, replies.then_some(write), ctx, token).await;
    tracing::info!(%peer, "register disconnected");
}
