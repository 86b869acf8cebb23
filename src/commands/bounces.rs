//! `hikyaku bounces`: reads the sending accounts' mailboxes and records the
//! bounces, delays and unsubscribe requests that concern the campaign.

use std::path::Path;

use anyhow::Result;

use super::log::{plural, OUTCOME};
use super::{identity, Global};
use crate::bounces::{self, Options};
use crate::campaign::{Campaign, ImapConfig, TransportConfig};
use crate::error::{input_error, Exit};

/// Notifications take a while to come back; a day's margin covers time
/// zones, since IMAP searches by the server's calendar day.
const MARGIN_DAYS: i64 = 1;

pub async fn bounces(
    global: &Global,
    path: &Path,
    since: Option<&str>,
    move_to: Option<&str>,
) -> Result<Exit> {
    let since = since.map(parse_day).transpose()?;
    let campaign = Campaign::load(path)?;
    if let TransportConfig::File { .. } = campaign.transport {
        return Err(input_error(format!(
            "{}: the file transport delivers nothing, so nothing can bounce; bounces are read \
             for a campaign sent through SMTP",
            campaign.path.display()
        )));
    }
    // Each account's mailbox, as that account sends (its own `from`).
    let mut mailboxes: Vec<(Campaign, ImapConfig)> = Vec::new();
    for index in 0..campaign.accounts.len() {
        let sending = campaign.for_account(index);
        match sending.imap.clone() {
            Some(imap) => mailboxes.push((sending, imap)),
            None if campaign.accounts.len() > 1 => tracing::warn!(
                "account {}: hikyaku knows the mailbox of the gmail and workspace presets only, \
                 and [imap] names none; its bounces are not read",
                sending.account()
            ),
            None => {}
        }
    }
    if mailboxes.is_empty() {
        return Err(input_error(format!(
            "{}: hikyaku knows the mailbox of the gmail and workspace presets only: add an \
             [imap] section with the account's IMAP host",
            campaign.path.display()
        )));
    }
    if let Some(folder) = move_to {
        if folder.is_empty()
            || !folder
                .chars()
                .all(|c| c.is_ascii() && !c.is_ascii_control())
        {
            return Err(input_error(format!(
                "--move-to {folder:?}: only non-empty ASCII folder names are supported"
            )));
        }
        if mailboxes.iter().any(|(_, imap)| folder == imap.folder) {
            return Err(input_error(format!(
                "--move-to {folder:?} is the folder being read; give another one"
            )));
        }
    }
    let store = global.store().await?;
    let record = store.find_campaign(&identity(&campaign)).await?.ok_or_else(|| {
        input_error(format!(
            "campaign {:?} has no state in this database yet: nothing was sent, so nothing can bounce",
            campaign.name
        ))
    })?;
    let since = match since {
        Some(day) => day,
        None => {
            let created = store
                .campaign_created_at(record.id)
                .await?
                .unwrap_or_else(crate::time::now_ms);
            chrono::DateTime::from_timestamp_millis(created)
                .map(|t| t.date_naive() - chrono::Days::new(MARGIN_DAYS as u64))
                .unwrap_or_default()
        }
    };
    let options = Options {
        since,
        move_to: move_to.map(str::to_string),
    };
    let several = mailboxes.len() > 1;
    let mut failed = Vec::new();
    for (sending, imap) in &mailboxes {
        let read = bounces::run(sending, imap, &store, record.id, &options).await;
        let mailbox = several.then(|| format!("account {}: ", sending.account()));
        match read {
            Ok(summary) => tell(&summary, imap, since, move_to, mailbox.as_deref()),
            // One mailbox that cannot be read leaves the others to read.
            Err(e) if several => {
                tracing::error!("{}{e:#}", mailbox.unwrap_or_default());
                failed.push(sending.account());
            }
            Err(e) => return Err(e),
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "the mailbox of {} could not be read (see above); the others were",
            failed.join(", ")
        );
    }
    Ok(Exit::Done)
}

/// What one mailbox held, in words; `mailbox` names its account when the
/// campaign has several.
fn tell(
    summary: &bounces::Summary,
    imap: &ImapConfig,
    since: chrono::NaiveDate,
    move_to: Option<&str>,
    mailbox: Option<&str>,
) {
    let mailbox = mailbox.unwrap_or("");
    for f in &summary.bounced {
        let suppressed = if f.suppressed {
            "; suppressed"
        } else {
            "; not suppressed (not a permanent failure)"
        };
        tracing::info!("{}: bounced, {}{suppressed}", f.email, said(f));
    }
    for f in &summary.delayed {
        tracing::info!(
            "{}: delivery delayed, {} (still sent: the server keeps trying)",
            f.email,
            said(f)
        );
    }
    for sender in &summary.unsubscribed {
        tracing::info!("{sender} asked to unsubscribe by mail; suppressed");
    }
    for (uid, why) in &summary.unreadable {
        tracing::warn!("message {uid} in {} {why}; left where it is", imap.folder);
    }
    if summary.too_large > 0 {
        tracing::warn!(
            "{} larger than 40 MB left unread",
            plural(summary.too_large as u64, "message")
        );
    }
    let mut parts = vec![
        format!(
            "{} recorded",
            plural(summary.bounced.len() as u64, "bounce")
        ),
        format!("{} noted", plural(summary.delayed.len() as u64, "delay")),
    ];
    if !summary.unsubscribed.is_empty() || summary.unsubscribed_before > 0 {
        parts.push(format!(
            "{} suppressed",
            plural(summary.unsubscribed.len() as u64, "unsubscribe request")
        ));
    }
    let already = summary.already + summary.unsubscribed_before;
    if already > 0 {
        parts.push(format!(
            "{} already recorded",
            plural(already as u64, "notification")
        ));
    }
    if summary.elsewhere > 0 {
        parts.push(format!(
            "{} about other messages left alone",
            plural(summary.elsewhere as u64, "notification")
        ));
    }
    if let Some(folder) = move_to {
        parts.push(format!("{} moved to {folder}", summary.moved));
    }
    tracing::info!(
        target: OUTCOME,
        "{mailbox}{} in {} since {}: {}",
        plural(summary.messages as u64, "message"),
        imap.folder,
        since.format("%Y-%m-%d"),
        parts.join(", ")
    );
}

/// A notification's status and what the remote server said.
fn said(f: &bounces::Finding) -> String {
    if f.diagnostic.is_empty() {
        f.status.clone()
    } else {
        format!("{}: {}", f.status, f.diagnostic)
    }
}

/// `--since 2026-11-20`.
fn parse_day(text: &str) -> Result<chrono::NaiveDate> {
    chrono::NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").map_err(|_| {
        input_error(format!(
            "--since {text:?} is not a date like 2026-11-20 (YYYY-MM-DD)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_calendar_day() {
        assert_eq!(
            parse_day("2026-11-20").unwrap(),
            chrono::NaiveDate::from_ymd_opt(2026, 11, 20).unwrap()
        );
        assert!(parse_day("20/11/2026").is_err());
        assert!(parse_day("2026-02-30").is_err());
    }
}
