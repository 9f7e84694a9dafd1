//! USR2: zero-downtime binary upgrade (nginx's and Unicorn's procedure, automated).
//!
//! The old master forks and `exec`s the binary on disk with the same arguments, handing over
//! its listening sockets by fd number (`RAGPOOL_LISTEN_FDS`) and its own pid
//! (`RAGPOOL_UPGRADE_FROM`). The new master boots its workers on those very sockets, so no
//! connection is refused; once they all serve it announces itself to systemd (`MAINPID=`) and
//! sends the old master SIGTERM, which drains and exits. If the new master dies first, the old
//! one notices when it reaps it, takes back its pidfile and keeps serving.

use std::ffi::{CString, OsString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::{execve, fork, ForkResult, Pid};

/// Listening fds handed to the new master, comma-separated.
pub const ENV_LISTEN_FDS: &str = "RAGPOOL_LISTEN_FDS";
/// The old master's pid, which the new master stops once it serves.
pub const ENV_UPGRADE_FROM: &str = "RAGPOOL_UPGRADE_FROM";

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot prepare the upgrade: {0} contains a NUL byte")]
    Nul(&'static str),
    #[error("cannot fork the new master: {0}")]
    Fork(#[source] nix::Error),
}

/// The binary and arguments this master was started with, captured at start-up (before the
/// file on disk can be replaced).
#[derive(Debug, Clone)]
pub struct Executable {
    pub path: PathBuf,
    pub args: Vec<OsString>,
}

impl Executable {
    pub fn current() -> Executable {
        let args: Vec<OsString> = std::env::args_os().collect();
        // argv[0] as given if it names a file (so an upgraded file at that path is picked up),
        // else what the kernel says we are running.
        let path = args
            .first()
            .map(PathBuf::from)
            .filter(|p| p.components().count() > 1 && p.exists())
            .and_then(|p| std::fs::canonicalize(p).ok())
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        Executable { path, args }
    }
}

/// Forks and execs the new master. The child does only async-signal-safe work: clear
/// FD_CLOEXEC on the listeners, unblock signals, execve (or `_exit(127)`).
pub fn exec_new_master(exe: &Executable, listen_fds: &[RawFd]) -> Result<Pid, UpgradeError> {
    let path = cstring(exe.path.as_os_str().as_bytes(), "the binary path")?;
    let argv = exe
        .args
        .iter()
        .map(|a| cstring(a.as_bytes(), "an argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let fd_list = listen_fds
        .iter()
        .map(|fd| fd.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        let skip = [
            ENV_LISTEN_FDS,
            ENV_UPGRADE_FROM,
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
        ];
        if skip.iter().any(|s| key == *s) {
            continue;
        }
        let mut entry = key.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        env.push(cstring(&entry, "an environment variable")?);
    }
    env.push(cstring(
        format!("{ENV_LISTEN_FDS}={fd_list}").as_bytes(),
        "fds",
    )?);
    env.push(cstring(
        format!("{ENV_UPGRADE_FROM}={}", std::process::id()).as_bytes(),
        "pid",
    )?);

    // SAFETY: the master is single-threaded; the child only calls async-signal-safe functions
    // (fcntl, sigprocmask, execve, _exit) on memory prepared above.
    match unsafe { fork() }.map_err(UpgradeError::Fork)? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            for fd in listen_fds {
                let _ = fcntl(*fd, FcntlArg::F_SETFD(FdFlag::empty()));
            }
            let _ = nix::sys::signal::sigprocmask(
                SigmaskHow::SIG_SETMASK,
                Some(&SigSet::empty()),
                None,
            );
            let _ = execve(&path, &argv, &env);
            // SAFETY: _exit is async-signal-safe and skips the parent's atexit handlers.
            unsafe { libc::_exit(127) }
        }
    }
}

fn cstring(bytes: &[u8], what: &'static str) -> Result<CString, UpgradeError> {
    CString::new(bytes).map_err(|_| UpgradeError::Nul(what))
}

/// In a new master: the old master's pid, if this process is an upgrade.
pub fn upgraded_from() -> Option<Pid> {
    let pid: i32 = std::env::var(ENV_UPGRADE_FROM).ok()?.parse().ok()?;
    std::env::remove_var(ENV_UPGRADE_FROM);
    Some(Pid::from_raw(pid))
}

/// `<pidfile>.oldbin`, where the old master's pidfile goes during an upgrade.
pub fn oldbin_path(pidfile: &Path) -> PathBuf {
    let mut name = pidfile.as_os_str().to_owned();
    name.push(".oldbin");
    PathBuf::from(name)
}
