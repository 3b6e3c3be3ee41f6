//! `tcp-listen`: registers connect to the agent and send frames; each frame gets one reply
//! line, `ok <id>` or `err <reason>`, in order, once its outcome is durable.
//!
//! Registers may pipeline: many frames can be in flight on one connection, and replies come
//! back in the same order. Connections are limited by a semaphore, as in mini-redis.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::framing::LineFramer;
use super::{Pending, RegisterContext, SourceError};
use crate::config::parse_socket_addr;
use crate::supervisor::Component;

/// Connections per register listener. A register needs one; a POS server a few.
pub const MAX_CONNECTIONS: usize = 64;

/// Replies a connection may owe before it stops reading (backpressure on a pipelining client).
pub const PIPELINE_DEPTH: usize = 1024;

pub async fn listen(
    bind: &str,
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
    tracing::info!(register = %ctx.register, %local, "register listener ready");
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
                tracing::warn!(register = %ctx.register, error = %e, "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let span = tracing::info_span!(
            "register",
            store = %ctx.store,
            register = %ctx.register,
            lane = ctx.lane.as_deref().unwrap_or("-"),
            %peer
        );
        let ctx = ctx.clone();
        let token = token.clone();
        connections.spawn(
            async move {
                serve(stream, peer, ctx, token).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: RegisterContext,
    token: CancellationToken,
) {
    tracing::info!("register connected");
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, LineFramer::new(ctx.max_frame));
    let (owed_tx, mut owed_rx) = mpsc::channel::<Pending>(PIPELINE_DEPTH);

    let reader = async {
        loop {
            let next = tokio::select! {
                f = frames.next() => f,
                _ = token.cancelled() => break,
            };
            match next {
                Some(Ok(frame)) => {
                    let pending = ctx.submit(frame).await;
                    if owed_tx.send(pending).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "register connection read failed");
                    break;
                }
                None => break,
            }
        }
        drop(owed_tx);
    };

    let writer = async {
        let mut out = BufWriter::new(write);
        let mut broken = false;
        while let Some(pending) = owed_rx.recv().await {
            let mut line = pending.reply_line().await;
            line.push('\n');
            // Keep resolving after the peer is gone: every frame still gets its durable outcome.
            if !broken && out.write_all(line.as_bytes()).await.is_err() {
                broken = true;
            }
            if !broken && owed_rx.is_empty() && out.flush().await.is_err() {
                broken = true;
            }
        }
        if !broken {
            let _ = out.flush().await;
            let _ = out.shutdown().await;
        }
    };

    tokio::join!(reader, writer);
    tracing::info!(%peer, "register disconnected");
}
