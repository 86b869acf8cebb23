//! The campaign runner end to end: the real binary, the real lettre SMTP
//! client over STARTTLS with AUTH, a real SMTP server, a real SQLite file.

mod common;

use std::collections::HashSet;

use common::{
    recipients_csv, standard_campaign, text, CampaignDir, SmtpServer, FILE_TRANSPORT, PASSWORD,
};
use mail_parser::MimeHeaders;

#[test]
fn sixty_recipients_arrive_exactly_once_personalised_and_multipart() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(60),
        &server.transport_toml("connections = 2"),
        "",
    );
    let campaign = dir.campaign();
    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));

    let received = server.received();
    assert_eq!(received.len(), 60);
    let deliveries = server.deliveries();
    let expected: HashSet<String> = (1..=60).map(|i| format!("user{i}@example.com")).collect();
    assert_eq!(deliveries.keys().cloned().collect::<HashSet<_>>(), expected);
    assert!(
        deliveries.values().all(|n| *n == 1),
        "a recipient got two messages"
    );

    let mut server_ids = HashSet::new();
    for r in &received {
        let msg = r.parsed();
        let to = &r.rcpt_tos[0];
        let n: usize = to
            .trim_start_matches("user")
            .trim_end_matches("@example.com")
            .parse()
            .unwrap();
        assert_eq!(
            msg.subject(),
            Some(format!("Name{n}, your update").as_str())
        );
        let ct = msg.content_type().unwrap();
        assert_eq!(
            (ct.ctype(), ct.subtype()),
            ("multipart", Some("alternative"))
        );
        assert!(msg
            .body_text(0)
            .unwrap()
            .contains(&format!("Hello Name{n} from City{n}!")));
        assert!(msg
            .body_html(0)
            .unwrap()
            .contains(&format!("<b>Name{n}</b>")));
        assert_eq!(msg.header_raw("Precedence").map(str::trim), Some("bulk"));
        assert!(msg.date().is_some());
        server_ids.insert(format!("<{}>", msg.message_id().unwrap()));
        assert_eq!(r.mail_from, "news@acme.example");
    }

    // A second run delivers nothing.
    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(server.received().len(), 60);

    // status and export agree with what the server saw.
    let status = dir.status();
    assert_eq!(status["total"], 60);
    assert_eq!(status["states"]["sent"], 60);
    assert_eq!(status["states"]["pending"], 0);
    assert_eq!(status["account"], format!("{}@127.0.0.1", common::USER));
    let rows = dir.export(None);
    assert_eq!(rows.len(), 60);
    let exported: HashSet<String> = rows.iter().map(|r| r["message_id"].clone()).collect();
    assert_eq!(exported, server_ids);
    assert!(rows
        .iter()
        .all(|r| r["state"] == "sent" && r["last_reply"].starts_with("250")));
    assert!(rows
        .iter()
        .all(|r| r.contains_key("first_name") && r.contains_key("city")));

    // The password appears neither in the output nor in the database file.
    let db = std::fs::read(dir.db()).unwrap();
    assert!(!db.windows(PASSWORD.len()).any(|w| w == PASSWORD.as_bytes()));
    assert!(!text(&out.stderr).contains(PASSWORD));
}

#[test]
fn the_password_comes_from_a_file_or_a_command() {
    let server = SmtpServer::start(&[]);
    for source in [
        "password_file = \"secret.txt\"",
        "password_command = \"cat secret.txt\"",
    ] {
        let dir = CampaignDir::new();
        dir.write("secret.txt", format!("{PASSWORD}\n"));
        standard_campaign(&dir, &recipients_csv(2), &server.transport_toml(source), "");
        // password_command runs in the campaign's folder, wherever hikyaku runs.
        let out = common::output(
            dir.command(&["send", dir.campaign().to_str().unwrap()])
                .env_remove("HIKYAKU_SMTP_PASSWORD")
                .current_dir(std::env::temp_dir()),
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{source}: {}",
            text(&out.stderr)
        );
        assert!(!text(&out.stderr).contains(PASSWORD));
    }
    assert_eq!(server.received().len(), 4);
}

#[test]
fn limit_then_resume_finishes_the_rest() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(25), &server.transport_toml(""), "");
    let campaign = dir.campaign();
    let out = dir.run(&["send", "--limit", "10", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    assert_eq!(server.received().len(), 10);
    assert_eq!(dir.status()["states"]["pending"], 15);

    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let deliveries = server.deliveries();
    assert_eq!(deliveries.len(), 25);
    assert!(deliveries.values().all(|n| *n == 1));
}

#[test]
fn check_names_the_template_line_of_a_missing_column() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(3), FILE_TRANSPORT, "");
    dir.write(
        "templates/body.txt.hbs",
        "Hello {{first_name}},\n\nyour coupon: {{coupon}}\n",
    );
    let out = dir.run(&["check", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("body.txt.hbs:3:"), "{err}");
    assert!(err.contains("coupon"), "{err}");
    // The same for every row: said once, with the file's columns, no row.
    assert!(err.contains("columns: email, first_name, city"), "{err}");
    assert!(!err.contains("row 1"), "{err}");
    // send refuses in the same way and sends nothing.
    let out = dir.run(&["send", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        !dir.path().join("outbox").exists()
            || std::fs::read_dir(dir.path().join("outbox"))
                .unwrap()
                .count()
                == 0
    );
}

#[test]
fn wrong_password_stops_with_exit_1_changes_nothing_and_leaks_nothing() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(5), &server.transport_toml(""), "");
    let wrong = "wr0ng-Passw0rd-xyz";
    let out = common::output(
        dir.command(&["-vv", "send", dir.campaign().to_str().unwrap()])
            .env("HIKYAKU_SMTP_PASSWORD", wrong),
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("535"), "{err}");
    assert!(err.contains("HIKYAKU_SMTP_PASSWORD"), "{err}");
    // Not Gmail: no advice about Gmail's app passwords.
    assert!(!err.contains("app password"), "{err}");
    assert!(!err.contains(wrong) && !text(&out.stdout).contains(wrong));
    let status = dir.status();
    assert_eq!(status["windows"], serde_json::json!([]));
    dir.assert_untouched();
    if dir.db().exists() {
        let db = std::fs::read(dir.db()).unwrap();
        assert!(!db.windows(wrong.len()).any(|w| w == wrong.as_bytes()));
    }
    assert!(server.received().is_empty());
}

/// Every column of every recipient row, straight from the SQLite file.
fn recipient_rows(dir: &CampaignDir) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             db = sqlite3.connect(sys.argv[1])\n\
             for row in db.execute('SELECT * FROM recipients ORDER BY id'):\n    print(repr(row))",
        )
        .arg(dir.db())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// Regression: after a 535 the first claimed row had a last_reply, a
/// Message-ID and a new updated_at although nothing was sent, and the
/// message always named HIKYAKU_SMTP_PASSWORD with Gmail's advice. Now
/// every row is byte for byte as before, and the message names the
/// password source configured.
#[test]
fn a_refused_login_leaves_no_trace_and_names_the_password_source() {
    let server = SmtpServer::start(&["--transient-rate", "0.5", "--seed", "2"]);
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(6),
        &server.transport_toml("password_env = \"ACME_SMTP_SECRET\""),
        "[retry]\nbackoff = \"1h\"\n",
    );
    // Some rows sent, some deferred, some pending.
    let out = common::output(
        dir.send_command(&["--limit", "4", "--no-wait"])
            .env("ACME_SMTP_SECRET", PASSWORD),
    );
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    let before_rows = recipient_rows(&dir);
    let before_export = dir.export(None);
    let states: HashSet<String> = before_export.iter().map(|r| r["state"].clone()).collect();
    assert!(
        states.contains("deferred") && states.contains("pending"),
        "{states:?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    let out = common::output(
        dir.send_command(&[])
            .env("ACME_SMTP_SECRET", "not-the-password"),
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("535") && err.contains("ACME_SMTP_SECRET"),
        "{err}"
    );
    assert!(!err.contains("HIKYAKU_SMTP_PASSWORD"), "{err}");
    assert_eq!(recipient_rows(&dir), before_rows);
    assert_eq!(dir.export(None), before_export);
}

#[test]
fn unknown_user_fails_and_is_suppressed_the_rest_are_sent() {
    let server = SmtpServer::start(&[
        "--reject",
        "user3@example.com=550 5.1.1 The email account that you tried to reach does not exist.",
    ]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(5), &server.transport_toml(""), "");
    let out = dir.run(&["send", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(server.received().len(), 4);
    let failed = dir.export(Some("failed"));
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["email"], "user3@example.com");
    assert!(
        failed[0]["last_reply"].starts_with("550 5.1.1"),
        "{:?}",
        failed[0]
    );
    let list = dir.run(&["suppress", "list"]);
    assert!(text(&list.stdout).contains("user3@example.com"));
}

#[test]
fn envelopes_are_pipelined_where_the_server_offers_it_and_a_refusal_resets() {
    let reject =
        "user3@example.com=550 5.1.1 The email account that you tried to reach does not exist.";
    for pipelining in [true, false] {
        let mut args = vec!["--reject", reject];
        if !pipelining {
            args.push("--no-pipelining");
        }
        let server = SmtpServer::start(&args);
        let dir = CampaignDir::new();
        // One connection: the refused RCPT must leave it in step (every
        // pipelined reply read, then RSET) for the next recipients.
        standard_campaign(
            &dir,
            &recipients_csv(6),
            &server.transport_toml("connections = 1"),
            "",
        );
        let out = dir.run(&["send", dir.campaign().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        let received = server.received();
        let mut to: Vec<String> = received.iter().map(|r| r.rcpt_tos.join(",")).collect();
        to.sort();
        assert_eq!(
            to,
            ["user1", "user2", "user4", "user5", "user6"]
                .map(|u| format!("{u}@example.com"))
                .to_vec(),
            "pipelining offered: {pipelining}"
        );
        assert!(
            received.iter().all(|r| r.pipelined == pipelining),
            "pipelining offered: {pipelining}, pipelined: {:?}",
            received.iter().map(|r| r.pipelined).collect::<Vec<_>>()
        );
        let failed = dir.export(Some("failed"));
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            failed[0]["last_reply"].starts_with("550 5.1.1"),
            "{failed:?}"
        );
    }
}

#[test]
fn a_line_break_in_a_cell_never_becomes_a_header() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    let csv = "email,first_name,city\nok@example.com,Ann,Oslo\n\"bad@example.com\",\"Alice\r\nBcc: victim@example.com\",Rome\n";
    standard_campaign(&dir, csv, &server.transport_toml(""), "");
    let campaign = dir.campaign();
    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("row 2") && err.contains("line break"), "{err}");
    assert!(
        server.received().is_empty(),
        "nothing is sent while a row is broken"
    );

    let out = dir.run(&["send", "--skip-invalid", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_tos, ["ok@example.com"]);
    assert!(!server.deliveries().contains_key("victim@example.com"));
    let skipped = dir.export(Some("skipped"));
    assert_eq!(skipped.len(), 1);
    assert!(
        skipped[0]["reason"].starts_with("invalid message"),
        "{skipped:?}"
    );
}

#[test]
fn rows_that_join_or_leave_the_file_on_a_later_run() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(6), &server.transport_toml(""), "");
    let campaign = dir.campaign();
    let out = dir.run(&["send", "--limit", "2", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(75));
    // user6 leaves the file unsent; user7 joins; user1 (sent) leaves too.
    let mut csv = String::from("email,first_name,city\n");
    for i in [2, 3, 4, 5, 7] {
        csv.push_str(&format!("user{i}@example.com,Name{i},City{i}\n"));
    }
    dir.write("recipients.csv", csv);
    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let deliveries = server.deliveries();
    assert!(!deliveries.contains_key("user6@example.com"));
    assert_eq!(deliveries.get("user7@example.com"), Some(&1));
    assert_eq!(deliveries.len(), 6);
    let skipped = dir.export(Some("skipped"));
    assert_eq!(skipped.len(), 1);
    assert_eq!(
        (skipped[0]["email"].as_str(), skipped[0]["reason"].as_str()),
        ("user6@example.com", "removed")
    );
    assert_eq!(dir.status()["states"]["sent"], 6);
}

#[test]
fn test_send_goes_to_one_address_and_records_nothing() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(5), &server.transport_toml(""), "");
    let out = dir.run(&[
        "send",
        "--test-to",
        "me@acme.example",
        "--limit",
        "2",
        dir.campaign().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let received = server.received();
    assert_eq!(received.len(), 2);
    for (i, r) in received.iter().enumerate() {
        assert_eq!(r.rcpt_tos, ["me@acme.example"]);
        assert_eq!(
            r.parsed().subject(),
            Some(format!("[TEST] Name{}, your update", i + 1).as_str())
        );
    }
    assert!(dir.recorded().is_empty(), "a test send records nothing");
}

/// Regression: EHLO carried the bare host name (`EHLO vm`), which spam
/// filters score (FSL_HELO_NON_FQDN_1, HELO_NO_DOMAIN). Now it is the
/// machine's fully qualified name or an address literal, or `helo_name`.
#[test]
fn ehlo_names_the_machine_fully_or_by_address_and_helo_name_wins() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(1), &server.transport_toml(""), "");
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let helo = server.received()[0].helo.clone();
    let literal = helo.starts_with('[') && helo.ends_with(']');
    assert!(
        literal || (helo.contains('.') && !helo.ends_with('.')),
        "EHLO {helo:?}"
    );

    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(1),
        &server.transport_toml("helo_name = \"mail.acme.example\""),
        "",
    );
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(server.received()[1].helo, "mail.acme.example");

    dir.write(
        "campaign.toml",
        std::fs::read_to_string(dir.campaign())
            .unwrap()
            .replace("mail.acme.example", "mail acme"),
    );
    let out = dir.check();
    assert_eq!(out.status.code(), Some(2), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("helo_name"),
        "{}",
        text(&out.stderr)
    );
}

/// `check --connect` logs in without sending (EHLO, STARTTLS, AUTH) and
/// says what it proved; a refused login is exit 1 with the advice.
#[test]
fn check_connect_proves_the_login_without_sending() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(2), &server.transport_toml(""), "");
    let campaign = dir.campaign();
    let out = dir.run(&["check", "--connect", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("logged in as sender@acme.example") && stdout.contains("STARTTLS"),
        "{stdout}"
    );
    let out = common::output(
        dir.command(&["check", "--connect", campaign.to_str().unwrap()])
            .env("HIKYAKU_SMTP_PASSWORD", "not-it"),
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("535") && err.contains("HIKYAKU_SMTP_PASSWORD"),
        "{err}"
    );
    assert!(!err.contains("not-it"), "{err}");
    assert!(server.received().is_empty());
}

/// A message over the server's advertised SIZE is a row error found before
/// anything is sent (exit 2, every such row named); with --skip-invalid it
/// is skipped and the rest go out. Before, it was sent, refused with 552
/// and the run ended 0.
#[test]
fn a_message_over_the_servers_size_is_refused_before_sending() {
    let server = SmtpServer::start(&["--size-limit", "6000"]);
    let dir = CampaignDir::new();
    let csv = format!(
        "email,first_name,city\nuser1@example.com,A,Kyoto\nuser2@example.com,B,{}\nuser3@example.com,C,Osaka\n",
        "x".repeat(8000)
    );
    standard_campaign(&dir, &csv, &server.transport_toml(""), "");
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("row 2") && err.contains("6000 bytes"), "{err}");
    assert!(server.received().is_empty());

    let out = dir.send(&["--skip-invalid"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let deliveries = server.deliveries();
    assert_eq!(deliveries.len(), 2, "{deliveries:?}");
    assert!(!deliveries.contains_key("user2@example.com"));
    let skipped = dir.export(Some("skipped"));
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0]["reason"].contains("6000 bytes"), "{skipped:?}");
}
