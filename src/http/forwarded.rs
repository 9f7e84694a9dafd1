//! Who the client is: the peer address, or — when the peer is a trusted proxy
//! (`forwarded_allow_ips`; a unix-socket peer is always local, so trusted) — what its
//! `X-Forwarded-For` and `X-Forwarded-Proto` say.
//!
//! Fails closed: a forwarded header with any entry that is not an address makes the client
//! unknown, never local (so `127.0.0.1, <garbage>` does not open `/metrics`).

use std::net::IpAddr;

use hyper::HeaderMap;

use crate::config::process::TrustedProxies;

/// The client as the app and the access log see it; handed to the app with each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// `None` for a unix-socket peer without a forwarded address, or an unparseable one.
    pub ip: Option<IpAddr>,
    /// Whether the request came through a trusted proxy that said who the client is.
    pub forwarded: bool,
    pub https: bool,
    /// The trusted proxy sent an `X-Forwarded-For` that is not a list of addresses.
    pub unknown: bool,
}

impl Client {
    /// The address for the access log.
    pub fn host(&self) -> String {
        match self.ip {
            Some(ip) => ip.to_canonical().to_string(),
            None if self.unknown => "unknown".into(),
            None => "unix".into(),
        }
    }

    /// A loopback client (for internal endpoints such as /metrics).
    pub fn is_loopback(&self) -> bool {
        self.ip.is_some_and(|ip| ip.to_canonical().is_loopback())
    }

    /// On this machine: loopback, or a unix-socket peer nobody forwarded for. An unknown
    /// client is not local.
    pub fn is_local(&self) -> bool {
        !self.unknown && (self.ip.is_none() || self.is_loopback())
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`[::1]:80`, `1.2.3.4:80`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// `peer` is `None` for a unix-socket connection.
pub fn client(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &TrustedProxies) -> Client {
    let trusted_peer = peer.is_none_or(|ip| trusted.trusts(ip));
    let direct = Client {
        ip: peer,
        forwarded: false,
        https: false,
        unknown: false,
    };
    if !trusted_peer {
        return direct;
    }
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    let mut values = headers.get_all("x-forwarded-for").iter().peekable();
    if values.peek().is_none() {
        return Client { https, ..direct };
    }
    // Every entry must parse; the rightmost is the one our trusted proxy added.
    let mut last = None;
    for value in values {
        let Ok(text) = value.to_str() else {
            return unknown(https);
        };
        for entry in text.split(',') {
            match parse_entry(entry) {
                Some(ip) => last = Some(ip),
                None => return unknown(https),
            }
        }
    }
    match last {
        Some(ip) => Client {
            ip: Some(ip),
            forwarded: true,
            https,
            unknown: false,
        },
        None => unknown(https),
    }
}

fn unknown(https: bool) -> Client {
    Client {
        ip: None,
        forwarded: true,
        https,
        unknown: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().unwrap());
        h
    }

    #[test]
    fn only_trusted_peers_speak_for_clients() {
        let loopback_only = TrustedProxies::List(vec!["127.0.0.1".parse().unwrap()]);
        let via_nginx = client(
            Some("127.0.0.1".parse().unwrap()),
            &headers("198.51.100.9, 203.0.113.7"),
            &loopback_only,
        );
        assert_eq!(via_nginx.ip, Some("203.0.113.7".parse().unwrap()));
        assert!(via_nginx.forwarded && !via_nginx.is_loopback());
        let spoofed = client(
            Some("192.0.2.1".parse().unwrap()),
            &headers("127.0.0.1"),
            &loopback_only,
        );
        assert_eq!(spoofed.ip, Some("192.0.2.1".parse().unwrap()));
        let unix = client(None, &headers("203.0.113.7"), &TrustedProxies::List(vec![]));
        assert_eq!(unix.host(), "203.0.113.7");
        assert_eq!(
            client(None, &HeaderMap::new(), &loopback_only).host(),
            "unix"
        );
        assert!(client(None, &HeaderMap::new(), &loopback_only).is_local());
    }

    #[test]
    fn an_unparseable_entry_fails_closed() {
        let loopback_only = TrustedProxies::List(vec!["127.0.0.1".parse().unwrap()]);
        let peer = Some("127.0.0.1".parse().unwrap());
        for forged in [
            "127.0.0.1, garbage",
            "garbage, 127.0.0.1",
            "127.0.0.1,",
            "",
            "::1 x",
        ] {
            let c = client(peer, &headers(forged), &loopback_only);
            assert!(!c.is_local(), "{forged:?} looked local: {c:?}");
            assert_eq!(c.host(), "unknown", "{forged:?}");
        }
        let unix = client(None, &headers("127.0.0.1, garbage"), &loopback_only);
        assert!(!unix.is_local());
        let with_port = client(peer, &headers("203.0.113.7:4321"), &loopback_only);
        assert_eq!(with_port.ip, Some("203.0.113.7".parse().unwrap()));
        let local = client(peer, &headers("198.51.100.9, ::1"), &loopback_only);
        assert!(local.is_local());
    }
}
