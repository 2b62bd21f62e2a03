//! Owns when and what the filter polls to learn which models are served: one list endpoint
//! per source (one model server, or each routed backend), quick ticks until every source
//! answered once, then the configured interval; a poll still in flight is not repeated.
//! Written against [`Poller`] so it runs natively; the proxy-wasm root context implements it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::Config;
use crate::discovery::{ModelSet, Served};

/// Ticks before every source has answered once.
pub const FIRST_TICK: Duration = Duration::from_millis(200);

/// The host calls polling needs.
pub trait Poller {
    /// Starts `GET path` on `cluster`; the call's token, or why it could not start.
    fn dispatch(&mut self, cluster: &str, path: &str, timeout: Duration) -> Result<u32, String>;
    fn set_tick_period(&mut self, period: Duration);
    fn log_info(&self, message: &str);
    fn log_warn(&self, message: &str);
}

/// One list endpoint to poll: the source name it is stored under, cluster, path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    source: String,
    cluster: String,
    path: String,
}

#[derive(Debug, Default)]
pub struct Schedule {
    targets: Vec<Target>,
    /// (interval, timeout) in ms; `None` when nothing is discovered.
    timing: Option<(u64, u64)>,
    /// Polls in flight (token → target index), so ticks do not pile calls up.
    pending: BTreeMap<u32, usize>,
    /// Every target has answered once: ticks slow down to the configured interval.
    settled: bool,
}

impl Schedule {
    pub fn new(config: &Config) -> Self {
        let (targets, timing) = match (&config.routing, &config.discovery) {
            (Some(r), _) => (
                r.discovery_targets()
                    .map(|(source, cluster, path)| Target {
                        source: source.to_owned(),
                        cluster: cluster.to_owned(),
                        path: path.to_owned(),
                    })
                    .collect(),
                Some((r.interval_ms, r.timeout_ms)),
            ),
            (None, Some(d)) => (
                vec![Target {
                    source: Served::SINGLE.to_owned(),
                    cluster: d.cluster.clone(),
                    path: d.path.clone(),
                }],
                Some((d.interval_ms, d.timeout_ms)),
            ),
            (None, None) => (Vec::new(), None),
        };
        Schedule {
            targets,
            timing,
            ..Schedule::default()
        }
    }

    /// Starts ticking when there is anything to poll.
    pub fn start(&self, poller: &mut impl Poller) {
        if !self.targets.is_empty() {
            poller.set_tick_period(FIRST_TICK);
        }
    }

    /// A tick: polls every target that has no call in flight.
    pub fn on_tick(&mut self, poller: &mut impl Poller) {
        let Some((_, timeout_ms)) = self.timing else {
            return;
        };
        for (i, t) in self.targets.iter().enumerate() {
            if self.pending.values().any(|&p| p == i) {
                continue;
            }
            match poller.dispatch(&t.cluster, &t.path, Duration::from_millis(timeout_ms)) {
                Ok(token) => {
                    self.pending.insert(token, i);
                }
                Err(e) => poller.log_warn(&format!(
                    "tollgate: model discovery call to {} failed: {e}",
                    t.cluster
                )),
            }
        }
    }

    /// A poll's answer: a 200 with a model list replaces that source's served set.
    pub fn on_response(
        &mut self,
        poller: &mut impl Poller,
        token: u32,
        status: Option<&str>,
        body: &[u8],
        served: &mut Served,
    ) {
        let Some(target) = self
            .pending
            .remove(&token)
            .and_then(|i| self.targets.get(i))
        else {
            return;
        };
        if status != Some("200") {
            poller.log_warn(&format!(
                "tollgate: model discovery from {} got status {status:?}",
                target.cluster
            ));
            return;
        }
        let set = match ModelSet::parse(body) {
            Ok(set) => set,
            Err(e) => {
                poller.log_warn(&format!(
                    "tollgate: model discovery from {}: {e}",
                    target.cluster
                ));
                return;
            }
        };
        if !served.knows(&target.source) {
            poller.log_info(&format!(
                "tollgate: {} models served by {}",
                set.len(),
                target.cluster
            ));
        }
        served.insert(&target.source, set);
        let all = self.targets.iter().all(|t| served.knows(&t.source));
        if all && !self.settled {
            self.settled = true;
            if let Some((interval_ms, _)) = self.timing {
                poller.set_tick_period(Duration::from_millis(interval_ms));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct FakePoller {
        calls: Vec<(String, String, Duration)>,
        ticks: Vec<Duration>,
        refuse: bool,
        warnings: RefCell<Vec<String>>,
    }

    impl Poller for FakePoller {
        fn dispatch(
            &mut self,
            cluster: &str,
            path: &str,
            timeout: Duration,
        ) -> Result<u32, String> {
            if self.refuse {
                return Err("BadArgument".into());
            }
            self.calls.push((cluster.into(), path.into(), timeout));
            Ok(self.calls.len() as u32)
        }
        fn set_tick_period(&mut self, period: Duration) {
            self.ticks.push(period);
        }
        fn log_info(&self, _: &str) {}
        fn log_warn(&self, message: &str) {
            self.warnings.borrow_mut().push(message.into());
        }
    }

    fn config(json: &str) -> Config {
        Config::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn nothing_to_discover_never_ticks() {
        let mut p = FakePoller::default();
        let mut s = Schedule::new(&Config::default());
        s.start(&mut p);
        s.on_tick(&mut p);
        assert!(p.ticks.is_empty() && p.calls.is_empty());
    }

    #[test]
    fn polls_quickly_until_answered_then_at_the_interval_without_piling_up() {
        let cfg = config(
            r#"{"discovery":{"cluster":"model","path":"/api/tags","interval_ms":5000,"timeout_ms":700}}"#,
        );
        let mut p = FakePoller::default();
        let mut s = Schedule::new(&cfg);
        s.start(&mut p);
        assert_eq!(p.ticks, [FIRST_TICK]);
        s.on_tick(&mut p);
        s.on_tick(&mut p);
        assert_eq!(
            p.calls,
            [(
                "model".into(),
                "/api/tags".into(),
                Duration::from_millis(700)
            )],
            "a poll in flight is not repeated"
        );
        let mut served = Served::default();
        s.on_response(&mut p, 1, Some("503"), b"", &mut served);
        assert!(!served.knows(Served::SINGLE));
        assert_eq!(p.warnings.borrow().len(), 1);
        s.on_tick(&mut p);
        s.on_response(
            &mut p,
            2,
            Some("200"),
            br#"{"models":[{"name":"llama3.1:8b"}]}"#,
            &mut served,
        );
        assert!(served.single().unwrap().contains("llama3.1:8b"));
        assert_eq!(p.ticks, [FIRST_TICK, Duration::from_millis(5000)]);
        // An unknown token (a call from before a reconfiguration) changes nothing.
        s.on_response(&mut p, 99, Some("200"), br#"{"models":[]}"#, &mut served);
        assert!(served.single().unwrap().contains("llama3.1:8b"));
    }

    #[test]
    fn a_refused_dispatch_is_logged_and_retried_next_tick() {
        let cfg = config(r#"{"discovery":{"cluster":"model","path":"/v1/models"}}"#);
        let mut p = FakePoller {
            refuse: true,
            ..FakePoller::default()
        };
        let mut s = Schedule::new(&cfg);
        s.on_tick(&mut p);
        assert_eq!(p.warnings.borrow().len(), 1);
        p.refuse = false;
        s.on_tick(&mut p);
        assert_eq!(p.calls.len(), 1);
    }
}
