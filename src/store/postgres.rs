//! The state store on PostgreSQL (SPEC §10): several workers, on several
//! machines, share one campaign. Claims hand out recipients with
//! `FOR UPDATE SKIP LOCKED`; one worker at a time decides a slot for an
//! account (an advisory lock on the account); every `sending` row names its
//! worker and a lease the worker renews, so that only a dead worker's
//! in-flight rows become `unknown`.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Postgres, Row as _, Transaction};

use super::compact::{self, decode_fields, encode_fields, ADDRESS, CELLS, EMAIL};
use super::{
    classify_rows, lock, mask_password, message_id_key, Before, CampaignRecord, CampaignSummary,
    Candidate, Claim, Counts, Delivery, ExportRow, Gate, Identity, ImportInto, ImportRow, Known,
    NoticeRow, Outcome, Outcomes, Picked, Ready, RowStatus, SendEntry, Skip, SkipReason, State,
};
use crate::error::input_error;
use crate::limits::{Schedule, Send, Window};
use crate::message::Outgoing;
use crate::time::now_ms;

use super::lease_ms;

/// The rows of a campaign (bound first) that `--retry-failed` sends again.
const RETRYABLE_FAILED: &str = "campaign_id = $1 AND state = 'failed' \
     AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email_key = recipients.row_key)";

/// How long a worker keeps the rows it picked from the others while it
/// builds their messages, before it claims them or lets them go.
pub(super) const PICK_MS: i64 = 10_000;

/// How long an outcome waits for others to be written with it.
const OUTCOMES_GATHERED: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// This process's worker id: on its `sending` rows and its lease.
    worker: String,
    /// Held while outcomes are written: a write under way gathers what is
    /// recorded meanwhile for the next one, instead of one commit each.
    writer: Arc<tokio::sync::Mutex<()>>,
    pub(super) outcomes: Arc<std::sync::Mutex<Outcomes>>,
}

/// hikyaku's tables; a database holding any other is not its own.
const TABLES: [&str; 8] = [
    "campaigns",
    "recipients",
    "send_log",
    "account_pauses",
    "accounts_set_aside",
    "suppressions",
    "workers",
    "_sqlx_migrations",
];

/// Refuses, before anything is written, another program's database
/// (SPEC §11): one with tables (or views) hikyaku does not have, in any
/// schema, or a migration it does not know. An empty database is a new one.
async fn ensure_ours(pool: &PgPool, shown: &str, migrator: &sqlx::migrate::Migrator) -> Result<()> {
    let unreadable = |e: sqlx::Error| anyhow::anyhow!("reading the state database {shown}: {e}");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CASE WHEN n.nspname = current_schema() THEN c.relname ELSE n.nspname || '.' || c.relname END \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') \
         AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg~_%' ESCAPE '~' \
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .map_err(unreadable)?;
    let versions: Vec<i64> = if tables.iter().any(|t| t == "_sqlx_migrations") {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
            .fetch_all(pool)
            .await
            .map_err(unreadable)?
    } else {
        Vec::new()
    };
    match super::foreign(&tables, &TABLES, &versions, migrator) {
        Some(what) => Err(super::refuse_foreign(shown, "PostgreSQL", &what)),
        None => Ok(()),
    }
}

/// Serialises one decision among all workers until the transaction ends.
async fn advisory_lock(conn: &mut sqlx::PgConnection, what: &str, key: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("hikyaku {what} {key}"))
        .execute(conn)
        .await?;
    Ok(())
}

impl PgStore {
    /// Connects and runs the embedded migrations (sqlx serialises
    /// concurrent migrations with an advisory lock).
    pub async fn open(url: &str) -> Result<PgStore> {
        let shown = mask_password(url);
        let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            input_error(format!("--db {shown}: {}", strip_url(&e.to_string(), url)))
        })?;
        // Waiting for another worker's read of the file or for an
        // account's slot is normal here, not a slow statement to warn about.
        let options = options.disable_statement_logging();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| {
                anyhow::anyhow!("state database {shown}: {}", strip_url(&e.to_string(), url))
            })?;
        let migrator = sqlx::migrate!("./migrations/postgres");
        if let Err(e) = ensure_ours(&pool, &shown, &migrator).await {
            pool.close().await;
            return Err(e);
        }
        migrator
            .run(&pool)
            .await
            .with_context(|| format!("migrating the state database {shown}"))?;
        Ok(PgStore {
            pool,
            worker: uuid::Uuid::new_v4().to_string(),
            writer: Arc::default(),
            outcomes: Arc::default(),
        })
    }

    /// Creates the campaign's row on first use and binds its name to its
    /// file; a name another file owns is refused (SPEC §7.6).
    pub async fn campaign(&self, id: &Identity) -> Result<CampaignRecord> {
        let mut tx = self.pool.begin().await?;
        let record = create(&mut tx, id).await?;
        tx.commit().await?;
        Ok(record)
    }

    /// The campaign's row, if it was ever used; a name another file owns
    /// is refused.
    pub async fn find_campaign(&self, id: &Identity) -> Result<Option<CampaignRecord>> {
        let mut conn = self.pool.acquire().await?;
        check_owner(&mut conn, id).await?;
        find(&mut conn, id).await
    }

    /// Every campaign of the database, by name.
    pub async fn campaigns(&self) -> Result<Vec<CampaignSummary>> {
        let rows = sqlx::query(
            "SELECT c.id, c.name, c.transport, c.file, \
             GREATEST((SELECT MAX(updated_at) FROM recipients r WHERE r.campaign_id = c.id), c.imported_at) AS last \
             FROM campaigns c ORDER BY c.name, c.transport",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<CampaignSummary> = Vec::new();
        for row in rows {
            let name: String = row.get("name");
            if out.last().is_none_or(|s| s.name != name) {
                out.push(CampaignSummary {
                    name: name.clone(),
                    file: None,
                    delivery: None,
                    rehearsal: None,
                    last_activity_ms: None,
                    running: None,
                });
            }
            let Some(summary) = out.last_mut() else {
                continue;
            };
            summary.file = summary.file.take().or(row.get("file"));
            summary.last_activity_ms = summary.last_activity_ms.max(row.get("last"));
            if summary.running.is_none() {
                let mut conn = self.pool.acquire().await?;
                summary.running = live_workers(&mut conn, row.get("id"))
                    .await?
                    .into_iter()
                    .next()
                    .map(|(_, who)| who);
            }
            let counts = Some(self.counts(row.get("id")).await?);
            if row.get::<&str, _>("transport") == Delivery::File.as_str() {
                summary.rehearsal = counts;
            } else {
                summary.delivery = counts;
            }
        }
        Ok(out)
    }

    /// Forgets everything recorded for a campaign name, rehearsal included;
    /// refused while a live process sends it. Returns how many recipient
    /// rows were forgotten, or `None` if the name is unknown.
    pub async fn reset(&self, name: &str) -> Result<Option<u64>> {
        let mut tx = self.pool.begin().await?;
        // The campaigns' rows locked first: a read of the file under way
        // (which holds its campaign's row) is waited for, and its rows are
        // seen and deleted with the others.
        let ids: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM campaigns WHERE name = $1 FOR UPDATE")
                .bind(name)
                .fetch_all(&mut *tx)
                .await?;
        if ids.is_empty() {
            return Ok(None);
        }
        let mut holder = None;
        for &id in &ids {
            holder = holder.or(live_workers(&mut tx, id).await?.into_iter().next());
        }
        if let Some((_, holder)) = holder {
            anyhow::bail!(
                "campaign {name:?} is being sent by {holder}; stop it first (Ctrl-C), then reset"
            );
        }
        // Recipients name their campaign without a foreign key (see the
        // migrations): they are deleted here, not by a cascade.
        let forgotten = sqlx::query("DELETE FROM recipients WHERE campaign_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM campaigns WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(forgotten))
    }

    /// Removes a campaign row that holds no recipients: `send --dry-run`
    /// and a send that failed before recording anything leave no trace
    /// of a campaign they saw first. A row
    /// a worker joined is never removed: the row lock waits for a worker
    /// joining now, and the check after it sees that worker.
    pub async fn forget_if_empty(&self, campaign_id: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT id FROM campaigns WHERE id = $1 FOR UPDATE")
            .bind(campaign_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM campaigns WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM recipients WHERE campaign_id = $1) \
             AND NOT EXISTS (SELECT 1 FROM workers WHERE campaign_id = $1)")
            .bind(campaign_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records what the last complete check of the campaign's rows saw
    /// (`None`: the next `send` reads the file again).
    pub async fn set_checked(&self, campaign_id: i64, checked: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE campaigns SET checked = $1 WHERE id = $2")
            .bind(checked)
            .bind(campaign_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether the suppression list changed for the campaign's rows since
    /// they were read: a row to send is on it, or a row skipped for it no
    /// longer is.
    pub async fn suppressions_changed(&self, campaign_id: i64) -> Result<bool> {
        Ok(sqlx::query_scalar(
            // Each suppressed address looked up among the rows, not each row
            // among them: a subquery per address, which no plan turns into
            // a scan of the campaign's rows (the planner may not know yet
            // how many there are, right after a large read).
            "SELECT EXISTS (SELECT 1 FROM suppressions s WHERE (SELECT r.state FROM recipients r \
             WHERE r.campaign_id = $1 AND r.row_key = s.email_key) IN ('pending', 'deferred')) \
             OR EXISTS (SELECT 1 FROM recipients r WHERE r.campaign_id = $1 AND r.state = 'skipped' \
             AND r.reason = 'suppressed' AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email_key = r.row_key))",
        )
        .bind(campaign_id)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn set_fingerprint(&self, campaign_id: i64, fingerprint: &str) -> Result<()> {
        sqlx::query("UPDATE campaigns SET fingerprint = $1 WHERE id = $2")
            .bind(fingerprint)
            .bind(campaign_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Joins the campaign's workers (on PostgreSQL several may send it at
    /// once); its row is created in the same transaction if missing, so
    /// that a read-only command forgetting an empty row never removes it
    /// between the two.
    pub async fn lock(&self, id: &Identity, _token: &str) -> Result<CampaignRecord> {
        let mut tx = self.pool.begin().await?;
        let record = create(&mut tx, id).await?;
        self.renew_in(&mut tx, record.id).await?;
        tx.commit().await?;
        Ok(record)
    }

    /// Leaves the campaign's workers.
    pub async fn unlock(&self, campaign_id: i64, _token: &str) -> Result<()> {
        sqlx::query("DELETE FROM workers WHERE campaign_id = $1 AND token = $2")
            .bind(campaign_id)
            .bind(&self.worker)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn renew(&self, campaign_id: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.renew_in(&mut tx, campaign_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// This worker's place among the campaign's workers and the lease on
    /// its rows, renewed in the caller's transaction.
    async fn renew_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        campaign_id: i64,
    ) -> Result<()> {
        let until = now_ms() + lease_ms();
        sqlx::query(
            "INSERT INTO workers (campaign_id, token, host, pid, lease_until) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (campaign_id, token) DO UPDATE SET lease_until = excluded.lease_until",
        )
        .bind(campaign_id)
        .bind(&self.worker)
        .bind(super::hostname())
        .bind(i64::from(std::process::id()))
        .bind(until)
        .execute(&mut **tx)
        .await?;
        sqlx::query("UPDATE recipients SET lease_until = $1 WHERE campaign_id = $2 AND worker = $3 AND state = 'sending'")
            .bind(until)
            .bind(campaign_id)
            .bind(&self.worker)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Renews this worker's lease on its rows and its place among the
    /// workers, and settles what dead workers left `sending`.
    pub async fn heartbeat(&self, campaign_id: i64) -> Result<u64> {
        self.renew(campaign_id).await?;
        self.settle_interrupted(campaign_id).await
    }

    /// Rows a dead worker left `sending` may or may not have been delivered:
    /// they become `unknown` (SPEC §7.3). A worker is dead when its lease ran
    /// out, or at once when it ran on this host and its process is gone;
    /// the rows of live workers are theirs.
    pub async fn settle_interrupted(&self, campaign_id: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let mut live: Vec<String> = live_workers(&mut tx, campaign_id)
            .await?
            .into_iter()
            .map(|(token, _)| token)
            .collect();
        live.push(self.worker.clone());
        sqlx::query("DELETE FROM workers WHERE campaign_id = $1 AND NOT (token = ANY($2))")
            .bind(campaign_id)
            .bind(&live)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query(
            "UPDATE recipients SET state = 'unknown', reason = 'interrupted while sending: may or may not have been delivered', \
             updated_at = $1, worker = NULL, lease_until = NULL \
             WHERE campaign_id = $2 AND state = 'sending' AND (worker IS NULL OR NOT (worker = ANY($3)))",
        )
        .bind(now_ms())
        .bind(campaign_id)
        .bind(&live)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// `unknown` rows go back to `pending` (`--resend-unknown`).
    pub async fn requeue_unknown(&self, campaign_id: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        pending_from_start(&mut tx, campaign_id).await?;
        let done = sqlx::query(
            "UPDATE recipients SET state = 'pending', reason = NULL, updated_at = $1 WHERE campaign_id = $2 AND state = 'unknown'",
        )
        .bind(now_ms())
        .bind(campaign_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Starts reading the recipients file into the store; nothing is visible
    /// to others until [`PgImport::commit`]. One worker reads the file: a
    /// worker that finds another live one whose read is done joins it
    /// instead, and a worker that comes while another reads waits for it.
    pub async fn import(&self, into: ImportInto<'_>, columns: &[String]) -> Result<PgImport> {
        let mut tx = self.pool.begin().await?;
        let made;
        let (campaign, discarded) = match into {
            ImportInto::Campaign(record) => (record, false),
            ImportInto::Discarded(record) => (record, true),
            ImportInto::Found(id) => {
                made = create(&mut tx, id).await?;
                (&made, true)
            }
        };
        advisory_lock(&mut tx, "import", &campaign.id.to_string()).await?;
        let readers: Vec<String> = sqlx::query_scalar(
            "SELECT token FROM workers WHERE campaign_id = $1 AND ready AND token != $2",
        )
        .bind(campaign.id)
        .bind(&self.worker)
        .fetch_all(&mut *tx)
        .await?;
        let live = live_workers(&mut tx, campaign.id).await?;
        let joined = live.iter().any(|(token, _)| readers.contains(token));
        // A read that is rolled back writes into a copy of the campaign's
        // rows that goes with the transaction: rows written to the table
        // itself and rolled back would stay as dead rows, taking room
        // until a vacuum (a checked 1,000,000-row file: about as much again).
        // The first read of a campaign writes there too, and its rows go
        // into the table at commit in the order of their keys: the unique
        // index on keys then fills its pages as they come, where rows
        // added in file order split them half full (1,000,000 rows: about
        // 50 MB instead of 88). Their ids are given in file order all the
        // same, when they are written.
        let fresh = !discarded
            && !joined
            && !sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM recipients WHERE campaign_id = $1)",
            )
            .bind(campaign.id)
            .fetch_one(&mut *tx)
            .await?;
        // A key is looked up among the rows written before: in a table
        // that started empty only the keys this read wrote, which it
        // remembers ([`Written`]); the index on keys is made when one is
        // first looked up there (adding to it is most of the cost of
        // writing such a table: 2.5 s of 1,000,000 rows).
        let mut written = None;
        let table = if discarded || fresh {
            let table = if discarded { DISCARDED } else { STAGED };
            sqlx::query(&format!(
                "CREATE TEMPORARY TABLE {} (LIKE recipients INCLUDING DEFAULTS) ON COMMIT DROP",
                table.trim_start_matches("pg_temp.")
            ))
            .execute(&mut *tx)
            .await?;
            let copied = match discarded {
                true => sqlx::query(&format!(
                    "INSERT INTO {table} SELECT * FROM recipients WHERE campaign_id = $1"
                ))
                .bind(campaign.id)
                .execute(&mut *tx)
                .await?
                .rows_affected(),
                false => 0,
            };
            sqlx::query(&format!("CREATE INDEX ON {table} (id)"))
                .execute(&mut *tx)
                .await?;
            match copied {
                0 => written = Some(Written::new()),
                _ => index_keys(&mut tx, table).await?,
            }
            table
        } else {
            "recipients"
        };
        let now = now_ms();
        let (generation, row_count, imported_before) = if joined {
            let generation: i64 =
                sqlx::query_scalar("SELECT import_gen FROM campaigns WHERE id = $1")
                    .bind(campaign.id)
                    .fetch_one(&mut *tx)
                    .await?;
            (generation, None, None)
        } else {
            let (generation, row_count, before): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
                "UPDATE campaigns c SET import_gen = c.import_gen + 1, columns = $1, imported_at = $3 \
                 FROM (SELECT imported_at FROM campaigns WHERE id = $2) AS o \
                 WHERE c.id = $2 RETURNING c.import_gen, c.row_count, o.imported_at",
            )
            .bind(serde_json::to_string(columns)?)
            .bind(campaign.id)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let deleted = sqlx::query(&format!(
                "DELETE FROM {table} WHERE campaign_id = $1 AND row_key LIKE 'row:%'"
            ))
            .bind(campaign.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let row_count = match fresh {
                true => Some(0),
                false => row_count.map(|n| n - i64::try_from(deleted).unwrap_or(n)),
            };
            (generation, row_count, before)
        };
        Ok(PgImport {
            tx,
            table,
            written,
            campaign_id: campaign.id,
            generation,
            row_count,
            now,
            imported_before,
            worker: self.worker.clone(),
            joined,
        })
    }

    /// The wait before a send of `count` recipients for `gate`'s account,
    /// read without a lock: its pause, or its next slot in the future.
    pub(super) async fn wait_before(&self, gate: &Gate<'_>, count: u32) -> Result<Option<Claim>> {
        let mut conn = self.pool.acquire().await?;
        wait_in(&mut conn, gate, count).await
    }

    /// Up to `limit` recipients due now for this worker, reserved to it for
    /// [`PICK_MS`]: the deferred whose retry time has come, then the
    /// pending, in file order, passing over rows another worker is picking
    /// (`FOR UPDATE SKIP LOCKED`) or has reserved. The reservation is no
    /// claim: it only keeps two workers from building the same messages,
    /// and it is committed without waiting for the disk.
    pub(super) async fn pick(
        &self,
        campaign_id: i64,
        now: i64,
        excluded: &[i64],
        skip: &Skip,
        limit: usize,
    ) -> Result<Vec<Candidate>> {
        // Outcomes waiting, or being written, are written first: a
        // recipient returned to `pending` goes first again, and a claim
        // that finds nothing due never misses one on its way back.
        // (Messages sent make no row due: they wait for their write.)
        if lock(&self.outcomes).returning > 0 {
            let _writing = self.writer.clone().lock_owned().await;
            self.write_outcomes(false).await?;
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        let limit = i64::try_from(limit.max(1)).unwrap_or(1);
        let mut picked = pick_rows(
            &mut tx,
            &self.worker,
            campaign_id,
            now,
            excluded,
            skip,
            limit,
            true,
        )
        .await?;
        let left = limit - i64::try_from(picked.len()).unwrap_or(limit);
        if left > 0 {
            by_primary_key(&mut tx).await?;
            advance_pending(&mut tx, campaign_id).await?;
            picked.extend(
                pick_rows(
                    &mut tx,
                    &self.worker,
                    campaign_id,
                    now,
                    excluded,
                    skip,
                    left,
                    false,
                )
                .await?,
            );
        }
        tx.commit().await?;
        Ok(picked)
    }

    /// Lets go of picked rows that were not taken: other workers may pick
    /// them at once.
    pub(super) async fn unpick(&self, ids: &[i64]) {
        if ids.is_empty() {
            return;
        }
        // Best effort: a reservation left runs out by itself.
        let _ = sqlx::query(
            "UPDATE recipients SET worker = NULL, lease_until = NULL \
             WHERE id = ANY($1) AND worker = $2 AND state IN ('pending', 'deferred')",
        )
        .bind(ids)
        .bind(&self.worker)
        .execute(&self.pool)
        .await;
    }

    /// Claims what was picked, in one transaction committed before any of
    /// them is sent: one worker at a time decides the account's slot again
    /// (an advisory lock on the account), the unbuildable rows are skipped,
    /// and the built ones still as they were picked, and still reserved to
    /// this worker, are marked `sending` under its lease, their sends
    /// logged: a few statements for the whole claim.
    pub(super) async fn take(
        &self,
        campaign_id: i64,
        gate: &Gate<'_>,
        picked: &mut Picked,
    ) -> Result<Claim> {
        self.failed_write()?;
        let _writing = self.writer.clone().lock_owned().await;
        let mut tx = self.pool.begin().await?;
        // Outcomes still waiting are written first, in the claim's own
        // transaction (committed whatever the claim comes to): the rows
        // `sending` in the database are never more than those claimed and
        // not settled.
        let waiting = std::mem::take(&mut lock(&self.outcomes).queue);
        write_outcomes(&mut tx, &waiting).await?;
        // This process's claims come one at a time: no pick reads before
        // this transaction ends.
        lock(&self.outcomes).committed(&waiting);
        // One worker at a time decides the account's next slot; the others
        // wait here, then see its send in the log.
        advisory_lock(&mut tx, "account", gate.account).await?;
        let count = picked
            .built
            .iter()
            .map(|(_, m)| m.recipient_count)
            .max()
            .unwrap_or(1);
        // With nothing picked, nothing waits: the claim comes to `Idle`.
        let nothing = picked.built.is_empty() && picked.unbuildable.is_empty();
        let wait = match nothing {
            true => None,
            false => wait_in(&mut tx, gate, count).await?,
        };
        if let Some(wait) = wait {
            if picked.unbuildable.is_empty() {
                tx.commit().await?;
                return Ok(wait);
            }
            picked.built.clear();
        }
        if !picked.unbuildable.is_empty() {
            let ids: Vec<i64> = picked.unbuildable.iter().map(|(c, _)| c.id).collect();
            let reasons: Vec<String> = picked
                .unbuildable
                .iter()
                .map(|(_, why)| SkipReason::InvalidMessage(why.to_string()).to_text())
                .collect();
            sqlx::query(
                "UPDATE recipients r SET state = 'skipped', reason = u.reason, updated_at = $3, worker = NULL, lease_until = NULL \
                 FROM UNNEST($1::bigint[], $2::text[]) AS u(id, reason) WHERE r.id = u.id",
            )
            .bind(&ids)
            .bind(&reasons)
            .bind(gate.now)
            .execute(&mut *tx)
            .await?;
        }
        let built = std::mem::take(&mut picked.built);
        let built_any = !built.is_empty();
        let ready = self.mark_sending(&mut tx, gate, built).await?;
        let claim = match picked.settle(built_any, ready) {
            Some(claim) => claim,
            None => {
                // Nothing due: retries may be, and so may rows another
                // worker reserved and never took (it died picking them).
                // (Pending rows another worker holds are in the index by state.)
                let next_due_ms: Option<i64> = sqlx::query_scalar(
                    "SELECT MIN(CASE WHEN worker IS NULL OR worker = $3 OR lease_until < $2 THEN next_attempt_at \
                     ELSE GREATEST(lease_until, next_attempt_at) END) \
                     FROM recipients WHERE campaign_id = $1 AND (state = 'deferred' \
                     OR (state = 'pending' AND worker IS NOT NULL AND worker <> $3 AND lease_until >= $2))",
                )
                .bind(campaign_id)
                .bind(now_ms())
                .bind(&self.worker)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(Claim::Idle { next_due_ms });
            }
        };
        tx.commit().await?;
        Ok(claim)
    }

    /// Marks `sending` the built rows still as they were picked and
    /// reserved to this worker, under its lease, and logs their sends;
    /// a row changed since it was picked is left alone, its message dropped.
    async fn mark_sending(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        gate: &Gate<'_>,
        built: Vec<(Candidate, Outgoing)>,
    ) -> Result<Vec<Ready>> {
        if built.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = built.iter().map(|(c, _)| c.id).collect();
        let states: Vec<&str> = built.iter().map(|(c, _)| c.before.state.as_str()).collect();
        let updated: Vec<i64> = built.iter().map(|(c, _)| c.before.updated_at).collect();
        let message_ids: Vec<&str> = built.iter().map(|(_, m)| m.message_id.as_str()).collect();
        let marked: HashSet<i64> = sqlx::query_scalar(
            "UPDATE recipients r SET state = 'sending', attempts = r.attempts + 1, message_id = u.message_id, \
             updated_at = $5, worker = $6, lease_until = $7 \
             FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::text[]) AS u(id, state, updated_at, message_id) \
             WHERE r.id = u.id AND r.state = u.state AND COALESCE(r.updated_at, 0) = u.updated_at AND r.worker = $6 \
             RETURNING r.id",
        )
        .bind(&ids)
        .bind(&states)
        .bind(&updated)
        .bind(&message_ids)
        .bind(gate.now)
        .bind(&self.worker)
        .bind(now_ms() + lease_ms())
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
        let built: Vec<_> = built
            .into_iter()
            .filter(|(c, _)| marked.contains(&c.id))
            .collect();
        if built.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = built.iter().map(|(c, _)| c.id).collect();
        let counts: Vec<i64> = built
            .iter()
            .map(|(_, m)| i64::from(m.recipient_count))
            .collect();
        let logged: HashMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>(
            "INSERT INTO send_log (account, at, recipients, recipient_id) \
             SELECT $1, $2, u.recipients, u.id FROM UNNEST($3::bigint[], $4::bigint[]) AS u(id, recipients) \
             RETURNING recipient_id, id",
        )
        .bind(gate.account)
        .bind(gate.now)
        .bind(&ids)
        .bind(&counts)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
        built
            .into_iter()
            .map(|(candidate, message)| {
                let log_id = *logged
                    .get(&candidate.id)
                    .context("a logged send is missing from the send log")?;
                Ok(Ready {
                    candidate,
                    message: Box::new(message),
                    log_id,
                })
            })
            .collect()
    }

    /// Records what happened to a claimed recipient. Outcomes are written
    /// together: one recorded while another write is under way is written
    /// by the next one, at the latest by the next claim, which writes every
    /// outcome waiting before it marks new rows `sending`, so that no more
    /// rows are ever `sending` in the database than were claimed and not
    /// yet settled (SPEC §7.3).
    pub async fn record(
        &self,
        candidate: &Candidate,
        log_id: i64,
        outcome: &Outcome,
        now: i64,
    ) -> Result<()> {
        self.failed_write()?;
        let first = {
            let mut outcomes = lock(&self.outcomes);
            outcomes.push((candidate.clone(), log_id, outcome.clone(), now));
            outcomes.queue.len() == 1
        };
        if first {
            // Written a moment later with those recorded meanwhile (each
            // write is a few round trips to the server, whatever its size),
            // or before, by the next claim; never making this sender wait.
            let store = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(OUTCOMES_GATHERED).await;
                let _writing = store.writer.clone().lock_owned().await;
                if let Err(e) = store.write_outcomes(false).await {
                    lock(&store.outcomes).error.get_or_insert(format!("{e:#}"));
                }
            });
        }
        Ok(())
    }

    /// Writes the outcomes this process recorded and not yet written, so
    /// that its own reads see them (a write under way holds the lock:
    /// waiting for it covers the outcomes it took from the queue too).
    async fn written(&self) -> Result<()> {
        self.failed_write()?;
        let _writing = self.writer.clone().lock_owned().await;
        self.write_outcomes(false).await
    }

    /// Writes the outcomes not yet written, synced; returns once they are.
    pub async fn flush(&self) -> Result<()> {
        let _writing = self.writer.clone().lock_owned().await;
        self.write_outcomes(true).await?;
        self.failed_write()
    }

    /// An error met writing outcomes in the background, once.
    fn failed_write(&self) -> Result<()> {
        match lock(&self.outcomes).error.take() {
            Some(e) => Err(anyhow::anyhow!("recording outcomes: {e}")),
            None => Ok(()),
        }
    }

    /// Writes the waiting outcomes in one transaction, a few statements
    /// whatever their number. Unless `synced`, the commit does not wait for
    /// the disk: the next claim's synced commit makes them durable too (the
    /// log is written in order), and until then a lost outcome leaves its
    /// row `sending`, which becomes `unknown`, never sent again. Call
    /// holding [`PgStore::writer`].
    async fn write_outcomes(&self, synced: bool) -> Result<()> {
        let waiting = std::mem::take(&mut lock(&self.outcomes).queue);
        if waiting.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        if !synced {
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *tx)
                .await?;
        }
        write_outcomes(&mut tx, &waiting).await?;
        tx.commit().await?;
        lock(&self.outcomes).committed(&waiting);
        Ok(())
    }

    /// Pauses an account (by its pause key) for every process using this store.
    pub async fn pause_account(&self, account: &str, until_ms: i64, reason: &str) -> Result<()> {
        sqlx::query("INSERT INTO account_pauses (account, until, reason) VALUES ($1, $2, $3) ON CONFLICT (account) DO UPDATE SET until = GREATEST(account_pauses.until, excluded.until), reason = excluded.reason")
            .bind(account)
            .bind(until_ms)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_aside(&self, account: &str, reason: &str, now: i64) -> Result<()> {
        sqlx::query("INSERT INTO accounts_set_aside (account, since, reason) VALUES ($1, $2, $3) ON CONFLICT (account) DO UPDATE SET since = excluded.since, reason = excluded.reason")
            .bind(account)
            .bind(now)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn restore_account(&self, account: &str) -> Result<()> {
        sqlx::query("DELETE FROM accounts_set_aside WHERE account = $1")
            .bind(account)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_aside_since(&self, account: &str) -> Result<Option<(i64, String)>> {
        let row = sqlx::query("SELECT since, reason FROM accounts_set_aside WHERE account = $1")
            .bind(account)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get("since"), r.get("reason"))))
    }

    pub async fn account_pause(&self, account: &str, now: i64) -> Result<Option<(i64, String)>> {
        let row = sqlx::query(
            "SELECT until, reason FROM account_pauses WHERE account = $1 AND until > $2",
        )
        .bind(account)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (r.get("until"), r.get("reason"))))
    }

    /// The account's windows with the sends that count in them now.
    pub async fn schedule(&self, account: &str, windows: &[Window], now: i64) -> Result<Schedule> {
        let mut conn = self.pool.acquire().await?;
        load_schedule(&mut conn, account, windows, now).await
    }

    /// Counts per state: the pending rows are the campaign's rows less the
    /// others, which the index by state holds (never below none, whatever
    /// the database says); all counted where the number of rows is unknown.
    pub async fn counts(&self, campaign_id: i64) -> Result<Counts> {
        self.written().await?;
        let rows = sqlx::query(
            "WITH counted AS (SELECT state, COUNT(*) AS n FROM recipients \
             WHERE campaign_id = $1 AND state <> 'pending' GROUP BY state) \
             SELECT state AS st, n FROM counted UNION ALL \
             SELECT 'pending', GREATEST(row_count - COALESCE((SELECT SUM(n) FROM counted), 0), 0)::bigint \
             FROM campaigns WHERE id = $1 AND row_count IS NOT NULL",
        )
        .bind(campaign_id)
        .fetch_all(&self.pool)
        .await?;
        let known = rows.iter().any(|r| r.get::<&str, _>("st") == "pending");
        if known {
            return Ok(tally(rows));
        }
        let rows = sqlx::query(
            "SELECT state AS st, COUNT(*) AS n FROM recipients WHERE campaign_id = $1 GROUP BY state",
        )
        .bind(campaign_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(tally(rows))
    }

    /// The earliest retry time among deferred recipients.
    pub async fn next_retry(&self, campaign_id: i64) -> Result<Option<i64>> {
        self.written().await?;
        Ok(sqlx::query_scalar("SELECT MIN(next_attempt_at) FROM recipients WHERE campaign_id = $1 AND state = 'deferred'")
            .bind(campaign_id)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Every row for export, in file order; `visit` is called once per row.
    pub async fn export(
        &self,
        campaign_id: i64,
        state: Option<State>,
        visit: impl FnMut(ExportRow) -> Result<()>,
    ) -> Result<()> {
        self.written().await?;
        let mut conn = self.pool.acquire().await?;
        export_rows(&mut conn, "recipients", campaign_id, state, visit).await
    }

    pub async fn suppress(&self, address: &str, reason: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let added = insert_suppression(&mut tx, address, reason, now_ms()).await?;
        tx.commit().await?;
        Ok(added)
    }

    pub async fn unsuppress(&self, key: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM suppressions WHERE email_key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn suppressions(&self) -> Result<Vec<(String, String, i64)>> {
        let rows =
            sqlx::query("SELECT email, reason, created_at FROM suppressions ORDER BY email_key")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get("email"), r.get("reason"), r.get("created_at")))
            .collect())
    }

    /// `failed` rows whose address is not on the suppression list go back to
    /// `pending` for one more round (`--retry-failed`), their attempts reset
    /// so that a transient failure gets `max_attempts` again.
    pub async fn requeue_failed(&self, campaign_id: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        pending_from_start(&mut tx, campaign_id).await?;
        let done = sqlx::query(&format!(
            "UPDATE recipients SET state = 'pending', reason = NULL, attempts = 0, next_attempt_at = NULL, updated_at = $2 \
             WHERE {RETRYABLE_FAILED}"
        ))
        .bind(campaign_id)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// How many rows `--retry-failed` would send again.
    pub async fn retryable_failed(&self, campaign_id: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM recipients WHERE {RETRYABLE_FAILED}"
        ))
        .bind(campaign_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// When the account first sent, for its warm-up (SPEC §6b).
    pub async fn first_send(&self, account: &str) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT MIN(at) FROM send_log WHERE account = $1")
                .bind(account)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Recipients the account sent to at or after `since_ms`.
    pub async fn recipients_since(&self, account: &str, since_ms: i64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(recipients), 0)::BIGINT FROM send_log WHERE account = $1 AND at >= $2",
        )
        .bind(account)
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Adds every address in one transaction: all of them or, on an
    /// error, none. Returns how many were not on the list yet.
    pub async fn suppress_all(&self, addresses: &[String], reason: &str) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let mut added = 0;
        for address in addresses {
            added += u64::from(insert_suppression(&mut tx, address, reason, now).await?);
        }
        tx.commit().await?;
        Ok(added)
    }

    /// When the campaign's state was created, Unix ms.
    pub async fn campaign_created_at(&self, campaign_id: i64) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT created_at FROM campaigns WHERE id = $1")
                .bind(campaign_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The campaign's recipients whose message may have come back, among
    /// those named by `message_ids` (keys of [`message_id_key`]) or by
    /// `addresses` (lowercase), found in one pass over the campaign's rows
    /// whatever the number of notifications.
    pub async fn notice_rows(
        &self,
        campaign_id: i64,
        message_ids: &HashSet<String>,
        addresses: &HashSet<String>,
    ) -> Result<Vec<NoticeRow>> {
        self.written().await?;
        use futures_util::TryStreamExt;
        let mut found = Vec::new();
        if message_ids.is_empty() && addresses.is_empty() {
            return Ok(found);
        }
        // Only a message a server accepted (or may have) can bounce.
        let sql = format!(
            "SELECT id, {EMAIL} AS email, {ADDRESS} AS address, row_key, state, reason, message_id FROM recipients \
             WHERE campaign_id = $1 AND state IN ('sent', 'unknown', 'bounced')"
        );
        let mut rows = sqlx::query(&sql).bind(campaign_id).fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            let message_id: Option<String> = row.get("message_id");
            let address: String = row.get::<Option<String>, _>("address").unwrap_or_default();
            let by_id = message_id
                .as_deref()
                .is_some_and(|id| message_ids.contains(&message_id_key(id)));
            let by_address = addresses.contains(&address.to_lowercase())
                || addresses.contains(row.get::<&str, _>("row_key"));
            if !(by_id || by_address) {
                continue;
            }
            let Ok(state) = State::from_str(row.get("state")) else {
                continue;
            };
            found.push(NoticeRow {
                id: row.get("id"),
                email: row.get("email"),
                address,
                state,
                reason: row.get("reason"),
                message_id: message_id.map(|id| message_id_key(&id)),
            });
        }
        Ok(found)
    }

    /// Records a bounce: the row becomes `bounced` with the notification's
    /// status and diagnostic and, when `suppress`, its address joins the
    /// suppression list, in one transaction. A row already `bounced` (or no
    /// longer in an accepted state) is left as it is and nothing is
    /// suppressed again: a second read of the same mailbox changes nothing,
    /// even for an address the user took off the list since.
    pub async fn record_bounce(
        &self,
        id: i64,
        address: &str,
        status: &str,
        diagnostic: &str,
        suppress: bool,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let reply = if diagnostic.is_empty() {
            status
        } else {
            diagnostic
        };
        let changed = sqlx::query(
            "UPDATE recipients SET state = 'bounced', reason = $1, last_reply = $2, next_attempt_at = NULL, updated_at = $3 \
             WHERE id = $4 AND state IN ('sent', 'unknown')",
        )
        .bind(format!("bounced: {status}"))
        .bind(reply)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if changed && suppress {
            insert_suppression(&mut tx, address, &format!("bounced: {status} {reply}"), now)
                .await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Notes a delayed delivery on a `sent` row's reason; nothing else
    /// changes. False when the same note is already there.
    pub async fn note_delay(&self, id: i64, note: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE recipients SET reason = $1 WHERE id = $2 AND state = 'sent' AND reason IS DISTINCT FROM $1",
        )
        .bind(note)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every logged SMTP transaction of the campaign's recipients, by
    /// account then time; `visit` is called once per entry.
    pub async fn send_entries(
        &self,
        campaign_id: i64,
        mut visit: impl FnMut(SendEntry) -> Result<()>,
    ) -> Result<()> {
        self.written().await?;
        use futures_util::TryStreamExt;
        let sql = format!(
            "SELECT l.account, l.at, l.done_at, l.recipients, {EMAIL} AS email, r.last_reply \
             FROM send_log l JOIN recipients r ON r.id = l.recipient_id \
             WHERE r.campaign_id = $1 ORDER BY l.account, l.at, l.id"
        );
        let mut rows = sqlx::query(&sql).bind(campaign_id).fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            visit(SendEntry {
                account: row.get("account"),
                at: row.get("at"),
                done_at: row.get("done_at"),
                recipients: row.get("recipients"),
                email: row.get("email"),
                last_reply: row.get("last_reply"),
            })?;
        }
        Ok(())
    }

    /// Account pauses recorded for these accounts: (account, until, reason).
    pub async fn pauses(&self, accounts: &[String]) -> Result<Vec<(String, i64, String)>> {
        let rows = sqlx::query("SELECT account, until, reason FROM account_pauses ORDER BY until")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get("account"), r.get("until"), r.get("reason")))
            .filter(|(account, _, _): &(String, i64, String)| accounts.contains(account))
            .collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Outcomes of claimed recipients, column by column, for `UNNEST`.
#[derive(Default)]
struct Settled {
    id: Vec<i64>,
    state: Vec<&'static str>,
    reason: Vec<Option<String>>,
    reply: Vec<String>,
    next: Vec<Option<i64>>,
    now: Vec<i64>,
}

/// Writes outcomes of claimed recipients (at most one per recipient) in a
/// few statements whatever their number: their sends' ends, the rows
/// settled, the rows given back, the suppressions.
async fn write_outcomes(
    conn: &mut sqlx::PgConnection,
    outcomes: &[(Candidate, i64, Outcome, i64)],
) -> Result<()> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let (mut logs, mut ends) = (Vec::new(), Vec::new());
    let mut unlogged = Vec::new();
    let mut settled = Settled::default();
    let mut returned = Settled::default();
    let (mut unclaimed, mut before_state, mut attempts, mut before_id, mut before_at) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut suppressed, mut suppressed_key, mut suppressed_why, mut suppressed_at) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (candidate, log_id, outcome, now) in outcomes {
        logs.push(*log_id);
        ends.push(*now);
        let mut settle = |state, reason: Option<String>, reply: &str, next| {
            settled.id.push(candidate.id);
            settled.state.push(state);
            settled.reason.push(reason);
            settled.reply.push(reply.to_string());
            settled.next.push(next);
            settled.now.push(*now);
        };
        match outcome {
            Outcome::Sent { reply } => settle("sent", None, reply, None),
            Outcome::Deferred { reply, retry_at_ms } => settle(
                "deferred",
                Some("transient failure, will retry".into()),
                reply,
                Some(*retry_at_ms),
            ),
            Outcome::Failed { reply, suppress } => {
                settle("failed", Some(format!("rejected: {reply}")), reply, None);
                if *suppress {
                    suppressed_key.push(candidate.address.to_lowercase());
                    suppressed.push(candidate.address.clone());
                    suppressed_why.push(format!("bounced: {reply}"));
                    suppressed_at.push(*now);
                }
            }
            Outcome::Unknown { reply } => settle(
                "unknown",
                Some(
                    "connection lost after the message was sent: may or may not have been delivered"
                        .into(),
                ),
                reply,
                None,
            ),
            Outcome::Unclaimed => {
                unclaimed.push(candidate.id);
                before_state.push(candidate.before.state.clone());
                attempts.push(candidate.attempts);
                before_id.push(candidate.before.message_id.clone());
                before_at.push(candidate.before.updated_at);
                unlogged.push(*log_id);
            }
            Outcome::Returned { reply, unlog } => {
                returned.id.push(candidate.id);
                returned.reply.push(reply.clone());
                returned.now.push(*now);
                if *unlog {
                    unlogged.push(*log_id);
                }
            }
        }
    }
    let again: Vec<i64> = unclaimed
        .iter()
        .zip(&before_state)
        .filter(|(_, state)| state.as_str() == State::Pending.as_str())
        .map(|(id, _)| *id)
        .chain(returned.id.iter().copied())
        .collect();
    pending_again(&mut *conn, &again).await?;
    sqlx::query(
        "UPDATE send_log l SET done_at = GREATEST(l.at, u.now) \
         FROM UNNEST($1::bigint[], $2::bigint[]) AS u(id, now) WHERE l.id = u.id",
    )
    .bind(&logs)
    .bind(&ends)
    .execute(&mut *conn)
    .await?;
    if !settled.id.is_empty() {
        sqlx::query(
            "UPDATE recipients r SET state = u.state, reason = u.reason, last_reply = u.reply, \
             next_attempt_at = u.next, updated_at = u.now, worker = NULL, lease_until = NULL \
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[]) \
             AS u(id, state, reason, reply, next, now) WHERE r.id = u.id",
        )
        .bind(&settled.id)
        .bind(&settled.state)
        .bind(&settled.reason)
        .bind(&settled.reply)
        .bind(&settled.next)
        .bind(&settled.now)
        .execute(&mut *conn)
        .await?;
    }
    if !unclaimed.is_empty() {
        sqlx::query(
            "UPDATE recipients r SET state = u.state, attempts = u.attempts, message_id = u.message_id, \
             updated_at = NULLIF(u.updated_at, 0), worker = NULL, lease_until = NULL \
             FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[]) \
             AS u(id, state, attempts, message_id, updated_at) WHERE r.id = u.id",
        )
        .bind(&unclaimed)
        .bind(&before_state)
        .bind(&attempts)
        .bind(&before_id)
        .bind(&before_at)
        .execute(&mut *conn)
        .await?;
    }
    if !returned.id.is_empty() {
        sqlx::query(
            "UPDATE recipients r SET state = 'pending', attempts = GREATEST(r.attempts - 1, 0), \
             last_reply = u.reply, updated_at = u.now, worker = NULL, lease_until = NULL \
             FROM UNNEST($1::bigint[], $2::text[], $3::bigint[]) AS u(id, reply, now) WHERE r.id = u.id",
        )
        .bind(&returned.id)
        .bind(&returned.reply)
        .bind(&returned.now)
        .execute(&mut *conn)
        .await?;
    }
    if !unlogged.is_empty() {
        sqlx::query("DELETE FROM send_log WHERE id = ANY($1)")
            .bind(&unlogged)
            .execute(&mut *conn)
            .await?;
    }
    if !suppressed.is_empty() {
        sqlx::query(
            "INSERT INTO suppressions (email_key, email, reason, created_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) \
             ON CONFLICT (email_key) DO NOTHING",
        )
        .bind(&suppressed_key)
        .bind(&suppressed)
        .bind(&suppressed_why)
        .bind(&suppressed_at)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn insert_suppression(
    conn: &mut sqlx::PgConnection,
    address: &str,
    reason: &str,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query("INSERT INTO suppressions (email_key, email, reason, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (email_key) DO NOTHING")
        .bind(address.to_lowercase())
        .bind(address)
        .bind(reason)
        .bind(now)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The campaign's (bound first) pending rows, read by the primary key in
/// id order with an `id >=` bound (after [`by_primary_key`]): the campaign
/// is compared through an expression, so that no index on it serves.
const FIRST_PENDING: &str =
    "SELECT id FROM recipients WHERE campaign_id + 0 = $1 AND state = 'pending'";

/// For the rest of the transaction, rows are found by an index and in its
/// order, never by reading the table or a bitmap of it. Pending rows are
/// read in id order from a cursor where the first of them is: the primary
/// key finds a few at once. Without statistics (right after a large read)
/// or with few rows left pending, the planner would expect to find them
/// only by reading the whole table, and so read it (0.1-0.4 s at
/// 1,000,000 rows).
async fn by_primary_key(conn: &mut sqlx::PgConnection) -> Result<()> {
    sqlx::query(
        "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the campaign's cursor (`pending_from`) up to its first pending
/// row, or past its last row when it has none, unless another worker is
/// moving it now. Whoever makes a row pending again lowers the cursor in
/// the same transaction ([`pending_again`]): that waits for the campaign's
/// row this holds, then lowers what this wrote; and the first pending row
/// is read after the lock is taken, so it sees any row made pending by a
/// transaction that held it before.
async fn advance_pending(conn: &mut sqlx::PgConnection, campaign_id: i64) -> Result<()> {
    let from: Option<i64> = sqlx::query_scalar(
        "SELECT pending_from FROM campaigns WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(campaign_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(from) = from else {
        return Ok(());
    };
    // By the primary key from the cursor; with no pending row left, past
    // the last row of any campaign (rows added later come from a read of
    // the file, which puts the cursor back to the start).
    let to: i64 = sqlx::query_scalar(&format!(
        "SELECT COALESCE(({FIRST_PENDING} AND id >= $2 ORDER BY id LIMIT 1), \
         (SELECT MAX(id) + 1 FROM recipients), 0)"
    ))
    .bind(campaign_id)
    .bind(from)
    .fetch_one(&mut *conn)
    .await?;
    if to > from {
        sqlx::query("UPDATE campaigns SET pending_from = $2 WHERE id = $1")
            .bind(campaign_id)
            .bind(to)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Rows about to become pending again lie below no cursor: their
/// campaigns' cursors are lowered to them, before the rows are changed
/// (the campaign's row, then its recipients, as a read of the file locks
/// them).
async fn pending_again(conn: &mut sqlx::PgConnection, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE campaigns c SET pending_from = LEAST(c.pending_from, r.first) \
         FROM (SELECT campaign_id, MIN(id) AS first FROM recipients WHERE id = ANY($1) GROUP BY campaign_id) r \
         WHERE c.id = r.campaign_id",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Any row of the campaign may become pending: claims read from its first row.
async fn pending_from_start(conn: &mut sqlx::PgConnection, campaign_id: i64) -> Result<()> {
    sqlx::query("UPDATE campaigns SET pending_from = 0 WHERE id = $1")
        .bind(campaign_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Reserves to `worker` and reads up to `limit` rows due now: the
/// deferred whose retry time has come (`deferred`), else the pending; rows
/// reserved by another worker whose reservation runs are passed over.
#[allow(clippy::too_many_arguments)]
async fn pick_rows(
    conn: &mut sqlx::PgConnection,
    worker: &str,
    campaign_id: i64,
    now: i64,
    excluded: &[i64],
    skip: &Skip,
    limit: i64,
    deferred: bool,
) -> Result<Vec<Candidate>> {
    // With nothing to skip the condition is left out. Cells stored
    // compactly are joined by CELLS: a row holding a skipped value as a
    // whole cell is passed over. That may be another column than
    // `skip.field`, which only delays that row until the zone opens (the
    // engine still checks each recipient's own zone). Rows stored as JSON
    // are looked up by the field's index, a number written into the query.
    let skipping = match skip.values.is_empty() {
        true => String::new(),
        false => format!(
            " AND CASE WHEN left(fields, 1) = chr({sep}) \
             THEN NOT EXISTS (SELECT 1 FROM UNNEST($7::text[]) z(v) \
             WHERE strpos(fields || chr({sep}), chr({sep}) || z.v || chr({sep})) > 0) \
             ELSE COALESCE(fields::jsonb ->> {}, '') <> ALL($7) END",
            skip.field,
            sep = u32::from(CELLS)
        ),
    };
    // Pending rows are not in the index by state: they are read by the
    // primary key in id order from the campaign's cursor, below which it
    // has none ([`FIRST_PENDING`]). The limit is written into the query, so
    // that the plan (prepared once) is made knowing how few rows it is for.
    let (due, order) = match deferred {
        true => (
            "campaign_id = $1 AND state = 'deferred' AND next_attempt_at <= $2",
            "next_attempt_at, id",
        ),
        false => (
            "campaign_id + 0 = $1 AND state = 'pending' \
             AND id >= (SELECT pending_from FROM campaigns WHERE id = $1)",
            "id",
        ),
    };
    let rows = sqlx::query(&format!(
        "UPDATE recipients SET worker = $4, lease_until = $5 WHERE id IN ( \
         SELECT id FROM recipients WHERE {due} AND NOT (id = ANY($3)) \
         AND (worker IS NULL OR worker = $4 OR lease_until < $6){skipping} \
         ORDER BY {order} LIMIT {limit} FOR UPDATE SKIP LOCKED) \
         RETURNING id, row_number::bigint AS row_number, {EMAIL} AS email, {ADDRESS} AS address, fields, \
         attempts::bigint AS attempts, state, message_id, COALESCE(updated_at, 0) AS updated_at, next_attempt_at"
    ))
    .bind(campaign_id)
    .bind(now)
    .bind(excluded)
    .bind(worker)
    .bind(now_ms() + PICK_MS)
    // Leases and reservations run on the clock of the machines.
    .bind(now_ms())
    .bind(&skip.values)
    .fetch_all(&mut *conn)
    .await?;
    let mut picked = rows
        .into_iter()
        .map(|row| {
            let email: String = row.get("email");
            let candidate = Candidate {
                id: row.get("id"),
                row_number: row.get("row_number"),
                fields: decode_fields(row.get("fields"), &email)?,
                email,
                address: row.get::<Option<String>, _>("address").unwrap_or_default(),
                attempts: row.get("attempts"),
                before: Before {
                    state: row.get("state"),
                    message_id: row.get("message_id"),
                    updated_at: row.get("updated_at"),
                },
            };
            Ok((row.get::<Option<i64>, _>("next_attempt_at"), candidate))
        })
        .collect::<Result<Vec<_>>>()?;
    // RETURNING keeps no order.
    picked.sort_by_key(|(at, c)| (*at, c.id));
    Ok(picked.into_iter().map(|(_, c)| c).collect())
}

/// The wait before a send of `count` recipients for `gate`'s account: its
/// pause, or its next slot in the future.
async fn wait_in(
    conn: &mut sqlx::PgConnection,
    gate: &Gate<'_>,
    count: u32,
) -> Result<Option<Claim>> {
    let paused: Option<(i64, String)> = sqlx::query_as(
        "SELECT until, reason FROM account_pauses WHERE account = $1 AND until > $2",
    )
    .bind(gate.pause_key)
    .bind(gate.now)
    .fetch_optional(&mut *conn)
    .await?;
    let schedule = match paused.is_none() && !gate.windows.is_empty() {
        true => Some(load_schedule(conn, gate.account, gate.windows, gate.now).await?),
        false => None,
    };
    Ok(gate.wait(paused, schedule, count))
}

async fn load_schedule(
    conn: &mut sqlx::PgConnection,
    account: &str,
    windows: &[Window],
    now: i64,
) -> Result<Schedule> {
    let horizon = i64::try_from(Schedule::horizon(windows).as_millis()).unwrap_or(i64::MAX / 4);
    let rows = sqlx::query(
        "SELECT at, COALESCE(done_at, at) AS done_at, recipients FROM send_log \
             WHERE account = $1 AND at > $2 AND COALESCE(done_at, at) > $3",
    )
    .bind(account)
    // A transaction ends at most a few timeouts after it starts; the
    // first bound lets the index narrow the scan.
    .bind(now.saturating_sub(horizon).saturating_sub(3_600_000))
    .bind(now.saturating_sub(horizon))
    .fetch_all(conn)
    .await?;
    let log = rows.into_iter().map(|r| Send {
        at_ms: r.get("at"),
        done_ms: r.get("done_at"),
        count: u32::try_from(r.get::<i64, _>("recipients")).unwrap_or(1),
    });
    Ok(Schedule::new(windows, log))
}

async fn export_rows(
    conn: &mut sqlx::PgConnection,
    table: &str,
    campaign_id: i64,
    state: Option<State>,
    mut visit: impl FnMut(ExportRow) -> Result<()>,
) -> Result<()> {
    use futures_util::TryStreamExt;
    let sql = format!(
        "SELECT {EMAIL} AS email, state, reason, attempts::bigint AS attempts, last_reply, \
         COALESCE(updated_at, (SELECT imported_at FROM campaigns WHERE id = $1), 0) AS updated_at, \
         message_id, fields FROM {table} \
         WHERE campaign_id = $1 AND ($2::text IS NULL OR state = $3) ORDER BY row_number, id"
    );
    let mut rows = sqlx::query(&sql)
        .bind(campaign_id)
        .bind(state.map(State::as_str))
        .bind(state.map(State::as_str))
        .fetch(conn);
    while let Some(row) = rows.try_next().await? {
        let email: String = row.get("email");
        visit(ExportRow {
            fields: decode_fields(row.get("fields"), &email)?,
            email,
            state: row.get("state"),
            reason: row.get("reason"),
            attempts: row.get("attempts"),
            last_reply: row.get("last_reply"),
            updated_at: row.get("updated_at"),
            message_id: row.get("message_id"),
        })?;
    }
    Ok(())
}

/// Rows of a batch of the import, column by column, for `UNNEST`.
#[derive(Default)]
struct Columns {
    id: Vec<i64>,
    key: Vec<String>,
    email: Vec<String>,
    address: Vec<Option<String>>,
    number: Vec<i64>,
    fields: Vec<String>,
    state: Vec<&'static str>,
    reason: Vec<Option<String>>,
}

/// The transaction's own copy of a campaign's rows that a read which is
/// rolled back writes into; named with its schema, so that no statement
/// prepared for the table itself is ever taken for it.
const DISCARDED: &str = "pg_temp.hikyaku_discarded_read";
/// Where the first read of a campaign writes its rows, which go into the
/// table at commit.
const STAGED: &str = "pg_temp.hikyaku_staged_read";

/// Appends a value of a row for `COPY … FROM STDIN` (text format), then a
/// tab: NULL as `\N`, and the backslash and the characters that end a
/// value or a row escaped.
fn copy_text(out: &mut String, value: Option<&str>) {
    match value {
        None => out.push_str("\\N"),
        Some(value) => {
            for c in value.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\t' => out.push_str("\\t"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    c => out.push(c),
                }
            }
        }
    }
    out.push('\t');
}

/// Makes the index on keys of a read's own table.
async fn index_keys(conn: &mut sqlx::PgConnection, table: &str) -> Result<()> {
    sqlx::query(&format!("CREATE INDEX ON {table} USING hash (row_key)"))
        .execute(conn)
        .await?;
    Ok(())
}

/// The keys a read wrote, as a Bloom filter of a fixed size (8 MB, memory
/// not growing with the file): a key it says was not written was not. Of
/// the keys of a 1,000,000-row file, about one in ten million is taken for
/// written (and looked up); of a 10,000,000-row file, one in twenty.
struct Written {
    bits: Vec<u64>,
    /// The table has its index on keys.
    indexed: bool,
}

impl Written {
    const BITS: u64 = 1 << 26;
    const HASHES: u64 = 7;

    fn new() -> Box<Written> {
        Box::new(Written {
            bits: vec![0; (Self::BITS / 64) as usize],
            indexed: false,
        })
    }

    /// The key's bits: two halves of one hash, combined.
    fn bits_of(key: &str) -> impl Iterator<Item = usize> {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let hash = hasher.finish();
        let (a, b) = (hash & 0xffff_ffff, (hash >> 32) | 1);
        (0..Self::HASHES).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) % Self::BITS) as usize)
    }

    fn add(&mut self, key: &str) {
        for bit in Self::bits_of(key) {
            self.bits[bit / 64] |= 1 << (bit % 64);
        }
    }

    fn may_hold(&self, key: &str) -> bool {
        Self::bits_of(key).all(|bit| self.bits[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

/// A read of the recipients file in progress, inside one transaction.
pub struct PgImport {
    tx: Transaction<'static, Postgres>,
    /// Where the rows are written: `recipients`, [`DISCARDED`] for a
    /// read that is rolled back, or [`STAGED`] for a campaign's first read.
    table: &'static str,
    /// The keys this read wrote, where its table started empty: the only
    /// ones worth looking up there (and until one is, it has no index on
    /// keys).
    written: Option<Box<Written>>,
    campaign_id: i64,
    generation: i64,
    /// How many rows the campaign has with this read's (`None`: unknown,
    /// counted at commit).
    row_count: Option<i64>,
    now: i64,
    /// The time of the read before, which the rows it wrote and nothing
    /// changed since (no time of their own) keep.
    imported_before: Option<i64>,
    worker: String,
    /// Another live worker read the file: this one shares its sending.
    joined: bool,
}

impl PgImport {
    /// Rows of the file in file order, what the store knows of each (a row
    /// whose address is not valid is `Settled`: skipped, invalid address).
    /// A few statements per batch, whatever its size: one to find the keys
    /// already known, one for the suppressed ones, one to insert the new
    /// rows and one to refresh the known ones.
    pub async fn rows(&mut self, rows: &[ImportRow<'_>]) -> Result<Vec<RowStatus>> {
        let keys: Vec<&str> = rows.iter().filter_map(|r| r.valid.map(|v| v.1)).collect();
        let mut known: HashMap<String, Known> = HashMap::new();
        let mut suppressed: HashSet<String> = HashSet::new();
        let lookup: Vec<&str> = match &self.written {
            Some(written) => keys
                .iter()
                .copied()
                .filter(|k| written.may_hold(k))
                .collect(),
            None => keys.clone(),
        };
        if !lookup.is_empty() {
            if let Some(written) = &mut self.written {
                if !written.indexed {
                    index_keys(&mut self.tx, self.table).await?;
                    written.indexed = true;
                }
            }
            let found = sqlx::query(&format!(
                "SELECT row_key, id, seen_gen::bigint AS seen_gen, state, reason, row_number::bigint AS row_number FROM {} \
                 WHERE campaign_id = $1 AND row_key = ANY($2)",
                self.table
            ))
            .bind(self.campaign_id)
            .bind(&lookup)
            .fetch_all(&mut *self.tx)
            .await?;
            for r in found {
                known.insert(
                    r.get("row_key"),
                    Known {
                        id: r.get("id"),
                        seen_gen: r.get("seen_gen"),
                        state: r.get("state"),
                        reason: r.get("reason"),
                        row_number: r.get("row_number"),
                    },
                );
            }
        }
        if !keys.is_empty() {
            suppressed =
                sqlx::query_scalar("SELECT email_key FROM suppressions WHERE email_key = ANY($1)")
                    .bind(&keys)
                    .fetch_all(&mut *self.tx)
                    .await?
                    .into_iter()
                    .collect();
        }
        if let Some(written) = &mut self.written {
            for key in &keys {
                written.add(key);
            }
        }
        // New rows get their ids from the insert: until then, a stand-in
        // below zero, which no stored row has.
        let mut stand_in = 0;
        let (mut statuses, writes) =
            classify_rows(rows, &mut known, &suppressed, self.generation, || {
                stand_in -= 1;
                stand_in
            });
        let (mut new, mut old) = (Columns::default(), Columns::default());
        for w in &writes {
            let row = &rows[w.row];
            let (key, (email, address, fields)) = match row.valid {
                Some((address, key)) if w.recipient => (
                    key.to_string(),
                    compact::recipient(key, row.email, address, row.fields),
                ),
                _ => (
                    format!("row:{}", row.number),
                    (
                        row.email.to_string(),
                        None,
                        encode_fields(row.fields, row.email),
                    ),
                ),
            };
            let columns = if w.new { &mut new } else { &mut old };
            columns.id.push(w.id);
            columns.key.push(key);
            columns.email.push(email);
            columns.address.push(address);
            columns
                .number
                .push(i64::try_from(row.number).unwrap_or(i64::MAX));
            columns.fields.push(fields);
            columns.state.push(w.state);
            columns.reason.push(w.reason.clone());
        }
        if !new.id.is_empty() {
            let added = i64::try_from(new.id.len()).unwrap_or(0);
            self.row_count = self.row_count.map(|n| n + added);
            // Ids from the table's sequence, in file order; the rows sent
            // with `COPY`, which costs the server about a third of an
            // `INSERT` of the same rows.
            let mut ids: Vec<i64> = sqlx::query_scalar(
                "SELECT nextval('recipients_id_seq') FROM generate_series(1, $1)",
            )
            .bind(added)
            .fetch_all(&mut *self.tx)
            .await?;
            ids.sort_unstable();
            anyhow::ensure!(ids.len() == new.id.len(), "the store gave too few ids");
            let mut data = String::with_capacity(new.id.len() * 160);
            for (i, id) in ids.iter().enumerate() {
                use std::fmt::Write as _;
                let _ = write!(data, "{id}\t{}\t", self.campaign_id);
                copy_text(&mut data, Some(&new.key[i]));
                copy_text(&mut data, Some(&new.email[i]));
                copy_text(&mut data, new.address[i].as_deref());
                let _ = write!(data, "{}\t", new.number[i]);
                copy_text(&mut data, Some(&new.fields[i]));
                copy_text(&mut data, Some(new.state[i]));
                copy_text(&mut data, new.reason[i].as_deref());
                // No time of its own: the read's, kept in the campaign.
                let _ = writeln!(data, "{}\t\\N", self.generation);
            }
            let mut copy = self
                .tx
                .copy_in_raw(&format!(
                    "COPY {} (id, campaign_id, row_key, email, address, row_number, fields, state, reason, \
                     seen_gen, updated_at) FROM STDIN",
                    self.table
                ))
                .await?;
            copy.send(data.as_bytes()).await?;
            copy.finish().await?;
            for (w, id) in writes.iter().filter(|w| w.new).zip(&ids) {
                if let RowStatus::ToSend { id: to_send } = &mut statuses[w.row] {
                    *to_send = *id;
                }
            }
        }
        if !old.id.is_empty() {
            sqlx::query(&format!(
                "UPDATE {} r SET email = u.email, address = u.address, row_number = u.row_number, \
                 fields = u.fields, seen_gen = $9, state = u.state, reason = u.reason, \
                 updated_at = CASE WHEN r.state = u.state THEN COALESCE(r.updated_at, $11) ELSE $10 END \
                 FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[]) \
                 AS u(id, row_key, email, address, row_number, fields, state, reason) WHERE r.id = u.id",
                self.table
            ))
            .bind(&old.id)
            .bind(&old.key)
            .bind(&old.email)
            .bind(&old.address)
            .bind(&old.number)
            .bind(&old.fields)
            .bind(&old.state)
            .bind(&old.reason)
            .bind(self.generation)
            .bind(self.now)
            .bind(self.imported_before)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(statuses)
    }

    /// A row whose message cannot be built, with `--skip-invalid`.
    pub async fn skip_invalid_message(&mut self, id: i64, why: &str) -> Result<()> {
        sqlx::query(&format!(
            "UPDATE {} SET state = 'skipped', reason = $1, updated_at = $2 WHERE id = $3",
            self.table
        ))
        .bind(SkipReason::InvalidMessage(why.to_string()).to_text())
        .bind(self.now)
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Rows that left the file and were never sent become `skipped (removed)`;
    /// then everything read becomes visible at once. Returns how many left.
    /// Whether another live worker read the file and this one joins it.
    pub fn joined(&self) -> bool {
        self.joined
    }

    pub async fn commit(mut self) -> Result<u64> {
        anyhow::ensure!(
            self.table != DISCARDED,
            "a read of the recipients file made to be rolled back was kept"
        );
        sqlx::query("UPDATE workers SET ready = TRUE WHERE campaign_id = $1 AND token = $2")
            .bind(self.campaign_id)
            .bind(&self.worker)
            .execute(&mut *self.tx)
            .await?;
        if self.joined {
            self.tx.commit().await?;
            return Ok(0);
        }
        // The read may have made rows pending anywhere, and added new ones.
        pending_from_start(&mut self.tx, self.campaign_id).await?;
        sqlx::query(
            "UPDATE campaigns SET row_count = COALESCE($2, \
             (SELECT COUNT(*) FROM recipients WHERE campaign_id = $1)) WHERE id = $1",
        )
        .bind(self.campaign_id)
        .bind(self.row_count)
        .execute(&mut *self.tx)
        .await?;
        if self.table == STAGED {
            // The campaign had no rows before: none left the file.
            sqlx::query(&format!(
                "INSERT INTO recipients SELECT * FROM {STAGED} ORDER BY campaign_id, row_key"
            ))
            .execute(&mut *self.tx)
            .await?;
            self.tx.commit().await?;
            return Ok(0);
        }
        let removed = sqlx::query(
            "UPDATE recipients SET state = 'skipped', reason = 'removed', updated_at = $1 \
             WHERE campaign_id = $2 AND seen_gen < $3 AND state IN ('pending', 'deferred')",
        )
        .bind(self.now)
        .bind(self.campaign_id)
        .bind(self.generation)
        .execute(&mut *self.tx)
        .await?
        .rows_affected();
        if let Some(before) = self.imported_before {
            // Rows of the read before that this one left out keep its time.
            sqlx::query(
                "UPDATE recipients SET updated_at = $1 \
                 WHERE campaign_id = $2 AND seen_gen < $3 AND updated_at IS NULL",
            )
            .bind(before)
            .bind(self.campaign_id)
            .bind(self.generation)
            .execute(&mut *self.tx)
            .await?;
        }
        self.tx.commit().await?;
        Ok(removed)
    }

    /// Leaves the store as it was (check, dry run, refused send).
    pub async fn rollback(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }

    /// Every row as it would be after commit, for `export`.
    pub async fn export(
        &mut self,
        state: Option<State>,
        visit: impl FnMut(ExportRow) -> Result<()>,
    ) -> Result<()> {
        export_rows(&mut self.tx, self.table, self.campaign_id, state, visit).await
    }

    /// Counts per state as they would be after commit (for dry runs).
    pub async fn counts(&mut self) -> Result<Counts> {
        let rows = sqlx::query(&format!(
            "SELECT CASE WHEN seen_gen < $1 AND state IN ('pending', 'deferred') THEN 'skipped' ELSE state END AS st, COUNT(*) AS n \
             FROM {} WHERE campaign_id = $2 GROUP BY st",
            self.table
        ))
        .bind(self.generation)
        .bind(self.campaign_id)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(tally(rows))
    }
}

/// Counts per state from rows of `(st, n)`, every state present.
fn tally(rows: Vec<sqlx::postgres::PgRow>) -> Counts {
    let mut counts = Counts::default();
    for row in rows {
        if let Ok(state) = row.get::<&str, _>("st").parse::<State>() {
            counts[state] = row.get("n");
        }
    }
    counts
}

/// The campaign's live workers as `(token, "process N on HOST")`: a lease
/// not run out, and on this host a process that still runs.
async fn live_workers(
    conn: &mut sqlx::PgConnection,
    campaign_id: i64,
) -> Result<Vec<(String, String)>> {
    let rows = sqlx::query(
        "SELECT token, host, pid FROM workers WHERE campaign_id = $1 AND lease_until > $2 ORDER BY host, pid",
    )
    .bind(campaign_id)
    .bind(now_ms())
    .fetch_all(conn)
    .await?;
    let here = super::hostname();
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let host: String = r.get("host");
            let pid: i64 = r.get("pid");
            (host != here || super::process_alive(pid))
                .then(|| (r.get("token"), format!("process {pid} on {host}")))
        })
        .collect())
}

/// Refuses a name that another campaign file owns (SPEC §7.6).
async fn check_owner(conn: &mut sqlx::PgConnection, id: &Identity) -> Result<()> {
    let owner: Option<String> = sqlx::query_scalar(
        "SELECT file FROM campaigns WHERE name = $1 AND file IS NOT NULL AND file != $2 LIMIT 1",
    )
    .bind(&id.name)
    .bind(&id.file)
    .fetch_optional(&mut *conn)
    .await?;
    match owner {
        None => Ok(()),
        Some(owner) => {
            let gone = if std::path::Path::new(&owner).exists() {
                ""
            } else {
                " (that file no longer exists)"
            };
            Err(input_error(format!(
                "the campaign name {:?} belongs to another campaign file, {owner}{gone}; \
                 give {} its own `name`, or forget the other campaign's state with `hikyaku reset {:?}`",
                id.name, id.file, id.name
            )))
        }
    }
}

/// The campaign's row, created on first use with its name bound to its
/// file; a name another file owns is refused (SPEC §7.6). The row stays
/// locked until the transaction ends: a concurrent `forget_if_empty` waits
/// for it, and one already under way makes the upsert insert it anew.
async fn create(tx: &mut Transaction<'static, Postgres>, id: &Identity) -> Result<CampaignRecord> {
    check_owner(tx, id).await?;
    sqlx::query(
        "INSERT INTO campaigns (name, transport, file, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name, transport) DO UPDATE SET file = COALESCE(campaigns.file, excluded.file)",
    )
    .bind(&id.name)
    .bind(id.delivery.as_str())
    .bind(&id.file)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    // Rows recorded before names were bound belong to the first file that uses them.
    sqlx::query("UPDATE campaigns SET file = $1 WHERE name = $2 AND file IS NULL")
        .bind(&id.file)
        .bind(&id.name)
        .execute(&mut **tx)
        .await?;
    find(tx, id)
        .await?
        .context("the campaign row vanished right after it was created")
}

async fn find(conn: &mut sqlx::PgConnection, id: &Identity) -> Result<Option<CampaignRecord>> {
    let row = sqlx::query(
        "SELECT id, columns, fingerprint, checked FROM campaigns WHERE name = $1 AND transport = $2",
    )
    .bind(&id.name)
    .bind(id.delivery.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| {
        Ok(CampaignRecord {
            id: row.get("id"),
            columns: serde_json::from_str(row.get::<&str, _>("columns"))?,
            fingerprint: row.get("fingerprint"),
            checked: row.get("checked"),
        })
    })
    .transpose()
}

/// A driver's message with the URL's password taken out, wherever it shows.
fn strip_url(message: &str, url: &str) -> String {
    let masked = message.replace(url, &mask_password(url));
    let password = url
        .split_once("://")
        .map(|(_, rest)| &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())])
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => masked.replace(p, "***"),
        None => masked,
    }
}

#[cfg(test)]
impl PgStore {
    /// As if this worker's machine had died: its lease has run out.
    pub(super) async fn expire_lease_for_test(&self, campaign_id: i64) {
        sqlx::query("UPDATE workers SET lease_until = 0 WHERE campaign_id = $1 AND token = $2")
            .bind(campaign_id)
            .bind(&self.worker)
            .execute(&self.pool)
            .await
            .unwrap();
    }
}
