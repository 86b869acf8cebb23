//! The store's behaviour, the same on every backend: each test runs on a
//! SQLite file and on a throwaway PostgreSQL database.

use std::time::Duration;

use super::*;
use crate::message::Outgoing;

/// A PostgreSQL database made for one test: `HIKYAKU_TEST_PG` names the
/// server (default: the local one, user postgres); dropped by [`TestPg::drop`].
pub(crate) struct TestPg {
    admin: String,
    name: String,
    pub url: String,
}

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";

impl TestPg {
    /// A fresh database, or `None` (said once) where no server answers;
    /// `HIKYAKU_REQUIRE_PG=1` makes that a failure.
    pub async fn create() -> Option<TestPg> {
        use sqlx::Connection as _;
        let admin = std::env::var("HIKYAKU_TEST_PG").unwrap_or_else(|_| DEFAULT_PG.to_string());
        let connected =
            tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&admin)).await;
        let mut conn = match connected {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return skip(&format!("{}: {e}", mask_password(&admin))),
            Err(_) => return skip(&format!("{}: no answer in 5 s", mask_password(&admin))),
        };
        let name = format!("hikyaku_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.ok();
        let url = with_database(&admin, &name);
        Some(TestPg { admin, name, url })
    }

    pub async fn drop(self) {
        use sqlx::Connection as _;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await {
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await
            .ok();
            conn.close().await.ok();
        }
    }
}

/// The server's URL with another database.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map(|q| &tail[q..]).unwrap_or("");
    format!("{scheme}://{authority}/{name}{query}")
}

fn skip<T>(why: &str) -> Option<T> {
    use std::io::Write as _;
    if std::env::var("HIKYAKU_REQUIRE_PG").is_ok_and(|v| v == "1") {
        panic!("HIKYAKU_REQUIRE_PG=1 but PostgreSQL is not reachable: {why}");
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        // Straight to stderr: the test harness captures print macros.
        let _ = writeln!(
            std::io::stderr(),
            "PostgreSQL tests skipped: {why} (HIKYAKU_TEST_PG names the server; HIKYAKU_REQUIRE_PG=1 fails instead)"
        );
    });
    None
}

/// Runs the body once on SQLite and once on PostgreSQL (if a server answers).
macro_rules! on_both {
    (|$store:ident| $body:block) => {{
        let dir = tempfile::tempdir().unwrap();
        {
            let $store = Store::open(&dir.path().join("state.db")).await.unwrap();
            $body
            $store.close().await;
        }
        if let Some(pg) = TestPg::create().await {
            let $store = Store::open_postgres(&pg.url).await.unwrap();
            $body
            $store.close().await;
            pg.drop().await;
        }
    }};
}

fn ident(name: &str) -> Identity {
    Identity {
        name: name.into(),
        file: format!("/campaigns/{name}.toml"),
        delivery: Delivery::Smtp,
    }
}

fn out(n: u32) -> Outgoing {
    let msg = lettre::Message::builder()
        .from("a@example.com".parse().unwrap())
        .to("b@example.com".parse().unwrap())
        .body(String::from("x"))
        .unwrap();
    Outgoing {
        envelope: msg.envelope().clone(),
        bytes: msg.formatted(),
        message_id: "<id@example.com>".into(),
        recipient_count: n,
    }
}

async fn import(store: &Store, c: &CampaignRecord, rows: &[&str]) -> Vec<RowStatus> {
    let mut imp = store
        .import(ImportInto::Campaign(c), &["email".into()])
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for (i, email) in rows.iter().enumerate() {
        let key = email.to_lowercase();
        statuses.push(
            imp.row(i as u64 + 1, email, email, &key, &[email.to_string()])
                .await
                .unwrap(),
        );
    }
    imp.commit().await.unwrap();
    statuses
}

#[tokio::test]
async fn duplicates_removed_rows_and_reimport() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        let st = import(&store, &c, &["a@x.example", "B@x.example", "b@x.example"]).await;
        assert!(matches!(st[2], RowStatus::Duplicate { first_row: 2 }));
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!((counts[State::Pending], counts[State::Skipped]), (2, 1));
        // b leaves the file, c joins.
        import(&store, &c, &["a@x.example", "c@x.example"]).await;
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!(
            (counts[State::Pending], counts[State::Skipped]),
            (2, 1),
            "{counts:?}"
        );
        let mut reasons = Vec::new();
        store
            .export(c.id, Some(State::Skipped), |r| {
                reasons.push((r.email, r.reason.unwrap_or_default()));
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(
            reasons,
            [("B@x.example".to_string(), "removed".to_string())]
        );
    });
}

/// Regression: `status` polled while a first `send` started. The send read
/// the campaign's row, the poll (which creates the row it reads and forgets
/// it when empty) removed it, and the send's lock then failed on a row that
/// was gone. Taking the lock now finds or creates the row itself, and a
/// poll never removes a row a sender holds.
#[tokio::test]
async fn a_status_poll_never_removes_the_row_of_a_send_that_starts() {
    on_both!(|store| {
        let read = store.campaign(&ident("c")).await.unwrap();
        store.forget_if_empty(read.id).await.unwrap();
        let c = store.lock(&ident("c"), "send").await.unwrap();
        let polled = store.campaign(&ident("c")).await.unwrap();
        assert_eq!(polled.id, c.id);
        store.forget_if_empty(polled.id).await.unwrap();
        let found = store.find_campaign(&ident("c")).await.unwrap();
        assert_eq!(found.map(|r| r.id), Some(c.id), "the sender's row stays");
        import(&store, &c, &["a@x.example"]).await;
        assert_eq!(store.counts(c.id).await.unwrap()[State::Pending], 1);
        store.unlock(c.id, "send").await.unwrap();
    });
}

/// Regression: a read of a campaign never sent (status, export, check)
/// made the campaign's row where every process saw it, and removed it when
/// done if it was still empty. Two such reads at once failed: the second
/// read the file into a row the first had removed. Such a read now makes
/// the row inside its own transaction: no one else sees it, nothing is left
/// to remove, and a send starting meanwhile makes the row for itself.
#[tokio::test]
async fn reading_a_campaign_never_sent_shows_no_row_to_anyone_else() {
    on_both!(|store| {
        let mut imp = store
            .import(ImportInto::Found(&ident("c")), &["email".into()])
            .await
            .unwrap();
        imp.row(
            1,
            "a@x.example",
            "a@x.example",
            "a@x.example",
            &["a@x.example".into()],
        )
        .await
        .unwrap();
        assert_eq!(imp.counts().await.unwrap()[State::Pending], 1);
        assert!(store.find_campaign(&ident("c")).await.unwrap().is_none());
        assert!(store.campaigns().await.unwrap().is_empty());
        imp.rollback().await.unwrap();
        assert!(store.find_campaign(&ident("c")).await.unwrap().is_none());
        // A campaign that exists is read in place, and kept.
        let c = store.lock(&ident("c"), "send").await.unwrap();
        let imp = store
            .import(ImportInto::Found(&ident("c")), &["email".into()])
            .await
            .unwrap();
        imp.rollback().await.unwrap();
        let found = store.find_campaign(&ident("c")).await.unwrap();
        assert_eq!(found.map(|r| r.id), Some(c.id));
        store.unlock(c.id, "send").await.unwrap();
    });
}

/// Recipients whose field holds a skipped value are passed over without
/// being read (the closed zones of `timezone_column`), however many.
#[tokio::test]
async fn a_claim_passes_over_the_skipped_values() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        let mut imp = store
            .import(ImportInto::Campaign(&c), &["email".into(), "tz".into()])
            .await
            .unwrap();
        let rows = [
            ("a@x.example", "Asia/Tokyo"),
            ("b@x.example", "Asia/Tokyo"),
            ("c@x.example", "America/New_York"),
            ("d@x.example", ""),
        ];
        for (i, (email, zone)) in rows.iter().enumerate() {
            let fields = [email.to_string(), zone.to_string()];
            imp.row(i as u64 + 1, email, email, email, &fields)
                .await
                .unwrap();
        }
        imp.commit().await.unwrap();
        let claim = |values: &[&str]| {
            let store = store.clone();
            let skip = Skip {
                field: 1,
                values: values.iter().map(|v| v.to_string()).collect(),
            };
            async move {
                let claim = store
                    .claim_held(
                        c.id,
                        "acct",
                        "acct",
                        &[],
                        1_000,
                        1,
                        |_| Ok(out(1)),
                        |_| None,
                        &skip,
                    )
                    .await
                    .unwrap();
                match claim {
                    Claim::Ready { ready, .. } => {
                        let email = ready[0].candidate.email.clone();
                        for r in ready {
                            store
                                .record(&r.candidate, r.log_id, &Outcome::Unclaimed, 1_000)
                                .await
                                .unwrap();
                        }
                        Some(email)
                    }
                    _ => None,
                }
            }
        };
        assert_eq!(claim(&[]).await.as_deref(), Some("a@x.example"));
        assert_eq!(claim(&["Asia/Tokyo"]).await.as_deref(), Some("c@x.example"));
        assert_eq!(
            claim(&["Asia/Tokyo", "America/New_York"]).await.as_deref(),
            Some("d@x.example")
        );
        assert_eq!(claim(&["Asia/Tokyo", "America/New_York", ""]).await, None);
    });
}

#[tokio::test]
async fn claim_marks_sending_and_logs_then_windows_hold() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        import(&store, &c, &["a@x.example", "b@x.example"]).await;
        let win = Window::new(1, Duration::from_secs(60)).unwrap();
        let now = 1_000_000;
        let Claim::Ready { mut ready, .. } = store
            .claim(c.id, "acct", "acct", &[win], now, 1, |_| Ok(out(1)))
            .await
            .unwrap()
        else {
            panic!("expected a claim")
        };
        let Ready {
            candidate, log_id, ..
        } = ready.remove(0);
        assert_eq!(store.counts(c.id).await.unwrap()[State::Sending], 1);
        match store
            .claim(c.id, "acct", "acct", &[win], now + 10, 1, |_| Ok(out(1)))
            .await
            .unwrap()
        {
            Claim::Wait { until_ms, .. } => assert_eq!(until_ms, now + 60_000),
            other => panic!("expected a wait, got {other:?}"),
        }
        store
            .record(
                &candidate,
                log_id,
                &Outcome::Sent {
                    reply: "250 ok".into(),
                },
                now,
            )
            .await
            .unwrap();
        assert_eq!(store.counts(c.id).await.unwrap()[State::Sent], 1);
        // Another campaign on the same account shares the window.
        let c2 = store.campaign(&ident("c2")).await.unwrap();
        import(&store, &c2, &["z@x.example"]).await;
        assert!(matches!(
            store
                .claim(c2.id, "acct", "acct", &[win], now + 20, 1, |_| Ok(out(1)))
                .await
                .unwrap(),
            Claim::Wait { .. }
        ));
    });
}

#[tokio::test]
async fn a_batch_claim_marks_each_sending_and_unclaimed_ones_go_back() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        import(
            &store,
            &c,
            &["a@x.example", "b@x.example", "c@x.example", "d@x.example"],
        )
        .await;
        let Claim::Ready { ready, unbuildable } = store
            .claim(c.id, "acct", "acct", &[], 7, 3, |_| Ok(out(1)))
            .await
            .unwrap()
        else {
            panic!("expected a claim")
        };
        assert_eq!((ready.len(), unbuildable.len()), (3, 0));
        assert_eq!(store.counts(c.id).await.unwrap()[State::Sending], 3);
        for r in &ready[1..] {
            store
                .record(&r.candidate, r.log_id, &Outcome::Unclaimed, 8)
                .await
                .unwrap();
        }
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!((counts[State::Sending], counts[State::Pending]), (1, 3));
        let rows = store
            .schedule(
                "acct",
                &[Window::new(9, Duration::from_secs(60)).unwrap()],
                9,
            )
            .await
            .unwrap();
        assert_eq!(rows.usage(9)[0].1, 1, "unclaimed sends leave the log");
    });
}

#[tokio::test]
async fn suppressed_addresses_are_skipped_and_come_back_when_removed() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        store.suppress("a@x.example", "manual").await.unwrap();
        let st = import(&store, &c, &["A@x.example"]).await;
        assert_eq!(st[0], RowStatus::Suppressed);
        store.unsuppress("a@x.example").await.unwrap();
        let st = import(&store, &c, &["A@x.example"]).await;
        assert!(matches!(st[0], RowStatus::ToSend { .. }));
    });
}

#[tokio::test]
async fn an_account_set_aside_stays_so_until_restored_and_pauses_are_apart() {
    on_both!(|store| {
        let key = "news2@gmail.com@smtp.gmail.com:587";
        assert_eq!(store.set_aside_since(key).await.unwrap(), None);
        store
            .set_aside(key, "535 5.7.8 not accepted", 1_000)
            .await
            .unwrap();
        store
            .set_aside(key, "535 5.7.8 again", 2_000)
            .await
            .unwrap();
        assert_eq!(
            store.set_aside_since(key).await.unwrap(),
            Some((2_000, "535 5.7.8 again".to_string()))
        );
        // Being set aside is no pause: a new run tries the login at once.
        assert_eq!(store.account_pause(key, 0).await.unwrap(), None);
        store.restore_account(key).await.unwrap();
        assert_eq!(store.set_aside_since(key).await.unwrap(), None);
    });
}

#[tokio::test]
async fn returned_recipient_is_pending_again_and_unlogged() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        import(&store, &c, &["a@x.example"]).await;
        let win = Window::new(1, Duration::from_secs(60)).unwrap();
        let Claim::Ready { mut ready, .. } = store
            .claim(c.id, "acct", "acct", &[win], 5, 1, |_| Ok(out(1)))
            .await
            .unwrap()
        else {
            panic!()
        };
        let Ready {
            candidate, log_id, ..
        } = ready.remove(0);
        store
            .record(
                &candidate,
                log_id,
                &Outcome::Returned {
                    reply: "535".into(),
                    unlog: true,
                },
                6,
            )
            .await
            .unwrap();
        assert_eq!(store.counts(c.id).await.unwrap()[State::Pending], 1);
        assert!(matches!(
            store
                .claim(c.id, "acct", "acct", &[win], 6, 1, |_| Ok(out(1)))
                .await
                .unwrap(),
            Claim::Ready { .. }
        ));
    });
}

#[test]
fn test_databases_keep_the_server_and_its_options() {
    assert_eq!(
        with_database("postgres://u:p@h:5/postgres?sslmode=disable", "t1"),
        "postgres://u:p@h:5/t1?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "t2"), "postgres://h/t2");
}

/// Two workers on one PostgreSQL campaign, as two processes would be.
async fn two_workers() -> Option<(TestPg, Store, Store, CampaignRecord)> {
    let pg = TestPg::create().await?;
    let a = Store::open_postgres(&pg.url).await.unwrap();
    let b = Store::open_postgres(&pg.url).await.unwrap();
    let c = a.campaign(&ident("c")).await.unwrap();
    Some((pg, a, b, c))
}

/// Ends a test of [`two_workers`].
async fn close_workers(pg: TestPg, a: Store, b: Store) {
    a.close().await;
    b.close().await;
    pg.drop().await;
}

/// Claims up to `max` recipients of the campaign for account `acct`, no
/// windows; something must be claimed.
async fn claimed(store: &Store, campaign_id: i64, now: i64, max: usize) -> Vec<Ready> {
    match store
        .claim(campaign_id, "acct", "acct", &[], now, max, |_| Ok(out(1)))
        .await
        .unwrap()
    {
        Claim::Ready { ready, .. } if !ready.is_empty() => ready,
        other => panic!("nothing claimed: {other:?}"),
    }
}

#[tokio::test]
async fn workers_never_claim_the_same_recipient_and_share_the_windows() {
    let Some((pg, a, b, c)) = two_workers().await else {
        return;
    };
    let emails: Vec<String> = (0..40).map(|i| format!("r{i}@x.example")).collect();
    let rows: Vec<&str> = emails.iter().map(String::as_str).collect();
    import(&a, &c, &rows).await;
    let mut seen = std::collections::HashSet::new();
    loop {
        let (x, y) = tokio::join!(
            a.claim(c.id, "acct", "acct", &[], 1, 3, |_| Ok(out(1))),
            b.claim(c.id, "acct", "acct", &[], 1, 3, |_| Ok(out(1)))
        );
        let mut got = 0;
        for claim in [x.unwrap(), y.unwrap()] {
            if let Claim::Ready { ready, .. } = claim {
                for r in ready {
                    got += 1;
                    assert!(
                        seen.insert(r.candidate.id),
                        "claimed twice: {}",
                        r.candidate.email
                    );
                }
            }
        }
        if got == 0 {
            break;
        }
    }
    assert_eq!(seen.len(), 40);
    // One send a minute for the account, whichever worker asks.
    let c2 = a.campaign(&ident("c2")).await.unwrap();
    import(&a, &c2, &["y@x.example", "z@x.example"]).await;
    let win = Window::new(1, Duration::from_secs(60)).unwrap();
    let windows = [win];
    let (x, y) = tokio::join!(
        a.claim(c2.id, "acct2", "acct2", &windows, 10, 1, |_| Ok(out(1))),
        b.claim(c2.id, "acct2", "acct2", &windows, 10, 1, |_| Ok(out(1)))
    );
    let ready = [x.unwrap(), y.unwrap()]
        .into_iter()
        .filter(|c| matches!(c, Claim::Ready { .. }))
        .count();
    assert_eq!(ready, 1, "one slot, one claim");
    a.close().await;
    b.close().await;
    pg.drop().await;
}

#[tokio::test]
async fn a_dead_workers_rows_become_unknown_and_a_live_ones_stay_theirs() {
    let Some((pg, a, b, c)) = two_workers().await else {
        return;
    };
    import(&a, &c, &["a@x.example", "b@x.example"]).await;
    a.lock(&ident("c"), "a").await.unwrap();
    b.lock(&ident("c"), "b").await.unwrap();
    for w in [&a, &b] {
        let claim = w
            .claim(c.id, "acct", "acct", &[], 1, 1, |_| Ok(out(1)))
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Ready { .. }));
    }
    assert_eq!(b.settle_interrupted(c.id).await.unwrap(), 0, "a lives");
    // a's lease runs out (its machine died): b settles a's row only.
    let Store::Postgres(pa) = &a else {
        unreachable!()
    };
    pa.expire_lease_for_test(c.id).await;
    assert_eq!(b.settle_interrupted(c.id).await.unwrap(), 1);
    let counts = b.counts(c.id).await.unwrap();
    assert_eq!((counts[State::Unknown], counts[State::Sending]), (1, 1));
    a.close().await;
    b.close().await;
    pg.drop().await;
}

#[tokio::test]
async fn a_worker_arriving_after_the_read_joins_it() {
    let Some((pg, a, b, c)) = two_workers().await else {
        return;
    };
    a.lock(&ident("c"), "a").await.unwrap();
    import(&a, &c, &["a@x.example"]).await;
    b.lock(&ident("c"), "b").await.unwrap();
    let imp = b
        .import(ImportInto::Campaign(&c), &["email".into()])
        .await
        .unwrap();
    assert!(imp.joined());
    imp.commit().await.unwrap();
    // With a gone, the next worker reads the file itself.
    a.unlock(c.id, "a").await.unwrap();
    let other = Store::open_postgres(&pg.url).await.unwrap();
    other.lock(&ident("c"), "o").await.unwrap();
    b.unlock(c.id, "b").await.unwrap();
    let imp = other
        .import(ImportInto::Campaign(&c), &["email".into()])
        .await
        .unwrap();
    assert!(!imp.joined());
    imp.rollback().await.unwrap();
    for s in [a, b, other] {
        s.close().await;
    }
    pg.drop().await;
}

/// Imports `batches` in one read of the file, one `rows` call per batch;
/// `None` is a row whose address is not valid. Rows are numbered on.
async fn import_batches(
    store: &Store,
    c: &CampaignRecord,
    batches: &[&[Option<&str>]],
) -> Vec<Vec<RowStatus>> {
    let mut imp = store
        .import(ImportInto::Campaign(c), &["email".into()])
        .await
        .unwrap();
    let mut all = Vec::new();
    let mut number = 0;
    for batch in batches {
        let cells: Vec<(String, [String; 1])> = batch
            .iter()
            .map(|e| {
                let e = e.unwrap_or("not an address");
                (e.to_lowercase(), [e.to_string()])
            })
            .collect();
        let rows: Vec<ImportRow<'_>> = batch
            .iter()
            .zip(&cells)
            .map(|(e, (key, fields))| {
                number += 1;
                ImportRow {
                    number,
                    email: &fields[0],
                    valid: e.map(|e| (e, key.as_str())),
                    fields,
                }
            })
            .collect();
        all.push(imp.rows(&rows).await.unwrap());
    }
    imp.commit().await.unwrap();
    all
}

fn to_send(status: &RowStatus) -> i64 {
    match status {
        RowStatus::ToSend { id } => *id,
        other => panic!("expected a row to send, got {other:?}"),
    }
}

#[tokio::test]
async fn a_batch_of_rows_is_classified_as_row_by_row() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        store.suppress("s@x.example", "manual").await.unwrap();
        let st = import_batches(
            &store,
            &c,
            &[
                &[
                    Some("a@x.example"),
                    Some("b@x.example"),
                    Some("B@x.example"),
                    Some("S@x.example"),
                    None,
                ],
                &[Some("c@x.example"), Some("A@x.example")],
            ],
        )
        .await;
        let (a, b) = (to_send(&st[0][0]), to_send(&st[0][1]));
        assert_eq!(st[0][2], RowStatus::Duplicate { first_row: 2 });
        assert_eq!(st[0][3], RowStatus::Suppressed);
        assert_eq!(st[0][4], RowStatus::Settled);
        let c_id = to_send(&st[1][0]);
        assert_eq!(st[1][1], RowStatus::Duplicate { first_row: 1 });
        assert!(a > 0 && b > 0 && c_id > 0 && a != b && b != c_id && a != c_id);
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!(
            (counts[State::Pending], counts[State::Skipped]),
            (3, 4),
            "{counts:?}"
        );
        let mut skipped = Vec::new();
        store
            .export(c.id, Some(State::Skipped), |r| {
                skipped.push((r.email, r.reason.unwrap_or_default()));
                Ok(())
            })
            .await
            .unwrap();
        skipped.sort();
        assert_eq!(
            skipped,
            [
                ("A@x.example", "duplicate"),
                ("B@x.example", "duplicate"),
                ("S@x.example", "suppressed"),
                ("not an address", "invalid address"),
            ]
            .map(|(e, r)| (e.to_string(), r.to_string()))
        );
        // One of them is sent; the file is read again with a new row.
        let Claim::Ready { mut ready, .. } = store
            .claim(c.id, "acct", "acct", &[], 1_000, 1, |_| Ok(out(1)))
            .await
            .unwrap()
        else {
            panic!("expected a claim")
        };
        let Ready {
            candidate, log_id, ..
        } = ready.remove(0);
        let sent = candidate.id;
        store
            .record(
                &candidate,
                log_id,
                &Outcome::Sent {
                    reply: "250 ok".into(),
                },
                1_000,
            )
            .await
            .unwrap();
        let st = import_batches(
            &store,
            &c,
            &[&[
                Some("a@x.example"),
                Some("b@x.example"),
                Some("c@x.example"),
                Some("s@x.example"),
                Some("d@x.example"),
            ]],
        )
        .await;
        for (i, id) in [a, b, c_id].into_iter().enumerate() {
            if id == sent {
                assert_eq!(st[0][i], RowStatus::Settled, "row {}", i + 1);
            } else {
                assert_eq!(st[0][i], RowStatus::ToSend { id }, "row {}", i + 1);
            }
        }
        assert_eq!(st[0][3], RowStatus::Suppressed);
        let d = to_send(&st[0][4]);
        assert!(![a, b, c_id].contains(&d));
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!(
            (
                counts[State::Pending],
                counts[State::Sent],
                counts[State::Skipped]
            ),
            (3, 1, 1),
            "{counts:?}"
        );
    });
}

/// Outcomes are written together: ones recorded while another write held
/// the store wait, and the next claim writes them all, each kind as it
/// would be alone, before it marks new rows `sending` (SPEC §7.3: the rows
/// `sending` in the database stay those in flight); a flush writes the
/// rest. On PostgreSQL every outcome used to be a synced commit of its own.
#[tokio::test]
async fn waiting_outcomes_are_written_together_before_the_next_claim() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        let emails = ["a", "b", "c", "d", "e", "f", "g", "h"].map(|l| format!("{l}@x.example"));
        let emails: Vec<&str> = emails.iter().map(String::as_str).collect();
        import(&store, &c, &emails).await;
        let Claim::Ready { ready, .. } = store
            .claim(c.id, "acct", "acct", &[], 10, 6, |_| Ok(out(1)))
            .await
            .unwrap()
        else {
            panic!("expected a claim")
        };
        assert_eq!(ready.len(), 6);
        let outcomes = [
            Outcome::Sent {
                reply: "250 ok".into(),
            },
            Outcome::Deferred {
                reply: "451 later".into(),
                retry_at_ms: 99_000,
            },
            Outcome::Failed {
                reply: "550 no such user".into(),
                suppress: true,
            },
            Outcome::Unknown {
                reply: "connection reset".into(),
            },
            Outcome::Returned {
                reply: "421 busy".into(),
                unlog: true,
            },
            Outcome::Unclaimed,
        ];
        for (r, outcome) in ready.iter().zip(&outcomes) {
            store.queue_outcome_for_test(&r.candidate, r.log_id, outcome, 20);
        }
        let Claim::Ready { ready: next, .. } = store
            .claim(c.id, "acct", "acct", &[], 30, 1, |_| Ok(out(1)))
            .await
            .unwrap()
        else {
            panic!("expected a claim")
        };
        assert_eq!(
            next[0].candidate.email, "e@x.example",
            "returned: first again"
        );
        let counts = store.counts(c.id).await.unwrap();
        let by_state = |s: State| counts[s];
        assert_eq!(
            State::ALL.map(by_state),
            // pending, sending, sent, deferred, failed, unknown, skipped, bounced
            [3, 1, 1, 1, 1, 1, 0, 0],
            "{counts:?}"
        );
        let mut rows = Vec::new();
        store
            .export(c.id, None, |r| {
                rows.push((
                    r.email,
                    r.state,
                    r.reason,
                    r.attempts,
                    r.last_reply,
                    r.updated_at,
                ));
                Ok(())
            })
            .await
            .unwrap();
        let row = |email: &str| rows.iter().find(|r| r.0 == email).unwrap().clone();
        let text = |s: &str| Some(s.to_string());
        assert_eq!(
            row("a@x.example"),
            (
                "a@x.example".into(),
                "sent".into(),
                None,
                1,
                text("250 ok"),
                20
            )
        );
        assert_eq!(
            row("b@x.example"),
            (
                "b@x.example".into(),
                "deferred".into(),
                text("transient failure, will retry"),
                1,
                text("451 later"),
                20
            )
        );
        assert_eq!(store.next_retry(c.id).await.unwrap(), Some(99_000));
        assert_eq!(
            row("c@x.example"),
            (
                "c@x.example".into(),
                "failed".into(),
                text("rejected: 550 no such user"),
                1,
                text("550 no such user"),
                20
            )
        );
        assert_eq!(
            store.suppressions().await.unwrap()[0].0,
            "c@x.example",
            "a permanent failure suppresses its address"
        );
        assert_eq!(row("d@x.example").1, "unknown");
        assert_eq!(row("d@x.example").4, text("connection reset"));
        // Returned: pending again without its attempt, then claimed anew.
        assert_eq!(
            row("e@x.example"),
            (
                "e@x.example".into(),
                "sending".into(),
                None,
                1,
                text("421 busy"),
                30
            )
        );
        // Unclaimed: as it was before the claim.
        let f = row("f@x.example");
        assert_eq!((f.1.as_str(), f.2, f.3, f.4), ("pending", None, 0, None));
        let win = Window::new(100, Duration::from_secs(60)).unwrap();
        let log = store.schedule("acct", &[win], 30).await.unwrap();
        assert_eq!(
            log.usage(30)[0].1,
            5,
            "returned and unclaimed sends leave the log"
        );
        store.queue_outcome_for_test(
            &next[0].candidate,
            next[0].log_id,
            &Outcome::Sent {
                reply: "250 ok".into(),
            },
            40,
        );
        store.flush().await.unwrap();
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!((counts[State::Sent], counts[State::Sending]), (2, 0));
    });
}

/// The size of the recipients table with its indexes.
async fn table_bytes(url: &str) -> i64 {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar("SELECT pg_total_relation_size('recipients')")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Regression: on PostgreSQL a read that is rolled back (check, a dry run)
/// wrote the file's rows into the table, where they stayed as dead rows
/// until a vacuum: a checked 1,000,000-row file took about as much room
/// again as its rows. Such a read now writes into a copy of the campaign's
/// rows that goes with its transaction, and sees the rows kept before it.
#[tokio::test]
async fn a_read_rolled_back_leaves_no_dead_rows() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::open_postgres(&pg.url).await.unwrap();
    let c = store.campaign(&ident("c")).await.unwrap();
    let kept = to_send(&import(&store, &c, &["a@x.example"]).await[0]);
    let before = table_bytes(&pg.url).await;
    let emails: Vec<String> = (0..300).map(|i| format!("u{i}@x.example")).collect();
    let columns = ["email".to_string()];
    for into in [ImportInto::Discarded(&c), ImportInto::Found(&ident("new"))] {
        let mut imp = store.import(into, &columns).await.unwrap();
        let st = imp
            .row(
                1,
                "a@x.example",
                "a@x.example",
                "a@x.example",
                &["a@x.example".into()],
            )
            .await
            .unwrap();
        if matches!(into, ImportInto::Discarded(_)) {
            assert_eq!(st, RowStatus::ToSend { id: kept }, "the kept row is seen");
        }
        for (i, e) in emails.iter().enumerate() {
            imp.row(i as u64 + 2, e, e, e, std::slice::from_ref(e))
                .await
                .unwrap();
        }
        assert_eq!(imp.counts().await.unwrap()[State::Pending], 301);
        let mut exported = 0;
        imp.export(None, |_| {
            exported += 1;
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(exported, 301);
        imp.rollback().await.unwrap();
    }
    assert_eq!(
        table_bytes(&pg.url).await,
        before,
        "nothing written to the table"
    );
    assert_eq!(store.counts(c.id).await.unwrap().total(), 1);
    assert!(store.find_campaign(&ident("new")).await.unwrap().is_none());
    // The same read kept writes the table itself.
    let imp = store
        .import(ImportInto::Campaign(&c), &columns)
        .await
        .unwrap();
    imp.commit().await.unwrap();
    store.close().await;
    pg.drop().await;
}

/// Rows are stored compactly on PostgreSQL as on SQLite (the cells joined
/// by a separator, the address left out where it is the key), and rows
/// stored before as JSON are still read, and passed over for a skipped
/// value like the others.
#[tokio::test]
async fn rows_are_stored_compactly_and_older_json_rows_still_read() {
    use sqlx::Connection as _;
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::open_postgres(&pg.url).await.unwrap();
    let c = store.campaign(&ident("c")).await.unwrap();
    let mut imp = store
        .import(ImportInto::Campaign(&c), &["email".into(), "tz".into()])
        .await
        .unwrap();
    for (i, (email, zone)) in [
        ("a@x.example", "Asia/Tokyo"),
        ("Ann@X.example", "Asia/Tokyo"),
    ]
    .iter()
    .enumerate()
    {
        let fields = [email.to_string(), zone.to_string()];
        imp.row(i as u64 + 1, email, email, &email.to_lowercase(), &fields)
            .await
            .unwrap();
    }
    imp.commit().await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let stored: Vec<(String, Option<String>, String)> =
        sqlx::query_as("SELECT email, address, fields FROM recipients ORDER BY row_number")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        stored,
        [
            (
                String::new(),
                None,
                "\u{1f}\u{1e}\u{1f}Asia/Tokyo".to_string()
            ),
            (
                "Ann@X.example".into(),
                None,
                "\u{1f}\u{1e}\u{1f}Asia/Tokyo".into()
            ),
        ]
    );
    sqlx::query(
        "INSERT INTO recipients (campaign_id, row_key, email, address, row_number, fields, state, seen_gen, updated_at) \
         VALUES ($1, 'old@x.example', 'Old@x.example', 'Old@x.example', 3, '[\"Old@x.example\",\"Europe/Paris\"]', 'pending', 1, 0)",
    )
    .bind(c.id)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let mut rows = Vec::new();
    store
        .export(c.id, None, |r| {
            rows.push((r.email, r.fields));
            Ok(())
        })
        .await
        .unwrap();
    let cells = |a: &str, b: &str| vec![a.to_string(), b.to_string()];
    assert_eq!(
        rows,
        [
            ("a@x.example".into(), cells("a@x.example", "Asia/Tokyo")),
            ("Ann@X.example".into(), cells("Ann@X.example", "Asia/Tokyo")),
            (
                "Old@x.example".into(),
                cells("Old@x.example", "Europe/Paris")
            ),
        ]
    );
    let claim = |values: &[&str]| {
        let store = store.clone();
        let skip = Skip {
            field: 1,
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        async move {
            match store
                .claim_held(
                    c.id,
                    "acct",
                    "acct",
                    &[],
                    1_000,
                    1,
                    |_| Ok(out(1)),
                    |_| None,
                    &skip,
                )
                .await
                .unwrap()
            {
                Claim::Ready { ready, .. } => {
                    let r = &ready[0];
                    store
                        .record(&r.candidate, r.log_id, &Outcome::Unclaimed, 1_000)
                        .await
                        .unwrap();
                    Some((
                        r.candidate.email.clone(),
                        r.candidate.address.clone(),
                        r.candidate.fields.clone(),
                    ))
                }
                _ => None,
            }
        }
    };
    assert_eq!(
        claim(&["Asia/Tokyo"]).await,
        Some((
            "Old@x.example".into(),
            "Old@x.example".into(),
            cells("Old@x.example", "Europe/Paris")
        ))
    );
    assert_eq!(
        claim(&[]).await,
        Some((
            "a@x.example".into(),
            "a@x.example".into(),
            cells("a@x.example", "Asia/Tokyo")
        ))
    );
    assert_eq!(claim(&["Asia/Tokyo", "Europe/Paris"]).await, None);
    store.close().await;
    pg.drop().await;
}

/// Messages are rendered and signed outside any database transaction
/// (SPEC §10): while one worker builds its messages, another claims for
/// the same account at once instead of waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_building_its_messages_holds_up_no_other_claim() {
    async fn body(a: Store, b: Store) {
        let c = a.campaign(&ident("c")).await.unwrap();
        import(&a, &c, &["a@x.example"]).await;
        let c2 = b.campaign(&ident("c2")).await.unwrap();
        import(&b, &c2, &["b@x.example"]).await;
        let handle = tokio::runtime::Handle::current();
        let claim = a
            .claim(c.id, "acct", "acct", &[], 1, 1, |_| {
                let other = tokio::task::block_in_place(|| {
                    handle.block_on(tokio::time::timeout(
                        Duration::from_secs(3),
                        b.claim(c2.id, "acct", "acct", &[], 1, 1, |_| Ok(out(1))),
                    ))
                });
                match other {
                    Ok(Ok(Claim::Ready { ready, .. })) if ready.len() == 1 => Ok(out(1)),
                    other => Err(format!("the other worker's claim: {other:?}")),
                }
            })
            .await
            .unwrap();
        let Claim::Ready { ready, unbuildable } = claim else {
            panic!("nothing claimed: {claim:?}")
        };
        assert!(unbuildable.is_empty(), "{unbuildable:?}");
        assert_eq!(ready.len(), 1);
        a.close().await;
        b.close().await;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let a = Store::open(&path).await.unwrap();
    let b = Store::open(&path).await.unwrap();
    body(a, b).await;
    if let Some(pg) = TestPg::create().await {
        let a = Store::open_postgres(&pg.url).await.unwrap();
        let b = Store::open_postgres(&pg.url).await.unwrap();
        body(a, b).await;
        pg.drop().await;
    }
}

/// Rows a worker picked and never claimed (it died building their
/// messages) are passed over by the others only for a moment: until then a
/// worker with nothing else to send waits for them instead of finishing.
#[tokio::test]
async fn rows_picked_by_a_worker_that_died_are_not_lost() {
    let Some((pg, a, b, c)) = two_workers().await else {
        return;
    };
    import(&a, &c, &["a@x.example", "b@x.example", "c@x.example"]).await;
    let Store::Postgres(dead) = &a else {
        unreachable!()
    };
    let picked = dead.pick(c.id, 1, &[], &Skip::default(), 2).await.unwrap();
    assert_eq!(picked.len(), 2);
    // The third row is free.
    let ready = claimed(&b, c.id, 1, 3).await;
    assert_eq!(
        ready
            .iter()
            .map(|r| r.candidate.email.as_str())
            .collect::<Vec<_>>(),
        ["c@x.example"]
    );
    let before = crate::time::now_ms();
    match b
        .claim(c.id, "acct", "acct", &[], 2, 3, |_| Ok(out(1)))
        .await
        .unwrap()
    {
        Claim::Idle {
            next_due_ms: Some(due),
        } => assert!(
            due > before && due <= crate::time::now_ms() + super::postgres::PICK_MS,
            "due {due}, now {before}"
        ),
        other => panic!("expected to wait for the picked rows: {other:?}"),
    }
    close_workers(pg, a, b).await;
}

/// A recipient one worker claimed and gave back (never offered to the
/// server) is free for every other worker at once, not after its lease.
#[tokio::test]
async fn a_recipient_given_back_is_free_for_the_other_workers_at_once() {
    let Some((pg, a, b, c)) = two_workers().await else {
        return;
    };
    import(&a, &c, &["a@x.example"]).await;
    let ready = claimed(&a, c.id, 1, 1).await;
    a.record(&ready[0].candidate, ready[0].log_id, &Outcome::Unclaimed, 2)
        .await
        .unwrap();
    a.flush().await.unwrap();
    match b
        .claim(c.id, "acct", "acct", &[], 3, 1, |_| Ok(out(1)))
        .await
        .unwrap()
    {
        Claim::Ready { ready, .. } => assert_eq!(ready[0].candidate.email, "a@x.example"),
        other => panic!("the other worker waits for a lease: {other:?}"),
    }
    close_workers(pg, a, b).await;
}

/// Outcomes recorded one after the other are written together a moment
/// later, without a claim or a flush, where other workers see them.
#[tokio::test]
async fn outcomes_recorded_are_soon_written_for_every_worker_to_see() {
    let Some((pg, a, b, c)) = two_workers().await else {
        return;
    };
    import(&a, &c, &["a@x.example", "b@x.example", "c@x.example"]).await;
    let ready = claimed(&a, c.id, 1, 3).await;
    for r in &ready {
        let sent = Outcome::Sent {
            reply: "250 ok".into(),
        };
        a.record(&r.candidate, r.log_id, &sent, 2).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while b.counts(c.id).await.unwrap()[State::Sent] < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "outcomes not written: {:?}",
            b.counts(c.id).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    close_workers(pg, a, b).await;
}

/// The database itself refuses a second row with a recipient's key in one
/// campaign (SPEC §7.1: an address stored twice would be mailed twice),
/// whatever wrote it.
#[tokio::test]
async fn postgresql_refuses_a_second_row_for_one_key() {
    use sqlx::Connection as _;
    let Some((pg, a, b, c)) = two_workers().await else {
        return;
    };
    import(&a, &c, &["a@x.example"]).await;
    let mut conn = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let again = sqlx::query(
        "INSERT INTO recipients (campaign_id, row_key, email, row_number, fields, state, seen_gen, updated_at) \
         SELECT campaign_id, row_key, email, row_number + 1, fields, state, seen_gen, updated_at \
         FROM recipients WHERE campaign_id = $1",
    )
    .bind(c.id)
    .execute(&mut conn)
    .await;
    assert!(again.is_err(), "a second row for the same key was stored");
    conn.close().await.unwrap();
    close_workers(pg, a, b).await;
}

/// Claims find pending rows from a cursor below which the campaign has
/// none (SPEC §12: the index by state holds no pending row). Rows made
/// pending again below it — given back, never offered, `--resend-unknown`,
/// `--retry-failed` — are claimed again all the same, in file order, and
/// the counts stay right.
#[tokio::test]
async fn rows_pending_again_below_the_claims_cursor_are_claimed() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        let emails: Vec<String> = (1..=8).map(|i| format!("r{i}@x.example")).collect();
        let rows: Vec<&str> = emails.iter().map(String::as_str).collect();
        import(&store, &c, &rows).await;
        let mut first = claimed(&store, c.id, 1, 4).await;
        let got: Vec<i64> = first.iter().map(|r| r.candidate.row_number).collect();
        assert_eq!(got, [1, 2, 3, 4], "claims go in file order");
        // The next claim moves the cursor past the rows `sending`.
        let fifth = claimed(&store, c.id, 2, 1).await;
        assert_eq!(fifth[0].candidate.row_number, 5);
        let outcomes = [
            Outcome::Returned {
                reply: "421 later".into(),
                unlog: true,
            },
            Outcome::Unclaimed,
            Outcome::Unknown {
                reply: "lost".into(),
            },
            Outcome::Failed {
                reply: "550 no".into(),
                suppress: false,
            },
        ];
        for (r, outcome) in first.drain(..).zip(outcomes) {
            store
                .record(&r.candidate, r.log_id, &outcome, 3)
                .await
                .unwrap();
        }
        store
            .record(
                &fifth[0].candidate,
                fifth[0].log_id,
                &Outcome::Sent {
                    reply: "250 ok".into(),
                },
                3,
            )
            .await
            .unwrap();
        store.flush().await.unwrap();
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!(
            (
                counts[State::Pending],
                counts[State::Unknown],
                counts[State::Failed],
                counts[State::Sent],
                counts.total()
            ),
            (5, 1, 1, 1, 8)
        );
        let again = claimed(&store, c.id, 4, 10).await;
        let got: Vec<i64> = again.iter().map(|r| r.candidate.row_number).collect();
        assert_eq!(got, [1, 2, 6, 7, 8], "rows given back are claimed again");
        for r in &again {
            let unclaimed = Outcome::Unclaimed;
            store
                .record(&r.candidate, r.log_id, &unclaimed, 5)
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        // Everything claimable is claimed: the cursor is past the end.
        let all = claimed(&store, c.id, 6, 10).await;
        assert_eq!(all.len(), 5);
        for r in &all {
            let sent = Outcome::Sent {
                reply: "250 ok".into(),
            };
            store
                .record(&r.candidate, r.log_id, &sent, 7)
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        assert_eq!(store.requeue_unknown(c.id).await.unwrap(), 1);
        // (On PostgreSQL `--retry-failed` used to compare the campaign
        // with the time and so requeue nothing.)
        assert_eq!(store.requeue_failed(c.id).await.unwrap(), 1);
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!((counts[State::Pending], counts[State::Sent]), (2, 6));
        let last = claimed(&store, c.id, 8, 10).await;
        let got: Vec<i64> = last.iter().map(|r| r.candidate.row_number).collect();
        assert_eq!(got, [3, 4], "requeued rows are claimed again");
    });
}

/// A PostgreSQL database from before rows were narrowed and pending rows
/// left out of the index by state migrates: its rows keep their ids,
/// states and cells, new rows go on from its ids, and claims go on in file
/// order.
#[tokio::test]
async fn a_postgresql_database_from_before_narrow_rows_migrates() {
    use sqlx::Connection as _;
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let mut conn = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let mut before = sqlx::migrate!("./migrations/postgres");
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < 20261130200000)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&mut conn).await.unwrap();
    let campaign: i64 = sqlx::query_scalar(
        "INSERT INTO campaigns (name, transport, file, import_gen, created_at) \
         VALUES ('c', 'smtp', '/campaigns/c.toml', 1, 0) RETURNING id",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO recipients (campaign_id, row_key, email, row_number, fields, state, attempts, \
         message_id, seen_gen, updated_at) VALUES \
         ($1, 'a@x.example', '', 1, '[\"a@x.example\"]', 'sent', 1, '<a@x>', 1, 5), \
         ($1, 'b@x.example', '', 2, '[\"b@x.example\"]', 'pending', 0, NULL, 1, 5), \
         ($1, 'c@x.example', '', 3, '[\"c@x.example\"]', 'pending', 0, NULL, 1, 5) RETURNING id",
    )
    .bind(campaign)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let store = Store::open_postgres(&pg.url).await.unwrap();
    let c = store.campaign(&ident("c")).await.unwrap();
    assert_eq!(c.id, campaign);
    let counts = store.counts(c.id).await.unwrap();
    assert_eq!((counts[State::Sent], counts[State::Pending]), (1, 2));
    let statuses = import(
        &store,
        &c,
        &["a@x.example", "b@x.example", "c@x.example", "d@x.example"],
    )
    .await;
    assert_eq!(to_send(&statuses[1]), ids[1], "a row keeps its id");
    assert!(
        to_send(&statuses[3]) > ids[2],
        "new rows go on from the ids"
    );
    let ready = claimed(&store, c.id, 10, 10).await;
    let got: Vec<(i64, i64, String)> = ready
        .iter()
        .map(|r| {
            (
                r.candidate.row_number,
                r.candidate.attempts,
                r.candidate.fields[0].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (2, 0, "b@x.example".to_string()),
            (3, 0, "c@x.example".to_string()),
            (4, 0, "d@x.example".to_string())
        ]
    );
    store.close().await;
    pg.drop().await;
}

/// `reset` forgets a campaign's rows with it, and only its own.
#[tokio::test]
async fn reset_forgets_the_campaigns_rows_and_only_them() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        let d = store.campaign(&ident("d")).await.unwrap();
        import(&store, &c, &["a@x.example", "b@x.example", "c@x.example"]).await;
        import(&store, &d, &["a@x.example"]).await;
        assert_eq!(store.reset("c").await.unwrap(), Some(3));
        assert_eq!(store.reset("c").await.unwrap(), None);
        assert_eq!(store.counts(c.id).await.unwrap().total(), 0, "no row left");
        assert_eq!(store.counts(d.id).await.unwrap()[State::Pending], 1);
        let again = store.campaign(&ident("c")).await.unwrap();
        assert_eq!(store.counts(again.id).await.unwrap().total(), 0);
        import(&store, &again, &["a@x.example"]).await;
        assert_eq!(store.counts(again.id).await.unwrap()[State::Pending], 1);
    });
}

/// A key written twice in one first read of a campaign is a duplicate
/// however far apart the two rows are (on PostgreSQL the read's table is
/// looked up only for keys it may hold, and has no index on keys until
/// then).
#[tokio::test]
async fn a_first_read_finds_its_duplicates_far_apart() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        let mut emails: Vec<String> = (0..3000).map(|i| format!("r{i}@x.example")).collect();
        emails.push("r5@x.example".into());
        emails.push("R2999@x.example".into());
        let rows: Vec<&str> = emails.iter().map(String::as_str).collect();
        let mut imp = store
            .import(ImportInto::Campaign(&c), &["email".into()])
            .await
            .unwrap();
        let mut statuses = Vec::new();
        for (n, chunk) in rows.chunks(700).enumerate() {
            let batch: Vec<(u64, String, Vec<String>)> = chunk
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    (
                        (n * 700 + i) as u64 + 1,
                        e.to_lowercase(),
                        vec![e.to_string()],
                    )
                })
                .collect();
            let import_rows: Vec<ImportRow> = batch
                .iter()
                .zip(chunk)
                .map(|((number, key, fields), email)| ImportRow {
                    number: *number,
                    email,
                    valid: Some((email, key.as_str())),
                    fields,
                })
                .collect();
            statuses.extend(imp.rows(&import_rows).await.unwrap());
        }
        imp.commit().await.unwrap();
        assert!(matches!(
            statuses[3000],
            RowStatus::Duplicate { first_row: 6 }
        ));
        assert!(matches!(
            statuses[3001],
            RowStatus::Duplicate { first_row: 3000 }
        ));
        let counts = store.counts(c.id).await.unwrap();
        assert_eq!((counts[State::Pending], counts[State::Skipped]), (3000, 2));
    });
}

/// Cells are stored as they were read, whatever characters they hold
/// (on PostgreSQL rows are sent with `COPY`, whose text form escapes some).
#[tokio::test]
async fn cells_with_tabs_newlines_and_backslashes_read_back_unchanged() {
    on_both!(|store| {
        let c = store.campaign(&ident("c")).await.unwrap();
        let cells = [
            "a@x.example".to_string(),
            "tab\there".to_string(),
            "line\nbreak\r\n".to_string(),
            "back\\slash \\N \\.".to_string(),
            "\\N".to_string(),
            String::new(),
        ];
        let columns: Vec<String> = (0..cells.len()).map(|i| format!("c{i}")).collect();
        let mut imp = store
            .import(ImportInto::Campaign(&c), &columns)
            .await
            .unwrap();
        imp.row(1, "a@x.example", "a@x.example", "a@x.example", &cells)
            .await
            .unwrap();
        // A cell holding the separator of cells: stored as JSON.
        let json = [
            "b@x.example".to_string(),
            "unit\u{1f}sep".to_string(),
            "tab\there \\ \"quoted\"".to_string(),
        ];
        imp.row(2, "b@x.example", "b@x.example", "b@x.example", &json)
            .await
            .unwrap();
        imp.commit().await.unwrap();
        let mut rows = Vec::new();
        store
            .export(c.id, None, |r| {
                rows.push((r.email, r.fields));
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(
            rows,
            [
                ("a@x.example".to_string(), cells.to_vec()),
                ("b@x.example".to_string(), json.to_vec())
            ]
        );
    });
}

/// The times `export` shows for a campaign's rows, in file order.
async fn shown_times(store: &Store, campaign_id: i64) -> Vec<(String, String, i64)> {
    let mut rows = Vec::new();
    store
        .export(campaign_id, None, |r| {
            rows.push((r.email, r.state, r.updated_at));
            Ok(())
        })
        .await
        .unwrap();
    rows
}

/// On PostgreSQL a row that a read of the file wrote and nothing changed
/// since stores no time of its own (eight bytes a row: SPEC §12, the state
/// within 2 x of SQLite's), yet `export` shows the time of that read,
/// through later reads that keep it or leave it out, and through a claim
/// let go of; a row that changes gets its own time.
#[tokio::test]
async fn a_row_only_read_keeps_the_time_of_its_read_without_storing_it() {
    let Some(pg) = TestPg::create().await else {
        return;
    };
    let store = Store::open_postgres(&pg.url).await.unwrap();
    let timed = || async {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&pg.url).await.unwrap();
        sqlx::query_scalar::<_, i64>("SELECT COUNT(updated_at) FROM recipients")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    let c = store.campaign(&ident("c")).await.unwrap();
    store.suppress("s@x.example", "asked").await.unwrap();
    let before = crate::time::now_ms();
    import(
        &store,
        &c,
        &["a@x.example", "b@x.example", "c@x.example", "s@x.example"],
    )
    .await;
    let after = crate::time::now_ms();
    let first = shown_times(&store, c.id).await;
    let read = first[0].2;
    assert!(before <= read && read <= after, "{first:?}");
    assert!(first.iter().all(|r| r.2 == read), "{first:?}");
    assert_eq!(first[3].1, "skipped", "{first:?}");
    assert_eq!(timed().await, 0, "rows only read store no time");

    // A claim let go of puts the row back as it was, time included.
    let Claim::Ready { ready, .. } = store
        .claim(c.id, "acct", "acct", &[], after + 1, 1, |_| Ok(out(1)))
        .await
        .unwrap()
    else {
        panic!("nothing claimed")
    };
    store
        .record(
            &ready[0].candidate,
            ready[0].log_id,
            &Outcome::Unclaimed,
            after + 2,
        )
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(shown_times(&store, c.id).await, first);
    assert_eq!(timed().await, 0);

    // A second read keeps a, leaves b and c out (skipped: removed, now)
    // and s (skipped before: it keeps its time), and adds d.
    tokio::time::sleep(Duration::from_millis(5)).await;
    import(&store, &c, &["a@x.example", "d@x.example"]).await;
    let second = shown_times(&store, c.id).await;
    let row = |rows: &[(String, String, i64)], email: &str| {
        rows.iter().find(|r| r.0 == email).cloned().unwrap()
    };
    assert_eq!(row(&second, "a@x.example"), first[0], "{second:?}");
    assert_eq!(row(&second, "s@x.example"), first[3], "{second:?}");
    for removed in ["b@x.example", "c@x.example"] {
        let (_, state, at) = row(&second, removed);
        assert_eq!(state, "skipped", "{second:?}");
        assert!(at > read, "{second:?}");
    }
    let (_, state, second_read) = row(&second, "d@x.example");
    assert_eq!(state, "pending");
    assert!(second_read > read, "{second:?}");

    // A third read keeps a and d: each keeps the time of the read that
    // wrote it.
    tokio::time::sleep(Duration::from_millis(5)).await;
    import(&store, &c, &["a@x.example", "d@x.example"]).await;
    let third = shown_times(&store, c.id).await;
    assert_eq!(row(&third, "a@x.example"), first[0], "{third:?}");
    assert_eq!(row(&third, "d@x.example").2, second_read, "{third:?}");
    assert_eq!(row(&third, "s@x.example"), first[3], "{third:?}");
    store.close().await;
    pg.drop().await;
}
