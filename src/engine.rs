//! The send loop: claims recipients from the store (one at a time under
//! limits, a few at once unthrottled), sends through a [`Transport`] on
//! `connections` workers, and records each outcome as it happens. It never prints or exits; it reports [`Event`]s and returns how
//! the run ended, and the command layer decides what the user sees.
//!
//! With several accounts (SPEC §6b) each account is a [`Lane`] with its own
//! workers, transport and windows, all claiming from the same campaign:
//! whichever account's slot comes first takes the next recipient, which is
//! how each message goes through the account that can send it soonest. A
//! lane whose login is refused, whose messages trip the circuit breaker, or
//! that must wait under `--no-wait`, is set aside and the others carry on;
//! the run ends when nothing is left or no lane is.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{mpsc, watch, Mutex, Notify};

use crate::campaign::RetryConfig;
use crate::domains::{DomainPacer, Rate};
use crate::limits::Window;
use crate::personalize::Pipeline;
use crate::reply::{Origin, Pause, Reply, ReplyClass};
use crate::schedule::{warmup_day, SendingHours};
use crate::store::{Candidate, Claim, Outcome, Ready, Skip, Store, WaitReason};
use crate::time::now_ms;
use crate::transport::Transport;
use chrono_tz::Tz;

/// Permanent failures in a row with the same code that stop the run: by
/// then the cause is most likely the configuration, not the addresses.
pub const CIRCUIT_BREAKER: u32 = 10;

/// The most recipients one run has `sending` at once, whatever the number
/// of accounts and connections: the bound of SPEC §7.3 on what a kill
/// leaves `unknown`.
pub const MAX_SENDING: usize = 16;

/// A domain's pacing is shown when it holds every recipient at least this long.
const DOMAIN_WAIT_SHOWN_MS: i64 = 1_000;

/// The longest pacing wait (the account's or a domain's) that `--no-wait`
/// takes as part of sending: a rate of one a minute or more. A longer one,
/// such as the spacing of a lone hourly or daily window, is a wait like a
/// full window's, and the run stops (exit 75).
const NO_WAIT_PACING_MS: i64 = 60_000;

/// Time as the engine sees it, so that pacing, windows, backoff and pauses
/// are tested in virtual time without sleeping.
pub trait Clock: Send + Sync + 'static {
    /// Unix milliseconds.
    fn now_ms(&self) -> i64;
    /// Returns once `now_ms() >= at_ms`.
    fn sleep_until(&self, at_ms: i64) -> impl Future<Output = ()> + Send;
}

/// The wall clock and tokio's timer.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }

    async fn sleep_until(&self, at_ms: i64) {
        let wait = u64::try_from(at_ms - now_ms()).unwrap_or(0);
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

/// How many recipients one claim takes. Unthrottled, as many as the bound
/// on uncertainty allows, so that
/// the synced commit before sending is shared by several messages; after a
/// crash at most `connections - 1` in flight plus one batch are left
/// `unknown`, never more than 16 (SPEC §7.3). Under windows, one: each send
/// needs its own slot.
pub fn claim_batch(config: &RunConfig) -> usize {
    if config.windows.is_empty() && config.warmup.is_empty() {
        17usize.saturating_sub(config.connections).clamp(1, 16)
    } else {
        1
    }
}

/// What the run is allowed to do.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub campaign_id: i64,
    pub account: String,
    /// What account pauses are kept under (the account and the server's port).
    pub pause_key: String,
    pub windows: Vec<Window>,
    pub retry: RetryConfig,
    pub connections: usize,
    /// Send at most this many messages in this run.
    pub limit: Option<u64>,
    /// Stop instead of waiting for a window, a pause or a retry.
    pub no_wait: bool,
    /// `[schedule]`: no message leaves outside these hours of `zone`.
    pub hours: Option<SendingHours>,
    pub zone: Tz,
    /// `timezone_column`: the field holding each recipient's own zone, in
    /// which `hours` then apply (an empty cell: `zone`).
    pub zone_field: Option<usize>,
    /// The account's daily caps for its first days of sending.
    pub warmup: Vec<u32>,
    /// `[limits.per_domain]`, paced in this run only.
    pub per_domain: BTreeMap<String, Rate>,
}

/// What happened, for the progress display.
#[derive(Debug, Clone)]
pub enum Event {
    Sent {
        row: i64,
        email: String,
        /// The account that sent it.
        account: String,
    },
    Deferred {
        row: i64,
        email: String,
        reply: String,
        retry_at_ms: i64,
    },
    Failed {
        row: i64,
        email: String,
        reply: String,
    },
    /// The connection was lost after the message was sent: `unknown`.
    Unknown {
        row: i64,
        email: String,
        reply: String,
    },
    Unbuildable {
        row: i64,
        email: String,
        why: String,
    },
    /// Sending through `account` waits until `until_ms` (not sent for
    /// plain pacing).
    Waiting {
        until_ms: i64,
        why: WaitReason,
        account: String,
    },
    /// Deferred recipients are not due yet.
    WaitingForRetry { until_ms: i64 },
    /// The server paused the account, or could not be reached.
    AccountPaused {
        until_ms: i64,
        why: String,
        account: String,
    },
    /// With several accounts: this one refused the login, tripped the
    /// circuit breaker or stopped under `--no-wait`, and sends no more in
    /// this run; the others carry on.
    AccountSetAside { account: String, end: RunEnd },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// Nothing left to send.
    Done,
    /// `--limit` messages were sent.
    LimitReached,
    /// `--no-wait`, and the next send is not possible before `until_ms`.
    WouldWait { until_ms: i64, why: String },
    /// SIGINT / SIGTERM; in-flight messages were finished and recorded.
    Interrupted,
    /// Authentication or TLS policy failure; nothing changed for any recipient.
    Fatal(Reply),
    /// With several accounts: every one was set aside (each account and why).
    NoAccountLeft(Vec<(String, RunEnd)>),
    /// Too many identical permanent failures in a row.
    CircuitBreaker(String),
}

struct Shared {
    claimed: u64,
    in_flight: usize,
    end: Option<RunEnd>,
    lanes: Vec<LaneState>,
    /// `timezone_column` cells whose zone is outside the sending hours,
    /// until when: claims pass over their recipients without reading them.
    closed_zones: BTreeMap<String, (i64, WaitReason)>,
}

/// What one account's workers share.
#[derive(Default)]
struct LaneState {
    account: String,
    /// Claimed (durably `sending`) but not yet picked up by a worker.
    queue: VecDeque<Ready>,
    /// The server cannot be reached: ends at the first connection made.
    outage: Backoff,
    /// The server paused the account (4xx): ends at the first message sent.
    throttle: Backoff,
    /// Set aside: a refused login, the circuit breaker, or a wait
    /// `--no-wait` does not take.
    stopped: Option<RunEnd>,
    /// The last permanent failure's reply and how many came in a row:
    /// counted per account, as a misconfigured account (a From its domain
    /// does not allow) fails every recipient it sends to, whatever the
    /// others do.
    breaker: (String, u32),
}

impl Shared {
    /// Recipients claimed and not yet settled, on every account.
    fn busy(&self) -> usize {
        self.in_flight + self.lanes.iter().map(|l| l.queue.len()).sum::<usize>()
    }

    /// Sets lane `lane` aside for `why`; once none is left, ends the run:
    /// with a wait if any lane only waits, else with why they stopped.
    /// Returns the lane's claimed, unsent recipients, to put back.
    fn stop_lane(&mut self, lane: usize, why: RunEnd) -> Vec<Ready> {
        let state = &mut self.lanes[lane];
        state.stopped.get_or_insert(why);
        let queued = std::mem::take(&mut state.queue);
        self.claimed = self.claimed.saturating_sub(queued.len() as u64);
        if self.lanes.iter().all(|l| l.stopped.is_some()) {
            let end = if self.lanes.len() == 1 {
                self.lanes[0].stopped.clone()
            } else {
                let wait = self
                    .lanes
                    .iter()
                    .filter_map(|l| match &l.stopped {
                        Some(end @ RunEnd::WouldWait { until_ms, .. }) => Some((*until_ms, end)),
                        _ => None,
                    })
                    .min_by_key(|(until, _)| *until)
                    .map(|(_, end)| end.clone());
                Some(wait.unwrap_or_else(|| {
                    RunEnd::NoAccountLeft(
                        self.lanes
                            .iter()
                            .filter_map(|l| Some((l.account.clone(), l.stopped.clone()?)))
                            .collect(),
                    )
                }))
            };
            if let Some(end) = end {
                self.end.get_or_insert(end);
            }
        }
        queued.into()
    }
}

/// One pause that grows while it lasts: each failed attempt made after the
/// current step ran out takes the next, longer step; failures of attempts
/// that started before then (other connections, queued recipients) belong
/// to the step already taken (SPEC §8: one outage is one backoff step).
#[derive(Debug, Default, Clone, Copy)]
struct Backoff {
    step: u32,
    until_ms: i64,
}

impl Backoff {
    /// Takes the next step for a failure of an attempt that began at
    /// `started`, unless the current step already covers it. Returns the
    /// new end of the pause when a step was taken.
    fn fail(&mut self, started: i64, now: i64, delay: impl Fn(u32) -> Duration) -> Option<i64> {
        if self.step > 0 && started < self.until_ms {
            return None;
        }
        self.step += 1;
        let ms = i64::try_from(delay(self.step).as_millis()).unwrap_or(i64::MAX / 4);
        self.until_ms = now.saturating_add(ms.max(1));
        Some(self.until_ms)
    }

    fn active_until(&self, now: i64) -> Option<i64> {
        (self.step > 0 && self.until_ms > now).then_some(self.until_ms)
    }
}

/// The wait before reconnecting after the `step`th failed attempt of an
/// outage: one second, doubling, never more than `[retry] backoff`.
pub fn outage_delay(retry: &RetryConfig, step: u32) -> Duration {
    let cap = retry.backoff.min(Duration::from_secs(3600));
    Duration::from_secs(1)
        .saturating_mul(1u32 << step.saturating_sub(1).min(20))
        .min(cap)
}

/// One sending account of a run: what it may do (its account, windows,
/// warm-up and connections in `config`), how it sends, and the pipeline
/// that builds its messages (its `from`, its DKIM key).
pub struct Lane<T> {
    pub config: RunConfig,
    pub transport: Arc<T>,
    pub pipeline: Arc<Pipeline>,
}

/// Sends until nothing is left, the limit is reached, a stop is requested
/// (`stop` turns true) or something ends the run.
pub async fn run<T: Transport, C: Clock>(
    store: Store,
    transport: Arc<T>,
    clock: Arc<C>,
    pipeline: Arc<Pipeline>,
    config: RunConfig,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
) -> Result<RunEnd> {
    let lane = Lane {
        config,
        transport,
        pipeline,
    };
    run_lanes(store, vec![lane], clock, events, stop).await
}

/// [`run`] through several accounts at once, sharing the campaign, the
/// `--limit` and the per-domain pacing. The campaign-wide settings of each
/// lane's config (retry, limit, no_wait, hours) are the same in every lane;
/// the per-domain rules are read from the first.
pub async fn run_lanes<T: Transport, C: Clock>(
    store: Store,
    lanes: Vec<Lane<T>>,
    clock: Arc<C>,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
) -> Result<RunEnd> {
    let Some(first) = lanes.first() else {
        return Ok(RunEnd::Done);
    };
    let shared = Arc::new(Mutex::new(Shared {
        claimed: 0,
        in_flight: 0,
        end: None,
        closed_zones: BTreeMap::new(),
        lanes: lanes
            .iter()
            .map(|l| LaneState {
                account: l.config.account.clone(),
                ..LaneState::default()
            })
            .collect(),
    }));
    let settled = Arc::new(Notify::new());
    let domains = Arc::new(DomainPacer::new(&first.config.per_domain));
    let (ended, _) = watch::channel(false);
    let ended = Arc::new(ended);
    let several = lanes.len() > 1;
    let mut workers = Vec::new();
    for (index, lane) in lanes.into_iter().enumerate() {
        let config = Arc::new(lane.config);
        for _ in 0..config.connections.max(1) {
            let worker = Worker {
                store: store.clone(),
                transport: lane.transport.clone(),
                clock: clock.clone(),
                pipeline: lane.pipeline.clone(),
                config: config.clone(),
                lane: index,
                several,
                events: events.clone(),
                stop: stop.clone(),
                ended: ended.clone(),
                shared: shared.clone(),
                settled: settled.clone(),
                domains: domains.clone(),
                proven: false,
            };
            workers.push(tokio::spawn(worker.run()));
        }
    }
    let mut first_error = None;
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(anyhow::anyhow!("a send worker failed: {e}"));
            }
        }
    }
    // Claimed ones no worker picked up were never offered to the server.
    let unsent: Vec<Ready> = shared
        .lock()
        .await
        .lanes
        .iter_mut()
        .flat_map(|l| std::mem::take(&mut l.queue))
        .collect();
    for r in unsent {
        store
            .record(&r.candidate, r.log_id, &Outcome::Unclaimed, clock.now_ms())
            .await?;
    }
    // Every outcome is written before the run says how it ended.
    store.flush().await?;
    if let Some(e) = first_error {
        return Err(e);
    }
    let end = shared.lock().await.end.clone();
    Ok(match end {
        Some(end) => end,
        None if *stop.borrow() => RunEnd::Interrupted,
        None => RunEnd::Done,
    })
}

struct Worker<T, C> {
    store: Store,
    transport: Arc<T>,
    clock: Arc<C>,
    pipeline: Arc<Pipeline>,
    config: Arc<RunConfig>,
    /// This worker's account, an index into `Shared::lanes`.
    lane: usize,
    /// More than one account: a refused login sets one aside.
    several: bool,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
    /// Turns true when the run ends, to wake workers waiting for their
    /// account (a pause, a full window) when the others finished the work.
    ended: Arc<watch::Sender<bool>>,
    shared: Arc<Mutex<Shared>>,
    settled: Arc<Notify>,
    domains: Arc<DomainPacer>,
    /// A connection was made (or found ready) since this worker last
    /// claimed: recipients are claimed only once the server took us.
    proven: bool,
}

enum Next {
    Send(Ready),
    Connect,
    Sleep(i64),
    AwaitOthers,
    Finish,
}

impl<T: Transport, C: Clock> Worker<T, C> {
    async fn run(mut self) -> Result<()> {
        let mut last_wait: Option<(i64, WaitReason)> = None;
        loop {
            if *self.stop.borrow() {
                return Ok(());
            }
            match self.next(&mut last_wait).await? {
                Next::Finish => {
                    if self.shared.lock().await.end.is_some() {
                        self.ended.send_replace(true);
                    }
                    return Ok(());
                }
                Next::Connect => {
                    let started = self.clock.now_ms();
                    match self.transport.connect().await {
                        Ok(()) => {
                            self.proven = true;
                            self.shared.lock().await.lanes[self.lane].outage = Backoff::default();
                        }
                        Err(reply) => self.refused(reply, started).await?,
                    }
                }
                Next::Send(ready) => {
                    last_wait = None;
                    let started = self.clock.now_ms();
                    let row = u64::try_from(ready.candidate.row_number).unwrap_or(0);
                    let result = self.transport.send(row, &ready.message).await;
                    self.settle(&ready.candidate, ready.log_id, result, started)
                        .await?;
                    self.shared.lock().await.in_flight -= 1;
                    self.settled.notify_waiters();
                }
                Next::Sleep(until_ms) => {
                    let mut ended = self.ended.subscribe();
                    tokio::select! {
                        _ = self.clock.sleep_until(until_ms) => {}
                        _ = stop_requested(&mut self.stop) => {}
                        _ = ended.wait_for(|e| *e) => {}
                    }
                }
                Next::AwaitOthers => {
                    let notified = self.settled.notified();
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = stop_requested(&mut self.stop) => {}
                    }
                }
            }
        }
    }

    /// Decides this worker's next step, claiming under the shared lock so
    /// that `--limit` and the run's end are exact across connections.
    async fn next(&mut self, last_wait: &mut Option<(i64, WaitReason)>) -> Result<Next> {
        let mut shared = self.shared.lock().await;
        let lane = self.lane;
        if shared.end.is_some() || shared.lanes[lane].stopped.is_some() {
            return Ok(Next::Finish);
        }
        if let Some(ready) = shared.lanes[lane].queue.pop_front() {
            shared.in_flight += 1;
            return Ok(Next::Send(ready));
        }
        let now = self.clock.now_ms();
        if let Some(until) = shared.lanes[lane].outage.active_until(now) {
            if let Some(end) = self.no_wait_end(until, "the server cannot be reached") {
                self.stop_lane(&mut shared, end).await?;
                return Ok(Next::Finish);
            }
            return Ok(Next::Sleep(until));
        }
        if let Some(until) = shared.lanes[lane].throttle.active_until(now) {
            return Ok(Next::Sleep(until));
        }
        let mut max = claim_batch(&self.config);
        if let Some(limit) = self.config.limit {
            if shared.claimed >= limit {
                if shared.busy() == 0 {
                    shared.end = Some(RunEnd::LimitReached);
                }
                return Ok(Next::Finish);
            }
            max = max.min(usize::try_from(limit - shared.claimed).unwrap_or(usize::MAX));
        }
        // Every account's claims count together: after a kill, no more
        // than MAX_SENDING recipients of this run are left `unknown`.
        let room = MAX_SENDING.saturating_sub(shared.busy());
        if room == 0 {
            return Ok(Next::AwaitOthers);
        }
        max = max.min(room);
        let cfg = &self.config;
        let pipeline = self.pipeline.clone();
        let now = self.clock.now_ms();
        let mut gated = self.gate(now).await?;
        if gated.is_none() && !self.proven && !self.transport.has_connection() {
            // A new login while the server keeps the account paused (too
            // many logins, a rate limit) would only make it worse.
            gated = self
                .store
                .account_pause(&cfg.pause_key, now)
                .await?
                .map(|(until, why)| (until, WaitReason::Paused(why)));
        }
        if gated.is_none() && !self.proven {
            return Ok(Next::Connect);
        }
        let claim = match gated {
            Some((until_ms, why)) => Claim::Wait { until_ms, why },
            None => {
                self.proven = false;
                let domains = &self.domains;
                shared.closed_zones.retain(|_, (until, _)| *until > now);
                let skip = Skip {
                    field: cfg.zone_field.unwrap_or(0),
                    values: match cfg.zone_field {
                        Some(_) => shared.closed_zones.keys().cloned().collect(),
                        None => Vec::new(),
                    },
                };
                let mut closed = Vec::new();
                let claim = self
                    .store
                    .claim_held(
                        cfg.campaign_id,
                        &cfg.account,
                        &cfg.pause_key,
                        &cfg.windows,
                        now,
                        max,
                        |c| pipeline.build_stored(c).map_err(|e| e.to_string()),
                        |c| {
                            if let Some(held) = recipient_hours(cfg, c, now) {
                                let cell = cfg.zone_field.and_then(|f| c.fields.get(f));
                                closed.push((cell.cloned().unwrap_or_default(), held.clone()));
                                return Some(held);
                            }
                            let address = if c.address.is_empty() {
                                &c.email
                            } else {
                                &c.address
                            };
                            domains.hold(address).map(|(wait, domain)| {
                                (
                                    now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 4),
                                    WaitReason::Domain(domain),
                                )
                            })
                        },
                        &skip,
                    )
                    .await?;
                let grew = closed
                    .iter()
                    .any(|(cell, _)| !shared.closed_zones.contains_key(cell));
                shared.closed_zones.extend(closed);
                if grew
                    && matches!(
                        claim,
                        Claim::Wait {
                            why: WaitReason::RecipientHours(_),
                            ..
                        }
                    )
                {
                    // Newly closed zones held every recipient looked at:
                    // look again past them at once.
                    return Ok(Next::Sleep(now));
                }
                // Nothing else to send: wait for the first closed zone to
                // open, unless a retry is due before.
                let opens = shared
                    .closed_zones
                    .values()
                    .min_by_key(|(until, _)| *until)
                    .cloned();
                match (claim, opens) {
                    (Claim::Idle { next_due_ms }, Some((until_ms, why)))
                        if next_due_ms.is_none_or(|due| due > until_ms) =>
                    {
                        Claim::Wait { until_ms, why }
                    }
                    (claim, _) => claim,
                }
            }
        };
        match claim {
            Claim::Ready { ready, unbuildable } => {
                for (candidate, why) in unbuildable {
                    let _ = self.events.send(Event::Unbuildable {
                        row: candidate.row_number,
                        email: candidate.email,
                        why,
                    });
                }
                shared.claimed += ready.len() as u64;
                shared.lanes[lane].queue.extend(ready);
                match shared.lanes[lane].queue.pop_front() {
                    Some(ready) => {
                        shared.in_flight += 1;
                        Ok(Next::Send(ready))
                    }
                    None => Ok(Next::Sleep(self.clock.now_ms())),
                }
            }
            Claim::Wait { until_ms, why } => {
                // Pacing, for the account or a domain, is a short wait that
                // --no-wait accepts, unless it spaces sends by minutes or more.
                let short = matches!(why, WaitReason::Pacing | WaitReason::Domain(_))
                    && until_ms - now <= NO_WAIT_PACING_MS;
                if cfg.no_wait && !short {
                    let end = RunEnd::WouldWait {
                        until_ms,
                        why: describe_wait(&why),
                    };
                    self.stop_lane(&mut shared, end).await?;
                    return Ok(Next::Finish);
                }
                let repeated = last_wait
                    .as_ref()
                    .is_some_and(|(u, w)| *u == until_ms && *w == why);
                let noticeable = match why {
                    WaitReason::Pacing => false,
                    WaitReason::Domain(_) => until_ms - now >= DOMAIN_WAIT_SHOWN_MS,
                    _ => true,
                };
                if noticeable && !repeated {
                    let _ = self.events.send(Event::Waiting {
                        until_ms,
                        why: why.clone(),
                        account: cfg.account.clone(),
                    });
                }
                *last_wait = Some((until_ms, why));
                Ok(Next::Sleep(until_ms))
            }
            Claim::Idle { next_due_ms } => {
                if shared.busy() > 0 {
                    return Ok(Next::AwaitOthers);
                }
                match next_due_ms {
                    None => {
                        shared.end.get_or_insert(RunEnd::Done);
                        Ok(Next::Finish)
                    }
                    Some(until_ms) if cfg.no_wait => {
                        shared.end = Some(RunEnd::WouldWait {
                            until_ms,
                            why: "deferred recipients are waiting for their retry".to_string(),
                        });
                        Ok(Next::Finish)
                    }
                    Some(until_ms) => {
                        if last_wait.as_ref().is_none_or(|(u, _)| *u != until_ms) {
                            let _ = self.events.send(Event::WaitingForRetry { until_ms });
                        }
                        *last_wait = Some((until_ms, WaitReason::Pacing));
                        Ok(Next::Sleep(until_ms))
                    }
                }
            }
        }
    }

    /// What the schedule and the warm-up hold back before anything is
    /// claimed. Claims are made under the shared lock, so within this run
    /// the warm-up count cannot be overtaken between the check and the claim.
    async fn gate(&self, now: i64) -> Result<Option<(i64, WaitReason)>> {
        let cfg = &self.config;
        if let Some(hours) = cfg.hours.as_ref().filter(|_| cfg.zone_field.is_none()) {
            // No opening found (impossible for parsed hours): look again in an hour.
            let opens = hours.next_open(now, cfg.zone).unwrap_or(now + 3_600_000);
            if opens > now {
                return Ok(Some((opens, WaitReason::Schedule)));
            }
        }
        if cfg.warmup.is_empty() {
            return Ok(None);
        }
        let first = self.store.first_send(&cfg.account).await?;
        let Some(day) = warmup_day(&cfg.warmup, first, now) else {
            return Ok(None);
        };
        let used = self
            .store
            .recipients_since(&cfg.account, day.starts_ms)
            .await?;
        let at = day.next_slot(used, 1, now);
        Ok((at > now).then_some((
            at,
            WaitReason::WarmUp {
                day: day.day,
                cap: day.cap,
            },
        )))
    }

    async fn record(&self, c: &Candidate, log_id: i64, outcome: &Outcome) -> Result<()> {
        self.store
            .record(c, log_id, outcome, self.clock.now_ms())
            .await
    }

    /// Classifies the transport's answer and records it. `started`: when
    /// the attempt began (a pause counts each outage once).
    async fn settle(
        &self,
        c: &Candidate,
        log_id: i64,
        result: std::result::Result<Reply, Reply>,
        started: i64,
    ) -> Result<()> {
        let reply = match result {
            Ok(reply) => {
                self.record(
                    c,
                    log_id,
                    &Outcome::Sent {
                        reply: reply.to_string(),
                    },
                )
                .await?;
                let mut shared = self.shared.lock().await;
                shared.lanes[self.lane].breaker = (String::new(), 0);
                shared.lanes[self.lane].throttle = Backoff::default();
                shared.lanes[self.lane].outage = Backoff::default();
                drop(shared);
                let _ = self.events.send(Event::Sent {
                    row: c.row_number,
                    email: c.email.clone(),
                    account: self.config.account.clone(),
                });
                return Ok(());
            }
            Err(reply) => reply,
        };
        if !reply.offered() {
            // No transaction started: the row goes back as it was, and the
            // failure is the connection's, not the recipient's.
            self.record(c, log_id, &Outcome::Unclaimed).await?;
            return self.refused(reply, started).await;
        }
        let text = reply.to_string();
        let attempts = u32::try_from(c.attempts + 1).unwrap_or(u32::MAX);
        match reply.class() {
            ReplyClass::Accepted => {
                self.record(c, log_id, &Outcome::Sent { reply: text })
                    .await?;
                let _ = self.events.send(Event::Sent {
                    row: c.row_number,
                    email: c.email.clone(),
                    account: self.config.account.clone(),
                });
            }
            ReplyClass::Unknown => {
                self.record(
                    c,
                    log_id,
                    &Outcome::Unknown {
                        reply: text.clone(),
                    },
                )
                .await?;
                let _ = self.events.send(Event::Unknown {
                    row: c.row_number,
                    email: c.email.clone(),
                    reply: text,
                });
            }
            ReplyClass::Transient if attempts < self.config.retry.max_attempts => {
                let retry_at_ms = self.clock.now_ms()
                    + self.config.retry.delay_after(attempts).as_millis() as i64;
                self.record(
                    c,
                    log_id,
                    &Outcome::Deferred {
                        reply: text.clone(),
                        retry_at_ms,
                    },
                )
                .await?;
                let _ = self.events.send(Event::Deferred {
                    row: c.row_number,
                    email: c.email.clone(),
                    reply: text,
                    retry_at_ms,
                });
            }
            ReplyClass::Transient | ReplyClass::Permanent => {
                let permanent = reply.class() == ReplyClass::Permanent;
                let outcome = Outcome::Failed {
                    reply: text.clone(),
                    suppress: permanent && reply.suppresses(),
                };
                self.record(c, log_id, &outcome).await?;
                let _ = self.events.send(Event::Failed {
                    row: c.row_number,
                    email: c.email.clone(),
                    reply: text.clone(),
                });
                let mut shared = self.shared.lock().await;
                let key = reply.failure_key();
                let breaker = &mut shared.lanes[self.lane].breaker;
                if permanent && breaker.0 == key {
                    breaker.1 += 1;
                } else {
                    *breaker = (key, u32::from(permanent));
                }
                if breaker.1 >= CIRCUIT_BREAKER {
                    let end = RunEnd::CircuitBreaker(format!(
                        "{CIRCUIT_BREAKER} recipients in a row were refused with the same reply ({text}); \
                         this is most likely the sending account or configuration, not the addresses"
                    ));
                    self.stop_lane(&mut shared, end).await?;
                }
            }
            ReplyClass::AccountPaused(_) => {
                self.record(
                    c,
                    log_id,
                    &Outcome::Returned {
                        reply: text.clone(),
                        unlog: false,
                    },
                )
                .await?;
                self.refused(reply, started).await?;
            }
            ReplyClass::Fatal => {
                // A transaction refused for the account (530 after MAIL):
                // nobody's state changes.
                self.record(c, log_id, &Outcome::Unclaimed).await?;
                let mut shared = self.shared.lock().await;
                self.stop_lane(&mut shared, RunEnd::Fatal(reply)).await?;
            }
        }
        Ok(())
    }

    /// The server could not be reached, refused the login, or paused the
    /// account: no recipient is at fault. Pauses every connection (once per
    /// outage, however many attempts failed together) or ends the run.
    async fn refused(&self, reply: Reply, started: i64) -> Result<()> {
        let text = reply.to_string();
        let kind = match reply.class() {
            ReplyClass::AccountPaused(kind) => kind,
            _ => {
                let mut shared = self.shared.lock().await;
                return self.stop_lane(&mut shared, RunEnd::Fatal(reply)).await;
            }
        };
        let unreachable = reply.origin == Origin::Unreachable;
        let now = self.clock.now_ms();
        let mut guard = self.shared.lock().await;
        let shared = &mut *guard;
        let lane = &mut shared.lanes[self.lane];
        let (until_ms, why) = if unreachable {
            let retry = &self.config.retry;
            let Some(until) = lane
                .outage
                .fail(started, now, |step| outage_delay(retry, step))
            else {
                return Ok(());
            };
            // Kept in memory only: a new `send` tries the server at once.
            (
                until,
                format!("cannot reach the server ({text}); reconnecting with backoff"),
            )
        } else {
            let until = match kind {
                Pause::Daily => Some(self.daily_window_frees(now).await?),
                Pause::Backoff => {
                    let retry = &self.config.retry;
                    lane.throttle
                        .fail(started, now, |step| retry.delay_after(step))
                }
            };
            let Some(until) = until else {
                return Ok(());
            };
            if kind == Pause::Daily {
                lane.throttle = Backoff {
                    step: lane.throttle.step.max(1),
                    until_ms: until,
                };
            }
            let why = format!("the server paused the account: {text}");
            self.store
                .pause_account(&self.config.pause_key, until, &why)
                .await?;
            (until, why)
        };
        // Recipients claimed but not yet offered wait for the pause as
        // they were, not as `sending` (with several accounts, another
        // account takes them).
        for r in std::mem::take(&mut lane.queue) {
            self.record(&r.candidate, r.log_id, &Outcome::Unclaimed)
                .await?;
            shared.claimed = shared.claimed.saturating_sub(1);
        }
        let _ = self.events.send(Event::AccountPaused {
            until_ms,
            why: why.clone(),
            account: self.config.account.clone(),
        });
        if let Some(end) = self.no_wait_end(until_ms, &why) {
            self.stop_lane(shared, end).await?;
        }
        Ok(())
    }

    /// Sets this worker's account aside for the rest of the run (see
    /// [`Shared::stop_lane`]); its claimed, unsent recipients go back as
    /// they were, for the other accounts.
    async fn stop_lane(&self, shared: &mut Shared, end: RunEnd) -> Result<()> {
        if shared.lanes[self.lane].stopped.is_some() {
            return Ok(());
        }
        if let (true, RunEnd::Fatal(reply)) = (self.several, &end) {
            // `status` shows it set aside until it logs in again.
            self.store
                .set_aside(
                    &self.config.pause_key,
                    &reply.to_string(),
                    self.clock.now_ms(),
                )
                .await?;
        }
        for r in shared.stop_lane(self.lane, end.clone()) {
            self.record(&r.candidate, r.log_id, &Outcome::Unclaimed)
                .await?;
        }
        // The last account's end is the run's, said once by the command.
        if self.several && shared.end.is_none() {
            let _ = self.events.send(Event::AccountSetAside {
                account: self.config.account.clone(),
                end,
            });
        }
        Ok(())
    }

    /// With `--no-wait`, how a run ends instead of waiting until `until_ms`.
    fn no_wait_end(&self, until_ms: i64, why: &str) -> Option<RunEnd> {
        self.config.no_wait.then(|| RunEnd::WouldWait {
            until_ms,
            why: why.to_string(),
        })
    }

    /// When the longest window of a day or more lets a send through again;
    /// one hour from now without such a window (SPEC §8).
    async fn daily_window_frees(&self, now: i64) -> Result<i64> {
        let day = Duration::from_secs(86_400);
        let Some(window) = self
            .config
            .windows
            .iter()
            .filter(|w| w.period >= day)
            .max_by_key(|w| w.period)
        else {
            return Ok(now + 3_600_000);
        };
        let schedule = self
            .store
            .schedule(&self.config.account, &[*window], now)
            .await?;
        Ok(schedule
            .oldest_leaves(window, now)
            .unwrap_or(now + 3_600_000)
            .max(now + 60_000))
    }
}

/// When recipient `c`, outside the sending hours of their own zone
/// (`timezone_column`), may be sent to; `None` when they may now.
fn recipient_hours(cfg: &RunConfig, c: &Candidate, now: i64) -> Option<(i64, WaitReason)> {
    let hours = cfg.hours.as_ref()?;
    let cell = c
        .fields
        .get(cfg.zone_field?)
        .map(|f| f.trim())
        .unwrap_or("");
    // An empty cell, or one the pre-send check would have refused: the
    // campaign's zone.
    let zone = match cell {
        "" => cfg.zone,
        name => SendingHours::parse_zone(name).unwrap_or(cfg.zone),
    };
    let opens = hours.next_open(now, zone).unwrap_or(now + 3_600_000);
    (opens > now).then(|| (opens, WaitReason::RecipientHours(zone.name().to_string())))
}

/// Resolves when a stop is requested. If the sender is gone no stop can
/// come any more: wait forever rather than wake a sleeping worker in a loop.
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    if stop.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A wait's reason in words, for logs and `--no-wait` messages.
pub fn describe_wait(why: &WaitReason) -> String {
    match why {
        WaitReason::Pacing => "pacing".to_string(),
        WaitReason::Window { window, used } => {
            format!("{} {used}/{} reached", window.describe(), window.max)
        }
        WaitReason::Paused(why) => why.clone(),
        WaitReason::Schedule => "outside the sending hours of [schedule]".to_string(),
        WaitReason::RecipientHours(zone) => format!(
            "every recipient due is outside the sending hours of [schedule] in their own zone \
             (timezone_column; the first to open: {zone})"
        ),
        WaitReason::Domain(domain) => {
            format!("pacing for {domain} ([limits.per_domain])")
        }
        WaitReason::WarmUp { day, cap } => {
            format!("warm-up: day {day}'s cap of {cap} recipients reached")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::Campaign;
    use crate::message::Outgoing;
    use crate::store::CampaignRecord;
    use crate::store::State;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Mutex as StdMutex;

    /// Virtual time: sleeping jumps the clock forward.
    struct FakeClock(AtomicI64);

    impl Clock for FakeClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
        async fn sleep_until(&self, at_ms: i64) {
            self.0.fetch_max(at_ms, Ordering::SeqCst);
            tokio::task::yield_now().await;
        }
    }

    type Script = Box<dyn FnMut(&str, usize) -> std::result::Result<Reply, Reply> + Send>;
    type ConnectScript = Box<dyn FnMut(i64) -> std::result::Result<(), Reply> + Send>;

    /// A transport double that records who was sent to when, and answers
    /// from a script given the recipient and the call number; connecting
    /// answers from a script given the time.
    struct Recorder {
        clock: Arc<FakeClock>,
        script: StdMutex<Script>,
        connect: StdMutex<ConnectScript>,
        calls: StdMutex<Vec<(i64, String)>>,
        connects: StdMutex<Vec<i64>>,
    }

    impl Transport for Recorder {
        async fn connect(&self) -> std::result::Result<(), Reply> {
            let now = self.clock.now_ms();
            self.connects.lock().unwrap().push(now);
            (self.connect.lock().unwrap())(now)
        }

        async fn send(&self, _row: u64, message: &Outgoing) -> std::result::Result<Reply, Reply> {
            let rcpt = message.envelope.to()[0].to_string();
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push((self.clock.now_ms(), rcpt.clone()));
                calls.len()
            };
            (self.script.lock().unwrap())(&rcpt, n)
        }
        async fn shutdown(&self) {}
    }

    fn ok() -> std::result::Result<Reply, Reply> {
        Ok(Reply::new(Some(250), "2.0.0 OK"))
    }

    struct Setup {
        _dir: tempfile::TempDir,
        store: Store,
        record: CampaignRecord,
        pipeline: Arc<Pipeline>,
        campaign: Campaign,
    }

    async fn setup(n: usize) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.hbs"), "Hi {{name}}").unwrap();
        std::fs::write(dir.path().join("r.csv"), "email,name\n").unwrap();
        std::fs::write(
            dir.path().join("c.toml"),
            "name = \"c\"\n[recipients]\nfile = \"r.csv\"\n[message]\nfrom = \"a@acme.example\"\nsubject = \"s\"\ntext = \"t.hbs\"\n[transport]\nkind = \"file\"\n",
        )
        .unwrap();
        let campaign = Campaign::load(&dir.path().join("c.toml")).unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let record = store
            .campaign(&crate::store::Identity {
                name: "c".into(),
                file: "/c/campaign.toml".into(),
                delivery: crate::store::Delivery::Smtp,
            })
            .await
            .unwrap();
        let columns = vec!["email".to_string(), "name".to_string()];
        let mut import = store
            .import(crate::store::ImportInto::Campaign(&record), &columns)
            .await
            .unwrap();
        for i in 1..=n {
            let email = format!("u{i}@example.com");
            import
                .row(
                    i as u64,
                    &email,
                    &email,
                    &email,
                    &[email.clone(), format!("N{i}")],
                )
                .await
                .unwrap();
        }
        import.commit().await.unwrap();
        let pipeline = Arc::new(Pipeline::new(&campaign, columns, 0).unwrap());
        Setup {
            _dir: dir,
            store,
            record,
            pipeline,
            campaign,
        }
    }

    fn config(s: &Setup, windows: Vec<Window>, connections: usize) -> RunConfig {
        RunConfig {
            campaign_id: s.record.id,
            windows,
            connections,
            ..config_without_setup()
        }
    }

    fn config_without_setup() -> RunConfig {
        RunConfig {
            campaign_id: 0,
            account: "acct".into(),
            pause_key: "acct:587".into(),
            windows: Vec::new(),
            retry: RetryConfig {
                max_attempts: 3,
                backoff: Duration::from_secs(60),
            },
            connections: 1,
            limit: None,
            no_wait: false,
            hours: None,
            zone: Tz::UTC,
            zone_field: None,
            warmup: Vec::new(),
            per_domain: BTreeMap::new(),
        }
    }

    async fn run_with(s: &Setup, cfg: RunConfig, script: Script) -> (RunEnd, Vec<(i64, String)>) {
        let (end, calls, _) = run_connecting(s, cfg, script, Box::new(|_| Ok(()))).await;
        (end, calls)
    }

    /// Runs with a script for connecting too; returns the connection
    /// attempts' times as well.
    async fn run_connecting(
        s: &Setup,
        cfg: RunConfig,
        script: Script,
        connect: ConnectScript,
    ) -> (RunEnd, Vec<(i64, String)>, Vec<i64>) {
        let clock = Arc::new(FakeClock(AtomicI64::new(1_000_000)));
        let transport = Arc::new(Recorder {
            clock: clock.clone(),
            script: StdMutex::new(script),
            connect: StdMutex::new(connect),
            calls: StdMutex::new(Vec::new()),
            connects: StdMutex::new(Vec::new()),
        });
        let (tx, _rx) = mpsc::unbounded_channel();
        let (_stop_tx, stop) = watch::channel(false);
        let end = run(
            s.store.clone(),
            transport.clone(),
            clock,
            s.pipeline.clone(),
            cfg,
            tx,
            stop,
        )
        .await
        .unwrap();
        let calls = transport.calls.lock().unwrap().clone();
        let connects = transport.connects.lock().unwrap().clone();
        (end, calls, connects)
    }

    #[tokio::test]
    async fn paces_evenly_and_never_overfills_a_window_across_connections() {
        let s = setup(12).await;
        let window = Window::new(5, Duration::from_secs(6)).unwrap();
        let (end, calls) = run_with(&s, config(&s, vec![window], 2), Box::new(|_, _| ok())).await;
        assert_eq!(end, RunEnd::Done);
        assert_eq!(calls.len(), 12);
        let times: Vec<i64> = calls.iter().map(|c| c.0).collect();
        for pair in times.windows(2) {
            assert_eq!(pair[1] - pair[0], 1_200, "{times:?}");
        }
        for (i, t) in times.iter().enumerate() {
            let inside = times[i..].iter().filter(|u| **u < t + 6_000).count();
            assert!(inside <= 5, "{times:?}");
        }
        assert_eq!(s.store.counts(s.record.id).await.unwrap()[State::Sent], 12);
    }

    #[tokio::test]
    async fn transient_replies_are_retried_after_backoff_then_sent_once() {
        let s = setup(3).await;
        let script: Script = Box::new(|rcpt, _| {
            static FAILS: AtomicI64 = AtomicI64::new(0);
            if rcpt == "u2@example.com" && FAILS.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(Reply::new(Some(451), "4.3.0 try later"))
            } else {
                ok()
            }
        });
        let (end, calls) = run_with(&s, config(&s, vec![], 1), script).await;
        assert_eq!(end, RunEnd::Done);
        let u2: Vec<i64> = calls
            .iter()
            .filter(|c| c.1 == "u2@example.com")
            .map(|c| c.0)
            .collect();
        assert_eq!(u2.len(), 3);
        assert!(
            u2[1] - u2[0] >= 60_000 && u2[2] - u2[1] >= 120_000,
            "{u2:?}"
        );
        let counts = s.store.counts(s.record.id).await.unwrap();
        assert_eq!((counts[State::Sent], counts[State::Deferred]), (3, 0));
    }

    #[tokio::test]
    async fn transient_failures_fail_after_max_attempts() {
        let s = setup(1).await;
        let (end, calls) = run_with(
            &s,
            config(&s, vec![], 1),
            Box::new(|_, _| Err(Reply::new(Some(452), "4.2.2 full"))),
        )
        .await;
        assert_eq!(end, RunEnd::Done);
        assert_eq!(calls.len(), 3);
        assert_eq!(s.store.counts(s.record.id).await.unwrap()[State::Failed], 1);
    }

    /// Every row as `export` shows it, to compare before and after a run.
    async fn rows(s: &Setup) -> Vec<String> {
        let mut rows = Vec::new();
        s.store
            .export(s.record.id, None, |r| {
                rows.push(format!(
                    "{} {} {:?} {} {:?} {} {:?}",
                    r.email,
                    r.state,
                    r.reason,
                    r.attempts,
                    r.last_reply,
                    r.updated_at,
                    r.message_id
                ));
                Ok(())
            })
            .await
            .unwrap();
        rows
    }

    fn login(code: u16, text: &str) -> Reply {
        let mut r = Reply::new(Some(code), text);
        r.origin = Origin::Login;
        r
    }

    /// Regression: a refused login gave the first claimed row a
    /// last_reply, a Message-ID and a new updated_at.
    #[tokio::test]
    async fn authentication_failure_stops_and_changes_nothing() {
        let s = setup(4).await;
        let window = Window::new(100, Duration::from_secs(60)).unwrap();
        let before = rows(&s).await;
        let refused = || Err(login(535, "5.7.8 Username and Password not accepted."));
        let (end, calls, _) = run_connecting(
            &s,
            config(&s, vec![window], 2),
            Box::new(move |_, _| refused().map(|()| Reply::new(Some(250), "ok"))),
            Box::new(move |_| refused()),
        )
        .await;
        assert!(
            matches!(end, RunEnd::Fatal(ref r) if r.code == Some(535)),
            "{end:?}"
        );
        assert!(calls.is_empty());
        assert_eq!(rows(&s).await, before);
        // Refused on a connection opened for a claimed recipient: the same.
        let (end, _) = run_with(
            &s,
            config(&s, vec![window], 1),
            Box::new(move |_, _| refused().map(|()| Reply::new(Some(250), "ok"))),
        )
        .await;
        assert!(matches!(end, RunEnd::Fatal(_)), "{end:?}");
        assert_eq!(rows(&s).await, before);
        let counts = s.store.counts(s.record.id).await.unwrap();
        assert_eq!(counts[State::Pending], 4);
        let usage = s
            .store
            .schedule("acct", &[window], 1_000_000)
            .await
            .unwrap()
            .usage(1_000_000);
        assert_eq!(usage[0].1, 0, "a refused login is not a send");
    }

    #[tokio::test]
    async fn daily_limit_reply_returns_the_recipient_and_no_wait_stops() {
        let s = setup(6).await;
        let mut cfg = config(
            &s,
            vec![Window::new(500, Duration::from_secs(86_400)).unwrap()],
            1,
        );
        cfg.windows
            .insert(0, Window::new(1000, Duration::from_secs(1)).unwrap());
        cfg.no_wait = true;
        let script: Script = Box::new(|_, n| {
            if n <= 3 {
                ok()
            } else {
                Err(Reply::new(
                    Some(550),
                    "5.4.5 Daily user sending limit exceeded.",
                ))
            }
        });
        let (end, _) = run_with(&s, cfg, script).await;
        let RunEnd::WouldWait { until_ms, .. } = end else {
            panic!("{end:?}")
        };
        // Paused until the first send of the day leaves the 24 h window.
        assert_eq!(until_ms, 1_000_000 + 86_400_000);
        let counts = s.store.counts(s.record.id).await.unwrap();
        assert_eq!(
            (
                counts[State::Sent],
                counts[State::Pending],
                counts[State::Failed]
            ),
            (3, 3, 0)
        );
        assert!(s
            .store
            .account_pause("acct:587", 1_000_000)
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn circuit_breaker_after_ten_identical_permanent_failures() {
        let s = setup(15).await;
        let (end, calls) = run_with(
            &s,
            config(&s, vec![], 1),
            Box::new(|_, _| Err(Reply::new(Some(550), "5.7.26 unauthenticated sender"))),
        )
        .await;
        assert!(matches!(end, RunEnd::CircuitBreaker(_)), "{end:?}");
        assert_eq!(calls.len(), 10);
        assert_eq!(
            s.store.counts(s.record.id).await.unwrap()[State::Pending],
            5
        );
    }

    /// Regression: a connection lost after the final "." was retried, so a
    /// server that had stored the message delivered it again.
    #[tokio::test]
    async fn lost_after_the_final_dot_is_unknown_and_never_resent() {
        let s = setup(3).await;
        let (end, calls) = run_with(
            &s,
            config(&s, vec![], 1),
            Box::new(|rcpt, _| {
                if rcpt == "u2@example.com" {
                    Err(Reply::local(Origin::AfterData, "connection reset"))
                } else {
                    ok()
                }
            }),
        )
        .await;
        assert_eq!(end, RunEnd::Done);
        assert_eq!(calls.iter().filter(|c| c.1 == "u2@example.com").count(), 1);
        let counts = s.store.counts(s.record.id).await.unwrap();
        assert_eq!((counts[State::Sent], counts[State::Unknown]), (2, 1));
    }

    /// Regression: every claimed recipient failing against an unreachable
    /// server doubled the pause (9 doublings in a second, an hour's stall).
    /// Four connections, a server down for 20 s: the waits between
    /// attempts are 1, 2, 4, 8, 16 s (one step per round, not per
    /// recipient), sending resumes at the first attempt after the server's
    /// return, and every recipient is sent once.
    #[tokio::test]
    async fn one_outage_is_one_backoff_step_and_ends_at_the_first_connection() {
        let s = setup(20).await;
        let back_at = 1_000_000 + 20_000;
        let (end, calls, connects) = run_connecting(
            &s,
            config(&s, vec![], 4),
            Box::new(|_, _| ok()),
            Box::new(move |now| {
                if now < back_at {
                    Err(Reply::local(Origin::Unreachable, "connection refused"))
                } else {
                    Ok(())
                }
            }),
        )
        .await;
        assert_eq!(end, RunEnd::Done);
        let mut rounds: Vec<i64> = connects.iter().copied().filter(|t| *t < back_at).collect();
        rounds.dedup();
        let gaps: Vec<i64> = rounds.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, [1_000, 2_000, 4_000, 8_000], "{connects:?}");
        let first_send = calls.iter().map(|c| c.0).min().unwrap();
        assert_eq!(first_send, 1_000_000 + 31_000, "{connects:?}");
        assert_eq!(calls.len(), 20);
        let counts = s.store.counts(s.record.id).await.unwrap();
        assert_eq!(counts[State::Sent], 20);
        let attempts: i64 = {
            let mut total = 0;
            s.store
                .export(s.record.id, None, |r| {
                    total += r.attempts;
                    Ok(())
                })
                .await
                .unwrap();
            total
        };
        assert_eq!(attempts, 20, "an outage costs no attempt");
    }

    /// Failures of attempts that began before the current step ran out
    /// (other connections, recipients already claimed) take no new step.
    #[test]
    fn attempts_begun_during_a_step_belong_to_it() {
        let delay = |step: u32| Duration::from_secs(u64::from(step) * 10);
        let mut b = Backoff::default();
        assert_eq!(b.fail(1_000, 1_000, delay), Some(11_000));
        assert_eq!(b.fail(1_000, 1_500, delay), None);
        assert_eq!(b.fail(10_999, 11_000, delay), None);
        assert_eq!(b.active_until(5_000), Some(11_000));
        // The retry after the step: the next, longer step.
        assert_eq!(b.fail(11_000, 11_200, delay), Some(31_200));
        assert_eq!(b.step, 2);
        assert_eq!(b.active_until(31_200), None);
    }

    /// While the server keeps the account paused (454 too many login
    /// attempts), no new login is tried before the pause ends.
    #[tokio::test]
    async fn no_login_while_the_account_is_paused() {
        let s = setup(2).await;
        s.store
            .pause_account("acct:587", 1_030_000, "454 4.7.0 Too many login attempts")
            .await
            .unwrap();
        let (end, calls, connects) = run_connecting(
            &s,
            config(&s, vec![], 1),
            Box::new(|_, _| ok()),
            Box::new(|_| Ok(())),
        )
        .await;
        assert_eq!(end, RunEnd::Done);
        assert_eq!(calls.len(), 2);
        assert!(connects.iter().all(|t| *t >= 1_030_000), "{connects:?}");
    }

    #[tokio::test]
    async fn the_outage_wait_is_capped_by_the_retry_backoff() {
        let retry = RetryConfig {
            max_attempts: 3,
            backoff: Duration::from_secs(5),
        };
        let waits: Vec<u64> = (1..=6).map(|n| outage_delay(&retry, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5, 5]);
    }

    /// A server lost while claimed recipients waited: the one in flight and
    /// the queued ones go back exactly as they were, a deferred one stays
    /// deferred, and nothing is counted against them.
    #[tokio::test]
    async fn unreachable_after_a_claim_puts_the_rows_back_as_they_were() {
        let s = setup(10).await;
        let before = rows(&s).await;
        let mut cfg = config(&s, vec![], 1);
        cfg.no_wait = true;
        let (end, _) = run_with(
            &s,
            cfg,
            Box::new(|_, _| Err(Reply::local(Origin::Unreachable, "connection refused"))),
        )
        .await;
        assert!(matches!(end, RunEnd::WouldWait { .. }), "{end:?}");
        assert_eq!(rows(&s).await, before);
    }

    #[tokio::test]
    async fn nothing_leaves_outside_the_hours_and_warmup_caps_each_day() {
        let s = setup(7).await;
        let mut cfg = config(&s, vec![], 2);
        let (opens, closes) = SendingHours::parse_hours("09:00-17:00").unwrap();
        let hours = SendingHours {
            opens,
            closes,
            ..SendingHours::default()
        };
        cfg.hours = Some(hours.clone());
        cfg.warmup = vec![2, 3];
        let (end, calls) = run_with(&s, cfg, Box::new(|_, _| ok())).await;
        assert_eq!(end, RunEnd::Done);
        assert_eq!(calls.len(), 7);
        let day_ms = 86_400_000;
        for (at, _) in &calls {
            assert!(hours.is_open(*at, Tz::UTC), "{at}");
        }
        // The clock starts at 00:16:40 UTC: the first send waits for 09:00.
        let first = calls[0].0;
        assert_eq!(first, 9 * 3_600_000);
        let on_day = |d: i64| {
            calls
                .iter()
                .filter(|(at, _)| (*at - first).div_euclid(day_ms) == d)
                .count()
        };
        assert_eq!((on_day(0), on_day(1), on_day(2)), (2, 3, 2));
    }

    /// Three accounts on one campaign in virtual time: one refuses the
    /// login and is set aside, one is quota-paused (5.4.5) after two
    /// messages, the third finishes the campaign; every recipient is sent
    /// once, each account's window holds, and nothing is sent through the
    /// refused account.
    #[tokio::test]
    async fn accounts_share_a_campaign_and_one_paused_or_refused_is_set_aside() {
        let s = setup(12).await;
        let clock = Arc::new(FakeClock(AtomicI64::new(1_000_000)));
        let window = Window::new(3, Duration::from_secs(60)).unwrap();
        let recorder = |script: Script, connect: ConnectScript| {
            Arc::new(Recorder {
                clock: clock.clone(),
                script: StdMutex::new(script),
                connect: StdMutex::new(connect),
                calls: StdMutex::new(Vec::new()),
                connects: StdMutex::new(Vec::new()),
            })
        };
        let refused = recorder(
            Box::new(|_, _| ok()),
            Box::new(|_| Err(login(535, "5.7.8 Username and Password not accepted."))),
        );
        // The steady account reaches its server only once the quota one
        // has been refused, so that the test does not depend on how the
        // accounts interleave.
        let offers = Arc::new(AtomicI64::new(0));
        let counted = offers.clone();
        let quota = recorder(
            Box::new(move |_, n| {
                counted.fetch_add(1, Ordering::SeqCst);
                if n <= 2 {
                    ok()
                } else {
                    Err(Reply::new(
                        Some(550),
                        "5.4.5 Daily user sending limit exceeded.",
                    ))
                }
            }),
            Box::new(|_| Ok(())),
        );
        let steady = recorder(
            Box::new(|_, _| ok()),
            Box::new(move |_| {
                if offers.load(Ordering::SeqCst) < 3 {
                    Err(Reply::local(Origin::Unreachable, "connection refused"))
                } else {
                    Ok(())
                }
            }),
        );
        let lane = |name: &str, transport: &Arc<Recorder>| {
            let mut cfg = config(&s, vec![window], 1);
            cfg.account = name.to_string();
            cfg.pause_key = format!("{name}:587");
            Lane {
                config: cfg,
                transport: transport.clone(),
                pipeline: s.pipeline.clone(),
            }
        };
        let lanes = vec![
            lane("refused", &refused),
            lane("quota", &quota),
            lane("steady", &steady),
        ];
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_stop_tx, stop) = watch::channel(false);
        let end = run_lanes(s.store.clone(), lanes, clock, tx, stop)
            .await
            .unwrap();
        assert_eq!(end, RunEnd::Done);
        assert!(refused.calls.lock().unwrap().is_empty());
        let quota_calls = quota.calls.lock().unwrap().clone();
        let steady_calls = steady.calls.lock().unwrap().clone();
        // From the third offer on, each is refused for the quota and goes
        // back; the account tries again only once its pause is over (the
        // virtual clock jumps to the end of any worker's wait, so it may
        // try more than once before the others finish).
        assert!(quota_calls.len() >= 3, "{quota_calls:?}");
        for pair in quota_calls[2..].windows(2) {
            assert!(pair[1].0 - pair[0].0 >= 3_600_000, "{quota_calls:?}");
        }
        let mut delivered: Vec<String> = quota_calls[..2]
            .iter()
            .chain(&steady_calls)
            .map(|c| c.1.clone())
            .collect();
        delivered.sort();
        delivered.dedup();
        assert_eq!(delivered.len(), 12, "every recipient exactly once");
        assert_eq!(steady_calls.len(), 10);
        for calls in [&quota_calls[..2], &steady_calls] {
            for (i, (t, _)) in calls.iter().enumerate() {
                let inside = calls[i..].iter().filter(|(u, _)| *u < t + 60_000).count();
                assert!(inside <= 3, "{calls:?}");
            }
        }
        assert_eq!(s.store.counts(s.record.id).await.unwrap()[State::Sent], 12);
        let mut set_aside = Vec::new();
        let mut sent_by = BTreeMap::<String, usize>::new();
        while let Ok(event) = rx.try_recv() {
            match event {
                Event::AccountSetAside { account, .. } => set_aside.push(account),
                Event::Sent { account, .. } => *sent_by.entry(account).or_default() += 1,
                _ => {}
            }
        }
        assert_eq!(set_aside, ["refused"]);
        assert_eq!(sent_by.get("quota"), Some(&2));
        assert_eq!(sent_by.get("steady"), Some(&10));
    }

    /// Regression: the circuit breaker counted across accounts, so an
    /// account whose every message was refused (a From its domain does
    /// not allow) kept failing recipients while another account's sends
    /// reset the count. Now that account is set aside after ten, and the
    /// other sends the rest.
    #[tokio::test]
    async fn the_circuit_breaker_sets_one_account_aside() {
        let s = setup(30).await;
        let clock = Arc::new(FakeClock(AtomicI64::new(1_000_000)));
        // The good account reaches its server only once the bad one has
        // been refused ten times, so that the test does not depend on how
        // the two interleave.
        let refusals = Arc::new(AtomicI64::new(0));
        let lane = |name: &str, script: Script, connect: ConnectScript| {
            let mut cfg = config(&s, vec![], 1);
            cfg.account = name.to_string();
            Lane {
                config: cfg,
                transport: Arc::new(Recorder {
                    clock: clock.clone(),
                    script: StdMutex::new(script),
                    connect: StdMutex::new(connect),
                    calls: StdMutex::new(Vec::new()),
                    connects: StdMutex::new(Vec::new()),
                }),
                pipeline: s.pipeline.clone(),
            }
        };
        let counted = refusals.clone();
        let seen = refusals.clone();
        let lanes = vec![
            lane(
                "bad",
                Box::new(move |_, _| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Err(Reply::new(Some(550), "5.7.26 unauthenticated sender"))
                }),
                Box::new(|_| Ok(())),
            ),
            lane(
                "good",
                Box::new(|_, _| ok()),
                Box::new(move |_| {
                    if seen.load(Ordering::SeqCst) < 10 {
                        Err(Reply::local(Origin::Unreachable, "connection refused"))
                    } else {
                        Ok(())
                    }
                }),
            ),
        ];
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_stop_tx, stop) = watch::channel(false);
        let end = run_lanes(s.store.clone(), lanes, clock, tx, stop)
            .await
            .unwrap();
        assert_eq!(end, RunEnd::Done);
        let counts = s.store.counts(s.record.id).await.unwrap();
        assert_eq!((counts[State::Failed], counts[State::Sent]), (10, 20));
        let mut set_aside = Vec::new();
        while let Ok(event) = rx.try_recv() {
            if let Event::AccountSetAside { account, end } = event {
                assert!(matches!(end, RunEnd::CircuitBreaker(_)), "{end:?}");
                set_aside.push(account);
            }
        }
        assert_eq!(set_aside, ["bad"]);
    }

    /// A transport that notes how many of the campaign's recipients are
    /// `sending` whenever a message is offered to it.
    struct Counting {
        store: Store,
        campaign_id: i64,
        most: AtomicI64,
    }

    impl Transport for Counting {
        async fn connect(&self) -> std::result::Result<(), Reply> {
            Ok(())
        }
        async fn send(&self, _row: u64, _message: &Outgoing) -> std::result::Result<Reply, Reply> {
            // Let the other accounts' workers claim meanwhile.
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            if let Ok(counts) = self.store.counts(self.campaign_id).await {
                self.most
                    .fetch_max(counts[State::Sending], Ordering::SeqCst);
            }
            ok()
        }
        async fn shutdown(&self) {}
    }

    /// Regression: each account claimed as large a batch as the bound on
    /// uncertainty allows one run, so three unthrottled accounts had three
    /// times as many recipients `sending` as a kill may leave `unknown`
    /// (SPEC §7.3: never more than 16).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_accounts_never_have_more_than_sixteen_sending() {
        let s = setup(200).await;
        let transport = Arc::new(Counting {
            store: s.store.clone(),
            campaign_id: s.record.id,
            most: AtomicI64::new(0),
        });
        let lanes: Vec<Lane<Counting>> = ["a", "b", "c"]
            .iter()
            .map(|name| {
                let mut cfg = config(&s, vec![], 4);
                cfg.account = name.to_string();
                Lane {
                    config: cfg,
                    transport: transport.clone(),
                    pipeline: s.pipeline.clone(),
                }
            })
            .collect();
        let (tx, _rx) = mpsc::unbounded_channel();
        let (_stop_tx, stop) = watch::channel(false);
        let clock = Arc::new(FakeClock(AtomicI64::new(1_000_000)));
        let end = run_lanes(s.store.clone(), lanes, clock, tx, stop)
            .await
            .unwrap();
        assert_eq!(end, RunEnd::Done);
        assert_eq!(s.store.counts(s.record.id).await.unwrap()[State::Sent], 200);
        let most = transport.most.load(Ordering::SeqCst);
        assert!(most <= MAX_SENDING as i64, "{most} sending at once");
    }

    /// When every account refuses the login, the run stops with each one's
    /// reason and nobody's state changed.
    #[tokio::test]
    async fn no_account_left_ends_the_run() {
        let s = setup(3).await;
        let before = rows(&s).await;
        let clock = Arc::new(FakeClock(AtomicI64::new(1_000_000)));
        let lanes: Vec<Lane<Recorder>> = ["a", "b"]
            .iter()
            .map(|name| {
                let mut cfg = config(&s, vec![], 1);
                cfg.account = name.to_string();
                Lane {
                    config: cfg,
                    transport: Arc::new(Recorder {
                        clock: clock.clone(),
                        script: StdMutex::new(Box::new(|_, _| ok())),
                        connect: StdMutex::new(Box::new(|_| Err(login(535, "5.7.8 no")))),
                        calls: StdMutex::new(Vec::new()),
                        connects: StdMutex::new(Vec::new()),
                    }),
                    pipeline: s.pipeline.clone(),
                }
            })
            .collect();
        let (tx, _rx) = mpsc::unbounded_channel();
        let (_stop_tx, stop) = watch::channel(false);
        let end = run_lanes(s.store.clone(), lanes, clock, tx, stop)
            .await
            .unwrap();
        let RunEnd::NoAccountLeft(accounts) = end else {
            panic!("{end:?}")
        };
        let names: Vec<&str> = accounts.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(rows(&s).await, before);
    }

    /// With `timezone_column`, each recipient waits for the hours of their
    /// own zone; an empty cell means the campaign's zone.
    #[test]
    fn recipient_hours_follow_their_own_zone() {
        let (opens, closes) = SendingHours::parse_hours("09:00-17:00").unwrap();
        let hours = SendingHours {
            opens,
            closes,
            ..SendingHours::default()
        };
        let cfg = RunConfig {
            hours: Some(hours),
            zone: Tz::UTC,
            zone_field: Some(1),
            ..config_without_setup()
        };
        let candidate = |zone: &str| Candidate {
            id: 1,
            row_number: 1,
            email: "a@example.com".into(),
            address: "a@example.com".into(),
            fields: vec!["a@example.com".into(), zone.into()],
            attempts: 0,
            before: crate::store::Before::default(),
        };
        // 1970-01-01 10:00 UTC: 19:00 in Tokyo, 05:00 in New York.
        let now = 10 * 3_600_000;
        assert_eq!(recipient_hours(&cfg, &candidate(""), now), None);
        assert_eq!(
            recipient_hours(&cfg, &candidate("Europe/Berlin"), now),
            None
        );
        let (tokyo, why) = recipient_hours(&cfg, &candidate("Asia/Tokyo"), now).unwrap();
        // Tokyo opens again at 09:00 JST the next day, 00:00 UTC.
        assert_eq!(tokyo, 86_400_000);
        assert_eq!(why, WaitReason::RecipientHours("Asia/Tokyo".into()));
        let (new_york, _) = recipient_hours(&cfg, &candidate("America/New_York"), now).unwrap();
        assert_eq!(new_york, 14 * 3_600_000);
    }

    #[tokio::test]
    async fn limit_is_exact_across_connections() {
        let s = setup(10).await;
        let mut cfg = config(&s, vec![], 3);
        cfg.limit = Some(4);
        let (end, calls) = run_with(&s, cfg, Box::new(|_, _| ok())).await;
        assert_eq!(end, RunEnd::LimitReached);
        assert_eq!(calls.len(), 4);
        let _ = &s.campaign;
    }
}
