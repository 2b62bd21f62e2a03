//! Owns what tollgate-authz granted the caller of one request, read from Envoy's dynamic
//! metadata at most once per value: each value is read on first use, since most requests
//! need only the allowlist and a hostcall per metadata entry is not free.

use std::cell::OnceCell;

use tollgate_core::metadata;
use tollgate_core::model_pattern::{self, ModelPattern};

use crate::host::{self, Host};

/// The caller's grant for one request.
#[derive(Debug, Default)]
pub struct Grant {
    /// The allowlist, and whether it holds `*` (every model).
    models: OnceCell<(Vec<ModelPattern>, bool)>,
    usd_budget: OnceCell<bool>,
    token_limit: OnceCell<bool>,
    prompt_log: OnceCell<bool>,
}

/// A value tollgate-authz put in the dynamic metadata for this request.
fn read(host: &impl Host, key: &str) -> Option<Vec<u8>> {
    host.property(&[
        "metadata",
        "filter_metadata",
        metadata::AUTHZ_NAMESPACE,
        key,
    ])
}

impl Grant {
    fn models(&self, host: &impl Host) -> &(Vec<ModelPattern>, bool) {
        self.models.get_or_init(|| {
            let raw = host::text(read(host, metadata::MODELS));
            let every = raw
                .as_deref()
                .is_some_and(|m| m.split(',').any(|p| p.trim() == "*"));
            let list = raw
                .and_then(|m| model_pattern::parse_list(&m).ok())
                .unwrap_or_default();
            (list, every)
        })
    }

    /// The key's model allowlist; missing or unreadable metadata allows nothing.
    pub fn allowlist(&self, host: &impl Host) -> &[ModelPattern] {
        &self.models(host).0
    }

    /// The key or its tenant has a USD budget.
    pub fn has_usd_budget(&self, host: &impl Host) -> bool {
        *self.usd_budget.get_or_init(|| {
            metadata::USD_BUDGETS
                .iter()
                .any(|name| read(host, name).is_some())
        })
    }

    fn has_token_limit(&self, host: &impl Host) -> bool {
        *self.token_limit.get_or_init(|| {
            metadata::TOKEN_LIMITS
                .iter()
                .any(|name| read(host, name).is_some())
        })
    }

    /// The caller has a token or USD limit.
    pub fn is_metered(&self, host: &impl Host) -> bool {
        self.has_token_limit(host) || self.has_usd_budget(host)
    }

    /// The caller may only use endpoints the filter reads and counts: a model allowlist
    /// other than `*`, or any token or USD limit.
    pub fn is_restricted(&self, host: &impl Host) -> bool {
        !self.models(host).1 || self.is_metered(host)
    }

    /// The key's tenant opted in to prompt logging.
    pub fn logs_prompts(&self, host: &impl Host) -> bool {
        *self
            .prompt_log
            .get_or_init(|| read(host, metadata::PROMPT_LOG).as_deref() == Some(b"1".as_slice()))
    }
}
