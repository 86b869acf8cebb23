//! Sending limits (SPEC §6): rolling windows over the per-account send log.
//!
//! Everything here is a pure function of "now" and the log, so that window
//! and pacing logic is tested without sleeping and behaves the same whether
//! the log entries came from this process, an earlier run or another process.
//! Time arithmetic saturates: a stored time may be anything a damaged
//! database holds, and the end of time must stay the end of time.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Result;

/// At most `max` recipients may enter SMTP transactions in any interval of
/// length `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub max: u32,
    pub period: Duration,
}

impl Window {
    /// The longest period a window may have: a year and a day covers every
    /// published sending limit, and longer ones push the times a window
    /// computes beyond any calendar.
    pub const MAX_PERIOD: Duration = Duration::from_secs(366 * 86_400);

    pub fn new(max: u32, period: Duration) -> Result<Window> {
        if max == 0 {
            anyhow::bail!("[limits] a window's max must be at least 1");
        }
        // Windows count in milliseconds: a shorter period would count nothing.
        if period < Duration::from_millis(1) {
            anyhow::bail!("[limits] a window's period must be at least 1ms");
        }
        if period > Self::MAX_PERIOD {
            anyhow::bail!(
                "[limits] a window's period may be at most 366 days, not {}",
                humantime::format_duration(period)
            );
        }
        Ok(Window { max, period })
    }

    fn period_ms(&self) -> i64 {
        i64::try_from(self.period.as_millis()).unwrap_or(i64::MAX / 4)
    }

    /// The even spacing of one recipient under this window, in milliseconds.
    fn spacing_ms(&self) -> f64 {
        self.period.as_millis() as f64 / f64::from(self.max)
    }

    /// "daily limit", "per-minute limit", or "limit 5 per 6s".
    pub fn describe(&self) -> String {
        match self.period.as_secs() {
            86_400 if self.period.subsec_nanos() == 0 => "daily limit".to_string(),
            3600 if self.period.subsec_nanos() == 0 => "hourly limit".to_string(),
            60 if self.period.subsec_nanos() == 0 => "per-minute limit".to_string(),
            _ => format!("limit per {}", humantime::format_duration(self.period)),
        }
    }
}

/// One entry of the send log: `count` recipients entered a transaction at
/// `at_ms` that ended at `done_ms` (Unix milliseconds).
///
/// Pacing counts from the start; windows count from the end, because the
/// server counts the message somewhere in between: a new transaction that
/// starts one period after the previous one *ended* can never meet it in one
/// window at the server, however long the first one took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    pub at_ms: i64,
    pub done_ms: i64,
    pub count: u32,
}

impl Send {
    /// A send whose transaction took no time (simulations, tests).
    pub fn instant(at_ms: i64, count: u32) -> Send {
        Send {
            at_ms,
            done_ms: at_ms,
            count,
        }
    }
}

/// Why the next send cannot start yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Even pacing of the shortest window: a short, always-accepted wait.
    Pacing,
    /// A window is full until its oldest send leaves it.
    Full(Window),
}

/// The earliest moment a transaction may start, and what holds it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub at_ms: i64,
    pub hold: Option<Hold>,
}

/// The windows of one account, with the sends that still count in them.
///
/// Every question (what a window holds, when its oldest send leaves, which
/// send was last) is answered by binary search over the log and running
/// totals, not by a walk over it: an ETA simulates every remaining
/// message, and a walk per message made it quadratic (a campaign of 20,000
/// under a daily window of 10,000 took 14 s).
#[derive(Debug, Clone)]
pub struct Schedule {
    windows: Vec<Window>,
    /// Sends inside the longest window, ordered by `done_ms`.
    log: VecDeque<Logged>,
    /// The send that started last: pacing counts from it.
    last: Option<Send>,
}

/// A send with the running total of recipients up to and including it.
#[derive(Debug, Clone, Copy)]
struct Logged {
    send: Send,
    total: u64,
}

impl Schedule {
    /// `windows` sorted by period (the first one paces); `log` in any order.
    pub fn new(windows: &[Window], log: impl IntoIterator<Item = Send>) -> Schedule {
        let mut windows = windows.to_vec();
        windows.sort_by_key(|w| w.period);
        let mut sends: Vec<Send> = log.into_iter().collect();
        sends.sort_by_key(|s| s.done_ms);
        let mut schedule = Schedule {
            windows,
            log: VecDeque::with_capacity(sends.len()),
            last: None,
        };
        for send in sends {
            schedule.push(send);
        }
        schedule
    }

    fn push(&mut self, send: Send) {
        let total = self.log.back().map_or(0, |l| l.total) + u64::from(send.count);
        self.log.push_back(Logged { send, total });
        if self.last.is_none_or(|last| send.at_ms >= last.at_ms) {
            self.last = Some(send);
        }
    }

    /// How far back the log must reach for this schedule's decisions.
    pub fn horizon(windows: &[Window]) -> Duration {
        windows.iter().map(|w| w.period).max().unwrap_or_default()
    }

    /// The first log index of the sends that ended after `start_ms`, and
    /// the running total before it.
    fn inside(&self, start_ms: i64) -> (usize, u64) {
        let first = self.log.partition_point(|l| l.send.done_ms <= start_ms);
        let before = match first {
            0 => self
                .log
                .front()
                .map_or(0, |l| l.total - u64::from(l.send.count)),
            i => self.log[i - 1].total,
        };
        (first, before)
    }

    /// Recipients of the sends that ended after `start_ms`.
    fn used_since(&self, start_ms: i64) -> u64 {
        let (_, before) = self.inside(start_ms);
        self.log.back().map_or(0, |l| l.total) - before
    }

    /// The earliest time at or after `now_ms` at which `count` recipients may
    /// enter a transaction without any window holding more than its max.
    ///
    /// Log entries stamped after `now_ms` (the clock went back) count as if
    /// made now, so a clock jump never lets a window overflow and never
    /// makes a wait longer than one period.
    pub fn next_slot(&self, now_ms: i64, count: u32) -> Slot {
        let mut slot = Slot {
            at_ms: now_ms,
            hold: None,
        };
        let Some(pacer) = self.windows.first() else {
            return slot;
        };
        if let Some(last) = self.last {
            let last_at = last.at_ms.min(now_ms);
            let paced =
                last_at.saturating_add((pacer.spacing_ms() * f64::from(last.count)).round() as i64);
            if paced > slot.at_ms {
                slot = Slot {
                    at_ms: paced,
                    hold: Some(Hold::Pacing),
                };
            }
        }
        let end = self.log.back().map_or(0, |l| l.total);
        for w in &self.windows {
            let count = u64::from(count.min(w.max));
            let (first, before) = self.inside(now_ms.saturating_sub(w.period_ms()));
            let used = end - before;
            if used + count <= u64::from(w.max) {
                continue;
            }
            // Drop the oldest sends until the new one fits; it may start once
            // the last dropped one has left the window: the first send whose
            // running total reaches `used + count - max` past `before` (the
            // totals grow along the log, so no send before `first` does).
            let need = before + used + count - u64::from(w.max);
            let last_dropped = self.log.partition_point(|l| l.total < need).max(first);
            if let Some(s) = self.log.get(last_dropped) {
                let free_at = s.send.done_ms.min(now_ms).saturating_add(w.period_ms());
                if free_at > slot.at_ms || slot.hold == Some(Hold::Pacing) && free_at == slot.at_ms
                {
                    slot = Slot {
                        at_ms: free_at,
                        hold: Some(Hold::Full(*w)),
                    };
                }
            }
        }
        slot
    }

    /// Adds a send to the log (used to simulate the rest of a campaign).
    pub fn record(&mut self, send: Send) {
        let sorted = self
            .log
            .back()
            .is_none_or(|l| l.send.done_ms <= send.done_ms);
        if sorted {
            self.push(send);
        } else {
            // Out of order: rebuilt, which is rare and keeps the totals right.
            let sends = self.log.iter().map(|l| l.send).chain([send]);
            *self = Schedule::new(&self.windows, sends.collect::<Vec<_>>());
        }
        let horizon =
            i64::try_from(Self::horizon(&self.windows).as_millis()).unwrap_or(i64::MAX / 4);
        let cutoff = send.done_ms.saturating_sub(horizon);
        let mut dropped_last = false;
        while self.log.front().is_some_and(|l| l.send.done_ms <= cutoff) {
            let gone = self.log.pop_front().map(|l| l.send);
            dropped_last |= gone == self.last;
        }
        if dropped_last {
            self.last = self.log.iter().map(|l| l.send).max_by_key(|s| s.at_ms);
        }
    }

    /// The time the last of `remaining` messages (each to `per_message`
    /// recipients) could start, sending as fast as the windows allow.
    /// `None` when there are no windows to estimate from.
    pub fn eta(&self, now_ms: i64, remaining: u64, per_message: u32) -> Option<i64> {
        if self.windows.is_empty() {
            return None;
        }
        let mut sim = self.clone();
        let mut at = now_ms;
        for _ in 0..remaining {
            at = sim.next_slot(at, per_message).at_ms;
            sim.record(Send::instant(at, per_message));
        }
        Some(at)
    }

    /// No window at all: nothing paces the account.
    pub fn is_unpaced(&self) -> bool {
        self.windows.is_empty()
    }

    /// Recipients counted in each window at `now_ms`, in window order.
    pub fn usage(&self, now_ms: i64) -> Vec<(Window, u64)> {
        self.windows
            .iter()
            .map(|w| (*w, self.used_since(now_ms.saturating_sub(w.period_ms()))))
            .collect()
    }

    /// When the oldest send still inside `window` leaves it, if any is inside.
    pub fn oldest_leaves(&self, window: &Window, now_ms: i64) -> Option<i64> {
        let (first, _) = self.inside(now_ms.saturating_sub(window.period_ms()));
        self.log.get(first).map(|l| {
            l.send
                .done_ms
                .min(now_ms)
                .saturating_add(window.period_ms())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(max: u32, secs: u64) -> Window {
        Window::new(max, Duration::from_secs(secs)).unwrap()
    }

    fn sends(times: &[i64]) -> Vec<Send> {
        times.iter().map(|&at_ms| Send::instant(at_ms, 1)).collect()
    }

    /// Brute-force check: no interval of length `period` holds more than max.
    fn never_exceeded(log: &[Send], win: Window) -> bool {
        let p = win.period_ms();
        log.iter().all(|a| {
            log.iter()
                .filter(|b| b.at_ms >= a.at_ms && b.at_ms < a.at_ms + p)
                .map(|b| u64::from(b.count))
                .sum::<u64>()
                <= u64::from(win.max)
        })
    }

    #[test]
    fn periods_beyond_a_year_or_below_a_millisecond_are_refused() {
        assert!(Window::new(1, Window::MAX_PERIOD).is_ok());
        let err = Window::new(1, Window::MAX_PERIOD + Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("366 days"), "{err}");
        assert!(Window::new(1, Duration::from_nanos(1)).is_err());
    }

    /// The answer of a plain walk over the whole log, as `next_slot` gave
    /// it before it searched: the reference the fast one must match.
    fn walked_slot(windows: &[Window], log: &[Send], now_ms: i64, count: u32) -> Slot {
        let mut log = log.to_vec();
        log.sort_by_key(|s| s.done_ms);
        let mut slot = Slot {
            at_ms: now_ms,
            hold: None,
        };
        let Some(pacer) = windows.iter().min_by_key(|w| w.period) else {
            return slot;
        };
        if let Some(last) = log.iter().max_by_key(|s| s.at_ms) {
            let paced = last.at_ms.min(now_ms)
                + (pacer.spacing_ms() * f64::from(last.count)).round() as i64;
            if paced > slot.at_ms {
                slot = Slot {
                    at_ms: paced,
                    hold: Some(Hold::Pacing),
                };
            }
        }
        let mut windows = windows.to_vec();
        windows.sort_by_key(|w| w.period);
        for w in &windows {
            let count = count.min(w.max);
            let inside: Vec<&Send> = log
                .iter()
                .filter(|s| s.done_ms > now_ms - w.period_ms())
                .collect();
            let mut used: u64 = inside.iter().map(|s| u64::from(s.count)).sum();
            if used + u64::from(count) <= u64::from(w.max) {
                continue;
            }
            for s in inside {
                used -= u64::from(s.count);
                if used + u64::from(count) <= u64::from(w.max) {
                    let free_at = s.done_ms.min(now_ms) + w.period_ms();
                    if free_at > slot.at_ms
                        || slot.hold == Some(Hold::Pacing) && free_at == slot.at_ms
                    {
                        slot = Slot {
                            at_ms: free_at,
                            hold: Some(Hold::Full(*w)),
                        };
                    }
                    break;
                }
            }
        }
        slot
    }

    #[test]
    fn searching_the_log_answers_as_walking_it() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2_000 {
            let windows: Vec<Window> = (0..rng.random_range(1..4))
                .map(|_| w(rng.random_range(1..8), rng.random_range(1..50)))
                .collect();
            let log: Vec<Send> = (0..rng.random_range(0..40))
                .map(|_| {
                    let at_ms = rng.random_range(0..60_000);
                    Send {
                        at_ms,
                        done_ms: at_ms + rng.random_range(0..3_000),
                        count: rng.random_range(1..4),
                    }
                })
                .collect();
            let now = rng.random_range(0..70_000);
            let count = rng.random_range(1..5);
            let schedule = Schedule::new(&windows, log.clone());
            assert_eq!(
                schedule.next_slot(now, count),
                walked_slot(&windows, &log, now, count),
                "{windows:?} {log:?} now {now} count {count}"
            );
            let mut sim = schedule.clone();
            let mut walked = log.clone();
            let mut at = now;
            for _ in 0..20 {
                let slot = sim.next_slot(at, 1);
                assert_eq!(slot, walked_slot(&windows, &walked, at, 1));
                at = slot.at_ms;
                sim.record(Send::instant(at, 1));
                walked.push(Send::instant(at, 1));
            }
        }
    }

    #[test]
    fn an_eta_is_linear_in_the_messages_left() {
        let s = Schedule::new(&[w(10_000, 86_400), w(120, 60)], []);
        // 200,000 messages under a daily window of 10,000: quadratic, this
        // was minutes; every message is still simulated.
        assert_eq!(s.eta(0, 200_000, 1), Some(19 * 86_400_000 + 9_999 * 500));
    }

    #[test]
    fn times_at_the_end_of_time_saturate() {
        let s = Schedule::new(&[w(1, 60), w(5, 3600)], sends(&[i64::MAX - 1, 0]));
        assert_eq!(s.next_slot(i64::MAX, 1).at_ms, i64::MAX);
        assert_eq!(s.eta(i64::MAX, 3, 1), Some(i64::MAX));
        assert_eq!(s.usage(i64::MIN).len(), 2);
    }

    #[test]
    fn empty_log_sends_now() {
        let s = Schedule::new(&[w(10, 60)], []);
        assert_eq!(
            s.next_slot(1_000, 1),
            Slot {
                at_ms: 1_000,
                hold: None
            }
        );
    }

    #[test]
    fn shortest_window_paces_evenly() {
        let s = Schedule::new(&[w(10, 60)], sends(&[1_000]));
        assert_eq!(
            s.next_slot(1_000, 1),
            Slot {
                at_ms: 7_000,
                hold: Some(Hold::Pacing)
            }
        );
        assert_eq!(s.next_slot(9_000, 1).at_ms, 9_000);
    }

    #[test]
    fn full_window_waits_for_oldest_send_to_leave() {
        let win = w(5, 6);
        // Five sends already in the window, paced 1.2 s apart.
        let s = Schedule::new(&[win], sends(&[0, 1_200, 2_400, 3_600, 4_800]));
        assert_eq!(
            s.next_slot(5_000, 1),
            Slot {
                at_ms: 6_000,
                hold: Some(Hold::Full(win))
            }
        );
        // Exactly at the boundary the oldest send has left: interval [0, 6000).
        assert_eq!(
            s.next_slot(6_000, 1),
            Slot {
                at_ms: 6_000,
                hold: None
            }
        );
    }

    #[test]
    fn longest_cap_counts_log_from_before_the_process_started() {
        let day = w(3, 86_400);
        let minute = w(10, 60);
        let s = Schedule::new(&[minute, day], sends(&[0, 100_000, 200_000]));
        let slot = s.next_slot(300_000, 1);
        assert_eq!(
            slot,
            Slot {
                at_ms: 86_400_000,
                hold: Some(Hold::Full(day))
            }
        );
    }

    #[test]
    fn several_windows_the_latest_constraint_wins() {
        let a = w(2, 10);
        let b = w(3, 100);
        let s = Schedule::new(&[a, b], sends(&[0, 5_000, 10_000]));
        // a: [5000, 10000] inside (0,20000]... at 12_000 a holds 2 → wait 15_000; b holds 3 → 100_000.
        assert_eq!(
            s.next_slot(12_000, 1),
            Slot {
                at_ms: 100_000,
                hold: Some(Hold::Full(b))
            }
        );
    }

    #[test]
    fn clock_jump_back_never_waits_more_than_a_period() {
        let win = w(1, 60);
        // The log says a send happened an hour "in the future".
        let s = Schedule::new(&[win], sends(&[3_600_000]));
        let slot = s.next_slot(0, 1);
        assert!(slot.at_ms <= 60_000, "{slot:?}");
        assert!(slot.at_ms > 0);
    }

    #[test]
    fn windows_count_from_the_end_of_a_slow_transaction_pacing_from_its_start() {
        let win = w(1, 6);
        let slow = Send {
            at_ms: 0,
            done_ms: 500,
            count: 1,
        };
        let s = Schedule::new(&[win], vec![slow]);
        assert_eq!(
            s.next_slot(1_000, 1),
            Slot {
                at_ms: 6_500,
                hold: Some(Hold::Full(win))
            }
        );
        let paced = Schedule::new(&[w(10, 6), w(100, 600)], vec![slow]);
        assert_eq!(
            paced.next_slot(100, 1),
            Slot {
                at_ms: 600,
                hold: Some(Hold::Pacing)
            }
        );
    }

    #[test]
    fn multi_recipient_messages_count_each_recipient() {
        let win = w(4, 60);
        let s = Schedule::new(&[win], vec![Send::instant(0, 3)]);
        assert_eq!(s.next_slot(60_000 - 1, 2).at_ms, 60_000);
        assert!(s.next_slot(60_000 - 1, 1).at_ms < 60_000);
    }

    #[test]
    fn simulated_schedule_never_exceeds_any_window_and_paces_exactly() {
        let wins = [w(4, 1), w(30, 10), w(100, 60)];
        let mut s = Schedule::new(&wins, []);
        let mut all = Vec::new();
        let mut now = 0;
        for _ in 0..400 {
            let slot = s.next_slot(now, 1);
            assert!(slot.at_ms >= now);
            now = slot.at_ms;
            s.record(Send::instant(now, 1));
            all.push(Send::instant(now, 1));
        }
        for win in wins {
            assert!(never_exceeded(&all, win), "{win:?} exceeded");
        }
        // The first 30 sends are paced 250 ms apart by the 4-per-second window.
        for pair in all[..30].windows(2) {
            assert_eq!(pair[1].at_ms - pair[0].at_ms, 250);
        }
    }

    #[test]
    fn eta_under_a_daily_cap_spills_into_the_next_day() {
        let day = w(500, 86_400);
        let s = Schedule::new(&[w(100, 1), day], sends(&(0..400).collect::<Vec<i64>>()));
        let eta = s.eta(1_000, 150, 1).unwrap();
        // 100 fit today, 10 ms apart; the other 50 wait for the first sends
        // to leave the day, then go on 10 ms apart.
        assert_eq!(eta, 86_400_000 + 49 * 10);
        assert_eq!(Schedule::new(&[], []).eta(0, 10, 1), None);
    }

    #[test]
    fn usage_counts_only_sends_inside_each_window() {
        let s = Schedule::new(&[w(10, 60), w(500, 86_400)], sends(&[0, 30_000, 90_000]));
        let used: Vec<u64> = s.usage(100_000).into_iter().map(|(_, u)| u).collect();
        assert_eq!(used, vec![1, 3]);
    }
}
