//! `hikyaku send`: checks every row, then sends or resumes the campaign.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::{mpsc, watch};

use super::log::{plural, OUTCOME};
use super::progress::{self, Progress};
use super::status::{local_time, outlook};
use super::{
    checked_digest, content_changed, fingerprint, identity, load, output, scan, Global, Loaded,
    Rows,
};
use crate::campaign::{Campaign, TransportConfig};
use crate::engine::{self, RunConfig, RunEnd};
use crate::error::{input_error, Exit};
use crate::message::Variant;
use crate::personalize::{row_place, RowError};
use crate::recipients::{parse_address, RecipientReader};
use crate::reply::{Origin, Reply, ReplyClass};
use crate::store::{ImportInto, State, Store};
use crate::time::now_ms;
use crate::transport::{is_gmail, AnyTransport, Transport};

/// The flags of `hikyaku send` (SPEC §9), parsed by clap in `main`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SendOptions {
    /// Change nothing; print what would be sent and the ETA under the limits.
    #[arg(long)]
    pub dry_run: bool,
    /// Send at most N messages in this run (with --test-to: N test messages, default 1).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Stop with exit 75 instead of waiting for a limit, a pause or a retry.
    #[arg(long)]
    pub no_wait: bool,
    /// Send the first messages to ADDR only, subject prefixed "[TEST] "; record nothing.
    #[arg(long, value_name = "ADDR")]
    pub test_to: Option<String>,
    /// Send again to recipients whose earlier delivery is unknown.
    #[arg(long)]
    pub resend_unknown: bool,
    /// Give failed recipients one more round (not those on the suppression list).
    #[arg(long)]
    pub retry_failed: bool,
    /// Skip rows whose message cannot be built instead of refusing to start.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Send even though templates or [message] changed since sending started.
    #[arg(long)]
    pub force: bool,
}

/// The error for a reply that stops the run before any recipient changed:
/// a refused login (with what to do about it), TLS, or a server that
/// refuses the connection.
pub(super) fn refused_by_server(campaign: &Campaign, reply: &Reply) -> anyhow::Error {
    let TransportConfig::Smtp(smtp) = &campaign.transport else {
        return anyhow::anyhow!("{reply}");
    };
    if reply.is_authentication() {
        let user = smtp.username.as_deref().unwrap_or("");
        let source = smtp.password.describe();
        let advice = if is_gmail(&smtp.host) {
            format!(
                "Gmail and Google Workspace take an app password only: turn on 2-step verification \
                 for {user}, create an app password (Google Account > Security > App passwords) and \
                 put its 16 letters in {source}"
            )
        } else {
            format!("check the username {user:?} and the password in {source}")
        };
        return anyhow::anyhow!(
            "{reply}: {}:{} refused the login; {advice}. No recipient's state was changed",
            smtp.host,
            smtp.port
        );
    }
    if reply.origin == Origin::Tls {
        return anyhow::anyhow!(
            "{reply}: TLS with {}:{} failed; check host, port, tls (\"tls\" is implicit TLS, \
             usually port 465; \"starttls\" usually 587) and ca_file (certificates are always \
             verified). No recipient's state was changed",
            smtp.host,
            smtp.port
        );
    }
    anyhow::anyhow!(
        "{reply}: {}:{} refused the connection. No recipient's state was changed",
        smtp.host,
        smtp.port
    )
}

/// Opens the transport and, for SMTP, logs in once before anything is
/// read or changed: a refused login or TLS is returned (it stops a run of
/// one account, exit 1), and the server's SIZE is known for the pre-send
/// check. An unreachable server is left to the run, which backs off and
/// reconnects.
async fn open_transport(
    campaign: &Campaign,
    store: &Store,
) -> Result<std::result::Result<AnyTransport, Reply>> {
    let transport = AnyTransport::new(campaign).await?;
    if store
        .account_pause(&campaign.pause_key(), now_ms())
        .await?
        .is_some()
    {
        // The server paused the account (too many logins, a rate limit):
        // logging in now would only make it worse; the run waits first.
        return Ok(Ok(transport));
    }
    match transport.connect().await {
        // Logged in: an account set aside by an earlier run is back.
        Ok(()) => store.restore_account(&campaign.pause_key()).await?,
        Err(reply) if reply.class() == ReplyClass::Fatal => {
            transport.shutdown().await;
            return Ok(Err(reply));
        }
        Err(_) => {}
    }
    Ok(Ok(transport))
}

/// One account ready to send: the campaign as it sends (its `from`, DKIM,
/// windows) and its logged-in transport.
struct Opened {
    campaign: Campaign,
    transport: AnyTransport,
}

/// Opens every account's transport. With several accounts, one whose login
/// is refused is set aside with the reason and the others go on; the run
/// stops (exit 1) only when none is left.
async fn open_accounts(campaign: &Campaign, store: &Store) -> Result<Vec<Opened>> {
    let several = campaign.accounts.len() > 1;
    let mut opened = Vec::new();
    let mut refused = Vec::new();
    for index in 0..campaign.accounts.len() {
        let for_account = campaign.for_account(index);
        match open_transport(&for_account, store).await? {
            Ok(transport) => opened.push(Opened {
                campaign: for_account,
                transport,
            }),
            Err(reply) if !several => return Err(refused_by_server(campaign, &reply)),
            Err(reply) => {
                store
                    .set_aside(&for_account.pause_key(), &reply.to_string(), now_ms())
                    .await?;
                refused.push((for_account, reply));
            }
        }
    }
    if opened.is_empty() {
        let each: Vec<String> = refused
            .iter()
            .map(|(c, reply)| format!("{}: {reply}", c.account()))
            .collect();
        anyhow::bail!(
            "no account is left to send with, every one refused the login ({}); check each \
             account's username and password source (for Gmail, an app password). \
             No recipient's state was changed",
            each.join("; ")
        );
    }
    for (for_account, reply) in refused {
        tracing::warn!(
            "account {} set aside for this run: {:#}; the other accounts carry on",
            for_account.account(),
            refused_by_server(&for_account, &reply)
        );
    }
    Ok(opened)
}

pub async fn send(
    global: &Global,
    path: &Path,
    opts: &SendOptions,
    stop: watch::Receiver<bool>,
) -> Result<Exit> {
    let loaded = load(path)?;
    if let Some(test_to) = &opts.test_to {
        return send_test(&loaded, test_to, opts.limit.unwrap_or(1), opts.dry_run).await;
    }
    let store = global.store().await?;
    let token = uuid::Uuid::new_v4().to_string();
    let id = identity(&loaded.campaign);
    if opts.dry_run {
        // Read only: a campaign never sent is read into a transaction that
        // is rolled back, so no row is made for it, seen by another
        // process, or removed again.
        let found = store.find_campaign(&id).await?;
        let result = send_locked(global, loaded, &store, found.as_ref(), &id, opts, stop).await;
        store.close().await;
        return result;
    }
    let record = store.lock(&id, &token).await?;
    // The sender renews its lease while it runs: SQLite's runner lock, or on
    // PostgreSQL its rows among the workers (settling what dead ones left).
    let heartbeat = {
        let (store, id) = (store.clone(), record.id);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::store::HEARTBEAT).await;
                match store.heartbeat(id).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        "{} in flight on a worker that stopped: now `unknown`",
                        plural(n, "recipient")
                    ),
                    Err(e) => tracing::warn!("renewing this worker's lease: {e:#}"),
                }
            }
        })
    };
    let result = send_locked(global, loaded, &store, Some(&record), &id, opts, stop).await;
    heartbeat.abort();
    store.unlock(record.id, &token).await?;
    // A run that sent nothing leaves no trace of a campaign new to the database.
    if result.is_err() {
        store.forget_if_empty(record.id).await?;
    }
    store.close().await;
    result
}

async fn send_locked(
    global: &Global,
    loaded: Loaded,
    store: &crate::store::Store,
    // `None` only for a dry run of a campaign never sent.
    existing: Option<&crate::store::CampaignRecord>,
    id: &crate::store::Identity,
    opts: &SendOptions,
    stop: watch::Receiver<bool>,
) -> Result<Exit> {
    let campaign = &loaded.campaign;
    let parts = fingerprint(&loaded)?;
    if let Some(changed) = existing
        .map(|r| content_changed(r, &parts))
        .transpose()?
        .flatten()
    {
        if !opts.force {
            return Err(input_error(changed));
        }
    }
    let opened = if opts.dry_run {
        Vec::new()
    } else {
        // Reading the password may run a command: a stop request ends it too.
        let mut stopped = stop.clone();
        tokio::select! {
            opened = open_accounts(campaign, store) => opened?,
            Ok(_) = stopped.wait_for(|stop| *stop) => return Ok(Exit::Interrupted),
        }
    };
    // Every message must fit whichever account sends it.
    let size_limit = opened.iter().filter_map(|o| o.transport.size_limit()).min();
    loaded.pipeline.limit_size(size_limit);
    // With several accounts, each account's own `from` and DKIM key: its
    // own pipeline, checked before anything is read or changed.
    let mut own_pipelines = Vec::new();
    if campaign.accounts.len() > 1 {
        for o in &opened {
            let p = crate::personalize::Pipeline::load(&o.campaign)
                .map_err(|e| input_error(format!("account {}: {e:#}", o.campaign.account())))?;
            p.limit_size(size_limit);
            own_pipelines.push(Arc::new(p));
        }
    }
    let campaign = &loaded.campaign;
    if let (false, Some(record)) = (opts.dry_run, existing) {
        let unknown = store.settle_interrupted(record.id).await?;
        if unknown > 0 {
            tracing::warn!(
                "{} in flight when an earlier run stopped: now `unknown` \
                 (see hikyaku export --state unknown; --resend-unknown sends them again)",
                plural(unknown, "recipient")
            );
        }
        if opts.resend_unknown {
            let n = store.requeue_unknown(record.id).await?;
            tracing::info!(
                "{} to send again (--resend-unknown)",
                plural(n, "unknown recipient")
            );
        }
        if opts.retry_failed {
            let n = store.requeue_failed(record.id).await?;
            tracing::info!(
                "{} to try again (--retry-failed; suppressed addresses stay failed)",
                plural(n, "failed recipient")
            );
        }
    }
    // A resumed send reads the file again only when something its rows
    // were checked against changed (SPEC §12: a million rows resume at once).
    let digest = if opts.dry_run {
        None
    } else {
        checked_digest(&loaded, &parts)?
    };
    let unchanged = match existing {
        Some(record) => {
            !opts.force
                && !opts.skip_invalid
                && record.fingerprint.is_some()
                && digest.is_some()
                && record.checked == digest
                && !store.suppressions_changed(record.id).await?
        }
        None => false,
    };
    if unchanged {
        tracing::info!(
            "{}: unchanged since its rows were checked; not read again",
            campaign.recipients.file.display()
        );
    } else {
        if let (false, Some(record)) = (opts.dry_run, existing) {
            if record.checked.is_some() {
                // Cleared before the rows change: a run stopped between the
                // import and the new digest leaves none, never a stale one.
                store.set_checked(record.id, None).await?;
            }
        }
        let (mut import, found) = scan(
            &loaded,
            store,
            match existing {
                Some(record) if opts.dry_run => ImportInto::Discarded(record),
                Some(record) => ImportInto::Campaign(record),
                None => ImportInto::Found(id),
            },
            if opts.skip_invalid {
                Rows::BuildOrSkip
            } else {
                Rows::Build
            },
            global.progress_bar,
        )
        .await?;
        found.warnings.warn(20);
        if !found.problems.is_empty() {
            import.rollback().await?;
            let mut lines = found.problems.lines(found.checked, 200);
            if lines.len() == 1 && found.problems.same_for_all(found.checked).is_some() {
                return Err(input_error(format!(
                    "{}; nothing was sent",
                    lines.remove(0)
                )));
            }
            for line in lines {
                tracing::error!("{line}");
            }
            return Err(input_error(format!(
                "nothing was sent: {}",
                found.problems.advice(found.checked)
            )));
        }
        if opts.dry_run {
            let counts = import.counts().await?;
            import.rollback().await?;
            let retried = match existing {
                Some(record) if opts.retry_failed => store.retryable_failed(record.id).await?,
                _ => 0,
            };
            let ready = counts[State::Pending]
                + retried
                + if opts.resend_unknown {
                    counts[State::Unknown]
                } else {
                    0
                };
            let remaining = ready + counts[State::Deferred];
            let look = outlook(store, campaign, existing.map(|r| r.id), remaining, ready).await?;
            let mut out = output::stdout();
            writeln!(
                out,
                "dry run{}: {} rows, {remaining} would be sent, {} already sent, {} skipped, {} failed, {} unknown",
                rehearsal_note(campaign),
                found.rows,
                counts[State::Sent],
                counts[State::Skipped],
                counts[State::Failed],
                counts[State::Unknown]
            )?;
            super::status::write_accounts(&mut out, &look)?;
            if let Some(eta) = look.eta_ms {
                writeln!(out, "eta under the limits: {}", local_time(eta))?;
            }
            return Ok(Exit::Done);
        }
        if existing.is_none() {
            import.rollback().await?;
            anyhow::bail!("a send without its campaign's row in the state database");
        }
        let removed = import.commit().await?;
        if removed > 0 {
            tracing::warn!(
                "{} left the file: skipped (removed)",
                plural(removed, "unsent recipient")
            );
        }
        if let (false, Some(record)) = (opts.skip_invalid, existing) {
            // Every row to send was checked and none failed.
            store.set_checked(record.id, digest.as_deref()).await?;
        }
    }
    let Some(record) = existing else {
        anyhow::bail!("a send without its campaign's row in the state database");
    };
    if record.fingerprint.is_none() || opts.force {
        store
            .set_fingerprint(record.id, &serde_json::to_string(&parts)?)
            .await?;
    }
    let counts = store.counts(record.id).await?;
    let total: i64 = counts.total();
    let to_do = counts[State::Pending] + counts[State::Deferred] + counts[State::Sending];
    let progress_counts = progress::Counts {
        total: u64::try_from(total).unwrap_or(0),
        done: u64::try_from(total - to_do).unwrap_or(0),
    };

    let zone_field = loaded.pipeline.zone_field();
    let several = campaign.accounts.len() > 1;
    if !several {
        own_pipelines.push(loaded.pipeline.clone());
    }
    let mut lanes = Vec::new();
    let mut transports = Vec::new();
    for (
        Opened {
            campaign: sending,
            transport,
        },
        pipeline,
    ) in opened.into_iter().zip(own_pipelines)
    {
        let transport = Arc::new(transport);
        transports.push(transport.clone());
        lanes.push(engine::Lane {
            config: RunConfig {
                campaign_id: record.id,
                account: sending.account(),
                pause_key: sending.pause_key(),
                windows: sending.windows.clone(),
                retry: campaign.retry.clone(),
                connections: sending.connections(),
                limit: opts.limit,
                no_wait: opts.no_wait,
                hours: campaign.hours.clone(),
                zone: campaign.timezone,
                zone_field,
                warmup: sending.warmup.clone(),
                per_domain: campaign.per_domain.clone(),
            },
            transport,
            pipeline,
        });
    }
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let progress = Progress::start(
        global.progress_bar,
        progress_counts,
        progress::EtaSource {
            store: store.clone(),
            campaign: campaign.clone(),
            campaign_id: record.id,
        },
        events_rx,
    );
    let started = now_ms();
    let end = engine::run_lanes(
        store.clone(),
        lanes,
        Arc::new(engine::SystemClock),
        events_tx,
        stop,
    )
    .await;
    for transport in transports {
        transport.shutdown().await;
    }
    let stats = progress.finish().await;
    let end = end?;

    let counts = store.counts(record.id).await?;
    let left = counts[State::Pending] + counts[State::Deferred];
    let secs = (now_ms() - started).max(1) as f64 / 1000.0;
    let rate = progress::rate(stats.sent as f64 / secs);
    let (done, sent) = match &campaign.transport {
        TransportConfig::File { dir } => (
            format!(
                "rehearsal: {} written to {} in this run ({rate}), nothing was delivered",
                plural(stats.sent, "message"),
                shown_dir(campaign, dir)
            ),
            "written",
        ),
        TransportConfig::Smtp(_) => (format!("sent {} in this run ({rate})", stats.sent), "sent"),
    };
    // Bounces come later, from the mailbox; said only once there are some.
    let bounced = match counts[State::Bounced] {
        0 => String::new(),
        n => format!(", {n} bounced"),
    };
    if several {
        let accounts: Vec<String> = campaign.accounts.iter().map(|a| a.account()).collect();
        tracing::info!(
            target: OUTCOME,
            "{} in this run by account: {}",
            campaign.name,
            stats.by_account(&accounts)
        );
    }
    tracing::info!(
        target: OUTCOME,
        "{}: {done}; total: {} {sent}{bounced}, {} failed, {} unknown, {} skipped, {} left",
        campaign.name,
        counts[State::Sent],
        counts[State::Failed],
        counts[State::Unknown],
        counts[State::Skipped],
        left
    );
    Ok(match end {
        RunEnd::Done => Exit::Done,
        RunEnd::LimitReached if left == 0 => Exit::Done,
        RunEnd::LimitReached => {
            tracing::info!(
                target: OUTCOME,
                "stopped after --limit {}; run send again to go on",
                opts.limit.unwrap_or(0)
            );
            Exit::WorkLeft
        }
        RunEnd::WouldWait { until_ms, why } => {
            tracing::info!(
                target: OUTCOME,
                "stopped (--no-wait): {why}; next send possible at {}",
                local_time(until_ms)
            );
            Exit::WorkLeft
        }
        RunEnd::Interrupted => {
            tracing::info!(
                target: OUTCOME,
                "interrupted; in-flight messages were recorded. Run send again to resume"
            );
            Exit::Interrupted
        }
        RunEnd::Fatal(reply) => {
            return Err(refused_by_server(campaign, &reply));
        }
        RunEnd::CircuitBreaker(why) => {
            return Err(anyhow::anyhow!("stopped: {why}"));
        }
        RunEnd::NoAccountLeft(accounts) => {
            let why: Vec<String> = accounts
                .iter()
                .map(|(account, end)| {
                    format!(
                        "{account}: {}",
                        progress::set_aside_why(campaign, account, end)
                    )
                })
                .collect();
            return Err(anyhow::anyhow!(
                "stopped: no account is left to send with ({})",
                why.join("; ")
            ));
        }
    })
}

/// " (rehearsal: ...)" for a campaign on the file transport, for every
/// line that could otherwise be read as delivery.
pub(super) fn rehearsal_note(campaign: &Campaign) -> String {
    match &campaign.transport {
        TransportConfig::File { dir } => format!(
            " (rehearsal: messages are written to {}, nothing is delivered)",
            shown_dir(campaign, dir)
        ),
        TransportConfig::Smtp(_) => String::new(),
    }
}

/// The outbox as the user wrote it: relative to the campaign's folder.
fn shown_dir(campaign: &Campaign, dir: &Path) -> String {
    match dir.strip_prefix(&campaign.dir) {
        Ok(inside) => format!("{}/", inside.display()),
        Err(_) => dir.display().to_string(),
    }
}

/// `--test-to`: the first `limit` rendered messages to one address, subject
/// prefixed "[TEST] ", nothing recorded. With `--dry-run` they are only
/// listed: a dry run never sends, whatever else is asked (SPEC §9).
async fn send_test(loaded: &Loaded, test_to: &str, limit: u64, dry_run: bool) -> Result<Exit> {
    // With several accounts, the first one sends the test, as it sends:
    // its `from`, its DKIM key.
    let first = loaded.campaign.for_account(0);
    let own;
    let (campaign, pipeline) = if loaded.campaign.accounts.len() > 1 {
        own = crate::personalize::Pipeline::load(&first)?;
        (&first, &own)
    } else {
        (&loaded.campaign, &*loaded.pipeline)
    };
    let tester = parse_address(test_to).map_err(|why| {
        input_error(format!(
            "--test-to {test_to:?} is not a valid address: {why}"
        ))
    })?;
    let transport = if dry_run {
        None
    } else {
        Some(AnyTransport::new(campaign).await?)
    };
    let mut reader = RecipientReader::open(&campaign.recipients)?;
    let mut sent = 0;
    let variant = Variant {
        test_to: Some(&tester),
    };
    while sent < limit {
        let Some(row) = reader.next_row()? else { break };
        let (recipient, out) = match pipeline.build(&row.fields, variant) {
            Ok(built) => built,
            Err(RowError::Address { .. }) => continue,
            Err(why) => {
                if let Some(transport) = &transport {
                    transport.shutdown().await;
                }
                return Err(input_error(format!(
                    "{}: {why}",
                    row_place(reader.path(), &row)
                )));
            }
        };
        let Some(transport) = &transport else {
            writeln!(
                output::stdout(),
                "dry run: would send the test message for row {} ({}) to {}",
                row.number,
                recipient.written,
                tester.ascii
            )?;
            sent += 1;
            continue;
        };
        match transport.send(row.number, &out).await {
            Ok(reply) => tracing::info!(
                target: OUTCOME,
                "test message for row {} ({}) sent to {}: {reply}",
                row.number, recipient.written, tester.ascii
            ),
            Err(reply) => {
                transport.shutdown().await;
                if !reply.offered() && reply.class() == ReplyClass::Fatal {
                    return Err(refused_by_server(campaign, &reply));
                }
                anyhow::bail!("test message for row {} was refused: {reply}", row.number);
            }
        }
        sent += 1;
    }
    let Some(transport) = transport else {
        tracing::info!(
            target: OUTCOME,
            "dry run: {} would be sent to {}; nothing was sent or recorded",
            plural(sent, "test message"),
            tester.ascii
        );
        return Ok(Exit::Done);
    };
    transport.shutdown().await;
    tracing::info!(
        target: OUTCOME,
        "{} sent to {}; nothing was recorded",
        plural(sent, "test message"),
        tester.ascii
    );
    Ok(Exit::Done)
}
