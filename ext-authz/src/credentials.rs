//! Provider credentials injected for routes that need them, read from the environment at
//! start-up (never stored in the database, never logged).

use crate::authz_config::CredentialConfig;
use std::collections::BTreeMap;

/// Route context extension that names the credential a route needs.
pub const CONTEXT_KEY: &str = "tollgate_credential";

#[derive(Clone)]
pub struct Credential {
    pub header: String,
    pub value: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_name: BTreeMap<String, Credential>,
}

/// A configured credential whose secret is missing: start-up is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("credential {name:?}: environment variable {env} is not set")]
pub struct MissingCredential {
    pub name: String,
    pub env: String,
}

impl Credentials {
    /// Resolves every configured credential; a missing variable refuses start-up rather
    /// than sending unauthenticated requests upstream later.
    pub fn from_config(
        config: &BTreeMap<String, CredentialConfig>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, MissingCredential> {
        let mut by_name = BTreeMap::new();
        for (name, c) in config {
            let secret =
                env(&c.env)
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| MissingCredential {
                        name: name.clone(),
                        env: c.env.clone(),
                    })?;
            by_name.insert(
                name.clone(),
                Credential {
                    header: c.header.to_ascii_lowercase(),
                    value: c.format.replace("{}", &secret),
                },
            );
        }
        Ok(Self { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Credential> {
        self.by_name.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BTreeMap<String, CredentialConfig> {
        let mut m = BTreeMap::new();
        m.insert(
            "openai".to_string(),
            CredentialConfig {
                header: "Authorization".into(),
                env: "UP_KEY".into(),
                format: "Bearer {}".into(),
            },
        );
        m
    }

    #[test]
    fn credential_is_formatted_from_env_and_hidden_from_debug() {
        let c = Credentials::from_config(&config(), |_| Some("sk-123".into())).unwrap();
        let cred = c.get("openai").unwrap();
        assert_eq!(cred.header, "authorization");
        assert_eq!(cred.value, "Bearer sk-123");
        assert!(!format!("{c:?}").contains("sk-123"));
    }

    #[test]
    fn missing_env_refuses_start() {
        assert!(Credentials::from_config(&config(), |_| None).is_err());
    }
}
