//! `hikyaku report` end to end: a campaign brought into every state
//! through the real binary (a kill -9 in flight, a refused and a deferred
//! recipient, a stop at --limit, bounces read from a real mailbox), whose
//! report must say what `status --json` and `export` say; and, where
//! Chromium is installed, the page rendered to an image that is not blank.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::imap::{dsn_about, skip, ImapServer, POSTFIX};
use common::{text, CampaignDir, SmtpServer, FILE_TRANSPORT, PASSWORD, USER};

const STATES: [&str; 8] = [
    "pending", "sending", "sent", "deferred", "failed", "unknown", "skipped", "bounced",
];

fn campaign(dir: &CampaignDir, transport: &str, imap: &str) {
    let mut csv = common::recipients_csv(14);
    csv.push_str("not-an-address,Bad,Nowhere\nuser2@example.com,Again,Twice\n");
    dir.write("recipients.csv", csv)
        .write("templates/body.txt.hbs", "Hello {{first_name}}!\n")
        .write(
            "campaign.toml",
            format!(
                "name = \"report-campaign\"\n[recipients]\nfile = \"recipients.csv\"\n\n[message]\n\
                 from = \"Acme <news@acme.example>\"\nsubject = \"{{{{first_name}}}}, your update\"\n\
                 text = \"templates/body.txt.hbs\"\n\n[retry]\nmax_attempts = 3\nbackoff = \"1h\"\n\n\
                 {transport}{imap}"
            ),
        );
}

/// Every value of the attribute `attr` in the page, in order.
fn values(html: &str, attr: &str) -> Vec<String> {
    let key = format!(" {attr}=\"");
    html.split(&key)
        .skip(1)
        .map(|rest| rest[..rest.find('"').unwrap()].to_string())
        .collect()
}

/// `attr="value" data-count="n"` pairs of the page, e.g. the state tiles.
fn pairs(html: &str, attr: &str) -> Vec<(String, i64)> {
    let key = format!(" {attr}=\"");
    html.split(&key)
        .skip(1)
        .map(|rest| {
            let value = rest[..rest.find('"').unwrap()].to_string();
            let count = &values(rest, "data-count")[0];
            (value, count.parse().unwrap())
        })
        .collect()
}

fn number(html: &str, attr: &str) -> i64 {
    let found = values(html, attr);
    found
        .first()
        .unwrap_or_else(|| panic!("no {attr}"))
        .parse()
        .unwrap()
}

/// Starts `send --limit 1` against a server that holds every message, and
/// kills it (SIGKILL) once its recipient is durably `sending`.
fn kill_in_flight(dir: &CampaignDir) {
    let mut child = dir
        .send_command(&["--limit", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while dir.status()["states"]["sending"] == 0 {
        assert!(Instant::now() < deadline, "no recipient became sending");
        if child.try_wait().unwrap().is_some() {
            let out = common::finish(child);
            panic!("send ended by itself: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    common::finish(child);
}

/// Every state present; the report's counts per state, total, bounce
/// codes, problem rows and transactions are those of `status --json` and
/// `export`.
#[test]
fn the_report_says_what_status_and_export_say() {
    let Some(imap) =
        ImapServer::start("the_report_says_what_status_and_export_say", USER, PASSWORD)
    else {
        return;
    };
    let holding = SmtpServer::start(&["--delay-ms", "60000"]);
    let smtp = SmtpServer::start(&[
        "--reject",
        "user3@example.com=550 5.1.1 The email account that you tried to reach does not exist.",
        "--reject",
        "user4@example.com=452 4.2.2 The email account that you tried to reach is over quota.",
    ]);
    let dir = CampaignDir::new();
    let imap_toml = imap.imap_toml("");
    // The campaign exists before `status` watches a send: a status of a
    // campaign never sent reads the file on its own.
    for _ in 0..2 {
        campaign(&dir, &smtp.transport_toml(""), &imap_toml);
        let out = dir.send(&["--limit", "5", "--no-wait"]);
        assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
        campaign(&dir, &holding.transport_toml(""), &imap_toml);
        kill_in_flight(&dir);
    }

    let rows = dir.export(None);
    let sent: Vec<&HashMap<String, String>> =
        rows.iter().filter(|r| r["state"] == "sent").collect();
    assert!(sent.len() >= 3, "{rows:?}");
    for row in &sent[..2] {
        imap.deliver(
            "INBOX",
            &dsn_about("postfix.eml", POSTFIX, &row["email"], &row["message_id"]),
        );
    }
    let campaign_file = dir.campaign();
    let campaign_file = campaign_file.to_str().unwrap();
    let out = dir.run(&["bounces", campaign_file]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let page = dir.path().join("report.html");
    let out = dir.run(&["report", campaign_file, "-o", page.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    let status = dir.status();
    let rows = dir.export(None);
    let in_state = |s: &str| rows.iter().filter(|r| r["state"] == s).count() as i64;
    let tiles: HashMap<String, i64> = pairs(&html, "data-state").into_iter().collect();
    assert_eq!(tiles.len(), STATES.len(), "{tiles:?}");
    for state in STATES {
        assert!(in_state(state) >= 1, "no {state} row: {rows:?}");
        assert_eq!(tiles[state], status["states"][state], "{state}");
        assert_eq!(tiles[state], in_state(state), "{state}");
    }
    assert_eq!(number(&html, "data-total"), status["total"]);
    assert_eq!(number(&html, "data-total"), rows.len() as i64);
    let codes = pairs(&html, "data-bounce-code");
    assert_eq!(codes, [("5.1.1".to_string(), 2)]);
    let problems: i64 = ["failed", "bounced", "deferred", "unknown"]
        .iter()
        .map(|s| in_state(s))
        .sum();
    assert_eq!(number(&html, "data-problems"), problems);
    let attempts: i64 = rows
        .iter()
        .map(|r| r["attempts"].parse::<i64>().unwrap())
        .sum();
    assert_eq!(number(&html, "data-transactions"), attempts);
    let replies: i64 = pairs(&html, "data-reply").iter().map(|(_, n)| n).sum();
    let with_reply = rows.iter().filter(|r| !r["last_reply"].is_empty()).count() as i64;
    assert_eq!(replies, with_reply);
    assert_eq!(values(&html, "data-domain"), ["example.com"]);
    assert_eq!(
        number(&html, "data-recipients"),
        rows.len() as i64 - in_state("skipped")
    );

    // Standard output when it is not a terminal: the same page.
    let out = dir.run(&["report", campaign_file]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("<!DOCTYPE html>"));
}

/// Where Chromium is installed, the report opens in it and renders to an
/// image that is not blank.
#[test]
fn the_report_renders_in_a_browser() {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file());
    let Some(chromium) = chromium else {
        skip(
            "the_report_renders_in_a_browser",
            "chromium is not installed",
        );
        return;
    };
    let dir = CampaignDir::new();
    campaign(&dir, FILE_TRANSPORT, "");
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let page = dir.path().join("report.html");
    let campaign_file = dir.campaign();
    let out = dir.run(&[
        "report",
        campaign_file.to_str().unwrap(),
        "-o",
        page.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let png = dir.path().join("report.png");
    let mut child = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1200,1600")
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png).expect("chromium wrote no screenshot"),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let channels = info.color_type.samples();
    let pixels = &pixels[..info.buffer_size()];
    let background = &pixels[..channels];
    let mut colors = std::collections::HashSet::new();
    let mut painted = 0usize;
    for px in pixels.chunks(channels) {
        if px != background {
            painted += 1;
        }
        if colors.len() < 100 {
            colors.insert(px.to_vec());
        }
    }
    let total = pixels.len() / channels;
    assert!(
        colors.len() >= 10 && painted * 50 > total,
        "blank screenshot: {} colours, {painted} of {total} pixels painted",
        colors.len()
    );
}
