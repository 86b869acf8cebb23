//! `check` finds what `send` would refuse (SPEC §9): a password source that
//! cannot be read, content changed since sending started; and warns about
//! what would hurt delivery: no limits at all, a DKIM domain that does not
//! align with From.

mod common;

use std::path::Path;
use std::process::Command;

use common::{recipients_csv, standard_campaign, text, CampaignDir, FILE_TRANSPORT};

/// An SMTP transport that is never reached: `check` does not connect.
fn smtp(extra: &str) -> String {
    format!(
        "[transport]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = 1\nusername = \"news@acme.example\"\n{extra}\n"
    )
}

fn check(dir: &CampaignDir, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = dir.command(&["check", dir.campaign().to_str().unwrap()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = common::output(&mut cmd);
    (out.status.code(), text(&out.stderr))
}

/// Caught before: check passed (exit 0) and send then refused.
#[test]
fn an_unset_password_variable_or_a_missing_password_file_fails_check() {
    let dir = CampaignDir::new();
    let limits = "[limits]\nper_minute = 10\n";
    standard_campaign(
        &dir,
        &recipients_csv(2),
        &format!("{limits}{}", smtp("password_env = \"ACME_NEWS_PASSWORD\"")),
        "",
    );
    let (code, err) = check(&dir, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("ACME_NEWS_PASSWORD") && err.contains("not set"),
        "{err}"
    );
    let (code, err) = check(&dir, &[("ACME_NEWS_PASSWORD", "pw-never-shown-42")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("pw-never-shown-42"), "{err}");

    standard_campaign(
        &dir,
        &recipients_csv(2),
        &format!("{limits}{}", smtp("password_file = \"secret/pw.txt\"")),
        "",
    );
    let (code, err) = check(&dir, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("pw.txt"), "{err}");
    dir.write("secret/pw.txt", "pw-never-shown-43\n");
    let (code, err) = check(&dir, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("pw-never-shown-43"), "{err}");
    // Nothing was sent or recorded by any check.
    assert!(!dir.path().join("outbox").exists());
}

/// Caught before: check passed although send refused the changed template.
#[test]
fn content_changed_since_sending_started_fails_check_as_it_fails_send() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(3), FILE_TRANSPORT, "");
    assert_eq!(dir.send(&["--limit", "1"]).status.code(), Some(75));
    let (code, err) = check(&dir, &[]);
    assert_eq!(code, Some(0), "{err}");
    dir.write("templates/body.txt.hbs", "Changed {{first_name}}\n");
    let (code, err) = check(&dir, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("templates/body.txt.hbs changed") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(dir.send(&[]).status.code(), Some(2));
    // check changed nothing: the campaign is where the first send left it.
    let status = dir.status();
    assert_eq!(status["states"]["sent"], 1, "{status}");
    assert_eq!(status["states"]["pending"], 2, "{status}");
}

/// Caught before: no word about an SMTP account sent to without any limit.
#[test]
fn an_smtp_account_without_limits_is_a_warning() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(2), &smtp(""), "");
    let (code, err) = check(&dir, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning:") && err.contains("no window for 127.0.0.1"),
        "{err}"
    );
    standard_campaign(
        &dir,
        &recipients_csv(2),
        &format!("[limits]\nper_day = 100\n{}", smtp("")),
        "",
    );
    let (_, err) = check(&dir, &[]);
    assert!(!err.contains("no window"), "{err}");
}

/// Caught before: a signature for another domain passed check silently.
#[test]
fn a_dkim_domain_that_does_not_align_with_from_is_a_warning() {
    common::ensure_python_packages();
    let dir = CampaignDir::new();
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/dkim_tool.py");
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    let status = Command::new("python3")
        .arg(tool)
        .args(["keygen", "ed25519"])
        .arg(dir.path().join("keys/k.pem"))
        .arg(dir.path().join("record.txt"))
        .status()
        .unwrap();
    assert!(status.success());
    for (domain, warned) in [
        ("esp.example", true),
        ("acme.example", false),
        ("mail.acme.example", false),
    ] {
        standard_campaign(
            &dir,
            &recipients_csv(2),
            FILE_TRANSPORT,
            &format!(
                "[dkim]\ndomain = \"{domain}\"\nselector = \"s\"\nprivate_key_file = \"keys/k.pem\"\n"
            ),
        );
        let (code, err) = check(&dir, &[]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(
            err.contains("does not align with the From domain acme.example"),
            warned,
            "{domain}: {err}"
        );
    }
}
