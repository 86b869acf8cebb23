//! Progress of a send as the user sees it: an indicatif bar on a terminal
//! (through tracing-indicatif, so that log lines print above it), plain
//! periodic lines otherwise.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::Instrument as _;
use tracing_indicatif::span_ext::IndicatifSpanExt;

use super::status::local_time;
use crate::engine::{describe_wait, Event};

/// How often plain output reports progress.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    task: tokio::task::JoinHandle<Stats>,
}

/// What the run did, as counted from its events.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub sent: u64,
}

impl Progress {
    pub fn start(bar: bool, total: u64, events: mpsc::UnboundedReceiver<Event>) -> Progress {
        // The span is entered around each poll of the task, on whichever
        // thread polls it. A guard from `Span::enter` held across an await
        // would leave it entered on one worker thread and exited on another,
        // and the registry later panicked cloning it after it closed.
        let span = tracing::info_span!("send");
        Progress {
            task: tokio::spawn(draw(bar, total, events, span.clone()).instrument(span)),
        }
    }

    /// Waits for the last event (the engine's sender must be dropped).
    pub async fn finish(self) -> Stats {
        self.task.await.unwrap_or_default()
    }
}

/// Shows what sending waits for, once: every connection may report the same wait.
fn show_wait(bar: bool, span: &tracing::Span, last: &mut String, text: String) {
    if *last == text {
        return;
    }
    if bar {
        span.pb_set_message(&text);
    } else {
        tracing::info!("{text}");
    }
    *last = text;
}

async fn draw(
    bar: bool,
    total: u64,
    mut events: mpsc::UnboundedReceiver<Event>,
    span: tracing::Span,
) -> Stats {
    if bar {
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} sent  {per_sec}  ETA {eta}  {msg}",
        ) {
            span.pb_set_style(&style.progress_chars("=> "));
        }
        span.pb_set_length(total);
        span.pb_start();
    }
    let mut stats = Stats::default();
    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut last_wait = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Sent { .. } => {
                stats.sent += 1;
                if bar {
                    span.pb_inc(1);
                    span.pb_set_message("");
                }
            }
            Event::Deferred {
                row,
                email,
                reply,
                retry_at_ms,
            } => {
                tracing::warn!(
                    "row {row} ({email}): {reply}; retrying at {}",
                    local_time(retry_at_ms)
                );
            }
            Event::Failed { row, email, reply } => {
                tracing::warn!("row {row} ({email}): failed: {reply}");
            }
            Event::Unbuildable { row, email, why } => {
                tracing::warn!("row {row} ({email}): cannot build the message: {why}");
            }
            Event::Waiting { until_ms, why } => {
                let text = format!(
                    "{}, next send {}",
                    describe_wait(&why),
                    local_time(until_ms)
                );
                show_wait(bar, &span, &mut last_wait, text);
            }
            Event::WaitingForRetry { until_ms } => {
                let text = format!(
                    "waiting for deferred retries until {}",
                    local_time(until_ms)
                );
                show_wait(bar, &span, &mut last_wait, text);
            }
            Event::AccountPaused { until_ms, why } => {
                tracing::warn!("{why}; resuming at {}", local_time(until_ms));
                // The wait that follows says the same: do not repeat it.
                last_wait = format!("{why}, next send {}", local_time(until_ms));
            }
        }
        if !bar && last_line.elapsed() >= PLAIN_EVERY {
            last_line = Instant::now();
            let rate = stats.sent as f64 / started.elapsed().as_secs_f64().max(0.001);
            tracing::info!("sent {}/{total} ({rate:.1}/s)", stats.sent);
        }
    }
    stats
}
