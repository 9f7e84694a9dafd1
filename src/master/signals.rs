//! The master's signal queue: handlers only count and wake, the loop does the work.
//!
//! Each handled signal has a counter; its handler (async-signal-safe: one atomic add, one
//! non-blocking pipe write via signal-hook) bumps the counter and writes a byte to a self-pipe.
//! The master loop sleeps in `poll(2)` on that pipe with a timeout, so it wakes at once for a
//! signal and otherwise ticks. Counting, not flagging, keeps `kill -TTIN` sent three times in a
//! row worth three workers, as Gunicorn's signal queue does.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use signal_hook::SigId;

/// Signals the master handles, in the order the loop dispatches them when several are pending:
/// stop requests first, then reloads, then the rest (nginx checks its flags in a fixed order too).
pub const HANDLED: [Signal; 10] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR2,
    Signal::SIGUSR1,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGWINCH,
    Signal::SIGCHLD,
];

/// How many of one signal a single turn dispatches; more are dropped (Gunicorn keeps 5).
const MAX_QUEUED_PER_SIGNAL: usize = 8;

static PENDING: [AtomicUsize; HANDLED.len()] = [const { AtomicUsize::new(0) }; HANDLED.len()];

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("cannot create the master's self-pipe: {0}")]
    Pipe(#[source] nix::Error),
    #[error("cannot install a handler for {signal}: {source}")]
    Register {
        signal: Signal,
        #[source]
        source: std::io::Error,
    },
}

/// Takes every counted signal, in dispatch order.
fn take_pending() -> Vec<Signal> {
    let mut out = Vec::new();
    for (i, signal) in HANDLED.iter().enumerate() {
        let n = PENDING[i].swap(0, Ordering::SeqCst);
        out.extend(std::iter::repeat_n(*signal, n.min(MAX_QUEUED_PER_SIGNAL)));
    }
    out
}

/// Installed handlers plus the self-pipe they write to.
pub struct SignalQueue {
    read: OwnedFd,
    write: OwnedFd,
    ids: Vec<SigId>,
}

impl SignalQueue {
    pub fn install() -> Result<SignalQueue, SignalError> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(SignalError::Pipe)?;
        let mut ids = Vec::with_capacity(HANDLED.len() * 2 + 1);
        // First, so a HUP that is counted always has its `ragpool reload` sender recorded.
        ids.push(
            super::reload_reply::register().map_err(|source| SignalError::Register {
                signal: Signal::SIGHUP,
                source,
            })?,
        );
        for (i, signal) in HANDLED.iter().enumerate() {
            let sig = *signal as i32;
            let register = |r: std::io::Result<SigId>| {
                r.map_err(|source| SignalError::Register {
                    signal: *signal,
                    source,
                })
            };
            // SAFETY: the action is one atomic add: async-signal-safe, allocates nothing.
            ids.push(register(unsafe {
                signal_hook::low_level::register(sig, move || {
                    PENDING[i].fetch_add(1, Ordering::SeqCst);
                })
            })?);
            ids.push(register(signal_hook::low_level::pipe::register_raw(
                sig,
                write.as_raw_fd(),
            ))?);
        }
        Ok(SignalQueue { read, write, ids })
    }

    /// Sleeps until a signal arrives or `timeout` passes; returns the signals, in dispatch order.
    pub fn wait(&self, timeout: Duration) -> Vec<Signal> {
        if !self.any_pending() {
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            let mut fds = [PollFd::new(self.read.as_fd(), PollFlags::POLLIN)];
            // EINTR or an error just means "look now".
            let _ = poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            );
        }
        self.drain_pipe();
        take_pending()
    }

    fn any_pending(&self) -> bool {
        PENDING.iter().any(|p| p.load(Ordering::SeqCst) > 0)
    }

    fn drain_pipe(&self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = nix::unistd::read(self.read.as_raw_fd(), &mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    /// In a freshly forked worker: removes the master's actions and closes its pipe, so the
    /// worker's own runtime can install handlers of its own. The registry's low-level handler
    /// stays installed with no actions, so signals the worker does not handle are ignored.
    ///
    /// Takes `&self` because the child never drops master state: it ends in `process::exit`.
    pub fn forget_in_child(&self) {
        for id in &self.ids {
            signal_hook::low_level::unregister(*id);
        }
        for fd in [self.read.as_raw_fd(), self.write.as_raw_fd()] {
            // SAFETY: closing our own pipe ends in the child; the OwnedFds are never dropped there.
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_signals_wake_the_loop_and_are_counted() {
        let queue = SignalQueue::install().unwrap();
        let me = nix::unistd::getpid();
        let mut got = Vec::new();
        // One at a time: standard signals sent back to back may merge in the kernel.
        for _ in 0..2 {
            nix::sys::signal::kill(me, Signal::SIGTTIN).unwrap();
            let start = std::time::Instant::now();
            let before = got.len();
            while got.len() == before && start.elapsed() < Duration::from_secs(5) {
                got.extend(queue.wait(Duration::from_secs(5)));
            }
        }
        assert_eq!(got, vec![Signal::SIGTTIN, Signal::SIGTTIN]);

        // Several pending at once come out stop-first, each as often as it was counted.
        // (Same test: PENDING is process-global.)
        let index = |s: Signal| HANDLED.iter().position(|h| *h == s).unwrap();
        PENDING[index(Signal::SIGTTOU)].fetch_add(2, Ordering::SeqCst);
        PENDING[index(Signal::SIGHUP)].fetch_add(1, Ordering::SeqCst);
        PENDING[index(Signal::SIGTERM)].fetch_add(1, Ordering::SeqCst);
        let got = take_pending();
        assert_eq!(
            got,
            vec![
                Signal::SIGTERM,
                Signal::SIGHUP,
                Signal::SIGTTOU,
                Signal::SIGTTOU
            ]
        );
    }
}
