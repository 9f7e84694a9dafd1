//! Process settings: who the workers run as, the umask, the working directory, and which
//! peers may speak for clients through `X-Forwarded-For`.

use std::net::IpAddr;
use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};

/// The identity workers switch to after fork.
#[derive(Debug, Clone, PartialEq)]
pub struct RunAs {
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Which peers' `X-Forwarded-*` headers are believed.
#[derive(Debug, Clone, PartialEq)]
pub enum TrustedProxies {
    /// `"*"`: every peer (only behind a proxy that always sets the headers).
    All,
    List(Vec<IpAddr>),
}

impl TrustedProxies {
    pub fn trusts(&self, peer: IpAddr) -> bool {
        match self {
            TrustedProxies::All => true,
            TrustedProxies::List(ips) => ips
                .iter()
                .any(|ip| *ip == peer || ip.to_canonical() == peer.to_canonical()),
        }
    }
}

pub type FieldError = (&'static str, String);

/// `user` and `group` (names or numeric ids) -> uid and gid; the group defaults to the user's.
pub fn run_as(user: Option<String>, group: Option<String>) -> Result<Option<RunAs>, FieldError> {
    let Some(user) = user.filter(|u| !u.trim().is_empty()) else {
        if group.as_deref().is_some_and(|g| !g.trim().is_empty()) {
            return Err(("group", "needs `user` as well".into()));
        }
        return Ok(None);
    };
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(&user),
    };
    let found = match found {
        Ok(Some(found)) => found,
        Ok(None) => return Err(("user", format!("no such user \"{user}\" on this machine"))),
        Err(e) => return Err(("user", format!("cannot look up \"{user}\": {e}"))),
    };
    let gid = match group.filter(|g| !g.trim().is_empty()) {
        None => found.gid,
        Some(group) => {
            let g = match group.parse::<u32>() {
                Ok(gid) => Group::from_gid(Gid::from_raw(gid)),
                Err(_) => Group::from_name(&group),
            };
            match g {
                Ok(Some(g)) => g.gid,
                Ok(None) => {
                    return Err((
                        "group",
                        format!("no such group \"{group}\" on this machine"),
                    ))
                }
                Err(e) => return Err(("group", format!("cannot look up \"{group}\": {e}"))),
            }
        }
    };
    Ok(Some(RunAs {
        user: found.name,
        uid: found.uid,
        gid,
    }))
}

/// An octal permission string (`"0027"`, `"0o660"`) -> its value, at most 0o777.
pub fn octal(text: &str) -> Option<u32> {
    u32::from_str_radix(text.trim().trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
}

/// `umask = "0027"` -> 0o027.
pub fn umask(raw: Option<String>) -> Result<Option<u32>, FieldError> {
    match raw.filter(|s| !s.trim().is_empty()) {
        None => Ok(None),
        Some(text) => octal(&text).map(Some).ok_or((
            "umask",
            format!("\"{text}\" is not an octal mask like \"0027\""),
        )),
    }
}

pub fn chdir(raw: Option<String>) -> Result<Option<PathBuf>, FieldError> {
    match raw.filter(|s| !s.trim().is_empty()) {
        None => Ok(None),
        Some(dir) if std::path::Path::new(&dir).is_dir() => Ok(Some(PathBuf::from(dir))),
        Some(dir) => Err(("chdir", format!("\"{dir}\" is not a directory"))),
    }
}

/// Gunicorn's `forwarded_allow_ips`: addresses, or `"*"` (the default, loopback only, is
/// declared in [`super::keys::FORWARDED_ALLOW_IPS`]).
pub fn trusted_proxies(items: &[String]) -> Result<TrustedProxies, FieldError> {
    let items: Vec<String> = items
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if items.iter().any(|s| s == "*") {
        return Ok(TrustedProxies::All);
    }
    items
        .iter()
        .map(|s| {
            s.parse::<IpAddr>().map_err(|_| {
                (
                    "forwarded_allow_ips",
                    format!("\"{s}\" is not an IP address (or \"*\")"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(TrustedProxies::List)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_or_id() {
        let root = run_as(Some("root".into()), None).unwrap().unwrap();
        assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
        assert_eq!(
            run_as(Some("0".into()), Some("0".into()))
                .unwrap()
                .unwrap()
                .user,
            "root"
        );
        assert_eq!(
            run_as(Some("no-such-user-xyz".into()), None).unwrap_err().0,
            "user"
        );
        assert_eq!(run_as(None, Some("root".into())).unwrap_err().0, "group");
        assert_eq!(run_as(None, None).unwrap(), None);
    }

    #[test]
    fn forwarded_allow_ips_forms() {
        let loopback = ["127.0.0.1".to_string(), "::1".to_string()];
        let default = trusted_proxies(&loopback).unwrap();
        assert!(default.trusts("127.0.0.1".parse().unwrap()));
        assert!(default.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!default.trusts("10.0.0.1".parse().unwrap()));
        assert_eq!(trusted_proxies(&["*".into()]).unwrap(), TrustedProxies::All);
        assert!(trusted_proxies(&["10.0.0.1, 10.0.0.2".into()])
            .unwrap()
            .trusts("10.0.0.2".parse().unwrap()));
        assert!(trusted_proxies(&["nope".into()]).is_err());
        assert!(!trusted_proxies(&[])
            .unwrap()
            .trusts("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn umask_is_octal() {
        assert_eq!(umask(Some("0027".into())).unwrap(), Some(0o027));
        assert!(umask(Some("999".into())).is_err());
    }
}
