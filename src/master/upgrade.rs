//! USR2: zero-downtime binary upgrade (nginx's and Unicorn's procedure, automated).
//!
//! The old master forks twice and `exec`s the binary on disk with the same arguments, handing
//! over its listening sockets by fd number (`RAGPOOL_LISTEN_FDS`, plus
//! `RAGPOOL_LISTEN_ACTIVATED=1` when systemd passed them) and its own pid
//! (`RAGPOOL_UPGRADE_FROM`). The new master boots its workers on those very sockets, so no
//! connection is refused; once they all serve it announces itself to systemd (`MAINPID=`) and
//! sends the old master SIGTERM, which drains and exits.
//!
//! Why the double fork: the new master must be the service manager's child, not the old
//! master's, before it claims `MAINPID=` (systemd 252 otherwise "supervises a process which is
//! not our child", misses its exit and SIGKILLs on the next stop). The intermediate child exits
//! at once, so the new master is reparented to PID 1 (or the nearest subreaper). The old master
//! then cannot `waitpid` it and watches a pidfd instead: if the new master dies before taking
//! over, the old one takes back its pidfile and keeps serving.
//!
//! `WATCHDOG_PID` (the old master's pid) is not passed on: with it the new master would think
//! the watchdog is meant for another process and never pet it.

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::sys::wait::waitpid;
use nix::unistd::{execve, fork, pipe2, ForkResult, Pid};

/// Listening fds handed to the new master, comma-separated.
pub const ENV_LISTEN_FDS: &str = "RAGPOOL_LISTEN_FDS";
/// "1" when the handed-over sockets came from systemd (socket activation): the new master keeps
/// them whatever `bind` says and never removes their files.
pub const ENV_LISTEN_ACTIVATED: &str = "RAGPOOL_LISTEN_ACTIVATED";
/// The old master's pid, which the new master stops once it serves.
pub const ENV_UPGRADE_FROM: &str = "RAGPOOL_UPGRADE_FROM";
/// Variables of this master's that must not reach the new one: ours to set anew, or systemd's
/// promises to this process only (`LISTEN_*` name this pid; `WATCHDOG_PID` too).
const NOT_INHERITED: [&str; 7] = [
    ENV_LISTEN_FDS,
    ENV_LISTEN_ACTIVATED,
    ENV_UPGRADE_FROM,
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_PID",
];

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot prepare the upgrade: {0} contains a NUL byte")]
    Nul(&'static str),
    #[error("cannot fork the new master: {0}")]
    Fork(#[source] nix::Error),
    #[error("the new master did not start (its launcher exited without naming it)")]
    NotStarted,
    #[error("cannot watch the new master (pid {pid}): {source}")]
    Watch {
        pid: Pid,
        #[source]
        source: std::io::Error,
    },
}

/// A new master started by USR2, watched through a pidfd (it is not our child).
#[derive(Debug)]
pub struct NewMaster {
    pub pid: Pid,
    /// Readable once the process has exited.
    pidfd: OwnedFd,
}

impl NewMaster {
    /// Whether the new master has exited (never blocks).
    pub fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }
}

/// `pidfd_open(2)`: a handle on `pid` that polls readable when it exits.
fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall with two integer arguments; the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us, and nothing else holds it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
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

/// Forks twice and execs the new master. The children do only async-signal-safe work: the
/// first forks and writes the new master's pid to a pipe, then `_exit`s; the second clears
/// FD_CLOEXEC on the listeners, unblocks signals and execs (or `_exit(127)`).
pub fn exec_new_master(
    exe: &Executable,
    listen_fds: &[RawFd],
    activated: bool,
) -> Result<NewMaster, UpgradeError> {
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
        if NOT_INHERITED.iter().any(|s| key == *s) {
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
    if activated {
        env.push(cstring(
            format!("{ENV_LISTEN_ACTIVATED}=1").as_bytes(),
            "activation",
        )?);
    }

    let (pid_read, pid_write) = pipe2(OFlag::O_CLOEXEC).map_err(UpgradeError::Fork)?;
    // SAFETY: the master is single-threaded; both children only call async-signal-safe
    // functions (fork, write, fcntl, sigprocmask, execve, _exit) on memory prepared above.
    let launcher = match unsafe { fork() }.map_err(UpgradeError::Fork)? {
        ForkResult::Parent { child } => child,
        ForkResult::Child => match unsafe { fork() } {
            Ok(ForkResult::Parent { child }) => {
                let bytes = child.as_raw().to_ne_bytes();
                // SAFETY: write(2) and _exit(2) are async-signal-safe.
                unsafe {
                    libc::write(pid_write.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
                    libc::_exit(0)
                }
            }
            Ok(ForkResult::Child) => {
                for fd in listen_fds {
                    let _ = fcntl(*fd, FcntlArg::F_SETFD(FdFlag::empty()));
                }
                let _ = nix::sys::signal::sigprocmask(
                    SigmaskHow::SIG_SETMASK,
                    Some(&SigSet::empty()),
                    None,
                );
                // A binary still open for writing somewhere cannot be executed yet (ETXTBSY):
                // a package manager finishing its copy, or any process forked while the file
                // was being written and not yet exec'd. Retry for up to a second.
                for _ in 0..EXEC_BUSY_RETRIES {
                    if execve(&path, &argv, &env) != Err(nix::errno::Errno::ETXTBSY) {
                        break;
                    }
                    let pause = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: EXEC_BUSY_PAUSE_NS,
                    };
                    // SAFETY: nanosleep is async-signal-safe; a signal only shortens the pause.
                    unsafe { libc::nanosleep(&pause, std::ptr::null_mut()) };
                }
                // SAFETY: _exit is async-signal-safe and skips the parent's atexit handlers.
                unsafe { libc::_exit(127) }
            }
            // SAFETY: as above.
            Err(_) => unsafe { libc::_exit(1) },
        },
    };
    drop(pid_write);
    let mut bytes = [0u8; 4];
    let read = loop {
        match nix::unistd::read(pid_read.as_raw_fd(), &mut bytes) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    // The launcher exits right after writing (or failing): reap it so it leaves no zombie.
    let _ = waitpid(launcher, None);
    if read != Ok(bytes.len()) {
        return Err(UpgradeError::NotStarted);
    }
    let pid = Pid::from_raw(i32::from_ne_bytes(bytes));
    // Already gone (a binary that exits at once may be reaped by now): pidfd_open fails with
    // ESRCH and the upgrade counts as failed.
    let pidfd = pidfd_open(pid).map_err(|source| UpgradeError::Watch { pid, source })?;
    Ok(NewMaster { pid, pidfd })
}

/// How often, and how far apart, the new master's `execve` is retried on ETXTBSY: 1 s in all.
const EXEC_BUSY_RETRIES: usize = 50;
const EXEC_BUSY_PAUSE_NS: libc::c_long = 20_000_000;

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
