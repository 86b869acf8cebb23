//! What `send` draws while it works (SPEC §9): on a real terminal (a
//! pseudo-terminal from util-linux `script`) a bar with the campaign's
//! counts, an ETA from the account's windows, readable rates, log lines
//! that never break it, and a spinner during the pre-send check; plain
//! lines with the campaign's counts otherwise.

mod common;

use std::process::Command;

use common::{recipients_csv, standard_campaign, text, CampaignDir, SmtpServer, FILE_TRANSPORT};

/// Paced at 20/s, and at most 2 recipients in any 3 s: after two sends the
/// run waits for the window.
const LIMITS: &str = "[limits]\nper_second = 20\nwindows = [{ max = 2, period = \"3s\" }]\n";

/// Runs `hikyaku ARGS` in a pseudo-terminal; what it drew, escapes included.
fn on_terminal(dir: &CampaignDir, args: &str) -> String {
    let cmd = format!("{} --db {} {args}", common::bin(), dir.db().display());
    let out = common::output(
        Command::new("script")
            .args(["-qfec", &cmd, "/dev/null"])
            .env("TERM", "xterm-256color")
            .env("HIKYAKU_SMTP_PASSWORD", common::PASSWORD)
            .env("RUST_BACKTRACE", "1")
            .env_remove("NO_COLOR")
            .env_remove("HIKYAKU_DB"),
    );
    let screen = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{screen:?}");
    screen
}

/// The screen without its colour codes (`ESC [ ... m`); cursor moves kept.
fn without_colours(screen: &str) -> String {
    let mut out = String::with_capacity(screen.len());
    let mut rest = screen;
    while let Some(at) = rest.find("\u{1b}[") {
        out.push_str(&rest[..at]);
        let seq = &rest[at + 2..];
        let end = seq
            .find(|c: char| c.is_ascii_alphabetic())
            .map_or(seq.len(), |i| i + 1);
        if !seq[..end].ends_with('m') {
            out.push_str(&rest[at..at + 2 + end]);
        }
        rest = &seq[end..];
    }
    out.push_str(rest);
    out
}

/// Every rate drawn (`12.5/s`, `10/min`, `3/h`) has at most one decimal.
fn assert_rates_have_one_decimal(screen: &str) {
    for unit in ["/s", "/min", "/h"] {
        for (at, _) in screen.match_indices(unit) {
            let number: String = screen[..at]
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect::<String>()
                .chars()
                .rev()
                .collect();
            if let Some((_, decimals)) = number.split_once('.') {
                assert!(decimals.len() <= 1, "rate {number}{unit} in {screen:?}");
            }
        }
    }
}

/// Caught before: `0/4 sent  0/s  ETA 0s` while the window was full, for a
/// campaign of 6 with 2 already sent; rates like `0.3437/s`.
#[test]
fn the_bar_shows_the_campaign_and_an_eta_from_its_windows() {
    let server = SmtpServer::start(&["--reject", "user3@example.com=550 5.1.1 no such user"]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(6), &server.transport_toml(""), LIMITS);
    let campaign = dir.campaign();
    let first = dir.send(&["--limit", "2"]);
    assert_eq!(first.status.code(), Some(75), "{}", text(&first.stderr));

    let screen = on_terminal(&dir, &format!("send {}", campaign.display()));
    assert!(
        screen.contains("2/6 done"),
        "the count starts at what was sent: {screen:?}"
    );
    assert!(!screen.contains("/4 "), "{screen:?}");
    assert!(!screen.contains("ETA 0s"), "{screen:?}");
    // While the window is full the bar says so, with the time left.
    let waiting = screen
        .split(['\r', '\n'])
        .find(|l| l.contains("2/2 reached"))
        .unwrap_or_else(|| panic!("no wait drawn: {screen:?}"));
    let eta = waiting
        .split("ETA ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no ETA while waiting: {waiting:?}"));
    assert!(eta.ends_with('s') && eta != "0s", "{waiting:?}");
    assert_rates_have_one_decimal(&screen);
    // A line logged while the bar is drawn starts where the bar was erased:
    // after a line end, a line erase or a cursor move to the erased line.
    let plain = without_colours(&screen);
    let failed = plain
        .find("warning: row 3")
        .unwrap_or_else(|| panic!("no warning for the refused row: {screen:?}"));
    let before = &plain[..failed];
    assert!(
        ["\n", "\r", "\u{1b}[2K", "\u{1b}[1A"]
            .iter()
            .any(|end| before.ends_with(end)),
        "the warning broke the bar's line: {:?}",
        &before[before.len().saturating_sub(80)..]
    );
    assert!(
        plain[failed..]
            .starts_with("warning: row 3 (user3@example.com): failed: 550 5.1.1 no such user\r\n"),
        "{plain:?}"
    );
    assert!(screen.contains("total: 5 sent, 1 failed"), "{screen:?}");
    assert_eq!(server.deliveries().len(), 5);
}

/// Caught before: plain lines counted this run only (`sent 0/4`), and said
/// nothing while waiting for a window.
#[test]
fn plain_lines_show_the_campaign_counts() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(4), FILE_TRANSPORT, LIMITS);
    let out = dir.send(&[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("0/4 done, 4 to send, ETA "), "{err}");
    assert!(err.contains("2/4 done; limit per 3s 2/2 reached"), "{err}");
    assert!(!err.contains('\u{1b}'), "{err:?}");
    assert_rates_have_one_decimal(&err);
}

/// Caught before: nothing at all was drawn while a big file was checked.
#[test]
fn the_pre_send_check_shows_the_rows_checked() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(20_000), FILE_TRANSPORT, "");
    let screen = on_terminal(&dir, &format!("check {}", dir.campaign().display()));
    let counts: Vec<u64> = screen
        .match_indices("checking recipients.csv: ")
        .filter_map(|(at, m)| {
            let rest = &screen[at + m.len()..];
            let digits: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == ',')
                .filter(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect();
    assert!(
        counts.iter().any(|n| *n >= 1024),
        "no rows counted while checking: {counts:?} in {screen:?}"
    );
}
