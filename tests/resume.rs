//! A resumed `send` of a campaign whose recipients file, templates and
//! `[message]` did not change starts at once, without reading the file
//! again (SPEC §12); every change that matters is still noticed (SPEC §3,
//! §7.7): a row edited in place, a row added or removed, an address added
//! to or taken off the suppression list, a template edited.

mod common;

use std::time::SystemTime;

use common::*;

const NOT_READ: &str = "not read again";

fn rehearsal(n: usize) -> CampaignDir {
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(n),
        "[transport]\nkind = \"file\"\ndir = \"outbox\"\n",
        "",
    );
    dir
}

/// `send --limit 1`: one more message, and what the run said.
fn send_one(dir: &CampaignDir) -> String {
    let out = dir.send(&["--limit", "1"]);
    let said = text(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 75)),
        "exit {:?}: {said}",
        out.status
    );
    said
}

fn state_of(dir: &CampaignDir, email: &str) -> (String, String) {
    let rows = dir.export(None);
    let row = rows
        .iter()
        .find(|r| r["email"] == email)
        .unwrap_or_else(|| panic!("{email} not exported: {rows:?}"));
    (row["state"].clone(), row["reason"].clone())
}

/// Replaces the recipients file, keeping its modification time: only its
/// content tells that it changed.
fn rewrite_keeping_mtime(dir: &CampaignDir, csv: &str) {
    let path = dir.path().join("recipients.csv");
    let mtime: SystemTime = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::write(&path, csv).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

#[test]
fn an_unchanged_file_is_not_read_again_and_every_change_is_noticed() {
    let dir = rehearsal(10);
    let first = send_one(&dir);
    assert!(!first.contains(NOT_READ), "{first}");
    let resumed = send_one(&dir);
    assert!(resumed.contains(NOT_READ), "{resumed}");
    assert_eq!(dir.status()["states"]["pending"], 8);

    // One address changed in place, same size, same modification time.
    let edited = recipients_csv(10).replace("user9@example.com", "resu9@example.com");
    rewrite_keeping_mtime(&dir, &edited);
    let said = send_one(&dir);
    assert!(!said.contains(NOT_READ), "{said}");
    assert_eq!(
        state_of(&dir, "user9@example.com"),
        ("skipped".into(), "removed".into())
    );
    assert_eq!(state_of(&dir, "resu9@example.com").0, "pending");

    // A row added.
    dir.write(
        "recipients.csv",
        format!("{edited}user11@example.com,Name11,City11\n"),
    );
    let said = send_one(&dir);
    assert!(!said.contains(NOT_READ), "{said}");
    assert_eq!(state_of(&dir, "user11@example.com").0, "pending");
    assert!(send_one(&dir).contains(NOT_READ));

    // A row removed.
    dir.write(
        "recipients.csv",
        edited.replace("user10@example.com,Name10,City10\n", "")
            + "user11@example.com,Name11,City11\n",
    );
    let said = send_one(&dir);
    assert!(!said.contains(NOT_READ), "{said}");
    assert_eq!(
        state_of(&dir, "user10@example.com"),
        ("skipped".into(), "removed".into())
    );

    // A template edited: refused as before, the file read or not.
    assert!(send_one(&dir).contains(NOT_READ));
    dir.write("templates/body.txt.hbs", "Hi {{first_name}}!\n{{> sig}}\n");
    let out = dir.send(&["--limit", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("templates/body.txt.hbs changed"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_suppression_list_change_is_noticed_without_a_file_change() {
    let dir = rehearsal(10);
    send_one(&dir);
    assert!(send_one(&dir).contains(NOT_READ));
    let out = dir.run(&["suppress", "add", "user9@example.com"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = send_one(&dir);
    assert!(!said.contains(NOT_READ), "{said}");
    assert_eq!(
        state_of(&dir, "user9@example.com"),
        ("skipped".into(), "suppressed".into())
    );
    assert!(send_one(&dir).contains(NOT_READ));
    let out = dir.run(&["suppress", "remove", "user9@example.com"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = send_one(&dir);
    assert!(!said.contains(NOT_READ), "{said}");
    assert_eq!(state_of(&dir, "user9@example.com").0, "pending");
}

#[test]
fn rows_skipped_as_invalid_are_read_again_every_time() {
    let dir = rehearsal(4);
    dir.write(
        "recipients.csv",
        recipients_csv(4).replace("Name3", "\"Bad\nName\""),
    );
    let out = dir.send(&["--skip-invalid", "--limit", "1"]);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    // Without --skip-invalid the row is checked again and refused, as before.
    let out = dir.send(&["--limit", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(NOT_READ));
}

/// Caught before: a send left its write-ahead log behind, as large as
/// everything it wrote (the state took twice its room between runs).
#[test]
fn a_send_leaves_no_write_ahead_log_behind() {
    let dir = rehearsal(200);
    send_one(&dir);
    let wal = dir.path().join("state.db-wal");
    let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(size, 0, "{} is {size} bytes", wal.display());
}
