//! `hikyaku campaigns` and `hikyaku reset`: what the state database holds,
//! and forgetting one campaign so that its name can be used again.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::log::{plural, OUTCOME};
use super::status::local_time;
use super::{output, Global};
use crate::campaign::Campaign;
use crate::error::{input_error, Exit};
use crate::store::{CampaignSummary, Counts};
use crate::time::rfc3339;

#[derive(Serialize)]
struct CampaignJson<'a> {
    campaign: &'a str,
    file: Option<&'a str>,
    /// Counts per state of real delivery; `null` if it never started.
    states: Option<&'a Counts>,
    /// Counts per state of the file transport's rehearsal, if any.
    rehearsal_states: Option<&'a Counts>,
    last_activity: Option<String>,
    /// The process sending it now.
    running: Option<&'a str>,
}

pub async fn campaigns(global: &Global, json: bool) -> Result<Exit> {
    let store = global.store().await?;
    let all = store.campaigns().await?;
    store.close().await;
    let mut out = output::stdout();
    if json {
        let list: Vec<CampaignJson> = all
            .iter()
            .map(|c| CampaignJson {
                campaign: &c.name,
                file: c.file.as_deref(),
                states: c.delivery.as_ref(),
                rehearsal_states: c.rehearsal.as_ref(),
                last_activity: c.last_activity_ms.and_then(rfc3339),
                running: c.running.as_deref(),
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string(&list)?)?;
        return Ok(Exit::Done);
    }
    if all.is_empty() {
        tracing::info!(target: OUTCOME, "no campaign in this state database yet");
    }
    for c in &all {
        writeln!(out, "{}", describe(c))?;
    }
    Ok(Exit::Done)
}

/// A campaign in a few lines: name and file, its states, when it last moved.
fn describe(c: &CampaignSummary) -> String {
    let mut text = format!(
        "{}  {}",
        c.name,
        c.file
            .as_deref()
            .unwrap_or("(campaign file not recorded yet)")
    );
    if let Some(counts) = &c.delivery {
        text.push_str(&format!("\n  {}", states(counts)));
    }
    if let Some(counts) = &c.rehearsal {
        text.push_str(&format!(
            "\n  rehearsal (file transport, nothing delivered): {}",
            states(counts)
        ));
    }
    match c.last_activity_ms {
        Some(ms) => text.push_str(&format!("\n  last activity {}", local_time(ms))),
        None => text.push_str("\n  no recipient recorded"),
    }
    if let Some(holder) = &c.running {
        text.push_str(&format!("; being sent now by {holder}"));
    }
    text
}

/// "12 rows: 10 sent, 2 skipped": the states that hold rows.
fn states(counts: &Counts) -> String {
    let total: i64 = counts.total();
    let held: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(state, n)| format!("{n} {}", state.as_str()))
        .collect();
    let rows = plural(u64::try_from(total).unwrap_or(0), "row");
    if held.is_empty() {
        rows
    } else {
        format!("{rows}: {}", held.join(", "))
    }
}

/// `hikyaku reset CAMPAIGN`: CAMPAIGN is a campaign file (its `name` is
/// reset) or, when no such file exists, a campaign name as `campaigns`
/// lists it, so that a name whose file is gone or broken can be reset too.
pub async fn reset(global: &Global, target: &str, yes: bool) -> Result<Exit> {
    let name = if Path::new(target).is_file() {
        Campaign::load(Path::new(target))
            .with_context(|| {
                format!("reading the campaign name from {target} (or give the name itself)")
            })?
            .name
    } else {
        target.to_string()
    };
    let store = global.store().await?;
    let Some(summary) = store
        .campaigns()
        .await?
        .into_iter()
        .find(|c| c.name == name)
    else {
        return Err(input_error(format!(
            "no campaign named {name:?} in this state database; `hikyaku campaigns` lists them"
        )));
    };
    if let Some(holder) = &summary.running {
        anyhow::bail!("campaign {name:?} is being sent by {holder}; stop it first, then reset");
    }
    if !yes {
        let terminal = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
        if !terminal {
            return Err(input_error(format!(
                "reset forgets everything recorded for campaign {name:?}; \
                 there is no terminal to ask on, so confirm with --yes"
            )));
        }
        eprintln!("{}", describe(&summary));
        eprint!("forget this campaign's state? Its recipients could then be sent to again [y/N] ");
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim().to_lowercase().as_str(), "y" | "yes") {
            return Err(input_error("not confirmed; nothing was forgotten"));
        }
    }
    let forgotten = store.reset(&name).await?.unwrap_or(0);
    store.close().await;
    tracing::info!(
        target: OUTCOME,
        "forgot campaign {name:?} ({}); its sends still count in the account's limits",
        plural(forgotten, "recipient row")
    );
    Ok(Exit::Done)
}
