//! Account limits through the real binary against a real SMTP server:
//! windows shared across runs and campaigns, `--no-wait`, server pauses.

mod common;

use common::{recipients_csv, standard_campaign, text, CampaignDir, SmtpServer, FILE_TRANSPORT};

/// The window under test, 5 per 6 s, with a fast per-second window to pace:
/// alone it would pace one send per 1.2 s, and on a loaded machine a slow
/// run could see its first send leave the window before the sixth, making
/// "stops after 5" depend on timing. Now 5 go out at once and the sixth
/// must wait for the window.
const WINDOW: &str = "[limits]\nper_second = 50\nwindows = [{ max = 5, period = \"6s\" }]\n";

#[test]
fn a_window_holds_across_runs_and_no_server_window_sees_more_than_its_max() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(12),
        &server.transport_toml(""),
        WINDOW,
    );
    let campaign = dir.campaign();
    let campaign = campaign.to_str().unwrap();

    let out = dir.run(&["send", "--no-wait", campaign]);
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    assert_eq!(server.received().len(), 5);
    assert!(
        text(&out.stderr).contains("5/5 reached"),
        "{}",
        text(&out.stderr)
    );

    let status = dir.status();
    assert_eq!(status["windows"][1]["max"], 5);
    assert_eq!(status["windows"][1]["period_secs"], 6);
    assert_eq!(status["windows"][1]["used"], 5);
    assert!(status["next_send_at"].is_string(), "{status}");
    assert!(status["eta"].is_string(), "{status}");

    // Restarting does not reset the window.
    let out = dir.run(&["send", "--no-wait", campaign]);
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    assert_eq!(server.received().len(), 5);

    let out = dir.run(&["send", campaign]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let received = server.received();
    assert_eq!(received.len(), 12);
    assert!(server.deliveries().values().all(|n| *n == 1));
    let times: Vec<f64> = received.iter().map(|r| r.received_at).collect();
    for (i, t) in times.iter().enumerate() {
        let inside = times[i..].iter().filter(|u| **u < t + 6.0).count();
        assert!(
            inside <= 5,
            "{inside} messages within 6 s from {t}: {times:?}"
        );
    }
}

#[test]
fn another_campaign_on_the_same_account_shares_the_window() {
    let server = SmtpServer::start(&[]);
    let first = CampaignDir::new();
    standard_campaign(
        &first,
        &recipients_csv(5),
        &server.transport_toml(""),
        WINDOW,
    );
    let out = first.run(&["send", first.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));

    // Same database, another campaign, same account.
    let second = CampaignDir::new();
    standard_campaign(
        &second,
        &recipients_csv(3),
        &server.transport_toml(""),
        WINDOW,
    );
    let toml = std::fs::read_to_string(second.campaign())
        .unwrap()
        .replace("test-campaign", "other-campaign");
    second.write("campaign.toml", toml);
    let out = common::output(
        second
            .command(&["send", "--no-wait", second.campaign().to_str().unwrap()])
            .arg("--db")
            .arg(first.db()),
    );
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    assert_eq!(server.received().len(), 5);
}

/// Regression: with a lone long window (2 an hour, nothing shorter) its
/// even pacing spaces sends 30 minutes apart, and `--no-wait` took that
/// spacing for the short pacing it accepts and sat waiting for half an
/// hour. A pacing wait of more than a minute is a wait: exit 75 at once.
#[test]
fn no_wait_stops_at_a_lone_long_windows_pacing() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(3),
        &server.transport_toml(""),
        "[limits]\nwindows = [{ max = 2, period = \"1h\" }]\n",
    );
    let mut child = dir
        .send_command(&["--no-wait"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("send --no-wait still waiting after 60 s for the next paced send");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = common::finish(child);
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("stopped (--no-wait): pacing"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(server.received().len(), 1);
    let status = dir.status();
    assert_eq!(status["states"]["pending"], 2, "{status}");
    let next =
        chrono::DateTime::parse_from_rfc3339(status["next_send_at"].as_str().unwrap()).unwrap();
    let wait = next.timestamp() - chrono::Utc::now().timestamp();
    assert!(
        (1_700..=1_800).contains(&wait),
        "next send in {wait} s: {status}"
    );
}

#[test]
fn a_daily_limit_reply_leaves_the_rest_pending_not_failed() {
    let server = SmtpServer::start(&["--pause-after", "3"]);
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(8),
        &server.transport_toml(""),
        "[limits]\nper_second = 50\nper_day = 500\n",
    );
    let campaign = dir.campaign();
    let out = dir.run(&["send", "--no-wait", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("5.4.5"), "{}", text(&out.stderr));
    assert_eq!(server.received().len(), 3);
    let status = dir.status();
    assert_eq!(status["states"]["sent"], 3);
    assert_eq!(status["states"]["pending"], 5);
    assert_eq!(status["states"]["failed"], 0);
    // The account is paused until the day's first send leaves the window.
    let next =
        chrono::DateTime::parse_from_rfc3339(status["next_send_at"].as_str().unwrap()).unwrap();
    let wait = next.timestamp() - chrono::Utc::now().timestamp();
    assert!(wait > 86_000, "next send in {wait} s: {status}");
}

#[test]
fn dry_run_changes_nothing_and_prints_the_eta() {
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(30),
        FILE_TRANSPORT,
        "[limits]\nper_minute = 10\nper_day = 20\n",
    );
    let out = dir.run(&["send", "--dry-run", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("30 would be sent"), "{stdout}");
    assert!(stdout.contains("eta under the limits"), "{stdout}");
    assert!(!dir.path().join("outbox").exists());
    assert!(dir.recorded().is_empty());
}
