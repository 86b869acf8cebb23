//! DKIM signatures made by the real binary, checked by an independent
//! verifier (dkimpy) against a key and DNS record the test supplies.

mod common;

use std::path::Path;
use std::process::Command;

use common::{recipients_csv, standard_campaign, text, CampaignDir, SmtpServer, FILE_TRANSPORT};

fn tool() -> std::path::PathBuf {
    common::ensure_python_packages();
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/dkim_tool.py")
}

/// Runs the verifier; `Ok(signed header list)` when the signature verifies.
fn verify(record: &Path, message: &[u8]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("message.eml");
    std::fs::write(&file, message).unwrap();
    let out = Command::new("python3")
        .arg(tool())
        .arg("verify")
        .arg(record)
        .arg(&file)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(text(&out.stdout).trim().to_lowercase())
    } else {
        Err(format!("{}{}", text(&out.stdout), text(&out.stderr)))
    }
}

fn signed_campaign(kind: &str) {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    let key = dir.path().join("keys/news.pem");
    let record = dir.path().join("record.txt");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    let status = Command::new("python3")
        .arg(tool())
        .args(["keygen", kind])
        .arg(&key)
        .arg(&record)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "key generation needs tests/support/requirements.txt"
    );
    standard_campaign(&dir, &recipients_csv(3), &server.transport_toml(""), "");
    let toml = std::fs::read_to_string(dir.campaign()).unwrap().replace(
        "text = \"templates/body.txt.hbs\"",
        "text = \"templates/body.txt.hbs\"\nlist_unsubscribe = \"https://acme.example/u?e={{email}}\"",
    ) + "\n[dkim]\ndomain = \"acme.example\"\nselector = \"news2026\"\nprivate_key_file = \"keys/news.pem\"\n";
    dir.write("campaign.toml", toml);
    let out = dir.run(&["send", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let received = server.received();
    assert_eq!(received.len(), 3);
    for r in &received {
        let signed = verify(&record, &r.data)
            .unwrap_or_else(|e| panic!("{kind} signature does not verify: {e}"));
        for header in [
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "mime-version",
            "content-type",
            "content-transfer-encoding",
            "list-unsubscribe",
            "list-unsubscribe-post",
        ] {
            assert!(
                signed.split(':').any(|h| h == header),
                "{header} not signed: {signed}"
            );
        }
        let data = text(&r.data);
        assert!(data.contains("d=acme.example") && data.contains("s=news2026"));
        // The verifier can fail: a changed subject breaks the signature.
        let tampered = data.replacen("Subject: Name", "Subject: Xame", 1);
        assert_ne!(tampered, data);
        assert!(
            verify(&record, tampered.as_bytes()).is_err(),
            "a tampered message verified"
        );
        // Regression: Content-Type was left out of h=, so the MIME structure
        // of a signed message could be rewritten (here both alternatives
        // shown one after the other) under a signature that still verified.
        let restructured = data.replacen(
            "Content-Type: multipart/alternative",
            "Content-Type: multipart/mixed",
            1,
        );
        assert_ne!(restructured, data, "not multipart/alternative:\n{data}");
        assert!(
            verify(&record, restructured.as_bytes()).is_err(),
            "a message with a rewritten Content-Type verified"
        );
    }
}

#[test]
fn rsa_signatures_verify_independently() {
    signed_campaign("rsa");
}

#[test]
fn rsa_pkcs8_signatures_verify_independently() {
    signed_campaign("rsa-pkcs8");
}

#[test]
fn ed25519_signatures_verify_independently() {
    signed_campaign("ed25519");
}

#[test]
fn an_unusable_key_is_an_input_error_before_anything_is_sent() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(2), FILE_TRANSPORT, "");
    dir.write(
        "keys/bad.pem",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let toml = std::fs::read_to_string(dir.campaign()).unwrap()
        + "\n[dkim]\ndomain = \"acme.example\"\nselector = \"s\"\nprivate_key_file = \"keys/bad.pem\"\n";
    dir.write("campaign.toml", toml);
    let out = dir.run(&["send", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("bad.pem"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.path().join("outbox").exists());
}
