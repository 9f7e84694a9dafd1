//! Configuration errors, each naming where the bad value came from (file and line, environment
//! variable, or command-line flag) and which key it was.

use std::fmt;
use std::path::PathBuf;

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A line of the config file (1-based), when it could be located.
    File { path: PathBuf, line: Option<usize> },
    /// A `RAGPOOL_*` environment variable.
    Env(String),
    /// A command-line flag such as `--workers`.
    Flag(String),
    /// A built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{line}", path.display()),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "command-line flag {flag}"),
            Origin::Default => write!(f, "built-in default"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "config file {} is gone (ragpool has read it before); refusing to fall back to \
         built-in defaults",
        path.display()
    )]
    Vanished { path: PathBuf },
    #[error(
        "config file {} sets no key (empty, or only comments); refused so that a truncated \
         file cannot reset the pool to built-in defaults",
        path.display()
    )]
    Empty { path: PathBuf },
    #[error("{origin}: {message}")]
    Syntax { origin: Origin, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Invalid {
        origin: Origin,
        key: String,
        message: String,
    },
    #[error("{origin}: unknown key `{key}`{}", suggestion_text(suggestion))]
    UnknownKey {
        origin: Origin,
        key: String,
        suggestion: Option<&'static str>,
    },
}

fn suggestion_text(suggestion: &Option<&'static str>) -> String {
    match suggestion {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::from(" (see workers.toml in the ragpool repository for every key)"),
    }
}

impl ConfigError {
    /// The key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } | ConfigError::UnknownKey { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// The closest known key to a misspelt one, if it is close enough to be a likely typo.
pub fn suggest(unknown: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over chars; keys are short, so the quadratic table is fine.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_misses_only() {
        let keys = &["workers", "timeout", "graceful_timeout", "bind"];
        assert_eq!(suggest("wokers", keys), Some("workers"));
        assert_eq!(suggest("timout", keys), Some("timeout"));
        assert_eq!(suggest("gracefull_timeout", keys), Some("graceful_timeout"));
        assert_eq!(suggest("colour", keys), None);
    }
}
