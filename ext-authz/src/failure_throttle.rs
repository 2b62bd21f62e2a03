//! Counts authentication failures per subject (a source address, or a source address and
//! a key prefix) in a fixed window, so a guessing source is refused before any hashing
//! until its window ends. Subjects are chosen by the caller so that one source's failures
//! never count against another source (see `decision::Authorizer`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct FailureThrottle {
    window: Duration,
    counts: Mutex<HashMap<String, (Instant, u32)>>,
}

const MAX_TRACKED: usize = 100_000;

impl FailureThrottle {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `subject` has had `max` failures in the current window.
    pub fn is_blocked(&self, subject: &str, max: u32) -> bool {
        let map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        map.get(subject)
            .is_some_and(|(start, n)| start.elapsed() < self.window && *n >= max)
    }

    pub fn record_failure(&self, subject: &str) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(subject) {
            let w = self.window;
            map.retain(|_, (s, _)| s.elapsed() < w);
            // Still full inside one window: keep the counts (and blocks) already made
            // rather than forget them; the argon2 budget bounds the untracked rest.
            if map.len() >= MAX_TRACKED {
                return;
            }
        }
        let e = map
            .entry(subject.to_string())
            .or_insert((Instant::now(), 0));
        if e.0.elapsed() >= self.window {
            *e = (Instant::now(), 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_failures_within_window_only_for_that_subject() {
        let t = FailureThrottle::new(Duration::from_secs(60));
        for _ in 0..2 {
            t.record_failure("ip:1.2.3.4");
        }
        assert!(!t.is_blocked("ip:1.2.3.4", 3));
        t.record_failure("ip:1.2.3.4");
        assert!(t.is_blocked("ip:1.2.3.4", 3));
        assert!(!t.is_blocked("ip:5.6.7.8", 3));
    }

    #[test]
    fn window_end_unblocks() {
        let t = FailureThrottle::new(Duration::from_millis(30));
        t.record_failure("p");
        assert!(t.is_blocked("p", 1));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!t.is_blocked("p", 1));
    }
}
