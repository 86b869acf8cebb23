//! Sending hours and warm-up through the real binary (SPEC §6b): nothing
//! leaves outside `[schedule]`, and an account's first days are capped.

mod common;

use common::{recipients_csv, standard_campaign, text, CampaignDir, FILE_TRANSPORT};

/// Regression: a campaign whose schedule opens in the future sent at once.
#[test]
fn a_closed_schedule_sends_nothing_and_no_wait_names_the_opening() {
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(3),
        FILE_TRANSPORT,
        "[schedule]\nstart_at = \"2099-01-05T08:00\"\nhours = \"09:00-17:00\"\ndays = \"mon-fri\"\ntimezone = \"Europe/Berlin\"\n",
    );
    let campaign = dir.campaign();
    let campaign = campaign.to_str().unwrap();

    let out = dir.run(&["send", "--no-wait", campaign]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "stderr: {stderr}");
    assert!(stderr.contains("sending hours"), "{stderr}");
    assert!(stderr.contains("2099-01-05"), "{stderr}");
    assert!(
        !dir.path().join("outbox").exists()
            || std::fs::read_dir(dir.path().join("outbox"))
                .unwrap()
                .count()
                == 0
    );

    // 09:00 in Berlin on that Monday is 08:00 UTC.
    let status = dir.status();
    assert_eq!(status["next_send_at"], "2099-01-05T08:00:00Z", "{status}");
    assert_eq!(status["states"]["pending"], 3, "{status}");

    let out = dir.run(&["send", "--dry-run", campaign]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("2099-01-05"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn warmup_caps_the_first_day_and_says_so() {
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(5),
        FILE_TRANSPORT,
        "[limits]\nwarmup = [2, 4]\n",
    );
    let campaign = dir.campaign();
    let campaign = campaign.to_str().unwrap();

    let out = dir.run(&["send", "--no-wait", campaign]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "stderr: {stderr}");
    assert!(stderr.contains("warm-up"), "{stderr}");
    let status = dir.status();
    assert_eq!(status["states"]["sent"], 2, "{status}");
    assert!(status["next_send_at"].is_string(), "{status}");
    assert!(status["eta"].is_string(), "{status}");

    // Restarting does not reset the day's count.
    let out = dir.run(&["send", "--no-wait", campaign]);
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    assert_eq!(dir.status()["states"]["sent"], 2);
}

/// `[limits.per_domain]` paces one provider (before, the key was refused
/// and nothing could smooth a burst), and a paced domain holds up no other.
#[test]
fn a_per_domain_limit_holds_at_the_server_and_other_domains_go_on() {
    let server = common::SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    let mut csv = String::from("email,first_name,city\n");
    for i in 1..=3 {
        csv.push_str(&format!("s{i}@slow.example,S{i},X\n"));
    }
    for i in 1..=6 {
        csv.push_str(&format!("f{i}@fast.example,F{i},Y\n"));
    }
    standard_campaign(
        &dir,
        &csv,
        &server.transport_toml(""),
        "[limits.per_domain]\n\"slow.example\" = \"1/s\"\n",
    );
    let campaign = dir.campaign();
    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let received = server.received();
    assert_eq!(received.len(), 9);
    assert!(server.deliveries().values().all(|n| *n == 1));
    let at = |domain: &str| -> Vec<f64> {
        received
            .iter()
            .filter(|r| r.rcpt_tos[0].ends_with(domain))
            .map(|r| r.received_at)
            .collect()
    };
    let slow = at("@slow.example");
    let fast = at("@fast.example");
    // One a second: the server never sees two within well under a second.
    for pair in slow.windows(2) {
        assert!(pair[1] - pair[0] >= 0.8, "slow.example at {slow:?}");
    }
    // The other domain was not queued behind the paced one.
    let last_fast = fast.iter().copied().fold(f64::MIN, f64::max);
    assert!(last_fast < slow[2], "fast {fast:?}, slow {slow:?}");
}
