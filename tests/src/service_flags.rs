//! What a service binary says about its flags in `--help`: the environment variable behind
//! each flag and its default. Static checks compare manifests with the binaries themselves,
//! not with copies of their defaults.

use std::path::Path;
use std::process::Command;

/// One `--flag` of a clap `--help` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// `--http-listen`.
    pub long: String,
    /// `TOLLGATE_RATELIMIT_HTTP_LISTEN`, when the flag can come from the environment.
    pub env: Option<String>,
    /// `127.0.0.1:10012`, when the flag has a default.
    pub default: Option<String>,
}

/// The text between `open` and the next `close` after it.
fn between<'a>(text: &'a str, open: &str, close: char) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(close)?;
    Some(&text[start..start + len])
}

/// Parses a clap help text: every option starts a line with `-`; its description, on the
/// same or the following lines, carries `[env: NAME=]` and `[default: VALUE]`.
pub fn parse_help(help: &str) -> Vec<Flag> {
    let mut blocks: Vec<String> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') {
            blocks.push(trimmed.to_string());
        } else if let Some(last) = blocks.last_mut() {
            last.push(' ');
            last.push_str(trimmed);
        }
    }
    blocks
        .iter()
        .filter_map(|b| {
            let long = b
                .split_whitespace()
                .map(|w| w.trim_end_matches(','))
                .find(|w| w.starts_with("--"))?;
            Some(Flag {
                long: long.to_string(),
                env: between(b, "[env: ", '=').map(String::from),
                default: between(b, "[default: ", ']').map(String::from),
            })
        })
        .collect()
}

/// The flags of `binary`, from running it with `--help`.
pub fn flags(binary: &Path) -> Result<Vec<Flag>, String> {
    let out = Command::new(binary)
        .arg("--help")
        .output()
        .map_err(|e| format!("{}: {e} (build it first)", binary.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --help failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(parse_help(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_default_are_read_from_one_line_and_wrapped_help() {
        let help = "Usage: x [OPTIONS]\n\nOptions:\n      --listen <LISTEN>  Address [env: X_LISTEN=] [default: 127.0.0.1:1]\n      --http-listen <HTTP_LISTEN>\n          Plain-HTTP address\n          [env: X_HTTP_LISTEN=] [default: 127.0.0.1:2]\n      --config <CONFIG>  File [env: X_CONFIG=]\n  -h, --help  Print help\n";
        let flags = parse_help(help);
        assert_eq!(
            flags[0],
            Flag {
                long: "--listen".into(),
                env: Some("X_LISTEN".into()),
                default: Some("127.0.0.1:1".into()),
            }
        );
        assert_eq!(flags[1].env.as_deref(), Some("X_HTTP_LISTEN"));
        assert_eq!(flags[1].default.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(flags[2].default, None);
        assert_eq!(flags[3].long, "--help");
        assert_eq!(flags[3].env, None);
    }
}
