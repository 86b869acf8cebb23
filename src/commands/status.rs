//! `hikyaku status`: where a campaign stands, and when it can go on.

use std::io::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::send::rehearsal_note;
use super::{identity, output, unstarted, Global};
use crate::campaign::Campaign;
use crate::error::Exit;
use crate::store::{Counts, State, Store};
use crate::time::{now_ms, rfc3339};

#[derive(Serialize)]
struct StatusJson {
    campaign: String,
    /// The file transport's state: written to files, nothing delivered.
    rehearsal: bool,
    total: i64,
    states: States,
    account: String,
    windows: Vec<WindowJson>,
    next_send_at: Option<String>,
    eta: Option<String>,
}

#[derive(Serialize)]
struct States {
    pending: i64,
    sending: i64,
    deferred: i64,
    sent: i64,
    failed: i64,
    unknown: i64,
    skipped: i64,
    bounced: i64,
}

#[derive(Serialize)]
struct WindowJson {
    max: u32,
    period_secs: serde_json::Value,
    used: u64,
}

/// When the campaign can send next and when it would finish, as Unix ms.
pub struct Outlook {
    pub next_send_ms: Option<i64>,
    pub eta_ms: Option<i64>,
    pub usage: Vec<(crate::limits::Window, u64)>,
}

/// Computes the next send and the ETA for `remaining` messages, `ready` of
/// them sendable now (the rest deferred), under the account's windows,
/// pauses and the deferred retries.
pub async fn outlook(
    store: &Store,
    campaign: &Campaign,
    campaign_id: Option<i64>,
    remaining: i64,
    ready: i64,
) -> Result<Outlook> {
    let now = now_ms();
    let account = campaign.account();
    let schedule = store.schedule(&account, &campaign.windows, now).await?;
    let usage = schedule.usage(now);
    if remaining <= 0 {
        return Ok(Outlook {
            next_send_ms: None,
            eta_ms: None,
            usage,
        });
    }
    let mut start = now;
    if let Some((until, _)) = store.account_pause(&campaign.pause_key(), now).await? {
        start = start.max(until);
    }
    if ready == 0 {
        if let Some(id) = campaign_id {
            if let Some(due) = store.next_retry(id).await? {
                start = start.max(due);
            }
        }
    }
    let first_send_ms = store.first_send(&account).await?;
    let used_today = match crate::schedule::warmup_day(&campaign.warmup, first_send_ms, start) {
        Some(day) => store.recipients_since(&account, day.starts_ms).await?,
        None => 0,
    };
    let plan = crate::schedule::Plan {
        windows: schedule,
        hours: campaign.hours.as_ref(),
        zone: campaign.timezone,
        warmup: &campaign.warmup,
        first_send_ms,
        used_today,
    };
    let next = plan.next_send(start);
    let eta = plan.eta(start, u64::try_from(remaining).unwrap_or(0));
    Ok(Outlook {
        next_send_ms: Some(next),
        eta_ms: eta,
        usage,
    })
}

pub async fn status(global: &Global, path: &Path, json: bool) -> Result<Exit> {
    let campaign = Campaign::load(path)?;
    let store = global.store().await?;
    let id = identity(&campaign);
    let record = store.find_campaign(&id).await?;
    let counts: Counts = match &record {
        Some(r) => store.counts(r.id).await?,
        // Never sent: the file's rows as the first send would count them.
        None => {
            unstarted(path, &store, global.progress_bar, async |import, _| {
                import.counts().await
            })
            .await?
        }
    };
    let remaining = counts[State::Pending] + counts[State::Deferred];
    let look = outlook(
        &store,
        &campaign,
        record.as_ref().map(|r| r.id),
        remaining,
        counts[State::Pending],
    )
    .await?;
    let total: i64 = counts.total();
    if json {
        let out = StatusJson {
            campaign: campaign.name.clone(),
            rehearsal: id.delivery.is_rehearsal(),
            total,
            states: States {
                pending: counts[State::Pending],
                sending: counts[State::Sending],
                deferred: counts[State::Deferred],
                sent: counts[State::Sent],
                failed: counts[State::Failed],
                unknown: counts[State::Unknown],
                skipped: counts[State::Skipped],
                bounced: counts[State::Bounced],
            },
            account: campaign.account(),
            windows: look
                .usage
                .iter()
                .map(|(w, used)| WindowJson {
                    max: w.max,
                    period_secs: if w.period.subsec_nanos() == 0 {
                        w.period.as_secs().into()
                    } else {
                        w.period.as_secs_f64().into()
                    },
                    used: *used,
                })
                .collect(),
            next_send_at: look.next_send_ms.and_then(rfc3339),
            eta: look.eta_ms.and_then(rfc3339),
        };
        writeln!(output::stdout(), "{}", serde_json::to_string(&out)?)?;
        return Ok(Exit::Done);
    }
    let mut out = output::stdout();
    writeln!(
        out,
        "campaign {}: {total} rows{}",
        campaign.name,
        rehearsal_note(&campaign)
    )?;
    if record.is_none() {
        writeln!(
            out,
            "  not started yet (hikyaku send {} starts it)",
            path.display()
        )?;
    }
    let states: Vec<String> = counts
        .iter()
        .map(|(s, n)| format!("{} {n}", s.as_str()))
        .collect();
    writeln!(out, "  {}", states.join(", "))?;
    writeln!(out, "account {}", campaign.account())?;
    for (w, used) in &look.usage {
        writeln!(out, "  {}: {used}/{} used", w.describe(), w.max)?;
    }
    if let Some(next) = look.next_send_ms {
        writeln!(out, "next send: {}", local_time(next))?;
    }
    if let Some(eta) = look.eta_ms {
        writeln!(out, "eta: {}", local_time(eta))?;
    }
    Ok(Exit::Done)
}

/// A time for people: local, to the second, with its UTC offset, so that
/// it means the same to a reader in another zone (or on a server in UTC).
pub fn local_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S %:z")
                .to_string()
        })
        .unwrap_or_else(|| "never (past any calendar)".to_string())
}
