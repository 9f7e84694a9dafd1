//! Listening sockets: bound by the master before any fork, inherited by workers.
//!
//! With `reuse_port = false` (the default) every worker accepts on the same sockets. With
//! `reuse_port = true` the master keeps one bound, non-listening `SO_REUSEPORT` socket per TCP
//! address to hold the port, and makes a fresh listening socket for each worker at spawn time;
//! the kernel then spreads connections across workers. Unix sockets are always shared.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{BindAddr, Config};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: BindAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on unix:{}: another process is accepting connections there", path.display())]
    UnixInUse { path: PathBuf },
    #[error("cannot listen on unix:{}: the path exists and is not a socket; remove it or choose another", path.display())]
    UnixNotSocket { path: PathBuf },
}

/// One bound address.
pub struct Listener {
    /// The address as configured (port 0 stays 0 here; see `local`).
    pub addr: BindAddr,
    /// The address actually bound (the kernel's port when 0 was asked for).
    pub local: BindAddr,
    /// Shared listening socket, or in reuse-port mode the port-holding socket.
    socket: Socket,
    /// Whether `socket` is listening (false only for a reuse-port holder).
    listening: bool,
    /// Whether we created the unix socket file and so must remove it.
    owns_path: bool,
}

impl Listener {
    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Whether this socket is what `addr` asks for: the same address, or, for a configured
    /// port 0 ("any free port"), the port the kernel chose on the same IP.
    pub fn serves(&self, addr: &BindAddr) -> bool {
        match (addr, &self.local) {
            _ if &self.addr == addr => true,
            (BindAddr::Tcp(want), BindAddr::Tcp(have)) => {
                want.port() == 0 && want.ip() == have.ip()
            }
            _ => false,
        }
    }

    pub fn is_reuse_port_holder(&self) -> bool {
        !self.listening
    }

    /// A duplicate handle on the same socket (used to carry a listener into the next generation).
    pub fn try_clone(&self) -> io::Result<Listener> {
        Ok(Listener {
            addr: self.addr.clone(),
            local: self.local.clone(),
            socket: self.socket.try_clone()?,
            listening: self.listening,
            owns_path: false,
        })
    }

    /// Hands the path's ownership to whoever holds the clone; this one will not unlink it.
    pub fn disown_path(&mut self) -> bool {
        std::mem::replace(&mut self.owns_path, false)
    }

    pub fn set_owns_path(&mut self, owns: bool) {
        self.owns_path = owns;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let (true, BindAddr::Unix(path)) = (self.owns_path, &self.addr) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds one address per the config. `reuse_port` applies to TCP addresses only.
pub fn bind(addr: &BindAddr, config: &Config) -> Result<Listener, ListenError> {
    let err = |source: io::Error| ListenError::Bind {
        addr: addr.clone(),
        source,
    };
    match addr {
        BindAddr::Tcp(sock) => {
            let socket = tcp_socket(*sock, config.reuse_port).map_err(err)?;
            if !config.reuse_port {
                socket.listen(config.backlog).map_err(err)?;
            }
            let local = socket
                .local_addr()
                .map_err(err)?
                .as_socket()
                .map(BindAddr::Tcp)
                .unwrap_or_else(|| addr.clone());
            Ok(Listener {
                addr: addr.clone(),
                local,
                socket,
                listening: !config.reuse_port,
                owns_path: false,
            })
        }
        BindAddr::Unix(path) => {
            remove_stale_unix_socket(path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(err)?;
            socket
                .bind(&SockAddr::unix(path).map_err(err)?)
                .map_err(err)?;
            std::fs::set_permissions(
                path,
                std::fs::Permissions::from_mode(config.unix_socket_mode),
            )
            .map_err(err)?;
            socket.listen(config.backlog).map_err(err)?;
            Ok(Listener {
                addr: addr.clone(),
                local: addr.clone(),
                socket,
                listening: true,
                owns_path: true,
            })
        }
    }
}

fn tcp_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // "[::]:8000" means IPv6 only, so "0.0.0.0:8000" can be bound beside it.
        socket.set_only_v6(true)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// A fresh listening `SO_REUSEPORT` socket for one worker, on the holder's resolved address.
pub fn reuse_port_socket(holder: &Listener, backlog: i32) -> Result<OwnedFd, ListenError> {
    let BindAddr::Tcp(local) = holder.local else {
        return holder
            .socket
            .try_clone()
            .map(OwnedFd::from)
            .map_err(|source| ListenError::Bind {
                addr: holder.addr.clone(),
                source,
            });
    };
    let err = |source| ListenError::Bind {
        addr: holder.addr.clone(),
        source,
    };
    let socket = tcp_socket(local, true).map_err(err)?;
    socket.listen(backlog).map_err(err)?;
    Ok(OwnedFd::from(socket))
}

/// A leftover socket file from a crashed server is removed; a live one or a non-socket is an error.
fn remove_stale_unix_socket(path: &Path) -> Result<(), ListenError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(_) => return Ok(()),
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::UnixNotSocket {
            path: path.to_path_buf(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ListenError::UnixInUse {
            path: path.to_path_buf(),
        }),
        Err(_) => {
            log::info!("removing stale unix socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ListenError::Bind {
                addr: BindAddr::Unix(path.to_path_buf()),
                source,
            })
        }
    }
}

/// All of one generation's listeners, in `bind` order.
#[derive(Default)]
pub struct Listeners {
    pub all: Vec<Listener>,
    /// Passed in by systemd (socket activation): `bind` is ignored and kept across reloads,
    /// and unix socket files are never removed (they belong to systemd).
    pub activated: bool,
}

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

impl Listeners {
    /// The sockets an old master handed over on USR2 (`RAGPOOL_LISTEN_FDS`), if any. Unix
    /// socket files now belong to this master, unless systemd passed the sockets to the old one
    /// (`RAGPOOL_LISTEN_ACTIVATED=1`): then they stay systemd's, and `bind` stays ignored.
    /// Clears the variables.
    pub fn from_old_master() -> Option<Result<Listeners, ListenError>> {
        let fds = std::env::var(super::upgrade::ENV_LISTEN_FDS).ok()?;
        let activated =
            std::env::var_os(super::upgrade::ENV_LISTEN_ACTIVATED).is_some_and(|v| v == "1");
        std::env::remove_var(super::upgrade::ENV_LISTEN_FDS);
        std::env::remove_var(super::upgrade::ENV_LISTEN_ACTIVATED);
        let mut all = Vec::new();
        for fd in fds
            .split(',')
            .filter_map(|f| f.trim().parse::<RawFd>().ok())
        {
            // SAFETY: the old master passed these fds to this process to own.
            let socket = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let err = |source| ListenError::Bind {
                addr: BindAddr::Unix(format!("(inherited fd {fd})").into()),
                source,
            };
            if let Err(e) = socket.set_cloexec(true) {
                return Some(Err(err(e)));
            }
            let local = match socket.local_addr() {
                Ok(addr) => match (addr.as_socket(), addr.as_pathname()) {
                    (Some(tcp), _) => BindAddr::Tcp(tcp),
                    (None, Some(path)) => BindAddr::Unix(path.to_path_buf()),
                    (None, None) => continue,
                },
                Err(e) => return Some(Err(err(e))),
            };
            let owns_path = !activated && matches!(local, BindAddr::Unix(_));
            // A reuse-port port holder is bound but not listening; keep it that way.
            let listening = socket.is_listener().unwrap_or(true);
            all.push(Listener {
                addr: local.clone(),
                local,
                socket,
                listening,
                owns_path,
            });
        }
        Some(Ok(Listeners { all, activated }))
    }

    /// Gives up (or takes back) the removal of unix socket files on drop: an old master hands
    /// them to its successor during an upgrade. Activated sockets' files are never ours.
    pub fn set_owns_paths(&mut self, owns: bool) {
        let owns = owns && !self.activated;
        for listener in self
            .all
            .iter_mut()
            .filter(|l| matches!(l.addr, BindAddr::Unix(_)))
        {
            listener.owns_path = owns;
        }
    }

    /// The sockets systemd passed, if `LISTEN_PID` names this process and `LISTEN_FDS` > 0.
    /// Clears the variables so nothing downstream mistakes them for its own.
    pub fn from_systemd() -> Option<Result<Listeners, ListenError>> {
        let pid: u32 = std::env::var("LISTEN_PID").ok()?.trim().parse().ok()?;
        let count: RawFd = std::env::var("LISTEN_FDS").ok()?.trim().parse().ok()?;
        if pid != std::process::id() || count <= 0 {
            return None;
        }
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
        let mut all = Vec::with_capacity(count as usize);
        for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
            // SAFETY: systemd passed these fds to this process to own (LISTEN_PID matched).
            let socket = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let local = match socket.local_addr() {
                Ok(addr) => match (addr.as_socket(), addr.as_pathname()) {
                    (Some(tcp), _) => BindAddr::Tcp(tcp),
                    (None, Some(path)) => BindAddr::Unix(path.to_path_buf()),
                    (None, None) => BindAddr::Unix(PathBuf::from(format!("(fd {fd})"))),
                },
                Err(source) => {
                    return Some(Err(ListenError::Bind {
                        addr: BindAddr::Unix(format!("(systemd fd {fd})").into()),
                        source,
                    }))
                }
            };
            all.push(Listener {
                addr: local.clone(),
                local,
                socket,
                listening: true,
                owns_path: false,
            });
        }
        Some(Ok(Listeners {
            all,
            activated: true,
        }))
    }

    /// Binds every address of `config`, reusing (duplicating) sockets from `current` for
    /// addresses that did not change, so a reload never closes a port it keeps serving.
    pub fn open(config: &Config, current: Option<&Listeners>) -> Result<Listeners, ListenError> {
        if let Some(current) = current.filter(|c| c.activated) {
            let all = current
                .all
                .iter()
                .map(Listener::try_clone)
                .collect::<io::Result<Vec<_>>>();
            return all
                .map(|all| Listeners {
                    all,
                    activated: true,
                })
                .map_err(|source| ListenError::Bind {
                    addr: current.all[0].addr.clone(),
                    source,
                });
        }
        let mut all = Vec::with_capacity(config.bind.len());
        for addr in &config.bind {
            let kept = current.and_then(|c| {
                c.all.iter().find(|l| {
                    l.serves(addr)
                        && l.is_reuse_port_holder()
                            == (config.reuse_port && matches!(addr, BindAddr::Tcp(_)))
                })
            });
            let listener = match kept {
                Some(old) => old.try_clone().map_err(|source| ListenError::Bind {
                    addr: addr.clone(),
                    source,
                })?,
                None => bind(addr, config)?,
            };
            all.push(listener);
        }
        Ok(Listeners {
            all,
            activated: false,
        })
    }

    /// Moves unix-path ownership from `old` to `self` for every path both have, so dropping `old`
    /// (after a reload commits) does not unlink a socket the new generation still serves.
    pub fn take_path_ownership_from(&mut self, old: &mut Listeners) {
        for listener in &mut self.all {
            if let Some(prev) = old.all.iter_mut().find(|l| l.addr == listener.addr) {
                if prev.disown_path() {
                    listener.set_owns_path(true);
                }
            }
        }
    }

    pub fn fds(&self) -> Vec<RawFd> {
        self.all.iter().map(Listener::fd).collect()
    }

    pub fn describe(&self) -> Vec<String> {
        self.all
            .iter()
            .map(|l| match &l.local {
                BindAddr::Tcp(a) => format!("http://{a}"),
                BindAddr::Unix(p) => format!("unix:{}", p.display()),
            })
            .collect()
    }
}
