//! What comes back after the send, kept with the recipients: bounces and
//! delays read from the sender's mailbox (`hikyaku bounces`), and the send
//! log entries one campaign's report counts (`hikyaku report`).

use std::collections::HashSet;

use anyhow::Result;
use sqlx::Row as _;

use super::sqlite::{
    insert_suppression, set_reply, stored_state, SqliteStore, ADDRESS, BOUNCED, DETAILS, EMAIL,
    SENT, UNKNOWN,
};
use super::State;

/// A recipient that a notification may be about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoticeRow {
    pub id: i64,
    /// The address as written in the file.
    pub email: String,
    /// The address as sent (international domains in punycode).
    pub address: String,
    pub state: State,
    pub reason: Option<String>,
    /// Without its angle brackets.
    pub message_id: Option<String>,
}

/// One SMTP transaction of a campaign's recipient, from the account's log.
#[derive(Debug, Clone)]
pub struct SendEntry {
    pub account: String,
    /// When the transaction started, Unix ms.
    pub at: i64,
    /// When it ended; `None` while in flight or for a process that died.
    pub done_at: Option<i64>,
    /// Envelope recipients (To, Cc, Bcc).
    pub recipients: i64,
    pub email: String,
    pub last_reply: Option<String>,
}

/// A message id as notifications quote it and as the store keeps it
/// compare equal once their angle brackets and case are gone.
pub fn message_id_key(id: &str) -> String {
    id.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_lowercase()
}

impl SqliteStore {
    /// When the campaign's state was created, Unix ms.
    pub async fn campaign_created_at(&self, campaign_id: i64) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT created_at FROM campaigns WHERE id = ?")
                .bind(campaign_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The campaign's recipients whose message may have come back, among
    /// those named by `message_ids` (keys of [`message_id_key`]) or by
    /// `addresses` (lowercase), found in one pass over the campaign's rows
    /// whatever the number of notifications.
    pub async fn notice_rows(
        &self,
        campaign_id: i64,
        message_ids: &HashSet<String>,
        addresses: &HashSet<String>,
    ) -> Result<Vec<NoticeRow>> {
        use futures_util::TryStreamExt;
        self.flush().await?;
        let mut found = Vec::new();
        if message_ids.is_empty() && addresses.is_empty() {
            return Ok(found);
        }
        // Only a message a server accepted (or may have) can bounce.
        let sql = format!(
            "SELECT recipients.id AS id, {EMAIL} AS email, {ADDRESS} AS address, row_key, state, \
             d.reason AS reason, d.message_id AS message_id FROM recipients NOT INDEXED {DETAILS} \
             WHERE campaign_id = ? AND state IN ({SENT}, {UNKNOWN}, {BOUNCED})"
        );
        let mut rows = sqlx::query(&sql).bind(campaign_id).fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            let message_id: Option<String> = row.get("message_id");
            let address: String = row.get::<Option<String>, _>("address").unwrap_or_default();
            let by_id = message_id
                .as_deref()
                .is_some_and(|id| message_ids.contains(&message_id_key(id)));
            let by_address = addresses.contains(&address.to_lowercase())
                || addresses.contains(row.get::<&str, _>("row_key"));
            if !(by_id || by_address) {
                continue;
            }
            let state = stored_state(row.get("state"))?;
            found.push(NoticeRow {
                id: row.get("id"),
                email: row.get("email"),
                address,
                state,
                reason: row.get("reason"),
                message_id: message_id.map(|id| message_id_key(&id)),
            });
        }
        Ok(found)
    }

    /// Records a bounce: the row becomes `bounced` with the notification's
    /// status and diagnostic and, when `suppress`, its address joins the
    /// suppression list, in one transaction. A row already `bounced` (or no
    /// longer in an accepted state) is left as it is and nothing is
    /// suppressed again: a second read of the same mailbox changes nothing,
    /// even for an address the user took off the list since.
    pub async fn record_bounce(
        &self,
        id: i64,
        address: &str,
        status: &str,
        diagnostic: &str,
        suppress: bool,
        now: i64,
    ) -> Result<bool> {
        self.flush().await?;
        let mut tx = self.pool.begin().await?;
        let reply = if diagnostic.is_empty() {
            status
        } else {
            diagnostic
        };
        let changed = sqlx::query(&format!(
            "UPDATE recipients SET state = {BOUNCED}, updated_at = ? WHERE id = ? AND state IN ({SENT}, {UNKNOWN})",
        ))
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if changed {
            let reason = format!("bounced: {status}");
            set_reply(&mut tx, id, Some(&reason), reply, None).await?;
        }
        if changed && suppress {
            insert_suppression(&mut tx, address, &format!("bounced: {status} {reply}"), now)
                .await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Notes a delayed delivery on a `sent` row's reason; nothing else
    /// changes. False when the same note is already there.
    pub async fn note_delay(&self, id: i64, note: &str) -> Result<bool> {
        self.flush().await?;
        let done = sqlx::query(&format!(
            "INSERT INTO recipient_details (id, reason) SELECT id, ?1 FROM recipients WHERE id = ?2 AND state = {SENT} \
             ON CONFLICT (id) DO UPDATE SET reason = excluded.reason WHERE reason IS NOT excluded.reason",
        ))
        .bind(note)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every logged SMTP transaction of the campaign's recipients, by
    /// account then time; `visit` is called once per entry.
    pub async fn send_entries(
        &self,
        campaign_id: i64,
        mut visit: impl FnMut(SendEntry) -> Result<()>,
    ) -> Result<()> {
        use futures_util::TryStreamExt;
        self.flush().await?;
        let sql = format!(
            "SELECT l.account, l.at, l.done_at, l.recipients, {EMAIL} AS email, d.last_reply AS last_reply \
             FROM send_log l JOIN recipients ON recipients.id = l.recipient_id {DETAILS} \
             WHERE recipients.campaign_id = ? ORDER BY l.account, l.at, l.id"
        );
        let mut rows = sqlx::query(&sql).bind(campaign_id).fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            visit(SendEntry {
                account: row.get("account"),
                at: row.get("at"),
                done_at: row.get("done_at"),
                recipients: row.get("recipients"),
                email: row.get("email"),
                last_reply: row.get("last_reply"),
            })?;
        }
        Ok(())
    }

    /// Account pauses recorded for these accounts: (account, until, reason).
    pub async fn pauses(&self, accounts: &[String]) -> Result<Vec<(String, i64, String)>> {
        let rows = sqlx::query("SELECT account, until, reason FROM account_pauses ORDER BY until")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get("account"), r.get("until"), r.get("reason")))
            .filter(|(account, _, _): &(String, i64, String)| accounts.contains(account))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::sqlite::tests::{ident, import, out, store};
    use super::super::sqlite::SqliteStore as Store;
    use super::super::{Claim, Outcome};
    use super::*;

    async fn sent(store: &Store, campaign_id: i64, n: usize) -> Vec<i64> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let Claim::Ready { mut ready, .. } = store
                .claim(campaign_id, "acct", "acct", &[], 5, 1, |_| Ok(out(1)))
                .await
                .unwrap()
            else {
                panic!("expected a claim")
            };
            let r = ready.remove(0);
            let outcome = Outcome::Sent {
                reply: "250 2.0.0 OK".into(),
            };
            store
                .record(&r.candidate, r.log_id, &outcome, 6)
                .await
                .unwrap();
            ids.push(r.candidate.id);
        }
        ids
    }

    #[tokio::test]
    async fn a_bounce_is_recorded_once_and_suppresses_once() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        import(&store, &c, &["a@x.example", "b@x.example"]).await;
        let ids = sent(&store, c.id, 1).await;
        let addresses = HashSet::from(["a@x.example".to_string()]);
        let rows = store
            .notice_rows(c.id, &HashSet::new(), &addresses)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].id, rows[0].state), (ids[0], State::Sent));
        assert!(store
            .record_bounce(
                ids[0],
                "a@x.example",
                "5.1.1",
                "550 5.1.1 no such user",
                true,
                7
            )
            .await
            .unwrap());
        assert_eq!(store.counts(c.id).await.unwrap()[State::Bounced], 1);
        assert_eq!(store.suppressions().await.unwrap().len(), 1);
        // The user takes the address off the list; a second read of the
        // same notification puts nothing back.
        store.unsuppress("a@x.example").await.unwrap();
        assert!(!store
            .record_bounce(
                ids[0],
                "a@x.example",
                "5.1.1",
                "550 5.1.1 no such user",
                true,
                8
            )
            .await
            .unwrap());
        assert!(store.suppressions().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn rows_are_found_by_message_id_and_a_pending_row_never_bounces() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        import(&store, &c, &["a@x.example", "b@x.example"]).await;
        sent(&store, c.id, 1).await;
        // `out` gives every message the same id.
        let ids = HashSet::from([message_id_key("<ID@example.com>")]);
        let rows = store
            .notice_rows(c.id, &ids, &HashSet::new())
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].email, "a@x.example");
        let pending = HashSet::from(["b@x.example".to_string()]);
        assert!(store
            .notice_rows(c.id, &HashSet::new(), &pending)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_delay_is_noted_once_on_a_sent_row() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        import(&store, &c, &["a@x.example"]).await;
        let ids = sent(&store, c.id, 1).await;
        assert!(store.note_delay(ids[0], "delayed: 4.4.1").await.unwrap());
        assert!(!store.note_delay(ids[0], "delayed: 4.4.1").await.unwrap());
        assert_eq!(store.counts(c.id).await.unwrap()[State::Sent], 1);
    }

    #[tokio::test]
    async fn send_entries_name_their_recipient() {
        let (_d, store) = store().await;
        let c = store.campaign(&ident("c")).await.unwrap();
        import(&store, &c, &["a@x.example", "b@x.example"]).await;
        sent(&store, c.id, 2).await;
        let mut seen = Vec::new();
        store
            .send_entries(c.id, |e| {
                seen.push((e.account, e.email, e.done_at));
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(
            seen,
            [
                ("acct".to_string(), "a@x.example".to_string(), Some(6)),
                ("acct".to_string(), "b@x.example".to_string(), Some(6)),
            ]
        );
    }
}
