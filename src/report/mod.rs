//! `hikyaku report`: a campaign's outcome as one self-contained HTML page
//! (inline CSS, charts as inline SVG, nothing fetched), rendered from the
//! same store queries as `status` and `export` so that its numbers are
//! theirs.
//!
//! The figures are gathered in one pass over the recipients and one over
//! the campaign's send log, in memory bounded by the number of distinct
//! domains and reply codes, and laid out here; the template only places
//! them.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use anyhow::Result;
use chrono::{DateTime, Local, TimeZone as _};
use serde::Serialize;

use crate::store::{Counts, SendEntry, State, Store};

/// Rows listed by name in the failures table; the rest are counted.
const LISTED: usize = 500;
/// The slowest transactions shown.
const SLOWEST: usize = 10;
/// Domains shown, those with the most problems first.
const DOMAINS: usize = 20;
/// The longest gaps between sends shown.
const GAPS: usize = 5;
/// Shorter gaps are pacing, not waits.
const MIN_GAP_MS: i64 = 60_000;
/// Beyond this many hours the chart counts per day.
const MAX_HOURLY_BARS: i64 = 14 * 24;

const TEMPLATE: &str = include_str!("report.html.hbs");

/// What the report is about, besides the store's figures.
pub struct Subject {
    pub campaign: String,
    pub campaign_id: i64,
    /// A rehearsal through the file transport.
    pub rehearsal: bool,
    /// Keys of account pauses that concern the campaign's accounts.
    pub pause_keys: Vec<String>,
    pub now_ms: i64,
}

/// Everything the page shows.
#[derive(Debug, Serialize)]
pub struct Report {
    campaign: String,
    generated: String,
    rehearsal: bool,
    total: i64,
    states: Vec<StateRow>,
    state_bar: Vec<Segment>,
    chart: Chart,
    transactions: u64,
    accounts: Vec<AccountRow>,
    gaps: Vec<GapRow>,
    pauses: Vec<PauseRow>,
    replies: Vec<CountRow>,
    bounce_codes: Vec<CountRow>,
    domains: Vec<DomainRow>,
    slowest: Vec<SlowRow>,
    problems: Vec<ProblemRow>,
    problems_total: u64,
    problems_more: u64,
}

#[derive(Debug, Serialize)]
struct StateRow {
    name: &'static str,
    count: i64,
    percent: String,
    color: &'static str,
}

#[derive(Debug, Serialize)]
struct Segment {
    x: String,
    width: String,
    color: &'static str,
    title: String,
}

#[derive(Debug, Default, Serialize)]
struct Chart {
    per: &'static str,
    zone: String,
    bars: Vec<Rect>,
    x_labels: Vec<Label>,
    y_labels: Vec<Label>,
    legend: Vec<Legend>,
}

#[derive(Debug, Serialize)]
struct Rect {
    x: String,
    y: String,
    width: String,
    height: String,
    color: &'static str,
    title: String,
}

#[derive(Debug, Serialize)]
struct Label {
    x: String,
    y: String,
    text: String,
}

#[derive(Debug, Serialize)]
struct Legend {
    color: &'static str,
    name: String,
    count: u64,
}

#[derive(Debug, Serialize)]
struct AccountRow {
    account: String,
    color: &'static str,
    transactions: u64,
    recipients: i64,
    first: String,
    last: String,
}

#[derive(Debug, Serialize)]
struct GapRow {
    account: String,
    from: String,
    until: String,
    length: String,
}

#[derive(Debug, Serialize)]
struct PauseRow {
    account: String,
    until: String,
    reason: String,
}

#[derive(Debug, Serialize)]
struct CountRow {
    label: String,
    count: u64,
    width: String,
    color: &'static str,
}

#[derive(Debug, Serialize)]
struct DomainRow {
    domain: String,
    recipients: u64,
    sent: u64,
    bounced: u64,
    failed: u64,
    deferred: u64,
}

#[derive(Debug, Serialize)]
struct SlowRow {
    email: String,
    account: String,
    seconds: String,
    reply: String,
}

#[derive(Debug, Serialize)]
struct ProblemRow {
    email: String,
    state: String,
    reason: String,
    reply: String,
}

fn color(state: State) -> &'static str {
    match state {
        State::Pending => "#9ca3af",
        State::Sending => "#60a5fa",
        State::Sent => "#16a34a",
        State::Deferred => "#f59e0b",
        State::Failed => "#dc2626",
        State::Unknown => "#a855f7",
        State::Skipped => "#6b7280",
        State::Bounced => "#ea580c",
    }
}

/// Account colours, in the order accounts first appear.
const PALETTE: [&str; 8] = [
    "#2563eb", "#0d9488", "#db2777", "#ca8a04", "#7c3aed", "#0891b2", "#65a30d", "#9f1239",
];

/// A time for people, in the zone of the machine making the report, with
/// its UTC offset.
fn local(ms: i64) -> String {
    Local
        .timestamp_millis_opt(ms)
        .single()
        .map(|t| t.format("%Y-%m-%d %H:%M:%S %:z").to_string())
        .unwrap_or_default()
}

fn duration(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// The reply's code, as replies are grouped: `550 5.1.1`, `250 2.0.0`,
/// `250`; `None` for a local failure without one.
pub fn reply_code(reply: &str) -> Option<String> {
    let mut words = reply.split_whitespace();
    let code = words.next()?;
    let valid = code.len() == 3
        && code.starts_with(['2', '3', '4', '5'])
        && code.bytes().all(|b| b.is_ascii_digit());
    if !valid {
        return None;
    }
    let enhanced = words.next().filter(|w| {
        let parts: Vec<&str> = w.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    });
    Some(match enhanced {
        Some(e) => format!("{code} {e}"),
        None => code.to_string(),
    })
}

/// What one pass over the recipients gathers.
#[derive(Default)]
struct Rows {
    replies: BTreeMap<String, u64>,
    bounce_codes: BTreeMap<String, u64>,
    domains: HashMap<String, [u64; 5]>,
    problems: Vec<ProblemRow>,
    problems_total: u64,
}

impl Rows {
    fn add(&mut self, row: crate::store::ExportRow) {
        let state: Option<State> = row.state.parse().ok();
        if let Some(reply) = row.last_reply.as_deref().filter(|r| !r.is_empty()) {
            let key = reply_code(reply).unwrap_or_else(|| "no reply code".to_string());
            *self.replies.entry(key).or_default() += 1;
        }
        if state == Some(State::Bounced) {
            let code = row
                .reason
                .as_deref()
                .and_then(|r| r.strip_prefix("bounced: "))
                .unwrap_or("unknown")
                .to_string();
            *self.bounce_codes.entry(code).or_default() += 1;
        }
        if let Some(state) = state.filter(|s| *s != State::Skipped) {
            let domain = row
                .email
                .rsplit_once('@')
                .map(|(_, d)| d.to_lowercase())
                .unwrap_or_default();
            let counts = self.domains.entry(domain).or_default();
            counts[0] += 1;
            match state {
                State::Sent => counts[1] += 1,
                State::Bounced => counts[2] += 1,
                State::Failed => counts[3] += 1,
                State::Deferred => counts[4] += 1,
                _ => {}
            }
        }
        if matches!(
            state,
            Some(State::Failed | State::Bounced | State::Unknown | State::Deferred)
        ) {
            self.problems_total += 1;
            if self.problems.len() < LISTED {
                self.problems.push(ProblemRow {
                    email: row.email,
                    state: row.state,
                    reason: row.reason.unwrap_or_default(),
                    reply: row.last_reply.unwrap_or_default(),
                });
            }
        }
    }
}

/// What one pass over the send log gathers.
#[derive(Default)]
struct Sends {
    /// Accounts in order of their first send.
    accounts: Vec<String>,
    per_account: HashMap<String, (u64, i64, i64, i64)>,
    /// (local hour's start, account index) → transactions.
    hours: BTreeMap<(i64, usize), u64>,
    /// (local day's start, account index) → transactions.
    days: BTreeMap<(i64, usize), u64>,
    first: Option<i64>,
    last: Option<i64>,
    slowest: BinaryHeap<Reverse<(i64, String, String, String)>>,
    gaps: BinaryHeap<Reverse<(i64, i64, String)>>,
    previous: Option<(String, i64)>,
    count: u64,
}

impl Sends {
    fn add(&mut self, e: SendEntry) {
        self.count += 1;
        let index = match self.accounts.iter().position(|a| *a == e.account) {
            Some(i) => i,
            None => {
                self.accounts.push(e.account.clone());
                self.accounts.len() - 1
            }
        };
        let entry = self
            .per_account
            .entry(e.account.clone())
            .or_insert((0, 0, e.at, e.at));
        entry.0 += 1;
        entry.1 += e.recipients;
        entry.2 = entry.2.min(e.at);
        entry.3 = entry.3.max(e.at);
        self.first = Some(self.first.map_or(e.at, |f| f.min(e.at)));
        self.last = Some(self.last.map_or(e.at, |l| l.max(e.at)));
        *self.hours.entry((bucket(e.at, HOUR), index)).or_default() += 1;
        *self.days.entry((bucket(e.at, DAY), index)).or_default() += 1;
        if let Some(done) = e.done_at {
            self.slowest.push(Reverse((
                done - e.at,
                e.email,
                e.account.clone(),
                e.last_reply.unwrap_or_default(),
            )));
            if self.slowest.len() > SLOWEST {
                self.slowest.pop();
            }
        }
        // Entries come by account, then time: a gap is between neighbours.
        if let Some((account, at)) = &self.previous {
            if *account == e.account && e.at - *at >= MIN_GAP_MS {
                self.gaps.push(Reverse((e.at - at, *at, e.account.clone())));
                if self.gaps.len() > GAPS {
                    self.gaps.pop();
                }
            }
        }
        self.previous = Some((e.account, e.at));
    }
}

/// Gathers the report's figures from the store.
pub async fn gather(store: &Store, subject: &Subject) -> Result<Report> {
    let counts: Counts = store.counts(subject.campaign_id).await?;
    let mut rows = Rows::default();
    store
        .export(subject.campaign_id, None, |row| {
            rows.add(row);
            Ok(())
        })
        .await?;
    let mut sends = Sends::default();
    store
        .send_entries(subject.campaign_id, |e| {
            sends.add(e);
            Ok(())
        })
        .await?;
    let mut keys = subject.pause_keys.clone();
    keys.extend(sends.accounts.iter().cloned());
    let pauses = store.pauses(&keys).await?;
    Ok(lay_out(subject, &counts, rows, sends, pauses))
}

fn lay_out(
    subject: &Subject,
    counts: &Counts,
    rows: Rows,
    mut sends: Sends,
    pauses: Vec<(String, i64, String)>,
) -> Report {
    let total = counts.total();
    let states: Vec<StateRow> = State::ALL
        .iter()
        .map(|s| {
            let count = counts[*s];
            StateRow {
                name: s.as_str(),
                count,
                percent: percent(count as u64, total.max(0) as u64),
                color: color(*s),
            }
        })
        .collect();
    let mut x = 0.0;
    let state_bar = states
        .iter()
        .filter(|s| s.count > 0)
        .map(|s| {
            let width = 1000.0 * s.count as f64 / total.max(1) as f64;
            let seg = Segment {
                x: format!("{x:.2}"),
                width: format!("{width:.2}"),
                color: s.color,
                title: format!("{}: {} ({})", s.name, s.count, s.percent),
            };
            x += width;
            seg
        })
        .collect();
    let chart = chart(&sends);
    let accounts = sends
        .accounts
        .iter()
        .enumerate()
        .map(|(i, account)| {
            let (transactions, recipients, first, last) = sends.per_account[account];
            AccountRow {
                account: account.clone(),
                color: PALETTE[i % PALETTE.len()],
                transactions,
                recipients,
                first: local(first),
                last: local(last),
            }
        })
        .collect();
    let gaps = std::mem::take(&mut sends.gaps)
        .into_sorted_vec()
        .into_iter()
        .map(|Reverse((length, from, account))| GapRow {
            account,
            from: local(from),
            until: local(from + length),
            length: duration(length),
        })
        .collect();
    let slowest = std::mem::take(&mut sends.slowest)
        .into_sorted_vec()
        .into_iter()
        .map(|Reverse((ms, email, account, reply))| SlowRow {
            email,
            account,
            seconds: format!("{:.1}", ms as f64 / 1000.0),
            reply,
        })
        .collect();
    let since = sends.first.unwrap_or(subject.now_ms);
    let pauses = pauses
        .into_iter()
        .filter(|(_, until, _)| *until >= since)
        .map(|(account, until, reason)| PauseRow {
            account,
            until: local(until),
            reason,
        })
        .collect();
    let mut domains: Vec<(String, [u64; 5])> = rows.domains.into_iter().collect();
    domains.sort_by_key(|(d, c)| (Reverse(c[2] + c[3] + c[4]), Reverse(c[0]), d.clone()));
    Report {
        campaign: subject.campaign.clone(),
        generated: local(subject.now_ms),
        rehearsal: subject.rehearsal,
        total,
        states,
        state_bar,
        chart,
        transactions: sends.count,
        accounts,
        gaps,
        pauses,
        replies: count_rows(rows.replies, "#2563eb"),
        bounce_codes: count_rows(rows.bounce_codes, color(State::Bounced)),
        domains: domains
            .into_iter()
            .take(DOMAINS)
            .map(|(domain, c)| DomainRow {
                domain,
                recipients: c[0],
                sent: c[1],
                bounced: c[2],
                failed: c[3],
                deferred: c[4],
            })
            .collect(),
        slowest,
        problems_more: rows.problems_total - rows.problems.len() as u64,
        problems: rows.problems,
        problems_total: rows.problems_total,
    }
}

fn percent(n: u64, total: u64) -> String {
    if total == 0 {
        return "0%".into();
    }
    format!("{:.1}%", 100.0 * n as f64 / total as f64)
}

/// Bars scaled to the largest count, most frequent first.
fn count_rows(counts: BTreeMap<String, u64>, color: &'static str) -> Vec<CountRow> {
    let max = counts.values().copied().max().unwrap_or(1).max(1);
    let mut rows: Vec<(String, u64)> = counts.into_iter().collect();
    rows.sort_by_key(|(label, n)| (Reverse(*n), label.clone()));
    rows.into_iter()
        .map(|(label, count)| CountRow {
            label,
            count,
            width: format!("{:.1}", 200.0 * count as f64 / max as f64),
            color,
        })
        .collect()
}

/// The chart's plot area inside its 960 x 260 view box.
const LEFT: f64 = 48.0;
const TOP: f64 = 10.0;
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 200.0;

/// Sends per hour (per day for long campaigns), stacked by account.
fn chart(sends: &Sends) -> Chart {
    let (Some(first), Some(last)) = (sends.first, sends.last) else {
        return Chart {
            per: "hour",
            ..Chart::default()
        };
    };
    let hourly = (last - first) / HOUR < MAX_HOURLY_BARS;
    let (bucket_ms, counted) = if hourly {
        (HOUR, &sends.hours)
    } else {
        (DAY, &sends.days)
    };
    let start = bucket(first, bucket_ms);
    let n = ((bucket(last, bucket_ms) - start) / bucket_ms + 1).max(1) as usize;
    let mut stacks: Vec<Vec<u64>> = vec![vec![0; sends.accounts.len()]; n];
    for (&(at, account), &count) in counted {
        let i = (((at - start) / bucket_ms).max(0) as usize).min(n - 1);
        stacks[i][account] += count;
    }
    let peak = stacks
        .iter()
        .map(|s| s.iter().sum::<u64>())
        .max()
        .unwrap_or(1);
    let top = nice_ceiling(peak);
    let slot = WIDTH / n as f64;
    let bar = if slot > 4.0 {
        (slot * 0.8).min(48.0)
    } else {
        slot
    };
    let mut bars = Vec::new();
    for (i, stack) in stacks.iter().enumerate() {
        let mut y = TOP + HEIGHT;
        let at = start + i as i64 * bucket_ms;
        for (account, &count) in stack.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let h = HEIGHT * count as f64 / top as f64;
            y -= h;
            bars.push(Rect {
                x: format!("{:.2}", LEFT + i as f64 * slot + (slot - bar) / 2.0),
                y: format!("{y:.2}"),
                width: format!("{bar:.2}"),
                height: format!("{h:.2}"),
                color: PALETTE[account % PALETTE.len()],
                title: format!(
                    "{}: {count} from {}",
                    bucket_label(at, hourly, true),
                    sends.accounts[account]
                ),
            });
        }
    }
    let every = n.div_ceil(12).max(1);
    let x_labels = (0..n)
        .step_by(every)
        .map(|i| {
            let at = start + i as i64 * bucket_ms;
            Label {
                x: format!("{:.2}", LEFT + (i as f64 + 0.5) * slot),
                y: format!("{:.0}", TOP + HEIGHT + 18.0),
                text: bucket_label(at, hourly, i == 0 || hourly && local_hour(at) == 0),
            }
        })
        .collect();
    let y_labels = (0..=4)
        .map(|k| Label {
            x: format!("{:.0}", LEFT - 6.0),
            y: format!("{:.2}", TOP + HEIGHT - HEIGHT * k as f64 / 4.0 + 4.0),
            text: (top * k / 4).to_string(),
        })
        .collect();
    let legend = sends
        .accounts
        .iter()
        .enumerate()
        .map(|(i, name)| Legend {
            color: PALETTE[i % PALETTE.len()],
            name: name.clone(),
            count: sends.per_account[name].0,
        })
        .collect();
    let zone = Local
        .timestamp_millis_opt(first)
        .single()
        .map(|t| t.format("UTC%:z").to_string())
        .unwrap_or_default();
    Chart {
        per: if hourly { "hour" } else { "day" },
        zone,
        bars,
        x_labels,
        y_labels,
        legend,
    }
}

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// The start of the local hour or day holding `ms`.
fn bucket(ms: i64, size: i64) -> i64 {
    let offset = Local
        .timestamp_millis_opt(ms)
        .single()
        .map_or(0, |t| i64::from(t.offset().local_minus_utc()) * 1000);
    (ms + offset).div_euclid(size) * size - offset
}

fn local_hour(ms: i64) -> u32 {
    use chrono::Timelike as _;
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.with_timezone(&Local).hour())
        .unwrap_or(0)
}

/// `09:00`, with the date when `dated`; `2026-11-27` for a day.
fn bucket_label(ms: i64, hourly: bool, dated: bool) -> String {
    let Some(t) = Local.timestamp_millis_opt(ms).single() else {
        return String::new();
    };
    match (hourly, dated) {
        (true, true) => t.format("%m-%d %H:00").to_string(),
        (true, false) => t.format("%H:00").to_string(),
        (false, _) => t.format("%Y-%m-%d").to_string(),
    }
}

/// The smallest of 1, 2, 5 x 10^k at or above `n`: round axis labels.
fn nice_ceiling(n: u64) -> u64 {
    let mut step = 1u64;
    loop {
        for m in [1, 2, 5] {
            if step.saturating_mul(m) >= n.max(1) {
                return (step * m).max(4);
            }
        }
        step = step.saturating_mul(10);
    }
}

/// The page, as HTML.
pub fn render(report: &Report) -> Result<String> {
    let mut hb = handlebars::Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_template_string("report", TEMPLATE)?;
    Ok(hb.render("report", report)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_group_by_code_and_enhanced_code() {
        assert_eq!(
            reply_code("250 2.0.0 OK 1 - gsmtp").as_deref(),
            Some("250 2.0.0")
        );
        assert_eq!(
            reply_code("550 5.1.1 <a@b>: no such user").as_deref(),
            Some("550 5.1.1")
        );
        assert_eq!(reply_code("250 written to x.eml").as_deref(), Some("250"));
        assert_eq!(reply_code("connection lost"), None);
        assert_eq!(reply_code(""), None);
    }

    #[test]
    fn axis_tops_are_round() {
        assert_eq!(nice_ceiling(0), 4);
        assert_eq!(nice_ceiling(7), 10);
        assert_eq!(nice_ceiling(11), 20);
        assert_eq!(nice_ceiling(480), 500);
        assert_eq!(nice_ceiling(501), 1000);
    }

    fn entry(account: &str, at: i64, done: i64, email: &str) -> SendEntry {
        SendEntry {
            account: account.into(),
            at,
            done_at: Some(done),
            recipients: 1,
            email: email.into(),
            last_reply: Some("250 2.0.0 OK".into()),
        }
    }

    #[test]
    fn sends_are_bucketed_per_hour_and_account_and_the_slowest_kept() {
        let mut sends = Sends::default();
        let hour = 3_600_000;
        let base = 1_795_000_000_000 - 1_795_000_000_000 % hour;
        for i in 0..30 {
            sends.add(entry(
                "a@smtp",
                base + i * 60_000,
                base + i * 60_000 + i,
                &format!("r{i}@x"),
            ));
        }
        for i in 0..5 {
            sends.add(entry(
                "b@smtp",
                base + 2 * hour + i,
                base + 2 * hour + i + 5_000,
                &format!("s{i}@x"),
            ));
        }
        let c = chart(&sends);
        assert_eq!(c.per, "hour");
        assert_eq!(c.legend.iter().map(|l| l.count).sum::<u64>(), 35);
        assert_eq!(c.legend.len(), 2);
        assert!(c.bars.len() >= 2);
        let slowest: Vec<_> = sends.slowest.clone().into_sorted_vec();
        assert_eq!(slowest.len(), SLOWEST);
        assert_eq!(slowest[0].0 .0, 5_000, "{slowest:?}");
        // Account a sent once a minute; b waited two hours after a.
        let gaps = sends.gaps.clone().into_sorted_vec();
        assert_eq!(gaps.len(), GAPS);
        assert!(gaps
            .iter()
            .all(|Reverse((len, _, account))| *len == 60_000 && account == "a@smtp"));
    }

    #[test]
    fn the_page_is_self_contained_and_escapes_what_it_shows() {
        let mut sends = Sends::default();
        sends.add(entry(
            "a@smtp",
            1_795_000_000_000,
            1_795_000_001_000,
            "<b>@x",
        ));
        let mut rows = Rows::default();
        rows.add(crate::store::ExportRow {
            email: "<script>@x.example".into(),
            state: "failed".into(),
            reason: Some("rejected".into()),
            attempts: 1,
            last_reply: Some("550 5.1.1 <script>alert(1)</script>".into()),
            updated_at: 0,
            message_id: None,
            fields: vec![],
        });
        let mut counts = Counts::default();
        for s in State::ALL {
            counts[s] = 1;
        }
        let subject = Subject {
            campaign: "c&o".into(),
            campaign_id: 1,
            rehearsal: false,
            pause_keys: vec![],
            now_ms: 1_795_000_002_000,
        };
        let html = render(&lay_out(&subject, &counts, rows, sends, vec![])).unwrap();
        assert!(!html.contains("<script"), "unescaped input");
        assert!(html.contains("c&amp;o"));
        for external in ["src=\"http", "href=\"http", "@import", "url("] {
            assert!(!html.contains(external), "{external}");
        }
        assert!(html.contains("<svg"));
    }
}
