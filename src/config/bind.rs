//! Parsing of `bind` entries: `host:port`, `[v6]:port`, `unix:/path`.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

/// Gunicorn's default port, used when a `bind` entry names only a host.
pub const DEFAULT_PORT: u16 = 8000;

/// One address to listen on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BindAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for BindAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindAddr::Tcp(addr) => write!(f, "{addr}"),
            BindAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl BindAddr {
    /// Parses one `bind` entry; the error text says what form was expected.
    pub fn parse(spec: &str) -> Result<BindAddr, String> {
        let spec = spec.trim();
        if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a path, e.g. \"unix:/run/ragpool/ragpool.sock\"".into());
            }
            return Ok(BindAddr::Unix(PathBuf::from(path)));
        }
        if spec.is_empty() {
            return Err(
                "empty address; expected \"host:port\", \"[v6]:port\" or \"unix:/path\"".into(),
            );
        }
        if let Ok(addr) = spec.parse::<SocketAddr>() {
            return Ok(BindAddr::Tcp(addr));
        }
        // A bare host (or bracketed v6) gets the default port, as in Gunicorn.
        let bare_v6 = spec.starts_with('[') && spec.ends_with(']');
        let with_port = if bare_v6 || !spec.contains(':') {
            format!("{spec}:{DEFAULT_PORT}")
        } else {
            spec.to_string()
        };
        match with_port.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .map(BindAddr::Tcp)
                .ok_or_else(|| format!("`{spec}` resolves to no address")),
            Err(e) => Err(format!(
                "`{spec}` is not \"host:port\", \"[v6]:port\" or \"unix:/path\" ({e})"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            BindAddr::parse("127.0.0.1:9000").unwrap(),
            BindAddr::Tcp("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(
            BindAddr::parse("[::1]:9000").unwrap(),
            BindAddr::Tcp("[::1]:9000".parse().unwrap())
        );
        assert_eq!(
            BindAddr::parse("127.0.0.1").unwrap(),
            BindAddr::Tcp("127.0.0.1:8000".parse().unwrap())
        );
        assert_eq!(
            BindAddr::parse("unix:/tmp/x.sock").unwrap(),
            BindAddr::Unix("/tmp/x.sock".into())
        );
        assert!(BindAddr::parse("unix:").is_err());
        assert!(BindAddr::parse("127.0.0.1:notaport").is_err());
        assert!(BindAddr::parse("").is_err());
    }
}
