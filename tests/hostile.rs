//! Hostile input (SPEC §11): campaign files, templates, attachments and
//! password sources built to crash, hang or mislead. Every case runs
//! through `check` and `send` under a deadline and must end with a clear
//! one-line cause naming the file, row or key: exit 2 (or 1 for a runtime
//! fault), never a panic, never a signal, never a hang, nothing sent, and
//! no file touched that is not hikyaku's.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{text, CampaignDir, FILE_TRANSPORT};

/// Longer than any case needs once it is bounded; a hang is killed here.
const DEADLINE: Duration = Duration::from_secs(20);

/// An SMTP transport to a closed loopback port with a login, so that the
/// password source is read and nothing can ever be delivered.
macro_rules! smtp_nowhere {
    () => {
        "[transport]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = 9\ntls = \"none\"\n\
         username = \"me@acme.example\"\ntimeout = \"2s\"\n"
    };
}

struct Case {
    /// `[message]` keys after `from`.
    message: &'static str,
    /// `[transport]` and any further sections.
    rest: &'static str,
    /// Files besides campaign.toml and recipients.csv, and anything odd.
    setup: fn(&CampaignDir),
    /// What `check` may answer: some cases are found only when sending
    /// (the password is read then).
    check_may_pass: bool,
    /// Words the one-line cause must hold.
    cause: &'static [&'static str],
    /// Text that must never be printed (a password in the wrong key).
    secret: Option<&'static str>,
}

const CASE: Case = Case {
    message: "subject = \"Hello\"\ntext = \"templates/body.txt.hbs\"",
    rest: FILE_TRANSPORT,
    setup: |_| {},
    check_may_pass: false,
    cause: &[],
    secret: None,
};

/// One run of the binary, killed at the deadline.
struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

fn run_bounded(mut cmd: Command) -> Run {
    let out = tempfile::tempdir().unwrap();
    let (stdout, stderr) = (out.path().join("stdout"), out.path().join("stderr"));
    cmd.stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap());
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            // The whole group: a password command hikyaku left behind too.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    #[cfg(unix)]
    let signal = status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s));
    #[cfg(not(unix))]
    let signal = None;
    let run = Run {
        code: status.and_then(|s| s.code()),
        signal,
        stdout: text(&std::fs::read(stdout).unwrap()),
        stderr: text(&std::fs::read(stderr).unwrap()),
        timed_out: status.is_none(),
    };
    assert!(
        !run.stderr.contains("panicked") && !run.stdout.contains("panicked"),
        "hikyaku panicked: {}",
        run.stderr
    );
    run
}

/// Every file under `dir` that is not hikyaku's (the state database and
/// the outbox), with its size and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(folder) = todo.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("state.db") || name == "outbox" {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path.clone());
            }
            files.insert(path, (meta.len(), meta.modified().ok()));
        }
    }
    files
}

fn hostile(case: Case) {
    let dir = CampaignDir::new();
    dir.write("recipients.csv", "email,name\nada@example.com,Ada\n")
        .write("templates/body.txt.hbs", "Hello {{name}}\n")
        .write(
            "campaign.toml",
            format!(
                "name = \"hostile\"\n[recipients]\nfile = \"recipients.csv\"\n\n[message]\n\
                 from = \"Acme <news@acme.example>\"\n{}\n\n{}",
                case.message, case.rest
            ),
        );
    (case.setup)(&dir);
    let before = snapshot(dir.path());
    let campaign = dir.campaign();
    let campaign = campaign.to_str().unwrap();
    for command in ["check", "send"] {
        let run = run_bounded(dir.command(&[command, campaign]));
        let said = format!(
            "hikyaku {command}: exit {:?}, signal {:?}\nstdout: {}\nstderr: {}",
            run.code, run.signal, run.stdout, run.stderr
        );
        assert!(!run.timed_out, "still running after {DEADLINE:?}: {said}");
        assert_eq!(run.signal, None, "{said}");
        assert!(!run.stderr.contains("panicked"), "{said}");
        let passed = command == "check" && case.check_may_pass && run.code == Some(0);
        if !passed {
            assert!(matches!(run.code, Some(1 | 2)), "{said}");
            assert!(
                run.stderr
                    .lines()
                    .any(|l| case.cause.iter().all(|word| l.contains(word))),
                "no line names {:?}: {said}",
                case.cause
            );
        }
        assert!(
            run.stderr.lines().all(|l| l.chars().count() < 1000),
            "an endless line: {said}"
        );
        if let Some(secret) = case.secret {
            assert!(
                !run.stderr.contains(secret) && !run.stdout.contains(secret),
                "the secret was printed: {said}"
            );
        }
        let outbox = dir.path().join("outbox");
        assert!(
            std::fs::read_dir(&outbox).map_or(true, |mut d| d.next().is_none()),
            "something was sent: {said}"
        );
        assert_eq!(snapshot(dir.path()), before, "a file was touched: {said}");
    }
}

/// The table: one test per hostile input.
macro_rules! hostile {
    ($($(#[$attr:meta])* $name:ident: $case:expr;)*) => {$(
        $(#[$attr])*
        #[test]
        fn $name() {
            hostile($case);
        }
    )*};
}

fn sparse(dir: &CampaignDir, name: &str, len: u64) {
    let path = dir.path().join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

#[cfg(unix)]
fn fifo(dir: &CampaignDir, name: &str) {
    let path = dir.path().join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let status = Command::new("mkfifo").arg(&path).status().unwrap();
    assert!(status.success());
}

hostile! {
    // Secrets pasted into the wrong key are never echoed.
    a_password_pasted_into_password_env: Case {
        rest: concat!(smtp_nowhere!(), "password_env = \"abcd efgh ijkl mnop\"\n"),
        cause: &["campaign.toml", "password_env"],
        secret: Some("abcd"),
        ..CASE
    };
    a_password_that_is_a_valid_variable_name: Case {
        rest: concat!(smtp_nowhere!(), "password_env = \"qwertyuiopasdfgh\"\n"),
        check_may_pass: true,
        cause: &["campaign.toml", "password_env"],
        secret: Some("qwertyuiopasdfgh"),
        ..CASE
    };
    a_password_pasted_into_password_file: Case {
        rest: concat!(smtp_nowhere!(), "password_file = \"qwertyuiopasdfgh\"\n"),
        check_may_pass: true,
        cause: &["campaign.toml", "password_file"],
        secret: Some("qwertyuiopasdfgh"),
        ..CASE
    };
    a_password_pasted_into_password_command: Case {
        rest: concat!(smtp_nowhere!(), "password_command = \"qwertyuiopasdfgh\"\n"),
        check_may_pass: true,
        cause: &["campaign.toml", "password_command"],
        secret: Some("qwertyuiopasdfgh"),
        ..CASE
    };
    a_toml_syntax_error_on_a_password_line: Case {
        rest: "[transport]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\npassword_env = qwerty uiop\n",
        cause: &["campaign.toml", "line 13"],
        secret: Some("qwerty"),
        ..CASE
    };

    // Password sources that never end, or never stop talking.
    a_password_command_that_never_ends: Case {
        rest: concat!(
            smtp_nowhere!(),
            "password_command = \"sleep 1000\"\n",
            "password_command_timeout = \"1s\"\n"
        ),
        check_may_pass: true,
        cause: &["campaign.toml", "password_command", "1s"],
        ..CASE
    };
    a_password_command_with_endless_output: Case {
        rest: concat!(
            smtp_nowhere!(),
            "password_command = \"yes\"\n"
        ),
        check_may_pass: true,
        cause: &["campaign.toml", "password_command"],
        ..CASE
    };
    a_password_file_without_end: Case {
        rest: concat!(
            smtp_nowhere!(),
            "password_file = \"/dev/zero\"\n"
        ),
        check_may_pass: true,
        cause: &["campaign.toml", "password_file", "/dev/zero"],
        ..CASE
    };

    // Durations beyond any calendar.
    an_absurd_window_period: Case {
        rest: "[transport]\nkind = \"file\"\n[limits]\nwindows = [{ max = 1, period = \"999999999d\" }]\n",
        cause: &["campaign.toml", "[limits]", "period"],
        ..CASE
    };
    an_absurd_timeout: Case {
        rest: "[transport]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\ntimeout = \"999999999d\"\n",
        cause: &["campaign.toml", "[transport] timeout"],
        ..CASE
    };

    // The campaign file itself.
    a_toml_line_of_200_kb: Case {
        setup: |dir| {
            let nested = format!("name = \"x\"\njunk = {}\n", "[".repeat(200_000));
            dir.write("campaign.toml", nested);
        },
        cause: &["campaign.toml", "line 2"],
        ..CASE
    };
    an_unknown_key_of_200_kb: Case {
        rest: "[transport]\nkind = \"file\"\n",
        setup: |dir| {
            let path = dir.path().join("campaign.toml");
            let mut toml = std::fs::read_to_string(&path).unwrap();
            toml.push_str(&format!("{} = 1\n", "k".repeat(200_000)));
            std::fs::write(path, toml).unwrap();
        },
        cause: &["campaign.toml", "unknown field"],
        ..CASE
    };
    a_campaign_file_of_gigabytes: Case {
        setup: |dir| sparse(dir, "campaign.toml", 4 << 30),
        cause: &["campaign.toml", "4.0 GB"],
        ..CASE
    };
    // Partials that never end, or grow without end.
    partials_that_include_each_other: Case {
        setup: |dir| {
            dir.write("templates/body.txt.hbs", "{{> header}}\n")
                .write("templates/partials/header.hbs", "Hi {{> footer}}\n")
                .write("templates/partials/footer.hbs", "Bye {{> header}}\n");
        },
        cause: &["templates/partials", "footer → header → footer"],
        ..CASE
    };
    a_partial_that_includes_itself: Case {
        setup: |dir| {
            dir.write("templates/body.txt.hbs", "{{> again}}\n")
                .write("templates/partials/again.hbs", "Again {{> again}}\n");
        },
        cause: &["templates/partials", "again → again"],
        ..CASE
    };
    three_partials_in_a_loop_behind_a_condition: Case {
        setup: |dir| {
            dir.write("templates/body.txt.hbs", "{{> a}}\n")
                .write("templates/partials/a.hbs", "{{#if name}}{{> b}}{{/if}}")
                .write("templates/partials/b.hbs", "{{#> c}}block{{/c}}")
                .write("templates/partials/c.hbs", "{{> a}} {{> @partial-block}}");
        },
        cause: &["templates/partials", "a → b → c → a"],
        ..CASE
    };
    partials_that_grow_past_a_message: Case {
        setup: |dir| {
            dir.write("templates/body.txt.hbs", "{{> p4}}\n")
                .write("templates/partials/p0.hbs", "x".repeat(3000));
            for level in 1..=4 {
                let below = format!("{{{{> p{}}}}}", level - 1);
                dir.write(&format!("templates/partials/p{level}.hbs"), below.repeat(10));
            }
        },
        cause: &["body.txt.hbs", "25 MB"],
        ..CASE
    };
    a_cell_repeated_past_a_message: Case {
        setup: |dir| {
            dir.write("recipients.csv", format!("email,name\nada@example.com,{}\n", "y".repeat(100_000)))
                .write("templates/body.txt.hbs", "{{name}}".repeat(300));
        },
        cause: &["row 1", "body.txt.hbs", "25 MB"],
        ..CASE
    };
    a_template_of_gigabytes: Case {
        setup: |dir| sparse(dir, "templates/body.txt.hbs", 4 << 30),
        cause: &["body.txt.hbs", "4.0 GB"],
        ..CASE
    };
    #[cfg(unix)]
    a_template_that_is_a_named_pipe: Case {
        setup: |dir| {
            std::fs::remove_file(dir.path().join("templates/body.txt.hbs")).unwrap();
            fifo(dir, "templates/body.txt.hbs");
        },
        cause: &["body.txt.hbs", "named pipe"],
        ..CASE
    };
    a_template_with_12500_expressions_in_1_mb: Case {
        setup: |dir| {
            let line = format!("Hello {{{{name}}}} {}\n", "x".repeat(60));
            dir.write("templates/body.txt.hbs", line.repeat(12_500));
        },
        cause: &["body.txt.hbs", "12500", "expressions", "partials"],
        ..CASE
    };
    blocks_nested_1500_deep: Case {
        setup: |dir| {
            let nested = format!("{}x{}", "{{#if name}}".repeat(1500), "{{/if}}".repeat(1500));
            dir.write("templates/body.txt.hbs", nested);
        },
        cause: &["body.txt.hbs", "nest more than 100 levels"],
        ..CASE
    };
    html_nested_50000_deep: Case {
        message: "subject = \"Hello\"\nhtml = \"templates/body.html.hbs\"",
        setup: |dir| {
            let nested = format!("{}{{{{name}}}}{}", "<div>".repeat(50_000), "</div>".repeat(50_000));
            dir.write("templates/body.html.hbs", nested);
        },
        cause: &["row 1", "nests elements 50000 deep"],
        ..CASE
    };
    html_of_2_mb_without_a_text_part: Case {
        message: "subject = \"Hello\"\nhtml = \"templates/body.html.hbs\"",
        setup: |dir| {
            let flat = format!("{{{{name}}}}{}", "<div>text</div>".repeat(150_000));
            dir.write("templates/body.html.hbs", flat);
        },
        cause: &["row 1", "HTML is 2.2 MB", "text"],
        ..CASE
    };
    markdown_quotes_nested_20000_deep: Case {
        message: "subject = \"Hello\"\nmarkdown = \"templates/body.md.hbs\"",
        setup: |dir| {
            dir.write("templates/body.md.hbs", format!("{} {{{{name}}}}\n", ">".repeat(20_000)));
        },
        cause: &["row 1", "nests elements 20000 deep"],
        ..CASE
    };
    a_date_format_that_is_no_format: Case {
        message: "subject = \"{{date '%Q'}}\"\ntext = \"templates/body.txt.hbs\"",
        cause: &["row 1", "date format"],
        ..CASE
    };

    // Attachments that never end, or that no message can carry.
    #[cfg(unix)]
    an_attachment_that_is_a_named_pipe: Case {
        message: "subject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\nattachments = [\"files/{{name}}.pdf\"]",
        setup: |dir| fifo(dir, "files/Ada.pdf"),
        cause: &["row 1", "files/Ada.pdf", "named pipe"],
        ..CASE
    };
    an_attachment_of_gigabytes: Case {
        message: "subject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\nattachments = [\"files/huge.bin\"]",
        setup: |dir| sparse(dir, "files/huge.bin", 8 << 30),
        cause: &["row 1", "files/huge.bin", "8.0 GB", "25 MB"],
        ..CASE
    };
    attachments_that_together_pass_a_message: Case {
        message: "subject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\n\
                  attachments = [\"files/a.bin\", \"files/b.bin\"]",
        setup: |dir| {
            sparse(dir, "files/a.bin", 12 << 20);
            sparse(dir, "files/b.bin", 12 << 20);
        },
        cause: &["row 1", "message would be about", "25 MB"],
        ..CASE
    };
    an_attachment_that_is_a_folder: Case {
        message: "subject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\nattachments = [\"files\"]",
        setup: |dir| std::fs::create_dir_all(dir.path().join("files")).unwrap(),
        cause: &["row 1", "\"files\"", "folder"],
        ..CASE
    };

    // Headers and paths built to forge or escape.
    a_line_break_in_a_cell_that_reaches_the_subject: Case {
        message: "subject = \"News for {{name}}\"\ntext = \"templates/body.txt.hbs\"",
        setup: |dir| {
            dir.write("recipients.csv", "email,name\nada@example.com,\"Ada\r\nBcc: victim@example.com\"\n");
        },
        cause: &["row 1", "subject", "line break"],
        ..CASE
    };
    a_header_name_that_smuggles_another: Case {
        message: "subject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\n\
                  headers = { \"X-A: b\\r\\nBcc\" = \"victim@example.com\" }",
        cause: &["row 1", "header name"],
        ..CASE
    };
    an_attachment_path_that_climbs_out: Case {
        message: "subject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\nattachments = [\"../../etc/passwd\"]",
        cause: &["row 1", "../../etc/passwd", "leaves the campaign folder"],
        ..CASE
    };
    #[cfg(unix)]
    an_attachment_that_links_outside: Case {
        message: "subject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\nattachments = [\"files/link.pdf\"]",
        setup: |dir| {
            std::fs::create_dir_all(dir.path().join("files")).unwrap();
            std::os::unix::fs::symlink("/dev/zero", dir.path().join("files/link.pdf")).unwrap();
        },
        cause: &["row 1", "files/link.pdf", "outside the campaign folder"],
        ..CASE
    };
    a_from_of_100_kb: Case {
        message: "subject = \"Hi\"\ntext = \"templates/body.txt.hbs\"",
        setup: |dir| {
            let path = dir.campaign();
            let toml = std::fs::read_to_string(&path).unwrap();
            let from = format!("from = \"{}\"", "x".repeat(100_000));
            std::fs::write(&path, toml.replace("from = \"Acme <news@acme.example>\"", &from)).unwrap();
        },
        cause: &["campaign.toml", "from"],
        ..CASE
    };
    a_cc_cell_of_100_kb: Case {
        message: "subject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\ncc = \"{{name}}\"",
        setup: |dir| {
            dir.write("recipients.csv", format!("email,name\nada@example.com,{}\n", "y".repeat(100_000)));
        },
        cause: &["row 1", "cc"],
        ..CASE
    };

    // A DKIM key that is no key file.
    #[cfg(unix)]
    a_dkim_key_that_is_a_named_pipe: Case {
        rest: "[transport]\nkind = \"file\"\n[dkim]\ndomain = \"acme.example\"\nselector = \"s\"\n\
               private_key_file = \"keys/dkim.pem\"\n",
        setup: |dir| fifo(dir, "keys/dkim.pem"),
        cause: &["[dkim]", "keys/dkim.pem", "named pipe"],
        ..CASE
    };
    a_dkim_key_of_gigabytes: Case {
        rest: "[transport]\nkind = \"file\"\n[dkim]\ndomain = \"acme.example\"\nselector = \"s\"\n\
               private_key_file = \"keys/dkim.pem\"\n",
        setup: |dir| sparse(dir, "keys/dkim.pem", 4 << 30),
        cause: &["[dkim]", "keys/dkim.pem", "4.0 GB"],
        ..CASE
    };

    #[cfg(unix)]
    a_campaign_file_that_is_a_named_pipe: Case {
        setup: |dir| {
            std::fs::remove_file(dir.campaign()).unwrap();
            fifo(dir, "campaign.toml");
        },
        cause: &["campaign.toml", "named pipe"],
        ..CASE
    };
}

/// The first SIGTERM stops a run that waits for its password, and the
/// password command's children with it.
#[cfg(target_os = "linux")]
#[test]
fn one_sigterm_stops_a_password_command_and_its_children() {
    let dir = CampaignDir::new();
    dir.write("recipients.csv", "email\nada@example.com\n")
        .write("templates/body.txt.hbs", "Hello\n")
        .write(
            "campaign.toml",
            format!(
                "name = \"hostile\"\n[recipients]\nfile = \"recipients.csv\"\n[message]\n\
                 from = \"news@acme.example\"\nsubject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\n\
                 {}password_command = \"sleep 1000 & echo $! > sleeper.pid; wait\"\n",
                smtp_nowhere!()
            ),
        );
    let mut child = dir
        .send_command(&[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("sleeper.pid");
    let started = Instant::now();
    let sleeper = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            break pid;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the password command never ran"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if stopped.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let sleeper_left = alive(sleeper);
    if sleeper_left {
        let _ = Command::new("kill")
            .args(["-KILL", &sleeper.to_string()])
            .status();
    }
    let status = status.expect("send still waited for its password 10 s after SIGTERM");
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(
        !sleeper_left,
        "the password command's child outlived the run"
    );
}

/// Times past the calendar (here a pause stored until the end of time, as a
/// damaged or hostile database may hold) are `null` in `status --json`,
/// never an empty string (SPEC §9), and never an overflow.
#[test]
fn a_time_past_the_calendar_is_null_in_status() {
    let dir = CampaignDir::new();
    dir.write(
        "recipients.csv",
        "email\nada@example.com\nbob@example.com\ncy@example.com\n",
    )
        .write("templates/body.txt.hbs", "Hello\n")
        .write(
            "campaign.toml",
            format!(
                "name = \"hostile\"\n[recipients]\nfile = \"recipients.csv\"\n[message]\n\
                 from = \"news@acme.example\"\nsubject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\n\
                 {FILE_TRANSPORT}[limits]\nper_minute = 100\n"
            ),
        );
    let sent = run_bounded(dir.send_command(&["--limit", "1"]));
    assert_eq!(sent.code, Some(75), "{}", sent.stderr);
    let pause = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             db = sqlite3.connect(sys.argv[1])\n\
             db.execute(\"INSERT INTO account_pauses (account, until, reason) \
             SELECT DISTINCT account, 9223372036854775807, 'hostile' FROM send_log\")\n\
             db.commit()\n",
        )
        .arg(dir.db())
        .status()
        .unwrap();
    assert!(pause.success());
    let campaign = dir.campaign();
    let status = run_bounded(dir.command(&["status", "--json", campaign.to_str().unwrap()]));
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    let json: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    for key in ["next_send_at", "eta"] {
        assert!(
            json[key].is_null() || json[key].as_str().is_some_and(|t| !t.is_empty()),
            "{key}: {json}"
        );
    }
    assert!(!status.stdout.contains("\"\""), "{}", status.stdout);
    let human = run_bounded(dir.command(&["status", campaign.to_str().unwrap()]));
    assert_eq!(human.code, Some(0), "{}", human.stderr);
}

/// Data noise quotes the cell it skips, cut short: an address cell of
/// 100 KB is one warning of a readable length, and the run goes on.
#[test]
fn an_address_cell_of_100_kb_is_quoted_short() {
    let dir = CampaignDir::new();
    dir.write(
        "recipients.csv",
        format!(
            "email,name\n{}@example.com,Ada\nbob@{}.example,Bob\ncy@example.com,Cy\n",
            "y".repeat(100_000),
            "z".repeat(100_000)
        ),
    )
    .write("templates/body.txt.hbs", "Hello {{name}}\n")
    .write(
        "campaign.toml",
        format!(
            "name = \"hostile\"\n[recipients]\nfile = \"recipients.csv\"\n[message]\n\
             from = \"news@acme.example\"\nsubject = \"Hi\"\ntext = \"templates/body.txt.hbs\"\n\
             {FILE_TRANSPORT}"
        ),
    );
    let campaign = dir.campaign();
    for command in ["check", "send"] {
        let run = run_bounded(dir.command(&[command, campaign.to_str().unwrap()]));
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let warnings: Vec<&str> = run.stderr.lines().filter(|l| l.contains("row ")).collect();
        assert_eq!(warnings.len(), 2, "{}", run.stderr);
        assert!(
            warnings.iter().all(|l| l.chars().count() < 1000),
            "{}",
            run.stderr
        );
    }
}
