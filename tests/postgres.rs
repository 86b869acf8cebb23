//! The state on PostgreSQL through the real binary: resume after kill -9,
//! several workers sharing one campaign and its account's window, a worker
//! killed and started again, the URL's password never printed. Each test
//! makes its own database on the server `HIKYAKU_TEST_PG` names and drops
//! it; without a server they are skipped with one line
//! (`HIKYAKU_REQUIRE_PG=1` fails instead).

mod common;

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{recipients_csv, standard_campaign, text, CampaignDir, SmtpServer};
use sqlx::Connection as _;

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database made for one test, dropped with it.
struct TestPg {
    admin: String,
    name: String,
    url: String,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

impl TestPg {
    fn create() -> Option<TestPg> {
        let admin = std::env::var("HIKYAKU_TEST_PG").unwrap_or_else(|_| DEFAULT_PG.to_string());
        let name = format!("hikyaku_test_{}", uuid::Uuid::new_v4().simple());
        let made = runtime().block_on(async {
            let mut conn =
                tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&admin))
                    .await
                    .map_err(|_| "no answer in 5 s".to_string())?
                    .map_err(|e| e.to_string())?;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            conn.close().await.ok();
            Ok::<_, String>(())
        });
        if let Err(why) = made {
            use std::io::Write as _;
            assert!(
                std::env::var("HIKYAKU_REQUIRE_PG").map_or(true, |v| v != "1"),
                "HIKYAKU_REQUIRE_PG=1 but PostgreSQL is not reachable: {why}"
            );
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "PostgreSQL tests skipped: no server at HIKYAKU_TEST_PG: {why}"
                );
            });
            return None;
        }
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Some(TestPg { admin, name, url })
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        runtime().block_on(async {
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        });
    }
}

fn on_postgres(pg: &TestPg) -> CampaignDir {
    let mut dir = CampaignDir::new();
    dir.db_url = Some(pg.url.clone());
    dir
}

fn spawn_send(dir: &CampaignDir) -> Child {
    dir.send_command(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn states(dir: &CampaignDir) -> HashMap<String, String> {
    dir.export(None)
        .into_iter()
        .map(|r| (r["email"].clone(), r["state"].clone()))
        .collect()
}

/// Recipients left `sending` by one kill with `connections = 2`: one
/// connection's message plus one claimed batch of 15 (SPEC §7.3: at most 16).
const BOUND: i64 = 16;

#[test]
fn kill_9_then_resume_on_postgres_sends_nobody_twice() {
    let Some(pg) = TestPg::create() else {
        return;
    };
    let server = SmtpServer::start(&["--delay-ms", "5"]);
    let dir = on_postgres(&pg);
    standard_campaign(
        &dir,
        &recipients_csv(150),
        &server.transport_toml("connections = 2"),
        "",
    );
    let mut child = spawn_send(&dir);
    wait_for(|| server.received().len() >= 20, "sending to start");
    child.kill().unwrap();
    child.wait().unwrap();
    let in_flight = dir.status()["states"]["sending"].as_i64().unwrap();
    assert!(in_flight <= BOUND, "{in_flight} sending after kill -9");

    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(server.deliveries().values().all(|n| *n == 1));
    let status = dir.status();
    let (sent, unknown) = (
        status["states"]["sent"].as_i64().unwrap(),
        status["states"]["unknown"].as_i64().unwrap(),
    );
    assert_eq!(sent + unknown, 150, "{status}");
    assert!(unknown <= BOUND, "{status}");
    // Sent rows were received; an unknown one may or may not have been.
    let received = server.received().len() as i64;
    assert!(
        sent <= received && received <= sent + unknown,
        "{received} received, {status}"
    );
}

/// The scale-out of SPEC §10: three workers on one campaign of 3,000
/// recipients under one window for the account, a server answering each
/// message after 20 ms; one worker is killed with SIGKILL twice mid-run and
/// started again each time. Every recipient is delivered once or is
/// `unknown` (at most `connections` per kill: under a window each claim
/// takes one recipient), and the server never sees more than the window
/// across all workers.
#[test]
fn three_workers_share_a_campaign_and_its_window_through_two_kills() {
    let Some(pg) = TestPg::create() else {
        return;
    };
    const N: usize = 3_000;
    const MAX: usize = 100;
    const CONNECTIONS: i64 = 2;
    const KILLS: i64 = 2;
    let started = Instant::now();
    let server = SmtpServer::start(&["--delay-ms", "20"]);
    let dir = on_postgres(&pg);
    standard_campaign(
        &dir,
        &recipients_csv(N),
        &server.transport_toml(&format!("connections = {CONNECTIONS}")),
        &format!("[limits]\nwindows = [{{ max = {MAX}, period = \"1s\" }}]\n"),
    );
    let mut workers: Vec<Child> = (0..3).map(|_| spawn_send(&dir)).collect();
    for kill in 1..=KILLS {
        let at = N * kill as usize / 3;
        wait_for(
            || server.received().len() >= at,
            &format!("{at} messages before kill {kill}"),
        );
        workers[0].kill().unwrap();
        workers[0].wait().unwrap();
        workers[0] = spawn_send(&dir);
    }
    for w in &mut workers {
        let out = w.wait_with_output_ref();
        assert_eq!(out, Some(0), "a worker failed");
    }
    // Every worker finished: what the killed one left in flight is settled.
    let status = dir.status();
    let (sent, unknown) = (
        status["states"]["sent"].as_i64().unwrap(),
        status["states"]["unknown"].as_i64().unwrap(),
    );
    assert_eq!(status["states"]["sending"], 0, "{status}");
    assert_eq!(sent + unknown, N as i64, "{status}");
    assert!(
        unknown <= CONNECTIONS * KILLS,
        "{unknown} unknown after {KILLS} kills"
    );
    let deliveries = server.deliveries();
    assert!(
        deliveries.values().all(|n| *n == 1),
        "someone got two messages"
    );
    let states = states(&dir);
    for address in deliveries.keys() {
        assert!(matches!(
            states.get(address).map(String::as_str),
            Some("sent" | "unknown")
        ));
    }
    let mut times: Vec<f64> = server.received().iter().map(|r| r.received_at).collect();
    times.sort_by(f64::total_cmp);
    let worst = (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|u| **u < times[i] + 1.0)
                .count()
        })
        .max()
        .unwrap_or(0);
    println!(
        "{} delivered, {sent} sent, {unknown} unknown after {KILLS} kills, \
         at most {worst} in any second at the server (window {MAX}), {:.1} s",
        deliveries.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        worst <= MAX,
        "{worst} messages within one second at the server"
    );
}

#[test]
fn sigint_on_postgres_finishes_in_flight_messages_then_resumes() {
    let Some(pg) = TestPg::create() else {
        return;
    };
    let server = SmtpServer::start(&["--delay-ms", "100"]);
    let dir = on_postgres(&pg);
    standard_campaign(
        &dir,
        &recipients_csv(30),
        &server.transport_toml("connections = 2"),
        "",
    );
    let child = spawn_send(&dir);
    wait_for(|| server.received().len() >= 3, "a few messages");
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = common::finish(child);
    assert_eq!(
        out.status.code(),
        Some(130),
        "stderr: {}",
        text(&out.stderr)
    );
    let status = dir.status();
    assert_eq!(status["states"]["sending"], 0, "{status}");
    assert_eq!(status["states"]["unknown"], 0, "{status}");
    let sent = status["states"]["sent"].as_u64().unwrap();
    assert_eq!(sent as usize, server.received().len());
    assert!(sent < 30, "the stop came too late to test anything");

    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let deliveries = server.deliveries();
    assert_eq!(deliveries.len(), 30);
    assert!(deliveries.values().all(|n| *n == 1));
}

/// A window filled by one process holds for the next one, as on SQLite.
#[test]
fn a_window_filled_by_one_process_holds_for_the_next_on_postgres() {
    let Some(pg) = TestPg::create() else {
        return;
    };
    let server = SmtpServer::start(&[]);
    let dir = on_postgres(&pg);
    standard_campaign(
        &dir,
        &recipients_csv(8),
        &server.transport_toml(""),
        "[limits]\nper_second = 50\nwindows = [{ max = 5, period = \"1h\" }]\n",
    );
    let out = dir.send(&["--no-wait"]);
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    assert_eq!(server.received().len(), 5);
    let out = dir.send(&["--no-wait"]);
    assert_eq!(out.status.code(), Some(75), "stderr: {}", text(&out.stderr));
    assert_eq!(server.received().len(), 5, "the second process waits too");
    assert_eq!(dir.status()["windows"][0]["used"], 5);
}

#[test]
fn the_url_password_is_never_printed() {
    let Some(pg) = TestPg::create() else {
        return;
    };
    let with_password =
        pg.url
            .replacen("postgres://postgres@", "postgres://postgres:pw-s3cr3t@", 1);
    let mut dir = CampaignDir::new();
    dir.db_url = Some(with_password);
    standard_campaign(&dir, &recipients_csv(2), common::FILE_TRANSPORT, "");
    let out = dir.run(&["-v", "send", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("postgres:***@"), "{all}");
    assert!(!all.contains("pw-s3cr3t"), "{all}");
    // A server that does not answer: the error names the URL, masked.
    dir.db_url = Some("postgres://me:pw-s3cr3t@127.0.0.1:1/x".into());
    let out = dir.run(&["status", dir.campaign().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("me:***@127.0.0.1:1") && !err.contains("pw-s3cr3t"),
        "{err}"
    );
}

/// SPEC §11 on PostgreSQL: a database holding another program's tables is
/// refused by every command, untouched: no table of hikyaku's appears in
/// it (the migrations used to run first, writing into it).
#[test]
fn another_programs_postgresql_database_is_refused_untouched() {
    let Some(pg) = TestPg::create() else {
        return;
    };
    let sql = |statement: &str| {
        runtime().block_on(async {
            let mut conn = sqlx::PgConnection::connect(&pg.url).await.unwrap();
            let rows: Vec<String> = sqlx::query_scalar(statement)
                .fetch_all(&mut conn)
                .await
                .unwrap();
            conn.close().await.ok();
            rows
        })
    };
    sql("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)");
    sql("INSERT INTO items VALUES (1, 'bolt')");
    let dir = on_postgres(&pg);
    standard_campaign(&dir, &recipients_csv(2), common::FILE_TRANSPORT, "");
    let campaign = dir.campaign();
    for command in ["check", "status", "export", "send"] {
        let out = dir.run(&[command, campaign.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(
            err.contains("another program's PostgreSQL database (tables items)")
                && err.contains(&pg.name),
            "{command}: {err}"
        );
    }
    let tables = sql(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables \
         WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    );
    assert_eq!(tables, ["public.items"], "hikyaku wrote to the database");
    assert_eq!(sql("SELECT name FROM items"), ["bolt"]);
    // hikyaku's own database, once made, is not taken for another's.
    sql("DROP TABLE items");
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let out = dir.send(&[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

trait WaitCode {
    fn wait_with_output_ref(&mut self) -> Option<i32>;
}

impl WaitCode for Child {
    /// Waits for the worker, its stderr shown if it failed.
    fn wait_with_output_ref(&mut self) -> Option<i32> {
        use std::io::Read as _;
        let status = self.wait().unwrap();
        if !status.success() {
            let mut err = String::new();
            if let Some(mut e) = self.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            eprintln!("worker stderr: {err}");
        }
        status.code()
    }
}
