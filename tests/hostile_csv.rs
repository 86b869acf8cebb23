//! Hostile recipients files (SPEC §3, §11). Each one goes through `check`
//! and `send` under a deadline and must end in a single line that names the
//! file and the line, with exit 2: never a panic, a signal or a hang, nothing
//! sent, the campaign's state as before and every file not hikyaku's own
//! untouched. The hints for files made by Excel are followed to the end.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{standard_campaign, text, CampaignDir, FILE_TRANSPORT};

const HEADER: &str = "email,first_name,city";

/// A run that has not ended within this is a hang.
const DEADLINE: Duration = Duration::from_secs(20);

/// Runs hikyaku with this folder's database; kills it and fails at the deadline.
fn run(dir: &CampaignDir, args: &[&str]) -> Output {
    let logs = tempfile::tempdir().unwrap();
    let (out, err) = (logs.path().join("out"), logs.path().join("err"));
    let mut child = dir
        .command(args)
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hikyaku {args:?} still ran after {DEADLINE:?}; stderr so far: {}",
                text(&std::fs::read(&err).unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    common::no_panic(Output {
        status,
        stdout: std::fs::read(out).unwrap(),
        stderr: std::fs::read(err).unwrap(),
    })
}

fn check(dir: &CampaignDir) -> Output {
    run(dir, &["check", dir.campaign().to_str().unwrap()])
}

fn send(dir: &CampaignDir) -> Output {
    run(dir, &["send", dir.campaign().to_str().unwrap()])
}

/// The standard campaign with `extra` added to its `[recipients]` section.
fn campaign(extra: &str) -> CampaignDir {
    let dir = CampaignDir::new();
    standard_campaign(&dir, "email,first_name,city\n", FILE_TRANSPORT, "");
    set_recipients(&dir, extra);
    dir
}

fn set_recipients(dir: &CampaignDir, extra: &str) {
    let toml = std::fs::read_to_string(dir.campaign()).unwrap();
    let start = toml.find("[recipients]").unwrap();
    let end = toml.find("[message]").unwrap();
    let section = format!("[recipients]\nfile = \"recipients.csv\"\n{extra}\n\n");
    dir.write(
        "campaign.toml",
        format!("{}{section}{}", &toml[..start], &toml[end..]),
    );
}

fn outbox(dir: &CampaignDir) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path().join("outbox"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// Every file of the campaign folder but the database and the outbox.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "outbox" || name.starts_with("state.db") {
            continue;
        }
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    found
}

/// The campaign's recorded rows as `export` prints them (or its refusal,
/// for a campaign that never sent).
fn state(dir: &CampaignDir) -> (Option<i32>, String) {
    let out = run(dir, &["export", dir.campaign().to_str().unwrap()]);
    (out.status.code(), text(&out.stdout))
}

/// A refused file: exit 2 from `check` and from `send`, one error line
/// naming the file and holding `want`, and nothing else changed.
fn assert_refused(dir: &CampaignDir, file: &str, want: &str) {
    let sent = outbox(dir);
    let recorded = state(dir);
    let before = files(dir.path());
    for (command, out) in [("check", check(dir)), ("send", send(dir))] {
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{command}: exit {:?}\nstdout: {}\nstderr: {err}",
            out.status,
            text(&out.stdout)
        );
        assert!(!err.contains("panicked"), "{command}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{command}: one cause expected: {err}");
        assert!(
            errors[0].contains(file) && errors[0].contains(want),
            "{command}: expected {want:?} about {file}, got: {err}"
        );
        assert_eq!(outbox(dir), sent, "{command} sent something");
    }
    assert_eq!(state(dir), recorded, "the state changed");
    assert_eq!(files(dir.path()), before, "a file was changed");
}

/// A campaign that has sent to its first row, then gets `csv`.
fn started_campaign(csv: &[u8], extra: &str) -> CampaignDir {
    let dir = campaign(extra);
    dir.write(
        "recipients.csv",
        format!("{HEADER}\nfirst@example.com,First,Kyoto\nsecond@example.com,Second,Osaka\n"),
    );
    let out = run(
        &dir,
        &["send", "--limit", "1", dir.campaign().to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    assert_eq!(outbox(&dir).len(), 1);
    dir.write("recipients.csv", csv);
    dir
}

fn refused(csv: impl AsRef<[u8]>, extra: &str, want: &str) {
    let dir = started_campaign(csv.as_ref(), extra);
    assert_refused(&dir, "recipients.csv", want);
}

fn crlf(lines: &[&str]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| format!("{l}\r\n").into_bytes())
        .collect()
}

/// Before: the rows after the quote vanished into Ann's city, no error.
#[test]
fn a_quote_opened_mid_file_and_closed_by_a_later_quote() {
    refused(
        format!(
            "{HEADER}\nann@example.com,Ann,\"Paris\nbob@example.com,Bob,Rome\n\
             cee@example.com,\"Cee\",Oslo\n"
        ),
        "",
        "line 2: a quote opens here and is only closed on line 4",
    );
}

/// Before: sent to Ann with Bob's and Cee's rows as her city.
#[test]
fn a_quote_opened_mid_file_that_holds_whole_rows() {
    refused(
        crlf(&[
            HEADER,
            "ann@example.com,Ann,\"Paris",
            "bob@example.com,Bob,Rome",
            "cee@example.com,Cee,Oslo\"",
            "dan@example.com,Dan,Lima",
        ]),
        "",
        "line 2: a quoted value opens here and takes in line 3",
    );
}

/// Before: sent to Bob with the rest of the file as his city.
#[test]
fn a_quote_left_open_at_the_end_of_the_file() {
    refused(
        crlf(&[
            HEADER,
            "ann@example.com,Ann,Paris",
            "bob@example.com,Bob,\"Rome",
            "cee@example.com,Cee,Oslo",
        ]),
        "",
        "line 3: a quote opens here and is never closed",
    );
}

/// Before: "line 2" for the third line of a CRLF file.
#[test]
fn crlf_lines_are_counted_as_the_editor_shows_them() {
    refused(
        crlf(&[
            HEADER,
            "",
            "ann@example.com,Ann,\"Paris",
            "Centre\"",
            "bob@example.com,Bob",
        ]),
        "",
        "line 5: 2 fields where the header has 3",
    );
    let mut bytes = crlf(&[HEADER, "ann@example.com,Ann,Paris"]);
    bytes.extend_from_slice(b"bob@example.com,Bob,\xff\r\n");
    refused(bytes, "", "line 3: bytes that are not valid UTF-8");
}

/// Before: `sep=;` was taken for the header ("no column email (columns: sep=;)").
#[test]
fn excel_sep_line_sets_the_delimiter_and_counts_as_a_line() {
    refused(
        crlf(&[
            "sep=;",
            "email;first_name;city",
            "ann@example.com;Ann;Paris",
            "bob@example.com;Bob",
        ]),
        "",
        "line 4: 2 fields where the header has 3",
    );
    let dir = campaign("");
    dir.write(
        "recipients.csv",
        crlf(&[
            "sep=;",
            "email;first_name;city",
            "ann@example.com;Ann;Paris, Texas",
        ]),
    );
    let out = send(&dir);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let sent = std::fs::read_to_string(&outbox(&dir)[0]).unwrap();
    assert!(sent.contains("Hello Ann from Paris, Texas!"), "{sent}");
}

/// Before: the whole line was buffered, however long.
#[test]
fn a_line_without_an_end_is_bounded() {
    let mut bytes = format!("{HEADER}\r\nann@example.com,Ann,").into_bytes();
    bytes.extend(std::iter::repeat_n(b'x', 5 << 20));
    refused(bytes, "", "line 2: a row longer than 1 MiB");
    let mut quoted =
        format!("{HEADER}\nann@example.com,Ann,Paris\nbob@example.com,Bob,\"").into_bytes();
    quoted.extend(std::iter::repeat_n(b'x', 3 << 20));
    refused(
        quoted,
        "",
        "line 3: a quote opens here and runs on for more than 1 MiB",
    );
}

/// Before: /dev/zero was read until memory ran out; a pipe blocked forever.
#[cfg(unix)]
#[test]
fn a_device_or_a_pipe_is_not_a_recipients_file() {
    let dir = started_campaign(b"", "");
    let toml = std::fs::read_to_string(dir.campaign()).unwrap();
    dir.write(
        "campaign.toml",
        toml.replace("file = \"recipients.csv\"", "file = \"/dev/zero\""),
    );
    assert_refused(&dir, "/dev/zero", "is not a regular file");

    let elsewhere = tempfile::tempdir().unwrap();
    let fifo = elsewhere.path().join("recipients.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        dir.write(
            "campaign.toml",
            toml.replace(
                "file = \"recipients.csv\"",
                &format!("file = {:?}", fifo.to_str().unwrap()),
            ),
        );
        assert_refused(&dir, "recipients.fifo", "is not a regular file");
    }
}

/// Before: the second `email` column was ignored without a word.
#[test]
fn a_repeated_email_column_is_refused() {
    refused(
        "email,first_name,email\nann@example.com,Ann,bob@example.com\n",
        "",
        "line 1: the email column \"email\" appears more than once (columns 1, 3)",
    );
}

/// Before: the last `city` won without a word.
#[test]
fn a_repeated_column_is_a_warning() {
    let dir = campaign("");
    dir.write(
        "recipients.csv",
        "email,first_name,city,city\nann@example.com,Ann,Paris,Lyon\n",
    );
    for out in [check(&dir), send(&dir)] {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(
                "recipients.csv: line 1: the column \"city\" appears more than once (columns 3, 4)"
            ),
            "{}",
            text(&out.stderr)
        );
    }
    assert_eq!(outbox(&dir).len(), 1);
}

/// Before: a NUL went into the message.
#[test]
fn nul_bytes_are_refused() {
    refused(
        b"email,first_name,city\nann@example.com,Ann,Paris\nbob@example.com,B\0b,Rome\n",
        "",
        "line 3: a NUL byte",
    );
}

/// Before: "there is no column \"email\" (columns: )".
#[test]
fn an_empty_file_is_refused() {
    refused(b"", "", "the file is empty");
    refused(b"\r\n\r\n", "", "the file is empty");
}

/// Before: no word at all.
#[test]
fn a_header_without_rows_is_a_warning() {
    let dir = campaign("");
    dir.write("recipients.csv", format!("{HEADER}\r\n"));
    for out in [check(&dir), send(&dir)] {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("recipients.csv: there are no rows under the header"),
            "{}",
            text(&out.stderr)
        );
    }
    assert!(outbox(&dir).is_empty());
}

/// Before: `a@[127.0.0.1]` passed validation, then blocked the campaign
/// ("missing destination address").
#[test]
fn an_address_the_transport_cannot_take_is_skipped() {
    let dir = campaign("");
    dir.write(
        "recipients.csv",
        format!(
            "{HEADER}\nann@example.com,Ann,Paris\na@[127.0.0.1],Lit,Oslo\n\
             \"q\\\"x\"@example.com,Quote,Rome\nn@1.2.3.4,Num,Lima\n"
        ),
    );
    for out in [check(&dir), send(&dir)] {
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        for row in [
            "row 2 (line 3): invalid address \"a@[127.0.0.1]\"",
            "row 3 (line 4): invalid address",
            "row 4 (line 5): invalid address \"n@1.2.3.4\"",
        ] {
            assert!(err.contains(row), "{row}: {err}");
        }
    }
    assert_eq!(outbox(&dir).len(), 1);
}

/// Windows-1252 text sent as UTF-8: the error names the encoding to set.
#[test]
fn undecodable_bytes_name_the_likely_encoding() {
    let (latin, _, _) = encoding_rs::WINDOWS_1252.encode(
        "email,first_name,city\r\nrenee@example.com,Renée,Besançon\r\nfrancois@example.com,François,Orléans\r\n",
    );
    refused(
        latin,
        "",
        "line 2: bytes that are not valid UTF-8; the file looks like windows-1252: \
         set encoding = \"windows-1252\"",
    );
    let (sjis, _, _) = encoding_rs::SHIFT_JIS.encode(
        "email,first_name,city\r\ntaro@example.com,山田太郎,東京都\r\nhanako@example.com,鈴木花子,大阪府\r\n",
    );
    refused(
        sjis,
        "",
        "line 2: bytes that are not valid UTF-8; the file looks like Shift_JIS: \
         set encoding = \"Shift_JIS\"",
    );
    let mut utf16 = vec![0xFF, 0xFE];
    utf16.extend(
        "email\tfirst_name\tcity\r\nann@example.com\tAnn\tParis\r\n"
            .encode_utf16()
            .flat_map(u16::to_le_bytes),
    );
    refused(
        utf16,
        "",
        "line 1: a NUL byte: this is not text in the declared encoding; \
         the file looks like UTF-16LE: set encoding = \"UTF-16LE\"",
    );
}

/// Everything hikyaku suggests about a file saved by a French Excel
/// (semicolons, `E-mail`, Windows-1252, CRLF) is what makes it send.
#[test]
fn the_hints_for_an_excel_file_lead_to_a_sent_campaign() {
    let (excel, _, _) = encoding_rs::WINDOWS_1252.encode(
        "E-mail;first_name;city\r\nrenee@example.com;Renée;Besançon\r\nfrancois@example.com;François;Orléans\r\n",
    );
    let dir = campaign("");
    dir.write("recipients.csv", &excel);
    let mut settings = String::new();
    for want in [
        "line 1: there is no column \"email\" for the email address (columns: E-mail;first_name;city); \
         the header is one column holding semicolons: set delimiter = \";\" in [recipients]",
        "line 1: there is no column \"email\" for the email address (columns: E-mail, first_name, city); \
         set email_column = \"E-mail\" in [recipients]",
        "line 2: bytes that are not valid UTF-8; the file looks like windows-1252: \
         set encoding = \"windows-1252\" in [recipients]",
    ] {
        assert_refused(&dir, "recipients.csv", want);
        let setting = want.rsplit_once("set ").unwrap().1.trim_end_matches(" in [recipients]");
        settings.push_str(setting);
        settings.push('\n');
        set_recipients(&dir, &settings);
    }
    let out = send(&dir);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let sent: String = outbox(&dir)
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(outbox(&dir).len(), 2);
    assert!(
        sent.contains("Besan=C3=A7on") || sent.contains("Besançon"),
        "{sent}"
    );
}

/// A tab-separated file read with the default comma gets the tab hint.
#[test]
fn a_tab_separated_file_gets_the_tab_hint() {
    refused(
        crlf(&["email\tfirst_name\tcity", "ann@example.com\tAnn\tParis"]),
        "",
        "the header is one column holding tabs: set delimiter = \"\\t\" in [recipients]",
    );
}

/// Before: "line 2" for the third line of a CRLF file, and /dev/zero read
/// until memory ran out.
#[test]
fn a_suppression_import_names_physical_lines_and_refuses_devices() {
    let dir = CampaignDir::new();
    dir.write(
        "unsubscribed.csv",
        crlf(&[
            "email",
            "ann@example.com",
            "not an address",
            "bob@example.com",
        ]),
    );
    let list = dir.path().join("unsubscribed.csv");
    let out = run(&dir, &["suppress", "import", list.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("unsubscribed.csv: line 3: \"not an address\" is not a valid address"),
        "{err}"
    );
    assert!(err.contains("2 addresses added"), "{err}");
    #[cfg(unix)]
    {
        let out = run(&dir, &["suppress", "import", "/dev/zero"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("/dev/zero: is not a regular file"), "{err}");
    }
}
