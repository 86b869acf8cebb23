//! Several sending accounts (SPEC §6b): which account sends the next
//! message, and the plan of a campaign across accounts. Pure, like
//! `limits` and `schedule`: `status`, `send --dry-run` and the progress
//! display ask it, and its tests run in virtual time.
//!
//! The engine makes the same choice without asking: every account claims
//! the next recipient as soon as its own slot comes, so the first account
//! able to send takes it. This module says what that gives.

use crate::schedule::Plan;

/// One account as the planner sees it: its windows, hours and warm-up, and
/// the moment before which it cannot send at all (a pause).
pub struct AccountPlan<'a> {
    pub plan: Plan<'a>,
    pub not_before_ms: i64,
}

/// The campaign's plan across its accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Combined {
    /// The account that sends the next message, and when.
    pub next: Option<(usize, i64)>,
    /// When the last message leaves; `None` without any rule to estimate from.
    pub eta_ms: Option<i64>,
    /// How many of the messages each account sends, in account order.
    pub shares: Vec<u64>,
}

/// The account that can send soonest among `slots` (each account's next
/// slot, `None` for an account that cannot send); the first in the file's
/// order on a tie, so that one account is used before the next is touched.
pub fn choose(slots: &[Option<i64>]) -> Option<(usize, i64)> {
    slots
        .iter()
        .enumerate()
        .filter_map(|(i, slot)| slot.map(|at| (i, at)))
        .min_by_key(|(i, at)| (*at, *i))
}

/// Gives each of `remaining` one-recipient messages, one after the other,
/// to the account that can send it soonest, from `now_ms`.
pub fn plan(accounts: &[AccountPlan<'_>], now_ms: i64, remaining: u64) -> Combined {
    let mut shares = vec![0; accounts.len()];
    if accounts.is_empty() || remaining == 0 {
        return Combined {
            next: None,
            eta_ms: None,
            shares,
        };
    }
    let from: Vec<i64> = accounts
        .iter()
        .map(|a| a.not_before_ms.max(now_ms))
        .collect();
    // With no rule at all, every message goes at once: nothing to estimate.
    let unruled = accounts
        .iter()
        .all(|a| a.plan.windows.is_unpaced() && a.plan.warmup.is_empty() && a.plan.hours.is_none());
    let mut sims: Vec<_> = accounts
        .iter()
        .zip(&from)
        .map(|(a, from)| a.plan.simulate(*from))
        .collect();
    let mut next = None;
    let mut last = now_ms;
    let mut left = remaining;
    while left > 0 {
        let slots: Vec<Option<i64>> = sims
            .iter()
            .zip(&from)
            .map(|(s, f)| Some(s.next(*f)))
            .collect();
        let Some((i, at)) = choose(&slots) else { break };
        next.get_or_insert((i, at));
        last = last.max(at);
        if sims[i].take(at) {
            // Nothing holds this account back any more: it sends the rest now.
            shares[i] += left;
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    Combined {
        next,
        eta_ms: (!unruled).then_some(last),
        shares,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Schedule, Send, Window};
    use crate::schedule::SendingHours;
    use chrono_tz::Tz;
    use std::time::Duration;

    const MIN: i64 = 60_000;
    const DAY: i64 = 86_400_000;

    fn window(max: u32, secs: u64) -> Window {
        Window::new(max, Duration::from_secs(secs)).unwrap()
    }

    fn account<'a>(
        windows: &[Window],
        log: &[i64],
        hours: Option<&'a SendingHours>,
        warmup: &'a [u32],
    ) -> AccountPlan<'a> {
        AccountPlan {
            plan: Plan {
                windows: Schedule::new(windows, log.iter().map(|at| Send::instant(*at, 1))),
                hours,
                zone: Tz::UTC,
                warmup,
                first_send_ms: log.first().copied(),
                used_today: 0,
            },
            not_before_ms: 0,
        }
    }

    #[test]
    fn the_soonest_slot_wins_and_the_first_account_on_a_tie() {
        assert_eq!(choose(&[Some(5), Some(3), Some(3)]), Some((1, 3)));
        assert_eq!(choose(&[None, Some(9)]), Some((1, 9)));
        assert_eq!(choose(&[None, None]), None);
    }

    /// Three Gmail-like accounts of 500 a day and 10 a minute: 1,500
    /// messages go in one day, 500 through each, and never more than an
    /// account's windows allow.
    #[test]
    fn three_accounts_share_fifteen_hundred_in_a_day() {
        let w = [window(10, 60), window(500, 86_400)];
        let accounts: Vec<AccountPlan> = (0..3).map(|_| account(&w, &[], None, &[])).collect();
        let combined = plan(&accounts, 0, 1_500);
        assert_eq!(combined.shares, vec![500, 500, 500]);
        assert_eq!(combined.next, Some((0, 0)));
        // 10 a minute each, evenly paced: the 500th of each at 499 × 6 s.
        assert_eq!(combined.eta_ms, Some(499 * 6_000));
        // The 1,501st waits a day for the first send to leave the window.
        let combined = plan(&accounts, 0, 1_501);
        assert_eq!(combined.eta_ms, Some(DAY));
    }

    /// An account whose day is used up, or that is paused, takes nothing
    /// until then; the others carry the work.
    #[test]
    fn a_full_or_paused_account_is_passed_over_until_it_frees() {
        let w = [window(2, 86_400)];
        let full = account(&w, &[-MIN, -MIN], None, &[]);
        let free = account(&w, &[], None, &[]);
        let mut paused = account(&w, &[], None, &[]);
        paused.not_before_ms = 30 * MIN;
        let combined = plan(&[full, free, paused], 0, 5);
        assert_eq!(combined.shares, vec![1, 2, 2]);
        assert_eq!(combined.next, Some((1, 0)));
        // The full account's oldest send leaves its window a day later.
        assert_eq!(combined.eta_ms, Some(DAY - MIN));
    }

    /// Sending hours and warm-up hold each account; the plan waits for the
    /// next opening and moves on to the next day's cap.
    #[test]
    fn hours_and_warm_up_hold_every_account() {
        let (opens, closes) = SendingHours::parse_hours("09:00-17:00").unwrap();
        let hours = SendingHours {
            opens,
            closes,
            ..SendingHours::default()
        };
        let warmup = [2u32, 4];
        // 1970-01-01 was a Thursday; the clock starts at midnight UTC.
        let a = account(&[], &[], Some(&hours), &warmup);
        let b = account(&[], &[], Some(&hours), &warmup);
        let combined = plan(&[a, b], 0, 6);
        assert_eq!(combined.next, Some((0, 9 * 3_600_000)));
        // Day one: 2 each; on day two the first account's cap of 4 takes
        // the last two at 09:00.
        assert_eq!(combined.shares, vec![4, 2]);
        assert_eq!(combined.eta_ms, Some(DAY + 9 * 3_600_000));
    }

    #[test]
    fn without_any_rule_there_is_no_estimate() {
        let accounts = [account(&[], &[], None, &[]), account(&[], &[], None, &[])];
        let combined = plan(&accounts, 5, 1_000_000);
        assert_eq!(combined.eta_ms, None);
        assert_eq!(combined.next, Some((0, 5)));
        assert_eq!(combined.shares, vec![1_000_000, 0]);
    }
}
