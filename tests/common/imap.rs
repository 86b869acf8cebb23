//! A real IMAP server for the end-to-end tests: Dovecot from the
//! distribution's packages, started as a foreground process with its own
//! configuration, users and maildir in a temporary folder, TLS with a
//! certificate made for the test (trustme), on free ports.

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ensure_python_packages;

/// A running Dovecot; stopped when dropped.
pub struct ImapServer {
    child: Child,
    dir: tempfile::TempDir,
    /// Implicit TLS.
    pub port: u16,
    /// Plain text until STARTTLS.
    pub starttls_port: u16,
    pub ca: PathBuf,
    /// The owner of the mail files when the tests run as root (Dovecot
    /// will not serve mail as root).
    owner: Option<(u32, u32)>,
}

/// `HIKYAKU_REQUIRE_IMAP=1` (CI) makes a missing Dovecot a failure.
fn required() -> bool {
    std::env::var("HIKYAKU_REQUIRE_IMAP").is_ok_and(|v| v == "1")
}

fn dovecot_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("dovecot"))
        .find(|p| p.is_file())
}

/// Says on the terminal (not in captured output) that a test was skipped.
pub fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr().lock(), "skipped {test}: {why}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

fn output_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// uid and gid of a system user, from /etc/passwd.
fn system_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

impl ImapServer {
    /// Starts Dovecot with one user, or returns `None` after saying so
    /// when it is not installed (a failure with `HIKYAKU_REQUIRE_IMAP=1`).
    pub fn start(test: &str, user: &str, password: &str) -> Option<ImapServer> {
        let Some(dovecot) = dovecot_binary() else {
            assert!(
                !required(),
                "HIKYAKU_REQUIRE_IMAP=1 but dovecot is not installed (apt-get install dovecot-imapd)"
            );
            skip(
                test,
                "dovecot is not installed (apt-get install dovecot-imapd)",
            );
            return None;
        };
        ensure_python_packages();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let root = output_of("id", &["-u"]) == "0";
        // As root, Dovecot runs its login processes and the user's mail
        // processes as its own unprivileged users, which must reach the
        // temporary folder.
        let (internal, group, login, owner) = if root {
            let owner = system_user("dovecot").expect("the dovecot package creates a dovecot user");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            (
                "dovecot".into(),
                "dovecot".into(),
                "dovenull".into(),
                Some(owner),
            )
        } else {
            // Unprivileged, every process runs as the user running the tests.
            let me = output_of("id", &["-un"]);
            (me.clone(), output_of("id", &["-gn"]), me, None)
        };
        let (uid, gid) = owner.unwrap_or_else(|| {
            (
                output_of("id", &["-u"]).parse().unwrap(),
                output_of("id", &["-g"]).parse().unwrap(),
            )
        });
        let status = Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, trustme\n\
                 ca = trustme.CA()\n\
                 cert = ca.issue_cert('127.0.0.1', 'localhost')\n\
                 ca.cert_pem.write_to_path(sys.argv[1] + '/ca.pem')\n\
                 cert.private_key_pem.write_to_path(sys.argv[1] + '/key.pem')\n\
                 cert.cert_chain_pems[0].write_to_path(sys.argv[1] + '/cert.pem')\n",
            )
            .arg(d)
            .status()
            .expect("python3 makes the test certificate");
        assert!(status.success(), "making the test certificate failed");
        let home = d.join("home");
        for sub in ["Maildir/cur", "Maildir/new", "Maildir/tmp"] {
            std::fs::create_dir_all(home.join(sub)).unwrap();
        }
        if let Some((uid, gid)) = owner {
            chown_tree(&home, uid, gid);
        }
        std::fs::write(
            d.join("passwd"),
            format!(
                "{user}:{{PLAIN}}{password}:{uid}:{gid}::{}::\n",
                home.display()
            ),
        )
        .unwrap();
        let (port, starttls_port) = (free_port(), free_port());
        let conf = format!(
            "base_dir = {d}/run\n\
             state_dir = {d}/state\n\
             instance_name = hikyaku-test-{port}\n\
             default_internal_user = {internal}\n\
             default_internal_group = {group}\n\
             default_login_user = {login}\n\
             protocols = imap\n\
             listen = 127.0.0.1\n\
             log_path = {d}/dovecot.log\n\
             ssl = required\n\
             ssl_cert = <{d}/cert.pem\n\
             ssl_key = <{d}/key.pem\n\
             auth_mechanisms = plain\n\
             first_valid_uid = 1\n\
             mail_location = maildir:~/Maildir\n\
             passdb {{\n  driver = passwd-file\n  args = {d}/passwd\n}}\n\
             userdb {{\n  driver = passwd-file\n  args = {d}/passwd\n}}\n\
             service imap-login {{\n  chroot =\n  inet_listener imap {{\n    port = {starttls_port}\n  }}\n  \
             inet_listener imaps {{\n    port = {port}\n    ssl = yes\n  }}\n}}\n\
             service anvil {{\n  chroot =\n}}\n",
            d = d.display()
        );
        std::fs::write(d.join("dovecot.conf"), conf).unwrap();
        let child = Command::new(dovecot)
            .arg("-F")
            .arg("-c")
            .arg(d.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log")).unwrap())
            .spawn()
            .expect("starting dovecot");
        let mut server = ImapServer {
            child,
            port,
            starttls_port,
            ca: d.join("ca.pem"),
            owner,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || TcpStream::connect(("127.0.0.1", starttls_port)).is_err()
        {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("dovecot exited with {status}:\n{}", server.log());
            }
            assert!(
                Instant::now() < deadline,
                "dovecot did not listen within 30 s:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    /// Dovecot's own log and standard error.
    pub fn log(&self) -> String {
        let d = self.dir.path();
        ["stderr.log", "dovecot.log"]
            .iter()
            .map(|f| std::fs::read_to_string(d.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }

    fn folder_dir(&self, folder: &str) -> PathBuf {
        let maildir = self.dir.path().join("home/Maildir");
        if folder == "INBOX" {
            maildir
        } else {
            maildir.join(format!(".{folder}"))
        }
    }

    /// Puts a message into the folder, as a local delivery agent would.
    pub fn deliver(&self, folder: &str, raw: &[u8]) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.folder_dir(folder);
        let name = format!("{}.M{n}P{}.hikyaku-test", now_secs(), std::process::id());
        let tmp = dir.join("tmp").join(&name);
        std::fs::write(&tmp, raw).unwrap();
        if let Some((uid, gid)) = self.owner {
            chown_tree(&tmp, uid, gid);
        }
        std::fs::rename(&tmp, dir.join("new").join(&name)).unwrap();
    }

    /// How many messages the folder holds (none if it does not exist).
    pub fn count(&self, folder: &str) -> usize {
        let dir = self.folder_dir(folder);
        ["cur", "new"]
            .iter()
            .map(|sub| {
                std::fs::read_dir(dir.join(sub))
                    .map(|entries| entries.count())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// The `[imap]` section reaching this server.
    pub fn imap_toml(&self, extra: &str) -> String {
        format!(
            "[imap]\nhost = \"127.0.0.1\"\nport = {}\nca_file = \"{}\"\n{extra}\n",
            self.port,
            self.ca.display()
        )
    }
}

/// A delivery status notification of tests/data/dsn, by file name.
pub fn dsn_fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/dsn")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

/// The recipient address and Message-ID a fixture is about.
pub type About = (&'static str, &'static str);

pub const POSTFIX: About = (
    "user3@example.com",
    "5b0c6e2f9d1a4c3b8e7f6a5d4c3b2a19@acme.example",
);
pub const EXCHANGE: About = (
    "user5@contoso.example",
    "0a9b8c7d6e5f40312a3b4c5d6e7f8091@acme.example",
);
pub const GOOGLE: About = (
    "user7@example.org",
    "c4d5e6f7a8b94c0d1e2f3a4b5c6d7e8f@acme.example",
);
pub const DELAYED: About = (
    "user9@slow.example",
    "9e8d7c6b5a4f40312e1d0c9b8a7f6e5d@acme.example",
);

/// A fixture about `address` and `message_id` instead of its own.
pub fn dsn_about(name: &str, own: About, address: &str, message_id: &str) -> Vec<u8> {
    let id = message_id.trim_matches(['<', '>']);
    dsn_fixture(name)
        .replace(own.0, address)
        .replace(own.1, id)
        .into_bytes()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(unix)]
fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid, gid);
        }
    }
}

#[cfg(not(unix))]
fn chown_tree(_: &Path, _: u32, _: u32) {}

impl Drop for ImapServer {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its children; a kill would leave them.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprint!("dovecot's log:\n{}", self.log());
        }
    }
}
