//! The send loop: claims recipients from the store one at a time per
//! connection, sends through a [`Transport`], and records each outcome as it
//! happens. It never prints or exits; it reports [`Event`]s and returns how
//! the run ended, and the command layer decides what the user sees.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{mpsc, watch, Mutex, Notify};

use crate::campaign::RetryConfig;
use crate::limits::Window;
use crate::message::{self, Outgoing, Variant};
use crate::recipients::parse_address;
use crate::reply::{Pause, Reply, ReplyClass};
use crate::store::{now_ms, Candidate, Claim, Outcome, Store, WaitReason};
use crate::template::{row_data, Templates};
use crate::transport::Transport;

/// Permanent failures in a row with the same code that stop the run: by
/// then the cause is most likely the configuration, not the addresses.
pub const CIRCUIT_BREAKER: u32 = 10;

/// Turns a stored recipient into its message.
pub struct Renderer {
    pub templates: Templates,
    pub columns: Vec<String>,
    pub campaign_name: String,
    pub campaign_dir: PathBuf,
}

impl Renderer {
    pub fn build(&self, candidate: &Candidate) -> std::result::Result<Outgoing, String> {
        let to = parse_address(&candidate.address)?;
        let data = row_data(
            &self.columns,
            &candidate.fields,
            &candidate.email,
            &self.campaign_name,
        );
        let rendered = self.templates.render(&data)?;
        message::build(&rendered, &to, &self.campaign_dir, Variant::default())
    }
}

/// What the run is allowed to do.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub campaign_id: i64,
    pub account: String,
    pub windows: Vec<Window>,
    pub retry: RetryConfig,
    pub connections: usize,
    /// Send at most this many messages in this run.
    pub limit: Option<u64>,
    /// Stop instead of waiting for a window, a pause or a retry.
    pub no_wait: bool,
}

/// What happened, for the progress display.
#[derive(Debug, Clone)]
pub enum Event {
    Sent {
        row: i64,
        email: String,
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
    Unbuildable {
        row: i64,
        email: String,
        why: String,
    },
    /// Sending waits until `until_ms` (not sent for plain pacing).
    Waiting {
        until_ms: i64,
        why: WaitReason,
    },
    /// Deferred recipients are not due yet.
    WaitingForRetry {
        until_ms: i64,
    },
    AccountPaused {
        until_ms: i64,
        reply: String,
    },
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
    Fatal(String),
    /// Too many identical permanent failures in a row.
    CircuitBreaker(String),
}

struct Shared {
    claimed: u64,
    in_flight: usize,
    end: Option<RunEnd>,
    breaker: (String, u32),
    pause_streak: u32,
}

/// Sends until nothing is left, the limit is reached, a stop is requested
/// (`stop` turns true) or something ends the run.
pub async fn run<T: Transport>(
    store: Store,
    transport: Arc<T>,
    renderer: Arc<Renderer>,
    config: RunConfig,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
) -> Result<RunEnd> {
    let shared = Arc::new(Mutex::new(Shared {
        claimed: 0,
        in_flight: 0,
        end: None,
        breaker: (String::new(), 0),
        pause_streak: 0,
    }));
    let settled = Arc::new(Notify::new());
    let config = Arc::new(config);
    let mut workers = Vec::new();
    for _ in 0..config.connections.max(1) {
        let worker = Worker {
            store: store.clone(),
            transport: transport.clone(),
            renderer: renderer.clone(),
            config: config.clone(),
            events: events.clone(),
            stop: stop.clone(),
            shared: shared.clone(),
            settled: settled.clone(),
        };
        workers.push(tokio::spawn(worker.run()));
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

struct Worker<T> {
    store: Store,
    transport: Arc<T>,
    renderer: Arc<Renderer>,
    config: Arc<RunConfig>,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
    shared: Arc<Mutex<Shared>>,
    settled: Arc<Notify>,
}

enum Next {
    Send(Candidate, Box<Outgoing>, i64),
    Sleep(i64),
    AwaitOthers,
    Finish,
}

impl<T: Transport> Worker<T> {
    async fn run(mut self) -> Result<()> {
        let mut last_wait: Option<(i64, WaitReason)> = None;
        loop {
            if *self.stop.borrow() {
                return Ok(());
            }
            match self.next(&mut last_wait).await? {
                Next::Finish => return Ok(()),
                Next::Send(candidate, message, log_id) => {
                    last_wait = None;
                    let result = self.transport.send(&message).await;
                    self.settle(&candidate, log_id, result).await?;
                    self.shared.lock().await.in_flight -= 1;
                    self.settled.notify_waiters();
                }
                Next::Sleep(until_ms) => {
                    let wait =
                        Duration::from_millis(u64::try_from(until_ms - now_ms()).unwrap_or(0));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.changed() => {}
                    }
                }
                Next::AwaitOthers => {
                    let notified = self.settled.notified();
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = self.stop.changed() => {}
                    }
                }
            }
        }
    }

    /// Decides this worker's next step, claiming under the shared lock so
    /// that `--limit` and the run's end are exact across connections.
    async fn next(&mut self, last_wait: &mut Option<(i64, WaitReason)>) -> Result<Next> {
        let mut shared = self.shared.lock().await;
        if shared.end.is_some() {
            return Ok(Next::Finish);
        }
        if let Some(limit) = self.config.limit {
            if shared.claimed >= limit {
                if shared.in_flight == 0 {
                    shared.end = Some(RunEnd::LimitReached);
                }
                return Ok(Next::Finish);
            }
        }
        let cfg = &self.config;
        let renderer = self.renderer.clone();
        let claim = self
            .store
            .claim(cfg.campaign_id, &cfg.account, &cfg.windows, now_ms(), |c| {
                renderer.build(c)
            })
            .await?;
        match claim {
            Claim::Ready {
                candidate,
                message,
                log_id,
            } => {
                shared.claimed += 1;
                shared.in_flight += 1;
                Ok(Next::Send(candidate, message, log_id))
            }
            Claim::Unbuildable { candidate, why } => {
                let _ = self.events.send(Event::Unbuildable {
                    row: candidate.row_number,
                    email: candidate.email,
                    why,
                });
                Ok(Next::Sleep(now_ms()))
            }
            Claim::Wait { until_ms, why } => {
                if cfg.no_wait && why != WaitReason::Pacing {
                    shared.end = Some(RunEnd::WouldWait {
                        until_ms,
                        why: describe_wait(&why),
                    });
                    return Ok(Next::Finish);
                }
                let repeated = last_wait
                    .as_ref()
                    .is_some_and(|(u, w)| *u == until_ms && *w == why);
                if why != WaitReason::Pacing && !repeated {
                    let _ = self.events.send(Event::Waiting {
                        until_ms,
                        why: why.clone(),
                    });
                }
                *last_wait = Some((until_ms, why));
                Ok(Next::Sleep(until_ms))
            }
            Claim::Idle { next_due_ms } => {
                if shared.in_flight > 0 {
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

    /// Classifies the transport's answer and records it.
    async fn settle(
        &self,
        c: &Candidate,
        log_id: i64,
        result: std::result::Result<Reply, Reply>,
    ) -> Result<()> {
        let reply = match result {
            Ok(reply) => {
                self.store
                    .record(
                        c,
                        log_id,
                        &Outcome::Sent {
                            reply: reply.to_string(),
                        },
                    )
                    .await?;
                let mut shared = self.shared.lock().await;
                shared.breaker = (String::new(), 0);
                shared.pause_streak = 0;
                drop(shared);
                let _ = self.events.send(Event::Sent {
                    row: c.row_number,
                    email: c.email.clone(),
                });
                return Ok(());
            }
            Err(reply) => reply,
        };
        let text = reply.to_string();
        let attempts = u32::try_from(c.attempts + 1).unwrap_or(u32::MAX);
        match reply.class() {
            ReplyClass::Accepted => {
                self.store
                    .record(c, log_id, &Outcome::Sent { reply: text })
                    .await?;
                let _ = self.events.send(Event::Sent {
                    row: c.row_number,
                    email: c.email.clone(),
                });
            }
            ReplyClass::Transient if attempts < self.config.retry.max_attempts => {
                let retry_at_ms =
                    now_ms() + self.config.retry.delay_after(attempts).as_millis() as i64;
                self.store
                    .record(
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
                self.store.record(c, log_id, &outcome).await?;
                let _ = self.events.send(Event::Failed {
                    row: c.row_number,
                    email: c.email.clone(),
                    reply: text.clone(),
                });
                let mut shared = self.shared.lock().await;
                let key = reply.failure_key();
                if permanent && shared.breaker.0 == key {
                    shared.breaker.1 += 1;
                } else {
                    shared.breaker = (key, u32::from(permanent));
                }
                if shared.breaker.1 >= CIRCUIT_BREAKER {
                    shared.end.get_or_insert(RunEnd::CircuitBreaker(format!(
                        "{CIRCUIT_BREAKER} recipients in a row were refused with the same reply ({text}); \
                         this is most likely the sending account or configuration, not the addresses"
                    )));
                }
            }
            ReplyClass::AccountPaused(kind) => {
                self.store
                    .record(
                        c,
                        log_id,
                        &Outcome::Returned {
                            reply: text.clone(),
                            unlog: false,
                        },
                    )
                    .await?;
                let mut shared = self.shared.lock().await;
                shared.pause_streak += 1;
                let now = now_ms();
                let until_ms = match kind {
                    Pause::Daily => self.daily_window_frees(now).await?,
                    Pause::Backoff => {
                        now + self
                            .config
                            .retry
                            .delay_after(shared.pause_streak)
                            .as_millis() as i64
                    }
                };
                self.store
                    .pause_account(&self.config.account, until_ms, &text)
                    .await?;
                let _ = self.events.send(Event::AccountPaused {
                    until_ms,
                    reply: text.clone(),
                });
                if self.config.no_wait {
                    shared.end.get_or_insert(RunEnd::WouldWait {
                        until_ms,
                        why: format!("the server paused the account: {text}"),
                    });
                }
            }
            ReplyClass::Fatal => {
                self.store
                    .record(
                        c,
                        log_id,
                        &Outcome::Returned {
                            reply: text.clone(),
                            unlog: true,
                        },
                    )
                    .await?;
                self.shared.lock().await.end = Some(RunEnd::Fatal(text));
            }
        }
        Ok(())
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

/// A wait's reason in words, for logs and `--no-wait` messages.
pub fn describe_wait(why: &WaitReason) -> String {
    match why {
        WaitReason::Pacing => "pacing".to_string(),
        WaitReason::Window { window, used } => {
            format!("{} {used}/{} reached", window.describe(), window.max)
        }
        WaitReason::Paused(reply) => format!("the server paused the account: {reply}"),
    }
}
