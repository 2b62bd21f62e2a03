//! The set of models the mock serves (from `--models`), and the name matching rule.

/// Models the mock answers for; anything else gets the provider's "model not found".
#[derive(Debug, Clone)]
pub struct Catalog {
    names: Vec<String>,
}

impl Catalog {
    pub fn new(names: Vec<String>) -> Self {
        let mut kept: Vec<String> = Vec::with_capacity(names.len());
        for name in names {
            let name = name.trim();
            if !name.is_empty() && !kept.iter().any(|k| k == name) {
                kept.push(name.to_owned());
            }
        }
        Self { names: kept }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Ollama treats an untagged name as `:latest` (`llama3.1` == `llama3.1:latest`), so we
    /// compare with that default tag filled in. Names without a colon in other APIs (OpenAI,
    /// Anthropic) are unaffected because both sides get the same suffix.
    pub fn contains(&self, requested: &str) -> bool {
        let wanted = with_default_tag(requested);
        self.names.iter().any(|n| with_default_tag(n) == wanted)
    }
}

impl Catalog {
    /// The served model Ollama runs for `requested`, as it names it: Ollama parses a name as
    /// `[host/][namespace/]model[:tag]` with `registry.ollama.ai` and `library` as the
    /// defaults and `latest` as the tag, and compares names case-insensitively, so
    /// `LLAMA3.1:8B` and `registry.ollama.ai/library/llama3.1:8b` are `llama3.1:8b`.
    pub fn ollama_resolve(&self, requested: &str) -> Option<String> {
        let lower = requested.to_ascii_lowercase();
        let short = lower.strip_prefix("registry.ollama.ai/").unwrap_or(&lower);
        let short = short.strip_prefix("library/").unwrap_or(short);
        let wanted = with_default_tag(short);
        self.names
            .iter()
            .find(|n| with_default_tag(&n.to_ascii_lowercase()) == wanted)
            .cloned()
    }
}

fn with_default_tag(name: &str) -> String {
    if name.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untagged_name_matches_latest_tag_both_ways() {
        let catalog = Catalog::new(vec!["llama3.1:latest".into(), "qwen2".into()]);
        assert!(catalog.contains("llama3.1"));
        assert!(catalog.contains("qwen2:latest"));
        assert!(!catalog.contains("qwen2:0.5b"));
    }

    #[test]
    fn ollama_names_resolve_case_insensitively_and_fully_qualified() {
        let catalog = Catalog::new(vec!["llama3.1:8b".into(), "qwen2".into()]);
        assert_eq!(
            catalog.ollama_resolve("LLAMA3.1:8B").as_deref(),
            Some("llama3.1:8b")
        );
        assert_eq!(
            catalog
                .ollama_resolve("registry.ollama.ai/library/llama3.1:8b")
                .as_deref(),
            Some("llama3.1:8b")
        );
        assert_eq!(
            catalog.ollama_resolve("Qwen2:latest").as_deref(),
            Some("qwen2")
        );
        assert_eq!(catalog.ollama_resolve("llama3.1"), None);
    }

    #[test]
    fn blank_and_duplicate_names_are_dropped() {
        let catalog = Catalog::new(vec![" a ".into(), String::new(), "a".into(), "b".into()]);
        assert_eq!(catalog.names(), ["a", "b"]);
    }
}
