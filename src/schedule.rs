//! Sending hours and warm-up (SPEC §6b): when an account may send, as pure
//! functions of "now" so that a week of schedule, daylight-saving changes
//! included, is tested in milliseconds.

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDate, NaiveDateTime, NaiveTime};
use chrono::{LocalResult, TimeZone, Weekday};
use chrono_tz::Tz;
use thiserror::Error;

use crate::limits::{Schedule, Send};

/// A `[schedule]` value that cannot be understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("[schedule] hours = {}: write the hours as \"09:00-17:00\" (start before end, 24-hour clock; \"24:00\" ends at midnight)", crate::error::quote(.0))]
    Hours(String),
    #[error(
        "[schedule] days = {}: write the days as \"mon-fri\", \"mon,wed,fri\" or \"sat-sun\"",
        crate::error::quote(.0)
    )]
    Days(String),
    #[error("[schedule] timezone = {} is not an IANA time zone name such as \"Europe/Berlin\" or \"Asia/Tokyo\"", crate::error::quote(.0))]
    Zone(String),
    #[error("[schedule] start_at = {}: write a local time as \"2026-12-01T09:00\"", crate::error::quote(.0))]
    StartAt(String),
}

/// The sending hours of a campaign: not before `start_at`, only on `days`,
/// only between `opens` and `closes`, all read on the wall clock of a zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendingHours {
    pub start_at: Option<NaiveDateTime>,
    pub opens: NaiveTime,
    /// `None`: open until midnight.
    pub closes: Option<NaiveTime>,
    /// Monday first.
    pub days: [bool; 7],
}

impl Default for SendingHours {
    fn default() -> Self {
        SendingHours {
            start_at: None,
            opens: NaiveTime::MIN,
            closes: None,
            days: [true; 7],
        }
    }
}

/// Days in the schedule's worst case between two openings, plus margin:
/// one open day a week and a daylight-saving gap on it.
const SEARCH_DAYS: usize = 16;

impl SendingHours {
    /// Parses the `hours` value "HH:MM-HH:MM".
    pub fn parse_hours(text: &str) -> Result<(NaiveTime, Option<NaiveTime>), ScheduleError> {
        let bad = || ScheduleError::Hours(text.to_string());
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let opens = NaiveTime::parse_from_str(a.trim(), "%H:%M").map_err(|_| bad())?;
        let closes = match b.trim() {
            "24:00" => None,
            b => Some(NaiveTime::parse_from_str(b, "%H:%M").map_err(|_| bad())?),
        };
        if closes.is_some_and(|c| c <= opens) {
            return Err(bad());
        }
        Ok((opens, closes))
    }

    /// Parses the `days` value: names or ranges of three-letter day names,
    /// separated by commas ("mon-fri", "mon,wed,fri", "fri-mon").
    pub fn parse_days(text: &str) -> Result<[bool; 7], ScheduleError> {
        let bad = || ScheduleError::Days(text.to_string());
        let day = |s: &str| -> Result<usize, ScheduleError> {
            s.trim()
                .parse::<Weekday>()
                .map(|d| d.num_days_from_monday() as usize)
                .map_err(|_| bad())
        };
        let mut days = [false; 7];
        for part in text.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day(a)?, day(b)?);
                    let mut d = a;
                    loop {
                        days[d] = true;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => days[day(part)?] = true,
            }
        }
        Ok(days)
    }

    pub fn parse_zone(text: &str) -> Result<Tz, ScheduleError> {
        text.trim()
            .parse::<Tz>()
            .map_err(|_| ScheduleError::Zone(text.to_string()))
    }

    pub fn parse_start_at(text: &str) -> Result<NaiveDateTime, ScheduleError> {
        let t = text.trim();
        NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M")
            .or_else(|_| NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S"))
            .or_else(|_| NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M"))
            .map_err(|_| ScheduleError::StartAt(text.to_string()))
    }

    /// Whether a message may leave at `at_ms`, read on the clock of `zone`.
    pub fn is_open(&self, at_ms: i64, zone: Tz) -> bool {
        let Some(local) = local(at_ms, zone) else {
            return false;
        };
        if self.start_at.is_some_and(|s| local < s) {
            return false;
        }
        let time = local.time();
        self.days[local.weekday().num_days_from_monday() as usize]
            && time >= self.opens
            && self.closes.is_none_or(|c| time < c)
    }

    /// The first moment at or after `at_ms` at which a message may leave.
    /// `None` only when no day is open (which parsing never gives).
    pub fn next_open(&self, at_ms: i64, zone: Tz) -> Option<i64> {
        let mut at = at_ms;
        if let Some(start) = self.start_at {
            at = at.max(utc_ms(start, zone)?);
        }
        let first = local(at, zone)?.date();
        if self.is_open(at, zone) {
            return Some(at);
        }
        for offset in 0..SEARCH_DAYS {
            let date = first.checked_add_signed(ChronoDuration::days(offset as i64))?;
            if !self.days[date.weekday().num_days_from_monday() as usize] {
                continue;
            }
            let candidate = opening(date, self.opens, zone)?;
            if candidate >= at && self.is_open(candidate, zone) {
                return Some(candidate);
            }
        }
        None
    }

    /// When the open period holding `at_ms` ends (`at_ms` itself if closed).
    pub fn closes_after(&self, at_ms: i64, zone: Tz) -> Option<i64> {
        if !self.is_open(at_ms, zone) {
            return Some(at_ms);
        }
        let date = local(at_ms, zone)?.date();
        match self.closes {
            Some(c) => opening(date, c, zone),
            None => opening(date.succ_opt()?, NaiveTime::MIN, zone),
        }
    }
}

/// The wall-clock time of `at_ms` in `zone`.
fn local(at_ms: i64, zone: Tz) -> Option<NaiveDateTime> {
    Some(
        DateTime::from_timestamp_millis(at_ms)?
            .with_timezone(&zone)
            .naive_local(),
    )
}

/// A wall-clock time as Unix milliseconds: the earlier of two when clocks go
/// back, the first minute after the gap when they go forward.
fn utc_ms(local: NaiveDateTime, zone: Tz) -> Option<i64> {
    match zone.from_local_datetime(&local) {
        LocalResult::Single(t) => Some(t.timestamp_millis()),
        LocalResult::Ambiguous(a, b) => Some(a.timestamp_millis().min(b.timestamp_millis())),
        LocalResult::None => {
            // Inside a spring-forward gap: step until the clock exists again.
            (1..=24 * 4).find_map(|quarter| {
                let later = local + ChronoDuration::minutes(15 * quarter);
                zone.from_local_datetime(&later)
                    .earliest()
                    .map(|t| t.timestamp_millis())
            })
        }
    }
}

fn opening(date: NaiveDate, time: NaiveTime, zone: Tz) -> Option<i64> {
    utc_ms(date.and_time(time), zone)
}

/// The machine's IANA zone; UTC when it cannot be told.
pub fn machine_zone() -> Tz {
    iana_time_zone::get_timezone()
        .ok()
        .and_then(|name| name.parse().ok())
        .unwrap_or(Tz::UTC)
}

/// One day of an account's warm-up: from `starts_ms` to `ends_ms` at most
/// `cap` recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmUpDay {
    /// 1 for the first day of sending.
    pub day: usize,
    pub starts_ms: i64,
    pub ends_ms: i64,
    pub cap: u32,
}

const DAY_MS: i64 = 86_400_000;

/// The warm-up day an account is in at `now_ms`, counted from its first
/// send (`None`: it never sent, so today is its first day). `None` once
/// the list is over: then only the account's normal windows apply.
pub fn warmup_day(caps: &[u32], first_send_ms: Option<i64>, now_ms: i64) -> Option<WarmUpDay> {
    let first = first_send_ms.unwrap_or(now_ms).min(now_ms);
    let index = usize::try_from((now_ms - first) / DAY_MS).ok()?;
    let cap = *caps.get(index)?;
    let starts_ms = first + index as i64 * DAY_MS;
    Some(WarmUpDay {
        day: index + 1,
        starts_ms,
        ends_ms: starts_ms + DAY_MS,
        cap,
    })
}

impl WarmUpDay {
    /// When `count` more recipients may go, given `used` already counted
    /// since the day started: now, or when the next day begins. A message
    /// larger than the whole cap goes alone at the start of a day.
    pub fn next_slot(&self, used: u64, count: u32, now_ms: i64) -> i64 {
        let count = u64::from(count.min(self.cap));
        if used + count <= u64::from(self.cap) {
            now_ms
        } else {
            self.ends_ms
        }
    }
}

/// Everything that decides when an account sends next: its windows, the
/// campaign's hours and its warm-up, for `--dry-run`, `status` and the
/// progress ETA.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub windows: Schedule,
    pub hours: Option<&'a SendingHours>,
    pub zone: Tz,
    pub warmup: &'a [u32],
    pub first_send_ms: Option<i64>,
    /// Recipients counted since the warm-up day holding "now" began.
    pub used_today: u64,
}

/// A simulated account: its windows, its first send and its warm-up day.
struct Sim {
    windows: Schedule,
    first: Option<i64>,
    day_start: Option<i64>,
    used: u64,
}

impl Plan<'_> {
    fn sim(&self, now_ms: i64) -> Sim {
        Sim {
            windows: self.windows.clone(),
            first: self.first_send_ms,
            day_start: warmup_day(self.warmup, self.first_send_ms, now_ms).map(|d| d.starts_ms),
            used: self.used_today,
        }
    }

    /// The first moment at or after `at_ms` that every rule allows.
    fn step(&self, sim: &Sim, mut at: i64) -> i64 {
        loop {
            let mut t = sim.windows.next_slot(at, 1).at_ms;
            if let Some(hours) = self.hours {
                t = hours.next_open(t, self.zone).unwrap_or(t);
            }
            if let Some(day) = warmup_day(self.warmup, sim.first, t) {
                let used = if sim.day_start == Some(day.starts_ms) {
                    sim.used
                } else {
                    0
                };
                t = t.max(day.next_slot(used, 1, t));
            }
            if t == at {
                return t;
            }
            at = t;
        }
    }

    /// When the next message may leave.
    pub fn next_send(&self, now_ms: i64) -> i64 {
        self.step(&self.sim(now_ms), now_ms)
    }

    /// When the last of `remaining` one-recipient messages could leave;
    /// `None` without any rule to estimate from.
    pub fn eta(&self, now_ms: i64, remaining: u64) -> Option<i64> {
        if self.unpaced() && self.warmup.is_empty() {
            return self.hours.map(|_| self.next_send(now_ms));
        }
        let mut sim = self.simulate(now_ms);
        let mut at = now_ms;
        for _ in 0..remaining {
            at = sim.next(at);
            if sim.take(at) {
                // Past the warm-up nothing holds the rest back.
                return Some(at);
            }
        }
        Some(at)
    }

    /// No window paces the account.
    fn unpaced(&self) -> bool {
        self.windows.is_unpaced()
    }

    /// The account's sends, simulated forward one message at a time.
    pub fn simulate(&self, now_ms: i64) -> Simulation<'_, '_> {
        Simulation {
            plan: self,
            sim: self.sim(now_ms),
        }
    }
}

/// An account's windows and warm-up as they would be after the simulated
/// sends so far (see [`Plan::simulate`]).
pub struct Simulation<'p, 'a> {
    plan: &'p Plan<'a>,
    sim: Sim,
}

impl Simulation<'_, '_> {
    /// The first moment at or after `at_ms` the next message may leave.
    pub fn next(&self, at_ms: i64) -> i64 {
        self.plan.step(&self.sim, at_ms)
    }

    /// Counts a message sent at `at_ms` (a moment [`Simulation::next`]
    /// gave). Returns true when from then on nothing holds messages back:
    /// no window and the warm-up over.
    pub fn take(&mut self, at_ms: i64) -> bool {
        let sim = &mut self.sim;
        let day = warmup_day(self.plan.warmup, sim.first.or(Some(at_ms)), at_ms);
        if self.plan.unpaced() && day.is_none() {
            return true;
        }
        if let Some(day) = day {
            if sim.day_start != Some(day.starts_ms) {
                sim.day_start = Some(day.starts_ms);
                sim.used = 0;
            }
        }
        sim.first.get_or_insert(at_ms);
        sim.used += 1;
        sim.windows.record(Send::instant(at_ms, 1));
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(zone: Tz, y: i32, m: u32, d: u32, h: u32, min: u32) -> i64 {
        zone.with_ymd_and_hms(y, m, d, h, min, 0)
            .earliest()
            .unwrap()
            .timestamp_millis()
    }

    fn business() -> SendingHours {
        let (opens, closes) = SendingHours::parse_hours("09:00-17:00").unwrap();
        SendingHours {
            start_at: None,
            opens,
            closes,
            days: SendingHours::parse_days("mon-fri").unwrap(),
        }
    }

    #[test]
    fn parses_hours_days_zone_and_start() {
        assert_eq!(
            SendingHours::parse_days("mon,wed,fri").unwrap(),
            [true, false, true, false, true, false, false]
        );
        assert_eq!(
            SendingHours::parse_days("fri-mon").unwrap(),
            [true, false, false, false, true, true, true]
        );
        assert!(SendingHours::parse_days("weekdays").is_err());
        assert!(SendingHours::parse_hours("17:00-09:00").is_err());
        assert!(SendingHours::parse_hours("9-5").is_err());
        assert_eq!(SendingHours::parse_hours("08:30-24:00").unwrap().1, None);
        assert!(SendingHours::parse_zone("Europe/Berlin").is_ok());
        let err = SendingHours::parse_zone("Mars/Olympus").unwrap_err();
        assert!(err.to_string().contains("Mars/Olympus"), "{err}");
        assert!(SendingHours::parse_start_at("2026-12-01T09:00").is_ok());
        assert!(SendingHours::parse_start_at("tomorrow").is_err());
    }

    #[test]
    fn friday_evening_waits_for_monday_morning() {
        let z: Tz = "Asia/Tokyo".parse().unwrap();
        let h = business();
        // 2026-11-27 is a Friday.
        let fri_evening = ms(z, 2026, 11, 27, 17, 0);
        assert_eq!(h.next_open(fri_evening, z), Some(ms(z, 2026, 11, 30, 9, 0)));
        let inside = ms(z, 2026, 11, 27, 16, 59);
        assert_eq!(h.next_open(inside, z), Some(inside));
        assert_eq!(h.closes_after(inside, z), Some(ms(z, 2026, 11, 27, 17, 0)));
    }

    #[test]
    fn start_at_comes_first() {
        let z: Tz = "UTC".parse().unwrap();
        let mut h = business();
        h.start_at = Some(SendingHours::parse_start_at("2026-12-01T10:30").unwrap());
        let early = ms(z, 2026, 11, 27, 10, 0);
        assert_eq!(h.next_open(early, z), Some(ms(z, 2026, 12, 1, 10, 30)));
    }

    /// Every minute of a week that holds a daylight-saving change: the next
    /// opening is open, and nothing between now and it is.
    fn week_holds(zone: Tz, h: &SendingHours, from: i64) {
        let minute = 60_000;
        let mut open_minutes = 0;
        let mut t = from;
        while t < from + 8 * DAY_MS {
            let next = h.next_open(t, zone).unwrap();
            assert!(next >= t && h.is_open(next, zone), "{t} -> {next}");
            if h.is_open(t, zone) {
                open_minutes += 1;
                assert_eq!(next, t);
            } else {
                // The minute before the opening is closed too.
                assert!(!h.is_open(next - minute, zone) || next - minute < t);
            }
            t += minute;
        }
        // Five working days of eight hours, whatever the clocks did.
        assert!(open_minutes >= 5 * 8 * 60, "{open_minutes}");
    }

    #[test]
    fn a_week_across_daylight_saving_changes() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let ny: Tz = "America/New_York".parse().unwrap();
        let h = business();
        // Clocks go forward on Sunday 2026-03-29 in Berlin, back on 2026-10-25.
        week_holds(berlin, &h, ms(berlin, 2026, 3, 25, 0, 0));
        week_holds(berlin, &h, ms(berlin, 2026, 10, 21, 0, 0));
        // New York: forward on 2026-03-08, back on 2026-11-01.
        week_holds(ny, &h, ms(ny, 2026, 3, 4, 0, 0));
        week_holds(ny, &h, ms(ny, 2026, 10, 28, 0, 0));
        // Friday 17:00 CET waits until Monday 09:00 CEST: one hour less in UTC.
        let fri = ms(berlin, 2026, 3, 27, 17, 0);
        let mon = h.next_open(fri, berlin).unwrap();
        assert_eq!(mon - fri, 64 * 3_600_000 - 3_600_000);
    }

    #[test]
    fn an_opening_inside_a_spring_forward_gap_opens_after_it() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let (opens, closes) = SendingHours::parse_hours("02:30-05:00").unwrap();
        let h = SendingHours {
            start_at: None,
            opens,
            closes,
            days: [true; 7],
        };
        let sat_evening = ms(berlin, 2026, 3, 28, 20, 0);
        // 02:30 does not exist on 2026-03-29: the clock jumps 02:00 -> 03:00.
        assert_eq!(
            h.next_open(sat_evening, berlin),
            Some(ms(berlin, 2026, 3, 29, 3, 0))
        );
    }

    #[test]
    fn warmup_days_count_from_the_first_send_then_end() {
        let caps = [50, 100, 200];
        let day1 = warmup_day(&caps, None, 5_000).unwrap();
        assert_eq!((day1.day, day1.cap, day1.starts_ms), (1, 50, 5_000));
        let first = 1_000;
        let day2 = warmup_day(&caps, Some(first), first + DAY_MS + 10).unwrap();
        assert_eq!((day2.day, day2.cap), (2, 100));
        assert_eq!(day2.starts_ms, first + DAY_MS);
        assert_eq!(warmup_day(&caps, Some(first), first + 3 * DAY_MS), None);
        // Full: wait for the next day; a free slot: now.
        assert_eq!(
            day2.next_slot(100, 1, first + DAY_MS + 10),
            first + 2 * DAY_MS
        );
        assert_eq!(
            day2.next_slot(99, 1, first + DAY_MS + 10),
            first + DAY_MS + 10
        );
        // A message bigger than the cap still goes, alone, on a fresh day.
        assert_eq!(day2.next_slot(0, 500, 7), 7);
    }

    #[test]
    fn eta_counts_the_hours_the_warmup_and_the_windows() {
        let z: Tz = "UTC".parse().unwrap();
        let h = business();
        let minute = crate::limits::Window::new(1, std::time::Duration::from_secs(60)).unwrap();
        // Friday 2026-11-27 16:58 UTC: two sends fit before 17:00, the
        // third waits for Monday 09:00.
        let now = ms(z, 2026, 11, 27, 16, 58);
        let plan = Plan {
            windows: Schedule::new(&[minute], []),
            hours: Some(&h),
            zone: z,
            warmup: &[],
            first_send_ms: None,
            used_today: 0,
        };
        assert_eq!(plan.eta(now, 3), Some(ms(z, 2026, 11, 30, 9, 0)));
        assert_eq!(
            plan.next_send(ms(z, 2026, 11, 28, 12, 0)),
            ms(z, 2026, 11, 30, 9, 0)
        );
        // Warm-up of 2 a day with no windows: the fifth goes on day 3.
        let warm = Plan {
            windows: Schedule::new(&[], []),
            hours: None,
            zone: z,
            warmup: &[2, 2, 2],
            first_send_ms: None,
            used_today: 0,
        };
        assert_eq!(warm.eta(0, 5), Some(2 * DAY_MS));
        // After the list, the rest go at once.
        assert_eq!(warm.eta(0, 100), Some(3 * DAY_MS));
    }

    #[test]
    fn warmup_simulated_sends_follow_the_list() {
        let caps = [3, 5];
        let mut log: Vec<i64> = Vec::new();
        let mut now = 0;
        while log.len() < 20 {
            let first = log.first().copied();
            let at = match warmup_day(&caps, first, now) {
                Some(day) => {
                    let used = log.iter().filter(|t| **t >= day.starts_ms).count() as u64;
                    day.next_slot(used, 1, now)
                }
                None => now,
            };
            if at == now {
                log.push(now);
                now += 1;
            } else {
                now = at;
            }
        }
        let per_day = |d: i64| {
            log.iter()
                .filter(|t| **t >= d * DAY_MS && **t < (d + 1) * DAY_MS)
                .count()
        };
        assert_eq!((per_day(0), per_day(1), per_day(2)), (3, 5, 12));
    }
}
