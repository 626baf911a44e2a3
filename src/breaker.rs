//! A circuit breaker for remote dependencies (embedding providers).
//!
//! [`CircuitBreaker`] counts consecutive transient failures of calls to one dependency:
//!
//! - **closed**: calls go through; a success resets the count; `failure_threshold`
//!   consecutive transient failures open the breaker;
//! - **open**: calls fail fast (nothing is sent) until `open_for` has passed since it opened;
//! - **half-open**: the first call after that is a *probe* (other calls keep failing fast while
//!   it runs); its success closes the breaker, its failure opens it for another `open_for`.
//!
//! Every transition is logged (`warn` when opening, `info` otherwise) and published on a
//! [`tokio::sync::watch`] channel ([`CircuitBreaker::subscribe`]), so a worker can stop taking
//! messages while the breaker is open and resume when it closes ([`CircuitBreaker::ready`]).
//!
//! Time is read from [`tokio::time::Instant`], so tests can drive the breaker with a paused
//! clock (`tokio::time::pause` / `advance`) instead of sleeping.

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::telemetry::emit;
use crate::telemetry::events::{BreakerChanged, BreakerCreated};

/// Where a [`CircuitBreaker`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls fail fast until the probe time.
    Open,
    /// One probe call is allowed (or running); its outcome closes or re-opens the breaker.
    HalfOpen,
}

impl BreakerState {
    /// The stable lowercase name used in logs and metrics: `closed`, `open`, `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a [`CircuitBreaker`] opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive transient failures that open the breaker (0 is treated as 1).
    pub failure_threshold: u32,
    /// How long the breaker stays open before a probe call is let through.
    pub open_for: Duration,
}

/// Consecutive failures that open a breaker by default.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// How long a breaker stays open by default, in milliseconds.
pub const DEFAULT_OPEN_FOR_MS: u64 = 30_000;

impl Default for BreakerConfig {
    /// [`DEFAULT_FAILURE_THRESHOLD`] consecutive failures, [`DEFAULT_OPEN_FOR_MS`] open.
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            open_for: Duration::from_millis(DEFAULT_OPEN_FOR_MS),
        }
    }
}

/// A call was refused because the breaker is open (or half-open with its probe running).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker is {state}; next probe in {retry_in:?}")]
pub struct BreakerOpen {
    /// The breaker's state when the call was refused.
    pub state: BreakerState,
    /// Time until a probe may be let through (zero while a probe is running).
    pub retry_in: Duration,
}

/// A circuit breaker guarding one dependency. Share it by reference or in an `Arc`.
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    state: watch::Sender<BreakerState>,
}

struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    /// When the breaker (last) opened.
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("CircuitBreaker")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("state", &inner.state)
            .field("consecutive_failures", &inner.consecutive_failures)
            .finish()
    }
}

impl CircuitBreaker {
    /// A closed breaker; `name` identifies the dependency in logs.
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Self {
        let config = BreakerConfig {
            failure_threshold: config.failure_threshold.max(1),
            ..config
        };
        let name = name.into();
        emit(BreakerCreated { breaker: &name });
        CircuitBreaker {
            name,
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                opened_at: None,
                probe_in_flight: false,
            }),
            state: watch::channel(BreakerState::Closed).0,
        }
    }

    /// The dependency's name, as given to [`CircuitBreaker::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration in force.
    pub fn config(&self) -> BreakerConfig {
        self.config
    }

    /// The current state. An open breaker whose interval has passed still reports
    /// [`BreakerState::Open`] until the next call (the probe) moves it to half-open.
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Consecutive transient failures counted so far (reset by a success).
    pub fn consecutive_failures(&self) -> u32 {
        self.lock().consecutive_failures
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.state.subscribe()
    }

    /// Waits until a call would be let through: returns at once while closed; while open,
    /// sleeps until the probe time; while a probe runs, waits for its outcome.
    ///
    /// A worker calls this before taking the next message, so that during an outage
    /// messages stay queued instead of failing one after another.
    pub async fn ready(&self) {
        let mut changes = self.subscribe();
        loop {
            // Mark the current value seen before reading the state, so that a change made
            // after the read wakes the wait below.
            changes.borrow_and_update();
            let wait = {
                let inner = self.lock();
                match inner.state {
                    BreakerState::Closed => return,
                    BreakerState::HalfOpen if !inner.probe_in_flight => return,
                    BreakerState::HalfOpen => None,
                    BreakerState::Open => {
                        let due = self.probe_due(&inner);
                        if due <= Instant::now() {
                            return;
                        }
                        Some(due)
                    }
                }
            };
            match wait {
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = changes.changed() => {}
                    }
                }
                None => {
                    // The sender lives in `self`, so this cannot fail while we borrow it.
                    let _ = changes.changed().await;
                }
            }
        }
    }

    /// Asks to make one call. `Ok` carries a [`Permit`] on which the caller reports the
    /// outcome; `Err` means fail fast without calling the dependency.
    ///
    /// # Errors
    ///
    /// [`BreakerOpen`] while the breaker is open (and the probe time has not come) or while
    /// another call is the half-open probe.
    pub fn try_acquire(&self) -> Result<Permit<'_>, BreakerOpen> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => Ok(Permit::new(self, false)),
            BreakerState::Open => {
                let due = self.probe_due(&inner);
                if now < due {
                    return Err(BreakerOpen {
                        state: BreakerState::Open,
                        retry_in: due - now,
                    });
                }
                inner.probe_in_flight = true;
                self.transition(&mut inner, BreakerState::HalfOpen);
                Ok(Permit::new(self, true))
            }
            BreakerState::HalfOpen => {
                if inner.probe_in_flight {
                    return Err(BreakerOpen {
                        state: BreakerState::HalfOpen,
                        retry_in: Duration::ZERO,
                    });
                }
                inner.probe_in_flight = true;
                Ok(Permit::new(self, true))
            }
        }
    }

    /// Time until a probe may be let through: zero unless open.
    pub fn retry_in(&self) -> Duration {
        let inner = self.lock();
        match inner.state {
            BreakerState::Open => self
                .probe_due(&inner)
                .saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }

    fn probe_due(&self, inner: &Inner) -> Instant {
        inner.opened_at.unwrap_or_else(Instant::now) + self.config.open_for
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent under a panic (every update is a few plain stores).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn on_success(&self, probe: bool) {
        let mut inner = self.lock();
        if probe {
            inner.probe_in_flight = false;
        }
        match inner.state {
            BreakerState::Closed => inner.consecutive_failures = 0,
            BreakerState::HalfOpen if probe => {
                inner.consecutive_failures = 0;
                inner.opened_at = None;
                self.transition(&mut inner, BreakerState::Closed);
            }
            // A call that started before the breaker opened proves little: wait for the probe.
            BreakerState::HalfOpen | BreakerState::Open => {}
        }
    }

    fn on_failure(&self, probe: bool) {
        let mut inner = self.lock();
        if probe {
            inner.probe_in_flight = false;
        }
        match inner.state {
            BreakerState::Closed => {
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                if inner.consecutive_failures >= self.config.failure_threshold {
                    inner.opened_at = Some(Instant::now());
                    self.transition(&mut inner, BreakerState::Open);
                }
            }
            BreakerState::HalfOpen if probe => {
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                inner.opened_at = Some(Instant::now());
                self.transition(&mut inner, BreakerState::Open);
            }
            BreakerState::HalfOpen | BreakerState::Open => {}
        }
    }

    /// A probe permit dropped without an outcome (its caller gave up): let another call probe.
    fn on_abandoned(&self, probe: bool) {
        if probe {
            let mut inner = self.lock();
            inner.probe_in_flight = false;
            // Wake `ready` waiters: a probe slot is free again.
            self.state.send_replace(inner.state);
        }
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        let from = inner.state;
        inner.state = to;
        emit(BreakerChanged {
            breaker: &self.name,
            from,
            to,
            consecutive_failures: inner.consecutive_failures,
            open_for: self.config.open_for,
        });
        self.state.send_replace(to);
    }
}

/// Leave to make one call, from [`CircuitBreaker::try_acquire`]. Report the outcome with
/// [`Permit::success`] or [`Permit::failure`]; dropping it without either (the call was
/// cancelled, or failed in a way that says nothing about the dependency's health) counts as
/// neither.
#[must_use = "report the call's outcome with success() or failure()"]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl<'a> Permit<'a> {
    fn new(breaker: &'a CircuitBreaker, probe: bool) -> Self {
        Permit {
            breaker,
            probe,
            reported: false,
        }
    }

    /// True if this call is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The dependency answered (a permanent error such as "bad request" counts too: the
    /// dependency is up).
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.on_success(self.probe);
    }

    /// The call failed transiently (timeout, connection error, 5xx, rate limit).
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.on_failure(self.probe);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.on_abandoned(self.probe);
        }
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("breaker", &self.breaker.name)
            .field("probe", &self.probe)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(
            "test",
            BreakerConfig {
                failure_threshold: threshold,
                open_for: Duration::from_millis(open_ms),
            },
        )
    }

    fn fail(b: &CircuitBreaker) {
        b.try_acquire().expect("let through").failure();
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_consecutive_failures() {
        let b = breaker(3, 1000);
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 2);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        let refused = b.try_acquire().expect_err("fails fast");
        assert_eq!(refused.state, BreakerState::Open);
        assert_eq!(refused.retry_in, Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let b = breaker(2, 1000);
        fail(&b);
        b.try_acquire().expect("closed").success();
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_after_interval_closes_on_success() {
        let b = breaker(1, 1000);
        let mut states = b.subscribe();
        fail(&b);
        assert_eq!(*states.borrow_and_update(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(
            b.try_acquire().expect_err("still open").retry_in,
            Duration::from_millis(1)
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = b.try_acquire().expect("probe");
        assert!(probe.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(*states.borrow_and_update(), BreakerState::HalfOpen);
        // Only one probe at a time.
        let refused = b.try_acquire().expect_err("probe running");
        assert_eq!(refused.state, BreakerState::HalfOpen);
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(*states.borrow_and_update(), BreakerState::Closed);
        assert!(!b.try_acquire().expect("closed").is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_for_a_full_interval() {
        let b = breaker(1, 1000);
        fail(&b);
        tokio::time::advance(Duration::from_millis(1500)).await;
        b.try_acquire().expect("probe").failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.retry_in(), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_probe_frees_the_slot() {
        let b = breaker(1, 10);
        fail(&b);
        tokio::time::advance(Duration::from_millis(10)).await;
        drop(b.try_acquire().expect("probe"));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.try_acquire().expect("another probe").success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn late_outcomes_of_calls_started_before_opening_are_ignored() {
        let b = breaker(1, 1000);
        let early = b.try_acquire().expect("closed");
        fail(&b);
        early.success();
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn ready_waits_for_the_probe_time_then_for_the_probe() {
        let b = std::sync::Arc::new(breaker(1, 1000));
        b.ready().await; // closed: immediate
        fail(&b);
        let start = Instant::now();
        b.ready().await; // paused clock auto-advances to the probe time
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        let probe = b.try_acquire().expect("probe");
        let waiter = {
            let b = std::sync::Arc::clone(&b);
            tokio::spawn(async move { b.ready().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "waits while the probe runs");
        probe.success();
        waiter
            .await
            .expect("ready after the probe closed the breaker");
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
