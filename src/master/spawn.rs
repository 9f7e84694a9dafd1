//! `spawn_worker`: the one place ragpool forks.
//!
//! Pre-fork (master): pick a slot, claim it, prepare the worker's listening fds.
//! Post-fork (child), in order, before any runtime or client exists:
//!   1. forget the master's signal actions and close its self-pipe; clear the signal mask;
//!   2. ask the kernel for SIGTERM if the master dies (`PR_SET_PDEATHSIG`);
//!   3. close every listener that is not this worker's (other generations, other workers);
//!   4. hand over to [`crate::worker::run`], which builds the worker's own runtime;
//!   5. `process::exit` with its code — the child never returns into master code.

use std::os::fd::RawFd;
use std::sync::Arc;

use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::{fork, ForkResult, Pid};

use crate::config::Config;
use crate::master::signals::SignalQueue;
use crate::scoreboard::Scoreboard;
use crate::worker::{self, WorkerBoot};

/// Everything a new worker needs, gathered by the master before forking.
pub struct Spawn<'a> {
    pub slot: usize,
    pub generation: u64,
    pub config: &'a Arc<Config>,
    /// The listening fds this worker accepts on.
    pub listen_fds: &'a [RawFd],
    /// Fds the master holds that this worker must not keep (other generations' listeners).
    pub foreign_fds: &'a [RawFd],
    pub scoreboard: &'a Scoreboard,
    pub signals: &'a SignalQueue,
}

/// Forks one worker. Returns its pid in the master; never returns in the child.
pub fn spawn_worker(spawn: Spawn<'_>) -> nix::Result<Pid> {
    let master_pid = nix::unistd::getpid();
    spawn.scoreboard.slot(spawn.slot).claim(spawn.generation);
    // SAFETY: the master is single-threaded for its whole life (no runtime, no helper threads),
    // so the child starts with consistent memory and no lock held by a vanished thread.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => {
            spawn.scoreboard.slot(spawn.slot).set_pid(child.as_raw());
            Ok(child)
        }
        ForkResult::Child => {
            spawn.signals.forget_in_child();
            let _ = nix::sys::signal::sigprocmask(
                SigmaskHow::SIG_SETMASK,
                Some(&SigSet::empty()),
                None,
            );
            // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number has no memory effects.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
            if nix::unistd::getppid() != master_pid {
                // The master died between fork and prctl.
                std::process::exit(0);
            }
            for fd in spawn
                .foreign_fds
                .iter()
                .filter(|fd| !spawn.listen_fds.contains(fd))
            {
                // SAFETY: closing inherited fds that belong to the master; never used here again.
                unsafe { libc::close(*fd) };
            }
            // SAFETY: the child never drops master state (it ends in `process::exit`), so the
            // `Scoreboard` value and the mapping it owns live as long as the child does.
            let board: &'static Scoreboard = unsafe { &*(spawn.scoreboard as *const Scoreboard) };
            let code = worker::run(WorkerBoot {
                slot: board.slot(spawn.slot),
                board,
                slot_index: spawn.slot,
                generation: spawn.generation,
                config: Arc::clone(spawn.config),
                listen_fds: spawn.listen_fds.to_vec(),
                master_pid,
            });
            std::process::exit(code);
        }
    }
}
