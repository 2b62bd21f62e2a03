//! The counter key layout, in one place (both stores use it, so both count the same
//! things):
//!
//! ```text
//! tg:{<domain>|<key1>=<value1>}|<key2>=<value2>…:<requests_per_unit>/<unit>
//! tg:{tollgate|key_id=k1}:60/minute
//! tg:{tollgate|key_id=k1}|phase=tokens_used:100000/minute
//! tg:{tollgate|key_id=k1}|tollgate_phase=lease:lease      (a lease set, see lease_key)
//! ```
//!
//! The `{hash tag}` is the domain and the descriptor's *first* entry, which in Tollgate's
//! Envoy configuration is the identity (`key_id` or `tenant_id`). So every counter of one
//! key (requests, token estimate, token debit) lands in one Redis Cluster slot and one
//! script call decides them together; per-key and per-tenant counters are in different
//! slots, which spreads load across the cluster.
//!
//! The limit is part of the key: a changed limit starts a fresh counter instead of
//! inheriting a TAT computed with another interval. Names and values are escaped
//! (`%`, `{`, `}`, `|`, `=`, `:` and control characters as `%XX`), so the layout is
//! injective (no value can forge another descriptor's key) and a value can never move
//! the hash tag.

use crate::limit_policy::Limit;
use std::fmt::Write;

/// Prefix of every Tollgate counter key, so they are easy to find and to drop.
pub const PREFIX: &str = "tg:";

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' | '{' | '}' | '|' | '=' | ':' | '\u{0}'..='\u{1f}' | '\u{7f}' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            _ => out.push(c),
        }
    }
}

fn push_entry(out: &mut String, key: &str, value: &str) {
    push_escaped(out, key);
    out.push('=');
    push_escaped(out, value);
}

/// The counter key of a descriptor (`entries` without the request id) under `limit`.
pub fn counter_key(domain: &str, entries: &[(&str, &str)], limit: &Limit) -> String {
    let mut key = descriptor_key(domain, entries);
    let _ = write!(key, ":{}/{}", limit.requests_per_unit, limit.unit.name());
    key
}

/// The lease set of a concurrency descriptor (`entries` without the request id, phase
/// `lease`). Unlike a counter key it does not name the limit: a changed maximum applies
/// to the leases already held instead of starting an empty set.
pub fn lease_key(domain: &str, entries: &[(&str, &str)]) -> String {
    let mut key = descriptor_key(domain, entries);
    key.push_str(":lease");
    key
}

fn descriptor_key(domain: &str, entries: &[(&str, &str)]) -> String {
    let len: usize = entries.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut key = String::with_capacity(PREFIX.len() + domain.len() + len + 24);
    key.push_str(PREFIX);
    key.push('{');
    push_escaped(&mut key, domain);
    let mut rest = entries.iter();
    if let Some((k, v)) = rest.next() {
        key.push('|');
        push_entry(&mut key, k, v);
    }
    key.push('}');
    for (k, v) in rest {
        key.push('|');
        push_entry(&mut key, k, v);
    }
    key
}

/// The Redis Cluster slot of a key (CRC16 of its hash tag).
pub fn slot(key: &str) -> ::redis::cluster_routing::Slot {
    ::redis::cluster_routing::Slot::for_key(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit_policy::Unit;

    const RPM: Limit = Limit {
        requests_per_unit: 60,
        unit: Unit::Minute,
    };

    #[test]
    fn layout_puts_domain_and_first_entry_in_the_hash_tag() {
        assert_eq!(
            counter_key("tollgate", &[("key_id", "k1")], &RPM),
            "tg:{tollgate|key_id=k1}:60/minute"
        );
        assert_eq!(
            counter_key(
                "tollgate",
                &[("key_id", "k1"), ("phase", "tokens_used")],
                &RPM
            ),
            "tg:{tollgate|key_id=k1}|phase=tokens_used:60/minute"
        );
    }

    #[test]
    fn counters_of_one_key_share_a_slot() {
        let a = counter_key("tollgate", &[("key_id", "k1")], &RPM);
        let b = counter_key(
            "tollgate",
            &[("key_id", "k1"), ("phase", "tokens_est")],
            &RPM,
        );
        assert_eq!(slot(&a), slot(&b));
    }

    #[test]
    fn separators_in_values_are_escaped_so_keys_cannot_collide() {
        let forged = counter_key("d", &[("a", "x|b=y")], &RPM);
        let real = counter_key("d", &[("a", "x"), ("b", "y")], &RPM);
        assert_ne!(forged, real);
        assert_eq!(forged, "tg:{d|a=x%7Cb%3Dy}:60/minute");
        // A brace in a value cannot end the hash tag early.
        let k = counter_key("d", &[("a", "}x{"), ("b", "1")], &RPM);
        assert_eq!(k, "tg:{d|a=%7Dx%7B}|b=1:60/minute");
        assert_eq!(
            slot(&k),
            ::redis::cluster_routing::Slot::for_key("{d|a=%7Dx%7B}")
        );
    }

    #[test]
    fn a_lease_set_shares_the_slot_and_names_no_limit() {
        let k = lease_key("tollgate", &[("key_id", "k1"), ("tollgate_phase", "lease")]);
        assert_eq!(k, "tg:{tollgate|key_id=k1}|tollgate_phase=lease:lease");
        assert_eq!(
            slot(&k),
            slot(&counter_key("tollgate", &[("key_id", "k1")], &RPM))
        );
    }

    #[test]
    fn a_changed_limit_is_a_different_counter() {
        let other = Limit {
            requests_per_unit: 61,
            unit: Unit::Minute,
        };
        assert_ne!(
            counter_key("d", &[("a", "1")], &RPM),
            counter_key("d", &[("a", "1")], &other)
        );
    }
}
