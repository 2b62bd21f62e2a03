//! Operations a key may be allowed: what a request path does, for OpenAI-, Ollama- and
//! Anthropic-style APIs alike.

/// One operation. `Other` is every path not listed, allowed only when a policy says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Chat,
    Completions,
    Embeddings,
    Models,
    Audio,
    Images,
    Moderation,
    Other,
}

pub const ALL: [Operation; 8] = [
    Operation::Chat,
    Operation::Completions,
    Operation::Embeddings,
    Operation::Models,
    Operation::Audio,
    Operation::Images,
    Operation::Moderation,
    Operation::Other,
];

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
            Operation::Models => "models",
            Operation::Audio => "audio",
            Operation::Images => "images",
            Operation::Moderation => "moderation",
            Operation::Other => "other",
        }
    }

    /// Whether the filter reads this operation's usage (tokens, and cost for priced models)
    /// and the rate limiter reserves and settles it. Listings use none; audio, images,
    /// moderation and any other path pass through uncounted.
    pub fn usage_is_counted(self) -> bool {
        matches!(
            self,
            Operation::Chat | Operation::Completions | Operation::Embeddings | Operation::Models
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Classifies a request path (query ignored). Unknown or oddly written paths are
    /// `Other`, so a disguise can only lose permissions, never gain them.
    pub fn of_path(path: &str) -> Self {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path.strip_suffix('/').unwrap_or(path);
        match path {
            "/v1/chat/completions" | "/api/chat" | "/v1/messages" => Operation::Chat,
            "/v1/completions" | "/api/generate" => Operation::Completions,
            "/v1/embeddings" | "/api/embed" | "/api/embeddings" => Operation::Embeddings,
            "/v1/models" | "/api/tags" | "/api/show" | "/api/ps" | "/api/version" => {
                Operation::Models
            }
            "/v1/moderations" => Operation::Moderation,
            p if p.starts_with("/v1/models/") => Operation::Models,
            p if p.starts_with("/v1/audio/") => Operation::Audio,
            p if p.starts_with("/v1/images/") => Operation::Images,
            _ => Operation::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_all_three_apis_classify() {
        assert_eq!(Operation::of_path("/v1/chat/completions"), Operation::Chat);
        assert_eq!(Operation::of_path("/api/chat"), Operation::Chat);
        assert_eq!(
            Operation::of_path("/v1/messages?beta=true"),
            Operation::Chat
        );
        assert_eq!(Operation::of_path("/api/generate"), Operation::Completions);
        assert_eq!(Operation::of_path("/v1/embeddings/"), Operation::Embeddings);
        assert_eq!(Operation::of_path("/api/tags"), Operation::Models);
        assert_eq!(Operation::of_path("/v1/models/llama3"), Operation::Models);
        assert_eq!(Operation::of_path("/v1/audio/speech"), Operation::Audio);
        assert_eq!(
            Operation::of_path("/v1/images/generations"),
            Operation::Images
        );
        assert_eq!(Operation::of_path("/v1/moderations"), Operation::Moderation);
    }

    #[test]
    fn unknown_and_disguised_paths_are_other() {
        assert_eq!(Operation::of_path("/V1/CHAT/completions"), Operation::Other);
        assert_eq!(Operation::of_path("/api/pull"), Operation::Other);
        assert_eq!(
            Operation::of_path("/v1/chat/completionsx"),
            Operation::Other
        );
        assert_eq!(Operation::of_path(""), Operation::Other);
    }

    #[test]
    fn names_round_trip() {
        for o in ALL {
            assert_eq!(Operation::parse(o.as_str()), Some(o));
        }
        assert_eq!(Operation::parse("pull"), None);
    }
}
