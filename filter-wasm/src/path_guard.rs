//! Owns the blocked-endpoint decision: is a request `:path` one of the model server's mutating
//! endpoints (Ollama `/api/pull`, `/api/blobs/…`, …), whatever disguise it wears?
//!
//! The filter forwards the path unchanged; only the decision uses normalised forms. Servers
//! disagree on how to read a path (Go's `net/http` + gin, which Ollama uses, decodes once and
//! routes on the result without resolving dots; uvicorn/Starlette do the same; RFC 3986
//! normalisers such as Envoy's `normalize_path` resolve dots *before* decoding; Tomcat-style
//! servers drop `;params`; Windows-style ones split on `\`), so the guard blocks a path when
//! **any** of these readings lands on a blocked endpoint, and rejects (400 `invalid_path`) a path
//! it cannot read unambiguously. Blocking too much only ever costs a legitimate client a 4xx on a
//! path no API uses; blocking too little lets a client pull models onto the server.
//!
//! Rejected as `invalid_path`:
//! - a path that does not start with `/` (only the asterisk-form `*` is let through: it has no
//!   path to route on);
//! - `%` not followed by two hex digits, at any decoding round (`%zz`, `%2`, IIS `%u0070`);
//! - still percent-encoded after [`MAX_DECODE_ROUNDS`] rounds (`%25252570`): no client encodes
//!   three times, and every round would need checking;
//! - decoded bytes that are not UTF-8 (overlong `%c0%af` for `/` included), or control
//!   characters (NUL, CR/LF, tab, DEL, C1): they truncate or split paths in some servers;
//! - a decoded `?` or `#` (from `%3F`, `%23`): read as a delimiter it hides what follows, read
//!   as a character it hides what precedes, and no model API path carries one.
//!
//! Normalised, in each reading (see [`decide`]):
//! - the query and fragment are cut at the first raw `?` or `#` (what every server does);
//! - percent-decoding is repeated until stable, so `%2570` (`%70` once decoded) is caught;
//!   `%2F` becomes a separator once decoded, as in Go's `URL.Path` that gin routes on;
//! - `\` is a separator like `/` (Windows-style servers, and browsers, treat it so);
//! - empty segments are dropped, so repeated slashes merge and a trailing slash goes away
//!   (gin redirects `/api/pull/` to `/api/pull`, which a client then follows);
//! - a `;params` suffix is cut from each segment, before dot handling, so Tomcat-style `..;`
//!   is `..`;
//! - whitespace around each segment is trimmed (`%20`, NBSP, …), since some frameworks strip it;
//! - case is folded: ASCII, plus the four non-ASCII letters whose Unicode case mapping is ASCII
//!   (`ı` `İ` → `i`, `ſ` → `s`, `K` Kelvin → `k`), which case-insensitive Go/Python matching
//!   would equate with the blocked names;
//! - `.` and `..` segments are resolved, never above the root — in the readings that resolve.
//!
//! Not normalised, on purpose: Unicode compatibility forms (fullwidth `ｐｕｌｌ`), zero-width
//! characters and Windows trailing dots: no Go or Python router maps them onto ASCII names.
//! Paths rewritten *after* this filter (a route's `prefix_rewrite`) are not seen here: list the
//! pre-rewrite paths in the configuration too.

/// Decoding rounds after which a path that still holds `%` is rejected. Two rounds are needed
/// for double encoding (`%2570`); a third is allowed for paths that passed through one proxy
/// that re-encoded them.
pub const MAX_DECODE_ROUNDS: usize = 3;

/// What the filter does with a request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No reading of the path reaches a blocked endpoint.
    Allow,
    /// Some reading of the path reaches a blocked endpoint: answer 403.
    Block,
    /// The path cannot be read unambiguously: answer 400.
    Invalid(InvalidPath),
}

/// Why a path was rejected as `invalid_path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidPath {
    NotOriginForm,
    BadPercentEscape,
    TooDeeplyEncoded,
    NotUtf8,
    ControlCharacter,
    EncodedDelimiter,
}

impl std::fmt::Display for InvalidPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InvalidPath::NotOriginForm => "the request path must start with '/'",
            InvalidPath::BadPercentEscape => "the request path has an invalid percent escape",
            InvalidPath::TooDeeplyEncoded => "the request path is percent-encoded too many times",
            InvalidPath::NotUtf8 => "the request path does not decode to UTF-8",
            InvalidPath::ControlCharacter => "the request path contains a control character",
            InvalidPath::EncodedDelimiter => "the request path contains an encoded '?' or '#'",
        })
    }
}

/// Blocked endpoints, held in normalised form: exact paths, and prefixes that block a path equal
/// to the prefix or below it (matched on segment boundaries: `/api/blobs` blocks `/api/blobs` and
/// `/api/blobs/x`, not `/api/blobsx`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocklist {
    paths: Vec<String>,
    prefixes: Vec<String>,
}

/// A blocklist entry that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry {
    pub kind: EntryKind,
    pub entry: String,
    pub reason: String,
}

/// Which list a blocklist entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Path,
    Prefix,
}

impl Blocklist {
    /// Builds a blocklist, normalising every entry the way request paths are normalised.
    /// An entry must start with `/`, carry no query or fragment, and normalise cleanly.
    pub fn new<S: AsRef<str>>(paths: &[S], prefixes: &[S]) -> Result<Self, BadEntry> {
        let normalise_all = |kind, entries: &[S]| -> Result<Vec<String>, BadEntry> {
            entries
                .iter()
                .map(|e| normalise_entry(kind, e.as_ref()))
                .collect()
        };
        Ok(Blocklist {
            paths: normalise_all(EntryKind::Path, paths)?,
            prefixes: normalise_all(EntryKind::Prefix, prefixes)?,
        })
    }

    /// Blocks every path. The fail-closed stand-in when no usable list exists.
    pub fn everything() -> Self {
        Blocklist {
            paths: Vec::new(),
            prefixes: vec!["/".to_owned()],
        }
    }

    /// The normalised exact paths.
    pub fn paths(&self) -> &[String] {
        &self.paths
    }

    /// The normalised prefixes.
    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }

    /// Whether a normalised path is blocked.
    fn matches(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p == path) || self.prefixes.iter().any(|p| is_under(path, p))
    }
}

fn normalise_entry(kind: EntryKind, entry: &str) -> Result<String, BadEntry> {
    let bad = |reason: String| BadEntry {
        kind,
        entry: entry.to_owned(),
        reason,
    };
    if !entry.starts_with('/') {
        return Err(bad("must start with '/'".to_owned()));
    }
    if entry.contains(['?', '#']) {
        return Err(bad("must not contain a query or fragment".to_owned()));
    }
    normalise(entry).map_err(|e| bad(e.to_string()))
}

/// `path` equals `prefix` or lies below it.
fn is_under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Decides whether a request `:path` may pass.
///
/// The path is read several ways and blocked if any reading is blocked: after each decoding
/// round `k` (0 = as received) it is split into segments, each segment is then fully decoded
/// and cleaned, and the segments are joined once with `.`/`..` resolved and once literally.
/// Splitting after round 0 is how RFC 3986 normalisers see `/api/pu%6cl/a%2F../..` (that is
/// `/api/pull`); splitting after the last round is how Go sees `/api%2Fpull`; the literal join
/// is how gin sees `/api/blobs/..` (the blob handler, digest `..`).
pub fn decide(path: &str, blocklist: &Blocklist) -> Decision {
    if path == "*" {
        return Decision::Allow;
    }
    let decoded = match decode_path(path) {
        Ok(decoded) => decoded,
        Err(e) => return Decision::Invalid(e),
    };
    for level in decoded.earlier.iter().chain([&decoded.last]) {
        for resolve_dots in [true, false] {
            match reading(level, resolve_dots) {
                Ok(p) if blocklist.matches(&p) => return Decision::Block,
                Ok(_) => {}
                Err(e) => return Decision::Invalid(e),
            }
        }
    }
    Decision::Allow
}

/// The canonical normalised form of a path: fully decoded, then split, cleaned and resolved.
/// This is the form blocklist entries are stored in.
pub fn normalise(path: &str) -> Result<String, InvalidPath> {
    reading(&decode_path(path)?.last, true)
}

/// A path after each decoding round.
struct Rounds {
    /// As received (index 0), then after each round but the last.
    earlier: Vec<Vec<u8>>,
    /// After the last round: no `%` left.
    last: Vec<u8>,
}

/// Cuts query and fragment, decodes, and checks everything listed as rejected in the module docs.
fn decode_path(path: &str) -> Result<Rounds, InvalidPath> {
    let path = path.find(['?', '#']).map_or(path, |end| &path[..end]);
    if !path.starts_with('/') {
        return Err(InvalidPath::NotOriginForm);
    }
    let rounds = decode_until_stable(path.as_bytes())?;
    check_decoded(&rounds.last)?;
    Ok(rounds)
}

fn decode_until_stable(input: &[u8]) -> Result<Rounds, InvalidPath> {
    let mut earlier = Vec::new();
    let mut current = input.to_vec();
    while current.contains(&b'%') {
        if earlier.len() == MAX_DECODE_ROUNDS {
            return Err(InvalidPath::TooDeeplyEncoded);
        }
        let next = percent_decode_once(&current)?;
        earlier.push(std::mem::replace(&mut current, next));
    }
    Ok(Rounds {
        earlier,
        last: current,
    })
}

/// Checks the fully decoded path. Every byte of an earlier round survives into it, so this
/// covers raw control bytes as well as decoded ones.
fn check_decoded(decoded: &[u8]) -> Result<(), InvalidPath> {
    let text = std::str::from_utf8(decoded).map_err(|_| InvalidPath::NotUtf8)?;
    for c in text.chars() {
        if c.is_control() {
            return Err(InvalidPath::ControlCharacter);
        }
        if c == '?' || c == '#' {
            return Err(InvalidPath::EncodedDelimiter);
        }
    }
    Ok(())
}

/// One round of percent-decoding; a bad escape is an error.
pub(crate) fn percent_decode_once(input: &[u8]) -> Result<Vec<u8>, InvalidPath> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.iter().copied();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = bytes.next().and_then(hex_value);
            let lo = bytes.next().and_then(hex_value);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push((hi << 4) | lo),
                _ => return Err(InvalidPath::BadPercentEscape),
            }
        } else {
            out.push(b);
        }
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One reading of a path: split `level` on `/` and `\`, decode and clean each segment, join.
fn reading(level: &[u8], resolve_dots: bool) -> Result<String, InvalidPath> {
    let mut segments: Vec<String> = Vec::new();
    for raw in level.split(|b| *b == b'/' || *b == b'\\') {
        let decoded = decode_until_stable(raw)?.last;
        let decoded = String::from_utf8(decoded).map_err(|_| InvalidPath::NotUtf8)?;
        let segment = clean_segment(&decoded);
        match segment.as_str() {
            "" => {}
            "." if resolve_dots => {}
            ".." if resolve_dots => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    Ok(format!("/{}", segments.join("/")))
}

/// Cuts `;params`, trims surrounding whitespace, folds case.
fn clean_segment(segment: &str) -> String {
    let segment = segment.split_once(';').map_or(segment, |(name, _)| name);
    segment.trim().chars().map(fold_case).collect()
}

fn fold_case(c: char) -> char {
    match c {
        'A'..='Z' => c.to_ascii_lowercase(),
        '\u{0130}' | '\u{0131}' => 'i',
        '\u{017F}' => 's',
        '\u{212A}' => 'k',
        _ => c,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ollama_defaults() -> Blocklist {
        Blocklist::new(
            &[
                "/api/pull",
                "/api/push",
                "/api/create",
                "/api/copy",
                "/api/delete",
            ],
            &["/api/blobs/"],
        )
        .unwrap()
    }

    /// One test per path, named for the behaviour it pins down.
    macro_rules! path_cases {
        ($($name:ident: $path:expr => $expected:pat,)*) => {$(
            #[test]
            fn $name() {
                let decision = decide($path, &ollama_defaults());
                assert!(
                    matches!(decision, $expected),
                    "{:?} gave {:?}, expected {}",
                    $path,
                    decision,
                    stringify!($expected)
                );
            }
        )*};
    }

    path_cases! {
        plain_pull_is_blocked: "/api/pull" => Decision::Block,
        every_default_exact_path_is_blocked_push: "/api/push" => Decision::Block,
        every_default_exact_path_is_blocked_create: "/api/create" => Decision::Block,
        every_default_exact_path_is_blocked_copy: "/api/copy" => Decision::Block,
        every_default_exact_path_is_blocked_delete: "/api/delete" => Decision::Block,
        uppercase_path_is_blocked: "/API/PULL" => Decision::Block,
        mixed_case_path_is_blocked: "/Api/PuLl" => Decision::Block,
        repeated_slashes_are_merged: "//api//pull" => Decision::Block,
        dot_segment_is_resolved: "/api/./pull" => Decision::Block,
        dot_dot_inside_path_is_resolved: "/api/x/../pull" => Decision::Block,
        dot_dot_before_api_is_resolved: "/x/../api/pull" => Decision::Block,
        dot_dot_above_root_stays_at_root: "/../../api/pull" => Decision::Block,
        trailing_slash_is_removed: "/api/pull/" => Decision::Block,
        trailing_dot_segment_is_removed: "/api/pull/." => Decision::Block,
        query_is_stripped: "/api/pull?x=1" => Decision::Block,
        fragment_is_stripped: "/api/pull#f" => Decision::Block,
        empty_query_is_stripped: "/api/pull?" => Decision::Block,
        percent_encoded_letter_is_decoded: "/api/%70ull" => Decision::Block,
        percent_encoded_last_letter_is_decoded: "/api/pul%6C" => Decision::Block,
        lowercase_hex_escape_is_decoded: "/api/pul%6c" => Decision::Block,
        fully_encoded_segment_is_decoded: "/%61%70%69/%70%75%6c%6c" => Decision::Block,
        encoded_slash_is_a_separator: "/api%2Fpull" => Decision::Block,
        lowercase_encoded_slash_is_a_separator: "/api%2fpull" => Decision::Block,
        double_encoded_letter_is_decoded: "/api/%2570ull" => Decision::Block,
        double_encoded_slash_is_a_separator: "/api%252Fpull" => Decision::Block,
        triple_encoded_letter_is_decoded: "/api/%252570ull" => Decision::Block,
        backslash_is_a_separator: "/api\\pull" => Decision::Block,
        encoded_backslash_is_a_separator: "/api%5Cpull" => Decision::Block,
        matrix_parameter_is_stripped: "/api/pull;x=1" => Decision::Block,
        matrix_parameter_on_parent_segment_is_stripped: "/api;v=1/pull" => Decision::Block,
        encoded_semicolon_parameter_is_stripped: "/api/pull%3Bx" => Decision::Block,
        tomcat_dot_dot_semicolon_is_resolved: "/x/..;/api/pull" => Decision::Block,
        blob_digest_is_blocked: "/api/blobs/sha256:abc" => Decision::Block,
        blob_prefix_is_case_folded: "/api/BLOBS/x" => Decision::Block,
        blobs_root_itself_is_blocked: "/api/blobs" => Decision::Block,
        blobs_root_with_slash_is_blocked: "/api/blobs/" => Decision::Block,
        blob_digest_named_dot_dot_is_blocked_as_gin_routes_it: "/api/blobs/.." => Decision::Block,
        blob_digest_named_encoded_dot_dot_is_blocked: "/api/blobs/%2e%2e" => Decision::Block,
        blob_below_dot_dot_escape_is_blocked: "/api/blobs/x/.." => Decision::Block,
        encoded_dot_dot_at_root_is_resolved: "/%2e%2e/api/pull" => Decision::Block,
        uppercase_encoded_dot_dot_is_resolved: "/x/%2E%2E/api/pull" => Decision::Block,
        encoded_dot_segment_is_resolved: "/api/%2e/pull" => Decision::Block,
        dot_dot_resolved_before_decoding_is_caught: "/api/pu%6cl/a%2F../.." => Decision::Block,
        trailing_encoded_space_is_trimmed: "/api/pull%20" => Decision::Block,
        leading_encoded_space_is_trimmed: "/api/%20pull" => Decision::Block,
        raw_space_is_trimmed: "/api/pull " => Decision::Block,
        encoded_no_break_space_is_trimmed: "/api/pull%C2%A0" => Decision::Block,
        whitespace_only_segment_is_dropped: "/api/%20/pull" => Decision::Block,
        dotless_i_folds_to_i: "/ap%C4%B1/pull" => Decision::Block,
        dotted_capital_i_folds_to_i: "/AP%C4%B0/PULL" => Decision::Block,
        long_s_folds_to_s: "/api/pu%C5%BFh" => Decision::Block,
        encoded_trailing_slash_is_removed: "/api/pull%2F" => Decision::Block,

        decoded_nul_is_invalid: "/api/pull%00" => Decision::Invalid(InvalidPath::ControlCharacter),
        raw_nul_is_invalid: "/api/pull\0" => Decision::Invalid(InvalidPath::ControlCharacter),
        decoded_crlf_is_invalid: "/api/chat%0D%0Ax" => Decision::Invalid(InvalidPath::ControlCharacter),
        decoded_tab_is_invalid: "/api/pull%09" => Decision::Invalid(InvalidPath::ControlCharacter),
        decoded_del_is_invalid: "/api/pull%7F" => Decision::Invalid(InvalidPath::ControlCharacter),
        decoded_c1_control_is_invalid: "/api/pull%C2%85" => Decision::Invalid(InvalidPath::ControlCharacter),
        double_encoded_nul_is_invalid: "/api/pull%2500" => Decision::Invalid(InvalidPath::ControlCharacter),
        non_hex_escape_is_invalid: "/api/%zzull" => Decision::Invalid(InvalidPath::BadPercentEscape),
        truncated_escape_is_invalid: "/api/pull%2" => Decision::Invalid(InvalidPath::BadPercentEscape),
        lone_percent_is_invalid: "/api/chat%" => Decision::Invalid(InvalidPath::BadPercentEscape),
        iis_unicode_escape_is_invalid: "/api/%u0070ull" => Decision::Invalid(InvalidPath::BadPercentEscape),
        escape_invalid_after_one_decoding_is_invalid: "/api/%25zz" => Decision::Invalid(InvalidPath::BadPercentEscape),
        quadruple_encoding_is_invalid: "/api/%25252570ull" => Decision::Invalid(InvalidPath::TooDeeplyEncoded),
        overlong_utf8_slash_is_invalid: "/api%c0%afpull" => Decision::Invalid(InvalidPath::NotUtf8),
        invalid_utf8_is_invalid: "/api/%ff" => Decision::Invalid(InvalidPath::NotUtf8),
        encoded_question_mark_is_invalid: "/api/pull%3Fx=1" => Decision::Invalid(InvalidPath::EncodedDelimiter),
        encoded_hash_is_invalid: "/x%23/../api/pull" => Decision::Invalid(InvalidPath::EncodedDelimiter),
        empty_path_is_invalid: "" => Decision::Invalid(InvalidPath::NotOriginForm),
        relative_path_is_invalid: "api/pull" => Decision::Invalid(InvalidPath::NotOriginForm),
        absolute_form_is_invalid: "http://ollama/api/pull" => Decision::Invalid(InvalidPath::NotOriginForm),
        leading_backslash_is_invalid: "\\api\\pull" => Decision::Invalid(InvalidPath::NotOriginForm),
        leading_encoded_slash_is_invalid: "%2Fapi/pull" => Decision::Invalid(InvalidPath::NotOriginForm),

        chat_passes: "/api/chat" => Decision::Allow,
        tags_passes: "/api/tags" => Decision::Allow,
        show_passes: "/api/show" => Decision::Allow,
        openai_chat_completions_passes: "/v1/chat/completions" => Decision::Allow,
        openai_models_passes: "/v1/models" => Decision::Allow,
        longer_name_sharing_a_blocked_prefix_passes: "/api/pullx" => Decision::Allow,
        blobs_lookalike_name_passes: "/api/blobsx" => Decision::Allow,
        path_below_exact_blocked_path_passes: "/api/pull/x" => Decision::Allow,
        dot_dot_after_lookalike_resolves_to_api_and_passes: "/api/pulls/.." => Decision::Allow,
        dot_dot_after_pull_resolves_to_api_and_passes: "/api/pull/.." => Decision::Allow,
        blocked_path_in_query_passes: "/v1/models?x=/api/pull" => Decision::Allow,
        blocked_path_in_fragment_passes: "/v1/models#/api/pull" => Decision::Allow,
        encoded_question_mark_in_query_passes: "/v1/models?q=%3F%00" => Decision::Allow,
        model_name_with_encoded_slash_passes: "/v1/models/hf.co%2Forg%2Fmodel" => Decision::Allow,
        model_name_with_colon_passes: "/api/show/llama3:8b" => Decision::Allow,
        non_ascii_model_name_passes: "/v1/models/mod%C3%A8le" => Decision::Allow,
        root_passes: "/" => Decision::Allow,
        asterisk_form_passes: "*" => Decision::Allow,
    }

    #[test]
    fn normalise_gives_canonical_form() {
        assert_eq!(
            normalise("//API\\x/..;p/%2570ull%2F/").unwrap(),
            "/api/pull"
        );
        assert_eq!(normalise("/").unwrap(), "/");
        assert_eq!(normalise("/../..").unwrap(), "/");
    }

    #[test]
    fn kelvin_sign_folds_to_k() {
        let list = Blocklist::new(&["/api/keys"], &[]).unwrap();
        assert_eq!(decide("/api/%E2%84%AAeys", &list), Decision::Block);
    }

    #[test]
    fn root_prefix_blocks_everything() {
        let all = Blocklist::new(&[], &["/"]).unwrap();
        assert_eq!(all, Blocklist::everything());
        assert_eq!(decide("/", &all), Decision::Block);
        assert_eq!(decide("/v1/models", &all), Decision::Block);
    }

    #[test]
    fn empty_blocklist_allows_blocked_defaults() {
        let none = Blocklist::new::<&str>(&[], &[]).unwrap();
        assert_eq!(decide("/api/pull", &none), Decision::Allow);
        // Invalid paths stay invalid whatever the list.
        assert_eq!(
            decide("/api/pull%00", &none),
            Decision::Invalid(InvalidPath::ControlCharacter)
        );
    }

    #[test]
    fn entries_are_normalised_on_load() {
        let list = Blocklist::new(&["/API//Pull/"], &["/Api/%42lobs/"]).unwrap();
        assert_eq!(list.paths(), ["/api/pull"]);
        assert_eq!(list.prefixes(), ["/api/blobs"]);
    }

    #[test]
    fn entry_without_leading_slash_is_rejected() {
        let err = Blocklist::new(&["api/pull"], &[]).unwrap_err();
        assert_eq!(err.entry, "api/pull");
        assert_eq!(err.kind, EntryKind::Path);
    }

    #[test]
    fn entry_with_query_or_bad_escape_is_rejected() {
        assert!(Blocklist::new(&["/api/pull?x"], &[]).is_err());
        assert!(Blocklist::new(&[], &["/api/%zz"]).is_err());
        assert!(Blocklist::new(&[""], &[]).is_err());
    }
}
