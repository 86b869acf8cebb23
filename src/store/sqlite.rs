//! The state store on SQLite: one file, WAL, one runner per campaign
//! (SPEC §7.4), claims serialised by `BEGIN IMMEDIATE`.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions as _, Connection as _, Row as _, Sqlite, Transaction};

use std::collections::{HashMap, HashSet};

use super::compact::{decode_fields, encode_fields_email_first, CELLS, EMAIL_FIRST};
use super::{
    classify_rows, lock, Before, CampaignRecord, CampaignSummary, Candidate, Claim, Counts,
    Delivery, ExportRow, Gate, Identity, ImportInto, ImportRow, Known, Outcome, Outcomes, Picked,
    Ready, RowStatus, Skip, SkipReason, State,
};
use crate::error::input_error;
use crate::limits::{Schedule, Send, Window};
use crate::message::Outgoing;
use crate::time::now_ms;

/// States as stored: [`State`]'s numbers, `pending` 0, which SQLite keeps
/// in a row's header alone.
const PENDING: i64 = State::Pending as i64;
const SENDING: i64 = State::Sending as i64;
pub(super) const SENT: i64 = State::Sent as i64;
const DEFERRED: i64 = State::Deferred as i64;
const FAILED: i64 = State::Failed as i64;
pub(super) const UNKNOWN: i64 = State::Unknown as i64;
const SKIPPED: i64 = State::Skipped as i64;
pub(super) const BOUNCED: i64 = State::Bounced as i64;

/// The states the index by state holds: all but `pending`, nearly every row
/// before the send, which claims read in id order from the table instead.
/// A query by state uses the index only when it says this, word for word. A query
/// over every row of a campaign says `NOT INDEXED`: the table read in order
/// is faster than its rows looked up one by one from the index by key,
/// which SQLite would otherwise choose for the campaign.
const INDEXED: &str = "state != 0";
const _: () = assert!(PENDING == 0);

/// What most rows never have is kept apart, in `recipient_details`, a row
/// there only for a recipient that has some of it (SPEC §12: every column
/// costs every row a byte). A query reading it joins the details as `d` to
/// `recipients`, which it leaves without an alias.
pub(super) const DETAILS: &str = "LEFT JOIN recipient_details d ON d.id = recipients.id";
/// The address as written, from a row and its details: its key, unless
/// the details say otherwise.
pub(super) const EMAIL: &str = "COALESCE(d.email, recipients.row_key)";
/// The address as sent, from a row and its details: the address as written,
/// unless the details say otherwise.
pub(super) const ADDRESS: &str = "COALESCE(d.address, d.email, recipients.row_key)";
/// A row's number in the file (see `row_shift` in the migrations).
const ROW_NUMBER: &str = "(recipients.row_shift + recipients.id \
     - (SELECT row_base FROM campaigns base WHERE base.id = recipients.campaign_id))";

/// A state's stored number, from its name.
fn state_code(name: &str) -> Result<i64> {
    State::from_str(name)
        .map(|state| state as i64)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A state from its stored number; another number is a damaged database.
pub(super) fn stored_state(code: i64) -> Result<State> {
    usize::try_from(code)
        .ok()
        .and_then(|i| State::ALL.get(i).copied())
        .with_context(|| format!("the state database is damaged: a recipient in state {code}"))
}

/// The rows of a campaign (bound first) that `--retry-failed` sends again.
fn retryable_failed() -> String {
    format!(
        "campaign_id = ? AND state = {FAILED} AND {INDEXED} \
         AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email_key = recipients.row_key)"
    )
}

/// The earliest retry time among the deferred rows of a campaign (bound).
fn next_due() -> String {
    format!(
        "SELECT MIN(d.next_attempt_at) FROM recipients JOIN recipient_details d ON d.id = recipients.id \
         WHERE campaign_id = ? AND state = {DEFERRED} AND {INDEXED}"
    )
}

/// Marks a database file as hikyaku's (SQLite's `application_id`, 'hiky').
const APPLICATION_ID: u32 = 0x6869_6b79;

/// hikyaku's tables; a database holding any other is not its own.
const TABLES: [&str; 8] = [
    "campaigns",
    "recipients",
    "recipient_details",
    "send_log",
    "account_pauses",
    "accounts_set_aside",
    "suppressions",
    "_sqlx_migrations",
];

/// Refuses, before anything is written, what is not a hikyaku state
/// database: a folder, a file that is not SQLite, another program's database
/// (SPEC §11). A missing or empty file is a new database.
async fn ensure_ours(path: &Path, migrator: &sqlx::migrate::Migrator) -> Result<()> {
    use std::io::Read as _;
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(input_error(format!("state database {shown}: {e}"))),
        Ok(meta) => meta,
    };
    if meta.is_dir() {
        return Err(input_error(format!(
            "state database {shown} is a folder; give the path of a file (it is created if missing)"
        )));
    }
    if meta.len() == 0 {
        return Ok(());
    }
    let mut header = [0u8; 100];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header));
    match read {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => header = [0; 100],
        Err(e) => return Err(input_error(format!("state database {shown}: {e}"))),
    }
    if &header[..16] != b"SQLite format 3\0" {
        return Err(input_error(format!(
            "state database {shown} is not a SQLite database (or it is damaged); \
             hikyaku leaves it as it is: give another --db"
        )));
    }
    let shown = shown.to_string();
    let foreign = |what: String| super::refuse_foreign(&shown, "SQLite", &what);
    let application_id = u32::from_be_bytes([header[68], header[69], header[70], header[71]]);
    if application_id == APPLICATION_ID {
        return Ok(());
    }
    if application_id != 0 {
        return Err(foreign(format!("application id {application_id:#010x}")));
    }
    // Written before the application id existed, or another program's:
    // hikyaku's if it holds only hikyaku's tables and migrations.
    let unreadable = |e: sqlx::Error| input_error(format!("state database {shown}: {e}"));
    let mut probe = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .map_err(unreadable)?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite~_%' ESCAPE '~'",
    )
    .fetch_all(&mut probe)
    .await
    .map_err(unreadable)?;
    let versions: Vec<i64> = if tables.iter().any(|t| t == "_sqlx_migrations") {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
            .fetch_all(&mut probe)
            .await
            .map_err(unreadable)?
    } else {
        Vec::new()
    };
    probe.close().await.map_err(unreadable)?;
    match super::foreign(&tables, &TABLES, &versions, migrator) {
        Some(what) => Err(foreign(what)),
        None => Ok(()),
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    /// Held by this process's claims and outcome writes: they take turns
    /// here instead of in SQLite's busy handler, which sleeps.
    writer: Arc<tokio::sync::Mutex<()>>,
    pub(super) outcomes: Arc<std::sync::Mutex<Outcomes>>,
    /// A task to write the waiting outcomes is started and has not yet
    /// taken them.
    write_scheduled: Arc<AtomicBool>,
    /// Rows picked by a claim of this process and not yet taken or let go:
    /// another account's claim passes over them.
    picked: Arc<tokio::sync::Mutex<HashSet<i64>>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the SQLite file and runs the embedded migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                return Err(input_error(format!(
                    "state database {}: the folder {} does not exist; create it or give another --db",
                    path.display(),
                    parent.display()
                )));
            }
        }
        let migrator = sqlx::migrate!("./migrations/sqlite");
        ensure_ours(path, &migrator).await?;
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
        {
            anyhow::bail!(
                "state database {} is read-only for hikyaku, which records every send in it; \
                 make it writable or give another --db",
                path.display()
            );
        }
        // FULL: the `sending` mark must survive a power cut, not only a crash,
        // or a rebooted machine could send a message twice.
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        // Processes opening a new database at once race to switch it to
        // WAL (which SQLite refuses while another holds it, whatever the busy
        // timeout) and to migrate it (sqlx takes no lock on SQLite). Each
        // step is atomic, so the loser tries again and finds it done.
        let mut attempt = 0;
        let pool = loop {
            let opened = async {
                // Migrations that rebuild a table need foreign keys off, or
                // dropping the old table would delete what refers to it.
                let mut conn = options
                    .clone()
                    .foreign_keys(false)
                    .connect()
                    .await
                    .with_context(|| format!("opening the state database {}", path.display()))?;
                let applied = applied_migrations(&mut conn).await;
                migrator
                    .run_direct(&mut conn)
                    .await
                    .with_context(|| format!("migrating the state database {}", path.display()))?;
                if applied_migrations(&mut conn).await > applied {
                    give_back_free_pages(&mut conn).await;
                }
                conn.close().await?;
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(options.clone())
                    .await
                    .with_context(|| format!("opening the state database {}", path.display()))?;
                anyhow::Ok(pool)
            };
            match opened.await {
                Ok(pool) => break pool,
                Err(e) if attempt == 9 => return Err(e),
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
                .fetch_all(&pool)
                .await
                .with_context(|| format!("reading the state database {}", path.display()))?;
        let missing: Vec<&str> = TABLES
            .into_iter()
            .filter(|t| !tables.iter().any(|have| have == t))
            .collect();
        if !missing.is_empty() {
            pool.close().await;
            return Err(input_error(format!(
                "state database {} is damaged: table {} missing; restore it from a backup or give another --db",
                path.display(),
                missing.join(", ")
            )));
        }
        Ok(SqliteStore {
            pool,
            writer: Arc::default(),
            outcomes: Arc::default(),
            write_scheduled: Arc::default(),
            picked: Arc::default(),
        })
    }

    /// Creates the campaign's row on first use and binds its name to its
    /// file; a name another file owns is refused (SPEC §7.6).
    pub async fn campaign(&self, id: &Identity) -> Result<CampaignRecord> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
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
        let rows = sqlx::query(&format!(
            "SELECT c.id, c.name, c.transport, c.file, c.lock_pid, c.lock_host, c.lock_at, \
             (SELECT MAX({UPDATED_AT}) FROM recipients NOT INDEXED WHERE recipients.campaign_id = c.id) AS last \
             FROM campaigns c ORDER BY c.name, c.transport",
        ))
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
                summary.running = live_holder(
                    row.get("lock_pid"),
                    row.get("lock_host"),
                    row.get("lock_at"),
                );
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let rows =
            sqlx::query("SELECT id, lock_pid, lock_host, lock_at FROM campaigns WHERE name = ?")
                .bind(name)
                .fetch_all(&mut *tx)
                .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        if let Some(holder) = rows
            .iter()
            .find_map(|r| live_holder(r.get("lock_pid"), r.get("lock_host"), r.get("lock_at")))
        {
            anyhow::bail!(
                "campaign {name:?} is being sent by {holder}; stop it first (Ctrl-C), then reset"
            );
        }
        let forgotten: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recipients WHERE campaign_id IN (SELECT id FROM campaigns WHERE name = ?)",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM campaigns WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(u64::try_from(forgotten).unwrap_or(0)))
    }

    /// Removes a campaign row that holds no recipients: `send --dry-run`
    /// and a send that failed before recording anything leave no trace
    /// of a campaign they saw first. A row
    /// a runner holds is its first `send`'s, starting: never removed.
    pub async fn forget_if_empty(&self, campaign_id: i64) -> Result<()> {
        sqlx::query("DELETE FROM campaigns WHERE id = ? AND lock_pid IS NULL AND NOT EXISTS (SELECT 1 FROM recipients WHERE campaign_id = ?)")
            .bind(campaign_id)
            .bind(campaign_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records what the last complete check of the campaign's rows saw
    /// (`None`: the next `send` reads the file again).
    pub async fn set_checked(&self, campaign_id: i64, checked: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE campaigns SET checked = ? WHERE id = ?")
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
        Ok(sqlx::query_scalar(&format!(
            // Each suppressed address looked up among the rows, not each row among them.
            "SELECT EXISTS (SELECT 1 FROM suppressions s CROSS JOIN recipients r \
             WHERE r.campaign_id = ?1 AND r.row_key = s.email_key AND r.state IN ({PENDING}, {DEFERRED})) \
             OR EXISTS (SELECT 1 FROM recipients r JOIN recipient_details d ON d.id = r.id \
             WHERE r.campaign_id = ?1 AND r.state = {SKIPPED} AND r.{INDEXED} \
             AND d.reason = 'suppressed' AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email_key = r.row_key))",
        ))
        .bind(campaign_id)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn set_fingerprint(&self, campaign_id: i64, fingerprint: &str) -> Result<()> {
        sqlx::query("UPDATE campaigns SET fingerprint = ? WHERE id = ?")
            .bind(fingerprint)
            .bind(campaign_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes the campaign's runner lock, or says which live process has it;
    /// its row is created in the same transaction if missing, so that a
    /// read-only command forgetting an empty row never removes it between
    /// the two. A lock whose process is gone (kill -9) is taken over.
    pub async fn lock(&self, id: &Identity, token: &str) -> Result<CampaignRecord> {
        let host = super::hostname();
        let pid = i64::from(std::process::id());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let record = create(&mut tx, id).await?;
        let row = sqlx::query("SELECT lock_pid, lock_host, lock_at FROM campaigns WHERE id = ?")
            .bind(record.id)
            .fetch_one(&mut *tx)
            .await?;
        if let Some(holder) = live_holder(
            row.get("lock_pid"),
            row.get("lock_host"),
            row.get("lock_at"),
        ) {
            anyhow::bail!(
                "this campaign is being sent by {holder}; \
                 wait for it to finish or stop it (a lock left by a dead process is taken over)"
            );
        }
        sqlx::query("UPDATE campaigns SET lock_pid = ?, lock_host = ?, lock_token = ?, lock_at = ? WHERE id = ?")
            .bind(pid)
            .bind(&host)
            .bind(token)
            .bind(now_ms())
            .bind(record.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(record)
    }

    /// Renews this process's lock on the campaign, its lease (`lock_at`).
    pub async fn heartbeat(&self, campaign_id: i64) -> Result<u64> {
        sqlx::query(
            "UPDATE campaigns SET lock_at = ? WHERE id = ? AND lock_pid = ? AND lock_host = ?",
        )
        .bind(now_ms())
        .bind(campaign_id)
        .bind(i64::from(std::process::id()))
        .bind(super::hostname())
        .execute(&self.pool)
        .await?;
        Ok(0)
    }

    pub async fn unlock(&self, campaign_id: i64, token: &str) -> Result<()> {
        sqlx::query("UPDATE campaigns SET lock_pid = NULL, lock_host = NULL, lock_token = NULL WHERE id = ? AND lock_token = ?")
            .bind(campaign_id)
            .bind(token)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Rows a dead runner left `sending` may or may not have been delivered:
    /// they become `unknown` (SPEC §7.3). Call only while holding the lock.
    pub async fn settle_interrupted(&self, campaign_id: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let sending = format!("campaign_id = ? AND state = {SENDING} AND {INDEXED}");
        set_reason(
            &mut tx,
            &format!("recipients WHERE {sending}"),
            &[campaign_id],
            Some("interrupted while sending: may or may not have been delivered"),
        )
        .await?;
        let done = sqlx::query(&format!(
            "UPDATE recipients SET state = {UNKNOWN}, updated_at = ? WHERE {sending}"
        ))
        .bind(now_ms())
        .bind(campaign_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// `unknown` rows go back to `pending` (`--resend-unknown`).
    pub async fn requeue_unknown(&self, campaign_id: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        pending_from_start(&mut tx, campaign_id).await?;
        let unknown = format!("campaign_id = ? AND state = {UNKNOWN} AND {INDEXED}");
        set_reason(
            &mut tx,
            &format!("recipients WHERE {unknown}"),
            &[campaign_id],
            None,
        )
        .await?;
        let done = sqlx::query(&format!(
            "UPDATE recipients SET state = {PENDING}, updated_at = ? WHERE {unknown}"
        ))
        .bind(now_ms())
        .bind(campaign_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// `failed` rows whose address is not on the suppression list go back to
    /// `pending` for one more round (`--retry-failed`), their attempts reset
    /// so that a transient failure gets `max_attempts` again.
    pub async fn requeue_failed(&self, campaign_id: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        pending_from_start(&mut tx, campaign_id).await?;
        sqlx::query(&format!(
            "UPDATE recipient_details SET reason = NULL, attempts = 0, next_attempt_at = NULL \
             WHERE id IN (SELECT id FROM recipients WHERE {})",
            retryable_failed()
        ))
        .bind(campaign_id)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query(&format!(
            "UPDATE recipients SET state = {PENDING}, updated_at = ? WHERE {}",
            retryable_failed()
        ))
        .bind(now_ms())
        .bind(campaign_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// How many rows `--retry-failed` would send again.
    pub async fn retryable_failed(&self, campaign_id: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM recipients WHERE {}",
            retryable_failed()
        ))
        .bind(campaign_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Starts reading the recipients file into the store; nothing is visible
    /// to others until [`Import::commit`].
    pub async fn import(&self, into: ImportInto<'_>, columns: &[String]) -> Result<SqliteImport> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let made;
        let campaign = match into {
            ImportInto::Campaign(record) | ImportInto::Discarded(record) => record,
            ImportInto::Found(id) => {
                made = create(&mut tx, id).await?;
                &made
            }
        };
        let now = now_ms();
        let read = sqlx::query(
            "UPDATE campaigns SET import_gen = import_gen + 1, columns = ?, \
             imported_before = imported_at, imported_at = ?, pending_from = NULL \
             WHERE id = ? RETURNING import_gen, imported_before, row_count",
        )
        .bind(serde_json::to_string(columns)?)
        .bind(now)
        .bind(campaign.id)
        .fetch_one(&mut *tx)
        .await?;
        let dropped =
            sqlx::query("DELETE FROM recipients WHERE campaign_id = ? AND row_key LIKE 'row:%'")
                .bind(campaign.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        let fresh: bool = !sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM recipients WHERE campaign_id = ?)",
        )
        .bind(campaign.id)
        .fetch_one(&mut *tx)
        .await?;
        let row_count = match read.get::<Option<i64>, _>("row_count") {
            Some(n) => Some(n - i64::try_from(dropped).unwrap_or(n)),
            None => fresh.then_some(0),
        };
        // Past any details too: a new row never finds some waiting for it.
        let next_id: i64 = sqlx::query_scalar(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM recipients), 0), \
             COALESCE((SELECT MAX(id) FROM recipient_details), 0)) + 1",
        )
        .fetch_one(&mut *tx)
        .await?;
        // A campaign with no rows yet counts its ids from the next: the rows
        // of its file read in order are stored with a row shift of 0.
        let row_base: i64 = sqlx::query_scalar(
            "UPDATE campaigns SET row_base = CASE WHEN ? OR row_base IS NULL THEN ? ELSE row_base END \
             WHERE id = ? RETURNING row_base",
        )
        .bind(fresh)
        .bind(next_id - 1)
        .bind(campaign.id)
        .fetch_one(&mut *tx)
        .await?;
        let any_suppressed: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM suppressions)")
            .fetch_one(&mut *tx)
            .await?;
        Ok(SqliteImport {
            tx,
            campaign_id: campaign.id,
            generation: read.get("import_gen"),
            now,
            imported_before: read.get("imported_before"),
            row_count,
            fresh,
            next_id,
            row_base,
            any_suppressed,
        })
    }

    /// The wait before a send of `count` recipients for `gate`'s account,
    /// read without a lock: its pause, or its next slot in the future.
    pub(super) async fn wait_before(&self, gate: &Gate<'_>, count: u32) -> Result<Option<Claim>> {
        let mut conn = self.pool.acquire().await?;
        wait_in(&mut conn, gate, count).await
    }

    /// Up to `limit` recipients due now, none of them picked already (by
    /// this claim, `excluded`, or another account's claim in this process)
    /// and not yet let go: the deferred whose retry time has come, then the
    /// pending, in file order.
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
            self.write_outcomes().await?;
        }
        let mut picked = self.picked.lock().await;
        // `excluded` is among them.
        debug_assert!(excluded.iter().all(|id| picked.contains(id)));
        let excluded: Vec<i64> = picked.iter().copied().collect();
        let mut conn = self.pool.acquire().await?;
        let candidates =
            next_candidates(&mut conn, campaign_id, now, &excluded, skip, limit).await?;
        picked.extend(candidates.iter().map(|c| c.id));
        Ok(candidates)
    }

    /// Lets go of picked rows that were not taken.
    pub(super) async fn unpick(&self, ids: &[i64]) {
        if !ids.is_empty() {
            let mut picked = self.picked.lock().await;
            for id in ids {
                picked.remove(id);
            }
        }
    }

    /// Claims what was picked: in one transaction synced to disk before any
    /// of them is sent, the account's pause and slot decided again, the
    /// unbuildable rows skipped, the built ones still as they were picked
    /// marked `sending` and their sends logged.
    pub(super) async fn take(
        &self,
        campaign_id: i64,
        gate: &Gate<'_>,
        picked: &mut Picked,
    ) -> Result<Claim> {
        self.failed_write()?;
        let _writing = self.writer.clone().lock_owned().await;
        // Outcomes still waiting are written first: the rows `sending` in
        // the database are never more than those claimed and not settled.
        self.write_outcomes().await?;
        let mut conn = self.pool.acquire().await?;
        // The `sending` marks must be on disk before the transactions start.
        sqlx::query("PRAGMA synchronous = FULL")
            .execute(&mut *conn)
            .await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
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
                return Ok(wait);
            }
            picked.built.clear();
        }
        for (candidate, why) in &picked.unbuildable {
            skip_unbuildable(&mut tx, candidate.id, why, gate.now).await?;
        }
        let built = std::mem::take(&mut picked.built);
        let built_any = !built.is_empty();
        let ready = mark_sending(&mut tx, gate.account, gate.now, built).await?;
        // The cursor of pending rows moves up past those now `sending`.
        first_pending(&mut tx, campaign_id, true).await?;
        let every = picked.ids.clone();
        let claim = match picked.settle(built_any, ready) {
            Some(claim) => claim,
            None => {
                let next_due_ms: Option<i64> = sqlx::query_scalar(&next_due())
                    .bind(campaign_id)
                    .fetch_one(&mut *tx)
                    .await?;
                return Ok(Claim::Idle { next_due_ms });
            }
        };
        tx.commit().await?;
        // Taken rows are no longer due: nothing need keep them apart now.
        self.unpick(&every).await;
        Ok(claim)
    }

    /// Records what happened to a claimed recipient. Outcomes are written
    /// together (group commit): one that arrives while another write is
    /// under way is written by the next one, at the latest by the next
    /// claim, whose transaction writes every outcome waiting before it
    /// marks new rows `sending`, so that no more rows are ever `sending` in
    /// the database than were claimed and not yet settled (SPEC §7.3).
    pub async fn record(
        &self,
        candidate: &Candidate,
        log_id: i64,
        outcome: &Outcome,
        now: i64,
    ) -> Result<()> {
        self.failed_write()?;
        lock(&self.outcomes).push((candidate.clone(), log_id, outcome.clone(), now));
        // Written by one task, with those recorded meanwhile, without making
        // this sender wait for it (or by the next claim, which writes the
        // waiting outcomes first).
        if !self.write_scheduled.swap(true, Ordering::SeqCst) {
            let store = self.clone();
            tokio::spawn(async move {
                let _writing = store.writer.clone().lock_owned().await;
                // Recorded from here on: a new task writes it.
                store.write_scheduled.store(false, Ordering::SeqCst);
                if let Err(e) = store.write_outcomes().await {
                    lock(&store.outcomes).error.get_or_insert(format!("{e:#}"));
                }
            });
        }
        Ok(())
    }

    /// Writes the outcomes not yet written; returns once they are. The
    /// process's own reads of recipients call it first, so that they see
    /// what it recorded.
    pub async fn flush(&self) -> Result<()> {
        let _writing = self.writer.clone().lock_owned().await;
        self.write_outcomes().await?;
        self.failed_write()
    }

    /// An error met writing outcomes in the background, once.
    fn failed_write(&self) -> Result<()> {
        match lock(&self.outcomes).error.take() {
            Some(e) => Err(anyhow::anyhow!("recording outcomes: {e}")),
            None => Ok(()),
        }
    }

    /// Writes the waiting outcomes in one transaction, not synced: in WAL
    /// mode the next claim's synced commit makes them durable too, and
    /// until then a lost outcome leaves its row `sending`, which becomes
    /// `unknown`, never sent again. Call holding [`SqliteStore::writer`].
    async fn write_outcomes(&self) -> Result<()> {
        let waiting = std::mem::take(&mut lock(&self.outcomes).queue);
        if waiting.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool.acquire().await?;
        sqlx::query("PRAGMA synchronous = NORMAL")
            .execute(&mut *conn)
            .await?;
        let mut tx = conn.begin().await?;
        // The messages sent, nearly all of them, and the other outcomes
        // that leave a reply, together; the others one by one.
        let mut replies = Replies::default();
        for (candidate, log_id, outcome, now) in &waiting {
            write_outcome(&mut tx, &mut replies, candidate, *log_id, outcome, *now).await?;
        }
        replies.write(&mut tx).await?;
        tx.commit().await?;
        lock(&self.outcomes).committed(&waiting);
        Ok(())
    }

    /// Pauses an account (by its pause key) for every process using this store.
    pub async fn pause_account(&self, account: &str, until_ms: i64, reason: &str) -> Result<()> {
        sqlx::query("INSERT INTO account_pauses (account, until, reason) VALUES (?, ?, ?) ON CONFLICT (account) DO UPDATE SET until = MAX(until, excluded.until), reason = excluded.reason")
            .bind(account)
            .bind(until_ms)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_aside(&self, account: &str, reason: &str, now: i64) -> Result<()> {
        sqlx::query("INSERT INTO accounts_set_aside (account, since, reason) VALUES (?, ?, ?) ON CONFLICT (account) DO UPDATE SET since = excluded.since, reason = excluded.reason")
            .bind(account)
            .bind(now)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn restore_account(&self, account: &str) -> Result<()> {
        sqlx::query("DELETE FROM accounts_set_aside WHERE account = ?")
            .bind(account)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_aside_since(&self, account: &str) -> Result<Option<(i64, String)>> {
        let row = sqlx::query("SELECT since, reason FROM accounts_set_aside WHERE account = ?")
            .bind(account)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get("since"), r.get("reason"))))
    }

    pub async fn account_pause(&self, account: &str, now: i64) -> Result<Option<(i64, String)>> {
        let row =
            sqlx::query("SELECT until, reason FROM account_pauses WHERE account = ? AND until > ?")
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

    /// When the account first sent, for its warm-up (SPEC §6b).
    pub async fn first_send(&self, account: &str) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT MIN(at) FROM send_log WHERE account = ?")
                .bind(account)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Recipients the account sent to at or after `since_ms`.
    pub async fn recipients_since(&self, account: &str, since_ms: i64) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(recipients), 0) FROM send_log WHERE account = ? AND at >= ?",
        )
        .bind(account)
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Counts per state: the pending rows are the campaign's rows less
    /// those the index by state holds (never below none, whatever the
    /// database says).
    pub async fn counts(&self, campaign_id: i64) -> Result<Counts> {
        self.flush().await?;
        let mut conn = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT state AS st, COUNT(*) AS n FROM recipients WHERE campaign_id = ? AND {INDEXED} GROUP BY state",
        ))
        .bind(campaign_id)
        .fetch_all(&mut *conn)
        .await?;
        let all: i64 = sqlx::query_scalar(
            "SELECT COALESCE(row_count, \
             (SELECT COUNT(*) FROM recipients NOT INDEXED WHERE campaign_id = campaigns.id)) \
             FROM campaigns WHERE id = ?",
        )
        .bind(campaign_id)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(0);
        conn.commit().await?;
        let mut counts = tally(rows);
        counts[State::Pending] = (all - counts.total()).max(0);
        Ok(counts)
    }

    /// The earliest retry time among deferred recipients.
    pub async fn next_retry(&self, campaign_id: i64) -> Result<Option<i64>> {
        self.flush().await?;
        Ok(sqlx::query_scalar(&next_due())
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
        self.flush().await?;
        let mut conn = self.pool.acquire().await?;
        export_rows(&mut conn, campaign_id, state, visit).await
    }

    pub async fn suppress(&self, address: &str, reason: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let added = insert_suppression(&mut tx, address, reason, now_ms()).await?;
        tx.commit().await?;
        Ok(added)
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

    pub async fn unsuppress(&self, key: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM suppressions WHERE email_key = ?")
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

    /// Writes the write-ahead log into the database and empties it, so
    /// that the state takes no more room than its tables between runs,
    /// then closes every connection.
    pub async fn close(&self) {
        // Best effort: a busy database keeps its log until the next run.
        let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await;
        self.pool.close().await;
    }
}

/// The outcomes that leave a server's reply on their row, gathered to be
/// written together: three statements for all of them, whatever their
/// number, as each statement is a round trip to SQLite's thread.
#[derive(Default)]
struct Replies(Vec<Reply>);

/// An outcome that leaves a server's reply on its row: its send's log
/// entry, the row's state, when, reason and retry time.
#[derive(serde::Serialize)]
struct Reply {
    log_id: i64,
    id: i64,
    state: i64,
    at: i64,
    reason: Option<String>,
    reply: String,
    retry_at: Option<i64>,
}

impl Replies {
    async fn write(self, conn: &mut sqlx::SqliteConnection) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let replies = serde_json::to_string(&self.0)?;
        sqlx::query(
            "UPDATE send_log SET done_at = MAX(at, j.value ->> 'at') FROM json_each(?) AS j \
             WHERE send_log.id = j.value ->> 'log_id'",
        )
        .bind(&replies)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "UPDATE recipients SET state = j.value ->> 'state', updated_at = j.value ->> 'at' \
             FROM json_each(?) AS j WHERE recipients.id = j.value ->> 'id'",
        )
        .bind(&replies)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO recipient_details (id, reason, last_reply, next_attempt_at) \
             SELECT j.value ->> 'id', j.value ->> 'reason', j.value ->> 'reply', j.value ->> 'retry_at' \
             FROM json_each(?) AS j WHERE true \
             ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, last_reply = excluded.last_reply, \
             next_attempt_at = excluded.next_attempt_at",
        )
        .bind(&replies)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// Writes one outcome of a claimed recipient, or gathers it in `replies`.
async fn write_outcome(
    conn: &mut sqlx::SqliteConnection,
    replies: &mut Replies,
    candidate: &Candidate,
    log_id: i64,
    outcome: &Outcome,
    now: i64,
) -> Result<()> {
    let id = candidate.id;
    let mut gather = |state, reason: Option<String>, reply: &str, retry_at| {
        replies.0.push(Reply {
            log_id,
            id,
            state,
            at: now,
            reason,
            reply: reply.to_string(),
            retry_at,
        });
    };
    match outcome {
        Outcome::Sent { reply } => gather(SENT, None, reply, None),
        Outcome::Deferred { reply, retry_at_ms } => {
            let reason = "transient failure, will retry".to_string();
            gather(DEFERRED, Some(reason), reply, Some(*retry_at_ms));
        }
        Outcome::Unknown { reply } => {
            let reason =
                "connection lost after the message was sent: may or may not have been delivered";
            gather(UNKNOWN, Some(reason.to_string()), reply, None);
        }
        Outcome::Failed { reply, suppress } => {
            gather(FAILED, Some(format!("rejected: {reply}")), reply, None);
            if *suppress {
                let reason = format!("bounced: {reply}");
                insert_suppression(&mut *conn, &candidate.address, &reason, now).await?;
            }
        }
        Outcome::Unclaimed => {
            let before = &candidate.before;
            set_state(conn, id, state_code(&before.state)?, before.updated_at).await?;
            sqlx::query("UPDATE recipient_details SET attempts = ?, message_id = ? WHERE id = ?")
                .bind(candidate.attempts)
                .bind(&before.message_id)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            pending_again(conn, id).await?;
            sqlx::query("DELETE FROM send_log WHERE id = ?")
                .bind(log_id)
                .execute(&mut *conn)
                .await?;
        }
        Outcome::Returned { reply, unlog } => {
            set_state(conn, id, PENDING, now).await?;
            sqlx::query("UPDATE recipient_details SET attempts = MAX(attempts - 1, 0), last_reply = ? WHERE id = ?")
                .bind(reply)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            pending_again(conn, id).await?;
            let log = match unlog {
                true => "DELETE FROM send_log WHERE id = ?2",
                false => "UPDATE send_log SET done_at = MAX(at, ?1) WHERE id = ?2",
            };
            sqlx::query(log)
                .bind(now)
                .bind(log_id)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Skips a row whose message cannot be built.
async fn skip_unbuildable(
    conn: &mut sqlx::SqliteConnection,
    id: i64,
    why: &str,
    now: i64,
) -> Result<()> {
    set_state(conn, id, SKIPPED, now).await?;
    let reason = SkipReason::InvalidMessage(why.to_string()).to_text();
    set_reason(conn, "recipients WHERE id = ?", &[id], Some(&reason)).await
}

/// Sets a row's state and when it changed.
async fn set_state(conn: &mut sqlx::SqliteConnection, id: i64, state: i64, at: i64) -> Result<()> {
    sqlx::query("UPDATE recipients SET state = ?, updated_at = ? WHERE id = ?")
        .bind(state)
        .bind(at)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records a server's reply to a row's message in its details, with the
/// row's reason and when it is retried (if it is).
pub(super) async fn set_reply(
    conn: &mut sqlx::SqliteConnection,
    id: i64,
    reason: Option<&str>,
    reply: &str,
    retry_at_ms: Option<i64>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO recipient_details (id, reason, last_reply, next_attempt_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, last_reply = excluded.last_reply, \
         next_attempt_at = excluded.next_attempt_at",
    )
    .bind(id)
    .bind(reason)
    .bind(reply)
    .bind(retry_at_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sets, in their details, the reason of the rows `rows` selects (what
/// follows `FROM`, over `recipients`, bound to `binds`).
async fn set_reason(
    conn: &mut sqlx::SqliteConnection,
    rows: &str,
    binds: &[i64],
    reason: Option<&str>,
) -> Result<()> {
    let sql = match reason {
        Some(_) => format!(
            "INSERT INTO recipient_details (id, reason) SELECT id, ? FROM {rows} \
             ON CONFLICT (id) DO UPDATE SET reason = excluded.reason"
        ),
        None => {
            format!("UPDATE recipient_details SET reason = ? WHERE id IN (SELECT id FROM {rows})")
        }
    };
    let mut query = sqlx::query(&sql).bind(reason);
    for bind in binds {
        query = query.bind(bind);
    }
    query.execute(conn).await?;
    Ok(())
}

/// How many migrations the database has had (0: a new one).
async fn applied_migrations(conn: &mut sqlx::SqliteConnection) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(conn)
        .await
        .unwrap_or(0)
}

/// After migrations that rebuilt a table, the old table's pages are free
/// but still in the file (a 1,000,000-row campaign's file would double):
/// when more than a quarter of the file is free, it is written anew. Best
/// effort: a database another process holds keeps them for later rows.
async fn give_back_free_pages(conn: &mut sqlx::SqliteConnection) {
    let pages = async {
        let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(&mut *conn)
            .await?;
        let all: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut *conn)
            .await?;
        anyhow::Ok((free, all))
    };
    if let Ok((free, all)) = pages.await {
        if free * 4 > all {
            if let Err(e) = sqlx::query("VACUUM").execute(&mut *conn).await {
                tracing::debug!("the state database keeps its free pages: {e}");
            }
        }
    }
}

pub(super) async fn insert_suppression(
    conn: &mut sqlx::SqliteConnection,
    address: &str,
    reason: &str,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query("INSERT INTO suppressions (email_key, email, reason, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (email_key) DO NOTHING")
        .bind(address.to_lowercase())
        .bind(address)
        .bind(reason)
        .bind(now)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Marks `sending` the built rows still as they were picked and logs
/// their sends (their log ids handed out under the transaction's write
/// lock), two statements for all; a row changed since it was picked is left
/// alone, its message dropped.
async fn mark_sending(
    conn: &mut sqlx::SqliteConnection,
    account: &str,
    now: i64,
    built: Vec<(Candidate, Outgoing)>,
) -> Result<Vec<Ready>> {
    if built.is_empty() {
        return Ok(Vec::new());
    }
    let marks = serde_json::to_string(
        &built
            .iter()
            .map(|(c, m)| {
                Ok((
                    c.id,
                    &m.message_id,
                    m.recipient_count,
                    state_code(&c.before.state)?,
                    c.before.updated_at,
                ))
            })
            .collect::<Result<Vec<_>>>()?,
    )?;
    let marked: HashSet<i64> = sqlx::query_scalar(&format!(
        "UPDATE recipients SET state = {SENDING}, updated_at = ? \
         FROM json_each(?) AS j WHERE recipients.id = j.value ->> 0 \
         AND recipients.state = j.value ->> 3 AND recipients.updated_at = j.value ->> 4 \
         RETURNING recipients.id",
    ))
    .bind(now)
    .bind(&marks)
    .fetch_all(&mut *conn)
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
    let sent = serde_json::to_string(
        &built
            .iter()
            .map(|(c, m)| (c.id, &m.message_id))
            .collect::<Vec<_>>(),
    )?;
    sqlx::query(
        "INSERT INTO recipient_details (id, attempts, message_id) \
         SELECT j.value ->> 0, 1, j.value ->> 1 FROM json_each(?) AS j WHERE true \
         ON CONFLICT (id) DO UPDATE SET attempts = attempts + 1, message_id = excluded.message_id",
    )
    .bind(&sent)
    .execute(&mut *conn)
    .await?;
    let logged = serde_json::to_string(
        &built
            .iter()
            .map(|(c, m)| (c.id, m.recipient_count))
            .collect::<Vec<_>>(),
    )?;
    let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM send_log")
        .fetch_one(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO send_log (id, account, at, recipients, recipient_id) \
         SELECT ? + j.key + 1, ?, ?, j.value ->> 1, j.value ->> 0 FROM json_each(?) AS j",
    )
    .bind(last)
    .bind(account)
    .bind(now)
    .bind(&logged)
    .execute(&mut *conn)
    .await?;
    Ok((last + 1..)
        .zip(built)
        .map(|(log_id, (candidate, message))| Ready {
            candidate,
            message: Box::new(message),
            log_id,
        })
        .collect())
}

/// The wait before a send of `count` recipients for `gate`'s account: its
/// pause, or its next slot in the future.
async fn wait_in(
    conn: &mut sqlx::SqliteConnection,
    gate: &Gate<'_>,
    count: u32,
) -> Result<Option<Claim>> {
    let paused: Option<(i64, String)> =
        sqlx::query_as("SELECT until, reason FROM account_pauses WHERE account = ? AND until > ?")
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

/// The next recipient due: a deferred one whose retry time has come, else
/// the first pending one.
async fn next_candidates(
    conn: &mut sqlx::SqliteConnection,
    campaign_id: i64,
    now: i64,
    passed_over: &[i64],
    skip: &Skip,
    limit: usize,
) -> Result<Vec<Candidate>> {
    let passed_over = serde_json::to_string(passed_over)?;
    let skipped = match skip.values.is_empty() {
        true => None,
        false => Some(serde_json::to_string(&skip.values)?),
    };
    // With nothing to skip the condition is left out. Cells are stored
    // joined by CELLS: a row holding a skipped value as a whole cell is
    // passed over. That may be another column than `skip.field`, which only
    // delays that row until the zone opens (the engine still checks each
    // recipient's own zone); rows stored as JSON are never passed over here.
    // A row in the EMAIL_FIRST form is read with its mark as CELLS, which
    // then leads each of its cells after the address.
    let skipping = match skip.values.is_empty() {
        true => String::new(),
        false => format!(
            " AND NOT EXISTS (SELECT 1 FROM json_each(?) z WHERE \
             instr(replace(substr(fields, 1, 1), char({first}), char({sep})) || substr(fields, 2) || char({sep}), \
             char({sep}) || z.value || char({sep})) > 0)",
            sep = u32::from(CELLS),
            first = u32::from(EMAIL_FIRST)
        ),
    };
    fn bind_skip<'q>(
        query: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
        skipped: Option<&'q str>,
    ) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
        match skipped {
            Some(values) => query.bind(values),
            None => query,
        }
    }
    let columns = format!(
        "recipients.id AS id, {ROW_NUMBER} AS row_number, {EMAIL} AS email, {ADDRESS} AS address, fields, \
         COALESCE(d.attempts, 0) AS attempts, state, d.message_id AS message_id, updated_at"
    );
    let limit = i64::try_from(limit.max(1)).unwrap_or(1);
    let mut rows = bind_skip(
        sqlx::query(&format!(
            "SELECT {columns} FROM recipients {DETAILS} WHERE campaign_id = ? AND state = {DEFERRED} AND {INDEXED} \
             AND d.next_attempt_at <= ? AND recipients.id NOT IN (SELECT value FROM json_each(?)){skipping} \
             ORDER BY d.next_attempt_at, recipients.id LIMIT ?"
        ))
        .bind(campaign_id)
        .bind(now)
        .bind(&passed_over),
        skipped.as_deref(),
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let left = limit - i64::try_from(rows.len()).unwrap_or(limit);
    let first_pending = match left > 0 {
        true => first_pending(conn, campaign_id, false).await?,
        false => None,
    };
    if let Some(first) = first_pending {
        rows.extend(
            bind_skip(
                sqlx::query(&format!(
                    "SELECT {columns} FROM recipients NOT INDEXED {DETAILS} WHERE campaign_id = ? AND state = {PENDING} \
                     AND recipients.id >= ? AND recipients.id NOT IN (SELECT value FROM json_each(?)){skipping} \
                     ORDER BY recipients.id LIMIT ?"
                ))
                .bind(campaign_id)
                .bind(first)
                .bind(&passed_over),
                skipped.as_deref(),
            )
            .bind(left)
            .fetch_all(&mut *conn)
            .await?,
        );
    }
    rows.into_iter()
        .map(|row| {
            let email: String = row.get("email");
            Ok(Candidate {
                id: row.get("id"),
                row_number: row.get("row_number"),
                fields: decode_fields(row.get("fields"), &email)?,
                email,
                address: row.get::<Option<String>, _>("address").unwrap_or_default(),
                attempts: row.get("attempts"),
                before: Before {
                    state: stored_state(row.get("state"))?.as_str().to_string(),
                    message_id: row.get("message_id"),
                    updated_at: row.get("updated_at"),
                },
            })
        })
        .collect()
}

/// The campaign's first pending row, read in id order from where the
/// last one was (`pending_from`), which moves up to it when `advance` (in
/// a claim's write transaction: a row made pending again meanwhile moves
/// the cursor back under the same lock).
async fn first_pending(
    conn: &mut sqlx::SqliteConnection,
    campaign_id: i64,
    advance: bool,
) -> Result<Option<i64>> {
    let from: Option<i64> = sqlx::query_scalar("SELECT pending_from FROM campaigns WHERE id = ?")
        .bind(campaign_id)
        .fetch_optional(&mut *conn)
        .await?
        .flatten();
    let from = from.unwrap_or(0);
    let first: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT id FROM recipients NOT INDEXED WHERE campaign_id = ? AND state = {PENDING} AND id >= ? ORDER BY id LIMIT 1"
    ))
    .bind(campaign_id)
    .bind(from)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(first) = first.filter(|first| advance && *first > from) {
        sqlx::query("UPDATE campaigns SET pending_from = ? WHERE id = ?")
            .bind(first)
            .bind(campaign_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(first)
}

/// Rows of the campaign anywhere may become pending: claims read from its first row.
async fn pending_from_start(conn: &mut sqlx::SqliteConnection, campaign_id: i64) -> Result<()> {
    sqlx::query("UPDATE campaigns SET pending_from = NULL WHERE id = ?")
        .bind(campaign_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A row of the campaign that became pending again lies below no cursor.
async fn pending_again(conn: &mut sqlx::SqliteConnection, id: i64) -> Result<()> {
    sqlx::query(
        "UPDATE campaigns SET pending_from = ?1 \
         WHERE id = (SELECT campaign_id FROM recipients WHERE id = ?1) AND pending_from > ?1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn load_schedule(
    conn: &mut sqlx::SqliteConnection,
    account: &str,
    windows: &[Window],
    now: i64,
) -> Result<Schedule> {
    let horizon = i64::try_from(Schedule::horizon(windows).as_millis()).unwrap_or(i64::MAX / 4);
    let rows = sqlx::query(
        "SELECT at, COALESCE(done_at, at) AS done_at, recipients FROM send_log \
             WHERE account = ? AND at > ? AND COALESCE(done_at, at) > ?",
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
    conn: &mut sqlx::SqliteConnection,
    campaign_id: i64,
    state: Option<State>,
    mut visit: impl FnMut(ExportRow) -> Result<()>,
) -> Result<()> {
    use futures_util::TryStreamExt;
    let sql = format!(
        "SELECT {EMAIL} AS email, state, d.reason AS reason, COALESCE(d.attempts, 0) AS attempts, \
         d.last_reply AS last_reply, {UPDATED_AT} AS updated_at, d.message_id AS message_id, fields \
         FROM recipients NOT INDEXED {DETAILS} WHERE campaign_id = ? AND (? IS NULL OR state = ?) \
         ORDER BY row_shift + recipients.id, recipients.id"
    );
    let mut rows = sqlx::query(&sql)
        .bind(campaign_id)
        .bind(state.map(|s| s as i64))
        .bind(state.map(|s| s as i64))
        .fetch(conn);
    while let Some(row) = rows.try_next().await? {
        let email: String = row.get("email");
        visit(ExportRow {
            fields: decode_fields(row.get("fields"), &email)?,
            email,
            state: stored_state(row.get("state"))?.as_str().to_string(),
            reason: row.get("reason"),
            attempts: row.get("attempts"),
            last_reply: row.get("last_reply"),
            updated_at: row.get("updated_at"),
            message_id: row.get("message_id"),
        })?;
    }
    Ok(())
}

/// A row as the import writes it: its columns of `recipients` and of its
/// details, each written compactly ([`super::compact`]).
struct Stored {
    id: i64,
    /// Not in the store before this read.
    new: bool,
    key: String,
    number: i64,
    fields: String,
    state: &'static str,
    /// The address as written, unless it is the key.
    email: Option<String>,
    /// The address as sent, unless it is the address as written.
    address: Option<String>,
    reason: Option<String>,
}

impl Stored {
    fn details(&self) -> bool {
        self.email.is_some() || self.address.is_some() || self.reason.is_some()
    }
}

/// When a stored row last changed: 0 is when the read of the recipients
/// file that wrote it did, kept once in its campaign (the latest read for
/// rows it saw, the read before for the others while a read is under way).
pub(super) const UPDATED_AT: &str = "(CASE WHEN updated_at != 0 THEN updated_at ELSE \
     (SELECT COALESCE(CASE WHEN recipients.seen_gen = imp.import_gen THEN imp.imported_at ELSE imp.imported_before END, 0) \
      FROM campaigns imp WHERE imp.id = recipients.campaign_id) END)";

/// A read of the recipients file in progress, inside one transaction.
pub struct SqliteImport {
    tx: Transaction<'static, Sqlite>,
    campaign_id: i64,
    generation: i64,
    now: i64,
    /// When the read before this one wrote its rows (see [`UPDATED_AT`]).
    imported_before: Option<i64>,
    /// The campaign's rows so far, if known.
    row_count: Option<i64>,
    /// Whether the campaign had no rows before this read: none of them can
    /// have left the file, nor be the read before's.
    fresh: bool,
    /// The id the next new row gets: the transaction holds the write lock,
    /// so ids are handed out here and no insert needs a round trip of its own.
    next_id: i64,
    /// The campaign's `row_base`: a row's number is its row shift + id - this.
    row_base: i64,
    /// Whether the suppression list has any entry (it cannot change while
    /// the transaction holds the write lock).
    any_suppressed: bool,
}

/// Rows written per statement: one round trip to SQLite's thread for this
/// many rows (8 parameters each, well under SQLite's 32,766).
const ROWS_PER_STATEMENT: usize = 1000;

impl SqliteImport {
    /// Rows of the file in file order, what the store knows of each (a row
    /// whose address is not valid is `Settled`: skipped, invalid address).
    /// A few statements per batch, whatever its size: one to find the keys
    /// already known, one for the suppressed ones, one to write them all.
    pub async fn rows(&mut self, rows: &[ImportRow<'_>]) -> Result<Vec<RowStatus>> {
        let keys: Vec<&str> = rows.iter().filter_map(|r| r.valid.map(|v| v.1)).collect();
        let mut known: HashMap<String, Known> = HashMap::new();
        let mut suppressed: HashSet<String> = HashSet::new();
        if !keys.is_empty() {
            let keys = serde_json::to_string(&keys)?;
            let found = sqlx::query(&format!(
                "SELECT row_key, recipients.id AS id, seen_gen, state, d.reason AS reason, row_shift \
                 FROM recipients {DETAILS} \
                 WHERE campaign_id = ? AND row_key IN (SELECT value FROM json_each(?))",
            ))
            .bind(self.campaign_id)
            .bind(&keys)
            .fetch_all(&mut *self.tx)
            .await?;
            for r in found {
                let id: i64 = r.get("id");
                known.insert(
                    r.get("row_key"),
                    Known {
                        id,
                        seen_gen: r.get("seen_gen"),
                        state: stored_state(r.get("state"))?.as_str().to_string(),
                        reason: r.get("reason"),
                        row_number: r.get::<i64, _>("row_shift") + id - self.row_base,
                    },
                );
            }
            if self.any_suppressed {
                suppressed = sqlx::query_scalar(
                    "SELECT email_key FROM suppressions WHERE email_key IN (SELECT value FROM json_each(?))",
                )
                .bind(&keys)
                .fetch_all(&mut *self.tx)
                .await?
                .into_iter()
                .collect();
            }
        }
        let next_id = &mut self.next_id;
        let (statuses, writes) =
            classify_rows(rows, &mut known, &suppressed, self.generation, || {
                *next_id += 1;
                *next_id - 1
            });
        let added = writes.iter().filter(|w| w.new).count();
        self.row_count = self
            .row_count
            .map(|n| n + i64::try_from(added).unwrap_or(0));
        let stored: Vec<Stored> = writes
            .into_iter()
            .map(|w| {
                let row = &rows[w.row];
                let (key, address) = match row.valid {
                    Some((address, key)) if w.recipient => (key.to_string(), Some(address)),
                    _ => (format!("row:{}", row.number), None),
                };
                let email = (row.email != key).then(|| row.email.to_string());
                let address = address.filter(|a| *a != row.email).map(str::to_string);
                let fields = encode_fields_email_first(row.fields, row.email);
                Stored {
                    id: w.id,
                    new: w.new,
                    key,
                    number: i64::try_from(row.number).unwrap_or(i64::MAX),
                    fields,
                    state: w.state,
                    email,
                    address,
                    reason: w.reason,
                }
            })
            .collect();
        for chunk in stored.chunks(ROWS_PER_STATEMENT) {
            self.write(chunk).await?;
        }
        Ok(statuses)
    }

    /// Inserts new rows and refreshes known ones in one statement, then
    /// their details in at most two more.
    async fn write(&mut self, rows: &[Stored]) -> Result<()> {
        let (gen, campaign) = (self.generation, self.campaign_id);
        // A row this read writes is unchanged since it, at 0; one it leaves
        // in its state keeps its time, which a 0 of the read before becomes.
        let before = self.imported_before.unwrap_or(0);
        let one = format!("(?,?,?,?,?,{campaign},{gen},0)");
        let mut sql = String::with_capacity(256 + rows.len() * (one.len() + 1));
        sql.push_str(
            "INSERT INTO recipients (id, row_key, row_shift, fields, state, campaign_id, seen_gen, updated_at) VALUES ",
        );
        for i in 0..rows.len() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&one);
        }
        sql.push_str(&format!(
            " ON CONFLICT (id) DO UPDATE SET \
             row_shift = excluded.row_shift, fields = excluded.fields, seen_gen = excluded.seen_gen, \
             state = excluded.state, \
             updated_at = CASE WHEN excluded.state != state THEN 0 \
             WHEN updated_at = 0 AND seen_gen < {gen} THEN {before} ELSE updated_at END",
        ));
        let mut query = sqlx::query(&sql);
        for row in rows {
            query = query
                .bind(row.id)
                .bind(&row.key)
                .bind(row.number - row.id + self.row_base)
                .bind(&row.fields)
                .bind(state_code(row.state)?);
        }
        query.execute(&mut *self.tx).await?;
        let details: Vec<_> = rows
            .iter()
            .filter(|r| r.details())
            .map(|r| (r.id, &r.email, &r.address, &r.reason))
            .collect();
        if !details.is_empty() {
            sqlx::query(
                "INSERT INTO recipient_details (id, email, address, reason) \
                 SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3 FROM json_each(?) AS j WHERE true \
                 ON CONFLICT (id) DO UPDATE SET email = excluded.email, address = excluded.address, reason = excluded.reason",
            )
            .bind(serde_json::to_string(&details)?)
            .execute(&mut *self.tx)
            .await?;
        }
        // Known rows that no longer have any: what they had is cleared.
        let cleared: Vec<i64> = rows
            .iter()
            .filter(|r| !r.new && !r.details())
            .map(|r| r.id)
            .collect();
        if !cleared.is_empty() {
            sqlx::query(
                "UPDATE recipient_details SET email = NULL, address = NULL, reason = NULL \
                 WHERE id IN (SELECT value FROM json_each(?))",
            )
            .bind(serde_json::to_string(&cleared)?)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    /// A row whose message cannot be built, with `--skip-invalid`.
    pub async fn skip_invalid_message(&mut self, id: i64, why: &str) -> Result<()> {
        skip_unbuildable(&mut self.tx, id, why, self.now).await
    }

    /// Rows that left the file and were never sent become `skipped (removed)`;
    /// then everything read becomes visible at once. Returns how many left.
    pub async fn commit(mut self) -> Result<u64> {
        if self.fresh {
            self.write_row_count().await?;
            self.tx.commit().await?;
            return Ok(0);
        }
        let left = format!("campaign_id = ? AND seen_gen < ? AND state IN ({PENDING}, {DEFERRED})");
        let binds = [self.campaign_id, self.generation];
        let rows = format!("recipients NOT INDEXED WHERE {left}");
        set_reason(&mut self.tx, &rows, &binds, Some("removed")).await?;
        let removed = sqlx::query(&format!(
            "UPDATE recipients NOT INDEXED SET state = {SKIPPED}, updated_at = ? WHERE {left}"
        ))
        .bind(self.now)
        .bind(self.campaign_id)
        .bind(self.generation)
        .execute(&mut *self.tx)
        .await?
        .rows_affected();
        self.write_row_count().await?;
        // Rows at 0 are the latest read's once it is committed.
        sqlx::query(
            "UPDATE recipients NOT INDEXED SET updated_at = ? WHERE campaign_id = ? AND seen_gen < ? AND updated_at = 0",
        )
        .bind(self.imported_before.unwrap_or(0))
        .bind(self.campaign_id)
        .bind(self.generation)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(removed)
    }

    /// Records how many rows the campaign has now (counted if unknown).
    async fn write_row_count(&mut self) -> Result<()> {
        sqlx::query(
            "UPDATE campaigns SET row_count = COALESCE(?, \
             (SELECT COUNT(*) FROM recipients NOT INDEXED WHERE campaign_id = campaigns.id)) WHERE id = ?",
        )
        .bind(self.row_count)
        .bind(self.campaign_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
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
        export_rows(&mut self.tx, self.campaign_id, state, visit).await
    }

    /// Counts per state as they would be after commit (for dry runs).
    pub async fn counts(&mut self) -> Result<Counts> {
        let rows = sqlx::query(&format!(
            "SELECT CASE WHEN seen_gen < ? AND state IN ({PENDING}, {DEFERRED}) THEN {SKIPPED} ELSE state END AS st, COUNT(*) AS n \
             FROM recipients NOT INDEXED WHERE campaign_id = ? GROUP BY st",
        ))
        .bind(self.generation)
        .bind(self.campaign_id)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(tally(rows))
    }
}

/// Counts per state from rows of `(st, n)`, every state present.
fn tally(rows: Vec<sqlx::sqlite::SqliteRow>) -> Counts {
    let mut counts = Counts::default();
    for row in rows {
        if let Ok(state) = stored_state(row.get("st")) {
            counts[state] = row.get("n");
        }
    }
    counts
}

/// The runner holding a lock, as "process N on HOST", unless it is gone:
/// on this host, its process has exited; on another (a database on a
/// shared disk), its lease, renewed while it runs, has run out.
fn live_holder(pid: Option<i64>, host: Option<String>, renewed_at: Option<i64>) -> Option<String> {
    let pid = pid?;
    let host = host.unwrap_or_default();
    let live = if host == super::hostname() {
        super::process_alive(pid)
    } else {
        renewed_at.unwrap_or(0) > now_ms() - super::lease_ms()
    };
    live.then(|| format!("process {pid} on {host}"))
}

/// Refuses a name that another campaign file owns (SPEC §7.6).
async fn check_owner(conn: &mut sqlx::SqliteConnection, id: &Identity) -> Result<()> {
    let owner: Option<String> = sqlx::query_scalar(
        "SELECT file FROM campaigns WHERE name = ? AND file IS NOT NULL AND file != ? LIMIT 1",
    )
    .bind(&id.name)
    .bind(&id.file)
    .fetch_optional(&mut *conn)
    .await?;
    match owner {
        None => Ok(()),
        Some(owner) => {
            let gone = if Path::new(&owner).exists() {
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
/// file; a name another file owns is refused (SPEC §7.6).
async fn create(tx: &mut Transaction<'static, Sqlite>, id: &Identity) -> Result<CampaignRecord> {
    check_owner(tx, id).await?;
    sqlx::query(
        "INSERT INTO campaigns (name, transport, file, created_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (name, transport) DO NOTHING",
    )
    .bind(&id.name)
    .bind(id.delivery.as_str())
    .bind(&id.file)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    // Rows recorded before names were bound belong to the first file that uses them.
    sqlx::query("UPDATE campaigns SET file = ? WHERE name = ? AND file IS NULL")
        .bind(&id.file)
        .bind(&id.name)
        .execute(&mut **tx)
        .await?;
    find(tx, id)
        .await?
        .context("the campaign row vanished right after it was created")
}

async fn find(conn: &mut sqlx::SqliteConnection, id: &Identity) -> Result<Option<CampaignRecord>> {
    let row = sqlx::query(
        "SELECT id, columns, fingerprint, checked FROM campaigns WHERE name = ? AND transport = ?",
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

#[cfg(test)]
pub(super) mod tests {
    use super::SqliteStore as Store;
    use super::*;

    impl SqliteStore {
        /// [`super::super::Store::claim`] on this backend.
        #[allow(clippy::too_many_arguments)]
        pub(in crate::store) async fn claim(
            &self,
            campaign_id: i64,
            account: &str,
            pause_key: &str,
            windows: &[Window],
            now: i64,
            max: usize,
            build: impl Fn(&Candidate) -> std::result::Result<Outgoing, String>,
        ) -> Result<Claim> {
            super::super::Store::Sqlite(self.clone())
                .claim(campaign_id, account, pause_key, windows, now, max, build)
                .await
        }
    }

    pub(in crate::store) fn ident(name: &str) -> Identity {
        Identity {
            name: name.into(),
            file: format!("/campaigns/{name}.toml"),
            delivery: Delivery::Smtp,
        }
    }

    pub(in crate::store) async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).await.unwrap();
        (dir, store)
    }

    pub(in crate::store) fn out(n: u32) -> Outgoing {
        let msg = lettre::Message::builder()
            .from("a@example.com".parse().unwrap())
            .to("b@example.com".parse().unwrap())
            .body(String::from("x"))
            .unwrap();
        Outgoing {
            envelope: msg.envelope().clone(),
            bytes: msg.formatted(),
            message_id: "<id@example.com>".into(),
            recipient_count: n,
        }
    }

    pub(in crate::store) async fn import(
        store: &Store,
        c: &CampaignRecord,
        rows: &[&str],
    ) -> Vec<RowStatus> {
        let mut imp = store
            .import(ImportInto::Campaign(c), &["email".into()])
            .await
            .unwrap();
        let keys: Vec<String> = rows.iter().map(|e| e.to_lowercase()).collect();
        let fields: Vec<[String; 1]> = rows.iter().map(|e| [e.to_string()]).collect();
        let batch: Vec<ImportRow<'_>> = rows
            .iter()
            .enumerate()
            .map(|(i, email)| ImportRow {
                number: i as u64 + 1,
                email,
                valid: Some((email, &keys[i])),
                fields: &fields[i],
            })
            .collect();
        let statuses = imp.rows(&batch).await.unwrap();
        imp.commit().await.unwrap();
        statuses
    }

    #[tokio::test]
    async fn interrupted_sending_becomes_unknown_not_pending() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        import(&store, &c, &["a@x.example"]).await;
        let claim = store
            .claim(c.id, "acct", "acct", &[], 1, 1, |_| Ok(out(1)))
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Ready { .. }));
        assert_eq!(store.settle_interrupted(c.id).await.unwrap(), 1);
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!((counts[State::Unknown], counts[State::Pending]), (1, 0));
        assert!(matches!(
            store
                .claim(c.id, "acct", "acct", &[], 2, 1, |_| Ok(out(1)))
                .await
                .unwrap(),
            Claim::Idle { next_due_ms: None }
        ));
    }

    /// An outcome recorded while another write holds the store does not
    /// wait for it, and is written before the next claim marks new rows
    /// `sending`: the rows `sending` in the database stay those in flight.
    #[tokio::test]
    async fn outcomes_are_written_together_and_before_the_next_claim() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        import(&store, &c, &["a@x.example", "b@x.example"]).await;
        let claim = |at| store.claim(c.id, "acct", "acct", &[], at, 1, |_| Ok(out(1)));
        let Claim::Ready { ready, .. } = claim(1).await.unwrap() else {
            panic!("nothing claimed")
        };
        let busy = store.writer.clone().lock_owned().await;
        let sent = Outcome::Sent {
            reply: "250 ok".into(),
        };
        store
            .record(&ready[0].candidate, ready[0].log_id, &sent, 2)
            .await
            .unwrap();
        // Not written while another write goes on (the process's own
        // reads would wait for it: the table is read directly).
        let state: i64 = sqlx::query_scalar("SELECT state FROM recipients WHERE id = ?")
            .bind(ready[0].candidate.id)
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(state, SENDING);
        drop(busy);
        assert!(matches!(claim(3).await.unwrap(), Claim::Ready { .. }));
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!((counts[State::Sent], counts[State::Sending]), (1, 1));
        store.flush().await.unwrap();
    }

    /// A runner on another machine (a database on a shared disk) holds the
    /// campaign while it renews its lease; once the lease runs out, its lock
    /// is taken over.
    #[tokio::test]
    async fn another_hosts_lock_holds_while_its_lease_is_renewed() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        let held_at = |at: i64| {
            sqlx::query("UPDATE campaigns SET lock_pid = 42, lock_host = 'elsewhere.example', lock_token = 't', lock_at = ? WHERE id = ?")
                .bind(at)
                .bind(c.id)
                .execute(&store.pool)
        };
        held_at(now_ms()).await.unwrap();
        let refused = store.lock(&ident("c"), "mine").await.unwrap_err();
        assert!(
            format!("{refused:#}").contains("process 42 on elsewhere.example"),
            "{refused:#}"
        );
        held_at(now_ms() - super::super::lease_ms() - 1)
            .await
            .unwrap();
        store.lock(&ident("c"), "mine").await.unwrap();
        // Our own lease is renewed while we run.
        sqlx::query("UPDATE campaigns SET lock_at = 0 WHERE id = ?")
            .bind(c.id)
            .execute(&store.pool)
            .await
            .unwrap();
        store.heartbeat(c.id).await.unwrap();
        let at: i64 = sqlx::query_scalar("SELECT lock_at FROM campaigns WHERE id = ?")
            .bind(c.id)
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert!(at > 0);
    }

    /// Regression: two processes starting on a new database at once both
    /// migrated it, and one failed with "table campaigns already exists".
    #[tokio::test]
    async fn concurrent_first_opens_both_succeed() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.db");
            let (a, b, c) =
                tokio::join!(Store::open(&path), Store::open(&path), Store::open(&path));
            a.unwrap();
            b.unwrap();
            c.unwrap();
        }
    }

    /// A state's stored number is its place among all states, both ways;
    /// another number is an error, not a panic.
    #[test]
    fn a_state_is_stored_as_its_place_among_all_states() {
        for (i, state) in State::ALL.into_iter().enumerate() {
            let code = i64::try_from(i).unwrap();
            assert_eq!(state as i64, code);
            assert_eq!(stored_state(code).unwrap(), state);
            assert_eq!(state_code(state.as_str()).unwrap(), code);
        }
        assert!(stored_state(8).is_err());
        assert!(stored_state(-1).is_err());
    }

    /// A row that a read of the file wrote and nothing changed since
    /// stores no time of its own, yet `export` shows the time of that read,
    /// through later reads that keep it, drop others or add some, and
    /// through a send.
    #[tokio::test]
    async fn a_row_only_imported_shows_the_time_of_its_read() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        let times = |store: &Store| {
            let pool = store.pool.clone();
            async move {
                let rows = sqlx::query("SELECT row_key, updated_at FROM recipients ORDER BY id")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                rows.into_iter()
                    .map(|r| (r.get::<String, _>("row_key"), r.get::<i64, _>("updated_at")))
                    .collect::<Vec<_>>()
            }
        };
        let shown = |store: &Store| {
            let store = store.clone();
            async move {
                exported(&store, c.id, None)
                    .await
                    .into_iter()
                    .map(|r| (r.0, r.1, r.5))
                    .collect::<Vec<_>>()
            }
        };
        let read_at = |store: &Store| {
            let pool = store.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT imported_at FROM campaigns")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        import(&store, &c, &["a@x.example", "b@x.example", "c@x.example"]).await;
        let first = read_at(&store).await;
        assert!(times(&store).await.iter().all(|(_, t)| *t == 0));
        let abc = |t| {
            ["a", "b", "c"]
                .map(|k| (format!("{k}@x.example"), "pending".to_string(), t))
                .to_vec()
        };
        assert_eq!(shown(&store).await, abc(first));
        // A read rolled back (check) changes nothing.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let imp = store
            .import(ImportInto::Campaign(&c), &["email".into()])
            .await
            .unwrap();
        imp.rollback().await.unwrap();
        assert_eq!(shown(&store).await, abc(first));

        // A second read keeps a and b, drops c and adds d.
        tokio::time::sleep(Duration::from_millis(5)).await;
        import(&store, &c, &["a@x.example", "b@x.example", "d@x.example"]).await;
        let second = read_at(&store).await;
        assert!(second > first);
        let row = |k: &str, st: &str, t| (format!("{k}@x.example"), st.to_string(), t);
        let after_second = shown(&store).await;
        assert_eq!(after_second[0], row("a", "pending", first));
        assert_eq!(after_second[1], row("b", "pending", first));
        assert_eq!(after_second[2].1, "skipped");
        assert!(after_second[2].2 >= second);
        assert_eq!(after_second[3], row("d", "pending", second));

        // A send changes a row's time; the others keep theirs.
        let Claim::Ready { ready, .. } = store
            .claim(c.id, "acct", "acct", &[], 3, 1, |_| Ok(out(1)))
            .await
            .unwrap()
        else {
            panic!("nothing claimed")
        };
        let sent = Outcome::Sent {
            reply: "250 ok".into(),
        };
        store
            .record(&ready[0].candidate, ready[0].log_id, &sent, 4)
            .await
            .unwrap();
        store.flush().await.unwrap();

        // A third read keeps a and d only.
        tokio::time::sleep(Duration::from_millis(5)).await;
        import(&store, &c, &["a@x.example", "d@x.example"]).await;
        let third = shown(&store).await;
        assert_eq!(third[0], row("a", "sent", 4));
        assert_eq!(third[1].1, "skipped");
        assert!(third[1].2 >= read_at(&store).await);
        // In file order: d is the second row now, c the third before.
        assert_eq!(third[2], row("d", "pending", second));
        assert_eq!(third[3], after_second[2]);
    }

    /// A row skipped by a read and left out of the next one keeps the time
    /// of the read that skipped it.
    #[tokio::test]
    async fn a_skipped_row_left_out_keeps_the_time_of_its_read() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        store.suppress("s@x.example", "asked").await.unwrap();
        import(&store, &c, &["a@x.example", "s@x.example"]).await;
        let first: i64 = sqlx::query_scalar("SELECT imported_at FROM campaigns")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        import(&store, &c, &["a@x.example"]).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        import(&store, &c, &["a@x.example"]).await;
        let rows: Vec<(String, String, i64)> = exported(&store, c.id, None)
            .await
            .into_iter()
            .map(|r| (r.0, r.1, r.5))
            .collect();
        assert_eq!(
            rows,
            [
                ("a@x.example".to_string(), "pending".to_string(), first),
                ("s@x.example".to_string(), "skipped".to_string(), first)
            ]
        );
    }

    /// Claims read pending rows from where the last claim found the first
    /// one; a row that becomes pending again below that point, whatever
    /// the way, is claimed again, first.
    #[tokio::test]
    async fn a_row_pending_again_below_the_claims_is_claimed_first() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        let rows: Vec<String> = (1..=8).map(|i| format!("r{i}@x.example")).collect();
        let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
        import(&store, &c, &rows).await;
        let claim = |n| {
            let store = store.clone();
            async move {
                match store
                    .claim(c.id, "acct", "acct", &[], 1, n, |_| Ok(out(1)))
                    .await
                    .unwrap()
                {
                    Claim::Ready { ready, .. } => ready,
                    other => panic!("{other:?}"),
                }
            }
        };
        let emails = |ready: &[Ready]| -> Vec<String> {
            ready.iter().map(|r| r.candidate.email.clone()).collect()
        };
        let settle = |ready: Vec<Ready>, outcome: Outcome| {
            let store = store.clone();
            async move {
                for r in &ready {
                    store
                        .record(&r.candidate, r.log_id, &outcome, 2)
                        .await
                        .unwrap();
                }
                store.flush().await.unwrap();
            }
        };
        let sent = Outcome::Sent {
            reply: "250 ok".into(),
        };
        let first = claim(2).await;
        assert_eq!(emails(&first), ["r1@x.example", "r2@x.example"]);
        let (returned, unclaimed) = (vec![first.into_iter().next().unwrap()], claim(1).await);
        assert_eq!(emails(&unclaimed), ["r3@x.example"]);
        settle(claim(2).await, sent.clone()).await;
        let from: Option<i64> = sqlx::query_scalar("SELECT pending_from FROM campaigns")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert!(from.unwrap() > unclaimed[0].candidate.id);
        settle(unclaimed, Outcome::Unclaimed).await;
        assert_eq!(emails(&claim(1).await), ["r3@x.example"]);
        settle(
            returned,
            Outcome::Returned {
                reply: "421 later".into(),
                unlog: true,
            },
        )
        .await;
        assert_eq!(emails(&claim(2).await), ["r1@x.example", "r6@x.example"]);
        // Rows below where claims read: unknown, then sent again on request.
        assert_eq!(emails(&claim(1).await), ["r7@x.example"]);
        assert_eq!(store.settle_interrupted(c.id).await.unwrap(), 5);
        assert_eq!(store.requeue_unknown(c.id).await.unwrap(), 5);
        assert_eq!(emails(&claim(1).await), ["r1@x.example"]);
        // Failed, then retried on request.
        let failing = claim(4).await;
        assert_eq!(
            emails(&failing),
            [
                "r2@x.example",
                "r3@x.example",
                "r6@x.example",
                "r7@x.example"
            ]
        );
        let failed = Outcome::Failed {
            reply: "550 no".into(),
            suppress: false,
        };
        settle(failing, failed).await;
        let last = claim(1).await;
        assert_eq!(emails(&last), ["r8@x.example"]);
        settle(last, Outcome::Unclaimed).await;
        assert_eq!(store.requeue_failed(c.id).await.unwrap(), 4);
        assert_eq!(emails(&claim(1).await), ["r2@x.example"]);
    }

    /// A row that a new read of the file makes pending (taken off the
    /// suppression list) is claimed, though claims had passed it.
    #[tokio::test]
    async fn a_row_a_new_read_makes_pending_is_claimed() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        store.suppress("s@x.example", "asked").await.unwrap();
        let rows = ["s@x.example", "a@x.example", "b@x.example"];
        import(&store, &c, &rows).await;
        let claim = || store.claim(c.id, "acct", "acct", &[], 1, 1, |_| Ok(out(1)));
        let Claim::Ready { ready, .. } = claim().await.unwrap() else {
            panic!("nothing claimed")
        };
        assert_eq!(ready[0].candidate.email, "a@x.example");
        assert!(matches!(claim().await.unwrap(), Claim::Ready { .. }));
        assert!(store.unsuppress("s@x.example").await.unwrap());
        import(&store, &c, &rows).await;
        let Claim::Ready { ready, .. } = claim().await.unwrap() else {
            panic!("the row back from the suppression list was not claimed")
        };
        assert_eq!(ready[0].candidate.email, "s@x.example");
    }

    /// The counts per state are those of the rows, the pending ones
    /// included, which are counted from the campaign's number of rows:
    /// through reads that add rows, drop some and repeat an address.
    #[tokio::test]
    async fn counts_are_those_of_the_rows_through_reads_and_sends() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        let check = || async {
            let rows = sqlx::query(
                "SELECT state AS st, COUNT(*) AS n FROM recipients WHERE campaign_id = ? GROUP BY state",
            )
            .bind(c.id)
            .fetch_all(&store.pool)
            .await
            .unwrap();
            assert_eq!(store.counts(c.id).await.unwrap(), tally(rows));
        };
        import(&store, &c, &["a@x.example", "b@x.example", "a@x.example"]).await;
        check().await;
        let claim = store
            .claim(c.id, "acct", "acct", &[], 1, 1, |_| Ok(out(1)))
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Ready { .. }));
        check().await;
        import(
            &store,
            &c,
            &["b@x.example", "c@x.example", "c@x.example", "d@x.example"],
        )
        .await;
        check().await;
        import(&store, &c, &["d@x.example"]).await;
        check().await;
        assert_eq!(store.counts(c.id).await.unwrap().total(), 4);
        // A campaign recorded before its rows were counted.
        sqlx::query("UPDATE campaigns SET row_count = NULL")
            .execute(&store.pool)
            .await
            .unwrap();
        check().await;
    }

    /// A row of `export`, comparable.
    type Exported = (
        String,
        String,
        Option<String>,
        i64,
        Option<String>,
        i64,
        Option<String>,
        Vec<String>,
    );

    async fn exported(store: &Store, campaign_id: i64, state: Option<State>) -> Vec<Exported> {
        let mut rows = Vec::new();
        store
            .export(campaign_id, state, |r| {
                rows.push((
                    r.email,
                    r.state,
                    r.reason,
                    r.attempts,
                    r.last_reply,
                    r.updated_at,
                    r.message_id,
                    r.fields,
                ));
                Ok(())
            })
            .await
            .unwrap();
        rows
    }

    /// A new database at `path` with only the migrations before the one
    /// `description` names, and a connection to it (foreign keys off, as
    /// migrations run).
    async fn database_before(path: &Path, description: &str) -> sqlx::SqliteConnection {
        let mut before = sqlx::migrate!("./migrations/sqlite");
        let at = before
            .migrations
            .iter()
            .position(|m| m.description == description)
            .unwrap();
        before.migrations = before.migrations[..at].to_vec().into();
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(false);
        let mut conn = options.connect().await.unwrap();
        before.run_direct(&mut conn).await.unwrap();
        conn
    }

    /// What `export` showed of a campaign in a database from before the
    /// latest migrations, read as it read it then (states as words or as
    /// numbers).
    async fn exported_before(conn: &mut sqlx::SqliteConnection, campaign_id: i64) -> Vec<Exported> {
        let sql = format!(
            "SELECT {} AS email, state, reason, attempts, last_reply, updated_at, message_id, fields \
             FROM recipients WHERE campaign_id = ? ORDER BY row_number, id",
            super::super::compact::EMAIL
        );
        let rows = sqlx::query(&sql)
            .bind(campaign_id)
            .fetch_all(conn)
            .await
            .unwrap();
        rows.into_iter()
            .map(|r| {
                let email: String = r.get("email");
                let state = match r.try_get::<i64, _>("state") {
                    Ok(code) => stored_state(code).unwrap().as_str().to_string(),
                    Err(_) => r.get("state"),
                };
                (
                    email.clone(),
                    state,
                    r.get("reason"),
                    r.get("attempts"),
                    r.get("last_reply"),
                    r.get("updated_at"),
                    r.get("message_id"),
                    decode_fields(r.get("fields"), &email).unwrap(),
                )
            })
            .collect()
    }

    /// A database from before states were numbers: every row keeps its
    /// state, reason and everything `export` shows, and each state is
    /// found again by what reads it (counts, export by state, claims).
    #[tokio::test]
    async fn states_written_as_words_are_read_back_after_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let mut conn = database_before(&path, "states as numbers").await;
        sqlx::query("INSERT INTO campaigns (id, name, created_at) VALUES (1, 'c', 0)")
            .execute(&mut conn)
            .await
            .unwrap();
        for (i, state) in State::ALL.iter().enumerate() {
            let n = i64::try_from(i).unwrap() + 1;
            // Both stored forms of the address and of the cells.
            let (key, email, fields) = if i % 2 == 0 {
                (
                    format!("r{n}@x.example"),
                    String::new(),
                    "\u{1f}\u{1e}\u{1f}Ann".to_string(),
                )
            } else {
                let email = format!("R{n}@X.example");
                (
                    email.to_lowercase(),
                    email.clone(),
                    format!("[\"{email}\",\"Bo\"]"),
                )
            };
            sqlx::query(
                "INSERT INTO recipients (campaign_id, row_key, email, row_number, fields, state, reason, \
                 attempts, last_reply, message_id, next_attempt_at, seen_gen, updated_at) \
                 VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
            )
            .bind(&key)
            .bind(&email)
            .bind(9 - n)
            .bind(fields)
            .bind(state.as_str())
            .bind(format!("why {}", state.as_str()))
            .bind(n % 3)
            .bind((n % 2 == 0).then(|| format!("250 ok {n}")))
            .bind((n % 2 == 1).then(|| format!("<{n}@x.example>")))
            .bind((*state == State::Deferred).then_some(1_i64))
            .bind(1_000 * n)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        let expected = exported_before(&mut conn, 1).await;
        conn.close().await.unwrap();

        let store = Store::open(&path).await.unwrap();
        assert_eq!(exported(&store, 1, None).await, expected);
        let counts = store.counts(1).await.unwrap();
        for state in State::ALL {
            assert_eq!(counts[state], 1, "{state:?}");
            let one = exported(&store, 1, Some(state)).await;
            assert_eq!(one.len(), 1, "{state:?}");
            assert_eq!(one[0].1, state.as_str());
            assert_eq!(
                one[0].2.as_deref(),
                Some(format!("why {}", state.as_str()).as_str())
            );
        }
        // The deferred row is due, then the pending one.
        let Claim::Ready { ready, .. } = store
            .claim(1, "acct", "acct", &[], 2, 5, |_| Ok(out(1)))
            .await
            .unwrap()
        else {
            panic!("nothing claimed")
        };
        let claimed: Vec<&str> = ready
            .iter()
            .map(|r| r.candidate.before.state.as_str())
            .collect();
        assert_eq!(claimed, ["deferred", "pending"]);
        // A state no number stands for is refused by the table.
        let refused = sqlx::query("UPDATE recipients SET state = 8 WHERE id = 1")
            .execute(&store.pool)
            .await;
        assert!(refused.is_err());
    }

    /// Regression guard for row numbers kept as their distance from file
    /// order (0 for a file read in order): rows a later read finds
    /// elsewhere, adds at the top or repeats, in a campaign whose ids are
    /// not all its own in a row, report their own number in the file, to
    /// claims, to `export` (in file order) and to a duplicate found in a
    /// later batch of the same read.
    #[tokio::test]
    async fn rows_out_of_file_order_keep_their_row_numbers() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        let other = store.campaign(&ident("other")).await.unwrap();
        import(&store, &other, &["z1@x.example", "z2@x.example"]).await;
        import(&store, &c, &["a@x.example", "b@x.example"]).await;
        import(
            &store,
            &other,
            &["z1@x.example", "z2@x.example", "z3@x.example"],
        )
        .await;
        // c's file again: a new first row, a and b swapped, b repeated.
        let mut imp = store
            .import(ImportInto::Campaign(&c), &["email".into()])
            .await
            .unwrap();
        let batch = |rows: &'static [(u64, &'static str)]| -> Vec<ImportRow<'static>> {
            rows.iter()
                .map(|(number, email)| ImportRow {
                    number: *number,
                    email,
                    valid: Some((email, email)),
                    fields: &[],
                })
                .collect()
        };
        imp.rows(&batch(&[(1, "n@x.example"), (2, "b@x.example")]))
            .await
            .unwrap();
        let later = imp
            .rows(&batch(&[(3, "a@x.example"), (4, "b@x.example")]))
            .await
            .unwrap();
        imp.commit().await.unwrap();
        assert!(
            matches!(later[1], RowStatus::Duplicate { first_row: 2 }),
            "{:?}",
            later[1]
        );
        let order: Vec<String> = exported(&store, c.id, None)
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(
            order,
            ["n@x.example", "b@x.example", "a@x.example", "b@x.example"]
        );
        let Claim::Ready { ready, .. } = store
            .claim(c.id, "acct", "acct", &[], 1, 5, |_| Ok(out(1)))
            .await
            .unwrap()
        else {
            panic!("nothing claimed")
        };
        let numbers: Vec<(&str, i64)> = ready
            .iter()
            .map(|r| (r.candidate.email.as_str(), r.candidate.row_number))
            .collect();
        assert_eq!(
            numbers,
            [("a@x.example", 3), ("b@x.example", 2), ("n@x.example", 1)]
        );
    }

    /// A migration that rebuilds the recipients table gives the old
    /// table's pages back: the file of a large campaign does not double
    /// when a new version opens it.
    #[tokio::test]
    async fn a_migration_that_rebuilds_the_table_gives_its_pages_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let mut conn = database_before(&path, "row details apart").await;
        sqlx::query("INSERT INTO campaigns (id, name, created_at) VALUES (1, 'c', 0)")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) \
             INSERT INTO recipients (campaign_id, row_key, email, row_number, fields, state, \
             attempts, seen_gen, updated_at) \
             SELECT 1, 'user' || i || '@x.example', '', i, char(31, 30, 31) || 'Name ' || i, 0, 0, 1, 0 FROM n",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let before = std::fs::metadata(&path).unwrap().len();

        let store = Store::open(&path).await.unwrap();
        let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        store.close().await;
        let after = std::fs::metadata(&path).unwrap().len();
        assert_eq!(free, 0, "pages left free");
        assert!(after <= before, "{before} bytes before, {after} after");
    }

    /// A database from before the details of a row were kept apart: each
    /// row keeps its addresses as written and as sent, its reason, its
    /// sends and its number in the file, as `export`, claims and the
    /// reading of bounces see them; only the rows that have details get a
    /// row of them.
    #[tokio::test]
    async fn rows_keep_their_details_after_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let mut conn = database_before(&path, "row details apart").await;
        sqlx::query("INSERT INTO campaigns (id, name, created_at) VALUES (1, 'c', 0), (2, 'd', 0)")
            .execute(&mut conn)
            .await
            .unwrap();
        // A row that is not a recipient; a sent one; a deferred one with an
        // address written in capitals and sent in punycode, cells as JSON;
        // a pending one with both addresses written in full, as rows were
        // before they were written compactly; one only imported. Their ids
        // are not in file order.
        sqlx::query(
            "INSERT INTO recipients (id, campaign_id, row_key, email, address, row_number, fields, state, \
             reason, attempts, last_reply, message_id, next_attempt_at, seen_gen, updated_at) VALUES \
             (10, 2, 'row:1', 'not an address', NULL, 1, char(31) || 'not an address', 6, \
              'invalid address', 0, NULL, NULL, NULL, 1, 7), \
             (11, 1, 'a@x.example', '', NULL, 2, char(31, 30, 31) || 'Ann', 2, \
              NULL, 1, '250 ok', '<m1@x.example>', NULL, 1, 7), \
             (12, 1, 'b@bücher.example', 'B@Bücher.example', 'B@xn--bcher-kva.example', 1, '[\"B@Bücher.example\",\"Bo\"]', 3, \
              'transient failure, will retry', 2, '451 later', '<m2@x.example>', 1, 1, 7), \
             (13, 1, 'c@x.example', 'c@x.example', 'c@x.example', 4, '[\"c@x.example\",\"Cy\"]', 0, \
              NULL, 0, NULL, NULL, NULL, 1, 7), \
             (14, 1, 'd@x.example', '', NULL, 3, char(31, 30, 31) || 'Di', 0, \
              NULL, 0, NULL, NULL, NULL, 1, 7)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let expected = [
            exported_before(&mut conn, 1).await,
            exported_before(&mut conn, 2).await,
        ];
        conn.close().await.unwrap();

        let store = Store::open(&path).await.unwrap();
        assert_eq!(exported(&store, 1, None).await, expected[0]);
        assert_eq!(exported(&store, 2, None).await, expected[1]);
        let emails: Vec<&str> = expected[0].iter().map(|r| r.0.as_str()).collect();
        assert_eq!(
            emails,
            [
                "B@Bücher.example",
                "a@x.example",
                "d@x.example",
                "c@x.example"
            ]
        );
        let with_details: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM recipient_details ORDER BY id")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        assert_eq!(with_details, [10, 11, 12]);
        // The deferred row is due, then the pending ones in id order.
        let Claim::Ready { ready, .. } = store
            .claim(1, "acct", "acct", &[], 2, 5, |_| Ok(out(1)))
            .await
            .unwrap()
        else {
            panic!("nothing claimed")
        };
        let claimed: Vec<(&str, &str, i64, i64)> = ready
            .iter()
            .map(|r| {
                let c = &r.candidate;
                (
                    c.email.as_str(),
                    c.address.as_str(),
                    c.row_number,
                    c.attempts,
                )
            })
            .collect();
        assert_eq!(
            claimed,
            [
                ("B@Bücher.example", "B@xn--bcher-kva.example", 1, 2),
                ("c@x.example", "c@x.example", 4, 0),
                ("d@x.example", "d@x.example", 3, 0),
            ]
        );
        let ids = HashSet::from(["m1@x.example".to_string()]);
        let found = store.notice_rows(1, &ids, &HashSet::new()).await.unwrap();
        assert_eq!(
            found
                .iter()
                .map(|n| (n.id, n.email.as_str(), n.message_id.as_deref()))
                .collect::<Vec<_>>(),
            [(11, "a@x.example", Some("m1@x.example"))]
        );
        // Forgetting a campaign forgets its rows' details too; the claim
        // gave its rows some.
        assert_eq!(store.reset("d").await.unwrap(), Some(1));
        let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM recipient_details ORDER BY id")
            .fetch_all(&store.pool)
            .await
            .unwrap();
        assert_eq!(left, [11, 12, 13, 14]);
    }

    /// A database written before rehearsals and bound names: its rows stay,
    /// a campaign whose sends were all file writes becomes a rehearsal, and
    /// an SMTP one stays delivery.
    #[tokio::test]
    async fn an_older_database_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let mut first = sqlx::migrate!("./migrations/sqlite");
        first.migrations = first.migrations[..1].to_vec().into();
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let mut conn = options.connect().await.unwrap();
        first.run_direct(&mut conn).await.unwrap();
        for (id, name, reply) in [
            (1, "rehearsed", "250 written to /c/outbox/x.eml"),
            (2, "delivered", "250 2.0.0 OK queued"),
        ] {
            sqlx::query("INSERT INTO campaigns (id, name, created_at) VALUES (?, ?, 0)")
                .bind(id)
                .bind(name)
                .execute(&mut conn)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO recipients (campaign_id, row_key, email, row_number, fields, state, attempts, last_reply, seen_gen, updated_at) \
                 VALUES (?, 'a@x.example', 'a@x.example', 1, '[]', 'sent', 1, ?, 1, 5)",
            )
            .bind(id)
            .bind(reply)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        conn.close().await.unwrap();

        let store = Store::open(&path).await.unwrap();
        let all = store.campaigns().await.unwrap();
        let by_name = |n: &str| all.iter().find(|c| c.name == n).unwrap();
        assert!(by_name("rehearsed").delivery.is_none());
        assert_eq!(
            by_name("rehearsed").rehearsal.as_ref().unwrap()[State::Sent],
            1
        );
        assert_eq!(
            by_name("delivered").delivery.as_ref().unwrap()[State::Sent],
            1
        );
        assert!(by_name("delivered").rehearsal.is_none());
        // The first file to use a name from before binding owns it.
        let id = Identity {
            name: "delivered".into(),
            file: "/a/campaign.toml".into(),
            delivery: Delivery::Smtp,
        };
        assert_eq!(store.campaign(&id).await.unwrap().id, 2);
        let other = Identity {
            file: "/b/campaign.toml".into(),
            ..id
        };
        let refused = store.campaign(&other).await.unwrap_err();
        assert!(
            format!("{refused:#}").contains("/a/campaign.toml"),
            "{refused:#}"
        );
        // Reset forgets the rows through the foreign key, which survived the rebuild.
        assert_eq!(store.reset("delivered").await.unwrap(), Some(1));
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM recipients")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(left, 1);
    }
}
