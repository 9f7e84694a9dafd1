//! `ragpool reload`: a HUP that waits for the master's answer, so `systemctl reload` (its
//! `ExecReload=`) returns once the new generation serves and fails when the reload failed.
//! systemd 252 has no `Type=notify-reload`, and `kill -HUP` returns before anything happened.
//!
//! The handshake is two queued signals, nothing else to set up or clean:
//! 1. the client blocks [`REPLY_SIGNAL`] and `sigqueue`s SIGHUP to the master with the value
//!    [`REQUEST`] (a plain `kill -HUP` has no value and gets no answer);
//! 2. the master's SIGHUP handler records the sender's pid (async-signal-safe: one atomic
//!    store in a fixed table); the loop answers every recorded sender when the reload ends,
//!    with `sigqueue(REPLY_SIGNAL, value)`: the serving generation (> 0) on success,
//!    [`FAILED`] when the config was rejected or the new generation failed to boot, [`NOT_NOW`]
//!    when the master was not in a state to reload (booting, stopping).
//!
//! The reason for a failure is in the master's log (the journal), where it always was; the
//! client says where to look. This module must not log from the signal handler.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// The value a `ragpool reload` HUP carries: "answer me".
pub const REQUEST: usize = 0x7261_6770; // "ragp"
/// The master's answer comes as this signal, queued with a value.
pub const REPLY_SIGNAL: libc::c_int = libc::SIGUSR1;
/// Answer: the reload failed (rejected config, unbindable address, workers failed to boot).
pub const FAILED: isize = 0;
/// Answer: the master cannot reload now (first generation booting, or stopping).
pub const NOT_NOW: isize = -1;

/// Senders of reload requests not yet answered; 0 = free. Writers: the signal handler only.
static REQUESTERS: [AtomicI32; 16] = [const { AtomicI32::new(0) }; 16];

/// Installs the SIGHUP action that records requesters. Registered before the counting action,
/// so a HUP the loop has counted always has its sender recorded.
pub fn register() -> std::io::Result<signal_hook::SigId> {
    // SAFETY: the action only reads the siginfo and does atomic compare-exchanges on a static
    // table: async-signal-safe, no allocation, no lock.
    unsafe {
        signal_hook_registry::register_sigaction(libc::SIGHUP, |info: &libc::siginfo_t| {
            if info.si_code != libc::SI_QUEUE || info.si_value().sival_ptr as usize != REQUEST {
                return;
            }
            let pid = info.si_pid();
            for slot in &REQUESTERS {
                if slot
                    .compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return;
                }
            }
            // Table full: that client times out; nothing safe to do about it here.
        })
    }
}

/// Takes the senders recorded so far (the loop, when it starts a reload or declines one).
pub fn take_requesters() -> Vec<Pid> {
    REQUESTERS
        .iter()
        .map(|slot| slot.swap(0, Ordering::SeqCst))
        .filter(|pid| *pid > 0)
        .map(Pid::from_raw)
        .collect()
}

/// The requesters whose reload is under way, answered together when it ends (a reload that
/// supersedes another answers both).
#[derive(Debug, Default)]
pub struct Waiting(Vec<Pid>);

impl Waiting {
    /// Adds the requesters recorded since the last call (when a reload starts).
    pub fn add_recorded(&mut self) {
        self.0.extend(take_requesters());
    }

    /// Answers (a generation, [`FAILED`] or [`NOT_NOW`]) and forgets every waiting requester.
    pub fn answer(&mut self, value: isize) {
        answer(&std::mem::take(&mut self.0), value);
    }
}

/// Answers [`NOT_NOW`] to requesters recorded for a HUP the master declines.
pub fn decline_recorded() {
    answer(&take_requesters(), NOT_NOW);
}

/// Sends each requester the answer (a generation, [`FAILED`] or [`NOT_NOW`]).
pub fn answer(requesters: &[Pid], answer: isize) {
    for pid in requesters {
        if let Err(e) = sigqueue(*pid, REPLY_SIGNAL, answer as usize) {
            log::warn!("cannot answer `ragpool reload` (pid {pid}): {e}");
        }
    }
}

fn sigqueue(pid: Pid, signal: libc::c_int, value: usize) -> std::io::Result<()> {
    let value = libc::sigval {
        sival_ptr: value as *mut libc::c_void,
    };
    // SAFETY: sigqueue(3) takes plain values; no memory is shared with the kernel.
    if unsafe { libc::sigqueue(pid.as_raw(), signal, value) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot signal the master (pid {pid}): {source}")]
    Signal {
        pid: Pid,
        #[source]
        source: std::io::Error,
    },
    #[error("the master (pid {pid}) did not answer within {timeout:?}; the reload may still finish, see its log")]
    Timeout { pid: Pid, timeout: Duration },
    #[error("the reload failed: the master (pid {pid}) rejected the configuration or the new workers did not boot; the running workers are untouched and its log says why")]
    Failed { pid: Pid },
    #[error("the master (pid {pid}) cannot reload now: it is still booting or it is stopping")]
    NotNow { pid: Pid },
}

/// The client side: asks the master at `pid` to reload and waits for its answer. Returns the
/// generation that now serves.
///
/// Blocks [`REPLY_SIGNAL`] in the calling thread for good; meant for a short-lived process.
pub fn request(pid: Pid, timeout: Duration) -> Result<u64, ReloadError> {
    let signal_error = |source| ReloadError::Signal { pid, source };
    // SAFETY: sigset operations on a local set; sigprocmask on this (only) thread.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, REPLY_SIGNAL);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    sigqueue(pid, libc::SIGHUP, REQUEST).map_err(signal_error)?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReloadError::Timeout { pid, timeout });
        }
        let wait = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: an all-zero siginfo_t is valid; the kernel fills it in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: pointers to locals that outlive the call.
        let got = unsafe { libc::sigtimedwait(&set, &mut info, &wait) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return Err(signal_error(e)),
            }
        }
        // SAFETY: si_pid and si_value are set for SI_QUEUE signals, checked first.
        let from_master =
            info.si_code == libc::SI_QUEUE && unsafe { info.si_pid() } == pid.as_raw();
        if !from_master {
            continue; // someone else's SIGUSR1: not an answer
        }
        let value = unsafe { info.si_value() }.sival_ptr as isize;
        return match value {
            FAILED => Err(ReloadError::Failed { pid }),
            NOT_NOW => Err(ReloadError::NotNow { pid }),
            generation => Ok(generation as u64),
        };
    }
}
