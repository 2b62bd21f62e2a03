//! Model allowlist patterns: an exact name (`llama3.1:8b`), a trailing-star prefix
//! (`llama3*`, `local/*`), or `*` for every model.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPattern {
    Any,
    Exact(String),
    Prefix(String),
}

impl ModelPattern {
    /// Parses one pattern. A star anywhere but at the end is refused, so a pattern never
    /// means more than it looks like.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty model pattern".into());
        }
        if s == "*" {
            return Ok(ModelPattern::Any);
        }
        match s.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => Ok(ModelPattern::Prefix(prefix.to_string())),
            Some(_) => Err(format!("model pattern {s:?}: '*' only at the end")),
            None if s.contains('*') => Err(format!("model pattern {s:?}: '*' only at the end")),
            None => Ok(ModelPattern::Exact(s.to_string())),
        }
    }

    pub fn matches(&self, model: &str) -> bool {
        match self {
            ModelPattern::Any => true,
            ModelPattern::Exact(m) => m == model,
            ModelPattern::Prefix(p) => model.starts_with(p.as_str()),
        }
    }

    pub fn as_string(&self) -> String {
        match self {
            ModelPattern::Any => "*".into(),
            ModelPattern::Exact(m) => m.clone(),
            ModelPattern::Prefix(p) => format!("{p}*"),
        }
    }
}

/// A comma-separated list as carried in metadata (`"llama3*,local/*"`).
pub fn parse_list(s: &str) -> Result<Vec<ModelPattern>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(ModelPattern::parse)
        .collect()
}

pub fn join(patterns: &[ModelPattern]) -> String {
    patterns
        .iter()
        .map(ModelPattern::as_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub fn any_matches(patterns: &[ModelPattern], model: &str) -> bool {
    patterns.iter().any(|p| p.matches(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_prefix_and_any_match() {
        let l = parse_list("llama3*, local/*,qwen2:0.5b").unwrap();
        assert!(any_matches(&l, "llama3.1:8b"));
        assert!(any_matches(&l, "local/anything"));
        assert!(any_matches(&l, "qwen2:0.5b"));
        assert!(!any_matches(&l, "qwen2:7b"));
        assert!(!any_matches(&l, "llama2"));
        assert!(any_matches(&[ModelPattern::Any], "x"));
        assert!(!any_matches(&[], "x"));
    }

    #[test]
    fn stars_inside_are_refused_and_lists_round_trip() {
        assert!(ModelPattern::parse("ll*ma").is_err());
        assert!(ModelPattern::parse("**").is_err());
        assert!(ModelPattern::parse(" ").is_err());
        let l = parse_list("llama3*,local/*,x").unwrap();
        assert_eq!(join(&l), "llama3*,local/*,x");
    }
}
