//! Who the client is: the peer address, or — when the peer is a trusted proxy
//! (`forwarded_allow_ips`; a unix-socket peer is always local, so trusted) — what its
//! `X-Forwarded-For` and `X-Forwarded-Proto` say.

use std::net::IpAddr;

use hyper::HeaderMap;

use crate::config::process::TrustedProxies;

/// The client as the app and the access log see it; handed to the app with each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// `None` for a unix-socket peer without a forwarded address.
    pub ip: Option<IpAddr>,
    /// Whether the request came through a trusted proxy that said who the client is.
    pub forwarded: bool,
    pub https: bool,
}

impl Client {
    /// The address for the access log.
    pub fn host(&self) -> String {
        self.ip
            .map(|ip| ip.to_canonical().to_string())
            .unwrap_or_else(|| "unix".into())
    }

    /// A loopback client (for internal endpoints such as /metrics).
    pub fn is_loopback(&self) -> bool {
        self.ip.is_some_and(|ip| ip.to_canonical().is_loopback())
    }
}

/// `peer` is `None` for a unix-socket connection.
pub fn client(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &TrustedProxies) -> Client {
    let trusted_peer = peer.is_none_or(|ip| trusted.trusts(ip));
    let direct = Client {
        ip: peer,
        forwarded: false,
        https: false,
    };
    if !trusted_peer {
        return direct;
    }
    // The rightmost entry is the one our trusted proxy added.
    let forwarded_ip = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .next_back();
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    match forwarded_ip {
        Some(ip) => Client {
            ip: Some(ip),
            forwarded: true,
            https,
        },
        None => Client { https, ..direct },
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
    }
}
