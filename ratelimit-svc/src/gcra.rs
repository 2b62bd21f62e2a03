//! GCRA (generic cell rate algorithm): one timestamp per counter, the "theoretical arrival
//! time" (TAT). A limit of N per period P admits a burst of N, then one every P/N.
//! Chosen over fixed windows because it has no boundary burst (2N across a window edge)
//! and over sliding logs because its state is one number, which keeps memory flat and
//! makes the Redis version a single atomic read-modify-write.

use crate::limit_policy::Limit;

/// Nanoseconds on the store's clock.
pub type Nanos = u64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Requests still admissible right now after this decision.
    pub remaining: u32,
    /// Until the counter is back to a full burst.
    pub reset_after: Nanos,
    /// When denied: until this request would be admitted.
    pub retry_after: Nanos,
}

/// The emission interval and the burst window of a limit: the interval is period / requests
/// rounded *up* to a whole tick, the window `requests × interval`. Rounding the interval down
/// (as this once did) admitted a burst of up to `period / interval` hits, more than `requests`
/// whenever the period is not a multiple of it (181 million a year let 181 million and one
/// through); rounded up, a burst is exactly `requests` and the sustained rate never exceeds
/// `requests` per period (it falls short by under one tick per hit). A limit of 0 is computed
/// as 1 and never admits; `remaining` is capped at the limit for it.
fn interval_and_window(limit: &Limit) -> (Nanos, Nanos) {
    let period = u64::try_from(limit.unit.period().as_nanos()).unwrap_or(u64::MAX);
    let per = u64::from(limit.requests_per_unit.max(1));
    let interval = period.div_ceil(per).max(1);
    (interval, interval.saturating_mul(per))
}

/// Applies `hits` at `now` to a counter whose TAT is `tat` (0 when new).
/// Returns the verdict and the TAT to store (unchanged when denied).
pub fn decide(limit: &Limit, tat: Nanos, now: Nanos, hits: u64) -> (Verdict, Nanos) {
    let (interval, window) = interval_and_window(limit);
    let base = tat.max(now);
    let new_tat = base.saturating_add(interval.saturating_mul(hits));
    let allow_until = now.saturating_add(window);
    if limit.requests_per_unit == 0 || new_tat > allow_until {
        let (retry_after, remaining) = if limit.requests_per_unit == 0 {
            // Nothing is ever admitted: no slot left, and nothing to wait for but a reload.
            (window, 0)
        } else {
            (
                new_tat - allow_until,
                remaining(allow_until, base, interval),
            )
        };
        let verdict = Verdict {
            allowed: false,
            remaining,
            reset_after: base - now,
            retry_after,
        };
        return (verdict, tat);
    }
    let verdict = Verdict {
        allowed: true,
        remaining: remaining(allow_until, new_tat, interval),
        reset_after: new_tat - now,
        retry_after: 0,
    };
    (verdict, new_tat)
}

/// Consumes `hits` whatever is left: a debit of what was already used (tokens counted at
/// stream end) is never refused; it pushes later admissions back instead.
pub fn debit(limit: &Limit, tat: Nanos, now: Nanos, hits: u64) -> (Verdict, Nanos) {
    let (interval, window) = interval_and_window(limit);
    let new_tat = if hits == 0 {
        tat
    } else {
        tat.max(now).saturating_add(interval.saturating_mul(hits))
    };
    let verdict = Verdict {
        allowed: true,
        remaining: remaining(now.saturating_add(window), new_tat.max(now), interval)
            .min(limit.requests_per_unit),
        reset_after: new_tat.saturating_sub(now),
        retry_after: 0,
    };
    (verdict, new_tat)
}

/// Gives `hits` back (Envoy's `is_negative_hits`, a refund of a reservation): moves the
/// TAT back, never below `now`, so a refund restores at most a full burst and never
/// consumes. Always allowed. Returns the verdict and the TAT to store.
pub fn refund(limit: &Limit, tat: Nanos, now: Nanos, hits: u64) -> (Verdict, Nanos) {
    let (interval, window) = interval_and_window(limit);
    // A counter already back to full has nothing to give back; keep it as stored so a
    // refund on an idle counter writes nothing.
    let new_tat = if tat <= now {
        tat
    } else {
        tat.saturating_sub(interval.saturating_mul(hits)).max(now)
    };
    let verdict = Verdict {
        allowed: true,
        remaining: remaining(now.saturating_add(window), new_tat.max(now), interval)
            .min(limit.requests_per_unit),
        reset_after: new_tat.saturating_sub(now),
        retry_after: 0,
    };
    (verdict, new_tat)
}

fn remaining(allow_until: Nanos, tat: Nanos, interval: Nanos) -> u32 {
    u32::try_from(allow_until.saturating_sub(tat) / interval).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod debit_tests {
    use super::*;
    use crate::limit_policy::Unit;

    #[test]
    fn debit_consumes_past_the_limit_and_never_denies() {
        let l = Limit {
            requests_per_unit: 10,
            unit: Unit::Minute,
        };
        let now = 1_000_000_000_000;
        let (v, tat) = debit(&l, 0, now, 25);
        assert!(v.allowed);
        assert_eq!(v.remaining, 0);
        // 15 over the burst: the next single hit waits 15 intervals (6 s each) plus one.
        let (v, _) = decide(&l, tat, now, 1);
        assert!(!v.allowed);
        assert_eq!(v.retry_after, 16 * 6_000_000_000);
        assert_eq!(debit(&l, tat, now, 0).1, tat, "0 only reads");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit_policy::Unit;

    const SEC: Nanos = 1_000_000_000;

    fn per_minute(n: u32) -> Limit {
        Limit {
            requests_per_unit: n,
            unit: Unit::Minute,
        }
    }

    #[test]
    fn burst_of_n_then_denied_with_retry_after() {
        let l = per_minute(3);
        let now = 1_000 * SEC;
        let mut tat = 0;
        let mut remaining = vec![];
        for _ in 0..3 {
            let (v, t) = decide(&l, tat, now, 1);
            assert!(v.allowed);
            remaining.push(v.remaining);
            tat = t;
        }
        assert_eq!(remaining, vec![2, 1, 0]);
        let (v, t) = decide(&l, tat, now, 1);
        assert!(!v.allowed);
        assert_eq!(t, tat, "a denied request must not consume");
        assert_eq!(v.retry_after, 20 * SEC);
        assert_eq!(v.reset_after, 60 * SEC);
    }

    #[test]
    fn one_request_is_readmitted_after_one_interval() {
        let l = per_minute(3);
        let mut tat = 0;
        for _ in 0..3 {
            tat = decide(&l, tat, 0, 1).1;
        }
        assert!(!decide(&l, tat, 19 * SEC, 1).0.allowed);
        let (v, _) = decide(&l, tat, 20 * SEC, 1);
        assert!(v.allowed);
        assert_eq!(v.remaining, 0);
    }

    #[test]
    fn hits_addend_consumes_several_and_zero_hits_only_reads() {
        let l = per_minute(10);
        let (v, tat) = decide(&l, 0, 0, 4);
        assert!(v.allowed);
        assert_eq!(v.remaining, 6);
        let (v, tat2) = decide(&l, tat, 0, 0);
        assert!(v.allowed);
        assert_eq!(v.remaining, 6);
        assert_eq!(tat, tat2);
        assert!(!decide(&l, tat, 0, 7).0.allowed);
    }

    #[test]
    fn refund_gives_back_but_never_beyond_a_full_burst() {
        let l = per_minute(10);
        let now = 500 * SEC;
        let (_, tat) = decide(&l, 0, now, 4);
        let (v, tat) = refund(&l, tat, now, 2);
        assert!(v.allowed);
        assert_eq!(v.remaining, 8);
        let (v, tat) = refund(&l, tat, now, 100);
        assert_eq!(v.remaining, 10);
        assert_eq!(tat, now);
        // On an idle counter a refund changes nothing.
        let (v, t) = refund(&l, 0, now, 3);
        assert_eq!((v.remaining, t), (10, 0));
    }

    #[test]
    fn zero_limit_denies_everything() {
        let (v, _) = decide(&per_minute(0), 0, 0, 1);
        assert!(!v.allowed);
        assert_eq!(v.retry_after, 60 * SEC);
        assert_eq!(v.remaining, 0);
        assert_eq!(debit(&per_minute(0), 0, 0, 1).0.remaining, 0);
        assert_eq!(refund(&per_minute(0), 0, 0, 1).0.remaining, 0);
    }

    /// Found by `an_idle_counter_admits_a_burst_of_hits_exactly_up_to_the_limit`
    /// (tests/properties.rs): with the interval rounded down, a period that is not a multiple
    /// of the limit admitted more than the limit at once.
    #[test]
    fn burst_is_exactly_the_limit_when_the_period_is_not_a_multiple_of_it() {
        let year = Limit {
            requests_per_unit: 180_843_311,
            unit: Unit::Year,
        };
        let now = 1_536_266_132_701_579_063;
        assert!(!decide(&year, 0, now, 180_843_312).0.allowed);
        let (v, _) = decide(&year, 0, now, 180_843_311);
        assert!(v.allowed);
        assert_eq!(v.remaining, 0);

        let per_second = Limit {
            requests_per_unit: 99_441_494,
            unit: Unit::Second,
        };
        let (v, _) = decide(&per_second, 0, now, 0);
        assert_eq!(v.remaining, 99_441_494, "remaining never exceeds the limit");
        assert!(!decide(&per_second, 0, now, 99_441_495).0.allowed);

        // 7 a minute: 7 single hits pass at once, the 8th waits.
        let l = per_minute(7);
        let mut tat = 0;
        for _ in 0..7 {
            let (v, t) = decide(&l, tat, now, 1);
            assert!(v.allowed);
            tat = t;
        }
        assert!(!decide(&l, tat, now, 1).0.allowed);
    }
}
