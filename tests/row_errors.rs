//! One cause, one message (SPEC §3, §4): a defect that fails every row alike
//! is said once, naming the column or key, never once per row and never
//! with advice to skip rows; a defect of some rows lists them.

mod common;

use std::process::Output;

use common::{recipients_csv, standard_campaign, text, CampaignDir, FILE_TRANSPORT};

fn error_lines(out: &Output) -> Vec<String> {
    text(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_string)
        .collect()
}

fn outbox_is_empty(dir: &CampaignDir) -> bool {
    std::fs::read_dir(dir.path().join("outbox")).map_or(true, |mut d| d.next().is_none())
}

/// `check` and `send` both refuse with exactly one error line that says
/// `needles`, exit 2, no advice to skip rows, nothing sent.
fn assert_said_once(dir: &CampaignDir, needles: &[&str]) {
    for out in [dir.check(), dir.send(&[])] {
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        let lines = error_lines(&out);
        assert_eq!(lines.len(), 1, "one cause, one line:\n{err}");
        for needle in needles {
            assert!(lines[0].contains(needle), "{needle:?} missing:\n{err}");
        }
        assert!(!err.contains("--skip-invalid"), "{err}");
        assert!(
            !err.contains("strict mode") && !err.contains("param with name"),
            "{err}"
        );
    }
    assert!(outbox_is_empty(dir));
}

/// Caught before: 200 lines "Failed to access variable in strict mode
/// Some(\"last_name\")", "... and 4800 more", then advice to use --skip-invalid.
#[test]
fn a_variable_that_is_not_a_column_is_said_once_with_the_columns() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(5000), FILE_TRANSPORT, "");
    dir.write(
        "templates/body.txt.hbs",
        "Hello {{first_name}},\nDear {{last_name}}\n",
    );
    assert_said_once(
        &dir,
        &[
            "{{last_name}}",
            "body.txt.hbs:2:6",
            "columns: email, first_name, city",
        ],
    );
}

/// Caught before: "Helper/Decorator default_helper param with name value
/// required but not found", once per row.
#[test]
fn a_helper_given_a_missing_column_names_the_column() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(5000), FILE_TRANSPORT, "");
    let campaign = std::fs::read_to_string(dir.campaign()).unwrap().replace(
        "subject = \"{{first_name}}, your update\"",
        "subject = \"{{default last_name \\\"friend\\\"}}, your update\"",
    );
    dir.write("campaign.toml", campaign);
    assert_said_once(
        &dir,
        &[
            "{{last_name}}",
            "[message] subject:1:1",
            "columns: email, first_name, city",
        ],
    );
}

/// Caught before: one "from ... is not a valid mailbox" line per row.
#[test]
fn a_constant_from_that_is_not_a_mailbox_is_said_once_naming_the_key() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(300), FILE_TRANSPORT, "");
    let campaign = std::fs::read_to_string(dir.campaign()).unwrap().replace(
        "from = \"Acme <news@acme.example>\"",
        "from = \"Acme News\"",
    );
    dir.write("campaign.toml", campaign);
    assert_said_once(&dir, &["[message] from", "\"Acme News\"", "campaign.toml"]);
}

/// Caught before: 200 identical lines and advice to skip every row.
#[test]
fn a_cause_shared_by_every_row_is_said_once() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(300), FILE_TRANSPORT, "");
    let campaign = std::fs::read_to_string(dir.campaign()).unwrap().replace(
        "[message]\n",
        "[message]\nlist_unsubscribe = \"http://acme.example/u\"\n",
    );
    dir.write("campaign.toml", campaign);
    assert_said_once(&dir, &["list_unsubscribe", "all 300 rows"]);
}

#[test]
fn rows_that_fail_among_good_ones_are_listed_with_the_advice_to_skip_them() {
    let dir = CampaignDir::new();
    let mut csv = String::from("email,first_name,city\n");
    for i in 1..=50 {
        let name = if i % 10 == 0 {
            format!("\"N{i}\nBcc: x@example.com\"")
        } else {
            format!("N{i}")
        };
        csv.push_str(&format!("user{i}@example.com,{name},C{i}\n"));
    }
    standard_campaign(&dir, &csv, FILE_TRANSPORT, "");
    for out in [dir.check(), dir.send(&[])] {
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        for row in [10, 20, 30] {
            assert!(
                err.contains(&format!("row {row} (")) && err.contains("line break"),
                "row {row} not listed:\n{err}"
            );
        }
        assert!(err.contains("2 more rows with the same problem"), "{err}");
        assert!(
            err.contains("5 of 50") && err.contains("--skip-invalid"),
            "{err}"
        );
    }
    assert!(outbox_is_empty(&dir));
}
