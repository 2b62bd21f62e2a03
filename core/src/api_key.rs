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
}
