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
    /// Only with several `[[accounts]]` (SPEC §9).
    #[serde(skip_serializing_if = "Option::is_none")]
    accounts: Option<Vec<AccountJson>>,
}

#[derive(Serialize)]
struct AccountJson {
    account: String,
    windows: Vec<WindowJson>,
    next_send_at: Option<String>,
    /// "active", "paused" or "set aside".
    state: &'static str,
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
    /// The windows of the account that sends next (the first account when
    /// nothing is left), and what they hold now.
    pub account: String,
    pub usage: Vec<(crate::limits::Window, u64)>,
    /// Every account, in the file's order.
    pub accounts: Vec<AccountOutlook>,
}

/// One account's part of the [`Outlook`].
pub struct AccountOutlook {
    pub account: String,
    pub usage: Vec<(crate::limits::Window, u64)>,
    /// This account's own next slot, when anything is left to send.
    pub next_send_ms: Option<i64>,
    /// Until when, and why, the server paused the account.
    pub paused: Option<(i64, String)>,
    /// Since when, and why, the account is set aside (its login refused):
    /// it sends nothing until it logs in again.
    pub set_aside: Option<(i64, String)>,
    /// How many of the remaining messages it would send.
    pub share: u64,
}

/// Computes the next send and the ETA for `remaining` messages, `ready` of
/// them sendable now (the rest deferred), under every account's windows,
/// pauses and warm-up, the schedule and the deferred retries, each message
/// given to the account that can send it soonest.
pub async fn outlook(
    store: &Store,
    campaign: &Campaign,
    campaign_id: Option<i64>,
    remaining: i64,
    ready: i64,
) -> Result<Outlook> {
    let now = now_ms();
    let mut start = now;
    if remaining > 0 && ready == 0 {
        if let Some(id) = campaign_id {
            if let Some(due) = store.next_retry(id).await? {
                start = start.max(due);
            }
        }
    }
    let mut plans = Vec::new();
    let mut accounts = Vec::new();
    let several = campaign.accounts.len() > 1;
    for account in &campaign.accounts {
        let key = account.account();
        let schedule = store.schedule(&key, &account.windows, now).await?;
        let paused = store.account_pause(&account.pause_key(), now).await?;
        let set_aside = match several {
            true => store.set_aside_since(&account.pause_key()).await?,
            false => None,
        };
        let from = start.max(paused.as_ref().map_or(now, |(until, _)| *until));
        let first_send_ms = store.first_send(&key).await?;
        let used_today = match crate::schedule::warmup_day(&account.warmup, first_send_ms, from) {
            Some(day) => store.recipients_since(&key, day.starts_ms).await?,
            None => 0,
        };
        let usage = schedule.usage(now);
        let available = set_aside.is_none();
        accounts.push(AccountOutlook {
            account: key,
            usage,
            next_send_ms: None,
            paused,
            set_aside,
            share: 0,
        });
        if !available {
            continue;
        }
        plans.push(crate::accounts::AccountPlan {
            plan: crate::schedule::Plan {
                windows: schedule,
                hours: campaign.hours.as_ref(),
                zone: campaign.timezone,
                warmup: &account.warmup,
                first_send_ms,
                used_today,
            },
            not_before_ms: from,
        });
    }
    let remaining = u64::try_from(remaining).unwrap_or(0);
    let combined = crate::accounts::plan(&plans, start, remaining);
    // The accounts that plan, in order: those not set aside.
    let planned: Vec<usize> = (0..accounts.len())
        .filter(|i| accounts[*i].set_aside.is_none())
        .collect();
    for ((index, plan), share) in planned.iter().zip(&plans).zip(&combined.shares) {
        let outlook = &mut accounts[*index];
        outlook.share = *share;
        if remaining > 0 {
            outlook.next_send_ms = Some(plan.plan.next_send(plan.not_before_ms));
        }
    }
    let next = combined.next.map_or(0, |(i, _)| planned[i]);
    Ok(Outlook {
        next_send_ms: combined.next.map(|(_, at)| at),
        eta_ms: combined.eta_ms,
        account: accounts[next].account.clone(),
        usage: accounts[next].usage.clone(),
        accounts,
    })
}

fn windows_json(usage: &[(crate::limits::Window, u64)]) -> Vec<WindowJson> {
    usage
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
        .collect()
}

/// "set aside" (its login refused), "paused" (by the server) or "active".
fn account_state(account: &AccountOutlook) -> &'static str {
    if account.set_aside.is_some() {
        "set aside"
    } else if account.paused.is_some() {
        "paused"
    } else {
        "active"
    }
}

/// Each account's usage, pause and next slot, as `status` and
/// `send --dry-run` print them; with several, what each would send.
pub fn write_accounts(out: &mut impl std::io::Write, look: &Outlook) -> Result<()> {
    let several = look.accounts.len() > 1;
    for account in &look.accounts {
        let state = account_state(account);
        if several {
            writeln!(
                out,
                "account {} ({state}): {} of the remaining messages",
                account.account, account.share
            )?;
        } else {
            writeln!(out, "account {}", account.account)?;
        }
        for (w, used) in &account.usage {
            writeln!(out, "  {}: {used}/{} used", w.describe(), w.max)?;
        }
        if let Some((since, why)) = &account.set_aside {
            writeln!(
                out,
                "  set aside since {}: {why} (sends again once it logs in)",
                local_time(*since)
            )?;
        }
        if let Some((until, why)) = &account.paused {
            writeln!(out, "  paused until {}: {why}", local_time(*until))?;
        }
        if let (true, Some(next)) = (several, account.next_send_ms) {
            writeln!(out, "  next send: {}", local_time(next))?;
        }
    }
    Ok(())
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
            account: look.account.clone(),
            windows: windows_json(&look.usage),
            next_send_at: look.next_send_ms.and_then(rfc3339),
            eta: look.eta_ms.and_then(rfc3339),
            accounts: (look.accounts.len() > 1).then(|| {
                look.accounts
                    .iter()
                    .map(|a| AccountJson {
                        account: a.account.clone(),
                        windows: windows_json(&a.usage),
                        next_send_at: a.next_send_ms.and_then(rfc3339),
                        state: account_state(a),
                    })
                    .collect()
            }),
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
    write_accounts(&mut out, &look)?;
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
