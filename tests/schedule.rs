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

/// Recipients in Kiritimati (UTC+14) and Pago Pago (UTC-11): 25 hours
/// apart, so their dates always differ. The schedule opens on
/// Kiritimati's today and tomorrow only: every Kiritimati recipient (and
/// one with an empty zone, in the campaign's zone, Kiritimati) goes now,
/// none in Pago Pago, whose date is a day or two behind.
#[test]
fn timezone_column_sends_each_recipient_in_their_own_hours() {
    use chrono::{Datelike, Duration, Utc};
    let kiritimati: chrono_tz::Tz = "Pacific/Kiritimati".parse().unwrap();
    let today = Utc::now().with_timezone(&kiritimati).date_naive();
    let day = |d: chrono::NaiveDate| {
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            [d.weekday().num_days_from_monday() as usize]
    };
    let days = format!("{},{}", day(today), day(today + Duration::days(1)));
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        "email,first_name,city,tz\n\
         kiri1@example.com,A,X,Pacific/Kiritimati\n\
         pago1@example.com,B,X,Pacific/Pago_Pago\n\
         nozone@example.com,C,X,\n\
         kiri2@example.com,D,X, Pacific/Kiritimati \n\
         pago2@example.com,E,X,Pacific/Pago_Pago\n",
        FILE_TRANSPORT,
        &format!(
            "[schedule]\ndays = \"{days}\"\ntimezone = \"Pacific/Kiritimati\"\ntimezone_column = \"tz\"\n"
        ),
    );
    let out = dir.send(&["--no-wait"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "stderr: {stderr}");
    assert!(stderr.contains("Pacific/Pago_Pago"), "{stderr}");
    let states: Vec<(String, String)> = dir
        .export(None)
        .into_iter()
        .map(|r| (r["email"].clone(), r["state"].clone()))
        .collect();
    let sent = |email: &str| states.iter().any(|(e, s)| e == email && s == "sent");
    assert!(
        sent("kiri1@example.com") && sent("kiri2@example.com") && sent("nozone@example.com"),
        "{states:?}"
    );
    assert!(
        !sent("pago1@example.com") && !sent("pago2@example.com"),
        "{states:?}"
    );
}

/// A zone that is no IANA name is a per-row error naming the row, the
/// column and the value, found before anything is sent.
#[test]
fn a_bad_zone_in_the_timezone_column_names_its_row() {
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        "email,first_name,city,tz\nok@example.com,A,X,Asia/Tokyo\nbad@example.com,B,X,Mars/Olympus\n",
        FILE_TRANSPORT,
        "[schedule]\nhours = \"09:00-17:00\"\ntimezone_column = \"tz\"\n",
    );
    let out = dir.send(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("row 2"), "{stderr}");
    assert!(
        stderr.contains("timezone_column") && stderr.contains("Mars/Olympus"),
        "{stderr}"
    );
    let outbox = dir.path().join("outbox");
    assert!(!outbox.exists() || std::fs::read_dir(outbox).unwrap().count() == 0);

    // A column that does not exist is said once, before any row.
    let toml = std::fs::read_to_string(dir.campaign())
        .unwrap()
        .replace("\"tz\"", "\"zone\"");
    dir.write("campaign.toml", toml);
    let out = dir.check();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("timezone_column \"zone\" is not a column"),
        "{stderr}"
    );
}

/// Regression: recipients were looked at 64 past the first that had to
/// wait, so a file sorted by zone held the recipients of an open zone
/// behind those of a closed one until that zone opened. Now the closed
/// zone's rows are passed over without being read.
#[test]
fn a_closed_zone_never_hides_an_open_one_behind_it() {
    use chrono::{Datelike, Duration, Utc};
    let kiritimati: chrono_tz::Tz = "Pacific/Kiritimati".parse().unwrap();
    let today = Utc::now().with_timezone(&kiritimati).date_naive();
    let day = |d: chrono::NaiveDate| {
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            [d.weekday().num_days_from_monday() as usize]
    };
    let days = format!("{},{}", day(today), day(today + Duration::days(1)));
    let mut csv = String::from("email,first_name,city,tz\n");
    for i in 0..150 {
        csv.push_str(&format!("pago{i}@example.com,P,X,Pacific/Pago_Pago\n"));
    }
    for i in 0..3 {
        csv.push_str(&format!("kiri{i}@example.com,K,X,Pacific/Kiritimati\n"));
    }
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &csv,
        FILE_TRANSPORT,
        &format!("[schedule]\ndays = \"{days}\"\ntimezone_column = \"tz\"\n"),
    );
    let out = dir.send(&["--no-wait"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "stderr: {stderr}");
    let sent: Vec<String> = dir
        .export(Some("sent"))
        .into_iter()
        .map(|r| r["email"].clone())
        .collect();
    assert_eq!(
        sent,
        [
            "kiri0@example.com",
            "kiri1@example.com",
            "kiri2@example.com"
        ],
        "{stderr}"
    );
}
