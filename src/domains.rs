//! Per-domain smoothing (SPEC §6b, `[limits.per_domain]`): paces the
//! messages to each recipient domain inside one run, so that no receiving
//! provider sees a burst. Short and in memory by design, unlike the
//! account windows, which live in the send log and survive restarts.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use thiserror::Error;

/// A rate such as `"20/m"`: at most `max` messages per `period`, evenly spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub max: u32,
    pub period: Duration,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("[limits.per_domain] {} = {}: write a rate as \"20/m\" (per s, m, h or d, or a duration such as \"20/10m\")", crate::error::quote(key), crate::error::quote(value))]
pub struct RateError {
    pub key: String,
    pub value: String,
}

impl Rate {
    pub fn parse(key: &str, value: &str) -> Result<Rate, RateError> {
        let bad = || RateError {
            key: key.to_string(),
            value: value.to_string(),
        };
        let (max, per) = value.split_once('/').ok_or_else(bad)?;
        let max: u32 = max.trim().parse().map_err(|_| bad())?;
        let period = match per.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if max == 0 || period.is_zero() || period > crate::limits::Window::MAX_PERIOD {
            return Err(bad());
        }
        Ok(Rate { max, period })
    }

    /// Even pacing, no burst: one message every `period / max`.
    fn quota(&self) -> Option<Quota> {
        Quota::with_period(self.period / self.max).map(|q| q.allow_burst(NonZeroU32::MIN))
    }
}

type Keyed<C> =
    RateLimiter<String, DefaultKeyedStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The limiters of one run: one per rule, each keyed by recipient domain,
/// so that `"*"` paces every domain on its own.
pub struct DomainPacer<C: Clock = DefaultClock> {
    rules: BTreeMap<String, Keyed<C>>,
    clock: C,
}

impl DomainPacer<DefaultClock> {
    pub fn new(rules: &BTreeMap<String, Rate>) -> DomainPacer<DefaultClock> {
        DomainPacer::with_clock(rules, DefaultClock::default())
    }
}

impl<C: Clock + Clone> DomainPacer<C> {
    pub fn with_clock(rules: &BTreeMap<String, Rate>, clock: C) -> DomainPacer<C> {
        let rules = rules
            .iter()
            .filter_map(|(key, rate)| {
                let quota = rate.quota()?;
                Some((
                    key.clone(),
                    RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock.clone()),
                ))
            })
            .collect();
        DomainPacer { rules, clock }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Takes a slot for one message to `address`'s domain: `None` when it may
    /// go now, or how long it must wait and the domain. Domains without a
    /// rule of their own follow `"*"`, if given.
    pub fn hold(&self, address: &str) -> Option<(Duration, String)> {
        let domain = address
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let limiter = self.rules.get(&domain).or_else(|| self.rules.get("*"))?;
        match limiter.check_key(&domain) {
            Ok(()) => None,
            Err(not_until) => Some((not_until.wait_time_from(self.clock.now()), domain)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rules(pairs: &[(&str, &str)]) -> BTreeMap<String, Rate> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Rate::parse(k, v).unwrap()))
            .collect()
    }

    #[test]
    fn rates_parse_and_bad_ones_name_the_key() {
        assert_eq!(
            Rate::parse("gmail.com", "20/m").unwrap(),
            Rate {
                max: 20,
                period: Duration::from_secs(60)
            }
        );
        assert_eq!(
            Rate::parse("*", "5/10s").unwrap().period,
            Duration::from_secs(10)
        );
        for bad in ["20", "0/m", "x/m", "5/fortnight"] {
            let err = Rate::parse("gmail.com", bad).unwrap_err();
            assert!(err.to_string().contains("gmail.com"), "{err}");
        }
    }

    #[test]
    fn each_domain_is_paced_on_its_own_and_others_are_not_held() {
        let clock = FakeRelativeClock::default();
        let pacer =
            DomainPacer::with_clock(&rules(&[("gmail.com", "2/s"), ("*", "1/s")]), clock.clone());
        assert_eq!(pacer.hold("a@gmail.com"), None);
        let (wait, domain) = pacer.hold("b@Gmail.COM").unwrap();
        assert_eq!(
            (wait, domain.as_str()),
            (Duration::from_millis(500), "gmail.com")
        );
        // Other domains each have their own pace under "*".
        assert_eq!(pacer.hold("a@example.com"), None);
        assert_eq!(pacer.hold("a@example.org"), None);
        assert!(pacer.hold("b@example.com").is_some());
        clock.advance(Duration::from_millis(500));
        assert_eq!(pacer.hold("b@gmail.com"), None);
        // Over ten simulated seconds no domain gets more than its rate.
        let mut sent = 0;
        for _ in 0..1000 {
            clock.advance(Duration::from_millis(10));
            if pacer.hold("x@gmail.com").is_none() {
                sent += 1;
            }
        }
        assert_eq!(sent, 20);
    }

    #[test]
    fn without_a_matching_rule_nothing_waits() {
        let pacer = DomainPacer::new(&rules(&[("gmail.com", "1/h")]));
        for _ in 0..10 {
            assert_eq!(pacer.hold("a@example.com"), None);
        }
    }
}
