//! Policy: which models, operations and source addresses a key may use, and its limits.
//! A tenant has one policy; a key may override any field. Models, operations and IPs are
//! inherited from the tenant when the key leaves them unset; limits are per scope (a
//! tenant's limits bound the sum of its keys, a key's bound that key).

use crate::ip_net::IpNet;
use std::net::IpAddr;
use tollgate_core::model_pattern::{self, ModelPattern, PatternError};
use tollgate_core::operation::{self, Operation};

/// Operations a policy allows when it names none: the core model APIs. Audio, images,
/// moderation and unknown paths must be allowed explicitly.
pub const DEFAULT_OPERATIONS: [Operation; 4] = [
    Operation::Chat,
    Operation::Completions,
    Operation::Embeddings,
    Operation::Models,
];

/// Stored form: every field optional, lists as comma-separated text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyRow {
    pub models: Option<String>,
    pub operations: Option<String>,
    pub ips: Option<String>,
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub budget_day: Option<u64>,
    pub budget_month: Option<u64>,
    /// USD budgets in `tollgate_core::usd` units (1/10000 USD).
    pub budget_usd_day: Option<u64>,
    pub budget_usd_month: Option<u64>,
    pub max_concurrent: Option<u32>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// Some limit counts tokens or cost (TPM, token or USD budgets), not only requests.
    pub fn meters_usage(&self) -> bool {
        self.tpm.is_some()
            || self.budget_day.is_some()
            || self.budget_month.is_some()
            || self.budget_usd_day.is_some()
            || self.budget_usd_month.is_some()
    }
}

/// What a request is checked against, after inheritance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub models: Vec<ModelPattern>,
    pub operations: Vec<Operation>,
    /// Empty = any source address.
    pub ips: Vec<IpNet>,
    pub key_limits: Limits,
    pub tenant_limits: Limits,
}

impl EffectivePolicy {
    pub fn allows_operation(&self, op: Operation) -> bool {
        self.operations.contains(&op)
    }

    pub fn allows_ip(&self, ip: Option<IpAddr>) -> bool {
        if self.ips.is_empty() {
            return true;
        }
        ip.is_some_and(|ip| self.ips.iter().any(|n| n.contains(ip)))
    }

    pub fn models_text(&self) -> String {
        model_pattern::join(&self.models)
    }
}

/// Why a stored or given policy field does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Model(#[from] PatternError),
    #[error("unknown operation {0:?}")]
    UnknownOperation(String),
    /// An address or CIDR that does not parse, with `IpNet::parse`'s reason.
    #[error("{0}")]
    Ip(String),
}

pub fn parse_models(s: &str) -> Result<Vec<ModelPattern>, PolicyError> {
    Ok(model_pattern::parse_list(s)?)
}

pub fn parse_operations(s: &str) -> Result<Vec<Operation>, PolicyError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p == "*" {
                Ok(operation::ALL.to_vec())
            } else {
                Operation::parse(p)
                    .map(|o| vec![o])
                    .ok_or_else(|| PolicyError::UnknownOperation(p.to_string()))
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|v| {
            let mut ops: Vec<Operation> = v.into_iter().flatten().collect();
            ops.sort();
            ops.dedup();
            ops
        })
}

pub fn parse_ips(s: &str) -> Result<Vec<IpNet>, PolicyError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| IpNet::parse(p).map_err(PolicyError::Ip))
        .collect()
}

/// Merges a tenant row and an optional key row. Stored text that no longer parses denies
/// (an empty allowlist), never allows.
pub fn effective(tenant: &PolicyRow, key: Option<&PolicyRow>) -> EffectivePolicy {
    let pick = |f: fn(&PolicyRow) -> &Option<String>| -> Option<String> {
        key.and_then(|k| f(k).clone()).or_else(|| f(tenant).clone())
    };
    let models = match pick(|r| &r.models) {
        Some(m) => parse_models(&m).unwrap_or_default(),
        None => vec![ModelPattern::Any],
    };
    let operations = match pick(|r| &r.operations) {
        Some(o) => parse_operations(&o).unwrap_or_default(),
        None => DEFAULT_OPERATIONS.to_vec(),
    };
    let ips = match pick(|r| &r.ips) {
        // An unparsable stored list must not widen access: allow nothing.
        Some(i) => parse_ips(&i).unwrap_or_else(|_| vec![IpNet::nothing()]),
        None => Vec::new(),
    };
    EffectivePolicy {
        models,
        operations,
        ips,
        key_limits: key.map(|k| k.limits).unwrap_or_default(),
        tenant_limits: tenant.limits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_tenant_policy_allows_all_models_and_core_operations_from_anywhere() {
        let p = effective(&PolicyRow::default(), None);
        assert_eq!(p.models, vec![ModelPattern::Any]);
        assert!(p.allows_operation(Operation::Chat));
        assert!(!p.allows_operation(Operation::Audio));
        assert!(!p.allows_operation(Operation::Other));
        assert!(p.allows_ip(None));
    }

    #[test]
    fn key_overrides_tenant_field_by_field() {
        let tenant = PolicyRow {
            models: Some("llama3*".into()),
            operations: Some("chat,embeddings".into()),
            ips: Some("10.0.0.0/8".into()),
            limits: Limits {
                rpm: Some(100),
                ..Default::default()
            },
        };
        let key = PolicyRow {
            models: Some("qwen2:0.5b".into()),
            limits: Limits {
                rpm: Some(5),
                ..Default::default()
            },
            ..Default::default()
        };
        let p = effective(&tenant, Some(&key));
        assert_eq!(p.models_text(), "qwen2:0.5b");
        assert_eq!(p.operations, vec![Operation::Chat, Operation::Embeddings]);
        assert!(p.allows_ip(Some("10.1.2.3".parse().unwrap())));
        assert!(!p.allows_ip(Some("192.168.1.1".parse().unwrap())));
        assert!(!p.allows_ip(None));
        assert_eq!(p.key_limits.rpm, Some(5));
        assert_eq!(p.tenant_limits.rpm, Some(100));
    }

    #[test]
    fn corrupt_stored_lists_deny() {
        let tenant = PolicyRow {
            models: Some("a*b".into()),
            operations: Some("teleport".into()),
            ips: Some("not-an-ip".into()),
            ..Default::default()
        };
        let p = effective(&tenant, None);
        assert!(p.models.is_empty());
        assert!(p.operations.is_empty());
        assert!(!p.allows_ip(Some("127.0.0.1".parse().unwrap())));
    }

    #[test]
    fn star_operations_means_all() {
        assert_eq!(parse_operations("*").unwrap().len(), operation::ALL.len());
        assert!(parse_operations("chat,pull").is_err());
    }
}
