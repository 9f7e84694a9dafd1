//! `spawn_worker`: the one place ragpool forks a worker.
//!
//! Pre-fork (master): pick a slot, claim it, prepare the worker's listening fds.
//! Post-fork (child), in order, before any runtime or client exists:
//!   1. forget the master's signal actions and close its self-pipe; clear the signal mask;
//!   2. close every fd that belongs to the master or to other generations and workers;
//!   3. drop privileges (`user`/`group`): initgroups, setgid, setuid, and check root is gone;
//!   4. arm the orphan guard ([`super::orphan`]): `PR_SET_PDEATHSIG` after the credential change
//!      (which clears it), then exit at once if the master already died;
//!   5. hand over to the worker's entry point ([`WorkerMain`], given by the binary: the master
//!      never imports the worker), which builds the worker's own runtime;
//!   6. `process::exit` with its code — the child never returns into master code.
//!
//! A failure in 3 is written into the slot and reported by [`super::EXIT_BOOT_ERROR`].

use std::os::fd::RawFd;
use std::sync::Arc;

use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::{fork, ForkResult, Pid};

use super::orphan;
use super::pool::EXIT_BOOT_ERROR;
use crate::config::process::RunAs;
use crate::config::Config;
use crate::master::signals::SignalQueue;
use crate::scoreboard::{Scoreboard, Slot};

/// What a freshly forked worker gets from the master.
pub struct WorkerContext {
    /// This worker's scoreboard slot; the mapping outlives the process.
    pub slot: &'static Slot,
    /// The whole scoreboard, for answering `/metrics` and `/status` for the pool.
    pub board: &'static Scoreboard,
    pub slot_index: usize,
    pub generation: u64,
    pub config: Arc<Config>,
    /// Listening fds, now owned by this worker.
    pub listen_fds: Vec<RawFd>,
    pub master_pid: Pid,
}

/// A worker's entry point: runs the worker to completion and returns its exit code
/// (0, or [`super::EXIT_BOOT_ERROR`] / [`super::EXIT_APP_LOAD_ERROR`] with the slot's boot error
/// set).
pub type WorkerMain = fn(WorkerContext) -> i32;

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
    pub worker_main: WorkerMain,
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
            let slot = board.slot(spawn.slot);
            if let Some(run_as) = &spawn.config.run_as {
                if let Err(message) = drop_privileges(run_as) {
                    log::error!("worker failed to boot: {message}");
                    slot.set_boot_error(&message);
                    std::process::exit(EXIT_BOOT_ERROR);
                }
            }
            if !orphan::arm(master_pid) {
                // The master died between fork and the guard: nobody would supervise us.
                std::process::exit(0);
            }
            let code = (spawn.worker_main)(WorkerContext {
                slot,
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

/// setgroups/initgroups, setgid, setuid — then make sure root is really gone.
fn drop_privileges(run_as: &RunAs) -> Result<(), String> {
    use nix::unistd::{getegid, geteuid, getuid, initgroups, setgid, setuid};
    if getuid() == run_as.uid && geteuid() == run_as.uid {
        return Ok(()); // already that user (the master was started as it)
    }
    if !geteuid().is_root() {
        return Err(format!(
            "cannot switch to user {}: the master is not running as root (start it as root, or remove `user`)",
            run_as.user
        ));
    }
    let name =
        std::ffi::CString::new(run_as.user.as_str()).map_err(|_| "bad user name".to_string())?;
    initgroups(&name, run_as.gid).map_err(|e| format!("initgroups for {}: {e}", run_as.user))?;
    setgid(run_as.gid).map_err(|e| format!("setgid {}: {e}", run_as.gid))?;
    setuid(run_as.uid).map_err(|e| format!("setuid {}: {e}", run_as.uid))?;
    // Refuse to serve as root when a user was asked for and the switch did not stick.
    if !run_as.uid.is_root()
        && (geteuid().is_root()
            || getuid().is_root()
            || nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok())
    {
        return Err(format!(
            "dropping privileges to {} did not take effect; refusing to run as root",
            run_as.user
        ));
    }
    log::debug!(
        "worker runs as {} (uid {}, gid {})",
        run_as.user,
        run_as.uid,
        getegid()
    );
    Ok(())
}
