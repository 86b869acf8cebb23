//! Shared helpers of the end-to-end tests: a real SMTP server (the
//! fault-injecting Python server in tests/support), campaign folders in
//! temporary directories, and the real `hikyaku` binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

pub mod imap;

/// The `[transport]` section writing `.eml` files into `outbox/`.
pub const FILE_TRANSPORT: &str = "[transport]\nkind = \"file\"\n";

pub const USER: &str = "sender@acme.example";
pub const PASSWORD: &str = "s3cret-app-passw0rd";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hikyaku")
}

/// Installs the Python packages of tests/support (the SMTP server, DKIM
/// verifier) once, if they are missing, so that `cargo test` alone works on
/// a fresh machine with python3 and pip.
pub fn ensure_python_packages() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let present = Command::new("python3")
            .args(["-c", "import aiosmtpd, trustme, dkim, nacl"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            let requirements =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/requirements.txt");
            let status = Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    // CI containers run as root; pip's advice against it
                    // would read as a failure in the test output.
                    "--root-user-action=ignore",
                    "-r",
                ])
                .arg(requirements)
                .status()
                .expect("python3 must be installed for the end-to-end tests");
            assert!(
                status.success(),
                "pip install -r tests/support/requirements.txt failed"
            );
        }
    });
}

/// A running SMTP test server; killed when dropped.
pub struct SmtpServer {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
    pub ca: Option<PathBuf>,
    record: PathBuf,
    /// The server's standard error, shown with the output of a test that
    /// fails and kept out of the suite's output otherwise.
    log: PathBuf,
    args: Vec<String>,
}

/// One message the server accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub data: Vec<u8>,
    pub received_at: f64,
    /// The client's EHLO argument.
    pub helo: String,
    /// False when the server stored the message and then dropped the
    /// connection without replying (`--store-then-drop-rate`).
    pub replied: bool,
    /// The user the client logged in as.
    pub user: Option<String>,
    /// Whether RCPT and DATA had arrived before MAIL FROM was answered
    /// (PIPELINING, which the server offers unless `--no-pipelining`).
    pub pipelined: bool,
}

impl Received {
    pub fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(&self.data)
            .expect("the server received a message mail-parser cannot parse")
    }
}

impl SmtpServer {
    /// Starts the server with STARTTLS and AUTH, plus `extra` arguments.
    pub fn start(extra: &[&str]) -> SmtpServer {
        let mut args = vec!["--tls", "starttls", "--user", USER, "--password", PASSWORD];
        args.extend_from_slice(extra);
        SmtpServer::start_raw(&args)
    }

    pub fn start_raw(args: &[&str]) -> SmtpServer {
        ensure_python_packages();
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("record.jsonl");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let log = dir.path().join("stderr.log");
        let (child, port, ca) = SmtpServer::spawn(dir.path(), &record, &log, &args);
        SmtpServer {
            child,
            port,
            ca,
            record,
            log,
            args,
            _dir: dir,
        }
    }

    /// Kills the server (an outage); [`SmtpServer::restart`] brings it back.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, recording into the same
    /// log. Returns once it listens.
    pub fn restart(&mut self) {
        self.stop();
        let mut args = self.args.clone();
        args.extend(["--port".to_string(), self.port.to_string()]);
        let dir = self._dir.path().to_path_buf();
        let (child, port, _) = SmtpServer::spawn(&dir, &self.record, &self.log, &args);
        assert_eq!(port, self.port);
        self.child = child;
    }

    fn spawn(
        dir: &Path,
        record: &Path,
        log: &Path,
        args: &[String],
    ) -> (Child, u16, Option<PathBuf>) {
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_server.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--record")
            .arg(record)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .expect("python3 must be installed to run the SMTP test server");
        let deadline = Instant::now() + Duration::from_secs(30);
        let info: serde_json::Value = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str(&text) {
                    break v;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the SMTP test server exited with {status}; install its requirements: \
                     pip install -r tests/support/requirements.txt"
                );
            }
            assert!(
                Instant::now() < deadline,
                "the SMTP test server did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        (
            child,
            info["port"].as_u64().unwrap() as u16,
            info["ca"].as_str().map(PathBuf::from),
        )
    }

    /// What the server printed on standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every message accepted so far, in order. A line the server is still
    /// writing (a long one takes several writes) is not read yet.
    pub fn received(&self) -> Vec<Received> {
        let text = std::fs::read_to_string(&self.record).unwrap_or_default();
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n') && !l.trim().is_empty())
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                Received {
                    mail_from: v["mail_from"].as_str().unwrap().to_string(),
                    rcpt_tos: v["rcpt_tos"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_string())
                        .collect(),
                    data: base64::engine::general_purpose::STANDARD
                        .decode(v["data_b64"].as_str().unwrap())
                        .unwrap(),
                    received_at: v["received_at"].as_f64().unwrap(),
                    helo: v["helo"].as_str().unwrap_or_default().to_string(),
                    replied: v["replied"].as_bool().unwrap_or(true),
                    user: v["user"].as_str().map(str::to_string),
                    pipelined: v["pipelined"].as_bool().unwrap_or(false),
                }
            })
            .collect()
    }

    /// How many messages each recipient address received.
    pub fn deliveries(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in self.received() {
            for to in r.rcpt_tos {
                *counts.entry(to.to_lowercase()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// An `[[accounts]]` entry that reaches this server as `user`, its
    /// password in the environment variable `password_env`.
    pub fn account_toml(&self, user: &str, password_env: &str, extra: &str) -> String {
        let ca = self.ca.as_ref().expect("server without TLS");
        format!(
            "[[accounts]]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\n\
             username = \"{user}\"\npassword_env = \"{password_env}\"\nca_file = \"{}\"\n\
             timeout = \"10s\"\n{extra}\n",
            self.port,
            ca.display()
        )
    }

    /// The `[transport]` section that reaches this server.
    pub fn transport_toml(&self, extra: &str) -> String {
        let ca = self.ca.as_ref().expect("server without TLS");
        format!(
            "[transport]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\n\
             username = \"{USER}\"\nca_file = \"{}\"\ntimeout = \"10s\"\n{extra}\n",
            self.port,
            ca.display()
        )
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Captured by the test harness: printed only if the test failed.
        let log = self.log();
        if !log.is_empty() {
            eprint!("SMTP test server's stderr:\n{log}");
        }
    }
}

/// A campaign folder in a temporary directory with its own state database.
pub struct CampaignDir {
    pub dir: tempfile::TempDir,
    /// A database URL (PostgreSQL) instead of the folder's SQLite file.
    pub db_url: Option<String>,
}

impl CampaignDir {
    pub fn new() -> CampaignDir {
        CampaignDir {
            dir: tempfile::tempdir().unwrap(),
            db_url: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> &Self {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
        self
    }

    pub fn campaign(&self) -> PathBuf {
        self.dir.path().join("campaign.toml")
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("state.db")
    }

    /// Runs `hikyaku` with this folder's database and the test password.
    pub fn run(&self, args: &[&str]) -> Output {
        output(&mut self.command(args))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        match &self.db_url {
            Some(url) => cmd.arg("--db").arg(url),
            None => cmd.arg("--db").arg(self.db()),
        };
        cmd.args(args)
            .env("HIKYAKU_SMTP_PASSWORD", PASSWORD)
            .env_remove("HIKYAKU_DB")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// `hikyaku send [extra] campaign.toml`, not yet run.
    pub fn send_command(&self, extra: &[&str]) -> Command {
        let campaign = self.campaign();
        let mut args = vec!["send"];
        args.extend_from_slice(extra);
        args.push(campaign.to_str().unwrap());
        self.command(&args)
    }

    /// Runs `hikyaku send [extra] campaign.toml`.
    pub fn send(&self, extra: &[&str]) -> Output {
        output(&mut self.send_command(extra))
    }

    /// Runs `hikyaku check campaign.toml`.
    pub fn check(&self) -> Output {
        self.run(&["check", self.campaign().to_str().unwrap()])
    }

    /// `status --json` as a value.
    pub fn status(&self) -> serde_json::Value {
        let out = self.run(&["status", "--json", self.campaign().to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "status failed: {}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The names of the campaigns the database holds (`hikyaku campaigns`):
    /// empty when a command recorded nothing. (`status` of a campaign never
    /// sent shows the file's rows without recording them.)
    pub fn recorded(&self) -> Vec<String> {
        let out = self.run(&["campaigns", "--json"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "campaigns failed: {}",
            text(&out.stderr)
        );
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|c| c["campaign"].as_str().unwrap().to_string())
            .collect()
    }

    /// Every row still `pending` with no attempt counted: a run that
    /// stopped before any transaction changed nothing.
    pub fn assert_untouched(&self) {
        let rows = self.export(None);
        assert!(
            rows.iter()
                .all(|r| r["state"] == "pending" && r["attempts"] == "0"),
            "{rows:?}"
        );
    }

    /// `export` parsed: one map per row.
    pub fn export(&self, state: Option<&str>) -> Vec<HashMap<String, String>> {
        let campaign = self.campaign();
        let mut args = vec!["export", campaign.to_str().unwrap()];
        if let Some(s) = state {
            args.extend(["--state", s]);
        }
        let out = self.run(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "export failed: {}",
            text(&out.stderr)
        );
        let mut reader = csv::Reader::from_reader(out.stdout.as_slice());
        let headers = reader.headers().unwrap().clone();
        reader
            .records()
            .map(|r| {
                let r = r.unwrap();
                headers
                    .iter()
                    .zip(r.iter())
                    .map(|(h, v)| (h.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }
}

/// Runs the binary to its end; see [`no_panic`].
pub fn output(cmd: &mut Command) -> Output {
    no_panic(cmd.output().unwrap())
}

/// Waits for a spawned binary; see [`no_panic`].
pub fn finish(child: Child) -> Output {
    no_panic(child.wait_with_output().unwrap())
}

/// Fails the test if the binary panicked (SPEC §11), even in a thread that
/// did not change its exit code. Every run of the binary goes through here.
pub fn no_panic(out: Output) -> Output {
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !said.contains("panicked") && out.status.code() != Some(101),
        "hikyaku panicked ({}): {said}",
        out.status
    );
    out
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Recipients `user1@example.com`..`userN@example.com` with a first name.
pub fn recipients_csv(n: usize) -> String {
    let mut csv = String::from("email,first_name,city\n");
    for i in 1..=n {
        csv.push_str(&format!("user{i}@example.com,Name{i},City{i}\n"));
    }
    csv
}

/// A campaign with text + HTML templates and the given transport section.
pub fn standard_campaign(dir: &CampaignDir, recipients: &str, transport: &str, extra_toml: &str) {
    dir.write("recipients.csv", recipients)
        .write("templates/body.txt.hbs", "Hello {{first_name}} from {{city}}!\n{{> sig}}\n")
        .write("templates/body.html.hbs", "<p>Hello <b>{{first_name}}</b> from {{city}}!</p>\n{{> sig}}\n")
        .write("templates/partials/sig.hbs", "-- Acme\n")
        .write(
            "campaign.toml",
            format!(
                "name = \"test-campaign\"\n{extra_toml}\n[recipients]\nfile = \"recipients.csv\"\n\n[message]\n\
                 from = \"Acme <news@acme.example>\"\nsubject = \"{{{{first_name}}}}, your update\"\n\
                 text = \"templates/body.txt.hbs\"\nhtml = \"templates/body.html.hbs\"\n\n{transport}"
            ),
        );
}
