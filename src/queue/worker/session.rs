//! One broker session of a worker: a connection, its consume and publish channels, a
//! consumer on each lane's queue and the message tasks started from them. The session ends when
//! it is asked to stop (in-flight messages finish within the grace period, the rest is
//! handed back), when the queues are idle with `--exit-when-idle`, or when the broker side
//! is lost (the worker then reconnects).
//!
//! A lost session does not abort its running tasks: each finishes its store writes (its
//! ack then fails and the broker redelivers the message, which is idempotent). An aborted
//! task could leave a request on its way to the store that lands after the redelivered
//! copy has settled the document — a "ghost" write of an older revision that nobody would
//! clean up. Only tasks still running after the grace period are aborted.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::{Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::delivery::{give_up_on_panic, park};
use super::{Feed, RunOptions, Subscription, Worker};
use crate::breaker::{BreakerState, CircuitBreaker};
use crate::embed::Embedder;
use crate::lane::Lane;
use crate::queue::QueueError;
use crate::queue::budget::{ByteBudget, MessageFootprint};
use crate::queue::publish::Publisher;
use crate::store::VectorStore;
use crate::telemetry::emit;
use crate::telemetry::events::{
    BreakerProbeAllowed, BrokerClosed, ConsumerPaused, InFlight, MessageParked, MessageTaskFailed,
    PrefetchedHandedBack, QueuesChecked, SessionLostTasksEnded, SettleFailed, ShutdownGraceExpired,
    ShutdownRequested,
};

/// How often the session checks that its connection and channels are still open.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// How often an idle worker with `--exit-when-idle` checks the queues.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// How long a stopping worker waits for the broker's cancel-ok while handing back
/// prefetched deliveries.
const HAND_BACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How a session ended.
pub(super) enum SessionEnd {
    /// Asked to stop, or idle with `--exit-when-idle`: the worker exits.
    Stopped,
    /// The broker side was lost: the worker reconnects.
    Lost(QueueError),
}

/// The state of one session (see the module documentation).
pub(super) struct Session<'w, E, S> {
    worker: &'w Worker<E, S>,
    conn: Connection,
    consume: Channel,
    publish: Publisher,
    breaker: Option<&'w CircuitBreaker>,
    /// Breaker state changes (`None` without a breaker, or once the breaker is gone).
    changes: Option<watch::Receiver<BreakerState>>,
    budget: ByteBudget,
    tasks: JoinSet<Result<(), QueueError>>,
    /// The delivery of every running task and its lane, so that past the shutdown grace
    /// period an unfinished one can be handed back without touching its delivery count.
    held: HashMap<tokio::task::Id, (Arc<Delivery>, Lane)>,
    /// Running tasks of bulk-lane deliveries.
    bulk_running: usize,
    /// The consumer of each lane (indexed by [`lane_index`]).
    subs: [Option<Subscription>; 2],
    last_activity: Instant,
    /// Consecutive idle checks that found the queues empty. One is not enough: a delivery
    /// may sit in the consumer's buffer (unacked, so not counted as ready) when the tick
    /// wins the `select!`, and a message moving from a retry tier back to the main queue
    /// is briefly in neither.
    empty_checks: u32,
    /// The breaker lets a probe through (its open interval has passed).
    probe_ready: bool,
}

impl<'w, E: Embedder, S: VectorStore> Session<'w, E, S> {
    /// Connects (declaring the topology) and returns the session, not consuming yet.
    ///
    /// Fails if no broker URL can be reached or the topology cannot be declared.
    pub(super) async fn open(worker: &'w Worker<E, S>) -> Result<Self, QueueError> {
        let (conn, consume, publish) = worker.connect().await?;
        worker.set_connected(true);
        let breaker = worker.pipeline.embedder().breaker();
        let budget = ByteBudget::new(worker.config.worker.max_inflight_bytes).with_footprint(
            MessageFootprint::new(
                &worker.config,
                worker.pipeline.embedder().fingerprint().dims,
            ),
        );
        Ok(Session {
            worker,
            conn,
            consume,
            publish,
            breaker,
            changes: breaker.map(CircuitBreaker::subscribe),
            budget,
            tasks: JoinSet::new(),
            held: HashMap::new(),
            bulk_running: 0,
            subs: [None, None],
            last_activity: Instant::now(),
            empty_checks: 0,
            probe_ready: false,
        })
    }

    /// Consumes until stopped, idle or lost (see the module documentation), then finishes or
    /// abandons the running tasks and closes the connection.
    pub(super) async fn run(
        mut self,
        options: &RunOptions,
        mut shutdown: Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> SessionEnd {
        let mut idle_tick = tokio::time::interval(IDLE_CHECK);
        // A closed channel or connection must end the session even while nothing polls the
        // consumer (breaker open, concurrency full): the broker may have closed the channel
        // (consumer_timeout, an operator) and the worker would otherwise sit without a
        // consumer forever.
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        let end = loop {
            let state = self.observe();
            let gated = state.filter(|s| *s != BreakerState::Closed);
            if let Err(e) = self.adjust_feed(state, gated.is_some()).await {
                break SessionEnd::Lost(e);
            }
            let (take_live, take_bulk) = self.can_take();
            let poll = |sub: &Option<Subscription>, can_take: bool| {
                sub.as_ref().is_some_and(|s| s.cancelling || can_take)
            };
            let poll_live = poll(&self.subs[0], take_live);
            let poll_bulk = poll(&self.subs[1], take_bulk);
            let breaker = self.breaker;
            let (tasks, changes) = (&mut self.tasks, &mut self.changes);
            let [live_sub, bulk_sub] = &mut self.subs;
            tokio::select! {
                _ = shutdown.as_mut() => {
                    emit(ShutdownRequested);
                    break SessionEnd::Stopped;
                }
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    if let Some(end) = self.task_done(joined) {
                        break end;
                    }
                }
                () = async {
                    if let Some(b) = breaker {
                        b.ready().await;
                    }
                }, if gated.is_some() && !self.probe_ready => {
                    self.probe_ready = true;
                    emit(BreakerProbeAllowed);
                }
                changed = async {
                    match changes.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if !changed {
                        self.changes = None;
                    }
                    // Re-evaluate from the new state: a probe that failed re-opens the
                    // breaker and the next probe waits for its interval again.
                    self.probe_ready = false;
                }
                // Each lane's consumer is polled while its lane may take a delivery
                // (`can_take`): bulk deliveries never take the slots kept for live ones.
                next = next_delivery(live_sub), if poll_live => {
                    if let Some(end) = self.delivered(Lane::Live, next).await {
                        break end;
                    }
                }
                next = next_delivery(bulk_sub), if poll_bulk => {
                    if let Some(end) = self.delivered(Lane::Bulk, next).await {
                        break end;
                    }
                }
                _ = liveness.tick() => {
                    if let Some(what) = closed_part(&self.conn, &self.consume, self.publish.channel()) {
                        emit(BrokerClosed { what });
                        break SessionEnd::Lost(QueueError::Closed { what: what.into() });
                    }
                }
                _ = idle_tick.tick(), if options.exit_when_idle && tasks.is_empty() => {
                    if let Some(end) = self.idle_check(options).await {
                        break end;
                    }
                }
            }
        };
        self.close(end).await
    }

    /// Whether a live and whether a bulk delivery may be started now: a live one while fewer
    /// than `worker.concurrency` messages run and the in-flight bytes are under
    /// `worker.max_inflight_bytes`; a bulk one, in addition, while fewer than
    /// `worker.bulk_concurrency` bulk messages run and the in-flight bytes are under the
    /// bulk share of the budget (`bulk_concurrency / concurrency` of it).
    fn can_take(&self) -> (bool, bool) {
        let worker = &self.worker.config.worker;
        let live = self.tasks.len() < worker.concurrency && self.budget.has_room();
        let slots = self.worker.bulk_slots();
        let bulk_bytes = (worker.max_inflight_bytes / worker.concurrency.max(1))
            .saturating_mul(slots)
            .max(1);
        let bulk = live && self.bulk_running < slots && self.budget.in_flight() < bulk_bytes;
        (live, bulk)
    }

    /// Publishes the breaker and in-flight state (health, metrics); returns the breaker's
    /// state (`None` without a breaker).
    fn observe(&self) -> Option<BreakerState> {
        let state = self.breaker.map(CircuitBreaker::state);
        if let (Some(b), Some(h)) = (self.breaker, &self.worker.health) {
            h.set_breaker_open(b.name(), state == Some(BreakerState::Open));
        }
        emit(InFlight {
            messages: self.tasks.len(),
            bytes: self.budget.in_flight(),
        });
        state
    }

    /// Keeps the consumers the breaker state calls for, on each lane: the full feed while it
    /// is closed, none while it is open (the consumers are cancelled and what they prefetched
    /// is parked), a probe feed of one message once the breaker lets a probe through.
    ///
    /// Fails if the broker refuses the cancel or the new consumer.
    async fn adjust_feed(
        &mut self,
        state: Option<BreakerState>,
        gated: bool,
    ) -> Result<(), QueueError> {
        let wanted = if !gated {
            Some(Feed::Full)
        } else if self.probe_ready {
            Some(Feed::Probe)
        } else {
            None
        };
        for lane in Lane::ALL {
            match &mut self.subs[lane_index(lane)] {
                Some(s) if !s.cancelling && Some(s.feed) != wanted => {
                    self.consume
                        .basic_cancel(s.tag.as_str().into(), BasicCancelOptions::default())
                        .await?;
                    s.cancelling = true;
                    self.worker.set_consuming(false);
                    emit(ConsumerPaused {
                        breaker: state.map_or("none", BreakerState::as_str),
                    });
                }
                None => {
                    if let Some(feed) = wanted {
                        let sub = self.worker.subscribe(&self.consume, lane, feed).await?;
                        self.subs[lane_index(lane)] = Some(sub);
                        if self.subs.iter().all(Option::is_some) {
                            self.worker.set_consuming(true);
                        }
                    }
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Forgets the running task `id` (its delivery and lane).
    fn forget(&mut self, id: tokio::task::Id) {
        if let Some((_, Lane::Bulk)) = self.held.remove(&id) {
            self.bulk_running = self.bulk_running.saturating_sub(1);
        }
    }

    /// A message task ended; `Some` ends the session when its delivery could not be settled.
    fn task_done(
        &mut self,
        joined: Result<(tokio::task::Id, Result<(), QueueError>), tokio::task::JoinError>,
    ) -> Option<SessionEnd> {
        self.last_activity = Instant::now();
        self.empty_checks = 0;
        match joined {
            Ok((id, Ok(()))) => {
                self.forget(id);
                None
            }
            Ok((id, Err(e))) => {
                self.forget(id);
                emit(SettleFailed {
                    error: &e,
                    consequence: "the channel is unusable; reconnecting",
                });
                Some(SessionEnd::Lost(e))
            }
            Err(e) => {
                self.forget(e.id());
                emit(MessageTaskFailed { error: &e });
                None
            }
        }
    }

    /// `lane`'s consumer yielded `next`: a delivery is started (or parked while the
    /// consumer is being cancelled); `Some` ends the session when the consumer or channel
    /// failed.
    async fn delivered(
        &mut self,
        lane: Lane,
        next: Option<Result<Delivery, lapin::Error>>,
    ) -> Option<SessionEnd> {
        let sub = &mut self.subs[lane_index(lane)];
        let cancelling = sub.as_ref().is_some_and(|s| s.cancelling);
        match next {
            Some(Ok(delivery)) if cancelling => {
                // Prefetched but not started: hand it back without a redelivery (see `park`).
                if let Err(e) = park(&self.publish, &self.worker.topology, lane, &delivery).await {
                    return Some(SessionEnd::Lost(e));
                }
                emit(MessageParked);
            }
            Some(Ok(delivery)) => self.start(delivery, lane),
            Some(Err(e)) => return Some(SessionEnd::Lost(QueueError::Amqp(e))),
            None if cancelling => *sub = None,
            None => {
                return Some(SessionEnd::Lost(QueueError::ConsumerCancelled {
                    consumer_tag: sub.as_ref().map(|s| s.tag.clone()).unwrap_or_default(),
                }));
            }
        }
        None
    }

    /// Starts the task that processes and settles `delivery` of `lane`, within the byte
    /// budget.
    fn start(&mut self, delivery: Delivery, lane: Lane) {
        self.last_activity = Instant::now();
        self.empty_checks = 0;
        let delivery = Arc::new(delivery);
        let admitted = self.budget.admit_body(&delivery.data);
        let work = self
            .worker
            .handle(Arc::clone(&delivery), self.publish.clone(), lane);
        let task = give_up_on_panic(
            work,
            Arc::clone(&delivery),
            self.publish.clone(),
            self.worker.topology.clone(),
            lane,
            self.worker.config.broker.delivery_limit,
        );
        let spawned = self.tasks.spawn(async move {
            let _admitted = admitted;
            task.await
        });
        if lane == Lane::Bulk {
            self.bulk_running += 1;
        }
        self.held.insert(spawned.id(), (delivery, lane));
    }

    /// With `--exit-when-idle`: after the idle grace, checks the queues; `Some` ends the
    /// session once two checks in a row found them empty (or the check failed).
    async fn idle_check(&mut self, options: &RunOptions) -> Option<SessionEnd> {
        if self.last_activity.elapsed() < options.idle_grace {
            return None;
        }
        match self.worker.topology.pending(self.publish.channel()).await {
            Ok(0) if self.empty_checks >= 1 => {
                emit(QueuesChecked { pending: 0 });
                Some(SessionEnd::Stopped)
            }
            Ok(0) => {
                self.empty_checks += 1;
                None
            }
            Ok(pending) => {
                self.empty_checks = 0;
                emit(QueuesChecked { pending });
                None
            }
            Err(e) => Some(SessionEnd::Lost(e)),
        }
    }

    /// Ends the session: on a stop, hands back what was prefetched and lets the running
    /// tasks finish within the grace period (handing back the unfinished ones); on a loss,
    /// lets them finish within the grace period too (their deliveries return with the
    /// channel; see the module documentation). Closes the channels and the connection.
    async fn close(mut self, end: SessionEnd) -> SessionEnd {
        self.worker.set_connected(false);
        self.worker.set_consuming(false);
        match &end {
            SessionEnd::Stopped => {
                for slot in 0..self.subs.len() {
                    if let Some(sub) = self.subs[slot].take() {
                        self.hand_back_prefetched(sub).await;
                    }
                }
                self.finish_tasks(true).await;
            }
            SessionEnd::Lost(_) => self.finish_tasks(false).await,
        }
        crate::queue::close_channel(&self.consume, "bye").await;
        crate::queue::close_channel(self.publish.channel(), "bye").await;
        crate::queue::close_connection(&self.conn, "bye").await;
        end
    }

    /// Waits for the running tasks for at most the shutdown grace period, then aborts the
    /// rest; on a stop (`hand_back`) their deliveries are handed back to the queue (see
    /// [`park`]), on a loss they return with the closed channel.
    async fn finish_tasks(&mut self, hand_back: bool) {
        let grace = self.worker.config.shutdown_grace();
        let running = self.tasks.len();
        let (tasks, held) = (&mut self.tasks, &mut self.held);
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = tasks.join_next_with_id().await {
                match joined {
                    Ok((id, result)) => {
                        held.remove(&id);
                        // After a loss every ack fails: that is expected, not news.
                        if let Err(e) = result
                            && hand_back
                        {
                            emit(SettleFailed {
                                error: &e,
                                consequence: "left unacked during shutdown; redelivered by the broker",
                            });
                        }
                    }
                    Err(e) => {
                        held.remove(&e.id());
                    }
                }
            }
        })
        .await;
        let aborted = if drained.is_ok() {
            0
        } else {
            self.tasks.abort_all();
            let mut aborted = 0usize;
            while let Some(joined) = self.tasks.join_next_with_id().await {
                aborted += 1;
                if let Ok((id, _)) = joined {
                    self.held.remove(&id);
                }
            }
            aborted
        };
        if !hand_back {
            if running > 0 {
                emit(SessionLostTasksEnded {
                    finished: running.saturating_sub(aborted),
                    aborted,
                });
            }
            self.held.clear();
            return;
        }
        if drained.is_ok() {
            return;
        }
        let mut handed_back = 0usize;
        for (delivery, lane) in self.held.values() {
            // A task stopped before settling its delivery: hand it back (a copy at the
            // queue's tail, then ack) so the shutdown does not count as a failed delivery.
            // Processing is idempotent, so a task that had already written its document
            // costs only a repeat.
            if delivery.acker.usable()
                && park(&self.publish, &self.worker.topology, *lane, delivery)
                    .await
                    .is_ok()
            {
                handed_back += 1;
            }
        }
        emit(ShutdownGraceExpired {
            unfinished: self.held.len(),
            handed_back,
        });
    }

    /// Cancels `sub` (unless already cancelling) and hands back every delivery it had
    /// prefetched (see [`park`]), waiting at most [`HAND_BACK_TIMEOUT`] for the broker's
    /// cancel-ok. Whatever cannot be handed back stays unacked and returns to the queue when
    /// the channel closes.
    async fn hand_back_prefetched(&self, mut sub: Subscription) {
        let drained = tokio::time::timeout(HAND_BACK_TIMEOUT, async {
            if !sub.cancelling
                && self
                    .consume
                    .basic_cancel(sub.tag.as_str().into(), BasicCancelOptions::default())
                    .await
                    .is_err()
            {
                return 0usize;
            }
            let mut handed_back = 0usize;
            while let Some(Ok(delivery)) = sub.stream.next().await {
                if park(&self.publish, &self.worker.topology, sub.lane, &delivery)
                    .await
                    .is_err()
                {
                    break;
                }
                handed_back += 1;
            }
            handed_back
        })
        .await;
        emit(match drained {
            Ok(count) => PrefetchedHandedBack {
                count,
                confirmed: true,
            },
            Err(_) => PrefetchedHandedBack {
                count: 0,
                confirmed: false,
            },
        });
    }
}

/// The index of `lane`'s consumer in [`Session::subs`].
fn lane_index(lane: Lane) -> usize {
    match lane {
        Lane::Live => 0,
        Lane::Bulk => 1,
    }
}

/// The next delivery of `sub`'s consumer; never completes without a consumer.
async fn next_delivery(sub: &mut Option<Subscription>) -> Option<Result<Delivery, lapin::Error>> {
    match sub.as_mut() {
        Some(s) => s.stream.next().await,
        None => std::future::pending().await,
    }
}

/// Which part of the session the broker has closed, if any.
fn closed_part(conn: &Connection, consume: &Channel, publish: &Channel) -> Option<&'static str> {
    if !conn.status().connected() {
        Some("connection")
    } else if !consume.status().connected() {
        Some("consumer channel")
    } else if !publish.status().connected() {
        Some("publish channel")
    } else {
        None
    }
}
