//! Property tests for what the rate-limit service parses and computes on every request:
//! the descriptor configuration (envoyproxy/ratelimit's YAML) and its matcher, the GCRA
//! arithmetic, the counter key layout, and one limiter decision over a store.
//!
//! Each property runs a bounded number of cases (see `cases`); `PROPTEST_CASES=100000`
//! runs them longer (docs/TESTING.md).
// Test helpers outside #[test] functions (the shared `support` launchers) may panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_yaml::{Mapping, Value};
use support::{Redis, TempDir};
use tollgate_ratelimit::counter_store::{
    redis_keys, CounterStore, Hit, HitMode, MemoryStore, RedisStore, StoreError,
};
use tollgate_ratelimit::descriptor_config::{Config, Rule};
use tollgate_ratelimit::gcra::{self, Nanos, Verdict};
use tollgate_ratelimit::limit_policy::{Limit, Unit};
use tollgate_ratelimit::limiter::{self, Descriptor, Outcome, Phase};

/// `n` cases, unless `PROPTEST_CASES` asks for another number: `with_cases` alone would
/// override the environment variable that `ProptestConfig::default()` reads.
/// Failures are not written to a regressions file: each bug a property found is pinned by a
/// named unit test beside the code instead.
fn cases(n: u32) -> ProptestConfig {
    let mut config = if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(n)
    };
    config.failure_persistence = None;
    config
}

const UNITS: [Unit; 7] = [
    Unit::Second,
    Unit::Minute,
    Unit::Hour,
    Unit::Day,
    Unit::Week,
    Unit::Month,
    Unit::Year,
];

fn unit() -> impl Strategy<Value = Unit> {
    prop::sample::select(UNITS.to_vec())
}

fn period(unit: Unit) -> u64 {
    u64::try_from(unit.period().as_nanos()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------
// Descriptor configuration: a model of envoyproxy/ratelimit's format, its YAML, and a
// reference matcher written from the format's documentation.

const KEYS: [&str; 4] = ["tenant_id", "key_id", "phase", "k"];
/// `""` is a key-only entry; "42" and "true" are also written as YAML number and bool.
const VALUES: [&str; 6] = ["", "acme", "tokens_est", "42", "true", "x"];
const NAMES: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
struct RefLimit {
    /// `None`: `unlimited: true`.
    limit: Option<Limit>,
    /// How the unit is spelled (the format takes any case).
    unit_spelling: String,
    name: Option<String>,
    replaces: Vec<String>,
}

#[derive(Debug, Clone)]
struct RefDesc {
    key: String,
    value: String,
    /// 0: a YAML string, 1: a plain scalar (number or bool) where the value reads as one.
    value_style: u8,
    rate_limit: Option<RefLimit>,
    shadow_mode: bool,
    /// Write `shadow_mode: false` and `detailed_metric` explicitly.
    verbose: bool,
    children: Vec<RefDesc>,
}

impl RefDesc {
    fn rule(&self) -> Option<Rule> {
        self.rate_limit.as_ref().map(|rl| Rule {
            limit: rl.limit,
            name: rl.name.clone(),
            replaces: rl.replaces.clone(),
            shadow_mode: self.shadow_mode,
        })
    }

    fn to_yaml(&self) -> Value {
        let mut m = Mapping::new();
        m.insert("key".into(), self.key.clone().into());
        if !self.value.is_empty() {
            let value = match (self.value_style, self.value.as_str()) {
                (1, "42") => Value::Number(42.into()),
                (1, "true") => Value::Bool(true),
                _ => Value::String(self.value.clone()),
            };
            m.insert("value".into(), value);
        }
        if let Some(rl) = &self.rate_limit {
            let mut r = Mapping::new();
            match rl.limit {
                None => {
                    r.insert("unlimited".into(), true.into());
                }
                Some(limit) => {
                    r.insert("unit".into(), rl.unit_spelling.clone().into());
                    r.insert(
                        "requests_per_unit".into(),
                        Value::Number(limit.requests_per_unit.into()),
                    );
                }
            }
            if let Some(name) = &rl.name {
                r.insert("name".into(), name.clone().into());
            }
            if !rl.replaces.is_empty() {
                let list = rl
                    .replaces
                    .iter()
                    .map(|n| {
                        let mut e = Mapping::new();
                        e.insert("name".into(), n.clone().into());
                        Value::Mapping(e)
                    })
                    .collect();
                r.insert("replaces".into(), Value::Sequence(list));
            }
            m.insert("rate_limit".into(), Value::Mapping(r));
        }
        if self.shadow_mode || self.verbose {
            m.insert("shadow_mode".into(), self.shadow_mode.into());
        }
        if self.verbose {
            m.insert("detailed_metric".into(), true.into());
        }
        if !self.children.is_empty() {
            let list = self.children.iter().map(RefDesc::to_yaml).collect();
            m.insert("descriptors".into(), Value::Sequence(list));
        }
        Value::Mapping(m)
    }
}

fn ref_limit() -> impl Strategy<Value = RefLimit> {
    let spelling = |u: Unit, style: u8| match style {
        0 => u.name().to_owned(),
        1 => u.name().to_uppercase(),
        _ => {
            let mut s = u.name().to_owned();
            s[..1].make_ascii_uppercase();
            s
        }
    };
    (
        prop::option::weighted(0.85, (unit(), any::<u32>(), 0u8..3)),
        prop::option::of(prop::sample::select(NAMES.to_vec())),
        prop::sample::subsequence(NAMES.to_vec(), 0..=2),
    )
        .prop_map(move |(limited, name, replaces)| {
            let (limit, unit_spelling) = match limited {
                Some((u, n, style)) => (
                    Some(Limit {
                        requests_per_unit: n,
                        unit: u,
                    }),
                    spelling(u, style),
                ),
                None => (None, String::new()),
            };
            let replaces = replaces
                .into_iter()
                .filter(|r| Some(*r) != name)
                .map(str::to_owned)
                .collect();
            RefLimit {
                limit,
                unit_spelling,
                name: name.map(str::to_owned),
                replaces,
            }
        })
}

/// One level of descriptors, `depth` more levels below; (key, value) pairs are unique per
/// level as the format requires.
fn ref_level(depth: u32) -> BoxedStrategy<Vec<RefDesc>> {
    let children = if depth == 0 {
        Just(Vec::new()).boxed()
    } else {
        prop_oneof![2 => Just(Vec::new()), 1 => ref_level(depth - 1)].boxed()
    };
    let desc = (
        prop::sample::select(KEYS.to_vec()),
        prop::sample::select(VALUES.to_vec()),
        0u8..2,
        prop::option::weighted(0.7, ref_limit()),
        prop::bool::weighted(0.2),
        any::<bool>(),
        children,
    )
        .prop_map(
            |(key, value, value_style, rate_limit, shadow_mode, verbose, children)| RefDesc {
                key: key.to_owned(),
                value: value.to_owned(),
                value_style,
                rate_limit,
                shadow_mode,
                verbose,
                children,
            },
        );
    prop::collection::vec(desc, 0..6)
        .prop_map(|mut level| {
            let mut seen = Vec::new();
            level.retain(|d| {
                let id = (d.key.clone(), d.value.clone());
                let fresh = !seen.contains(&id);
                seen.push(id);
                fresh
            });
            level
        })
        .boxed()
}

#[derive(Debug, Clone)]
struct RefConfig {
    /// Domain, its descriptors, and which of two files it is written to.
    domains: Vec<(String, Vec<RefDesc>, bool)>,
}

impl RefConfig {
    /// The YAML sources: two files, each with its domains as `---`-separated documents.
    fn sources(&self) -> Vec<(String, String)> {
        let mut files = vec![
            ("one.yaml".to_owned(), String::new()),
            ("two.yaml".to_owned(), String::new()),
        ];
        for (domain, descriptors, second) in &self.domains {
            let mut root = Mapping::new();
            root.insert("domain".into(), domain.clone().into());
            root.insert(
                "descriptors".into(),
                Value::Sequence(descriptors.iter().map(RefDesc::to_yaml).collect()),
            );
            let text = serde_yaml::to_string(&Value::Mapping(root)).unwrap_or_default();
            let file = &mut files[usize::from(*second)].1;
            if !file.is_empty() {
                file.push_str("---\n");
            }
            file.push_str(&text);
        }
        files.retain(|(_, text)| !text.is_empty());
        files
    }

    /// The reference matcher: at each level an entry with the request's key and value, else
    /// one with its key and no value; the rule of the entry the last request entry reached.
    fn find(&self, domain: &str, entries: &[(&str, &str)]) -> Option<Rule> {
        let (_, top, _) = self.domains.iter().find(|(d, _, _)| d == domain)?;
        let mut level: &[RefDesc] = top;
        let mut reached = None;
        for (key, value) in entries {
            let node = level
                .iter()
                .find(|d| d.key == *key && !d.value.is_empty() && d.value == *value)
                .or_else(|| level.iter().find(|d| d.key == *key && d.value.is_empty()))?;
            reached = Some(node);
            level = &node.children;
        }
        reached?.rule()
    }
}

fn ref_config() -> impl Strategy<Value = RefConfig> {
    prop::collection::vec(
        (
            prop::sample::select(vec!["tollgate", "d", "other"]),
            ref_level(3),
            any::<bool>(),
        ),
        1..4,
    )
    .prop_map(|domains| {
        let mut seen = Vec::new();
        let domains = domains
            .into_iter()
            .filter(|(d, _, _)| {
                let fresh = !seen.contains(d);
                seen.push(*d);
                fresh
            })
            .map(|(d, level, second)| (d.to_owned(), level, second))
            .collect();
        RefConfig { domains }
    })
}

/// Request descriptors: mostly the configuration's vocabulary, sometimes unknown.
fn query() -> impl Strategy<Value = (String, Vec<(String, String)>)> {
    let key = prop_oneof![
        9 => prop::sample::select(KEYS.to_vec()),
        1 => Just("zz"),
    ];
    let value = prop_oneof![
        9 => prop::sample::select(VALUES.to_vec()),
        1 => Just("nope"),
    ];
    (
        prop::sample::select(vec!["tollgate", "d", "other", "unknown"]),
        prop::collection::vec((key, value), 0..5),
    )
        .prop_map(|(domain, entries)| {
            (
                domain.to_owned(),
                entries
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            )
        })
}

fn borrowed(entries: &[(String, String)]) -> Vec<(&str, &str)> {
    entries
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Text that looks like YAML: the format's words, indentation, flow and block syntax,
/// anchors, tags and numbers, in any order.
fn yamlish() -> impl Strategy<Value = String> {
    const PIECES: &[&str] = &[
        "domain: d\n",
        "domain: ",
        "descriptors:\n",
        "descriptors: ",
        "  - key: k\n",
        "- key: ",
        "    value: ",
        "rate_limit: {unit: minute, requests_per_unit: 1}",
        "rate_limit:\n",
        "unit: ",
        "requests_per_unit: ",
        "unlimited: true",
        "shadow_mode: ",
        "replaces: [{name: a}]",
        "name: ",
        "[",
        "]",
        "{",
        "}",
        ", ",
        "- ",
        ": ",
        "---\n",
        "...\n",
        "&a ",
        "*a",
        "!!str ",
        "!!binary ",
        "!custom ",
        "<<: *a\n",
        "\n",
        "  ",
        "\t",
        "1e99",
        "-1",
        "4294967296",
        "0x1F",
        "null",
        "~",
        "'",
        "\"",
        "\\u0000",
        "|\n",
        ">-\n",
        "? ",
        "#",
        "%YAML 1.2\n",
        "\u{FEFF}",
        "\r",
        "\0",
    ];
    prop::collection::vec(
        prop_oneof![
            8 => prop::sample::select(PIECES.to_vec()).prop_map(str::to_owned),
            1 => "[a-z0-9]{1,6}",
            1 => any::<String>(),
        ],
        0..40,
    )
    .prop_map(|pieces| pieces.concat())
}

/// A YAML value tree using the format's field names at any place and type.
fn yaml_tree() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "domain",
            "descriptors",
            "key",
            "value",
            "rate_limit",
            "unit",
            "requests_per_unit",
            "unlimited",
            "name",
            "replaces",
            "shadow_mode",
            "detailed_metric",
        ])
        .prop_map(str::to_owned),
        "[a-z]{1,4}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<u64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|n| Value::Number(n.into())),
        prop::sample::select(vec!["minute", "SECOND", "fortnight", "", "d", "k"])
            .prop_map(|s| Value::String(s.to_owned())),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Sequence),
            prop::collection::vec((key.clone(), inner), 0..6).prop_map(|members| {
                Value::Mapping(
                    members
                        .into_iter()
                        .map(|(k, v)| (Value::String(k), v))
                        .collect(),
                )
            }),
        ]
    })
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn arbitrary_text_never_panics_the_descriptor_config_loader(text in any::<String>()) {
        let _ = Config::from_yaml(&text);
    }

    #[test]
    fn yaml_shaped_text_never_panics_the_descriptor_config_loader(text in yamlish()) {
        let _ = Config::from_yaml(&text);
    }

    #[test]
    fn yaml_trees_with_the_format_s_field_names_never_panic_the_loader(
        trees in prop::collection::vec(yaml_tree(), 1..3),
    ) {
        let text = trees
            .iter()
            .map(|t| serde_yaml::to_string(t).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("---\n");
        if let Ok(config) = Config::from_yaml(&text) {
            // Whatever loaded can be queried.
            for domain in config.domain_names() {
                let _ = config.find(domain, &[("key", "value")]);
            }
        }
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn find_equals_the_reference_matcher_on_valid_configurations(
        reference in ref_config(),
        queries in prop::collection::vec(query(), 1..24),
    ) {
        let sources = reference.sources();
        let config = Config::parse(&sources);
        prop_assert!(config.is_ok(), "valid configuration refused: {:?}\n{sources:?}", config.err());
        let Ok(config) = config else { unreachable!() };
        let mut names: Vec<&str> = reference.domains.iter().map(|(d, _, _)| d.as_str()).collect();
        names.sort_unstable();
        prop_assert_eq!(config.domain_names(), names);
        // Every path the configuration holds, then the random queries.
        let mut all = queries;
        for (domain, level, _) in &reference.domains {
            let mut stack: Vec<(&RefDesc, Vec<(String, String)>)> =
                level.iter().map(|d| (d, Vec::new())).collect();
            while let Some((d, mut path)) = stack.pop() {
                let value = if d.value.is_empty() { "any".to_owned() } else { d.value.clone() };
                path.push((d.key.clone(), value));
                for c in &d.children {
                    stack.push((c, path.clone()));
                }
                all.push((domain.clone(), path));
            }
        }
        for (domain, entries) in &all {
            let entries = borrowed(entries);
            let got = config.find(domain, &entries).cloned();
            let want = reference.find(domain, &entries);
            prop_assert_eq!(got, want, "domain {} entries {:?}", domain, entries);
        }
    }

    #[test]
    fn a_repeated_composite_key_is_refused(
        reference in ref_config(),
        pick in any::<prop::sample::Index>(),
    ) {
        // Duplicate one top-level entry of the first domain that has one.
        let mut reference = reference;
        let Some((_, level, _)) = reference.domains.iter_mut().find(|(_, l, _)| !l.is_empty())
        else {
            return Ok(());
        };
        let copy = level[pick.index(level.len())].clone();
        level.push(copy);
        let err = Config::parse(&reference.sources()).map(|_| ()).err();
        prop_assert!(
            err.as_ref().is_some_and(|e| e.to_string().contains("duplicate descriptor composite key")),
            "{err:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// GCRA arithmetic.

fn limit() -> impl Strategy<Value = Limit> {
    (any::<u32>(), unit()).prop_map(|(n, u)| Limit {
        requests_per_unit: n,
        unit: u,
    })
}

/// Limits with at least one request, weighted towards sizes people configure, but covering
/// every `u32`.
fn positive_limit() -> impl Strategy<Value = Limit> {
    (
        prop_oneof![1u32..=100, 1u32..=100_000_000, 1u32..=u32::MAX],
        unit(),
    )
        .prop_map(|(n, u)| Limit {
            requests_per_unit: n,
            unit: u,
        })
}

/// Hits: small, around the limit, or anything.
fn hits_for(n: u32) -> impl Strategy<Value = u64> {
    let n = u64::from(n);
    prop_oneof![
        3 => 0u64..=3,
        3 => n.saturating_sub(2)..=n.saturating_add(2),
        2 => 0..=n.saturating_mul(2),
        1 => any::<u64>(),
    ]
}

/// Clock readings with room for a few years of periods, as the stores' clocks have
/// (nanoseconds since the store started, or since 1970).
const CLOCK_MAX: u64 = 1 << 62;

proptest! {
    #![proptest_config(cases(2048))]

    #[test]
    fn gcra_never_panics_and_keeps_its_verdicts_consistent(
        l in limit(),
        tat in any::<u64>(),
        now in any::<u64>(),
        hits in any::<u64>(),
    ) {
        let n = l.requests_per_unit;
        let (v, new_tat) = gcra::decide(&l, tat, now, hits);
        prop_assert!(v.remaining <= n, "{v:?}");
        if v.allowed {
            prop_assert_eq!(v.retry_after, 0);
            prop_assert!(new_tat >= tat.max(now));
        } else {
            prop_assert_eq!(new_tat, tat, "a denied hit must not consume");
            prop_assert!(v.retry_after > 0, "{v:?}");
        }

        let (v, debited) = gcra::debit(&l, tat, now, hits);
        prop_assert!(v.allowed, "a debit is never refused");
        prop_assert!(v.remaining <= n, "{v:?}");
        prop_assert!(hits == 0 && debited == tat || debited >= tat.max(now));

        let (v, refunded) = gcra::refund(&l, tat, now, hits);
        prop_assert!(v.allowed);
        prop_assert!(v.remaining <= n, "{v:?}");
        prop_assert!(refunded <= tat, "a refund never consumes");
        prop_assert!(refunded >= now.min(tat), "a refund never goes below now");
    }

    #[test]
    fn an_idle_counter_admits_a_burst_of_hits_exactly_up_to_the_limit(
        (l, hits) in positive_limit().prop_flat_map(|l| (Just(l), hits_for(l.requests_per_unit))),
        idle_tat in 0..CLOCK_MAX,
        now in 0..CLOCK_MAX,
    ) {
        // A counter that is back to a full burst: never used, or its TAT passed.
        let tat = idle_tat.min(now);
        let (v, _) = gcra::decide(&l, tat, now, hits);
        prop_assert_eq!(
            v.allowed,
            hits <= u64::from(l.requests_per_unit),
            "{:?}: {} hits at once gave {:?}", l, hits, v
        );
        if v.allowed {
            prop_assert_eq!(u64::from(v.remaining), u64::from(l.requests_per_unit) - hits);
        }
    }

    #[test]
    fn n_single_hits_at_one_instant_are_all_admitted_and_one_more_is_not(
        n in 1u32..=64,
        u in unit(),
        now in 0..CLOCK_MAX,
    ) {
        let l = Limit { requests_per_unit: n, unit: u };
        let mut tat = 0;
        for i in 0..n {
            let (v, t) = gcra::decide(&l, tat, now, 1);
            prop_assert!(v.allowed, "hit {} of {} refused", i + 1, n);
            prop_assert_eq!(v.remaining, n - i - 1);
            tat = t;
        }
        prop_assert!(!gcra::decide(&l, tat, now, 1).0.allowed);
    }
}

/// One request in a sequence: time since the previous one, and its hits.
fn timeline(l: Limit) -> impl Strategy<Value = Vec<(u64, u64)>> {
    let p = period(l.unit);
    let gap = prop_oneof![
        3 => Just(0u64),
        3 => 0..=p / 8,
        2 => 0..=p * 2,
        1 => any::<u64>().prop_map(|g| g % (CLOCK_MAX / 64)),
    ];
    prop::collection::vec((gap, hits_for(l.requests_per_unit)), 1..64)
}

/// The ideal GCRA, in exact arithmetic (time scaled by N, so P/N needs no rounding): a hit
/// of `h` at `now` is admitted when the counter, drained at N per P and never below empty,
/// has room for `h` under a capacity of N.
struct IdealGcra {
    n: u128,
    p: u128,
    /// Theoretical arrival time × N.
    tat: u128,
}

impl IdealGcra {
    fn new(l: &Limit) -> Self {
        IdealGcra {
            n: u128::from(l.requests_per_unit),
            p: u128::from(period(l.unit)),
            tat: 0,
        }
    }

    fn decide(&mut self, now: u64, hits: u64) -> bool {
        let now = u128::from(now) * self.n;
        let base = self.tat.max(now);
        let new_tat = base + u128::from(hits) * self.p;
        let allowed = self.n > 0 && new_tat <= now + self.p * self.n;
        if allowed {
            self.tat = new_tat;
        }
        allowed
    }
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn admitted_hits_never_exceed_a_burst_of_n_plus_n_per_period(
        (l, steps) in positive_limit().prop_flat_map(|l| (Just(l), timeline(l))),
        start in 0..CLOCK_MAX / 2,
    ) {
        // Over any span [a, b] between admissions a counter of N per P admits at most
        // N (a full burst) plus N × (b - a) / P (what drained meanwhile).
        let n = u128::from(l.requests_per_unit);
        let p = u128::from(period(l.unit));
        let mut now = start;
        let mut tat = 0;
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        for (gap, hits) in steps {
            now = now.saturating_add(gap).min(CLOCK_MAX);
            let (v, t) = gcra::decide(&l, tat, now, hits);
            if v.allowed {
                tat = t;
                if hits > 0 {
                    admitted.push((now, hits));
                }
            }
        }
        for i in 0..admitted.len() {
            let mut sum: u128 = 0;
            for j in i..admitted.len() {
                sum += u128::from(admitted[j].1);
                let span = u128::from(admitted[j].0 - admitted[i].0);
                prop_assert!(
                    sum * p <= n * (span + p),
                    "{:?}: {} hits admitted over {} ns (admissions {:?})",
                    l, sum, span, &admitted[i..=j]
                );
            }
        }
    }

    #[test]
    fn gcra_decisions_equal_the_ideal_gcra_when_n_divides_the_period(
        i in 0u32..=9,
        j in 0u32..=9,
        u in unit(),
        steps in prop::collection::vec((0u64..=3_000_000_000, 0u64..=1_200), 1..64),
        start in 0..CLOCK_MAX / 2,
    ) {
        // Every period is a whole number of seconds, so any divisor of 10^9 divides it and
        // the emission interval P/N is exact: no rounding either way.
        let n = 2u32.pow(i) * 5u32.pow(j);
        let l = Limit { requests_per_unit: n, unit: u };
        let mut ideal = IdealGcra::new(&l);
        let mut now = start;
        let mut tat = 0;
        for (gap, hits) in steps {
            now += gap;
            let (v, t) = gcra::decide(&l, tat, now, hits);
            prop_assert_eq!(v.allowed, ideal.decide(now, hits), "{:?} {} hits at {}", l, hits, now);
            if v.allowed {
                tat = t;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Counter keys.

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn counter_keys_are_injective_and_values_cannot_move_the_hash_tag(
        a in (any::<String>(), prop::collection::vec((any::<String>(), any::<String>()), 1..4), limit()),
        b in (any::<String>(), prop::collection::vec((any::<String>(), any::<String>()), 1..4), limit()),
    ) {
        let key = |(domain, entries, l): &(String, Vec<(String, String)>, Limit)| {
            redis_keys::counter_key(domain, &borrowed(entries), l)
        };
        let (ka, kb) = (key(&a), key(&b));
        let same_input = a.0 == b.0 && a.1 == b.1 && a.2 == b.2;
        prop_assert_eq!(ka == kb, same_input, "{} vs {}", ka, kb);
        // One `{`, one `}`: the hash tag is exactly the escaped domain and first entry.
        prop_assert_eq!(ka.matches('{').count(), 1, "{}", ka);
        prop_assert_eq!(ka.matches('}').count(), 1, "{}", ka);
        prop_assert!(!ka.chars().any(char::is_control), "{:?}", ka);
    }
}

// ---------------------------------------------------------------------------------------
// One limiter decision: configuration + overrides + replaces + the store's batch.

/// The memory store on a clock the test sets.
struct ClockedStore {
    inner: MemoryStore,
    now: AtomicU64,
}

impl CounterStore for ClockedStore {
    async fn hit_batch(&self, hits: &[Hit]) -> Result<Vec<Verdict>, StoreError> {
        Ok(self
            .inner
            .hit_batch_at(hits, self.now.load(Ordering::Relaxed)))
    }

    async fn expires_in(&self, key: &str) -> Result<Option<Duration>, StoreError> {
        self.inner.expires_in(key).await
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    // The memory store never waits; a current-thread runtime is all the futures need.
    tokio::runtime::Builder::new_current_thread()
        .build()
        .map(|rt| rt.block_on(f))
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

/// A limiter request: its descriptors, after `gap` ns.
#[derive(Debug, Clone)]
struct Request {
    gap: u64,
    descriptors: Vec<RequestDescriptor>,
}

#[derive(Debug, Clone)]
struct RequestDescriptor {
    entries: Vec<(String, String)>,
    limit_override: Option<Limit>,
    hits: u64,
}

fn request() -> impl Strategy<Value = Request> {
    let entries = prop::collection::vec(
        (
            prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
            prop::sample::select(VALUES.to_vec()).prop_map(str::to_owned),
        ),
        0..3,
    );
    let override_limit = prop::option::weighted(
        0.4,
        (prop::sample::select(vec![1u32, 2, 5, 10, 1000]), unit()).prop_map(|(n, u)| Limit {
            requests_per_unit: n,
            unit: u,
        }),
    );
    (
        prop_oneof![Just(0u64), 0u64..=120_000_000_000],
        prop::collection::vec((entries, override_limit, 0u64..=12), 1..4),
    )
        .prop_map(|(gap, descriptors)| Request {
            gap,
            descriptors: descriptors
                .into_iter()
                .map(|(entries, limit_override, hits)| RequestDescriptor {
                    entries,
                    limit_override,
                    hits,
                })
                .collect(),
        })
}

/// Configurations whose limits all divide a second evenly, so the ideal GCRA is the
/// reference for the counters too.
fn even_config() -> impl Strategy<Value = RefConfig> {
    ref_config().prop_map(|mut c| {
        fn fix(level: &mut [RefDesc]) {
            for d in level {
                if let Some(RefLimit { limit: Some(l), .. }) = &mut d.rate_limit {
                    l.requests_per_unit = [1, 2, 5, 10, 1000][l.requests_per_unit as usize % 5];
                }
                fix(&mut d.children);
            }
        }
        for (_, level, _) in &mut c.domains {
            fix(level);
        }
        c
    })
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn limiter_decisions_equal_a_reference_model(
        reference in even_config(),
        requests in prop::collection::vec(request(), 1..24),
    ) {
        let Ok(config) = Config::parse(&reference.sources()) else {
            return Err(TestCaseError::fail("valid configuration refused"));
        };
        let domain = reference.domains[0].0.clone();
        let store = ClockedStore { inner: MemoryStore::new(), now: AtomicU64::new(1_000_000_000) };
        // Reference counters: counter key → ideal GCRA.
        let mut counters: HashMap<String, IdealGcra> = HashMap::new();
        for req in requests {
            let now = store.now.fetch_add(req.gap, Ordering::Relaxed) + req.gap;
            let descriptors: Vec<Descriptor<'_>> = req
                .descriptors
                .iter()
                .map(|d| Descriptor {
                    entries: borrowed(&d.entries),
                    limit_override: d.limit_override,
                    hits: d.hits,
                    phase: Phase::Requests { refund: false },
                })
                .collect();
            let decision = block_on(limiter::decide(
                &store,
                &config,
                &domain,
                &descriptors,
                limiter::DEFAULT_LEASE_TTL,
            ));
            let Ok(decision) = decision else {
                return Err(TestCaseError::fail("memory store failed"));
            };
            prop_assert_eq!(decision.outcomes.len(), descriptors.len());

            // Reference: resolve each descriptor, apply `replaces`, then the batch.
            // An override is never shadowed, named or replacing.
            let resolved: Vec<Option<Rule>> = descriptors
                .iter()
                .map(|d| {
                    if d.entries.is_empty() {
                        return None;
                    }
                    if let Some(l) = d.limit_override {
                        return Some(Rule { limit: Some(l), name: None, replaces: Vec::new(), shadow_mode: false });
                    }
                    reference.find(&domain, &d.entries)
                })
                .collect();
            let replaced: Vec<&String> =
                resolved.iter().flatten().flat_map(|r| r.replaces.iter()).collect();
            let resolved: Vec<Option<&Rule>> = resolved
                .iter()
                .map(|r| {
                    r.as_ref()
                        .filter(|r| !r.name.as_ref().is_some_and(|n| replaced.contains(&n)))
                })
                .collect();
            let mut trial: BTreeMap<String, u128> = BTreeMap::new();
            let mut over = false;
            let mut allowed = Vec::new();
            for (d, r) in descriptors.iter().zip(&resolved) {
                let Some(Rule { limit: Some(l), shadow_mode: shadow, .. }) = r else {
                    allowed.push(None);
                    continue;
                };
                let key = redis_keys::counter_key(&domain, &d.entries, l);
                let ideal = counters.entry(key.clone()).or_insert_with(|| IdealGcra::new(l));
                let saved = ideal.tat;
                if let Some(t) = trial.get(&key) {
                    ideal.tat = *t;
                }
                let ok = ideal.decide(now, d.hits);
                trial.insert(key, ideal.tat);
                ideal.tat = saved;
                over |= !ok && !shadow;
                allowed.push(Some(ok));
            }
            if !over {
                for (key, tat) in trial {
                    if let Some(c) = counters.get_mut(&key) {
                        c.tat = tat;
                    }
                }
            }
            prop_assert_eq!(decision.over_limit, over, "request {:?}", req);
            for ((outcome, r), ok) in decision.outcomes.iter().zip(&resolved).zip(&allowed) {
                match (outcome, r) {
                    (Outcome::NotLimited, None) => {}
                    (Outcome::Unlimited, Some(Rule { limit: None, .. })) => {}
                    (
                        Outcome::Counted { limit, shadow, verdict, .. },
                        Some(Rule { limit: Some(l), shadow_mode: s, .. }),
                    ) => {
                        prop_assert_eq!(limit, l);
                        prop_assert_eq!(shadow, s);
                        prop_assert_eq!(Some(verdict.allowed), *ok);
                    }
                    other => prop_assert!(false, "outcome {:?} for {:?}", other.0, other.1),
                }
            }
        }
    }
}

#[test]
fn the_ideal_gcra_reference_admits_a_burst_then_one_per_interval() {
    // The reference itself must be able to fail: 3 per minute.
    let l = Limit {
        requests_per_unit: 3,
        unit: Unit::Minute,
    };
    let mut g = IdealGcra::new(&l);
    let sec: Nanos = 1_000_000_000;
    assert!(g.decide(100 * sec, 1) && g.decide(100 * sec, 2));
    assert!(!g.decide(100 * sec, 1));
    assert!(!g.decide(119 * sec, 1));
    assert!(g.decide(120 * sec, 1));
}

/// The same burst property on the Redis store, whose GCRA is `lua/gcra.lua` (in µs): a
/// fresh counter of N per period takes a hit of `h` exactly when `h <= N`.
///
/// Fails while `gcra.lua` rounds the emission interval down (`math.floor(period / per)`):
/// 10406 a minute admits 10407 at once, 7,000,000 tokens a minute admits 7,500,000. The
/// fix is the one `src/gcra.rs` got: the interval rounded up and the burst window
/// `per × interval` instead of the period.
#[test]
fn redis_store_admits_a_burst_of_hits_exactly_up_to_the_limit() {
    let dir = TempDir::new("properties");
    let redis = Redis::start_in(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let store = rt
        .block_on(RedisStore::connect(&redis.url(), Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("connect to redis: {e}"));
    let next_key = AtomicU64::new(0);
    let mut runner = TestRunner::new(cases(128));
    let strategy = positive_limit().prop_flat_map(|l| (Just(l), hits_for(l.requests_per_unit)));
    let result = runner.run(&strategy, |(l, hits)| {
        let id = next_key.fetch_add(1, Ordering::Relaxed).to_string();
        let hit = Hit {
            key: redis_keys::counter_key("properties", &[("key_id", &id)], &l),
            limit: l,
            hits,
            mode: HitMode::Enforce,
        };
        let verdicts = rt.block_on(store.hit_batch(std::slice::from_ref(&hit)));
        let Ok(verdicts) = verdicts else {
            return Err(TestCaseError::fail(format!("redis: {verdicts:?}")));
        };
        prop_assert_eq!(
            verdicts.first().map(|v| v.allowed),
            Some(hits <= u64::from(l.requests_per_unit)),
            "{:?}: {} hits at once gave {:?}",
            l,
            hits,
            verdicts
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
