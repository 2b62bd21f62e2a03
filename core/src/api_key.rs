//! API key format `tg_<prefix>_<secret>`: the prefix is public and used for lookup,
//! the secret is only ever stored as an argon2id hash.

/// Length of the public prefix, in lowercase hex characters.
pub const PREFIX_LEN: usize = 12;
/// Length of the secret, in lowercase hex characters (192 bits).
pub const SECRET_LEN: usize = 48;
const MARK: &str = "tg_";

/// A presented key split into its parts. Borrowed so the secret is never copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub prefix: &'a str,
    pub secret: &'a str,
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses `tg_<prefix>_<secret>`; anything else is `None` (an unknown key).
pub fn parse(key: &str) -> Option<ParsedKey<'_>> {
    let rest = key.strip_prefix(MARK)?;
    let (prefix, secret) = rest.split_once('_')?;
    if prefix.len() != PREFIX_LEN || secret.len() != SECRET_LEN {
        return None;
    }
    if !is_lower_hex(prefix) || !is_lower_hex(secret) {
        return None;
    }
    Some(ParsedKey { prefix, secret })
}

/// Builds the key string from its parts (used once, at creation).
pub fn format(prefix: &str, secret: &str) -> String {
    format!("{MARK}{prefix}_{secret}")
}

/// Extracts the key from an `Authorization: Bearer …` value, or an `x-api-key` value
/// (Anthropic SDKs) passed as-is.
pub fn from_bearer(header: &str) -> Option<&str> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        let rest = rest.trim();
        (!rest.is_empty()).then_some(rest)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "0123456789ab";
    const S: &str = "00112233445566778899aabbccddeeff0011223344556677";

    #[test]
    fn well_formed_key_parses() {
        let k = format(P, S);
        assert_eq!(
            parse(&k),
            Some(ParsedKey {
                prefix: P,
                secret: S
            })
        );
    }

    #[test]
    fn malformed_keys_are_rejected() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("sk-abc"), None);
        assert_eq!(parse(&format!("tg_{P}{S}")), None);
        assert_eq!(parse(&format!("tg_{}_{S}", &P[1..])), None);
        assert_eq!(parse(&format!("tg_{P}_{}", &S[1..])), None);
        assert_eq!(parse(&format!("tg_{P}_{}", S.to_uppercase())), None);
        assert_eq!(parse(&format!("tg_{P}_{S}_")), None);
    }

    #[test]
    fn bearer_is_extracted() {
        assert_eq!(from_bearer("Bearer abc"), Some("abc"));
        assert_eq!(from_bearer("bearer   abc "), Some("abc"));
        assert_eq!(from_bearer("Basic abc"), None);
        assert_eq!(from_bearer("Bearer "), None);
        assert_eq!(from_bearer("abc"), None);
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// The reference grammar: `tg_`, 12 lowercase hex, `_`, 48 lowercase hex.
        fn reference(key: &str) -> Option<(&str, &str)> {
            let b = key.as_bytes();
            let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
            let ok = b.len() == 3 + PREFIX_LEN + 1 + SECRET_LEN
                && b.starts_with(b"tg_")
                && b[3 + PREFIX_LEN] == b'_'
                && hex(&b[3..3 + PREFIX_LEN])
                && hex(&b[4 + PREFIX_LEN..]);
            ok.then(|| (&key[3..3 + PREFIX_LEN], &key[4 + PREFIX_LEN..]))
        }

        fn hex(n: usize) -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![b'0'..=b'9', b'a'..=b'f'].prop_map(char::from),
                n,
            )
            .prop_map(|v| v.into_iter().collect())
        }

        /// Keys that are almost valid: mutated lengths, case, separators and characters,
        /// or a valid key with one character replaced.
        fn near_key() -> impl Strategy<Value = String> {
            let one_off = (hex(PREFIX_LEN), hex(SECRET_LEN), 0usize..64, any::<char>()).prop_map(
                |(p, s, at, c)| {
                    let mut chars: Vec<char> = format(&p, &s).chars().collect();
                    chars[at % 64] = c;
                    chars.into_iter().collect::<String>()
                },
            );
            let shapes = (
                prop_oneof![
                    Just("tg_"),
                    Just("TG_"),
                    Just("tg-"),
                    Just(""),
                    Just("tg__")
                ],
                "[0-9a-fA-F_g-]{10,14}",
                prop_oneof![Just("_"), Just("-"), Just("__"), Just("")],
                "[0-9a-fA-F_ é]{46,50}",
            )
                .prop_map(|(m, p, sep, s)| format!("{m}{p}{sep}{s}"));
            prop_oneof![one_off, shapes]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn parse_agrees_with_the_reference_grammar(s in prop_oneof!["\\PC{0,80}", near_key()]) {
                let got = parse(&s).map(|k| (k.prefix, k.secret));
                prop_assert_eq!(got, reference(&s));
            }

            #[test]
            fn format_then_parse_gives_the_parts_back(p in hex(PREFIX_LEN), s in hex(SECRET_LEN)) {
                let key = format(&p, &s);
                prop_assert_eq!(parse(&key), Some(ParsedKey { prefix: &p, secret: &s }));
            }

            #[test]
            fn a_parsed_key_formats_back_to_itself(s in near_key()) {
                if let Some(k) = parse(&s) {
                    prop_assert_eq!(format(k.prefix, k.secret), s);
                }
            }

            #[test]
            fn bearer_extraction_never_panics_and_returns_a_trimmed_token(h in "\\PC{0,60}") {
                if let Some(token) = from_bearer(&h) {
                    prop_assert!(!token.is_empty());
                    prop_assert_eq!(token, token.trim());
                    prop_assert!(h.contains(token));
                }
            }
        }
    }
}
