//! State databases that are not what hikyaku expects (SPEC §11): read-only,
//! damaged, another program's, a folder, in a folder that does not exist.
//! Each through check, status and send: a one-line cause naming the file,
//! exit 2 (or 1 for a fault of the machine), never a panic, nothing sent,
//! and a database that is not hikyaku's left byte for byte as it was.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use common::{recipients_csv, standard_campaign, text, CampaignDir, FILE_TRANSPORT};

/// Runs check, status and send with `db` as the state database; each must
/// fail with `code` (any of them), name the file, and send nothing.
fn refused_everywhere(dir: &CampaignDir, db: &Path, codes: &[i32], cause: &str) {
    let campaign = dir.campaign();
    let written = outbox(dir);
    for command in ["check", "status", "send"] {
        let out = run_with_db(dir, db, &[command, campaign.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert!(
            out.status.code().is_some_and(|c| codes.contains(&c)),
            "{command} with {}: {:?}: {err}",
            db.display(),
            out.status
        );
        assert!(
            err.contains(db.to_str().unwrap()) && err.contains(cause),
            "{command}: the error must name {} and say {cause:?}: {err}",
            db.display()
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(outbox(dir), written, "something was sent");
}

/// How many messages the file transport wrote.
fn outbox(dir: &CampaignDir) -> usize {
    std::fs::read_dir(dir.path().join("outbox")).map_or(0, |d| d.count())
}

fn run_with_db(dir: &CampaignDir, db: &Path, args: &[&str]) -> Output {
    common::output(
        Command::new(common::bin())
            .arg("--db")
            .arg(db)
            .args(args)
            .current_dir(dir.path())
            .env_remove("HIKYAKU_DB")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1"),
    )
}

fn sqlite(db: &Path, script: &str) {
    let status = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit(); c.close()",
        ])
        .arg(db)
        .arg(script)
        .status()
        .unwrap();
    assert!(status.success());
}

fn snapshot(path: &Path) -> (Vec<u8>, SystemTime) {
    (
        std::fs::read(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

fn campaign() -> CampaignDir {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(3), FILE_TRANSPORT, "");
    dir
}

/// Regression: another program's SQLite file got a `_sqlx_migrations`
/// table before the refusal. It is now refused untouched.
#[test]
fn another_programs_database_is_refused_untouched() {
    let dir = campaign();
    let db = dir.path().join("inventory.sqlite");
    sqlite(
        &db,
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO items (name) VALUES ('bolt');",
    );
    let before = snapshot(&db);
    refused_everywhere(&dir, &db, &[2], "another program's SQLite database");
    assert!(
        snapshot(&db) == before,
        "the foreign database was written to"
    );
    for extra in ["-wal", "-shm", "-journal"] {
        let mut side = db.clone().into_os_string();
        side.push(extra);
        assert!(!PathBuf::from(side).exists(), "{extra} left next to it");
    }

    // One that says whose it is in its header, even with no tables.
    let db = dir.path().join("marked.sqlite");
    sqlite(
        &db,
        "PRAGMA application_id = 1234; PRAGMA user_version = 1;",
    );
    let before = snapshot(&db);
    refused_everywhere(&dir, &db, &[2], "another program's SQLite database");
    assert!(snapshot(&db) == before);
}

/// Regression: random bytes failed with SQLite's words and no file name.
#[test]
fn a_file_that_is_not_sqlite_is_refused_untouched() {
    let dir = campaign();
    let db = dir.path().join("noise.db");
    let noise: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&db, &noise).unwrap();
    refused_everywhere(&dir, &db, &[2], "not a SQLite database");
    assert_eq!(std::fs::read(&db).unwrap(), noise);
}

/// A hikyaku database whose pages were overwritten: whatever the command
/// meets, the file is named and nothing panics.
#[test]
fn a_damaged_hikyaku_database_names_the_file() {
    let dir = campaign();
    assert_eq!(dir.send(&["--limit", "1"]).status.code(), Some(75));
    let db = dir.db();
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 8192, "expected a few pages");
    for (i, b) in bytes.iter_mut().enumerate().skip(4096) {
        *b = (i as u32).wrapping_mul(2654435761).to_be_bytes()[1];
    }
    std::fs::write(&db, &bytes).unwrap();
    for side in ["state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(side));
    }
    let campaign = dir.campaign();
    for command in ["check", "status", "send"] {
        let out = dir.run(&[command, campaign.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "{command}: {:?}: {err}",
            out.status
        );
        assert!(err.contains(db.to_str().unwrap()), "{command}: {err}");
    }
}

/// Regression: a hikyaku database missing a table failed with "no such
/// table" and no file name.
#[test]
fn a_hikyaku_database_missing_its_tables_is_named() {
    let dir = campaign();
    assert_eq!(dir.send(&["--limit", "1"]).status.code(), Some(75));
    let db = dir.db();
    sqlite(&db, "DROP TABLE recipients;");
    refused_everywhere(&dir, &db, &[2], "table recipients missing");
}

#[test]
fn a_folder_as_the_database_is_refused() {
    let dir = campaign();
    let db = dir.path().join("a-folder");
    std::fs::create_dir(&db).unwrap();
    refused_everywhere(&dir, &db, &[2], "is a folder");
    assert_eq!(std::fs::read_dir(&db).unwrap().count(), 0);
}

/// Regression (issue: --db into a folder that does not exist created it).
/// Only the default location is created.
#[test]
fn a_database_in_a_missing_folder_is_refused_unless_it_is_the_default() {
    let dir = campaign();
    let db = dir.path().join("no-such-folder/state.db");
    refused_everywhere(&dir, &db, &[2], "does not exist");
    assert!(!dir.path().join("no-such-folder").exists());

    // The default location is created, and -v says which database is used.
    let data = dir.path().join("data-home");
    let out = common::output(
        Command::new(common::bin())
            .args(["-v", "check", dir.campaign().to_str().unwrap()])
            .env_remove("HIKYAKU_DB")
            .env("XDG_DATA_HOME", &data)
            .env("HOME", dir.path())
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let default = data.join("hikyaku/hikyaku.db");
    assert!(default.exists());
    assert!(
        text(&out.stderr).contains(default.to_str().unwrap()),
        "-v names the database: {}",
        text(&out.stderr)
    );
}

/// A read-only database file: a one-line cause naming it, exit 1. Root
/// writes whatever the mode, so as root the binary runs as nobody.
#[test]
fn a_read_only_database_is_named() {
    let dir = campaign();
    assert_eq!(dir.send(&["--limit", "1"]).status.code(), Some(75));
    let db = dir.db();
    let campaign = dir.campaign();
    set_mode(dir.path(), 0o755);
    set_mode(&db, 0o444);
    for command in ["check", "status", "send"] {
        let mut cmd = as_unprivileged();
        cmd.args([
            "--db",
            db.to_str().unwrap(),
            command,
            campaign.to_str().unwrap(),
        ])
        .env_remove("HIKYAKU_DB")
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "1");
        let out = common::output(&mut cmd);
        let err = text(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "{command}: {:?}: {err}",
            out.status
        );
        assert!(
            err.contains(db.to_str().unwrap()) && err.contains("read-only"),
            "{command}: {err}"
        );
    }
    assert_eq!(outbox(&dir), 1, "only the first run's message");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The binary, run as an unprivileged user when the tests run as root.
fn as_unprivileged() -> Command {
    let uid = Command::new("id").arg("-u").output().unwrap();
    if text(&uid.stdout).trim() != "0" {
        return Command::new(common::bin());
    }
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        common::bin(),
    ]);
    cmd
}
