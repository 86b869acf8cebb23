//! Several sending accounts through the real binary against one SMTP
//! server that knows each account's password (SPEC §6b): each account's
//! windows hold at the server, a quota-paused or refused account is set
//! aside while the others finish, and every recipient gets one message.

mod common;

use std::collections::HashMap;

use common::{recipients_csv, standard_campaign, text, CampaignDir, Received, SmtpServer};

const ACCOUNTS: [(&str, &str, &str); 3] = [
    ("news1@acme.example", "NEWS1_PASSWORD", "pw-one"),
    ("news2@acme.example", "NEWS2_PASSWORD", "pw-two"),
    ("news3@acme.example", "NEWS3_PASSWORD", "pw-three"),
];

/// Each account's own window, 3 per 6 s, with a fast per-second window to
/// pace: 3 go out at once and the fourth must wait for the window (6 s, so
/// that on a loaded machine the first send does not leave the window
/// before the fourth is due).
const WINDOW: &str = "per_second = 50\nwindows = [{ max = 3, period = \"6s\" }]\n";

/// The server with the three accounts, plus `extra` arguments.
fn server(extra: &[&str]) -> SmtpServer {
    let accounts: Vec<String> = ACCOUNTS
        .iter()
        .map(|(user, _, pw)| format!("{user}:{pw}"))
        .collect();
    let mut args = vec!["--tls", "starttls"];
    for account in &accounts {
        args.extend(["--account", account.as_str()]);
    }
    args.extend_from_slice(extra);
    SmtpServer::start_raw(&args)
}

/// A campaign sending through the three accounts, each with its own
/// `from` and window.
fn campaign(server: &SmtpServer, recipients: usize) -> CampaignDir {
    let dir = CampaignDir::new();
    let accounts: String = ACCOUNTS
        .iter()
        .map(|(user, env, _)| {
            server.account_toml(user, env, &format!("from = \"Acme <{user}>\"\n{WINDOW}"))
        })
        .collect();
    standard_campaign(&dir, &recipients_csv(recipients), &accounts, "");
    dir
}

/// `hikyaku send` with each account's password in its variable; `wrong`
/// names an account given a wrong one.
fn send(dir: &CampaignDir, extra: &[&str], wrong: Option<&str>) -> std::process::Output {
    let mut cmd = dir.send_command(extra);
    for (user, env, pw) in ACCOUNTS {
        cmd.env(env, if wrong == Some(user) { "wrong" } else { pw });
    }
    common::output(&mut cmd)
}

/// Messages accepted per logged-in user.
fn by_user(received: &[Received]) -> HashMap<String, Vec<f64>> {
    let mut out: HashMap<String, Vec<f64>> = HashMap::new();
    for r in received {
        out.entry(r.user.clone().unwrap_or_default())
            .or_default()
            .push(r.received_at);
    }
    out
}

/// No 6 s interval holds more than 3 of one account's messages.
fn assert_window_held(times: &[f64]) {
    for (i, t) in times.iter().enumerate() {
        let inside = times[i..].iter().filter(|u| **u < t + 6.0).count();
        assert!(
            inside <= 3,
            "{inside} messages within 6 s from {t}: {times:?}"
        );
    }
}

fn assert_each_once(server: &SmtpServer, n: usize) {
    let deliveries = server.deliveries();
    assert_eq!(deliveries.len(), n, "{deliveries:?}");
    assert!(deliveries.values().all(|d| *d == 1), "{deliveries:?}");
}

#[test]
fn three_accounts_share_a_campaign_and_each_window_holds_at_the_server() {
    let server = server(&[]);
    let dir = campaign(&server, 15);

    // Each account fills its own window, then --no-wait stops.
    let out = send(&dir, &["--no-wait"], None);
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    let received = server.received();
    let users = by_user(&received);
    assert_eq!(received.len(), 9, "{users:?}");
    for (user, _, _) in ACCOUNTS {
        assert_eq!(users.get(user).map(Vec::len), Some(3), "{users:?}");
    }

    // status shows every account's window and next slot.
    let status = dir.status();
    let accounts = status["accounts"].as_array().expect("an accounts array");
    assert_eq!(accounts.len(), 3, "{status}");
    for (account, (user, _, _)) in accounts.iter().zip(ACCOUNTS) {
        assert_eq!(account["account"], format!("{user}@127.0.0.1"), "{status}");
        assert_eq!(account["state"], "active", "{status}");
        assert_eq!(account["windows"][1]["max"], 3, "{status}");
        assert_eq!(account["windows"][1]["used"], 3, "{status}");
        assert!(account["next_send_at"].is_string(), "{status}");
    }
    assert!(
        status["account"].is_string() && status["eta"].is_string(),
        "{status}"
    );

    // The dry run plans the rest across the three accounts, each message
    // to the account whose window frees first.
    let out = send(&dir, &["--dry-run"], None);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let mut planned = 0;
    for (user, _, _) in ACCOUNTS {
        let head = format!("account {user}@127.0.0.1 (active): ");
        let line = stdout.lines().find(|l| l.starts_with(&head));
        let share = line.and_then(|l| l[head.len()..].split(' ').next()?.parse::<u32>().ok());
        planned += share.unwrap_or_else(|| panic!("no plan for {user}: {stdout}"));
    }
    assert_eq!(planned, 6, "{stdout}");
    assert!(stdout.contains("eta under the limits"), "{stdout}");

    let out = send(&dir, &[], None);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_each_once(&server, 15);
    let received = server.received();
    for (user, times) in by_user(&received) {
        assert_window_held(&times);
        assert!(ACCOUNTS.iter().any(|(u, _, _)| *u == user), "{user}");
    }
    // Each account sends as its own `from`.
    for r in &received {
        let from = r
            .parsed()
            .from()
            .unwrap()
            .first()
            .unwrap()
            .address()
            .unwrap()
            .to_string();
        assert_eq!(Some(from), r.user, "From is the sending account");
    }
    assert!(
        text(&out.stderr).contains("by account"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_quota_paused_and_a_refused_account_are_set_aside_and_the_third_finishes() {
    let (paused, _, _) = ACCOUNTS[1];
    let (refused, _, _) = ACCOUNTS[2];
    let pause = format!("{paused}=2");
    let server = server(&["--pause-user", &pause]);
    let dir = campaign(&server, 7);

    let out = send(&dir, &[], Some(refused));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_each_once(&server, 7);
    let users = by_user(&server.received());
    assert_eq!(users.get(paused).map(Vec::len), Some(2), "{users:?}");
    assert_eq!(users.get(refused), None, "{users:?}");
    assert_eq!(users.get(ACCOUNTS[0].0).map(Vec::len), Some(5), "{users:?}");
    for times in users.values() {
        assert_window_held(times);
    }
    assert!(
        stderr.contains(&format!("account {refused}@127.0.0.1 set aside")),
        "{stderr}"
    );
    assert!(stderr.contains("5.4.5"), "{stderr}");
    // Each wait names its account, and the summary what each one sent.
    let first = ACCOUNTS[0].0;
    assert!(
        stderr.contains(&format!(
            "account {first}@127.0.0.1: limit per 6s 3/3 reached"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "by account: {first}@127.0.0.1 5, {paused}@127.0.0.1 2, {refused}@127.0.0.1 0"
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("wrong"),
        "the password is never shown: {stderr}"
    );
    assert!(dir.export(None).iter().all(|r| r["state"] == "sent"));

    // The paused account stays paused for the next run, and status says so.
    // The refused one is shown set aside, with no slot, until it logs in.
    let status = dir.status();
    assert_eq!(status["accounts"][1]["state"], "paused", "{status}");
    assert_eq!(status["accounts"][0]["state"], "active", "{status}");
    assert_eq!(status["accounts"][2]["state"], "set aside", "{status}");
    let out = dir.run(&["status", dir.campaign().to_str().unwrap()]);
    assert!(
        text(&out.stdout).contains("set aside since"),
        "{}",
        text(&out.stdout)
    );
    let out = send(&dir, &[], None);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let status = dir.status();
    assert_eq!(status["accounts"][2]["state"], "active", "{status}");
    assert_eq!(server.received().len(), 7);
}

#[test]
fn when_every_account_refuses_the_login_the_run_stops_and_nothing_changes() {
    let server = server(&[]);
    let dir = campaign(&server, 3);
    let mut cmd = dir.send_command(&[]);
    for (_, env, _) in ACCOUNTS {
        cmd.env(env, "wrong");
    }
    let out = common::output(&mut cmd);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("no account is left"), "{stderr}");
    for (user, _, _) in ACCOUNTS {
        assert!(stderr.contains(user), "{stderr}");
    }
    assert!(server.received().is_empty());
    assert!(dir.recorded().is_empty() || dir.export(None).iter().all(|r| r["state"] == "pending"));
}

/// `--test-to` sends through the first account as it sends: its `from`.
#[test]
fn a_test_message_goes_through_the_first_account_as_it_sends() {
    let server = server(&[]);
    let dir = campaign(&server, 3);
    let out = send(&dir, &["--test-to", "tester@example.com"], None);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].user.as_deref(), Some(ACCOUNTS[0].0));
    assert_eq!(received[0].rcpt_tos, ["tester@example.com"]);
    let parsed = received[0].parsed();
    let from = parsed.from().unwrap().first().unwrap().address().unwrap();
    assert_eq!(from, ACCOUNTS[0].0);
}
