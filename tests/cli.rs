//! The command line as a newcomer meets it: the shipped example campaign,
//! `init`, bad input, the suppression list, and progress on a real terminal.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{recipients_csv, standard_campaign, text, CampaignDir, SmtpServer, FILE_TRANSPORT};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != "outbox" {
                copy_dir(&entry.path(), &target);
            }
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn eml_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "eml")
            })
            .count()
        })
        .unwrap_or(0)
}

/// SPEC §1: the example writes one .eml per valid row; a second run none.
#[test]
fn the_example_campaign_sends_once_per_valid_row() {
    let dir = CampaignDir::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/newsletter");
    copy_dir(&example, dir.path());
    let campaign = dir.campaign();
    let check = dir.run(&["check", campaign.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));

    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let status = dir.status();
    let rows = std::fs::read_to_string(dir.path().join("recipients.csv"))
        .unwrap()
        .lines()
        .count()
        - 1;
    assert_eq!(status["total"], rows);
    let skipped = status["states"]["skipped"].as_u64().unwrap() as usize;
    assert!(
        skipped >= 2,
        "the example has an invalid and a duplicate row: {status}"
    );
    assert_eq!(eml_count(&dir.path().join("outbox")), rows - skipped);
    assert_eq!(status["states"]["sent"], rows - skipped);
    let err = text(&out.stderr);
    assert!(
        err.contains("invalid address") && err.contains("duplicates row"),
        "{err}"
    );

    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(eml_count(&dir.path().join("outbox")), rows - skipped);
}

#[test]
fn init_writes_a_campaign_that_checks_and_sends() {
    let dir = CampaignDir::new();
    let target = dir.path().join("new");
    let out = dir.run(&["init", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let campaign = target.join("campaign.toml");
    assert_eq!(
        dir.run(&["check", campaign.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(eml_count(&target.join("outbox")), 3);
    // init never overwrites a campaign.
    assert_eq!(
        dir.run(&["init", target.to_str().unwrap()]).status.code(),
        Some(2)
    );
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(1),
        "[transport]\nkind = \"file\"\nconections = 2\n",
        "",
    );
    let out = dir.run(&["check", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    let line = std::fs::read_to_string(dir.campaign())
        .unwrap()
        .lines()
        .position(|l| l.starts_with("conections"))
        .unwrap()
        + 1;
    assert!(
        err.contains("conections") && err.contains(&format!("line {line}")),
        "{err}"
    );
}

#[test]
fn a_malformed_csv_names_its_line_sends_nothing_and_keeps_the_state() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(3), FILE_TRANSPORT, "");
    let campaign = dir.campaign();
    assert_eq!(
        dir.run(&["send", "--limit", "1", campaign.to_str().unwrap()])
            .status
            .code(),
        Some(75)
    );
    let before = dir.export(None);
    dir.write(
        "recipients.csv",
        "email,first_name,city\nuser1@example.com,Name1,City1\nuser9@example.com,\"Name9,City9\nuser2@example.com,Name2\n",
    );
    let out = dir.run(&["send", campaign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("recipients.csv: line "), "{err}");
    assert_eq!(eml_count(&dir.path().join("outbox")), 1);
    let after = dir.export(None);
    assert_eq!(before, after, "a refused file changes no state");
}

#[test]
fn suppression_list_add_import_remove() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(4), FILE_TRANSPORT, "");
    dir.write(
        "unsubscribed.csv",
        "name,email\nA,User1@Example.com\nB,not-an-address\n",
    );
    assert_eq!(
        dir.run(&["suppress", "add", "user2@example.com"])
            .status
            .code(),
        Some(0)
    );
    let out = dir.run(&[
        "suppress",
        "import",
        dir.path().join("unsubscribed.csv").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("line 3"),
        "{}",
        text(&out.stderr)
    );
    let out = dir.run(&["send", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let skipped = dir.export(Some("skipped"));
    let mut emails: Vec<&str> = skipped.iter().map(|r| r["email"].as_str()).collect();
    emails.sort();
    assert_eq!(emails, ["user1@example.com", "user2@example.com"]);
    assert!(skipped.iter().all(|r| r["reason"] == "suppressed"));
    // Removed from the list, the address is sent on the next run.
    assert_eq!(
        dir.run(&["suppress", "remove", "USER2@example.com"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        dir.run(&["send", dir.campaign().to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(eml_count(&dir.path().join("outbox")), 3);
    let list = text(&dir.run(&["suppress", "list"]).stdout).to_lowercase();
    assert!(
        list.contains("user1@example.com") && !list.contains("user2@example.com"),
        "{list}"
    );
}

/// On a real terminal (a pseudo-terminal from `script`) `send` draws a
/// progress bar; with stderr piped it prints plain lines, no bar.
#[test]
fn progress_bar_on_a_terminal_plain_lines_otherwise() {
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(8),
        FILE_TRANSPORT,
        "[limits]\nper_second = 10\n",
    );
    let cmd = format!(
        "{} --db {} send {}",
        common::bin(),
        dir.db().display(),
        dir.campaign().display()
    );
    let out = common::output(
        Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("TERM", "xterm-256color")
            .env("RUST_BACKTRACE", "1")
            .env_remove("NO_COLOR"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let screen = text(&out.stdout);
    assert!(
        screen.contains("/8 done"),
        "no progress bar drawn: {screen:?}"
    );
    assert!(screen.contains("8 messages written"), "{screen:?}");

    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(8),
        FILE_TRANSPORT,
        "[limits]\nper_second = 10\n",
    );
    let out = dir.run(&["send", dir.campaign().to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(!err.contains("=>") && !err.contains('\u{1b}'), "{err:?}");
    assert!(err.contains("8 messages written"), "{err}");
}

#[test]
fn quiet_keeps_warnings_and_the_summary_color_follows_the_flag() {
    let dir = CampaignDir::new();
    let csv = "email,first_name,city\nuser1@example.com,A,X\nnot-an-address,B,Y\n";
    standard_campaign(&dir, csv, FILE_TRANSPORT, "[limits]\nper_second = 100\n");
    let out = dir.run(&["-q", "send", dir.campaign().to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("invalid address") && err.contains("1 message written"),
        "{err}"
    );
    assert!(!err.contains(" INFO "), "-q printed info lines: {err}");

    // A log line (a row that left the file unsent) is coloured only when asked.
    for (flag, ansi) in [("never", false), ("always", true)] {
        let dir = CampaignDir::new();
        let two = "email,first_name,city\nuser1@example.com,A,X\nuser2@example.com,B,Y\n";
        standard_campaign(&dir, two, FILE_TRANSPORT, "");
        let campaign = dir.campaign();
        assert_eq!(
            dir.run(&["send", "--limit", "1", campaign.to_str().unwrap()])
                .status
                .code(),
            Some(75)
        );
        dir.write(
            "recipients.csv",
            "email,first_name,city\nuser1@example.com,A,X\n",
        );
        let out = dir.run(&["--color", flag, "send", campaign.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert!(err.contains("left the file"), "{err}");
        assert_eq!(err.contains('\u{1b}'), ansi, "--color {flag}: {err:?}");
    }
}

/// Regression (SPEC §11): `status | head` panicked on the closed pipe
/// (exit 101) and `export` said "Broken pipe" and exited 1. A reader that
/// stops early ends every printing command quietly.
#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = CampaignDir::new();
    // Enough rows that export fills the pipe's buffer whatever the timing.
    standard_campaign(&dir, &recipients_csv(3000), FILE_TRANSPORT, "");
    dir.write(
        "suppressed.txt",
        (1..=3000)
            .map(|i| format!("gone{i}@example.com\n"))
            .collect::<String>(),
    );
    let campaign = dir.campaign();
    let campaign = campaign.to_str().unwrap();
    let suppressed = dir.path().join("suppressed.txt");
    let out = dir.run(&["suppress", "import", suppressed.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = dir.run(&["send", campaign]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for args in [
        vec!["status", campaign],
        vec!["status", "--json", campaign],
        vec!["export", campaign],
        vec!["suppress", "list"],
        vec!["preview", campaign],
        vec!["send", "--dry-run", campaign],
        vec!["check", campaign],
        vec!["campaigns"],
        vec!["campaigns", "--json"],
    ] {
        let mut child = dir
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = common::finish(child);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
    }
}

/// Regression (SPEC §11): about one `send` in 20 ended with tracing's
/// "tried to clone a span that already closed" panic in a worker thread,
/// on the file transport as on SMTP. Every run's output is checked for a
/// panic by the helpers; enough runs here to meet it.
#[test]
fn the_end_of_a_send_never_panics() {
    for _ in 0..30 {
        let dir = CampaignDir::new();
        standard_campaign(&dir, &recipients_csv(10), FILE_TRANSPORT, "");
        let out = dir.send(&[]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
}

/// Regression (SPEC §9): `send --dry-run --test-to X` sent a real message.
/// A dry run wins over every other flag: it says what would go to X.
#[test]
fn a_dry_run_with_test_to_sends_nothing() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(3), &server.transport_toml(""), "");
    let out = dir.send(&["--dry-run", "--test-to", "me@acme.example", "--limit", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("row 1 (user1@example.com) to me@acme.example")
            && said.contains("row 2 (user2@example.com)")
            && !said.contains("row 3"),
        "{said}"
    );
    assert!(server.received().is_empty(), "a dry run sent a message");
    assert!(dir.recorded().is_empty(), "nothing recorded");
}

/// The lines of one `--help` section (`Arguments:`, `Options:`, ...).
fn help_section<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect()
}

/// Each argument's first line in a section.
fn help_entries<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    help_section(help, heading)
        .into_iter()
        .filter(|l| l.trim_start().starts_with(['-', '<']))
        .collect()
}

/// Regression: `--help` mixed the global options into each command's own,
/// `suppress` arguments had no description, the exit codes were nowhere and
/// `export --state` did not say which states exist.
#[test]
fn help_sets_global_options_apart_describes_every_argument_and_lists_exit_codes() {
    let dir = CampaignDir::new();
    let help = |path: &[String]| {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = dir.run(&args);
        assert_eq!(out.status.code(), Some(0), "{path:?}");
        text(&out.stdout)
    };
    let mut pending: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let page = help(&path);
        for line in help_section(&page, "Commands:") {
            let name = line.split_whitespace().next().unwrap_or("help");
            if name != "help" {
                pending.push([path.clone(), vec![name.to_string()]].concat());
            }
        }
        let global = help_entries(&page, "Global options:");
        assert!(
            global.iter().any(|l| l.contains("--db"))
                && global.iter().any(|l| l.contains("--quiet")),
            "{path:?}: no Global options section\n{page}"
        );
        let own = help_entries(&page, "Options:");
        assert!(
            !own.iter()
                .any(|l| l.contains("--db") || l.contains("--verbose")),
            "{path:?}: global options among the command's own\n{page}"
        );
        for heading in ["Arguments:", "Options:", "Global options:"] {
            for entry in help_entries(&page, heading) {
                let described = entry
                    .trim_start()
                    .split_once("  ")
                    .is_some_and(|(_, about)| !about.trim().is_empty());
                assert!(described, "{path:?}: {entry:?} has no description\n{page}");
            }
        }
        assert!(
            page.contains("Exit codes:\n  0 ") && page.contains("\n  75 "),
            "{path:?}: no exit codes\n{page}"
        );
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} help pages");
    let export = help(&["export".to_string()]);
    assert!(
        export.contains(
            "[possible values: pending, sending, sent, deferred, failed, unknown, skipped"
        ),
        "{export}"
    );
}

/// Regression: stderr mixed `warning:` lines with tracing's ` WARN` and
/// `INFO send: sent …`, and counts read "1 address(es)". Every line now is
/// `error: …`, `warning: …` or plain text, with nouns in the right number.
#[test]
fn every_stderr_line_follows_one_scheme_with_correct_plurals() {
    let dir = CampaignDir::new();
    let csv = "email,first_name,city\nuser1@example.com,A,X\nnot-an-address,B,Y\n\
               USER1@example.com,C,Z\nuser2@example.com,D,W\n";
    standard_campaign(&dir, csv, FILE_TRANSPORT, "");
    dir.write("suppressed.txt", "x@example.com\nnot an address\n");
    let campaign = dir.campaign();
    let campaign = campaign.to_str().unwrap();
    let mut stderr = String::new();
    let mut run = |args: &[&str], code: i32| {
        let out = dir.run(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        stderr.push_str(&err);
    };
    run(&["check", campaign], 0);
    run(&["send", "--limit", "1", campaign], 75);
    // user2 leaves the file unsent: a warning from the send itself.
    dir.write(
        "recipients.csv",
        "email,first_name,city\nuser1@example.com,A,X\nnot-an-address,B,Y\n",
    );
    run(&["send", campaign], 0);
    run(
        &["send", "--dry-run", "--test-to", "me@example.com", campaign],
        0,
    );
    run(&["suppress", "add", "a@example.com"], 0);
    run(&["suppress", "add", "b@example.com", "c@example.com"], 0);
    let list = dir.path().join("suppressed.txt");
    run(&["suppress", "import", list.to_str().unwrap()], 0);
    run(&["send", "missing.toml"], 2);

    for needle in [
        "warning: ",
        "error: ",
        "1 unsent recipient left the file",
        "1 address added",
        "2 addresses added",
        "1 test message would be sent",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in\n{stderr}");
    }
    for line in stderr.lines() {
        let level = line.split([' ', ':']).next().unwrap_or("");
        assert!(
            !["INFO", "WARN", "ERROR", "DEBUG", "TRACE", "send"].contains(&level)
                && !line.starts_with(char::is_whitespace),
            "off-scheme line {line:?} in\n{stderr}"
        );
        assert!(!line.contains("(s)") && !line.contains("(es)"), "{line:?}");
    }
}

/// Before: "is not a valid mailbox: Invalid input", and nothing more.
#[test]
fn a_from_name_with_a_comma_is_shown_quoted() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(1), FILE_TRANSPORT, "");
    let toml = std::fs::read_to_string(dir.campaign()).unwrap();
    let bare = toml.replace(
        "from = \"Acme <news@acme.example>\"",
        "from = \"Acme, Inc <news@acme.example>\"",
    );
    dir.write("campaign.toml", &bare);
    let out = dir.check();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "a name with a comma must be quoted: from = '\"Acme, Inc\" <news@acme.example>'"
        ),
        "{err}"
    );
    let quoted = toml.replace(
        "from = \"Acme <news@acme.example>\"",
        "from = '\"Acme, Inc\" <news@acme.example>'",
    );
    dir.write("campaign.toml", quoted);
    let out = dir.check();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// Regression: times were printed in local time without a zone, so that
/// "09:14" on a server in UTC and on a laptop in Tokyo read the same.
#[test]
fn printed_times_carry_their_utc_offset() {
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(3),
        FILE_TRANSPORT,
        "[limits]\nper_minute = 1\n",
    );
    let campaign = dir.campaign();
    let campaign = campaign.to_str().unwrap();
    let run = |args: &[&str], code: i32| {
        let out = common::output(dir.command(args).env("TZ", "Asia/Tokyo"));
        assert_eq!(out.status.code(), Some(code), "{}", text(&out.stderr));
        text(&out.stdout) + &text(&out.stderr)
    };
    let mut printed = run(&["send", "--dry-run", campaign], 0);
    printed += &run(&["send", "--no-wait", campaign], 75);
    printed += &run(&["status", campaign], 0);
    let timed: Vec<&str> = printed
        .lines()
        .filter(|l| {
            l.starts_with("eta")
                || l.starts_with("next send")
                || l.contains("next send possible at")
        })
        .collect();
    assert!(timed.len() >= 4, "{printed}");
    for line in timed {
        assert!(line.ends_with(" +09:00"), "no zone in {line:?}");
    }
}

/// The sorted names of the files under `outbox/`.
fn outbox_names(dir: &CampaignDir) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Regression: the file transport named files `<uuid>.eml`, so nobody could
/// find a recipient's message. Now the row and the address name it, safely,
/// and a message written again never overwrites the earlier file.
#[test]
fn outbox_files_are_named_by_row_and_address_and_never_overwritten() {
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        "email,first_name,city\nada@example.com,Ada,London\no'brien+news@example.com,Pat,Cork\n",
        FILE_TRANSPORT,
        "",
    );
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let first = outbox_names(&dir);
    assert_eq!(
        first,
        [
            "000001-ada@example.com.eml",
            "000002-o_brien+news@example.com.eml"
        ]
    );
    let ada = std::fs::read(dir.path().join("outbox").join(&first[0])).unwrap();
    assert!(String::from_utf8_lossy(&ada).contains("Hello Ada"));

    // The same rows written again (a fresh state): new files beside the old.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", dir.db().display()));
    }
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(
        outbox_names(&dir),
        [
            "000001-ada@example.com-2.eml",
            "000001-ada@example.com.eml",
            "000002-o_brien+news@example.com-2.eml",
            "000002-o_brien+news@example.com.eml"
        ]
    );
    assert_eq!(
        std::fs::read(dir.path().join("outbox").join(&first[0])).unwrap(),
        ada
    );
}

/// Regression (SPEC §7.6): every `init` campaign was called
/// `my-first-campaign`, so the second one silently sent nothing. `init DIR`
/// names the campaign after DIR.
#[test]
fn two_init_campaigns_are_two_campaigns() {
    let dir = CampaignDir::new();
    for name in ["spring-sale", "autumn news"] {
        let target = dir.path().join(name);
        let out = dir.run(&["init", target.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let campaign = target.join("campaign.toml");
        let out = dir.run(&["send", campaign.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(eml_count(&target.join("outbox")), 3, "{name}");
    }
    let toml = std::fs::read_to_string(dir.path().join("autumn news/campaign.toml")).unwrap();
    assert!(toml.contains("name = \"autumn-news\""), "{toml}");
}

/// SPEC §7.6: a name is bound to the campaign file first sent with it;
/// another file with that name is refused by send, check and status (exit
/// 2, naming the owner and what to do) until the old state is reset.
#[test]
fn a_name_owned_by_another_campaign_file_is_refused_until_reset() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(3), FILE_TRANSPORT, "");
    let first = dir.campaign();
    assert_eq!(dir.send(&[]).status.code(), Some(0));
    let other = CampaignDir::new();
    let copy = other.path();
    copy_dir(dir.path(), copy);
    let second = copy.join("campaign.toml");
    let second = second.to_str().unwrap();
    for command in ["send", "check", "status", "export"] {
        let out = dir.run(&[command, second]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(
            err.contains(first.to_str().unwrap()) && err.contains("hikyaku reset"),
            "{command}: {err}"
        );
    }
    assert_eq!(eml_count(&copy.join("outbox")), 0);

    // Without a terminal, reset needs --yes; then the name is free again.
    let out = dir.run(&["reset", second]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--yes"), "{}", text(&out.stderr));
    let out = dir.run(&["reset", "--yes", second]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = dir.run(&["send", second]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(eml_count(&copy.join("outbox")), 3);
    // Now the first file is the stranger.
    let out = dir.run(&["send", first.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// `campaigns` lists every campaign with its file, states and last
/// activity; `reset NAME` (a bare name that is not a file) forgets one.
#[test]
fn campaigns_lists_and_reset_forgets_by_name() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(3), FILE_TRANSPORT, "");
    assert_eq!(dir.send(&["--limit", "2"]).status.code(), Some(75));
    let out = dir.run(&["campaigns", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = std::fs::canonicalize(dir.campaign()).unwrap();
    assert_eq!(list[0]["campaign"], "test-campaign", "{list}");
    assert_eq!(list[0]["file"], file.to_str().unwrap(), "{list}");
    assert_eq!(list[0]["rehearsal_states"]["sent"], 2, "{list}");
    assert_eq!(list[0]["rehearsal_states"]["pending"], 1, "{list}");
    assert!(list[0]["states"].is_null(), "nothing was delivered: {list}");
    assert!(list[0]["last_activity"].as_str().unwrap().ends_with('Z'));
    let out = dir.run(&["campaigns"]);
    let said = text(&out.stdout);
    assert!(
        said.contains("test-campaign") && said.contains("rehearsal") && said.contains("2 sent"),
        "{said}"
    );

    let out = dir.run(&["reset", "--yes", "test-campaign"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = dir.run(&["campaigns", "--json"]);
    assert_eq!(text(&out.stdout).trim(), "[]");
    let out = dir.run(&["reset", "--yes", "no-such-campaign"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// On a terminal, reset asks; anything but yes leaves the state alone.
#[test]
fn reset_asks_on_a_terminal() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(2), FILE_TRANSPORT, "");
    assert_eq!(dir.send(&[]).status.code(), Some(0));
    for (answer, code, left) in [("n", 2, 1), ("y", 0, 0)] {
        let cmd = format!(
            "{} --db {} reset test-campaign; echo exit=$?",
            common::bin(),
            dir.db().display()
        );
        // script gives the command a terminal and types what it reads.
        let mut child = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        let out = common::finish(child);
        let screen = text(&out.stdout);
        assert!(screen.contains(&format!("exit={code}")), "{screen}");
        let listed = dir.run(&["campaigns", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
        assert_eq!(list.as_array().unwrap().len(), left, "{screen}");
    }
}

/// Regression (SPEC §7.5): the README's quick start (send to files, look,
/// switch [transport] to SMTP) ended with nothing sent, as the file run had
/// marked every row `sent`. A file run is a rehearsal: it resumes like a
/// run, says that nothing was delivered, and leaves the SMTP run everyone;
/// its sends count in no SMTP account's windows.
#[test]
fn a_rehearsal_through_files_is_not_delivery() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        &recipients_csv(5),
        FILE_TRANSPORT,
        "[limits]\nper_second = 50\nper_day = 100\n",
    );
    let out = dir.send(&["--limit", "2"]);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("rehearsal: 3 messages written to outbox/")
            && err.contains("nothing was delivered"),
        "{err}"
    );
    assert_eq!(
        eml_count(&dir.path().join("outbox")),
        5,
        "the rehearsal resumed"
    );
    let status = dir.status();
    assert_eq!(status["rehearsal"], true, "{status}");
    assert_eq!(status["states"]["sent"], 5, "{status}");

    standard_campaign(
        &dir,
        &recipients_csv(5),
        &server.transport_toml(""),
        "[limits]\nper_second = 50\nper_day = 100\n",
    );
    let status = dir.status();
    assert_eq!(status["rehearsal"], false, "{status}");
    assert_eq!(status["states"]["sent"], 0, "{status}");
    assert_eq!(status["states"]["pending"], 5, "{status}");
    let windows = status["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 2, "{status}");
    assert!(
        windows.iter().all(|w| w["used"] == 0),
        "file sends count for no account: {status}"
    );
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("sent 5 in this run"),
        "{}",
        text(&out.stderr)
    );
    let deliveries = server.deliveries();
    assert_eq!(deliveries.len(), 5, "{deliveries:?}");
    assert!(deliveries.values().all(|n| *n == 1), "{deliveries:?}");
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        server.received().len(),
        5,
        "a second SMTP run sends nothing"
    );
    assert_eq!(dir.status()["states"]["sent"], 5);
}

/// Regression: `suppress add good bad` added `good` and then failed on
/// `bad`, leaving the list half updated, and never said how many of the
/// addresses were already on it.
#[test]
fn suppress_add_checks_every_address_then_adds_all_or_none() {
    let dir = CampaignDir::new();
    let out = dir.run(&["suppress", "add", "ok@example.com", "not-an-address", "x@"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("\"not-an-address\"")
            && err.contains("\"x@\"")
            && err.contains("nothing was added"),
        "{err}"
    );
    let list = text(&dir.run(&["suppress", "list"]).stdout);
    assert!(!list.contains("ok@example.com"), "{list}");

    let out = dir.run(&["suppress", "add", "a@example.com", "B@example.com"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("2 addresses added"),
        "{}",
        text(&out.stderr)
    );
    let out = dir.run(&[
        "suppress",
        "add",
        "b@example.com",
        "c@example.com",
        "C@example.com",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("1 address added to the suppression list (1 already on it)"),
        "{}",
        text(&out.stderr)
    );
}

/// `send --retry-failed` gives `failed` recipients one more round, attempts
/// counted afresh; an address on the suppression list (a 5.1.1 bounce)
/// stays failed. A dry run only counts them.
#[test]
fn retry_failed_sends_failed_recipients_once_more_but_not_suppressed_ones() {
    let first = SmtpServer::start(&[
        "--reject",
        "user2@example.com=552 5.3.4 Message too big for this mailbox",
        "--reject",
        "user3@example.com=550 5.1.1 The email account that you tried to reach does not exist.",
    ]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(4), &first.transport_toml(""), "");
    assert_eq!(dir.send(&[]).status.code(), Some(0));
    assert_eq!(first.received().len(), 2);
    assert_eq!(dir.status()["states"]["failed"], 2);

    let second = SmtpServer::start(&[]);
    standard_campaign(&dir, &recipients_csv(4), &second.transport_toml(""), "");
    assert_eq!(dir.send(&[]).status.code(), Some(0));
    assert!(
        second.received().is_empty(),
        "failed rows wait for --retry-failed"
    );
    let out = dir.send(&["--retry-failed", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 would be sent"),
        "{}",
        text(&out.stdout)
    );
    assert!(second.received().is_empty());

    let out = dir.send(&["--retry-failed"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let deliveries = second.deliveries();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries.get("user2@example.com"), Some(&1));
    let rows = dir.export(None);
    let row = |email: &str| rows.iter().find(|r| r["email"] == email).unwrap();
    assert_eq!(row("user2@example.com")["state"], "sent");
    assert_eq!(row("user2@example.com")["attempts"], "1");
    assert_eq!(row("user3@example.com")["state"], "failed");
    assert!(row("user3@example.com")["last_reply"].starts_with("550 5.1.1"));
}

/// Regression: `status` of a campaign never sent said "0 rows" and
/// `export` failed. Both show the file's rows as the first send would
/// record them, and leave no trace in the database.
#[test]
fn status_and_export_of_a_campaign_never_sent_show_its_rows() {
    let dir = CampaignDir::new();
    let csv =
        "email,first_name,city\nuser1@example.com,A,X\nnot-an-address,B,Y\nuser2@example.com,C,Z\n";
    standard_campaign(&dir, csv, FILE_TRANSPORT, "");
    let status = dir.status();
    assert_eq!(status["total"], 3, "{status}");
    assert_eq!(status["states"]["pending"], 2, "{status}");
    assert_eq!(status["states"]["skipped"], 1, "{status}");
    let out = dir.run(&["status", dir.campaign().to_str().unwrap()]);
    let said = text(&out.stdout);
    assert!(
        said.contains("3 rows") && said.contains("not started yet"),
        "{said}"
    );

    let rows = dir.export(None);
    let states: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["email"].as_str(), r["state"].as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("user1@example.com", "pending"),
            ("not-an-address", "skipped"),
            ("user2@example.com", "pending")
        ]
    );
    assert_eq!(rows[0]["first_name"], "A");
    assert_eq!(dir.export(Some("pending")).len(), 2);
    let listed = dir.run(&["campaigns", "--json"]);
    assert_eq!(
        text(&listed.stdout).trim(),
        "[]",
        "status and export leave no trace"
    );
}

/// `reset` of a campaign being sent is refused (exit 1), naming the process,
/// and changes nothing.
#[test]
fn reset_is_refused_while_the_campaign_is_sent() {
    let server = SmtpServer::start(&["--delay-ms", "300"]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(20), &server.transport_toml(""), "");
    let mut sending = dir
        .send_command(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.received().is_empty() {
        assert!(std::time::Instant::now() < deadline, "nothing was sent");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = dir.run(&["reset", "--yes", dir.campaign().to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("process {}", sending.id())), "{err}");
    assert_eq!(dir.recorded(), ["test-campaign"]);
    sending.kill().unwrap();
    sending.wait().unwrap();
    // Its runner gone, the campaign can be reset.
    let out = dir.run(&["reset", "--yes", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(dir.recorded().is_empty());
}

/// A dry run only reads (SPEC §9): it makes no row for a campaign never
/// sent, so dry runs at once never take each other's row away.
/// Before, each made the row, read into it and removed it again: a
/// second dry run that found the first one's row lost it mid-read.
#[test]
fn dry_runs_at_once_make_no_row_for_each_other() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(3_000), FILE_TRANSPORT, "");
    for round in 0..4 {
        let children: Vec<_> = (0..4)
            .map(|_| {
                dir.send_command(&["--dry-run"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = common::finish(child);
            assert_eq!(
                out.status.code(),
                Some(0),
                "round {round}: {}",
                text(&out.stderr)
            );
            assert!(
                text(&out.stdout).contains("3000 would be sent"),
                "{}",
                text(&out.stdout)
            );
        }
    }
    let out = dir.run(&["campaigns", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listed,
        serde_json::json!([]),
        "a dry run left a campaign row"
    );
}
