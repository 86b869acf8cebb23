//! Progress of a send as the user sees it: an indicatif bar on a terminal
//! (through tracing-indicatif, so that log lines print above it), plain
//! periodic lines otherwise.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::Instrument as _;
use tracing_indicatif::span_ext::IndicatifSpanExt;

use super::status::{local_time, outlook};
use crate::campaign::Campaign;
use crate::engine::{describe_wait, Event, RunEnd};
use crate::store::Store;
use crate::time::now_ms;

/// How often plain output reports progress.
const PLAIN_EVERY: Duration = Duration::from_secs(10);
/// How often the bar's message (rate, ETA) is redrawn while nothing happens.
const REDRAW_EVERY: Duration = Duration::from_secs(1);
/// How often the ETA is worked out again from the send log.
const ETA_EVERY: Duration = Duration::from_secs(2);
/// Rows between two updates of the pre-send check's display.
const ROWS_PER_TICK: u64 = 1024;

pub struct Progress {
    task: tokio::task::JoinHandle<Stats>,
}

/// What the run did, as counted from its events.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub sent: u64,
    /// Messages sent through each account, by account.
    pub by_account: BTreeMap<String, u64>,
}

impl Stats {
    /// "news1@smtp.gmail.com 12, news2@smtp.gmail.com 10": what each
    /// account sent, in the file's order of accounts.
    pub fn by_account(&self, accounts: &[String]) -> String {
        accounts
            .iter()
            .map(|a| format!("{a} {}", self.by_account.get(a).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The campaign's counts when the run starts: the bar shows the campaign,
/// not this run.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    /// Every recipient of the campaign.
    pub total: u64,
    /// Those with nothing left to do (sent, failed, unknown, skipped).
    pub done: u64,
}

/// Where the ETA comes from: the accounts' send log and windows, as for
/// `send --dry-run` and `status`.
pub struct EtaSource {
    pub store: Store,
    pub campaign: Campaign,
    pub campaign_id: i64,
}

impl EtaSource {
    async fn eta_ms(&self, remaining: u64) -> Option<i64> {
        let remaining = i64::try_from(remaining).unwrap_or(i64::MAX);
        outlook(
            &self.store,
            &self.campaign,
            Some(self.campaign_id),
            remaining,
            remaining,
        )
        .await
        .ok()?
        .eta_ms
    }
}

impl Progress {
    pub fn start(
        bar: bool,
        counts: Counts,
        eta: EtaSource,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> Progress {
        // The span is entered around each poll of the task, on whichever
        // thread polls it. A guard from `Span::enter` held across an await
        // would leave it entered on one worker thread and exited on another,
        // and the registry later panicked cloning it after it closed.
        let span = tracing::info_span!("send");
        if bar {
            // Before the task first enters the span, which draws the bar:
            // never in the default style, never at 0 for a resumed campaign.
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} done  {msg}",
            ) {
                span.pb_set_style(&style.progress_chars("=> "));
            }
            span.pb_set_length(counts.total);
            span.pb_set_position(counts.done);
        }
        let accounts: Vec<String> = eta.campaign.accounts.iter().map(|a| a.account()).collect();
        let view = View {
            bar,
            span: span.clone(),
            counts,
            several: accounts.len() > 1,
            accounts,
            eta,
        };
        Progress {
            task: tokio::spawn(view.draw(events).instrument(span)),
        }
    }

    /// Waits for the last event (the engine's sender must be dropped).
    pub async fn finish(self) -> Stats {
        self.task.await.unwrap_or_default()
    }
}

struct View {
    bar: bool,
    span: tracing::Span,
    counts: Counts,
    /// The campaign's accounts; with more than one, every wait and pause
    /// names its account and the progress lines count sends per account.
    accounts: Vec<String>,
    several: bool,
    eta: EtaSource,
}

impl View {
    async fn draw(mut self, mut events: mpsc::UnboundedReceiver<Event>) -> Stats {
        let total = self.counts.total;
        if self.bar {
            self.span.pb_start();
        }
        let mut stats = Stats::default();
        let started = Instant::now();
        let mut eta_ms = self.eta.eta_ms(self.remaining()).await;
        let mut eta_checked = Instant::now();
        if !self.bar {
            tracing::info!(
                "{}/{total} done, {} to send{}",
                self.counts.done,
                self.remaining(),
                eta_ms
                    .map(|t| format!(", ETA {}", local_time(t)))
                    .unwrap_or_default()
            );
        }
        let mut last_line = Instant::now();
        let mut last_wait = String::new();
        let mut wait = String::new();
        let mut redraw = tokio::time::interval(REDRAW_EVERY);
        loop {
            let event = tokio::select! {
                event = events.recv() => match event {
                    Some(event) => Some(event),
                    None => break,
                },
                _ = redraw.tick() => None,
            };
            match event {
                None => {}
                Some(Event::Sent {
                    row,
                    email,
                    account,
                }) => {
                    stats.sent += 1;
                    self.counts.done += 1;
                    wait.clear();
                    tracing::debug!("row {row} ({email}): sent through {account}");
                    *stats.by_account.entry(account).or_default() += 1;
                }
                Some(Event::Deferred {
                    row,
                    email,
                    reply,
                    retry_at_ms,
                }) => {
                    tracing::warn!(
                        "row {row} ({email}): {reply}; retrying at {}",
                        local_time(retry_at_ms)
                    );
                }
                Some(Event::Failed { row, email, reply }) => {
                    self.counts.done += 1;
                    tracing::warn!("row {row} ({email}): failed: {reply}");
                }
                Some(Event::Unknown { row, email, reply }) => {
                    self.counts.done += 1;
                    tracing::warn!(
                        "row {row} ({email}): {reply}; the server may have accepted it, so it is \
                         `unknown` and not sent again (--resend-unknown sends it again)"
                    );
                }
                Some(Event::Unbuildable { row, email, why }) => {
                    self.counts.done += 1;
                    tracing::warn!("row {row} ({email}): cannot build the message: {why}");
                }
                Some(Event::Waiting {
                    until_ms,
                    why,
                    account,
                }) => {
                    let text = format!(
                        "{}{}, next send {}",
                        self.through(&account),
                        describe_wait(&why),
                        local_time(until_ms)
                    );
                    self.show_wait(&mut last_wait, &mut wait, text);
                }
                Some(Event::WaitingForRetry { until_ms }) => {
                    let text = format!(
                        "waiting for deferred retries until {}",
                        local_time(until_ms)
                    );
                    self.show_wait(&mut last_wait, &mut wait, text);
                }
                Some(Event::AccountPaused {
                    until_ms,
                    why,
                    account,
                }) => {
                    let through = self.through(&account);
                    tracing::warn!("{through}{why}; resuming at {}", local_time(until_ms));
                    // The wait that follows says the same: do not repeat it.
                    last_wait = format!("{through}{why}, next send {}", local_time(until_ms));
                    wait = last_wait.clone();
                }
                Some(Event::AccountSetAside { account, end }) => {
                    tracing::warn!(
                        "account {account} set aside for this run: {}; the other accounts carry on",
                        self.set_aside_why(&account, &end)
                    );
                }
            }
            if eta_checked.elapsed() >= ETA_EVERY {
                eta_checked = Instant::now();
                eta_ms = self.eta.eta_ms(self.remaining()).await;
            }
            let elapsed = started.elapsed().as_secs_f64();
            let eta_ms = match self.remaining() {
                0 => None,
                left => eta_ms.or_else(|| by_rate(stats.sent, elapsed, left)),
            };
            if self.bar {
                let mut parts = Vec::new();
                if stats.sent > 0 {
                    parts.push(rate(stats.sent as f64 / elapsed.max(0.001)));
                }
                if let Some(eta) = eta_ms {
                    parts.push(format!("ETA {}", until(eta, now_ms())));
                }
                if self.several && stats.sent > 0 {
                    parts.push(stats.by_account(&self.accounts));
                }
                if !wait.is_empty() {
                    parts.push(wait.clone());
                }
                self.span.pb_set_position(self.counts.done);
                self.span.pb_set_message(&parts.join("  "));
            } else if last_line.elapsed() >= PLAIN_EVERY {
                last_line = Instant::now();
                let by_account = if self.several {
                    format!(" ({})", stats.by_account(&self.accounts))
                } else {
                    String::new()
                };
                tracing::info!(
                    "{}/{total} done, {} sent in this run{by_account} ({}){}",
                    self.counts.done,
                    stats.sent,
                    rate(stats.sent as f64 / elapsed.max(0.001)),
                    eta_ms
                        .map(|t| format!(", ETA {}", local_time(t)))
                        .unwrap_or_default()
                );
            }
        }
        stats
    }

    /// "account X: " before what one account waits for, with several.
    fn through(&self, account: &str) -> String {
        if self.several {
            format!("account {account}: ")
        } else {
            String::new()
        }
    }

    /// Why an account was set aside, in words: a refused login with what
    /// to do about it, or the wait `--no-wait` did not take.
    fn set_aside_why(&self, account: &str, end: &RunEnd) -> String {
        set_aside_why(&self.eta.campaign, account, end)
    }

    fn remaining(&self) -> u64 {
        self.counts.total.saturating_sub(self.counts.done)
    }

    /// Shows what sending waits for, once: every connection may report the
    /// same wait. On the bar it stays until the next message goes out.
    fn show_wait(&self, last: &mut String, shown: &mut String, text: String) {
        if *last == text {
            return;
        }
        if !self.bar {
            tracing::info!("{}/{} done; {text}", self.counts.done, self.counts.total);
        }
        shown.clone_from(&text);
        *last = text;
    }
}

/// Why `account` of `campaign` was set aside, in words.
pub fn set_aside_why(campaign: &Campaign, account: &str, end: &RunEnd) -> String {
    match end {
        RunEnd::Fatal(reply) => {
            let index = campaign
                .accounts
                .iter()
                .position(|a| a.account() == account)
                .unwrap_or(0);
            format!(
                "{:#}",
                super::send::refused_by_server(&campaign.for_account(index), reply)
            )
        }
        RunEnd::WouldWait { until_ms, why } => format!(
            "{why}; next send possible at {} (--no-wait)",
            local_time(*until_ms)
        ),
        RunEnd::CircuitBreaker(why) => why.clone(),
        other => format!("{other:?}"),
    }
}

/// When the rest would be sent at this run's rate so far: the estimate when
/// no window paces the account.
fn by_rate(sent: u64, elapsed_secs: f64, remaining: u64) -> Option<i64> {
    if sent == 0 || elapsed_secs <= 0.0 {
        return None;
    }
    let secs = remaining as f64 * elapsed_secs / sent as f64;
    Some(now_ms() + (secs * 1000.0) as i64)
}

/// A rate with at most one decimal, in the unit that keeps it readable:
/// `12.5/s`, `10/min`, `3/h`.
pub fn rate(per_sec: f64) -> String {
    let (value, unit) = if per_sec >= 1.0 {
        (per_sec, "s")
    } else if per_sec * 60.0 >= 1.0 {
        (per_sec * 60.0, "min")
    } else {
        (per_sec * 3600.0, "h")
    };
    let text = format!("{value:.1}");
    format!("{}/{unit}", text.strip_suffix(".0").unwrap_or(&text))
}

/// How long until `at_ms`, to the second under an hour, to the minute above.
pub fn until(at_ms: i64, now_ms: i64) -> String {
    let secs = u64::try_from((at_ms - now_ms + 999) / 1000).unwrap_or(0);
    if secs == 0 {
        return "now".to_string();
    }
    let rounded = if secs >= 3600 { secs / 60 * 60 } else { secs };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

/// Progress of the pre-send check, which reads and builds every row before
/// the first message goes out: a spinner with the rows checked on a
/// terminal, a line every few seconds otherwise.
pub struct Checking {
    bar: bool,
    span: tracing::Span,
    file: String,
    last_line: Instant,
    /// The count last shown.
    ticked: u64,
}

impl Checking {
    pub fn start(bar: bool, file: &std::path::Path) -> Checking {
        let span = tracing::info_span!("check");
        let file = file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if bar {
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} checking {msg}: {human_pos} rows ({elapsed})",
            ) {
                span.pb_set_style(&style);
            }
            span.pb_set_message(&file);
            span.pb_start();
        }
        Checking {
            bar,
            span,
            file,
            last_line: Instant::now(),
            ticked: 0,
        }
    }

    /// `rows` rows have been read so far (counted a row or a batch at a time).
    pub fn rows(&mut self, rows: u64) {
        if rows / ROWS_PER_TICK == self.ticked / ROWS_PER_TICK {
            return;
        }
        self.ticked = rows;
        if self.bar {
            self.span.pb_set_position(rows);
        } else if self.last_line.elapsed() >= PLAIN_EVERY {
            self.last_line = Instant::now();
            tracing::info!("checking {}: {rows} rows so far", self.file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_have_at_most_one_decimal_in_a_readable_unit() {
        assert_eq!(rate(12.3456), "12.3/s");
        assert_eq!(rate(3.0), "3/s");
        assert_eq!(rate(10.0 / 60.0), "10/min");
        assert_eq!(rate(0.5), "30/min");
        assert_eq!(rate(500.0 / 86_400.0), "20.8/h");
    }

    #[test]
    fn time_left_reads_in_seconds_then_minutes() {
        assert_eq!(until(1_000, 1_000), "now");
        assert_eq!(until(46_000, 1_000), "45s");
        assert_eq!(until(1_000 + 754_000, 1_000), "12m 34s");
        assert_eq!(until(1_000 + 7_384_000, 1_000), "2h 3m");
        assert_eq!(until(0, 1_000), "now");
    }
}
