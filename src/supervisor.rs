//! Task supervision and the status board.
//!
//! Invariants:
//! - Every long-running task is spawned through [`Supervisor::spawn`]. It runs under the one
//!   [`CancellationToken`]; when it fails (returns an error or panics) it is restarted with
//!   exponential backoff and jitter, and its state and last error are recorded on the
//!   [`StatusBoard`]. A failing source never takes the daemon down.
//! - Shutdown is cooperative: cancel the token, then [`Supervisor::shutdown`] waits for every
//!   tracked task, bounded by a deadline.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::SharedClock;

/// The state a component reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentState {
    Starting,
    /// Doing its job.
    Running,
    /// Alive but not doing all of its job (for example, central unreachable).
    Degraded,
    /// Failed and waiting to be restarted.
    Failed,
    Stopped,
}

/// What status shows for one component.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentStatus {
    pub state: ComponentState,
    /// What it is doing, e.g. "listening on 0.0.0.0:5020".
    pub detail: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<Timestamp>,
    pub restarts: u32,
    pub since: Timestamp,
    /// Last time the component did its job successfully (for the uplink: central acknowledged).
    pub last_success_at: Option<Timestamp>,
}

/// Shared view of every component's state, for the status API and logs.
#[derive(Clone)]
pub struct StatusBoard {
    inner: Arc<RwLock<BTreeMap<String, ComponentStatus>>>,
    clock: SharedClock,
}

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusBoard").finish_non_exhaustive()
    }
}

impl StatusBoard {
    pub fn new(clock: SharedClock) -> Self {
        Self {
            inner: Arc::default(),
            clock,
        }
    }

    /// A handle through which one component reports.
    pub fn component(&self, name: impl Into<String>) -> Component {
        let name = name.into();
        let now = self.clock.now();
        self.inner
            .write()
            .expect("status lock")
            .entry(name.clone())
            .or_insert(ComponentStatus {
                state: ComponentState::Starting,
                detail: None,
                last_error: None,
                last_error_at: None,
                restarts: 0,
                since: now,
                last_success_at: None,
            });
        Component {
            board: self.clone(),
            name,
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, ComponentStatus> {
        self.inner.read().expect("status lock").clone()
    }

    pub fn get(&self, name: &str) -> Option<ComponentStatus> {
        self.inner.read().expect("status lock").get(name).cloned()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut ComponentStatus, Timestamp)) {
        let now = self.clock.now();
        if let Some(s) = self.inner.write().expect("status lock").get_mut(name) {
            f(s, now);
        }
    }
}

/// One component's reporting handle.
#[derive(Clone, Debug)]
pub struct Component {
    board: StatusBoard,
    name: String,
}

impl Component {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> Option<ComponentState> {
        self.board.get(&self.name).map(|s| s.state)
    }

    /// Records a successful contact (for example, central acknowledged something).
    pub fn success(&self) {
        self.board
            .update(&self.name, |s, now| s.last_success_at = Some(now));
    }

    pub fn set(&self, state: ComponentState, detail: impl Into<Option<String>>) {
        let detail = detail.into();
        self.board.update(&self.name, |s, now| {
            if s.state != state {
                s.since = now;
            }
            s.state = state;
            s.detail = detail;
        });
    }

    pub fn running(&self, detail: impl Into<Option<String>>) {
        self.set(ComponentState::Running, detail);
    }

    /// Degraded, with the reason recorded as the last error.
    pub fn degraded(&self, reason: impl Display) {
        let reason = reason.to_string();
        self.board.update(&self.name, |s, now| {
            if s.state != ComponentState::Degraded {
                s.since = now;
            }
            s.state = ComponentState::Degraded;
            s.detail = Some(reason.clone());
            s.last_error = Some(reason);
            s.last_error_at = Some(now);
        });
    }

    /// Records an error without changing the state.
    pub fn error(&self, reason: impl Display) {
        let reason = reason.to_string();
        self.board.update(&self.name, |s, now| {
            s.last_error = Some(reason);
            s.last_error_at = Some(now);
        });
    }

    fn failed(&self, reason: String) {
        self.board.update(&self.name, |s, now| {
            s.state = ComponentState::Failed;
            s.since = now;
            s.last_error = Some(reason);
            s.last_error_at = Some(now);
            s.restarts += 1;
        });
    }
}

/// Restart delays: 0.5 s doubling to 60 s, with full jitter so that a fleet of gateways does not
/// reconnect in lockstep after a central outage.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(60))
    }
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay: uniformly random in [ceiling/2, ceiling], where the ceiling doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Owns every task of the daemon.
#[derive(Clone)]
pub struct Supervisor {
    tracker: TaskTracker,
    token: CancellationToken,
    board: StatusBoard,
}

/// A task that ran this long before failing is considered healthy again: its backoff resets.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

impl Supervisor {
    pub fn new(token: CancellationToken, board: StatusBoard) -> Self {
        Self {
            tracker: TaskTracker::new(),
            token,
            board,
        }
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn board(&self) -> &StatusBoard {
        &self.board
    }

    /// Runs `make()` until the token is cancelled, restarting it with backoff whenever it
    /// returns an error, returns early, or panics.
    pub fn spawn<F, Fut, E>(&self, name: impl Into<String>, mut make: F) -> Component
    where
        F: FnMut(Component) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let component = self.board.component(name);
        let handle = component.clone();
        let token = self.token.clone();
        let tracker = self.tracker.clone();
        self.tracker.spawn(async move {
            let mut backoff = Backoff::default();
            loop {
                let started = tokio::time::Instant::now();
                let run = tracker.spawn(make(component.clone()));
                let outcome = match run.await {
                    Ok(Ok(())) if token.is_cancelled() => break,
                    Ok(Ok(())) => "stopped on its own".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(join) if join.is_panic() => format!("panicked: {}", panic_message(join)),
                    Err(join) => format!("was aborted: {join}"),
                };
                if token.is_cancelled() {
                    break;
                }
                if started.elapsed() >= HEALTHY_RUN {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::error!(
                    component = component.name(),
                    error = %outcome,
                    retry_in_ms = delay.as_millis() as u64,
                    "component failed; restarting"
                );
                metrics::counter!("storelink_component_restarts_total", "component" => component.name().to_string())
                    .increment(1);
                component.failed(outcome);
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            component.set(ComponentState::Stopped, None);
        });
        handle
    }

    /// Runs a task once, tracked for shutdown but never restarted.
    pub fn spawn_once<Fut>(&self, fut: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(fut);
    }

    /// Waits for every task to finish after the token was cancelled. Returns false when the
    /// deadline passed first.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

fn panic_message(join: tokio::task::JoinError) -> String {
    let payload = join.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[7] >= Duration::from_millis(500) && d[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn failing_and_panicking_tasks_are_restarted_and_recorded() {
        let board = StatusBoard::new(crate::clock::system());
        let token = CancellationToken::new();
        let sup = Supervisor::new(token.clone(), board.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.spawn("flaky", move |component: Component| {
            let r = r.clone();
            let token = token.clone();
            async move {
                let n = r.fetch_add(1, Ordering::SeqCst);
                match n {
                    0 => Err("boom".to_string()),
                    1 => panic!("kaboom"),
                    _ => {
                        component.running(Some("fine now".to_string()));
                        token.cancelled().await;
                        Ok(())
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        let s = board.get("flaky").unwrap();
        assert_eq!(s.state, ComponentState::Running);
        assert_eq!(s.restarts, 2);
        assert!(s.last_error.unwrap().contains("kaboom"));
        assert!(sup.shutdown(Duration::from_secs(1)).await);
        assert_eq!(board.get("flaky").unwrap().state, ComponentState::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_reports_a_task_that_ignores_cancellation() {
        let sup = Supervisor::new(
            CancellationToken::new(),
            StatusBoard::new(crate::clock::system()),
        );
        sup.spawn("stubborn", |_| std::future::pending::<Result<(), String>>());
        assert!(!sup.shutdown(Duration::from_secs(1)).await);
    }
}
