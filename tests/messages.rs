//! What recipients actually get: the real binary sends to a real SMTP server
//! and every message is parsed back with mail-parser, so that the MIME
//! structure, the encodings, the attachments and the headers are checked as
//! a mail client would see them, not as our own code wrote them.

mod common;

use std::process::Output;

use common::{recipients_csv, standard_campaign, text, CampaignDir, SmtpServer, FILE_TRANSPORT};
use mail_parser::{Message, MessagePart, MimeHeaders};

/// Writes `campaign.toml` with the given `[message]` keys (From is set) and
/// extra `[recipients]` keys; the CSV and templates are the caller's.
fn write_campaign(dir: &CampaignDir, recipients_extra: &str, message: &str, transport: &str) {
    dir.write(
        "campaign.toml",
        format!(
            "name = \"messages\"\n\n[recipients]\nfile = \"recipients.csv\"\n{recipients_extra}\n\n\
             [message]\nfrom = \"Acme <news@acme.example>\"\n{message}\n\n{transport}"
        ),
    );
}

fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `type/subtype` of a message or a part.
fn mime_type<'a>(part: &impl MimeHeaders<'a>) -> String {
    let ct = part.content_type().expect("a Content-Type header");
    format!(
        "{}/{}",
        ct.ctype().to_ascii_lowercase(),
        ct.subtype().unwrap_or("").to_ascii_lowercase()
    )
}

/// The direct children of a multipart part.
fn children<'a>(msg: &'a Message<'a>, part: &MessagePart<'_>) -> Vec<&'a MessagePart<'a>> {
    part.sub_parts()
        .expect("a multipart part")
        .iter()
        .map(|id| msg.part(*id).expect("a sub-part id that exists"))
        .collect()
}

/// A header as the server got it, unfolded.
fn raw_header(msg: &Message<'_>, name: &str) -> Option<String> {
    msg.header_raw(name)
        .map(|v| v.replace("\r\n", "").replace('\n', "").trim().to_string())
}

/// The header section of a raw message, as text.
fn header_section(data: &[u8]) -> String {
    let end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a blank line after the headers");
    text(&data[..end])
}

/// Stderr lines that speak about row `n`, e.g. `recipients.csv: row 2 (line 3) ...`.
fn lines_about_row(stderr: &str, n: u32) -> Vec<String> {
    let needle = format!("row {n} (");
    stderr
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn markdown_campaign_arrives_as_alternative_with_html_and_readable_text() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    dir.write(
        "recipients.csv",
        "email,first_name\nuser1@example.com,Tom & <Jerry>\n",
    )
    .write(
        "templates/m.md.hbs",
        "# Hello {{first_name}}\n\nYour *November* news:\n\n- item one\n- item two\n",
    );
    write_campaign(
        &dir,
        "",
        "subject = \"News\"\nmarkdown = \"templates/m.md.hbs\"",
        &server.transport_toml(""),
    );
    assert_exit(&dir.send(&[]), 0);

    let received = server.received();
    assert_eq!(received.len(), 1);
    let msg = received[0].parsed();
    assert_eq!(mime_type(&msg), "multipart/alternative");
    let parts = children(&msg, msg.root_part());
    assert_eq!(
        parts.iter().map(|p| mime_type(*p)).collect::<Vec<_>>(),
        ["text/plain", "text/html"],
        "the plain part comes first, as RFC 2046 asks"
    );

    let html = parts[1].text_contents().unwrap();
    assert!(
        html.contains("<h1>Hello Tom &amp; &lt;Jerry&gt;</h1>"),
        "{html}"
    );
    assert!(html.contains("<em>November</em>"), "{html}");
    assert!(html.contains("<li>item one</li>"), "{html}");

    let plain = parts[0].text_contents().unwrap();
    assert!(plain.contains("Hello Tom & <Jerry>"), "{plain}");
    assert!(
        plain.contains("November") && plain.contains("item two"),
        "{plain}"
    );
    for markup in ["<h1>", "<em>", "<li>", "&amp;", "&lt;"] {
        assert!(
            !plain.contains(markup),
            "{markup} in the text part:\n{plain}"
        );
    }
}

#[test]
fn html_only_campaign_gets_a_derived_text_part() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    dir.write("recipients.csv", "email,first_name\nuser1@example.com,Ann\n")
        .write(
            "templates/h.html.hbs",
            "<html><body><h1>Hi {{first_name}}</h1>\
             <p>Read <a href=\"https://acme.example/n\">the news</a> &amp; more.</p></body></html>\n",
        );
    write_campaign(
        &dir,
        "",
        "subject = \"News\"\nhtml = \"templates/h.html.hbs\"",
        &server.transport_toml(""),
    );
    assert_exit(&dir.send(&[]), 0);

    let received = server.received();
    assert_eq!(received.len(), 1);
    let msg = received[0].parsed();
    // mail-parser would invent a text body from HTML by itself, so look at
    // the parts that were really sent.
    assert_eq!(mime_type(&msg), "multipart/alternative");
    let parts = children(&msg, msg.root_part());
    assert_eq!(
        parts.iter().map(|p| mime_type(*p)).collect::<Vec<_>>(),
        ["text/plain", "text/html"]
    );
    let plain = parts[0].text_contents().unwrap();
    assert!(plain.contains("Hi Ann"), "{plain}");
    assert!(
        plain.contains("the news") && plain.contains("& more"),
        "{plain}"
    );
    assert!(plain.contains("https://acme.example/n"), "{plain}");
    assert!(
        !plain.contains("<p>") && !plain.contains("&amp;"),
        "{plain}"
    );
    assert!(parts[1]
        .text_contents()
        .unwrap()
        .contains("<h1>Hi Ann</h1>"));
}

/// Bytes no text transfer encoding would carry unharmed: every byte value,
/// bare CR and LF, NUL, and lines that SMTP would dot-stuff or end DATA with.
fn invoice_bytes(id: &str) -> Vec<u8> {
    let mut bytes = b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n".to_vec();
    bytes.extend(0u8..=255);
    bytes.extend_from_slice(b"\r\n.\r\n\n.\n\r.\r\0\0\xFF\xFE");
    bytes.extend_from_slice(id.as_bytes());
    bytes.extend((0u8..=255).rev());
    bytes
}

#[test]
fn each_recipient_gets_their_own_attachment_byte_for_byte() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    dir.write(
        "recipients.csv",
        "email,first_name,customer_id\nuser1@example.com,Ann,C-1001\nuser2@example.com,Bob,C-1002\n\
         user3@example.com,Chie,請求書 1003\n",
    )
    .write("templates/t.txt.hbs", "Hello {{first_name}}, your invoice is attached.\n")
    .write("templates/h.html.hbs", "<p>Hello {{first_name}}, your invoice is attached.</p>\n")
    .write("invoices/C-1001.pdf", invoice_bytes("C-1001"))
    .write("invoices/C-1002.pdf", invoice_bytes("C-1002"))
    .write("invoices/請求書 1003.pdf", invoice_bytes("請求書 1003"));
    write_campaign(
        &dir,
        "",
        "subject = \"Your invoice\"\ntext = \"templates/t.txt.hbs\"\nhtml = \"templates/h.html.hbs\"\n\
         attachments = [\"invoices/{{customer_id}}.pdf\"]",
        &server.transport_toml(""),
    );
    assert_exit(&dir.check(), 0);
    assert_exit(&dir.send(&[]), 0);

    let received = server.received();
    assert_eq!(received.len(), 3);
    for r in &received {
        let id = match r.rcpt_tos.as_slice() {
            [to] if to == "user1@example.com" => "C-1001",
            [to] if to == "user2@example.com" => "C-1002",
            [to] if to == "user3@example.com" => "請求書 1003",
            other => panic!("unexpected recipients {other:?}"),
        };
        // The non-ASCII file name too goes out encoded (RFC 2231).
        assert!(r.data.is_ascii(), "{}", text(&r.data));
        let msg = r.parsed();
        assert_eq!(mime_type(&msg), "multipart/mixed");
        let parts = children(&msg, msg.root_part());
        assert_eq!(parts.len(), 2, "the body, then the attachment");
        assert_eq!(mime_type(parts[0]), "multipart/alternative");
        assert!(msg.body_text(0).unwrap().contains("your invoice"));

        assert_eq!(msg.attachment_count(), 1);
        let attachment = msg.attachment(0).unwrap();
        assert_eq!(mime_type(attachment), "application/pdf");
        assert_eq!(
            attachment.attachment_name(),
            Some(format!("{id}.pdf").as_str())
        );
        assert!(
            attachment.contents() == invoice_bytes(id).as_slice(),
            "{id}.pdf arrived altered: {} bytes instead of {}",
            attachment.contents().len(),
            invoice_bytes(id).len()
        );
    }
}

#[test]
fn an_attachment_outside_the_folder_or_missing_blocks_the_whole_send() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    // Row 1 is fine and comes first: if rows were only checked as they are
    // sent, it would go out before the bad ones are found.
    let mut csv = String::from("email,invoice\n");
    csv.push_str("user1@example.com,invoices/C-1.pdf\n");
    csv.push_str("user2@example.com,../../etc/passwd\n");
    csv.push_str("user3@example.com,/etc/passwd\n");
    csv.push_str("user4@example.com,invoices/C-404.pdf\n");
    csv.push_str("user5@example.com,invoices/link.pdf\n");
    dir.write("recipients.csv", csv)
        .write("templates/t.txt.hbs", "Your invoice.\n")
        .write("invoices/C-1.pdf", invoice_bytes("C-1"));
    #[cfg(unix)]
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("invoices/link.pdf")).unwrap();
    write_campaign(
        &dir,
        "",
        "subject = \"Invoice\"\ntext = \"templates/t.txt.hbs\"\nattachments = [\"{{invoice}}\"]",
        &server.transport_toml(""),
    );

    for out in [dir.check(), dir.send(&[])] {
        assert_exit(&out, 2);
        let err = text(&out.stderr);
        assert!(lines_about_row(&err, 1).is_empty(), "{err}");
        for (row, why) in [
            (2, "leaves the campaign folder"),
            (3, "leaves the campaign folder"),
            (4, "C-404.pdf"),
        ] {
            let lines = lines_about_row(&err, row);
            assert!(
                lines.iter().any(|l| l.contains(why)),
                "row {row} not reported with {why:?}:\n{err}"
            );
        }
        #[cfg(unix)]
        assert!(
            lines_about_row(&err, 5)
                .iter()
                .any(|l| l.contains("outside the campaign folder")),
            "the link leading outside is not reported:\n{err}"
        );
        assert!(server.received().is_empty(), "something was sent: {err}");
    }
    let status = dir.status();
    assert_eq!(status["states"]["sent"], 0, "{status}");
}

#[test]
fn a_missing_per_recipient_attachment_names_its_row() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    dir.write(
        "recipients.csv",
        "email,customer_id\nuser1@example.com,C-1\nuser2@example.com,C-2\n",
    )
    .write("templates/t.txt.hbs", "Your invoice.\n")
    .write("invoices/C-1.pdf", invoice_bytes("C-1"));
    write_campaign(
        &dir,
        "",
        "subject = \"Invoice\"\ntext = \"templates/t.txt.hbs\"\n\
         attachments = [\"invoices/{{customer_id}}.pdf\"]",
        &server.transport_toml(""),
    );
    for out in [dir.check(), dir.send(&[])] {
        assert_exit(&out, 2);
        let err = text(&out.stderr);
        assert!(
            lines_about_row(&err, 2)
                .iter()
                .any(|l| l.contains("invoices/C-2.pdf") && l.contains("user2@example.com")),
            "{err}"
        );
        assert!(lines_about_row(&err, 1).is_empty(), "{err}");
    }
    assert!(server.received().is_empty());

    // With --skip-invalid the good row goes out and the other is skipped.
    assert_exit(&dir.send(&["--skip-invalid"]), 0);
    assert_eq!(server.deliveries().len(), 1);
    assert_eq!(server.deliveries().get("user1@example.com"), Some(&1));
    let skipped = dir.export(Some("skipped"));
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0]["email"], "user2@example.com");
    assert!(
        skipped[0]["reason"].starts_with("invalid message") && skipped[0]["reason"].contains("C-2"),
        "{skipped:?}"
    );
}

#[test]
fn list_unsubscribe_with_https_offers_one_click() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(2), &server.transport_toml(""), "");
    let toml = std::fs::read_to_string(dir.campaign()).unwrap().replace(
        "[message]\n",
        "[message]\nlist_unsubscribe = \"https://acme.example/u?e={{email}}, mailto:unsub@acme.example\"\n",
    );
    dir.write("campaign.toml", toml);
    let out = dir.check();
    assert_exit(&out, 0);
    assert!(
        !text(&out.stderr).contains("list_unsubscribe"),
        "{}",
        text(&out.stderr)
    );
    assert_exit(&dir.send(&[]), 0);

    let received = server.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        let msg = r.parsed();
        let to = &r.rcpt_tos[0];
        assert_eq!(
            raw_header(&msg, "List-Unsubscribe").as_deref(),
            Some(format!("<https://acme.example/u?e={to}>, <mailto:unsub@acme.example>").as_str())
        );
        assert_eq!(
            raw_header(&msg, "List-Unsubscribe-Post").as_deref(),
            Some("List-Unsubscribe=One-Click")
        );
    }
}

#[test]
fn list_unsubscribe_with_mailto_only_has_no_one_click_post() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(1), &server.transport_toml(""), "");
    let toml = std::fs::read_to_string(dir.campaign()).unwrap().replace(
        "[message]\n",
        "[message]\nlist_unsubscribe = \"mailto:unsub@acme.example?subject=unsubscribe\"\n",
    );
    dir.write("campaign.toml", toml);
    assert_exit(&dir.send(&[]), 0);
    let received = server.received();
    assert_eq!(received.len(), 1);
    let msg = received[0].parsed();
    assert_eq!(
        raw_header(&msg, "List-Unsubscribe").as_deref(),
        Some("<mailto:unsub@acme.example?subject=unsubscribe>")
    );
    assert_eq!(msg.header_raw("List-Unsubscribe-Post"), None);
}

#[test]
fn check_warns_when_there_is_no_list_unsubscribe() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(1), FILE_TRANSPORT, "");
    let out = dir.check();
    assert_exit(&out, 0);
    let err = text(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("warning:") && l.contains("list_unsubscribe")),
        "{err}"
    );
    assert!(!text(&out.stdout).contains("list_unsubscribe"));
}

/// Regression: lettre RFC 2047-encodes any header word that is not ASCII, so
/// an unsubscribe URL holding an international address arrived as
/// `<=?utf-8?b?...?=>`, which no mail client can follow.
#[test]
fn list_unsubscribe_with_an_international_address_stays_a_uri() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    dir.write(
        "recipients.csv",
        "email,first_name\ninfo@bücher.example,Jörg\n",
    );
    dir.write("templates/t.txt.hbs", "Hallo {{first_name}}\n");
    write_campaign(
        &dir,
        "",
        "subject = \"News\"\ntext = \"templates/t.txt.hbs\"\n\
         list_unsubscribe = \"https://acme.example/u?e={{email}}&n={{first_name}}, mailto:unsub@acme.example\"",
        &server.transport_toml(""),
    );
    assert_exit(&dir.send(&[]), 0);
    let received = server.received();
    assert_eq!(received.len(), 1);
    let msg = received[0].parsed();
    assert_eq!(
        raw_header(&msg, "List-Unsubscribe").as_deref(),
        Some(
            "<https://acme.example/u?e=info@b%C3%BCcher.example&n=J%C3%B6rg>, \
             <mailto:unsub@acme.example>"
        )
    );
    assert_eq!(
        raw_header(&msg, "List-Unsubscribe-Post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
}

#[test]
fn shift_jis_names_arrive_decoded_in_subject_to_and_body() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    let (csv, _, unmappable) = encoding_rs::SHIFT_JIS
        .encode("email,姓,名\r\ntaro@example.com,山田,太郎\r\nhanako@example.com,佐藤,花子\r\n");
    assert!(!unmappable);
    dir.write("recipients.csv", csv).write(
        "templates/t.txt.hbs",
        "{{姓}} {{名}} 様\n\n11月のお知らせをお届けします。\n",
    );
    write_campaign(
        &dir,
        "encoding = \"shift_jis\"",
        "subject = \"{{姓}}様、11月のお知らせ\"\nto_name = \"{{姓}} {{名}}\"\ntext = \"templates/t.txt.hbs\"",
        &server.transport_toml(""),
    );
    assert_exit(&dir.send(&[]), 0);

    let received = server.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        let (family, given) = match r.rcpt_tos[0].as_str() {
            "taro@example.com" => ("山田", "太郎"),
            "hanako@example.com" => ("佐藤", "花子"),
            other => panic!("unexpected recipient {other}"),
        };
        let headers = header_section(&r.data);
        assert!(
            headers.is_ascii(),
            "raw 8-bit bytes in the headers:\n{headers}"
        );
        let msg = r.parsed();
        assert_eq!(
            msg.subject(),
            Some(format!("{family}様、11月のお知らせ").as_str())
        );
        let to = msg.to().and_then(|a| a.first()).expect("a To address");
        assert_eq!(to.address(), Some(r.rcpt_tos[0].as_str()));
        assert_eq!(to.name(), Some(format!("{family} {given}").as_str()));
        let body = msg.body_text(0).unwrap();
        assert!(body.contains(&format!("{family} {given} 様")), "{body}");
        assert!(body.contains("11月のお知らせをお届けします。"), "{body}");
    }
}

/// A campaign whose `[message]` uses the `name` column as given.
fn injection_campaign(server: &SmtpServer, message: &str) -> CampaignDir {
    let dir = CampaignDir::new();
    let csv = "email,name\n\
               ok@example.com,Ann\n\
               crlf@example.com,\"Alice\r\nBcc: victim@example.com\"\n\
               lf@example.com,\"Alice\nBcc: victim@example.com\"\n\
               cr@example.com,\"Alice\rBcc: victim@example.com\"\n";
    dir.write("recipients.csv", csv)
        .write("templates/t.txt.hbs", "Hello.\n");
    write_campaign(
        &dir,
        "",
        &format!("{message}\ntext = \"templates/t.txt.hbs\""),
        &server.transport_toml(""),
    );
    dir
}

fn assert_no_header_injection(server: &SmtpServer, dir: &CampaignDir, key: &str) {
    for out in [dir.check(), dir.send(&[])] {
        assert_exit(&out, 2);
        let err = text(&out.stderr);
        for row in 2..=4 {
            assert!(
                lines_about_row(&err, row)
                    .iter()
                    .any(|l| l.contains(key) && l.contains("line break")),
                "row {row} not reported for {key}:\n{err}"
            );
        }
        assert!(lines_about_row(&err, 1).is_empty(), "{err}");
    }
    assert!(server.received().is_empty());

    assert_exit(&dir.send(&["--skip-invalid"]), 0);
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_tos, ["ok@example.com"]);
    let msg = received[0].parsed();
    assert!(msg.bcc().is_none());
    assert!(!text(&received[0].data).contains("victim"));
    assert_eq!(dir.export(Some("skipped")).len(), 3);
}

#[test]
fn a_line_break_in_to_name_never_adds_a_recipient() {
    let server = SmtpServer::start(&[]);
    let dir = injection_campaign(&server, "subject = \"News\"\nto_name = \"{{name}}\"");
    assert_no_header_injection(&server, &dir, "to_name");
}

#[test]
fn a_line_break_in_the_subject_never_adds_a_recipient() {
    let server = SmtpServer::start(&[]);
    let dir = injection_campaign(&server, "subject = \"News for {{name}}\"");
    assert_no_header_injection(&server, &dir, "subject");
}

#[test]
fn address_syntax_in_to_name_stays_a_display_name() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    dir.write(
        "recipients.csv",
        "email,name\nbob@example.com,\"Eve <victim@example.com>, \"\"Mallory\"\" \\\"\n",
    )
    .write("templates/t.txt.hbs", "Hello.\n");
    write_campaign(
        &dir,
        "",
        "subject = \"News\"\nto_name = \"{{name}}\"\ntext = \"templates/t.txt.hbs\"",
        &server.transport_toml(""),
    );
    assert_exit(&dir.send(&[]), 0);
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_tos, ["bob@example.com"]);
    let msg = received[0].parsed();
    let to: Vec<_> = msg.to().expect("a To header").iter().collect();
    assert_eq!(to.len(), 1, "{to:?}");
    assert_eq!(to[0].address(), Some("bob@example.com"));
    assert_eq!(
        to[0].name(),
        Some("Eve <victim@example.com>, \"Mallory\" \\")
    );
}

#[test]
fn an_international_domain_is_sent_in_punycode() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    standard_campaign(
        &dir,
        "email,first_name,city\ninfo@bücher.example,Jörg,Köln\n",
        &server.transport_toml(""),
        "",
    );
    assert_exit(&dir.send(&[]), 0);
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_tos, ["info@xn--bcher-kva.example"]);
    let msg = received[0].parsed();
    let to = msg.to().and_then(|a| a.first()).expect("a To address");
    assert_eq!(to.address(), Some("info@xn--bcher-kva.example"));
    assert_eq!(msg.subject(), Some("Jörg, your update"));
    assert!(msg.body_text(0).unwrap().contains("Hello Jörg from Köln!"));
}

#[test]
fn preview_prints_the_message_of_a_row_or_an_address() {
    let dir = CampaignDir::new();
    standard_campaign(&dir, &recipients_csv(3), FILE_TRANSPORT, "");
    let campaign = dir.campaign();
    let campaign = campaign.to_str().unwrap();

    let out = dir.run(&["preview", "--raw", "--row", "2", campaign]);
    assert_exit(&out, 0);
    assert!(
        out.stdout.windows(4).any(|w| w == b"\r\n\r\n"),
        "headers end with CRLF CRLF"
    );
    let msg = mail_parser::MessageParser::default()
        .parse(&out.stdout)
        .expect("preview prints an RFC 5322 message");
    let to = msg.to().and_then(|a| a.first()).expect("a To address");
    assert_eq!(to.address(), Some("user2@example.com"));
    assert_eq!(msg.subject(), Some("Name2, your update"));
    assert_eq!(
        msg.from().and_then(|a| a.first()).and_then(|a| a.address()),
        Some("news@acme.example")
    );
    assert!(msg.date().is_some() && msg.message_id().is_some());
    assert_eq!(mime_type(&msg), "multipart/alternative");
    assert!(msg
        .body_text(0)
        .unwrap()
        .contains("Hello Name2 from City2!"));

    let out = dir.run(&["preview", "--raw", "--to", "USER3@Example.com", campaign]);
    assert_exit(&out, 0);
    let msg = mail_parser::MessageParser::default()
        .parse(&out.stdout)
        .unwrap();
    assert_eq!(msg.subject(), Some("Name3, your update"));
    assert_eq!(
        msg.to().and_then(|a| a.first()).and_then(|a| a.address()),
        Some("user3@example.com")
    );

    for args in [["--row", "99"], ["--to", "nobody@example.com"]] {
        let out = dir.run(&["preview", args[0], args[1], campaign]);
        assert_exit(&out, 2);
        assert!(out.stdout.is_empty());
        assert!(text(&out.stderr).contains(args[1]), "{}", text(&out.stderr));
    }
    assert!(!dir.path().join("outbox").exists(), "preview sends nothing");
}

/// Regression: `preview` printed the RFC 5322 source, where a Japanese
/// subject is an `=?utf-8?b?…?=` word nobody can read and the HTML part is
/// markup; it now prints the decoded message, `--raw` the source.
#[test]
fn preview_decodes_the_message_and_writes_the_html_part() {
    let dir = CampaignDir::new();
    dir.write("recipients.csv", "email,name\ntaro@example.com,太郎\n")
        .write("t.txt.hbs", "{{name}}さん、こんにちは。\n")
        .write("t.html.hbs", "<p>{{name}}さん、<b>ようこそ</b></p>\n");
    write_campaign(
        &dir,
        "",
        "subject = \"{{name}}さん、11月のお知らせ\"\nto_name = \"山田 {{name}}\"\n\
         text = \"t.txt.hbs\"\nhtml = \"t.html.hbs\"",
        FILE_TRANSPORT,
    );
    let campaign = dir.campaign();
    let campaign = campaign.to_str().unwrap();

    let out = dir.run(&["preview", campaign]);
    assert_exit(&out, 0);
    let view = text(&out.stdout);
    for needle in [
        "Subject: 太郎さん、11月のお知らせ\n",
        "To: 山田 太郎 <taro@example.com>\n",
        "From: Acme <news@acme.example>\n",
        "--- text part ---\n太郎さん、こんにちは。\n",
        "--- HTML part, as text ---\n太郎さん、ようこそ\n",
    ] {
        assert!(view.contains(needle), "{needle:?} not in\n{view}");
    }
    assert!(!view.contains("=?utf-8?"), "{view}");

    let out = dir.run(&["preview", "--raw", campaign]);
    assert_exit(&out, 0);
    let source = text(&out.stdout);
    assert!(source.contains("Subject: =?utf-8?b?"), "{source}");
    let msg = mail_parser::MessageParser::default()
        .parse(&out.stdout)
        .expect("--raw prints an RFC 5322 message");
    assert_eq!(msg.subject(), Some("太郎さん、11月のお知らせ"));

    let html = dir.path().join("preview.html");
    let out = dir.run(&["preview", "--html", html.to_str().unwrap(), campaign]);
    assert_exit(&out, 0);
    assert_eq!(
        std::fs::read_to_string(&html)
            .unwrap()
            .replace("\r\n", "\n"),
        "<p>太郎さん、<b>ようこそ</b></p>\n"
    );
    assert!(text(&out.stdout).contains("Subject: 太郎さん"));
    assert!(!dir.path().join("outbox").exists(), "preview sends nothing");
}

/// `--html` on a message without an HTML part says so (exit 2) and writes
/// nothing.
#[test]
fn preview_html_of_a_text_only_message_is_an_input_error() {
    let dir = CampaignDir::new();
    dir.write("recipients.csv", "email\nann@example.com\n")
        .write("t.txt.hbs", "Hi\n");
    write_campaign(
        &dir,
        "",
        "subject = \"s\"\ntext = \"t.txt.hbs\"",
        FILE_TRANSPORT,
    );
    let html = dir.path().join("preview.html");
    let campaign = dir.campaign();
    let out = dir.run(&[
        "preview",
        "--html",
        html.to_str().unwrap(),
        campaign.to_str().unwrap(),
    ]);
    assert_exit(&out, 2);
    assert!(
        text(&out.stderr).contains("no HTML part"),
        "{}",
        text(&out.stderr)
    );
    assert!(!html.exists());
}

#[test]
fn a_long_non_ascii_subject_arrives_intact() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    let spaced = "Grüße aus München – Ihre Rechnung für November ist da 🎉 "
        .repeat(5)
        .trim_end()
        .to_string();
    let unspaced = "飛脚からのお知らせ：十一月の請求書を送付いたします。".repeat(8);
    assert!(spaced.chars().count() > 200 && unspaced.chars().count() > 200);
    dir.write(
        "recipients.csv",
        format!("email,topic\nuser1@example.com,{spaced}\nuser2@example.com,{unspaced}\n"),
    )
    .write("templates/t.txt.hbs", "{{topic}}\n");
    write_campaign(
        &dir,
        "",
        "subject = \"[Acme] {{topic}}\"\ntext = \"templates/t.txt.hbs\"",
        &server.transport_toml(""),
    );
    assert_exit(&dir.send(&[]), 0);

    let received = server.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        let topic = match r.rcpt_tos[0].as_str() {
            "user1@example.com" => &spaced,
            _ => &unspaced,
        };
        let headers = header_section(&r.data);
        assert!(headers.is_ascii(), "{headers}");
        for line in headers.split("\r\n") {
            assert!(
                line.len() <= 78,
                "header line of {} chars: {line}",
                line.len()
            );
        }
        let msg = r.parsed();
        assert_eq!(msg.subject(), Some(format!("[Acme] {topic}").as_str()));
    }
}

#[test]
fn cc_and_bcc_from_cells_reach_the_server_bcc_stays_hidden() {
    let server = SmtpServer::start(&[]);
    let dir = CampaignDir::new();
    dir.write(
        "recipients.csv",
        "email,manager\nuser1@example.com,Ann Manager <am@bücher.example>\n",
    )
    .write("templates/t.txt.hbs", "Hello.\n");
    write_campaign(
        &dir,
        "",
        "subject = \"News\"\ncc = \"{{manager}}\"\nbcc = \"archive@acme.example\"\n\
         text = \"templates/t.txt.hbs\"",
        &server.transport_toml(""),
    );
    assert_exit(&dir.send(&[]), 0);
    let received = server.received();
    assert_eq!(received.len(), 1);
    let mut rcpts = received[0].rcpt_tos.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        [
            "am@xn--bcher-kva.example",
            "archive@acme.example",
            "user1@example.com"
        ]
    );
    let headers = header_section(&received[0].data);
    assert!(headers.is_ascii(), "{headers}");
    let msg = received[0].parsed();
    let cc = msg.cc().and_then(|a| a.first()).expect("a Cc address");
    assert_eq!(cc.address(), Some("am@xn--bcher-kva.example"));
    assert_eq!(cc.name(), Some("Ann Manager"));
    assert!(msg.bcc().is_none());
    assert!(!text(&received[0].data).contains("archive@"));
}

/// `{{urlencode email}}` (SPEC §4): an address with `+`, `'` or `&` arrives
/// in every link as one query value that decodes back to the address,
/// instead of `ada news@…` or a link cut at `&`.
#[test]
fn urlencoded_addresses_arrive_whole_in_links() {
    let dir = CampaignDir::new();
    let addresses = ["ada+news@x.example", "o'brien&co@x.example"];
    dir.write(
        "recipients.csv",
        format!("email\n{}\n", addresses.join("\n")),
    )
    .write(
        "templates/t.txt.hbs",
        "Unsubscribe: https://acme.example/u?e={{urlencode email}}\n",
    )
    .write(
        "templates/t.html.hbs",
        "<a href=\"https://acme.example/u?e={{urlencode email}}&amp;l=1\">Unsubscribe</a>\n",
    );
    write_campaign(
        &dir,
        "",
        "subject = \"News\"\ntext = \"templates/t.txt.hbs\"\nhtml = \"templates/t.html.hbs\"\n\
         list_unsubscribe = \"https://acme.example/u?e={{urlencode email}}\"",
        FILE_TRANSPORT,
    );
    assert_exit(&dir.send(&[]), 0);

    let query_value = |text: &str, prefix: &str| -> String {
        let start = text.find(prefix).expect("the link") + prefix.len();
        let value: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || "%-._~".contains(*c))
            .collect();
        percent_encoding::percent_decode_str(&value)
            .decode_utf8()
            .unwrap()
            .into_owned()
    };
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(dir.path().join("outbox")).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let msg = mail_parser::MessageParser::default().parse(&data).unwrap();
        let to = msg
            .to()
            .unwrap()
            .first()
            .unwrap()
            .address()
            .unwrap()
            .to_string();
        let link = "https://acme.example/u?e=";
        let text = msg.body_text(0).unwrap();
        let html = msg.body_html(0).unwrap();
        let unsubscribe = raw_header(&msg, "List-Unsubscribe").unwrap();
        for (part, body) in [
            ("text", &*text),
            ("html", &*html),
            ("List-Unsubscribe", &unsubscribe),
        ] {
            assert_eq!(query_value(body, link), to, "{part}: {body}");
        }
        assert!(html.contains("%40x.example&amp;l=1\""), "{html}");
        assert!(
            unsubscribe.contains(&format!(
                "<{link}{}>",
                to.replace('+', "%2B")
                    .replace('@', "%40")
                    .replace('\'', "%27")
                    .replace('&', "%26")
            )),
            "{unsubscribe}"
        );
        seen.push(to);
    }
    seen.sort();
    assert_eq!(seen, addresses);
}
