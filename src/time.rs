//! Wall-clock time as the store records it: Unix milliseconds, shown in RFC 3339.

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `2026-11-27T09:14:03Z` for a Unix-millisecond time; `None` past what a
/// calendar can write (a time the database holds may be anything).
pub fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}
