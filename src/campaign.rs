//! The campaign file (SPEC §2): parsed with serde + toml, unknown keys
//! rejected with their line, paths resolved against the file's folder, the
//! transport presets of SPEC §5 applied, and turned into ready-to-use values.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use serde::Deserialize;

use crate::bounded;
use crate::domains::Rate;
use crate::error::{cut, excerpt, input_error, quote};
use crate::limits::Window;
use crate::schedule::SendingHours;
use chrono_tz::Tz;

/// Environment variable read for the SMTP password when none is named.
pub const DEFAULT_PASSWORD_ENV: &str = "HIKYAKU_SMTP_PASSWORD";
/// More connections could leave more than 16 recipients `unknown` after a
/// crash, which SPEC §7.3 forbids.
pub const MAX_CONNECTIONS: usize = 16;
/// A campaign file is a page of settings; anything bigger is a mistake
/// (a CSV or a log given as the campaign) and is refused unread.
const MAX_CAMPAIGN_FILE_BYTES: u64 = 1024 * 1024;
/// A password, or a password file, is a line; a source that yields more
/// is not a password source.
const MAX_SECRET_BYTES: u64 = 64 * 1024;
/// How long `password_command` may take unless `password_command_timeout`
/// says otherwise: enough for a password manager to ask for an unlock.
const DEFAULT_PASSWORD_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest duration any key accepts: nothing a campaign waits for is
/// longer than a year, and anything longer overflows the times shown.
pub const MAX_DURATION: Duration = Window::MAX_PERIOD;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCampaign {
    name: String,
    recipients: RawRecipients,
    message: MessageSection,
    transport: Option<RawTransport>,
    #[serde(default)]
    accounts: Vec<RawAccount>,
    dkim: Option<RawDkim>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    retry: RawRetry,
    schedule: Option<RawSchedule>,
    imap: Option<RawImap>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    start_at: Option<String>,
    hours: Option<String>,
    days: Option<String>,
    timezone: Option<String>,
    timezone_column: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipients {
    file: PathBuf,
    email_column: Option<String>,
    encoding: Option<String>,
    delimiter: Option<String>,
}

/// The `[message]` section, kept as written: its serialised form is part of
/// the content fingerprint (SPEC §7.5).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MessageSection {
    pub from: String,
    pub reply_to: Option<String>,
    pub to_name: Option<String>,
    pub cc: Option<String>,
    pub bcc: Option<String>,
    pub subject: String,
    pub text: Option<PathBuf>,
    pub html: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    #[serde(default)]
    pub attachments: Vec<String>,
    pub list_unsubscribe: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransport {
    kind: Option<String>,
    preset: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    tls: Option<String>,
    username: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    password_command: Option<String>,
    password_command_timeout: Option<String>,
    ca_file: Option<PathBuf>,
    connections: Option<usize>,
    timeout: Option<String>,
    helo_name: Option<String>,
    auth: Option<String>,
    token_command: Option<String>,
    dir: Option<PathBuf>,
}

/// One `[[accounts]]` entry: the keys of `[transport]`, plus the account's
/// own `from`, DKIM and windows (SPEC §6b). Written out rather than
/// flattened, as serde's flatten cannot deny unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    kind: Option<String>,
    preset: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    tls: Option<String>,
    username: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    password_command: Option<String>,
    password_command_timeout: Option<String>,
    ca_file: Option<PathBuf>,
    connections: Option<usize>,
    timeout: Option<String>,
    helo_name: Option<String>,
    auth: Option<String>,
    token_command: Option<String>,
    from: Option<String>,
    dkim: Option<RawDkim>,
    per_second: Option<u32>,
    per_minute: Option<u32>,
    per_hour: Option<u32>,
    per_day: Option<u32>,
    windows: Option<Vec<RawWindow>>,
    warmup: Option<Vec<u32>>,
}

impl RawAccount {
    /// The `[transport]` part, and the account's windows over `[limits]`:
    /// a key the account gives wins, the others come from `[limits]`.
    fn split(
        self,
        limits: &RawLimits,
    ) -> (RawTransport, RawLimits, Option<String>, Option<RawDkim>) {
        let transport = RawTransport {
            kind: self.kind,
            preset: self.preset,
            host: self.host,
            port: self.port,
            tls: self.tls,
            username: self.username,
            password_env: self.password_env,
            password_file: self.password_file,
            password_command: self.password_command,
            password_command_timeout: self.password_command_timeout,
            ca_file: self.ca_file,
            connections: self.connections,
            timeout: self.timeout,
            helo_name: self.helo_name,
            auth: self.auth,
            token_command: self.token_command,
            dir: None,
        };
        let limits = RawLimits {
            per_second: self.per_second.or(limits.per_second),
            per_minute: self.per_minute.or(limits.per_minute),
            per_hour: self.per_hour.or(limits.per_hour),
            per_day: self.per_day.or(limits.per_day),
            windows: self.windows.or_else(|| limits.windows.clone()),
            warmup: self.warmup.or_else(|| limits.warmup.clone()),
            per_domain: None,
        };
        (transport, limits, self.from, self.dkim)
    }
}

/// `[imap]`: where `hikyaku bounces` reads the sending account's mailbox.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImap {
    host: Option<String>,
    port: Option<u16>,
    tls: Option<String>,
    user: Option<String>,
    folder: Option<String>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDkim {
    domain: String,
    selector: String,
    private_key_file: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    per_second: Option<u32>,
    per_minute: Option<u32>,
    per_hour: Option<u32>,
    per_day: Option<u32>,
    windows: Option<Vec<RawWindow>>,
    warmup: Option<Vec<u32>>,
    per_domain: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    max: u32,
    period: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    backoff: Option<String>,
}

/// A loaded, validated campaign.
#[derive(Debug, Clone)]
pub struct Campaign {
    pub name: String,
    /// The campaign file itself.
    pub path: PathBuf,
    /// The folder every relative path is resolved against.
    pub dir: PathBuf,
    pub recipients: RecipientsConfig,
    pub message: MessageSection,
    /// The first sending account's transport, DKIM, windows and warm-up
    /// (the only account without `[[accounts]]`); see [`Campaign::accounts`].
    pub transport: TransportConfig,
    pub dkim: Option<DkimConfig>,
    pub windows: Vec<Window>,
    /// Daily caps for an account's first days of sending (SPEC §6b).
    pub warmup: Vec<u32>,
    /// Every sending account, in the file's order: `[transport]` alone, or
    /// each `[[accounts]]` entry. Never empty.
    pub accounts: Vec<Account>,
    /// `[schedule] timezone_column`: the column holding each recipient's
    /// own zone, whose hours apply to that recipient.
    pub timezone_column: Option<String>,
    /// `[limits.per_domain]`: pacing per recipient domain, `"*"` for any other.
    pub per_domain: BTreeMap<String, Rate>,
    /// `[schedule]`: when messages may leave, on the clock of `timezone`.
    pub hours: Option<SendingHours>,
    pub timezone: Tz,
    pub retry: RetryConfig,
    /// The mailbox bounces come back to: `[imap]`, or Gmail's for the
    /// gmail and workspace presets; `None` when neither says.
    pub imap: Option<ImapConfig>,
}

/// One sending account (SPEC §6b): its server and credentials, the `from`
/// it sends as, its DKIM signature and its own windows.
#[derive(Debug, Clone)]
pub struct Account {
    pub transport: TransportConfig,
    /// Replaces `[message] from` for this account's messages.
    pub from: Option<String>,
    pub dkim: Option<DkimConfig>,
    pub windows: Vec<Window>,
    pub warmup: Vec<u32>,
    /// The account's mailbox, where its bounces come back (see
    /// [`Campaign::imap`]).
    pub imap: Option<ImapConfig>,
}

impl Account {
    /// The key of the send log and limits (see [`SmtpConfig::account`]).
    pub fn account(&self) -> String {
        match &self.transport {
            TransportConfig::Smtp(smtp) => smtp.account(),
            TransportConfig::File { dir } => format!("file:{}", dir.display()),
        }
    }

    /// The key of account pauses (see [`SmtpConfig::pause_key`]).
    pub fn pause_key(&self) -> String {
        match &self.transport {
            TransportConfig::Smtp(smtp) => smtp.pause_key(),
            TransportConfig::File { .. } => self.account(),
        }
    }
}

/// The sending account's mailbox (SPEC §2 `[imap]`).
#[derive(Debug, Clone)]
pub struct ImapConfig {
    pub host: String,
    pub port: u16,
    /// `Implicit` (port 993) or `StartTls` (port 143); never plain text.
    pub tls: TlsMode,
    pub user: String,
    /// The SMTP account's password source: the same account, the same
    /// password (for Gmail, the same app password).
    pub password: PasswordSource,
    /// `password` prints an OAuth 2 access token (`auth = "xoauth2"` in
    /// `[transport]`): log in with SASL XOAUTH2.
    pub xoauth2: bool,
    pub folder: String,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RecipientsConfig {
    pub file: PathBuf,
    pub email_column: String,
    pub encoding: &'static encoding_rs::Encoding,
    pub delimiter: u8,
}

#[derive(Debug, Clone)]
pub struct DkimConfig {
    pub domain: String,
    pub selector: String,
    pub private_key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub backoff: Duration,
}

impl RetryConfig {
    /// Delay before attempt `attempts + 1`: `backoff` doubled per attempt
    /// already made, capped at one hour (SPEC §2).
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(20);
        self.backoff
            .saturating_mul(factor)
            .min(Duration::from_secs(3600))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    StartTls,
    Implicit,
    None,
}

#[derive(Debug, Clone)]
pub enum TransportConfig {
    Smtp(SmtpConfig),
    File { dir: PathBuf },
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub username: Option<String>,
    pub password: PasswordSource,
    pub ca_file: Option<PathBuf>,
    pub connections: usize,
    pub timeout: Duration,
    /// The EHLO name; `None`: the machine's fully qualified name, or an
    /// address literal when it has none.
    pub helo_name: Option<lettre::transport::smtp::extension::ClientId>,
    /// `auth = "xoauth2"`: `password` is then the command that prints an
    /// OAuth 2 access token, run again when the server refuses the token.
    pub xoauth2: bool,
}

/// Where the SMTP password comes from. The password itself is read only when
/// the transport is built, and never kept in anything that is printed.
#[derive(Debug, Clone)]
pub enum PasswordSource {
    Env(String),
    File(PathBuf),
    /// A shell command, run in the campaign file's folder, stopped after
    /// `timeout`.
    Command {
        command: String,
        dir: PathBuf,
        timeout: Duration,
    },
}

/// A secret that prints as `***` in every `Debug` or `Display`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl PasswordSource {
    /// Where the password comes from, in words, for messages.
    pub fn describe(&self) -> String {
        match self {
            PasswordSource::Env(var) => format!("the environment variable {var} (password_env)"),
            PasswordSource::File(path) => format!("the file {} (password_file)", path.display()),
            PasswordSource::Command { .. } => "the output of password_command".to_string(),
        }
    }

    /// Reads the password; errors name the source, never the value, and
    /// never a setting that may be the password pasted in the wrong place.
    pub async fn read(&self) -> Result<Secret> {
        let value = match self {
            PasswordSource::Env(var) => {
                std::env::var(var).map_err(|_| input_error(unset_variable(var)))?
            }
            PasswordSource::File(path) => {
                bounded::read_to_string(path, MAX_SECRET_BYTES).map_err(|e| {
                    input_error(format!(
                        "[transport] password_file {}",
                        file_problem(path, &e)
                    ))
                })?
            }
            PasswordSource::Command {
                command,
                dir,
                timeout,
            } => run_password_command(command, dir, *timeout).await?,
        };
        let value = value.trim_end_matches(['\r', '\n']).to_string();
        if value.is_empty() {
            return Err(input_error("the SMTP password is empty"));
        }
        Ok(Secret(value))
    }
}

/// A name as environment variables are written by convention: a value
/// with lower-case letters that names no variable is more likely a
/// password pasted into `password_env` than a name.
fn conventional_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Whether `name` can name an environment variable at all.
fn valid_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn unset_variable(var: &str) -> String {
    if conventional_variable_name(var) {
        format!(
            "the SMTP password is read from the environment variable {var}, which is not set \
             (for Gmail, create an app password and export {var}=...)"
        )
    } else {
        "[transport] password_env names an environment variable that is not set; the name is not \
         shown because it does not look like one (upper-case letters, digits and _) and may be \
         the password itself: put the name of the variable there, and the password in that variable"
            .to_string()
    }
}

/// What is wrong with `password_file`. A file that does not exist and
/// whose name has no extension is not named: the value may be the
/// password, pasted into the wrong key.
fn file_problem(path: &Path, err: &bounded::FileError) -> String {
    let missing =
        matches!(err, bounded::FileError::Io(e) if e.kind() == std::io::ErrorKind::NotFound);
    let plain_name = path
        .file_name()
        .is_some_and(|n| !n.to_string_lossy().contains('.'));
    if missing && plain_name {
        "names a file that does not exist; the name is not shown because it may be the \
         password itself: put the path of a file holding the password there"
            .to_string()
    } else {
        format!("{}: {err}", path.display())
    }
}

/// Kills a command's whole process group when dropped, so that a shell's
/// children stop with it (on a time-out, or when the run is stopped).
struct KillGroup(Option<u32>);

impl KillGroup {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for KillGroup {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self
            .0
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Reads at most `max` bytes; `None` when there were more.
async fn read_at_most(
    stream: Option<impl tokio::io::AsyncRead + Unpin>,
    max: u64,
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    if let Some(stream) = stream {
        stream.take(max + 1).read_to_end(&mut bytes).await?;
    }
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}

/// Runs `password_command` with a time-out and a bound on what it prints.
/// Its stderr is shown only when it fails, and never when the shell could
/// not find the command: the command may then be the password itself.
async fn run_password_command(command: &str, dir: &Path, timeout: Duration) -> Result<String> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
        input_error(format!(
            "[transport] password_command: cannot start sh: {e}"
        ))
    })?;
    let mut group = KillGroup(child.id());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let run = async {
        let (out, err) = tokio::try_join!(
            read_at_most(stdout, MAX_SECRET_BYTES),
            read_at_most(stderr, MAX_SECRET_BYTES)
        )?;
        let status = match out {
            Some(_) => Some(child.wait().await?),
            None => None,
        };
        Ok::<_, std::io::Error>((status, out, err.unwrap_or_default()))
    };
    let (status, out, err) = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "[transport] password_command did not finish within {}; it was stopped \
                 (a slower command needs a longer password_command_timeout)",
                humantime::format_duration(timeout)
            )
        })?
        .map_err(|e| anyhow::anyhow!("[transport] password_command: {e}"))?;
    if status.is_some() {
        // It has ended and been reaped: its group id may soon be reused.
        group.disarm();
    }
    let (Some(status), Some(out)) = (status, out) else {
        // Still running, and killed with its group when `group` drops.
        return Err(input_error(format!(
            "[transport] password_command printed more than {}, which is no password",
            bounded::human_size(MAX_SECRET_BYTES)
        )));
    };
    if !status.success() {
        return Err(input_error(match status.code() {
            Some(code @ (126 | 127)) => format!(
                "[transport] password_command could not be run (exit status {code}: command not \
                 found or not executable); its text is not shown because it may be the password itself"
            ),
            _ => {
                let said = String::from_utf8_lossy(&err).replace(command, "***");
                let said = said.lines().map(str::trim).find(|l| !l.is_empty());
                match said {
                    Some(line) => format!(
                        "[transport] password_command failed ({status}): {}",
                        cut(line, 2 * crate::error::QUOTE_MAX)
                    ),
                    None => format!("[transport] password_command failed ({status})"),
                }
            }
        }));
    }
    String::from_utf8(out)
        .map_err(|_| input_error("[transport] password_command printed bytes that are not UTF-8"))
}

impl SmtpConfig {
    /// The account whose limits apply: `username@host`, or `host:port`
    /// without authentication (SPEC §6).
    pub fn account(&self) -> String {
        match &self.username {
            Some(user) => format!("{user}@{}", self.host),
            None => format!("{}:{}", self.host, self.port),
        }
    }

    /// What an account pause is kept under: the account and the server's
    /// port, so that a pause met on one server never holds another.
    pub fn pause_key(&self) -> String {
        match &self.username {
            Some(user) => format!("{user}@{}:{}", self.host, self.port),
            None => format!("{}:{}", self.host, self.port),
        }
    }
}

impl Campaign {
    /// The account key of the send log and limits (the first account's).
    pub fn account(&self) -> String {
        self.accounts[0].account()
    }

    /// The key of account pauses (see [`SmtpConfig::pause_key`]).
    pub fn pause_key(&self) -> String {
        self.accounts[0].pause_key()
    }

    /// The campaign as account `index` sends it: that account's transport,
    /// `from`, DKIM, windows and warm-up in place of the first account's,
    /// so that everything built for one account (its transport, its
    /// messages, its plan) is built from a campaign.
    pub fn for_account(&self, index: usize) -> Campaign {
        let mut campaign = self.clone();
        let Some(account) = self.accounts.get(index) else {
            return campaign;
        };
        if let Some(from) = &account.from {
            campaign.message.from = from.clone();
        }
        campaign.transport = account.transport.clone();
        campaign.dkim = account.dkim.clone();
        campaign.windows = account.windows.clone();
        campaign.warmup = account.warmup.clone();
        campaign.imap = account.imap.clone();
        campaign.accounts = vec![account.clone()];
        campaign
    }

    pub fn connections(&self) -> usize {
        match &self.transport {
            TransportConfig::Smtp(smtp) => smtp.connections,
            TransportConfig::File { .. } => 1,
        }
    }

    /// Loads and validates a campaign file. Every problem is an input error
    /// naming the file (and the line, where toml knows it).
    pub fn load(path: &Path) -> Result<Campaign> {
        // Absolute, so that the file transport's account and every message
        // about a path mean the same whatever folder hikyaku runs from.
        let path = &std::path::absolute(path)
            .map_err(|e| input_error(format!("campaign file {}: {e}", path.display())))?;
        let text = bounded::read_to_string(path, MAX_CAMPAIGN_FILE_BYTES).map_err(|e| {
            input_error(format!("cannot read campaign file {}: {e}", path.display()))
        })?;
        let raw: RawCampaign = toml::from_str(&text)
            .map_err(|e| input_error(format!("{}: {}", path.display(), toml_problem(&text, &e))))?;
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Campaign::from_raw(raw, path, dir)
            .map_err(|e| input_error(format!("{}: {e:#}", path.display())))
    }

    fn from_raw(raw: RawCampaign, path: &Path, dir: PathBuf) -> Result<Campaign> {
        if raw.name.trim().is_empty() {
            anyhow::bail!("`name` must not be empty");
        }
        let recipients = RecipientsConfig {
            file: dir.join(&raw.recipients.file),
            email_column: raw
                .recipients
                .email_column
                .unwrap_or_else(|| "email".to_string()),
            encoding: match raw.recipients.encoding.as_deref() {
                None => encoding_rs::UTF_8,
                Some(label) => encoding_rs::Encoding::for_label(label.trim().as_bytes())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "[recipients] encoding {} is not a known encoding label",
                            quote(label)
                        )
                    })?,
            },
            delimiter: match raw.recipients.delimiter.as_deref() {
                None => b',',
                Some("\\t") | Some("\t") => b'\t',
                Some(d) if d.len() == 1 => d.as_bytes()[0],
                Some(d) => {
                    anyhow::bail!(
                        "[recipients] delimiter must be one ASCII character, not {}",
                        quote(d)
                    )
                }
            },
        };
        let message = raw.message;
        if message.text.is_none() && message.html.is_none() && message.markdown.is_none() {
            anyhow::bail!("[message] needs at least one of `text`, `html` or `markdown`");
        }
        if message.markdown.is_some() && (message.text.is_some() || message.html.is_some()) {
            anyhow::bail!(
                "[message] `markdown` gives both parts: do not combine it with `text` or `html`"
            );
        }
        let dkim = raw.dkim.map(|d| dkim_config(d, &dir));
        let accounts = accounts(
            raw.transport,
            raw.accounts,
            &raw.limits,
            &dkim,
            raw.imap.as_ref(),
            &dir,
        )?;
        let first = accounts[0].clone();
        let timezone_column = raw
            .schedule
            .as_ref()
            .and_then(|s| s.timezone_column.clone());
        let (hours, timezone) = sending_hours(raw.schedule)?;
        let mut per_domain = BTreeMap::new();
        for (key, value) in raw.limits.per_domain.iter().flatten() {
            let domain = key.trim().trim_end_matches('.').to_ascii_lowercase();
            per_domain.insert(domain, Rate::parse(key, value)?);
        }
        let retry = RetryConfig {
            max_attempts: raw.retry.max_attempts.unwrap_or(5).max(1),
            backoff: match raw.retry.backoff {
                None => Duration::from_secs(60),
                Some(s) => parse_duration("[retry] backoff", &s)?,
            },
        };
        Ok(Campaign {
            name: raw.name,
            path: path.to_path_buf(),
            dir,
            recipients,
            message,
            transport: first.transport,
            dkim: first.dkim,
            windows: first.windows,
            warmup: first.warmup,
            accounts,
            timezone_column,
            per_domain,
            hours,
            timezone,
            retry,
            imap: first.imap,
        })
    }
}

fn dkim_config(raw: RawDkim, dir: &Path) -> DkimConfig {
    DkimConfig {
        domain: raw.domain,
        selector: raw.selector,
        private_key_file: dir.join(raw.private_key_file),
    }
}

fn preset_named(at: &str, name: Option<&str>) -> Result<Option<Preset>> {
    name.map(|name| {
        Preset::named(name).ok_or_else(|| {
            anyhow::anyhow!(
                "{at} unknown preset {} (known: gmail, workspace, workspace-relay)",
                quote(name)
            )
        })
    })
    .transpose()
}

/// The sending accounts: `[transport]` with `[limits]`, `[dkim]` and
/// `[imap]`, or every `[[accounts]]` entry over them. Each account's
/// mailbox is read as its own user, with its own password.
fn accounts(
    transport: Option<RawTransport>,
    raw_accounts: Vec<RawAccount>,
    limits: &RawLimits,
    dkim: &Option<DkimConfig>,
    raw_imap: Option<&RawImap>,
    dir: &Path,
) -> Result<Vec<Account>> {
    let warmup = |limits: &RawLimits, at: &str| {
        let warmup = limits.warmup.clone().unwrap_or_default();
        if warmup.contains(&0) {
            anyhow::bail!("{at} warmup: every day's cap must be at least 1");
        }
        Ok(warmup)
    };
    if raw_accounts.is_empty() {
        let raw = transport.ok_or_else(|| {
            anyhow::anyhow!("the campaign needs a [transport] section (or [[accounts]])")
        })?;
        let preset = preset_named("[transport]", raw.preset.as_deref())?;
        let transport = transport_config(raw, preset.as_ref(), dir, "[transport]")?;
        let account = Account {
            imap: imap_config(raw_imap.cloned(), preset.as_ref(), &transport, dir)?,
            transport,
            from: None,
            dkim: dkim.clone(),
            windows: windows(limits, preset.as_ref())?,
            warmup: warmup(limits, "[limits]")?,
        };
        return Ok(vec![account]);
    }
    if transport.is_some() {
        anyhow::bail!(
            "give either [transport] (one account) or [[accounts]] (several), not both: \
             move the [transport] keys into an [[accounts]] entry"
        );
    }
    if raw_imap.is_some_and(|i| i.user.is_some()) {
        anyhow::bail!(
            "[imap] user: with [[accounts]], each account's mailbox is read as its own username; \
             remove `user`"
        );
    }
    let mut out: Vec<Account> = Vec::new();
    for (i, raw) in raw_accounts.into_iter().enumerate() {
        let at = format!("[[accounts]] #{}", i + 1);
        let (raw, limits, from, own_dkim) = raw.split(limits);
        if raw.kind.as_deref().is_some_and(|k| k != "smtp") {
            anyhow::bail!(
                "{at} kind = {}: accounts send through SMTP; a rehearsal uses one \
                 [transport] with kind = \"file\"",
                quote(raw.kind.as_deref().unwrap_or(""))
            );
        }
        let preset = preset_named(&at, raw.preset.as_deref())?;
        let transport = if raw.kind.is_none() && preset.is_none() {
            transport_config(
                RawTransport {
                    kind: Some("smtp".into()),
                    ..raw
                },
                None,
                dir,
                &at,
            )?
        } else {
            transport_config(raw, preset.as_ref(), dir, &at)?
        };
        let account = Account {
            imap: imap_config(raw_imap.cloned(), preset.as_ref(), &transport, dir)?,
            transport,
            from,
            dkim: own_dkim
                .map(|d| dkim_config(d, dir))
                .or_else(|| dkim.clone()),
            windows: windows(&limits, preset.as_ref())?,
            warmup: warmup(&limits, &at)?,
        };
        if let Some(same) = out.iter().position(|a| a.account() == account.account()) {
            anyhow::bail!(
                "{at} is the same account as [[accounts]] #{} ({}): each account may appear once",
                same + 1,
                excerpt(&account.account())
            );
        }
        out.push(account);
    }
    Ok(out)
}

/// A TOML error on one line: where, what, and the text there, cut short.
/// toml's own rendering quotes the whole offending line, which may be
/// hundreds of kilobytes, or a password typed without quotes.
fn toml_problem(text: &str, err: &toml::de::Error) -> String {
    let what: Vec<&str> = err
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let what = cut(&what.join("; "), 2 * crate::error::QUOTE_MAX).into_owned();
    let Some(span) = err.span() else {
        return what;
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or("");
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_no = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("").trim_end();
    let key = line
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let secret = ["password", "token", "secret"]
        .iter()
        .any(|word| key.contains(word));
    if secret || line.trim().is_empty() {
        return format!("line {line_no}, column {column}: {what}");
    }
    // The part of the line around the error, as the error is where to look.
    let skip = column.saturating_sub(crate::error::QUOTE_MAX / 2 + 1);
    let shown: String = line.chars().skip(skip).collect();
    let lead = if skip > 0 { "…" } else { "" };
    format!(
        "line {line_no}, column {column}: {what}: {lead}{}",
        excerpt(&shown)
    )
}

/// A named account profile of SPEC §5.
struct Preset {
    host: &'static str,
    /// The account's mailbox, for `hikyaku bounces`.
    imap_host: Option<&'static str>,
    port: u16,
    tls: TlsMode,
    per_day: u32,
    per_minute: u32,
}

impl Preset {
    fn named(name: &str) -> Option<Preset> {
        let (host, imap_host, per_day, per_minute) = match name {
            "gmail" => ("smtp.gmail.com", Some("imap.gmail.com"), 500, 10),
            "workspace" => ("smtp.gmail.com", Some("imap.gmail.com"), 2000, 30),
            // The relay takes mail from servers, not from one mailbox.
            "workspace-relay" => ("smtp-relay.gmail.com", None, 10000, 120),
            _ => return None,
        };
        Some(Preset {
            host,
            imap_host,
            port: 587,
            tls: TlsMode::StartTls,
            per_day,
            per_minute,
        })
    }
}

/// A duration key's value, from more than zero up to [`MAX_DURATION`].
pub fn parse_duration(what: &str, text: &str) -> Result<Duration> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        anyhow::anyhow!(
            "{what}: {} is not a duration like \"500ms\", \"6s\", \"1m\", \"24h\" ({e})",
            quote(text)
        )
    })?;
    if d.is_zero() {
        anyhow::bail!("{what}: the duration must be greater than zero");
    }
    if d > MAX_DURATION {
        anyhow::bail!(
            "{what}: {} is longer than the longest duration hikyaku accepts, 366 days",
            quote(text)
        );
    }
    Ok(d)
}

fn transport_config(
    raw: RawTransport,
    preset: Option<&Preset>,
    dir: &Path,
    at: &str,
) -> Result<TransportConfig> {
    let kind = raw
        .kind
        .as_deref()
        .unwrap_or(if preset.is_some() { "smtp" } else { "" });
    match kind {
        "file" => {
            let dir = dir.join(raw.dir.unwrap_or_else(|| PathBuf::from("outbox")));
            Ok(TransportConfig::File { dir })
        }
        "smtp" => {
            if raw.dir.is_some() {
                anyhow::bail!("{at} `dir` belongs to kind = \"file\", not \"smtp\"");
            }
            let host = raw
                .host
                .or_else(|| preset.map(|p| p.host.to_string()))
                .ok_or_else(|| {
                    anyhow::anyhow!("{at} kind = \"smtp\" needs `host` (or a `preset`)")
                })?;
            let tls = match raw.tls.as_deref() {
                None => preset.map(|p| p.tls).unwrap_or(TlsMode::StartTls),
                Some("starttls") => TlsMode::StartTls,
                Some("tls") => TlsMode::Implicit,
                Some("none") => TlsMode::None,
                Some(other) => anyhow::bail!(
                    "{at} tls = {}: use \"starttls\", \"tls\" or \"none\"",
                    quote(other)
                ),
            };
            let port = raw.port.or(preset.map(|p| p.port)).unwrap_or(match tls {
                TlsMode::Implicit => 465,
                TlsMode::StartTls => 587,
                TlsMode::None => 25,
            });
            let sources = [
                raw.password_env.is_some(),
                raw.password_file.is_some(),
                raw.password_command.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() > 1 {
                anyhow::bail!(
                    "{at} give only one of password_env, password_file, password_command"
                );
            }
            let xoauth2 = match raw.auth.as_deref() {
                None | Some("password") => false,
                Some("xoauth2") => true,
                Some(other) => anyhow::bail!(
                    "{at} auth = {}: use \"password\" or \"xoauth2\"",
                    quote(other)
                ),
            };
            if xoauth2 && sources.iter().any(|s| *s) {
                anyhow::bail!(
                    "{at} auth = \"xoauth2\" takes its access token from token_command, \
                     not from password_env, password_file or password_command"
                );
            }
            if xoauth2 && raw.username.is_none() {
                anyhow::bail!(
                    "{at} auth = \"xoauth2\" needs `username`, the account the token is for"
                );
            }
            if raw.token_command.is_some() && !xoauth2 {
                anyhow::bail!("{at} token_command is for auth = \"xoauth2\", which is not set");
            }
            if raw.password_command_timeout.is_some()
                && raw.password_command.is_none()
                && raw.token_command.is_none()
            {
                anyhow::bail!(
                    "{at} password_command_timeout is for password_command, which is not set"
                );
            }
            let command_timeout = match raw.password_command_timeout {
                None => DEFAULT_PASSWORD_COMMAND_TIMEOUT,
                Some(t) => parse_duration(&format!("{at} password_command_timeout"), &t)?,
            };
            let password = if xoauth2 {
                let command = raw.token_command.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{at} auth = \"xoauth2\" needs token_command, a command that prints \
                         an OAuth 2 access token"
                    )
                })?;
                PasswordSource::Command {
                    command,
                    dir: dir.to_path_buf(),
                    timeout: command_timeout,
                }
            } else if let Some(file) = raw.password_file {
                PasswordSource::File(dir.join(file))
            } else if let Some(cmd) = raw.password_command {
                PasswordSource::Command {
                    command: cmd,
                    dir: dir.to_path_buf(),
                    timeout: command_timeout,
                }
            } else {
                let var = raw
                    .password_env
                    .unwrap_or_else(|| DEFAULT_PASSWORD_ENV.to_string());
                if !valid_variable_name(&var) {
                    anyhow::bail!(
                        "{at} password_env must be the name of an environment variable \
                         (letters, digits and _, such as {DEFAULT_PASSWORD_ENV}); the value is not \
                         shown because it may be the password itself"
                    );
                }
                PasswordSource::Env(var)
            };
            if tls == TlsMode::None && raw.username.is_some() && !is_loopback(&host) {
                anyhow::bail!(
                    "{at} tls = \"none\" with a username would send the password in clear text to {}; \
                     that is allowed only for a loopback host",
                    excerpt(&host)
                );
            }
            let connections = raw.connections.unwrap_or(1);
            if connections == 0 || connections > MAX_CONNECTIONS {
                anyhow::bail!("{at} connections must be between 1 and {MAX_CONNECTIONS}");
            }
            let timeout = match raw.timeout {
                None => Duration::from_secs(30),
                Some(t) => parse_duration(&format!("{at} timeout"), &t)?,
            };
            let helo_name = raw.helo_name.as_deref().map(helo_name).transpose()?;
            Ok(TransportConfig::Smtp(SmtpConfig {
                host,
                port,
                tls,
                username: raw.username,
                password,
                ca_file: raw.ca_file.map(|f| dir.join(f)),
                connections,
                timeout,
                helo_name,
                xoauth2,
            }))
        }
        "" => anyhow::bail!("{at} needs `kind` (\"smtp\" or \"file\") or a `preset`"),
        other => anyhow::bail!("{at} kind = {}: use \"smtp\" or \"file\"", quote(other)),
    }
}

/// `helo_name`: a domain name, or an address literal such as `[192.0.2.1]`.
fn helo_name(name: &str) -> Result<lettre::transport::smtp::extension::ClientId> {
    use lettre::transport::smtp::extension::ClientId;
    let name = name.trim();
    if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        let ip = inner.strip_prefix("IPv6:").unwrap_or(inner);
        return match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => Ok(ClientId::Ipv4(v4)),
            Ok(std::net::IpAddr::V6(v6)) => Ok(ClientId::Ipv6(v6)),
            Err(_) => anyhow::bail!(
                "[transport] helo_name {name:?} is not an address literal like \"[192.0.2.1]\""
            ),
        };
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        anyhow::bail!(
            "[transport] helo_name {name:?} is not a domain name like \"mail.acme.example\" \
             (letters, digits, hyphens and dots)"
        );
    }
    Ok(ClientId::Domain(name.to_string()))
}

/// `[schedule]`: its hours, and the zone they are read in (the machine's
/// unless `timezone` names one).
fn sending_hours(raw: Option<RawSchedule>) -> Result<(Option<SendingHours>, Tz)> {
    let Some(raw) = raw else {
        return Ok((None, crate::schedule::machine_zone()));
    };
    let zone = match raw.timezone.as_deref() {
        Some(name) => SendingHours::parse_zone(name)?,
        None => crate::schedule::machine_zone(),
    };
    let mut hours = SendingHours::default();
    if let Some(text) = raw.hours.as_deref() {
        (hours.opens, hours.closes) = SendingHours::parse_hours(text)?;
    }
    if let Some(text) = raw.days.as_deref() {
        hours.days = SendingHours::parse_days(text)?;
    }
    if let Some(text) = raw.start_at.as_deref() {
        hours.start_at = Some(SendingHours::parse_start_at(text)?);
    }
    Ok((Some(hours), zone))
}

/// `[imap]` with its defaults: the preset's mailbox server, the SMTP
/// username and password source, implicit TLS, INBOX.
fn imap_config(
    raw: Option<RawImap>,
    preset: Option<&Preset>,
    transport: &TransportConfig,
    dir: &Path,
) -> Result<Option<ImapConfig>> {
    let smtp = match transport {
        TransportConfig::Smtp(smtp) => Some(smtp),
        TransportConfig::File { .. } => None,
    };
    let preset_host = preset.and_then(|p| p.imap_host);
    let raw = match raw {
        Some(raw) => raw,
        None if preset_host.is_some() && smtp.is_some_and(|s| s.username.is_some()) => {
            RawImap::default()
        }
        None => return Ok(None),
    };
    let host = raw
        .host
        .or_else(|| preset_host.map(str::to_string))
        .ok_or_else(|| {
            anyhow::anyhow!("[imap] needs `host` (only the gmail and workspace presets imply one)")
        })?;
    let tls = match raw.tls.as_deref() {
        None | Some("tls") => TlsMode::Implicit,
        Some("starttls") => TlsMode::StartTls,
        Some(other) => anyhow::bail!(
            "[imap] tls = {other:?}: use \"tls\" (port 993) or \"starttls\" (port 143); the mailbox is never read in plain text"
        ),
    };
    let port = raw.port.unwrap_or(match tls {
        TlsMode::StartTls => 143,
        _ => 993,
    });
    let user = raw
        .user
        .or_else(|| smtp.and_then(|s| s.username.clone()))
        .ok_or_else(|| {
            anyhow::anyhow!("[imap] needs `user`: [transport] has no username to use")
        })?;
    let folder = raw.folder.unwrap_or_else(|| "INBOX".to_string());
    if folder.is_empty()
        || !folder
            .chars()
            .all(|c| c.is_ascii() && !c.is_ascii_control())
    {
        anyhow::bail!("[imap] folder {folder:?}: only non-empty ASCII folder names are supported");
    }
    Ok(Some(ImapConfig {
        host,
        port,
        tls,
        user,
        password: smtp.map_or_else(
            || PasswordSource::Env(DEFAULT_PASSWORD_ENV.to_string()),
            |s| s.password.clone(),
        ),
        xoauth2: smtp.is_some_and(|s| s.xoauth2),
        folder,
        ca_file: raw.ca_file.map(|f| dir.join(f)),
        timeout: smtp.map_or(Duration::from_secs(30), |s| s.timeout),
    }))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

fn windows(raw: &RawLimits, preset: Option<&Preset>) -> Result<Vec<Window>> {
    let mut out = Vec::new();
    let shorthand = [
        (raw.per_second, 1),
        (raw.per_minute.or(preset.map(|p| p.per_minute)), 60),
        (raw.per_hour, 3600),
        (raw.per_day.or(preset.map(|p| p.per_day)), 86_400),
    ];
    for (max, secs) in shorthand {
        if let Some(max) = max {
            out.push(Window::new(max, Duration::from_secs(secs))?);
        }
    }
    for w in raw.windows.iter().flatten() {
        out.push(Window::new(
            w.max,
            parse_duration("[limits] windows period", &w.period)?,
        )?);
    }
    out.sort_by_key(|w| w.period);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Campaign> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("campaign.toml");
        std::fs::write(&path, text).unwrap();
        Campaign::load(&path)
    }

    const BASE: &str = r#"
name = "t"
[recipients]
file = "r.csv"
[message]
from = "a@example.com"
subject = "hi"
text = "t.hbs"
"#;

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = load_str(&format!(
            "{BASE}[transport]\nkind = \"file\"\nfolder = \"x\"\n"
        ))
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("folder"), "{msg}");
        assert!(msg.contains("line 11"), "{msg}");
    }

    #[test]
    fn gmail_preset_fills_host_and_limits_and_keys_override() {
        let c = load_str(&format!(
            "{BASE}[transport]\npreset = \"gmail\"\nusername = \"me@gmail.com\"\n[limits]\nper_minute = 5\n"
        ))
        .unwrap();
        let TransportConfig::Smtp(smtp) = &c.transport else {
            panic!("smtp expected")
        };
        assert_eq!(
            (smtp.host.as_str(), smtp.port, smtp.tls),
            ("smtp.gmail.com", 587, TlsMode::StartTls)
        );
        assert_eq!(c.account(), "me@gmail.com@smtp.gmail.com");
        let w: Vec<(u32, u64)> = c
            .windows
            .iter()
            .map(|w| (w.max, w.period.as_secs()))
            .collect();
        assert_eq!(w, vec![(5, 60), (500, 86_400)]);
    }

    #[test]
    fn plaintext_auth_to_remote_host_is_refused() {
        let err = load_str(&format!(
            "{BASE}[transport]\nkind = \"smtp\"\nhost = \"mail.example.com\"\ntls = \"none\"\nusername = \"u\"\n"
        ))
        .unwrap_err();
        assert!(format!("{err:#}").contains("loopback"));
        load_str(&format!(
            "{BASE}[transport]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\ntls = \"none\"\nusername = \"u\"\n"
        ))
        .unwrap();
    }

    #[test]
    fn windows_general_form_and_periods() {
        let c = load_str(&format!(
            "{BASE}[transport]\nkind = \"file\"\n[limits]\nwindows = [{{ max = 5, period = \"6s\" }}, {{ max = 2, period = \"500ms\" }}]\n"
        ))
        .unwrap();
        let w: Vec<(u32, u128)> = c
            .windows
            .iter()
            .map(|w| (w.max, w.period.as_millis()))
            .collect();
        assert_eq!(w, vec![(2, 500), (5, 6000)]);
    }

    #[test]
    fn schedule_and_warmup_are_read_and_bad_values_named() {
        let c = load_str(&format!(
            "{BASE}[transport]\nkind = \"file\"\n[limits]\nwarmup = [50, 100]\n[schedule]\nhours = \"09:00-17:00\"\ndays = \"mon-fri\"\ntimezone = \"Europe/Berlin\"\nstart_at = \"2026-12-01T09:00\"\n"
        ))
        .unwrap();
        assert_eq!(c.warmup, vec![50, 100]);
        assert_eq!(c.timezone, chrono_tz::Europe::Berlin);
        let hours = c.hours.unwrap();
        assert_eq!(hours.days, [true, true, true, true, true, false, false]);
        assert!(hours.start_at.is_some());
        for (line, word) in [
            ("hours = \"9 to 5\"", "hours"),
            ("days = \"weekdays\"", "days"),
            ("timezone = \"Mars/Base\"", "timezone"),
            ("start_at = \"soon\"", "start_at"),
            ("every = \"day\"", "every"),
        ] {
            let err = load_str(&format!(
                "{BASE}[transport]\nkind = \"file\"\n[schedule]\n{line}\n"
            ))
            .unwrap_err();
            assert!(format!("{err:#}").contains(word), "{err:#}");
        }
        let err = load_str(&format!(
            "{BASE}[transport]\nkind = \"file\"\n[limits]\nwarmup = [0]\n"
        ))
        .unwrap_err();
        assert!(format!("{err:#}").contains("warmup"), "{err:#}");
    }

    #[test]
    fn xoauth2_needs_a_token_command_and_a_username_and_no_password() {
        let smtp = "[transport]\nkind = \"smtp\"\nhost = \"h\"\n";
        let c = load_str(&format!(
            "{BASE}{smtp}username = \"me@gmail.com\"\nauth = \"xoauth2\"\ntoken_command = \"oauth2l fetch\"\n"
        ))
        .unwrap();
        let TransportConfig::Smtp(cfg) = &c.transport else {
            panic!("smtp expected")
        };
        assert!(cfg.xoauth2);
        for (extra, word) in [
            ("username = \"u\"\nauth = \"xoauth2\"\n", "token_command"),
            ("auth = \"xoauth2\"\ntoken_command = \"t\"\n", "username"),
            (
                "username = \"u\"\nauth = \"xoauth2\"\ntoken_command = \"t\"\npassword_env = \"P\"\n",
                "password_env",
            ),
            ("username = \"u\"\ntoken_command = \"t\"\n", "xoauth2"),
            ("auth = \"kerberos\"\n", "auth"),
        ] {
            let err = load_str(&format!("{BASE}{smtp}{extra}")).unwrap_err();
            assert!(format!("{err:#}").contains(word), "{err:#}");
        }
    }

    #[test]
    fn accounts_each_have_their_server_from_dkim_and_windows() {
        let c = load_str(&format!(
            "{BASE}[dkim]\ndomain = \"acme.example\"\nselector = \"s\"\nprivate_key_file = \"k.pem\"\n\
             [limits]\nper_minute = 5\nwarmup = [10]\n\
             [[accounts]]\npreset = \"gmail\"\nusername = \"news1@gmail.com\"\nfrom = \"News <news1@gmail.com>\"\npassword_env = \"NEWS1\"\n\
             [[accounts]]\nhost = \"smtp.acme.example\"\nusername = \"u\"\nper_day = 2000\nwarmup = [50, 100]\n\
             dkim = {{ domain = \"other.example\", selector = \"t\", private_key_file = \"o.pem\" }}\n"
        ))
        .unwrap();
        assert_eq!(c.accounts.len(), 2);
        let windows = |i: usize| -> Vec<(u32, u64)> {
            c.accounts[i]
                .windows
                .iter()
                .map(|w| (w.max, w.period.as_secs()))
                .collect()
        };
        // [limits] per_minute wins over the preset's; the preset's per_day stays.
        assert_eq!(windows(0), vec![(5, 60), (500, 86_400)]);
        assert_eq!(windows(1), vec![(5, 60), (2000, 86_400)]);
        assert_eq!(c.accounts[0].warmup, vec![10]);
        assert_eq!(c.accounts[1].warmup, vec![50, 100]);
        assert_eq!(c.accounts[0].account(), "news1@gmail.com@smtp.gmail.com");
        assert_eq!(c.accounts[1].account(), "u@smtp.acme.example");
        assert_eq!(c.account(), "news1@gmail.com@smtp.gmail.com");
        let second = c.for_account(1);
        assert_eq!(second.message.from, "a@example.com");
        assert_eq!(second.dkim.as_ref().unwrap().domain, "other.example");
        assert_eq!(second.account(), "u@smtp.acme.example");
        assert!(
            second.imap.is_none(),
            "no preset, no [imap]: no mailbox known"
        );
        let first = c.for_account(0);
        assert_eq!(first.message.from, "News <news1@gmail.com>");
        assert_eq!(first.dkim.as_ref().unwrap().domain, "acme.example");
        assert_eq!(first.imap.unwrap().user, "news1@gmail.com");

        for (accounts, words) in [
            (
                "[transport]\nkind = \"file\"\n[[accounts]]\nhost = \"h\"\n",
                &["not both"][..],
            ),
            (
                "[[accounts]]\nhost = \"h\"\nusername = \"u\"\n[[accounts]]\nhost = \"h\"\nusername = \"u\"\n",
                &["#2", "same account"][..],
            ),
            (
                "[[accounts]]\nhost = \"h\"\n[[accounts]]\nkind = \"file\"\n",
                &["#2", "file"][..],
            ),
            (
                "[[accounts]]\nhost = \"h\"\n[[accounts]]\nhost = \"h2\"\ntls = \"ssl\"\n",
                &["[[accounts]] #2 tls"][..],
            ),
            ("[[accounts]]\nhost = \"h\"\nfolder = \"x\"\n", &["folder"][..]),
            ("", &["[transport]"][..]),
        ] {
            let err = load_str(&format!("{BASE}{accounts}")).unwrap_err();
            let msg = format!("{err:#}");
            for word in words {
                assert!(msg.contains(word), "{word}: {msg}");
            }
        }
    }

    #[test]
    fn backoff_doubles_and_caps_at_one_hour() {
        let r = RetryConfig {
            max_attempts: 5,
            backoff: Duration::from_secs(60),
        };
        assert_eq!(r.delay_after(1), Duration::from_secs(60));
        assert_eq!(r.delay_after(2), Duration::from_secs(120));
        assert_eq!(r.delay_after(3), Duration::from_secs(240));
        assert_eq!(r.delay_after(30), Duration::from_secs(3600));
    }

    #[test]
    fn toml_errors_are_one_short_line_and_never_quote_a_password() {
        let err = load_str(&format!("name = \"x\"\njunk = {}\n", "[".repeat(100_000))).unwrap_err();
        let msg = format!("{err:#}");
        assert!(!msg.contains('\n') && msg.len() < 700, "{msg}");
        assert!(msg.contains("line 2, column"), "{msg}");
        let err = load_str(&format!(
            "{BASE}[transport]\nkind = \"smtp\"\npassword_env = abcd efgh\n"
        ))
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("line 11") && !msg.contains("abcd"), "{msg}");
    }

    #[test]
    fn a_password_env_that_names_no_variable_is_refused_unshown() {
        let err = load_str(&format!(
            "{BASE}[transport]\nkind = \"smtp\"\nhost = \"h\"\npassword_env = \"abcd efgh ijkl\"\n"
        ))
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("password_env") && !msg.contains("abcd"),
            "{msg}"
        );
        assert!(conventional_variable_name("HIKYAKU_SMTP_PASSWORD2"));
        assert!(!conventional_variable_name("abcdefghijklmnop"));
        assert!(valid_variable_name("smtp_pass") && !valid_variable_name("1abc"));
    }

    #[tokio::test]
    async fn an_unset_variable_with_a_password_like_name_is_not_named() {
        let err = PasswordSource::Env("qwertyuiopasdfgh".into())
            .read()
            .await
            .unwrap_err();
        assert!(!err.to_string().contains("qwerty"), "{err}");
        let err = PasswordSource::Env("HIKYAKU_TEST_UNSET_VARIABLE".into())
            .read()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("HIKYAKU_TEST_UNSET_VARIABLE"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_password_command_is_stopped_at_its_time_out() {
        let source = PasswordSource::Command {
            command: "sleep 30".into(),
            dir: PathBuf::from("."),
            timeout: Duration::from_millis(200),
        };
        let started = std::time::Instant::now();
        let err = source.read().await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("200ms"), "{err}");
        let source = PasswordSource::Command {
            command: "printf 'pw\\n'".into(),
            dir: PathBuf::from("."),
            timeout: Duration::from_secs(10),
        };
        assert_eq!(source.read().await.unwrap().expose(), "pw");
    }

    #[test]
    fn helo_name_is_a_domain_or_an_address_literal() {
        assert_eq!(
            helo_name("mail.acme.example").unwrap().to_string(),
            "mail.acme.example"
        );
        assert_eq!(helo_name("[192.0.2.1]").unwrap().to_string(), "[192.0.2.1]");
        assert_eq!(
            helo_name("[IPv6:2001:db8::1]").unwrap().to_string(),
            "[IPv6:2001:db8::1]"
        );
        for bad in ["", "mail acme", "a..b", "[nope]", "x\r\nMAIL FROM:<a@b>"] {
            assert!(helo_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pauses_are_kept_per_server_port() {
        let c = load_str(&format!(
            "{BASE}[transport]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = 2525\ntls = \"none\"\nusername = \"u\"\n"
        ))
        .unwrap();
        assert_eq!(c.account(), "u@127.0.0.1");
        assert_eq!(c.pause_key(), "u@127.0.0.1:2525");
    }

    #[test]
    fn imap_defaults_to_gmail_for_the_gmail_preset_with_the_smtp_account() {
        let c = load_str(&format!(
            "{BASE}[transport]\npreset = \"gmail\"\nusername = \"me@gmail.com\"\npassword_env = \"MY_PW\"\n"
        ))
        .unwrap();
        let imap = c.imap.expect("gmail implies its mailbox");
        assert_eq!(
            (
                imap.host.as_str(),
                imap.port,
                imap.tls,
                imap.user.as_str(),
                imap.folder.as_str()
            ),
            (
                "imap.gmail.com",
                993,
                TlsMode::Implicit,
                "me@gmail.com",
                "INBOX"
            )
        );
        assert!(matches!(imap.password, PasswordSource::Env(v) if v == "MY_PW"));
    }

    #[test]
    fn imap_keys_override_and_an_unknown_server_has_no_default() {
        let c = load_str(&format!(
            "{BASE}[transport]\nkind = \"smtp\"\nhost = \"smtp.acme.example\"\nusername = \"u\"\n\
             [imap]\nhost = \"imap.acme.example\"\ntls = \"starttls\"\nfolder = \"Bounces\"\nca_file = \"ca.pem\"\n"
        ))
        .unwrap();
        let imap = c.imap.unwrap();
        assert_eq!(
            (imap.port, imap.tls, imap.user.as_str()),
            (143, TlsMode::StartTls, "u")
        );
        assert!(imap.ca_file.unwrap().ends_with("ca.pem"));
        let none = load_str(&format!(
            "{BASE}[transport]\nkind = \"smtp\"\nhost = \"smtp.acme.example\"\n"
        ))
        .unwrap();
        assert!(none.imap.is_none());
        let err = load_str(&format!(
            "{BASE}[transport]\nkind = \"smtp\"\nhost = \"h\"\n[imap]\nhost = \"i\"\ntls = \"none\"\n"
        ))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("never read in plain text"),
            "{err:#}"
        );
    }

    #[test]
    fn secret_debug_hides_value() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "***");
    }
}
