//! The orphan guard: a worker whose master died exits within [`ORPHAN_GRACE`], even if it was
//! stopped (SIGSTOP) or its event loop is hung, so a new master can bind the same addresses.
//!
//! Armed in the child right after fork (and after any credential change, which clears it):
//! `PR_SET_PDEATHSIG` asks the kernel for **SIGCONT** when the master dies. SIGCONT is the one
//! signal besides SIGKILL that acts on a stopped process: the kernel resumes it, then runs our
//! handler. The handler (async-signal-safe: getppid, alarm, kill) checks the parent really
//! changed (an operator's `kill -CONT` does nothing), then arms `alarm(ORPHAN_GRACE)` — SIGALRM
//! keeps its default action, so the process ends then whatever its event loop is doing — and
//! raises SIGTERM, which starts the worker's graceful drain (its listeners close at once). The
//! worker's heartbeat also notices the parent change and drains, as before.
//!
//! Choosing SIGKILL as the death signal would free the port too, but would cut every in-flight
//! request of every healthy worker; SIGTERM alone is never delivered to a stopped worker.
//!
//! What it must not do: allocate, lock or log in the handler.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::unistd::Pid;

/// How long an orphaned worker may drain before SIGALRM ends it.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3);

/// The master's pid, for the handler (set once, in the child, before the handler can run).
static MASTER: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_sigcont(_: libc::c_int) {
    // SAFETY: getppid, alarm, getpid and kill are async-signal-safe and touch no memory of ours.
    unsafe {
        if libc::getppid() != MASTER.load(Ordering::Relaxed) {
            libc::alarm(ORPHAN_GRACE.as_secs() as libc::c_uint);
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
    }
}

/// In a freshly forked worker: installs the SIGCONT handler, then asks for SIGCONT on the
/// master's death. Returns false when the master is already gone (the caller exits).
pub fn arm(master: Pid) -> bool {
    MASTER.store(master.as_raw(), Ordering::Relaxed);
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid; the handler
    // is async-signal-safe (see above). prctl with PR_SET_PDEATHSIG and a valid signal number
    // has no memory effects.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigcont as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGCONT, &action, std::ptr::null_mut());
        libc::signal(libc::SIGALRM, libc::SIG_DFL);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGCONT);
    }
    // The master may have died before prctl: then no SIGCONT will ever come.
    nix::unistd::getppid() == master
}
