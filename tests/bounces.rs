//! `hikyaku bounces` end to end: a campaign sent to the SMTP test server,
//! delivery status notifications of real shapes dropped into a real
//! mailbox (Dovecot, started by the test), and the binary reading it over
//! IMAP with TLS.

mod common;

use std::collections::HashMap;

use common::imap::{dsn_about as about, dsn_fixture as fixture, ImapServer};
use common::imap::{DELAYED, EXCHANGE, GOOGLE, POSTFIX};
use common::{text, CampaignDir, SmtpServer, FILE_TRANSPORT, PASSWORD, USER};

const UNSUBSCRIBE: &str = "news+unsubscribe@acme.example";

fn campaign(dir: &CampaignDir, n: usize, sections: &str) {
    dir.write("recipients.csv", common::recipients_csv(n))
        .write("templates/body.txt.hbs", "Hello {{first_name}}!\n")
        .write(
            "campaign.toml",
            format!(
                "name = \"bounce-campaign\"\n[recipients]\nfile = \"recipients.csv\"\n\n[message]\n\
                 from = \"Acme <news@acme.example>\"\nsubject = \"{{{{first_name}}}}, your update\"\n\
                 text = \"templates/body.txt.hbs\"\n\
                 list_unsubscribe = \"mailto:{UNSUBSCRIBE}?subject=unsubscribe\"\n\n{sections}"
            ),
        );
}

fn by_email(rows: Vec<HashMap<String, String>>) -> HashMap<String, HashMap<String, String>> {
    rows.into_iter().map(|r| (r["email"].clone(), r)).collect()
}

fn suppressed(dir: &CampaignDir) -> Vec<String> {
    let out = dir.run(&["suppress", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_lowercase())
        .collect()
}

fn bounces(dir: &CampaignDir, extra: &[&str]) -> std::process::Output {
    let campaign = dir.campaign();
    let mut args = vec!["bounces", campaign.to_str().unwrap()];
    args.extend_from_slice(extra);
    dir.run(&args)
}

/// Three recipients bounce (Postfix, Exchange and Google shapes), one is
/// delayed, one asks to unsubscribe by mail; a bounce for another
/// campaign's message to a recipient of this one, an auto-reply and an
/// unreadable report change nothing. A second run changes nothing, and
/// --move-to files away exactly the processed notifications.
#[test]
fn bounces_from_a_real_mailbox_are_recorded_once() {
    let Some(imap) = ImapServer::start(
        "bounces_from_a_real_mailbox_are_recorded_once",
        USER,
        PASSWORD,
    ) else {
        return;
    };
    let smtp = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    campaign(
        &dir,
        5,
        &format!("{}{}", smtp.transport_toml(""), imap.imap_toml("")),
    );
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let sent = by_email(dir.export(None));
    let id = |email: &str| sent[email]["message_id"].clone();
    let (a, b, c, d, e) = (
        "user1@example.com",
        "user2@example.com",
        "user3@example.com",
        "user4@example.com",
        "user5@example.com",
    );
    imap.deliver("INBOX", &about("postfix.eml", POSTFIX, a, &id(a)));
    imap.deliver("INBOX", &about("exchange.eml", EXCHANGE, b, &id(b)));
    imap.deliver(
        "INBOX",
        &about("google-address-not-found.eml", GOOGLE, c, &id(c)),
    );
    imap.deliver("INBOX", &about("postfix-delayed.eml", DELAYED, d, &id(d)));
    // Another campaign's message to d bounced: not this campaign's news.
    imap.deliver(
        "INBOX",
        &fixture("other-campaign.eml")
            .replace(POSTFIX.0, d)
            .into_bytes(),
    );
    imap.deliver(
        "INBOX",
        &fixture("unsubscribe.eml")
            .replace("User4@Example.com", e)
            .replace("user4@example.com", e)
            .into_bytes(),
    );
    imap.deliver("INBOX", fixture("auto-reply.eml").as_bytes());
    imap.deliver("INBOX", fixture("malformed-report.eml").as_bytes());

    let out = bounces(&dir, &[]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}\n{}", imap.log());
    let rows = by_email(dir.export(None));
    for (email, status) in [(a, "5.1.1"), (b, "5.1.10"), (c, "5.1.1")] {
        assert_eq!(
            rows[email]["state"], "bounced",
            "{email}: {:?}",
            rows[email]
        );
        assert_eq!(rows[email]["reason"], format!("bounced: {status}"));
        assert!(
            rows[email]["last_reply"].starts_with("550"),
            "{:?}",
            rows[email]
        );
    }
    assert_eq!(rows[d]["state"], "sent");
    assert!(
        rows[d]["reason"].starts_with("delivery delayed: 4.4.1"),
        "{:?}",
        rows[d]
    );
    assert_eq!(rows[e]["state"], "sent");
    let mut list = suppressed(&dir);
    list.sort();
    assert_eq!(list, [a, b, c, e]);
    let status = dir.status();
    assert_eq!(status["states"]["bounced"], 3, "{status}");
    assert_eq!(status["states"]["sent"], 2, "{status}");
    assert!(said.contains("3 bounces recorded"), "{said}");
    assert!(said.contains("1 delay noted"), "{said}");
    assert!(
        said.contains("malformed") || said.contains("names no recipient"),
        "{said}"
    );

    // Again: nothing new.
    let before = dir.export(None);
    let out = bounces(&dir, &[]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("0 bounces recorded"), "{said}");
    assert!(said.contains("0 delays noted"), "{said}");
    assert_eq!(dir.export(None), before);
    assert_eq!(suppressed(&dir).len(), 4);

    // Filing away: the five processed messages move; the three others stay.
    let out = bounces(&dir, &["--move-to", "Processed"]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}\n{}", imap.log());
    assert!(said.contains("5 moved to Processed"), "{said}");
    assert_eq!((imap.count("INBOX"), imap.count("Processed")), (3, 5));
    assert_eq!(dir.export(None), before);
    let out = bounces(&dir, &["--move-to", "Processed"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!((imap.count("INBOX"), imap.count("Processed")), (3, 5));

    // A later send has nothing to do, and its totals count the bounces.
    let out = dir.send(&[]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("total: 2 sent, 3 bounced, 0 failed"),
        "{said}"
    );
}

/// STARTTLS on port 143 works; a refused login and a missing folder are
/// runtime faults (exit 1) that say what and where, never the password.
#[test]
fn starttls_wrong_password_and_missing_folder() {
    let Some(imap) =
        ImapServer::start("starttls_wrong_password_and_missing_folder", USER, PASSWORD)
    else {
        return;
    };
    let smtp = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    let with = |extra: &str| {
        campaign(
            &dir,
            2,
            &format!("{}{}", smtp.transport_toml(""), imap.imap_toml(extra)),
        )
    };
    with("");
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    campaign(
        &dir,
        2,
        &format!(
            "{}[imap]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nca_file = \"{}\"\n",
            smtp.transport_toml(""),
            imap.starttls_port,
            imap.ca.display()
        ),
    );
    let out = bounces(&dir, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stderr),
        imap.log()
    );

    with("");
    let campaign_file = dir.campaign();
    let out = common::output(
        dir.command(&["bounces", campaign_file.to_str().unwrap()])
            .env("HIKYAKU_SMTP_PASSWORD", "not-the-password-42"),
    );
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("refused the login of {USER}")),
        "{said}"
    );
    assert!(!said.contains("not-the-password-42"), "{said}");

    with("folder = \"Nope\"");
    let out = bounces(&dir, &[]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("no folder \"Nope\""), "{said}");
}

/// A server that accepts the connection and never speaks is given up on
/// after the transport's timeout (exit 1), not waited for.
#[test]
fn a_silent_imap_server_is_given_up_on() {
    let smtp = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    campaign(&dir, 1, &smtp.transport_toml(""));
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || silent.accept().map(|(conn, _)| conn));
    campaign(
        &dir,
        1,
        &format!(
            "{}[imap]\nhost = \"127.0.0.1\"\nport = {port}\n",
            smtp.transport_toml("")
                .replace("timeout = \"10s\"", "timeout = \"2s\"")
        ),
    );
    let started = std::time::Instant::now();
    let out = bounces(&dir, &[]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("the TLS handshake took longer than 2s"),
        "{said}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    drop(held.join());
}

/// Without a mailbox to read, `bounces` says what to add (exit 2).
#[test]
fn a_campaign_without_a_known_mailbox_is_refused() {
    let dir = CampaignDir::new();
    campaign(
        &dir,
        1,
        "[transport]\nkind = \"smtp\"\nhost = \"smtp.acme.example\"\nusername = \"u\"\n",
    );
    let out = bounces(&dir, &[]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("add an [imap] section"), "{said}");

    campaign(&dir, 1, FILE_TRANSPORT);
    let out = bounces(&dir, &[]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("file transport delivers nothing"), "{said}");

    let out = bounces(&dir, &["--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Regression: `bounced` was not a state; `export --state bounced` was
/// refused and `status --json` had no count for it.
#[test]
fn bounced_is_a_state_of_status_and_export() {
    let dir = CampaignDir::new();
    campaign(&dir, 2, FILE_TRANSPORT);
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(dir.status()["states"]["bounced"], 0);
    assert!(dir.export(Some("bounced")).is_empty());
    let out = dir.run(&["export", "--help"]);
    assert!(text(&out.stdout).contains("bounced"));
}

/// With several accounts each account's mailbox is read as its own user:
/// the first account's bounce is recorded, and the second account, whose
/// user the mailbox server does not know, is named as unread (exit 1)
/// without keeping the first from being read.
#[test]
fn each_accounts_mailbox_is_read_as_its_own_user() {
    let Some(imap) = ImapServer::start(
        "each_accounts_mailbox_is_read_as_its_own_user",
        USER,
        PASSWORD,
    ) else {
        return;
    };
    let other = "other@acme.example";
    let smtp = SmtpServer::start(&["--account", &format!("{other}:{PASSWORD}")]);
    let ca = smtp.ca.as_ref().unwrap().display().to_string();
    let account = |user: &str| {
        format!(
            "[[accounts]]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nusername = \"{user}\"\n\
             ca_file = \"{ca}\"\ntimeout = \"10s\"\n",
            smtp.port
        )
    };
    let dir = CampaignDir::new();
    campaign(
        &dir,
        4,
        &format!("{}{}{}", account(USER), account(other), imap.imap_toml("")),
    );
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let sent = by_email(dir.export(None));
    let a = "user1@example.com";
    imap.deliver(
        "INBOX",
        &about("postfix.eml", POSTFIX, a, &sent[a]["message_id"]),
    );

    let out = bounces(&dir, &[]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("account {USER}@127.0.0.1: 1 message in INBOX")),
        "{said}"
    );
    assert!(said.contains("1 bounce recorded"), "{said}");
    assert!(
        said.contains(&format!("refused the login of {other}")),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "the mailbox of {other}@127.0.0.1 could not be read"
        )),
        "{said}"
    );
    assert_eq!(by_email(dir.export(None))[a]["state"], "bounced");

    // [imap] user cannot name one user for every account.
    let text_now = std::fs::read_to_string(dir.campaign()).unwrap();
    dir.write(
        "campaign.toml",
        text_now.replace("[imap]\n", &format!("[imap]\nuser = \"{USER}\"\n")),
    );
    let out = bounces(&dir, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("[imap] user"),
        "{}",
        text(&out.stderr)
    );
}
