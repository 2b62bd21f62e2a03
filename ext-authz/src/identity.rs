//! Who is calling, once the key checked out: the plain value the decision produces and
//! the key cache remembers.

use crate::policy::EffectivePolicy;

/// Who is calling and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: String,
    pub tenant_id: String,
    pub policy: EffectivePolicy,
    /// The tenant opted in to prompt logging.
    pub log_prompts: bool,
}
