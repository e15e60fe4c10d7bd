//! Rate limits per endpoint class and caller (`[rate_limits]`): a GCRA limiter (governor) per
//! class, keyed by the caller's token name or, without a token, its address. A request over
//! its caller's rate is answered `429 rate_limited` with the wait in `Retry-After`.
//!
//! The key maps are bounded: idle callers are dropped every [`CLEANUP_INTERVAL`], and once a
//! class tracks [`MAX_CALLERS`] callers, callers it does not know yet share one bucket until
//! the next cleanup.

use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use serde_json::json;

use super::{metrics, Access, Class};
use crate::api::ApiError;
use crate::config::RateLimitsSection;
use crate::error::ErrorCode;

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// Callers one class tracks at most (see the module doc).
pub const MAX_CALLERS: usize = 100_000;

/// How often idle callers are dropped from the maps.
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(10);

/// The bucket callers share while a class tracks [`MAX_CALLERS`].
const OVERFLOW_KEY: &str = "overflow";

struct Limit {
    per_second: u32,
    burst: u32,
    limiter: Arc<Keyed>,
}

/// The limiters of the three limited classes; `None` where a class has no limit.
pub struct RateLimits {
    read: Option<Limit>,
    write: Option<Limit>,
    admin: Option<Limit>,
}

impl RateLimits {
    pub fn new(section: &RateLimitsSection) -> RateLimits {
        let limit = |per_second: u32| {
            let rate = NonZeroU32::new(per_second)?;
            let burst = per_second.saturating_mul(section.burst_seconds.max(1));
            let burst_nz = NonZeroU32::new(burst).unwrap_or(rate);
            let limiter = Arc::new(RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst_nz)));
            Some(Limit { per_second, burst, limiter })
        };
        RateLimits {
            read: limit(section.read_per_second),
            write: limit(section.write_per_second),
            admin: limit(section.admin_per_second),
        }
    }

    /// Keeps the callers' state of every class whose rate and burst did not change.
    pub fn keep_unchanged(&mut self, old: &RateLimits) {
        for (new, old) in [(&mut self.read, &old.read), (&mut self.write, &old.write), (&mut self.admin, &old.admin)] {
            if let (Some(new), Some(old)) = (new.as_mut(), old.as_ref()) {
                if (new.per_second, new.burst) == (old.per_second, old.burst) {
                    new.limiter = old.limiter.clone();
                }
            }
        }
    }

    fn limit(&self, class: Class) -> Option<&Limit> {
        match class {
            Class::Open => None,
            Class::Read => self.read.as_ref(),
            Class::Write => self.write.as_ref(),
            Class::Admin => self.admin.as_ref(),
        }
    }

    /// Admits one request of `class` from `key`, or answers 429 with the wait.
    pub fn check(&self, class: Class, key: &str) -> Result<(), ApiError> {
        let Some(limit) = self.limit(class) else { return Ok(()) };
        let key = if limit.limiter.len() >= MAX_CALLERS { OVERFLOW_KEY } else { key };
        match limit.limiter.check_key(&key.to_string()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
                metrics::RATE_LIMITED.with_label_values(&[class.as_str()]).inc();
                Err(ApiError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "over the {} rate of {}/s for this caller (rate_limits.{}_per_second); retry in {seconds} s",
                        class.as_str(),
                        limit.per_second,
                        class.as_str()
                    ),
                )
                .with_details(json!({"class": class.as_str(), "limit_per_second": limit.per_second, "retry_after_seconds": seconds}))
                .with_retry_after(seconds))
            }
        }
    }

    fn limiters(&self) -> impl Iterator<Item = &Arc<Keyed>> {
        [&self.read, &self.write, &self.admin].into_iter().flatten().map(|limit| &limit.limiter)
    }
}

/// Drops idle callers from every limiter every [`CLEANUP_INTERVAL`] while `access` lives.
pub fn start_cleanup(access: &Arc<Access>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let weak: Weak<Access> = Arc::downgrade(access);
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(CLEANUP_INTERVAL);
        loop {
            ticks.tick().await;
            let Some(access) = weak.upgrade() else { return };
            let settings = access.settings();
            for limiter in settings.limits.limiters() {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(read: u32, write: u32, admin: u32) -> RateLimitsSection {
        RateLimitsSection { read_per_second: read, write_per_second: write, admin_per_second: admin, burst_seconds: 1 }
    }

    #[test]
    fn a_caller_over_its_rate_gets_429_with_the_wait_and_others_do_not() {
        let limits = RateLimits::new(&section(0, 2, 0));
        assert!(limits.check(Class::Write, "token:a").is_ok());
        assert!(limits.check(Class::Write, "token:a").is_ok());
        let refused = limits.check(Class::Write, "token:a").expect_err("third within a second");
        assert_eq!(refused.code, ErrorCode::RateLimited);
        assert_eq!(refused.retry_after_secs, Some(1));
        assert!(limits.check(Class::Write, "token:b").is_ok(), "another caller has its own bucket");
        for _ in 0..100 {
            assert!(limits.check(Class::Read, "token:a").is_ok(), "reads have no limit here");
        }
    }

    #[test]
    fn a_refused_caller_recovers_after_the_wait() {
        let limits = RateLimits::new(&section(20, 0, 0));
        while limits.check(Class::Read, "addr:10.0.0.1").is_ok() {}
        // One request comes back every 1/20 s: polled, not slept on, within a generous bound.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while limits.check(Class::Read, "addr:10.0.0.1").is_err() {
            assert!(std::time::Instant::now() < deadline, "no request admitted again within 5 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_reload_with_the_same_rates_keeps_the_callers_state() {
        let old = RateLimits::new(&section(0, 1, 0));
        assert!(old.check(Class::Write, "k").is_ok());
        let mut same = RateLimits::new(&section(0, 1, 0));
        same.keep_unchanged(&old);
        assert!(same.check(Class::Write, "k").is_err(), "the bucket carried over");
        let mut changed = RateLimits::new(&section(0, 5, 0));
        changed.keep_unchanged(&old);
        assert!(changed.check(Class::Write, "k").is_ok(), "a new rate starts afresh");
    }
}
