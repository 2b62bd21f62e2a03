//! Deterministic embedding vectors and the base64 float encoding OpenAI clients ask for.

/// Vector length when the request does not ask for `dimensions`. Small on purpose: tests
/// compare whole responses and the gateway never looks inside the numbers.
pub const DEFAULT_DIMENSIONS: usize = 16;

/// Upper bound on a requested `dimensions`, so one request cannot make us allocate gigabytes.
pub const MAX_DIMENSIONS: usize = 4096;

/// A unit-length vector derived only from `text`: same text, same vector, across runs and
/// across the Ollama and OpenAI endpoints. Unit length because Ollama's `/api/embed`
/// returns normalised vectors.
pub fn vector(text: &str, dimensions: usize) -> Vec<f32> {
    let raw: Vec<f32> = (0..dimensions)
        .map(|i| {
            let h = fnv1a(text.as_bytes(), i as u64);
            // Map the top 24 bits to [-1, 1): exact in f32, evenly spread.
            ((h >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        return raw;
    }
    raw.into_iter().map(|x| x / norm).collect()
}

/// FNV-1a over `seed` then `bytes`; also used for stable fake digests.
pub fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// OpenAI's `encoding_format: "base64"`: the little-endian f32 array, standard base64 with
/// padding. The official Python SDK requests this by default, so it must work. The
/// encoding is the `base64` crate's, so a test's expected value does not come from here.
pub fn base64_f32_le(values: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_gives_same_unit_vector() {
        let a = vector("hello world", DEFAULT_DIMENSIONS);
        assert_eq!(a, vector("hello world", DEFAULT_DIMENSIONS));
        assert_ne!(a, vector("hello there", DEFAULT_DIMENSIONS));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn base64_f32_is_little_endian_standard_padded_base64() {
        // 1.0f32 is 0x3f800000: bytes 00 00 80 3f.
        assert_eq!(base64_f32_le(&[]), "");
        assert_eq!(base64_f32_le(&[1.0]), "AACAPw==");
        // Two floats (8 bytes) leave one padding character.
        assert_eq!(base64_f32_le(&[1.0, -2.0]), "AACAPwAAAMA=");
    }
}
