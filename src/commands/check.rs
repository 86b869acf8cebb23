//! `hikyaku check`: everything `send` would refuse, found without sending.

use std::io::Write as _;
use std::path::Path;

use anyhow::Result;

use super::log::OUTCOME;
use super::send::refused_by_server;
use super::{content_changed, fingerprint, identity, load, output, scan, Global, Rows};
use crate::campaign::{Campaign, PasswordSource, TlsMode, TransportConfig};
use crate::error::Exit;
use crate::message::mailbox;
use crate::reply::ReplyClass;
use crate::store::{ImportInto, State};
use crate::transport::{AnyTransport, Transport};

pub async fn check(global: &Global, path: &Path, connect: bool) -> Result<Exit> {
    let loaded = load(path)?;
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    let mut limits = Vec::new();
    // Every account, as it sends: its login, password, windows, DKIM and `from`.
    for index in 0..loaded.campaign.accounts.len() {
        let account = loaded.campaign.for_account(index);
        if connect {
            limits.extend(prove_login(&account).await?);
        }
        errors.extend(missing_password(&account).await);
        notes.extend(no_limits(&account));
        notes.extend(dkim_misaligned(&account));
        if loaded.campaign.accounts.len() > 1 {
            if let Err(e) = crate::personalize::Pipeline::load(&account) {
                errors.push(format!("[[accounts]] #{}: {e:#}", index + 1));
            }
        }
    }
    loaded.pipeline.limit_size(limits.into_iter().min());
    let campaign = &loaded.campaign;
    let store = global.store().await?;
    let id = identity(campaign);
    let parts = fingerprint(&loaded)?;
    // A campaign never sent is read without making its row where others see it.
    let record = store.find_campaign(&id).await?;
    let into = match &record {
        Some(record) => {
            errors.extend(content_changed(record, &parts)?);
            ImportInto::Discarded(record)
        }
        None => ImportInto::Found(&id),
    };
    let (mut import, found) = scan(&loaded, &store, into, Rows::Build, global.progress_bar).await?;
    let counts = import.counts().await;
    import.rollback().await?;
    let counts = counts?;
    found.warnings.warn(50);
    if campaign.message.list_unsubscribe.is_none() {
        notes.push("[message] has no list_unsubscribe; Gmail expects bulk mail to offer one-click unsubscribe".to_string());
    }
    for note in notes {
        tracing::warn!("{}: {note}", path.display());
    }
    for error in &errors {
        tracing::error!("{}: {error}", path.display());
    }
    if !found.problems.is_empty() {
        for line in found.problems.lines(found.checked, 200) {
            tracing::error!("{line}");
        }
        tracing::info!(target: OUTCOME, "{}", found.problems.advice(found.checked));
    }
    if !errors.is_empty() || !found.problems.is_empty() {
        return Ok(Exit::Usage);
    }
    writeln!(
        output::stdout(),
        "{}: {} rows, {} to send, {} already sent, {} skipped",
        path.display(),
        found.rows,
        counts[State::Pending] + counts[State::Deferred],
        counts[State::Sent],
        counts[State::Skipped],
    )?;
    Ok(Exit::Done)
}

/// `check --connect`: logs in as `send` would (EHLO, STARTTLS, AUTH; no
/// MAIL), says what that proved, and returns the server's size limit. A
/// refused login, TLS or an unreachable server is an error (exit 1).
async fn prove_login(campaign: &Campaign) -> Result<Option<u64>> {
    let TransportConfig::Smtp(smtp) = &campaign.transport else {
        tracing::warn!(
            "{}: --connect: the file transport has no server to log in to",
            campaign.path.display()
        );
        return Ok(None);
    };
    let transport = AnyTransport::new(campaign).await?;
    let connected = transport.connect().await;
    transport.shutdown().await;
    if let Err(reply) = connected {
        if reply.class() == ReplyClass::Fatal {
            return Err(refused_by_server(campaign, &reply));
        }
        anyhow::bail!(
            "{reply}: could not log in to {}:{}; nothing was sent",
            smtp.host,
            smtp.port
        );
    }
    let tls = match smtp.tls {
        TlsMode::StartTls => "STARTTLS, certificate verified",
        TlsMode::Implicit => "TLS, certificate verified",
        TlsMode::None => "no TLS",
    };
    let login = match &smtp.username {
        Some(user) => format!("logged in as {user}"),
        None => "no login asked".to_string(),
    };
    let limit = transport.size_limit();
    let size = match limit {
        Some(n) => format!("; messages up to {n} bytes"),
        None => String::new(),
    };
    writeln!(
        output::stdout(),
        "{}:{}: connected ({tls}), {login}{size}",
        smtp.host,
        smtp.port
    )?;
    Ok(limit)
}

/// The password source `send` would read, when it cannot be read: an unset
/// variable, a missing file. Read and dropped at once, never shown. A
/// `password_command` is not run here: it may ask the user for something.
async fn missing_password(campaign: &Campaign) -> Option<String> {
    let TransportConfig::Smtp(smtp) = &campaign.transport else {
        return None;
    };
    smtp.username.as_ref()?;
    if matches!(smtp.password, PasswordSource::Command { .. }) {
        return None;
    }
    smtp.password.read().await.err().map(|e| format!("{e:#}"))
}

/// An SMTP account without any window is sent to as fast as it accepts,
/// which providers take for abuse.
fn no_limits(campaign: &Campaign) -> Option<String> {
    match &campaign.transport {
        TransportConfig::Smtp(smtp) if campaign.windows.is_empty() => Some(format!(
            "[limits] sets no window for {}: messages go out as fast as the server takes them; \
             set per_minute and per_day (or a preset) to stay under the account's limits",
            smtp.host
        )),
        _ => None,
    }
}

/// A DKIM signature for a domain that does not align with the From domain
/// does not make DMARC pass (RFC 7489 §3.1.1, relaxed alignment).
fn dkim_misaligned(campaign: &Campaign) -> Option<String> {
    let dkim = campaign.dkim.as_ref()?;
    let from = &campaign.message.from;
    if from.contains("{{") {
        return None;
    }
    let from_domain = mailbox("from", from)
        .ok()?
        .email
        .domain()
        .to_ascii_lowercase();
    let signing = idna::domain_to_ascii(dkim.domain.trim())
        .ok()?
        .to_ascii_lowercase();
    if aligned(&signing, &from_domain) {
        return None;
    }
    Some(format!(
        "[dkim] domain {signing} does not align with the From domain {from_domain}: \
         receivers will not count the signature for DMARC; sign with {from_domain} (or a domain it belongs to)"
    ))
}

/// Relaxed alignment, without the public suffix list: one domain is the
/// other or a subdomain of it. Two sibling subdomains of one organisation
/// (`mail.acme.example`, `news.acme.example`) also align for receivers, so a
/// warning for them may be too cautious, never too lax.
fn aligned(signing: &str, from: &str) -> bool {
    let below = |sub: &str, parent: &str| {
        sub.strip_suffix(parent)
            .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
    };
    below(from, signing) || below(signing, from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_same_domain_or_a_subdomain() {
        assert!(aligned("acme.example", "acme.example"));
        assert!(aligned("acme.example", "news.acme.example"));
        assert!(aligned("mail.acme.example", "acme.example"));
        assert!(!aligned("acme.example", "notacme.example"));
        assert!(!aligned("esp.example", "acme.example"));
    }
}
