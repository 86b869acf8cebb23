//! OAuth 2 (`auth = "xoauth2"`) through the real binary against a server
//! that checks the bearer token.

mod common;

use common::{recipients_csv, standard_campaign, text, CampaignDir, SmtpServer};

/// Prints a stale token the first time and the good one afterwards, as a
/// token helper does once the cached access token has expired.
const REFRESHING: &str = "auth = \"xoauth2\"\ntoken_command = 'if [ -f used ]; then echo good-token; else touch used; echo stale-token; fi'\n";

/// Regression: `auth = "xoauth2"` was refused as an unknown key.
#[test]
fn xoauth2_logs_in_with_the_token_and_refreshes_a_refused_one() {
    let server = SmtpServer::start(&["--oauth-token", "good-token"]);
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(3),
        &server.transport_toml(REFRESHING),
        "",
    );
    let campaign = dir.campaign();
    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(server.received().len(), 3);
    assert!(server.deliveries().values().all(|n| *n == 1));
    assert!(!stderr.contains("token"), "{stderr}");
    // The stale token was refused and a fresh one asked for.
    assert!(dir.path().join("used").exists());
}

#[test]
fn a_token_the_server_keeps_refusing_stops_the_run_unshown() {
    let server = SmtpServer::start(&["--oauth-token", "good-token"]);
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(3),
        &server.transport_toml("auth = \"xoauth2\"\ntoken_command = \"echo wrong-token-value\"\n"),
        "",
    );
    let campaign = dir.campaign();
    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("535"), "{stderr}");
    assert!(!stderr.contains("wrong-token-value"), "{stderr}");
    assert!(server.received().is_empty());
    assert_eq!(dir.status()["states"]["sent"], 0);
}
