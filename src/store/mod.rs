//! The state store (SPEC §7, §10): the domain types and the API every
//! command uses, whatever database holds the state.
//!
//! The order of writes is the at-most-once guarantee: a recipient is
//! durably `sending` (and its send logged for the account's limits) before
//! its SMTP transaction starts, and `sent` after the server accepted it. A
//! row left `sending` by a dead process becomes `unknown`, never `pending`.

mod compact;
mod feedback;
mod postgres;
mod sqlite;
#[cfg(test)]
mod tests_backends;

pub use feedback::{message_id_key, NoticeRow, SendEntry};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Result;
use serde::Serialize;

use crate::error::input_error;
use crate::limits::{Schedule, Window};
use crate::message::Outgoing;

/// A recipient's delivery state (SPEC §7). The numbers are how SQLite
/// stores a state: never change or reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending = 0,
    Sending = 1,
    Sent = 2,
    Deferred = 3,
    Failed = 4,
    Unknown = 5,
    Skipped = 6,
    /// Accepted, then a delivery status notification came back.
    Bounced = 7,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Pending,
        State::Sending,
        State::Sent,
        State::Deferred,
        State::Failed,
        State::Unknown,
        State::Skipped,
        State::Bounced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Sending => "sending",
            State::Sent => "sent",
            State::Deferred => "deferred",
            State::Failed => "failed",
            State::Unknown => "unknown",
            State::Skipped => "skipped",
            State::Bounced => "bounced",
        }
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<State, String> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = State::ALL.map(State::as_str).to_vec();
                format!("unknown state {s:?} ({})", known.join(", "))
            })
    }
}

/// Recipients per state: one slot for each [`State`], so a state that does
/// not exist cannot be asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts([i64; State::ALL.len()]);

impl Counts {
    /// Every row, whatever its state.
    pub fn total(&self) -> i64 {
        self.0.iter().sum()
    }

    /// `(state, count)` in the order of [`State::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (State, i64)> + '_ {
        State::ALL.into_iter().map(|s| (s, self[s]))
    }
}

impl std::ops::Index<State> for Counts {
    type Output = i64;
    fn index(&self, state: State) -> &i64 {
        &self.0[state as usize]
    }
}

impl std::ops::IndexMut<State> for Counts {
    fn index_mut(&mut self, state: State) -> &mut i64 {
        &mut self.0[state as usize]
    }
}

impl Serialize for Counts {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(State::ALL.len()))?;
        for (state, n) in self.iter() {
            map.serialize_entry(state.as_str(), &n)?;
        }
        map.end()
    }
}

/// Why a row is `skipped`, as recorded in its `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    InvalidAddress,
    Duplicate,
    Suppressed,
    /// The row left the file before it was sent.
    Removed,
    /// Its message could not be built; the text says why.
    InvalidMessage(String),
}

impl SkipReason {
    const INVALID_MESSAGE: &'static str = "invalid message";

    pub fn to_text(&self) -> String {
        match self {
            SkipReason::InvalidAddress => "invalid address".into(),
            SkipReason::Duplicate => "duplicate".into(),
            SkipReason::Suppressed => "suppressed".into(),
            SkipReason::Removed => "removed".into(),
            SkipReason::InvalidMessage(why) => format!("{}: {why}", Self::INVALID_MESSAGE),
        }
    }

    pub fn parse(text: &str) -> Option<SkipReason> {
        Some(match text {
            "invalid address" => SkipReason::InvalidAddress,
            "duplicate" => SkipReason::Duplicate,
            "suppressed" => SkipReason::Suppressed,
            "removed" => SkipReason::Removed,
            _ => SkipReason::InvalidMessage(
                text.strip_prefix(Self::INVALID_MESSAGE)?
                    .trim_start_matches(':')
                    .trim_start()
                    .to_string(),
            ),
        })
    }

    /// A reason that may no longer hold at the next read of the file: the row
    /// is looked at again.
    pub fn reconsidered(&self) -> bool {
        matches!(
            self,
            SkipReason::Removed | SkipReason::Suppressed | SkipReason::InvalidMessage(_)
        )
    }
}

/// Where the state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbLocation {
    Sqlite {
        path: PathBuf,
        /// The platform default: its folder is created when missing; the
        /// folder of a path the user gave must exist (a typo is not a new folder).
        default: bool,
    },
    Postgres {
        url: String,
    },
}

impl DbLocation {
    /// The location fit to print: a URL's password masked.
    pub fn shown(&self) -> String {
        match self {
            DbLocation::Sqlite { path, .. } => path.display().to_string(),
            DbLocation::Postgres { url } => mask_password(url),
        }
    }
}

/// Where the state lives: `--db`, `HIKYAKU_DB`, or the platform default.
pub fn resolve_db(arg: Option<&str>) -> Result<DbLocation> {
    match arg {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(DbLocation::Postgres {
                url: url.to_string(),
            })
        }
        Some(url) => Ok(DbLocation::Sqlite {
            path: PathBuf::from(url.strip_prefix("sqlite://").unwrap_or(url)),
            default: false,
        }),
        None => {
            let base = dirs::data_dir().ok_or_else(|| {
                input_error(
                    "no platform data directory is known here: give --db PATH or set HIKYAKU_DB",
                )
            })?;
            Ok(DbLocation::Sqlite {
                path: base.join("hikyaku").join("hikyaku.db"),
                default: true,
            })
        }
    }
}

/// A database URL fit to print: the password of `scheme://user:password@host` as `***`.
pub fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Names the state database in an error that came from it, whichever
/// command met it: SQLite's own words never stand alone.
pub fn name_in_error(shown: &str, err: anyhow::Error) -> anyhow::Error {
    let from_db = err
        .chain()
        .any(|e| e.is::<sqlx::Error>() || e.is::<sqlx::migrate::MigrateError>());
    if !from_db || format!("{err:#}").contains(shown) {
        return err;
    }
    let hint = match sqlite_code(&err).as_deref() {
        Some("8") => " (the file or its folder is read-only for hikyaku)",
        Some("11" | "26") => " (the file is damaged or not a SQLite database)",
        Some("14") => " (can hikyaku create and write files in its folder?)",
        _ => "",
    };
    err.context(format!("state database {shown}{hint}"))
}

/// SQLite's primary result code of an error from the database, if any.
fn sqlite_code(err: &anyhow::Error) -> Option<String> {
    err.chain().find_map(|e| {
        let db = match e.downcast_ref::<sqlx::Error>()? {
            sqlx::Error::Database(db) => db,
            _ => return None,
        };
        let code = db.code()?;
        let primary = code.parse::<i64>().ok()? & 0xff;
        Some(primary.to_string())
    })
}

/// Which sends a campaign's state records (SPEC §7.5). The file transport
/// rehearses: its state is kept apart and never counts as delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Through SMTP, whichever account: the real thing.
    Smtp,
    /// Through the file transport: `.eml` files, nothing delivered.
    File,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Smtp => "smtp",
            Delivery::File => "file",
        }
    }

    pub fn is_rehearsal(self) -> bool {
        self == Delivery::File
    }
}

/// What names a campaign's state: its name, the campaign file that owns
/// the name (SPEC §7.6), and which sends are recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    /// The campaign file's canonical path.
    pub file: String,
    pub delivery: Delivery,
}

/// One campaign of the database, for `hikyaku campaigns`.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignSummary {
    pub name: String,
    /// The campaign file that owns the name, if known.
    pub file: Option<String>,
    /// Counts per state of real delivery (SMTP), if it ever started.
    pub delivery: Option<Counts>,
    /// Counts per state of the file transport's rehearsal, if any.
    pub rehearsal: Option<Counts>,
    /// The last change to any of its recipients (Unix ms).
    pub last_activity_ms: Option<i64>,
    /// The process sending it now, if any.
    pub running: Option<String>,
}

/// A campaign's row in the store.
#[derive(Debug, Clone)]
pub struct CampaignRecord {
    pub id: i64,
    pub columns: Vec<String>,
    pub fingerprint: Option<String>,
    /// What the last complete check of its rows saw: the recipients file
    /// and everything its rows were checked against, as one digest.
    pub checked: Option<String>,
}

/// Outcomes recorded and not yet written, and an error met writing them
/// in the background: each backend writes the waiting ones together, and
/// before its next claim marks new rows `sending` (SPEC §7.3).
#[derive(Default)]
pub(crate) struct Outcomes {
    pub(crate) queue: Vec<(Candidate, i64, Outcome, i64)>,
    pub(crate) error: Option<String>,
    /// Outcomes recorded and not yet written (waiting, or in a write not
    /// yet committed) that make a row due again: a claim writes them
    /// before it picks, so that it never misses a row on its way back.
    pub(crate) returning: usize,
}

impl Outcomes {
    fn push(&mut self, outcome: (Candidate, i64, Outcome, i64)) {
        if outcome.2.returns_row() {
            self.returning += 1;
        }
        self.queue.push(outcome);
    }

    /// Counts out what a committed write took from the queue.
    pub(crate) fn committed(&mut self, written: &[(Candidate, i64, Outcome, i64)]) {
        let returned = written
            .iter()
            .filter(|(_, _, o, _)| o.returns_row())
            .count();
        self.returning = self.returning.saturating_sub(returned);
    }
}

/// The outcomes, whatever a thread that panicked holding them left.
fn lock(outcomes: &std::sync::Mutex<Outcomes>) -> std::sync::MutexGuard<'_, Outcomes> {
    outcomes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
impl Store {
    /// An outcome recorded whose write has not run yet (another write
    /// held the store).
    pub(crate) fn queue_outcome_for_test(
        &self,
        candidate: &Candidate,
        log_id: i64,
        outcome: &Outcome,
        now: i64,
    ) {
        let outcomes = match self {
            Store::Sqlite(b) => &b.outcomes,
            Store::Postgres(b) => &b.outcomes,
        };
        lock(outcomes).push((candidate.clone(), log_id, outcome.clone(), now));
    }
}

/// Which campaign row a read of the recipients file fills.
#[derive(Debug, Clone, Copy)]
pub enum ImportInto<'a> {
    /// The campaign's row, found or made by the caller.
    Campaign(&'a CampaignRecord),
    /// The campaign's row, for a read that is always rolled back (check, a
    /// dry run): on PostgreSQL it leaves no dead rows behind.
    Discarded(&'a CampaignRecord),
    /// The campaign's row, found or else made inside the read's own
    /// transaction: a read that is rolled back (status, export, check, a dry
    /// run of a campaign never sent) leaves no row behind and never shows
    /// one to another process, so it never has to remove one either.
    Found(&'a Identity),
}

/// A recipient picked for sending.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: i64,
    pub row_number: i64,
    pub email: String,
    pub address: String,
    pub fields: Vec<String>,
    pub attempts: i64,
    /// The row as it was before the claim, so that a recipient never offered
    /// to the server goes back byte for byte (SPEC §8: a refused login
    /// changes nobody's state).
    pub before: Before,
}

/// The columns a claim changes, as they were.
#[derive(Debug, Clone, Default)]
pub struct Before {
    pub state: String,
    pub message_id: Option<String>,
    pub updated_at: i64,
}

/// A recipient durably `sending`, its send logged: go ahead.
#[derive(Debug)]
pub struct Ready {
    pub candidate: Candidate,
    pub message: Box<Outgoing>,
    pub log_id: i64,
}

/// The result of asking for the next recipients to send to.
#[derive(Debug)]
pub enum Claim {
    /// Recipients to send to now, and rows whose message could no longer be
    /// built (now `skipped (invalid message)`).
    Ready {
        ready: Vec<Ready>,
        unbuildable: Vec<(Candidate, String)>,
    },
    /// Something must pass first: pacing, a full window, an account pause.
    Wait { until_ms: i64, why: WaitReason },
    /// Nothing is due; deferred retries may be due at `next_due_ms`.
    Idle { next_due_ms: Option<i64> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    Pacing,
    Window {
        window: Window,
        used: u64,
    },
    Paused(String),
    /// Outside the campaign's `[schedule]`.
    Schedule,
    /// The account's warm-up cap for its `day`-th day of sending is reached.
    WarmUp {
        day: usize,
        cap: u32,
    },
    /// Every recipient that could go now is at a domain that must wait.
    Domain(String),
    /// Every recipient that could go now is outside the sending hours of
    /// their own zone (`timezone_column`); the first to open is in `zone`.
    RecipientHours(String),
}

impl WaitReason {
    /// Why a send must wait for `slot` of `schedule`: the window it would
    /// overfill, with that window's use now, or else the pacing.
    pub fn for_slot(schedule: &Schedule, slot: &crate::limits::Slot, now: i64) -> WaitReason {
        match slot.hold {
            Some(crate::limits::Hold::Full(window)) => {
                let used = schedule
                    .usage(now)
                    .into_iter()
                    .find(|(w, _)| *w == window)
                    .map_or(0, |(_, u)| u);
                WaitReason::Window { window, used }
            }
            _ => WaitReason::Pacing,
        }
    }
}

/// Recipients a claim passes over without reading them: those whose
/// field `field` holds one of `values`. The engine names the cells of
/// `timezone_column` whose zone is outside its sending hours now, so that
/// a file sorted by zone never hides the recipients of an open zone behind
/// thousands of a closed one.
#[derive(Debug, Clone, Default)]
pub struct Skip {
    pub field: usize,
    pub values: Vec<String>,
}

/// Recipients one claim passes over (held by `hold`) before it waits.
const MAX_PASSED_OVER: usize = 64;

/// What a claim is for: the account, its pause key and windows, and now.
pub(crate) struct Gate<'a> {
    pub account: &'a str,
    pub pause_key: &'a str,
    pub windows: &'a [Window],
    pub now: i64,
}

impl Gate<'_> {
    /// The wait before a send of `count` recipients: the account's pause
    /// (until when, and why), else its next slot when it is in the future.
    /// `schedule` is read only when the account has windows.
    pub fn wait(
        &self,
        paused: Option<(i64, String)>,
        schedule: Option<Schedule>,
        count: u32,
    ) -> Option<Claim> {
        if let Some((until_ms, reason)) = paused {
            return Some(Claim::Wait {
                until_ms,
                why: WaitReason::Paused(reason),
            });
        }
        let schedule = schedule?;
        let slot = schedule.next_slot(self.now, count);
        (slot.at_ms > self.now).then(|| Claim::Wait {
            until_ms: slot.at_ms,
            why: WaitReason::for_slot(&schedule, &slot, self.now),
        })
    }
}

/// Recipients picked for a claim, their messages built outside any
/// transaction, handed to the backend's `take`.
#[derive(Default)]
pub(crate) struct Picked {
    /// Every row picked: the backend lets go of the ones not taken.
    pub ids: Vec<i64>,
    pub built: Vec<(Candidate, Outgoing)>,
    pub unbuildable: Vec<(Candidate, String)>,
    /// The earliest a passed-over recipient may go, and why.
    pub held: Option<(i64, WaitReason)>,
}

impl Picked {
    /// What the claim comes to once the backend has marked `ready` (those
    /// of `built` still as they were picked) and skipped the unbuildable:
    /// `None` when nothing at all was picked (the backend then says when
    /// something is due). Forgets the taken rows: they need no letting go.
    pub fn settle(&mut self, built_any: bool, ready: Vec<Ready>) -> Option<Claim> {
        let taken: HashSet<i64> = ready
            .iter()
            .map(|r| r.candidate.id)
            .chain(self.unbuildable.iter().map(|(c, _)| c.id))
            .collect();
        self.ids.retain(|id| !taken.contains(id));
        let unbuildable = std::mem::take(&mut self.unbuildable);
        if ready.is_empty() && unbuildable.is_empty() {
            if let Some((until_ms, why)) = self.held.take() {
                return Some(Claim::Wait { until_ms, why });
            }
            if !built_any {
                return None;
            }
        }
        Some(Claim::Ready { ready, unbuildable })
    }
}

/// One outcome of a send, as written to the store.
#[derive(Debug, Clone)]
pub enum Outcome {
    Sent {
        reply: String,
    },
    Deferred {
        reply: String,
        retry_at_ms: i64,
    },
    Failed {
        reply: String,
        suppress: bool,
    },
    /// Back to `pending` as if never tried (account pause, fatal error).
    Returned {
        reply: String,
        unlog: bool,
    },
    /// Never offered to the server (the run stopped first, the server could
    /// not be reached, the login was refused): the row as before the claim.
    Unclaimed,
    /// The connection was lost after the whole message was sent, before
    /// the reply: `unknown`, never sent again unless asked.
    Unknown {
        reply: String,
    },
}

impl Outcome {
    /// Whether the outcome makes its row due again, now or at a retry time
    /// (a message sent, refused or lost makes none).
    fn returns_row(&self) -> bool {
        !matches!(
            self,
            Outcome::Sent { .. } | Outcome::Failed { .. } | Outcome::Unknown { .. }
        )
    }
}

/// One row of `export`.
pub struct ExportRow {
    pub email: String,
    pub state: String,
    pub reason: Option<String>,
    pub attempts: i64,
    pub last_reply: Option<String>,
    pub updated_at: i64,
    pub message_id: Option<String>,
    pub fields: Vec<String>,
}

/// A row of the recipients file as the import takes it.
#[derive(Debug, Clone, Copy)]
pub struct ImportRow<'a> {
    pub number: u64,
    /// The address cell as written (trimmed).
    pub email: &'a str,
    /// The address as sent and its key, when the address is valid; a row
    /// without becomes `skipped (invalid address)`.
    pub valid: Option<(&'a str, &'a str)>,
    pub fields: &'a [String],
}

/// What the store knows about a row just read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowStatus {
    /// Still to be sent: its message must be checked.
    ToSend { id: i64 },
    /// Already past sending (sent, failed, unknown, skipped on purpose).
    Settled,
    /// The same address appeared on an earlier row.
    Duplicate { first_row: i64 },
    /// On the suppression list.
    Suppressed,
}

/// How long a runner's lock (SQLite) or a worker's claim on its rows
/// (PostgreSQL) lasts without renewal; renewed every [`HEARTBEAT`].
pub const LEASE: std::time::Duration = std::time::Duration::from_secs(30);
/// How often a running sender renews its lease.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

fn lease_ms() -> i64 {
    i64::try_from(LEASE.as_millis()).unwrap_or(30_000)
}

/// The state database: one type for the commands, whichever backend.
#[derive(Clone)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

/// A read of the recipients file in progress, inside one transaction.
pub enum Import {
    Sqlite(sqlite::SqliteImport),
    Postgres(postgres::PgImport),
}

/// Runs the same call on whichever backend holds the state.
macro_rules! on_backend {
    ($value:expr, $ty:ident, $b:ident => $call:expr) => {
        match $value {
            $ty::Sqlite($b) => $call,
            $ty::Postgres($b) => $call,
        }
    };
}

impl Store {
    /// Opens (creating if needed) the SQLite file and runs the embedded migrations.
    pub async fn open(path: &Path) -> Result<Store> {
        Ok(Store::Sqlite(sqlite::SqliteStore::open(path).await?))
    }

    /// Connects to a PostgreSQL database and runs its embedded migrations.
    pub async fn open_postgres(url: &str) -> Result<Store> {
        Ok(Store::Postgres(postgres::PgStore::open(url).await?))
    }

    /// Renews this sender's lease (SQLite: the runner lock; PostgreSQL: its
    /// rows and its place among the workers, settling what dead workers
    /// left `sending`); returns how many rows became `unknown`.
    pub async fn heartbeat(&self, campaign_id: i64) -> Result<u64> {
        on_backend!(self, Store, b => b.heartbeat(campaign_id).await)
    }

    /// Creates the campaign's row on first use; a name another file owns is refused.
    pub async fn campaign(&self, id: &Identity) -> Result<CampaignRecord> {
        on_backend!(self, Store, b => b.campaign(id).await)
    }

    /// The campaign's row, if it was ever used; a name another file owns
    /// is refused.
    pub async fn find_campaign(&self, id: &Identity) -> Result<Option<CampaignRecord>> {
        on_backend!(self, Store, b => b.find_campaign(id).await)
    }

    /// Every campaign of the database, by name.
    pub async fn campaigns(&self) -> Result<Vec<CampaignSummary>> {
        on_backend!(self, Store, b => b.campaigns().await)
    }

    /// Forgets everything recorded for a campaign name, rehearsal included;
    /// refused while a live process sends it. Returns how many recipient
    /// rows were forgotten, or `None` if the name is unknown.
    pub async fn reset(&self, name: &str) -> Result<Option<u64>> {
        on_backend!(self, Store, b => b.reset(name).await)
    }

    /// Removes a campaign row that holds no recipients: `send --dry-run`
    /// and a send that failed before recording anything leave no trace
    /// of a campaign they saw first.
    pub async fn forget_if_empty(&self, campaign_id: i64) -> Result<()> {
        on_backend!(self, Store, b => b.forget_if_empty(campaign_id).await)
    }

    pub async fn set_fingerprint(&self, campaign_id: i64, fingerprint: &str) -> Result<()> {
        on_backend!(self, Store, b => b.set_fingerprint(campaign_id, fingerprint).await)
    }

    /// Records what the last complete check of the campaign's rows saw
    /// (`None`: the next `send` reads the file again).
    pub async fn set_checked(&self, campaign_id: i64, checked: Option<&str>) -> Result<()> {
        on_backend!(self, Store, b => b.set_checked(campaign_id, checked).await)
    }

    /// Whether the suppression list changed for the campaign's rows since
    /// they were read.
    pub async fn suppressions_changed(&self, campaign_id: i64) -> Result<bool> {
        on_backend!(self, Store, b => b.suppressions_changed(campaign_id).await)
    }

    /// Takes the campaign for this sender — SQLite: its runner lock, or says
    /// which live process has it; PostgreSQL: a place among its workers —
    /// creating its row in the same transaction if missing: a read-only
    /// command that forgets an empty row can never remove it between the two.
    pub async fn lock(&self, id: &Identity, token: &str) -> Result<CampaignRecord> {
        on_backend!(self, Store, b => b.lock(id, token).await)
    }

    pub async fn unlock(&self, campaign_id: i64, token: &str) -> Result<()> {
        on_backend!(self, Store, b => b.unlock(campaign_id, token).await)
    }

    /// Rows a dead runner left `sending` become `unknown` (SPEC §7.3).
    pub async fn settle_interrupted(&self, campaign_id: i64) -> Result<u64> {
        on_backend!(self, Store, b => b.settle_interrupted(campaign_id).await)
    }

    /// `unknown` rows go back to `pending` (`--resend-unknown`).
    pub async fn requeue_unknown(&self, campaign_id: i64) -> Result<u64> {
        on_backend!(self, Store, b => b.requeue_unknown(campaign_id).await)
    }

    /// `failed` rows whose address is not on the suppression list go back to
    /// `pending` for one more round (`--retry-failed`), attempts reset.
    pub async fn requeue_failed(&self, campaign_id: i64) -> Result<u64> {
        on_backend!(self, Store, b => b.requeue_failed(campaign_id).await)
    }

    /// How many rows `--retry-failed` would send again.
    pub async fn retryable_failed(&self, campaign_id: i64) -> Result<i64> {
        on_backend!(self, Store, b => b.retryable_failed(campaign_id).await)
    }

    /// Starts reading the recipients file into the store; nothing is visible
    /// to others until [`Import::commit`].
    pub async fn import(&self, into: ImportInto<'_>, columns: &[String]) -> Result<Import> {
        match self {
            Store::Sqlite(b) => Ok(Import::Sqlite(b.import(into, columns).await?)),
            Store::Postgres(b) => Ok(Import::Postgres(b.import(into, columns).await?)),
        }
    }

    /// Picks up to `max` recipients and, if the account's windows allow it
    /// now, marks them `sending` and logs their sends, committed before any
    /// of them is sent.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim(
        &self,
        campaign_id: i64,
        account: &str,
        pause_key: &str,
        windows: &[Window],
        now: i64,
        max: usize,
        build: impl Fn(&Candidate) -> std::result::Result<Outgoing, String>,
    ) -> Result<Claim> {
        self.claim_held(
            campaign_id,
            account,
            pause_key,
            windows,
            now,
            max,
            build,
            |_| None,
            &Skip::default(),
        )
        .await
    }

    /// [`Store::claim`], passing over recipients that `hold` says must wait
    /// (until when, and why: their domain's pacing, their own sending
    /// hours), so that one slow destination never holds up the others.
    /// `hold` is asked last, when the recipient would otherwise be claimed.
    ///
    /// The protocol is the same on both backends (SPEC §10):
    /// 1. recipients are picked for this worker (kept from the others: on
    ///    SQLite within the process, on PostgreSQL by `FOR UPDATE SKIP
    ///    LOCKED` and a short reservation) and their messages are rendered
    ///    and signed outside any database transaction, unless the account's
    ///    pause or next slot, read without a lock, says the send must wait;
    /// 2. one transaction, taken by one worker at a time for the account,
    ///    decides the slot again, marks `sending` the picked rows that are
    ///    still as they were picked and logs their sends, and is committed
    ///    (synced) before any of them is sent. A row another worker changed
    ///    in between is left to it, its message dropped.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_held(
        &self,
        campaign_id: i64,
        account: &str,
        pause_key: &str,
        windows: &[Window],
        now: i64,
        max: usize,
        build: impl Fn(&Candidate) -> std::result::Result<Outgoing, String>,
        mut hold: impl FnMut(&Candidate) -> Option<(i64, WaitReason)>,
        skip: &Skip,
    ) -> Result<Claim> {
        let gate = Gate {
            account,
            pause_key,
            windows,
            now,
        };
        // With windows, one at a time: each send needs its own slot.
        let want = if windows.is_empty() { max.max(1) } else { 1 };
        let mut picked = Picked::default();
        let mut passed_over = 0;
        let result = async {
            while picked.built.len() < want && passed_over < MAX_PASSED_OVER {
                let left = want - picked.built.len();
                // Not one picked already by this claim, held or not.
                let batch = on_backend!(self, Store, b => b.pick(campaign_id, now, &picked.ids, skip, left).await)?;
                if batch.is_empty() {
                    break;
                }
                if picked.ids.is_empty() {
                    // Something is due: nothing is built for a send that
                    // must wait anyway.
                    if let Some(wait) = on_backend!(self, Store, b => b.wait_before(&gate, 1).await)? {
                        picked.ids.extend(batch.iter().map(|c| c.id));
                        return Ok(wait);
                    }
                }
                for candidate in batch {
                    picked.ids.push(candidate.id);
                    let message = match build(&candidate) {
                        Ok(m) => m,
                        Err(why) => {
                            // The row was checked before the run; something
                            // changed since (an attachment removed): a
                            // campaign defect, not a bounce.
                            picked.unbuildable.push((candidate, why));
                            continue;
                        }
                    };
                    if let Some((until_ms, why)) = hold(&candidate) {
                        passed_over += 1;
                        if picked.held.as_ref().is_none_or(|(u, _)| until_ms < *u) {
                            picked.held = Some((until_ms, why));
                        }
                        continue;
                    }
                    picked.built.push((candidate, message));
                }
            }
            on_backend!(self, Store, b => b.take(campaign_id, &gate, &mut picked).await)
        }
        .await;
        on_backend!(self, Store, b => b.unpick(&picked.ids).await);
        result
    }

    /// When the account first sent, for its warm-up (SPEC §6b).
    pub async fn first_send(&self, account: &str) -> Result<Option<i64>> {
        on_backend!(self, Store, b => b.first_send(account).await)
    }

    /// Recipients the account sent to at or after `since_ms`.
    pub async fn recipients_since(&self, account: &str, since_ms: i64) -> Result<u64> {
        on_backend!(self, Store, b => b.recipients_since(account, since_ms).await)
    }

    /// When the campaign's state was created, Unix ms.
    pub async fn campaign_created_at(&self, campaign_id: i64) -> Result<Option<i64>> {
        on_backend!(self, Store, b => b.campaign_created_at(campaign_id).await)
    }

    /// The campaign's recipients whose message may have come back, among
    /// those named by `message_ids` or by `addresses`.
    pub async fn notice_rows(
        &self,
        campaign_id: i64,
        message_ids: &std::collections::HashSet<String>,
        addresses: &std::collections::HashSet<String>,
    ) -> Result<Vec<NoticeRow>> {
        on_backend!(self, Store, b => b.notice_rows(campaign_id, message_ids, addresses).await)
    }

    /// Records a bounce (and suppresses the address when `suppress`), once.
    pub async fn record_bounce(
        &self,
        id: i64,
        address: &str,
        status: &str,
        diagnostic: &str,
        suppress: bool,
        now: i64,
    ) -> Result<bool> {
        on_backend!(self, Store, b => b.record_bounce(id, address, status, diagnostic, suppress, now).await)
    }

    /// Notes a delayed delivery on a `sent` row's reason.
    pub async fn note_delay(&self, id: i64, note: &str) -> Result<bool> {
        on_backend!(self, Store, b => b.note_delay(id, note).await)
    }

    /// Every logged SMTP transaction of the campaign's recipients.
    pub async fn send_entries(
        &self,
        campaign_id: i64,
        visit: impl FnMut(SendEntry) -> Result<()>,
    ) -> Result<()> {
        on_backend!(self, Store, b => b.send_entries(campaign_id, visit).await)
    }

    /// Account pauses recorded for these accounts: (account, until, reason).
    pub async fn pauses(&self, accounts: &[String]) -> Result<Vec<(String, i64, String)>> {
        on_backend!(self, Store, b => b.pauses(accounts).await)
    }

    /// Records what happened to a claimed recipient.
    pub async fn record(
        &self,
        candidate: &Candidate,
        log_id: i64,
        outcome: &Outcome,
        now: i64,
    ) -> Result<()> {
        on_backend!(self, Store, b => b.record(candidate, log_id, outcome, now).await)
    }

    /// Returns once every outcome recorded so far is written (each
    /// backend writes outcomes together, a little after they are recorded).
    pub async fn flush(&self) -> Result<()> {
        on_backend!(self, Store, b => b.flush().await)
    }

    /// Pauses an account (by its pause key) for every process using this store.
    pub async fn pause_account(&self, account: &str, until_ms: i64, reason: &str) -> Result<()> {
        on_backend!(self, Store, b => b.pause_account(account, until_ms, reason).await)
    }

    /// Records that the account (by its pause key) refused the login and
    /// was set aside (SPEC §6b), with the server's reply.
    pub async fn set_aside(&self, account: &str, reason: &str, now: i64) -> Result<()> {
        on_backend!(self, Store, b => b.set_aside(account, reason, now).await)
    }

    /// The account logged in again: no longer set aside.
    pub async fn restore_account(&self, account: &str) -> Result<()> {
        on_backend!(self, Store, b => b.restore_account(account).await)
    }

    /// Since when, and why, the account is set aside, if it is.
    pub async fn set_aside_since(&self, account: &str) -> Result<Option<(i64, String)>> {
        on_backend!(self, Store, b => b.set_aside_since(account).await)
    }

    pub async fn account_pause(&self, account: &str, now: i64) -> Result<Option<(i64, String)>> {
        on_backend!(self, Store, b => b.account_pause(account, now).await)
    }

    /// The account's windows with the sends that count in them now.
    pub async fn schedule(&self, account: &str, windows: &[Window], now: i64) -> Result<Schedule> {
        on_backend!(self, Store, b => b.schedule(account, windows, now).await)
    }

    pub async fn counts(&self, campaign_id: i64) -> Result<Counts> {
        on_backend!(self, Store, b => b.counts(campaign_id).await)
    }

    /// The earliest retry time among deferred recipients.
    pub async fn next_retry(&self, campaign_id: i64) -> Result<Option<i64>> {
        on_backend!(self, Store, b => b.next_retry(campaign_id).await)
    }

    /// Every row for export, in file order; `visit` is called once per row.
    pub async fn export(
        &self,
        campaign_id: i64,
        state: Option<State>,
        visit: impl FnMut(ExportRow) -> Result<()>,
    ) -> Result<()> {
        on_backend!(self, Store, b => b.export(campaign_id, state, visit).await)
    }

    pub async fn suppress(&self, address: &str, reason: &str) -> Result<bool> {
        on_backend!(self, Store, b => b.suppress(address, reason).await)
    }

    /// Adds every address in one transaction: all of them or, on an
    /// error, none. Returns how many were not on the list yet.
    pub async fn suppress_all(&self, addresses: &[String], reason: &str) -> Result<u64> {
        on_backend!(self, Store, b => b.suppress_all(addresses, reason).await)
    }

    pub async fn unsuppress(&self, key: &str) -> Result<bool> {
        on_backend!(self, Store, b => b.unsuppress(key).await)
    }

    pub async fn suppressions(&self) -> Result<Vec<(String, String, i64)>> {
        on_backend!(self, Store, b => b.suppressions().await)
    }

    pub async fn close(&self) {
        on_backend!(self, Store, b => b.close().await)
    }
}

impl Import {
    /// Another live worker read the file: this one shares its sending
    /// without reading it again.
    pub fn joined(&self) -> bool {
        match self {
            Import::Sqlite(_) => false,
            Import::Postgres(b) => b.joined(),
        }
    }

    /// A row whose address is not valid: `skipped (invalid address)`.
    pub async fn invalid_row(
        &mut self,
        row_number: u64,
        email: &str,
        fields: &[String],
    ) -> Result<()> {
        self.rows(&[ImportRow {
            number: row_number,
            email,
            valid: None,
            fields,
        }])
        .await?;
        Ok(())
    }

    /// A row with a valid address: added as `pending` if new, refreshed if known.
    pub async fn row(
        &mut self,
        row_number: u64,
        email: &str,
        address: &str,
        key: &str,
        fields: &[String],
    ) -> Result<RowStatus> {
        let mut status = self
            .rows(&[ImportRow {
                number: row_number,
                email,
                valid: Some((address, key)),
                fields,
            }])
            .await?;
        Ok(status.pop().unwrap_or(RowStatus::Settled))
    }

    /// Rows of the file in file order, with what the store knows of each
    /// (a row whose address is not valid is `Settled`). A whole batch is
    /// read and written in a few statements, whatever its size.
    pub async fn rows(&mut self, rows: &[ImportRow<'_>]) -> Result<Vec<RowStatus>> {
        on_backend!(self, Import, b => b.rows(rows).await)
    }

    /// A row whose message cannot be built, with `--skip-invalid`.
    pub async fn skip_invalid_message(&mut self, id: i64, why: &str) -> Result<()> {
        on_backend!(self, Import, b => b.skip_invalid_message(id, why).await)
    }

    /// Rows that left the file and were never sent become `skipped (removed)`;
    /// then everything read becomes visible at once. Returns how many left.
    pub async fn commit(self) -> Result<u64> {
        on_backend!(self, Import, b => b.commit().await)
    }

    /// Leaves the store as it was (check, dry run, refused send).
    pub async fn rollback(self) -> Result<()> {
        on_backend!(self, Import, b => b.rollback().await)
    }

    /// Every row as it would be after commit, for `export`.
    pub async fn export(
        &mut self,
        state: Option<State>,
        visit: impl FnMut(ExportRow) -> Result<()>,
    ) -> Result<()> {
        on_backend!(self, Import, b => b.export(state, visit).await)
    }

    /// Counts per state as they would be after commit (for dry runs).
    pub async fn counts(&mut self) -> Result<Counts> {
        on_backend!(self, Import, b => b.counts().await)
    }
}

/// What the store knew of a key before a batch of the import.
pub(crate) struct Known {
    pub id: i64,
    pub seen_gen: i64,
    pub state: String,
    pub reason: Option<String>,
    pub row_number: i64,
}

/// How one row of a batch is written: `rows[row]` with `state` and
/// `reason`. `recipient` is false for a row that is not one (invalid
/// address, duplicate), stored under the key `row:N` without an address;
/// `new` rows are inserted under `id`, the others refresh row `id`.
pub(crate) struct Write {
    pub row: usize,
    pub id: i64,
    pub new: bool,
    pub recipient: bool,
    pub state: &'static str,
    pub reason: Option<String>,
}

/// The status of each row of a batch, in file order, and how each is
/// written, from what the store knew of its keys (`known`, which learns the
/// batch's rows) and which of them are suppressed. `next_id` hands out the
/// id of a new row. The same for every backend.
pub(crate) fn classify_rows(
    rows: &[ImportRow<'_>],
    known: &mut HashMap<String, Known>,
    suppressed: &HashSet<String>,
    generation: i64,
    mut next_id: impl FnMut() -> i64,
) -> (Vec<RowStatus>, Vec<Write>) {
    let mut statuses = Vec::with_capacity(rows.len());
    let mut writes = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let number = i64::try_from(row.number).unwrap_or(i64::MAX);
        let noise = |reason: SkipReason, id: i64| Write {
            row: i,
            id,
            new: true,
            recipient: false,
            state: "skipped",
            reason: Some(reason.to_text()),
        };
        let Some((_, key)) = row.valid else {
            writes.push(noise(SkipReason::InvalidAddress, next_id()));
            statuses.push(RowStatus::Settled);
            continue;
        };
        let is_suppressed = suppressed.contains(key);
        let Some(existing) = known.get_mut(key) else {
            let id = next_id();
            let (state, reason, status) = if is_suppressed {
                ("skipped", Some("suppressed".into()), RowStatus::Suppressed)
            } else {
                ("pending", None, RowStatus::ToSend { id })
            };
            writes.push(Write {
                row: i,
                id,
                new: true,
                recipient: true,
                state,
                reason,
            });
            // A later row of this batch with the same key is a duplicate.
            known.insert(
                key.to_string(),
                Known {
                    id,
                    seen_gen: generation,
                    state: state.to_string(),
                    reason: None,
                    row_number: number,
                },
            );
            statuses.push(status);
            continue;
        };
        if existing.seen_gen == generation {
            statuses.push(RowStatus::Duplicate {
                first_row: existing.row_number,
            });
            writes.push(noise(SkipReason::Duplicate, next_id()));
            continue;
        }
        let state = existing.state.as_str();
        // Rows skipped for a reason that may no longer hold are reconsidered.
        let reconsider = state == State::Skipped.as_str()
            && existing
                .reason
                .as_deref()
                .and_then(SkipReason::parse)
                .is_some_and(|r| r.reconsidered());
        let id = existing.id;
        let (state, reason, status) = match state {
            "pending" | "deferred" if is_suppressed => (
                "skipped",
                Some("suppressed".to_string()),
                RowStatus::Suppressed,
            ),
            "pending" => ("pending", existing.reason.clone(), RowStatus::ToSend { id }),
            "deferred" => (
                "deferred",
                existing.reason.clone(),
                RowStatus::ToSend { id },
            ),
            _ if reconsider && is_suppressed => (
                "skipped",
                Some("suppressed".to_string()),
                RowStatus::Suppressed,
            ),
            _ if reconsider => ("pending", None, RowStatus::ToSend { id }),
            _ => (
                State::from_str(state).map_or("skipped", State::as_str),
                existing.reason.clone(),
                RowStatus::Settled,
            ),
        };
        writes.push(Write {
            row: i,
            id,
            new: false,
            recipient: true,
            state,
            reason,
        });
        existing.seen_gen = generation;
        existing.row_number = number;
        statuses.push(status);
    }
    (statuses, writes)
}

/// What makes a database another program's (SPEC §11), in words: a table
/// hikyaku does not have, or a migration it does not know. `None`: it is
/// hikyaku's, or empty.
fn foreign(
    tables: &[String],
    ours: &[&str],
    versions: &[i64],
    migrator: &sqlx::migrate::Migrator,
) -> Option<String> {
    let others: Vec<&str> = tables
        .iter()
        .map(String::as_str)
        .filter(|t| !ours.contains(t))
        .collect();
    if !others.is_empty() {
        let mut named = others
            .iter()
            .take(3)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if others.len() > 3 {
            named.push_str(", ...");
        }
        return Some(format!("tables {named}"));
    }
    versions
        .iter()
        .find(|v| !migrator.iter().any(|m| m.version == **v))
        .map(|v| format!("a migration {v} hikyaku does not know"))
}

/// The refusal of another program's database, untouched.
fn refuse_foreign(shown: &str, kind: &str, what: &str) -> anyhow::Error {
    input_error(format!(
        "state database {shown} is another program's {kind} database ({what}); \
         hikyaku never writes to a database that is not its own: give another --db"
    ))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

/// Whether a process of ours still runs under that id. A recycled id held by
/// another program does not count.
fn process_alive(pid: i64) -> bool {
    if pid == i64::from(std::process::id()) {
        return true;
    }
    let proc_dir = Path::new("/proc");
    if !proc_dir.is_dir() {
        // No procfs: assume the holder lives rather than risk two runners.
        return true;
    }
    match std::fs::read(proc_dir.join(pid.to_string()).join("cmdline")) {
        Ok(cmdline) => {
            let stat = std::fs::read_to_string(proc_dir.join(pid.to_string()).join("stat"))
                .unwrap_or_default();
            // A zombie (state Z) has exited; its lock is free.
            let zombie = stat
                .rsplit(')')
                .next()
                .map(|s| s.trim_start().starts_with('Z'))
                .unwrap_or(false);
            !zombie && String::from_utf8_lossy(&cmdline).contains("hikyaku")
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reasons_read_back() {
        for r in [
            SkipReason::InvalidAddress,
            SkipReason::Duplicate,
            SkipReason::Suppressed,
            SkipReason::Removed,
            SkipReason::InvalidMessage("attachment a.pdf: not found".into()),
        ] {
            assert_eq!(SkipReason::parse(&r.to_text()), Some(r));
        }
        assert_eq!(SkipReason::parse("something else"), None);
    }

    #[test]
    fn counts_index_by_state_and_serialize_every_state() {
        let mut c = Counts::default();
        c[State::Sent] = 3;
        c[State::Skipped] = 1;
        assert_eq!(c.total(), 4);
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(json["sent"], 3);
        assert_eq!(json.as_object().unwrap().len(), State::ALL.len());
    }

    #[test]
    fn db_location() {
        assert_eq!(
            resolve_db(Some("sqlite:///tmp/x.db")).unwrap(),
            DbLocation::Sqlite {
                path: PathBuf::from("/tmp/x.db"),
                default: false
            }
        );
        let pg = resolve_db(Some("postgres://me:pa55@h:5432/db")).unwrap();
        assert_eq!(pg.shown(), "postgres://me:***@h:5432/db");
        assert!(matches!(
            resolve_db(None).unwrap(),
            DbLocation::Sqlite { default: true, .. }
        ));
    }

    #[test]
    fn passwords_in_urls_are_masked() {
        assert_eq!(
            mask_password("postgres://me:pa55@db.example:5432/x?sslmode=require"),
            "postgres://me:***@db.example:5432/x?sslmode=require"
        );
        assert_eq!(
            mask_password("postgres://db.example/x"),
            "postgres://db.example/x"
        );
        assert_eq!(
            mask_password("postgres://me@db.example/x"),
            "postgres://me@db.example/x"
        );
        assert_eq!(mask_password("/var/lib/x.db"), "/var/lib/x.db");
    }
}
