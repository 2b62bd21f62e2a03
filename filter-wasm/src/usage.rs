//! Owns token counting: the [`TokenCount`] a response used, taken from whatever the model server
//! reports (OpenAI `usage`, Ollama's final `prompt_eval_count`/`eval_count`, Anthropic's
//! `message_start` and `message_delta` usage), and the small wire shapes those come in.
//!
//! Counts are what the upstream says, never estimated here: no report means nothing counted,
//! and [`UsageMeter::reported`] tells the caller so (it then debits its reservation instead).

use serde::Deserialize;

/// Tokens of one request: prompt (input) and completion (output).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCount {
    pub prompt: u64,
    pub completion: u64,
}

impl TokenCount {
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// OpenAI's `usage` object (chat, completions, embeddings).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct OpenAiUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// Anthropic's `usage` object. Every field is optional because `message_delta` carries only
/// what changed. Cache reads and writes are input tokens too, reported beside `input_tokens`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct AnthropicUsage {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cache_creation_input_tokens: Option<u64>,
    pub cache_read_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// All input tokens, cached or not, as OpenAI's `prompt_tokens` counts them; `None` when
    /// this object says nothing about input.
    fn prompt(&self) -> Option<u64> {
        let parts = [
            self.input_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        ];
        if parts.iter().all(Option::is_none) {
            return None;
        }
        Some(
            parts
                .iter()
                .flatten()
                .fold(0u64, |a, b| a.saturating_add(*b)),
        )
    }
}

/// The counts on Ollama's final object (`done: true`) of chat, generate and embed.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct OllamaCounts {
    pub prompt_eval_count: Option<u64>,
    pub eval_count: Option<u64>,
}

/// Accumulates what one response reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsageMeter {
    count: TokenCount,
    reported: bool,
    events: u64,
}

impl UsageMeter {
    /// One event (SSE) or line (NDJSON) of a streamed response went by.
    pub fn event(&mut self) {
        self.events = self.events.saturating_add(1);
    }

    /// Events and lines of a streamed response so far: nearly each carries at least one
    /// generated token, so it bounds what a stream cut before its usage report produced.
    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn count(&self) -> TokenCount {
        self.count
    }

    /// Whether the upstream reported usage at all (a zero count may be real).
    pub fn reported(&self) -> bool {
        self.reported
    }

    /// OpenAI reports the totals once, in the last chunk or the body.
    pub fn openai(&mut self, usage: OpenAiUsage) {
        self.count = TokenCount {
            prompt: usage.prompt_tokens,
            completion: usage.completion_tokens,
        };
        self.reported = true;
    }

    /// Ollama reports on its final object; an object without counts changes nothing.
    pub fn ollama(&mut self, counts: OllamaCounts) {
        if let Some(prompt) = counts.prompt_eval_count {
            self.count.prompt = prompt;
            self.reported = true;
        }
        if let Some(completion) = counts.eval_count {
            self.count.completion = completion;
            self.reported = true;
        }
    }

    /// Anthropic's `message_start`: the input tokens and a provisional output count. Not a
    /// report: a stream cut before its `message_delta` generated an unknown amount, so the
    /// reservation must stand rather than be refunded down to one output token.
    pub fn anthropic_start(&mut self, usage: &AnthropicUsage) {
        let reported = self.reported;
        self.anthropic(usage);
        self.reported = reported;
    }

    /// Anthropic's numbers are cumulative (`message_start`, then each `message_delta`), so
    /// the latest value of each field wins.
    pub fn anthropic(&mut self, usage: &AnthropicUsage) {
        if let Some(prompt) = usage.prompt() {
            self.count.prompt = prompt;
            self.reported = true;
        }
        if let Some(completion) = usage.output_tokens {
            self.count.completion = completion;
            self.reported = true;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn openai_usage_sets_both_counts() {
        let mut meter = UsageMeter::default();
        assert!(!meter.reported());
        let usage: OpenAiUsage = serde_json::from_str(
            r#"{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":0}}"#,
        )
        .unwrap();
        meter.openai(usage);
        assert_eq!(
            meter.count(),
            TokenCount {
                prompt: 9,
                completion: 12
            }
        );
        assert_eq!(meter.count().total(), 21);
        assert!(meter.reported());
    }

    #[test]
    fn embeddings_usage_without_completion_counts_zero_completion() {
        let mut meter = UsageMeter::default();
        meter.openai(serde_json::from_str(r#"{"prompt_tokens":8,"total_tokens":8}"#).unwrap());
        assert_eq!(meter.count().completion, 0);
        assert_eq!(meter.count().prompt, 8);
    }

    #[test]
    fn anthropic_start_then_delta_takes_latest_cumulative_values() {
        let mut meter = UsageMeter::default();
        let start: AnthropicUsage = serde_json::from_str(
            r#"{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":3,"output_tokens":1}"#,
        )
        .unwrap();
        meter.anthropic_start(&start);
        assert!(!meter.reported(), "message_start alone is not a report");
        assert_eq!(meter.count().prompt, 128);
        assert_eq!(meter.count().completion, 1);
        let delta: AnthropicUsage = serde_json::from_str(r#"{"output_tokens":15}"#).unwrap();
        meter.anthropic(&delta);
        assert_eq!(
            meter.count(),
            TokenCount {
                prompt: 128,
                completion: 15
            }
        );
    }

    #[test]
    fn ollama_counts_only_from_objects_that_carry_them() {
        let mut meter = UsageMeter::default();
        meter.ollama(OllamaCounts::default());
        assert!(!meter.reported());
        meter.ollama(OllamaCounts {
            prompt_eval_count: Some(26),
            eval_count: Some(5),
        });
        assert_eq!(
            meter.count(),
            TokenCount {
                prompt: 26,
                completion: 5
            }
        );
    }

    #[test]
    fn totals_saturate_instead_of_overflowing() {
        let count = TokenCount {
            prompt: u64::MAX,
            completion: 1,
        };
        assert_eq!(count.total(), u64::MAX);
    }
}
