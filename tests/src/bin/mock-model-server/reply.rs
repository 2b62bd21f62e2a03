//! What the mock says: a fixed sentence handed out one word per chunk, plus response ids and
//! timestamps in the formats the real APIs use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The reply text. Chunk `i` is word `i` of this sentence (cycling when more chunks are
/// asked for than there are words), so the full reply for N chunks is known in advance.
pub const SENTENCE: &str =
    "Hello from the Tollgate mock model server, this reply is deterministic \
     and arrives one word per chunk.";

/// The text of each content chunk: the first word bare, later words with a leading space,
/// so concatenating the chunks gives readable text.
pub fn chunk_texts(chunks: usize) -> Vec<String> {
    SENTENCE
        .split_whitespace()
        .cycle()
        .take(chunks)
        .enumerate()
        .map(|(i, word)| {
            if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            }
        })
        .collect()
}

/// The non-streamed reply for the same chunk count: the concatenation of `chunk_texts`.
pub fn full_text(chunks: usize) -> String {
    chunk_texts(chunks).concat()
}

/// A unique id such as `chatcmpl-mock000000000000000007`. A counter rather than randomness
/// keeps the crate free of an RNG dependency; uniqueness within one process is all tests need.
pub fn next_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}mock{n:020}")
}

/// Seconds since the Unix epoch, for OpenAI's `created`.
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Ollama's `created_at`: RFC 3339 in UTC with nanoseconds, e.g. `2024-07-23T10:00:00.123456789Z`.
pub fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_utc(now.as_secs(), now.subsec_nanos())
}

fn rfc3339_utc(secs: u64, nanos: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm),
/// because the crate has no date library and this is the only date arithmetic it needs.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_one_word_each_and_concatenate_to_the_reply() {
        let chunks = chunk_texts(5);
        assert_eq!(chunks, ["Hello", " from", " the", " Tollgate", " mock"]);
        assert_eq!(full_text(5), "Hello from the Tollgate mock");
        assert!(chunk_texts(0).is_empty());
    }

    #[test]
    fn more_chunks_than_words_cycle_the_sentence() {
        let words = SENTENCE.split_whitespace().count();
        let chunks = chunk_texts(words + 2);
        assert_eq!(chunks.len(), words + 2);
        assert_eq!(chunks[words], " Hello");
    }

    #[test]
    fn timestamps_format_as_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_utc(1_709_251_199, 5),
            "2024-02-29T23:59:59.000000005Z"
        );
    }
}
