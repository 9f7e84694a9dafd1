//! The master (Gunicorn's arbiter, nginx's master cycle): binds, forks, supervises.
//!
//! It is single-threaded for its whole life and never imports tokio, hyper, the worker or the
//! app: the binary hands it the worker's entry point ([`WorkerMain`]). The master is split in
//! two. [`pool`] decides everything (which worker to spawn, signal, kill, count, when to
//! commit a reload or exit) as a pure function of events; this module is the effectful shell
//! around it. One loop, the same every turn:
//!
//! 1. wait for signals (or the tick, or the next backoff/boot token the pool asks for) and feed
//!    each to the pool;
//! 2. reap exited children and feed each exit (with what its scoreboard slot says);
//! 3. feed a tick carrying every live worker's scoreboard sample (ready, silence, requests,
//!    memory), from which the pool murders, recycles and commits;
//! 4. carry out the pool's commands in order: fork, signal, adopt/commit/drop a generation's
//!    listeners, notify systemd, count restarts, log; a `Spawn` is answered at once with the
//!    fork's result, so the pool's view never lags the processes.

mod listeners;
pub mod notify;
pub mod orphan;
mod pidfile;
pub mod policy;
pub mod pool;
pub mod reload_reply;
pub mod signals;
mod spawn;
mod upgrade;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::config::{self, Config, ConfigSource, MAX_WORKERS};
use crate::scoreboard::{monotonic_ms, Scoreboard, ScoreboardError, SlotState};
pub use listeners::{ListenError, Listeners};
use notify::Notifier;
pub use pidfile::{Pidfile, PidfileError};
use policy::Phase;
use pool::{Command, Event, ExitStatus, Pool, Sample, Spec};
pub use pool::{EXIT_APP_LOAD_ERROR, EXIT_BOOT_ERROR};
use signals::{SignalError, SignalQueue};
use spawn::{spawn_worker, Spawn};
pub use spawn::{WorkerContext, WorkerMain};
use upgrade::Executable;

/// How long the loop sleeps when nothing happens. Signals wake it at once.
const LOOP_TICK: Duration = Duration::from_millis(200);
/// Scoreboard slots: two full generations plus room for TTIN during a reload.
const SCOREBOARD_SLOTS: usize = 2 * MAX_WORKERS + 64;

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Pidfile(#[from] PidfileError),
    #[error(transparent)]
    Scoreboard(#[from] ScoreboardError),
    #[error(transparent)]
    Signals(#[from] SignalError),
    #[error("cannot change directory to {} (chdir): {source}", dir.display())]
    Chdir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no free scoreboard slot for another worker (all {0} in use, counting draining ones); lower `workers` or wait for old workers to finish")]
    ScoreboardFull(usize),
    #[error("cannot fork a worker: {0}")]
    Fork(#[source] nix::Error),
    #[error("worker failed to boot (pid {pid}): {reason}")]
    BootFailed { pid: i32, reason: String },
}

/// What the master holds for one generation: its config and its listening sockets.
struct Resources {
    config: Arc<Config>,
    listeners: Listeners,
}

pub struct Arbiter {
    /// Where the config comes from, so HUP can read it again.
    source: ConfigSource,
    /// Every decision.
    pool: Pool,
    /// Config and listeners of the serving generation and of a pending reload, by number.
    generations: BTreeMap<u64, Resources>,
    /// A reload's config and listeners between `LoadConfig` and `AdoptGeneration`.
    staged: Option<Resources>,
    /// Each live worker's scoreboard slot.
    slots: BTreeMap<Pid, usize>,
    scoreboard: Scoreboard,
    signals: SignalQueue,
    /// The worker's entry point, given by the binary.
    worker_main: WorkerMain,
    pidfile: Option<Pidfile>,
    /// The binary and arguments to exec on USR2.
    exe: Executable,
    /// systemd's notify socket (no-op when not run by systemd).
    notify: Notifier,
    /// A new master started by USR2 that has not yet taken over (not our child: a pidfd).
    upgrade: Option<upgrade::NewMaster>,
    /// `ragpool reload` clients waiting for the pending reload's outcome.
    reload_waiting: reload_reply::Waiting,
    /// Set by `Exit` or `Halt`: what `run_loop` returns.
    outcome: Option<Result<(), MasterError>>,
}

/// Runs the master until it is told to stop. Returns once every worker has exited.
pub fn run(
    source: ConfigSource,
    config: Config,
    worker_main: WorkerMain,
) -> Result<(), MasterError> {
    let mut arbiter = Arbiter::start(source, config, worker_main)?;
    arbiter.run_loop()
}

impl Arbiter {
    /// Binds, maps the scoreboard and installs signal handlers. Forks nothing yet.
    pub fn start(
        source: ConfigSource,
        config: Config,
        worker_main: WorkerMain,
    ) -> Result<Arbiter, MasterError> {
        if let Some(mask) = config.umask {
            // SAFETY: umask only changes this process's file-creation mask.
            unsafe { libc::umask(mask as libc::mode_t) };
        }
        if let Some(dir) = &config.chdir {
            std::env::set_current_dir(dir).map_err(|source| MasterError::Chdir {
                dir: dir.clone(),
                source,
            })?;
        }
        let pidfile = config.pidfile.as_deref().map(Pidfile::create).transpose()?;
        let listeners = if let Some(inherited) = Listeners::from_old_master() {
            let mut inherited = inherited?;
            log::info!(
                "Taking over {} listening sockets from the old master",
                inherited.all.len()
            );
            // Keep the inherited sockets the config still names; bind any it adds.
            let mut listeners = Listeners::open(&config, Some(&inherited))?;
            listeners.take_path_ownership_from(&mut inherited);
            listeners
        } else {
            match Listeners::from_systemd() {
                Some(activated) => {
                    log::info!(
                        "Using sockets passed by systemd (socket activation); `bind` is ignored"
                    );
                    activated?
                }
                None => Listeners::open(&config, None)?,
            }
        };
        let me = std::process::id();
        log::info!(
            "Starting ragpool {} (master pid {me})",
            env!("CARGO_PKG_VERSION")
        );
        for address in listeners.describe() {
            log::info!("Listening at: {address} ({me})");
        }
        let scoreboard = Scoreboard::new(SCOREBOARD_SLOTS)?;
        scoreboard.header().set_master(me);
        scoreboard.header().set_generation(1);
        let signals = SignalQueue::install()?;
        let pool = Pool::new(
            Spec::from(&config),
            upgrade::upgraded_from(),
            u64::from(me) ^ monotonic_ms(),
            Instant::now(),
        );
        let mut generations = BTreeMap::new();
        generations.insert(
            1,
            Resources {
                config: Arc::new(config),
                listeners,
            },
        );
        Ok(Arbiter {
            source,
            pool,
            generations,
            staged: None,
            slots: BTreeMap::new(),
            scoreboard,
            signals,
            worker_main,
            pidfile,
            exe: Executable::current(),
            notify: Notifier::from_env(),
            upgrade: None,
            reload_waiting: reload_reply::Waiting::default(),
            outcome: None,
        })
    }

    pub fn run_loop(&mut self) -> Result<(), MasterError> {
        self.feed(Event::Start); // the first generation, without waiting for the first tick
        loop {
            if let Some(outcome) = self.outcome.take() {
                return outcome;
            }
            let now = Instant::now();
            let mut sleep = self
                .notify
                .max_sleep()
                .map_or(LOOP_TICK, |d| d.min(LOOP_TICK));
            if let Some(at) = self.pool.next_wakeup(now) {
                sleep = sleep.min(at.saturating_duration_since(now));
            }
            for signal in self.signals.wait(sleep) {
                self.feed(Event::Signal(signal));
            }
            self.reap_workers();
            let samples = self.sample_workers();
            self.feed(Event::Tick { samples });
            if matches!(self.pool.phase(), Phase::Booting | Phase::Running) {
                self.notify.watchdog();
            }
        }
    }

    /// Feeds one event to the pool and carries out what it decides, answering spawns at once.
    fn feed(&mut self, event: Event) {
        let mut queue: VecDeque<Command> = self.pool.on_event(event, Instant::now()).into();
        while let Some(command) = queue.pop_front() {
            if let Some(answer) = self.execute(command) {
                queue.extend(self.pool.on_event(answer, Instant::now()));
            }
        }
    }

    // ----- reaping and sampling ------------------------------------------------------------

    fn reap_workers(&mut self) {
        if self.upgrade.take_if(|m| m.has_exited()).is_some() {
            self.feed(Event::UpgradeExited);
        }
        loop {
            let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig)),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitpid failed: {e}");
                    return;
                }
            };
            let (was_ready, boot_error) = match self.slots.remove(&pid) {
                Some(index) => {
                    let slot = self.scoreboard.slot(index);
                    let seen = (
                        matches!(slot.state(), SlotState::Ready | SlotState::Draining),
                        slot.boot_error(),
                    );
                    self.scoreboard.retire_slot(index);
                    seen
                }
                None => (false, None),
            };
            self.feed(Event::Exited {
                pid,
                status,
                was_ready,
                boot_error,
            });
        }
    }

    /// What every live worker's slot says now.
    fn sample_workers(&self) -> Vec<Sample> {
        let now_ms = monotonic_ms();
        self.slots
            .iter()
            .map(|(pid, index)| {
                let slot = self.scoreboard.slot(*index);
                Sample {
                    pid: *pid,
                    ready: matches!(slot.state(), SlotState::Ready | SlotState::Draining),
                    silence: Duration::from_millis(slot.silence_ms(now_ms)),
                    requests: slot.requests(),
                    // Stamped by the worker's own heartbeat: no /proc read here.
                    rss_mib: slot.rss_kib.load(std::sync::atomic::Ordering::Relaxed) / 1024,
                }
            })
            .collect()
    }

    // ----- commands ------------------------------------------------------------------------

    /// Carries out one command; a spawn or a config load returns the event that answers it.
    fn execute(&mut self, command: Command) -> Option<Event> {
        match command {
            Command::Spawn { generation, seat } => Some(match self.spawn(generation) {
                Ok(pid) => Event::Spawned {
                    pid,
                    generation,
                    seat,
                },
                Err(e) => Event::SpawnFailed {
                    generation,
                    seat,
                    error: e.to_string(),
                },
            }),
            Command::Signal { pid, signal } => {
                send(pid, signal);
                None
            }
            Command::LoadConfig => {
                self.reload_waiting.add_recorded();
                Some(self.load_config())
            }
            Command::DeclineReload => {
                reload_reply::decline_recorded();
                None
            }
            Command::AdoptGeneration { generation } => {
                if let Some(staged) = self.staged.take() {
                    for address in staged.listeners.describe() {
                        log::info!("Listening at: {address} ({})", std::process::id());
                    }
                    self.generations.insert(generation, staged);
                }
                None
            }
            Command::CommitGeneration {
                generation,
                previous,
            } => {
                if let (Some(mut new), Some(mut old)) = (
                    self.generations.remove(&generation),
                    self.generations.remove(&previous),
                ) {
                    new.listeners.take_path_ownership_from(&mut old.listeners);
                    // Dropping `old` closes the master's copies; addresses that stay open were
                    // duplicated into the new set, and unix paths no longer bound are removed.
                    drop(old);
                    self.generations.insert(generation, new);
                }
                None
            }
            Command::DropGeneration { generation } => {
                self.generations.remove(&generation);
                None
            }
            Command::CloseListeners => {
                // Stopping: a reload still waited for will not happen.
                self.reload_waiting.answer(reload_reply::NOT_NOW);
                for resources in self.generations.values_mut() {
                    resources.listeners = Listeners::default();
                }
                None
            }
            Command::StartUpgrade => self.start_upgrade(),
            Command::AbortUpgrade => {
                self.abort_upgrade();
                None
            }
            Command::ReopenLogs => {
                if let Err(e) = crate::logging::reopen_error_log() {
                    log::error!("cannot reopen the error log: {e}");
                }
                None
            }
            Command::CountRestart(cause) => {
                self.scoreboard.header().count_restart(cause.label());
                None
            }
            Command::FinishReload {
                ok,
                generation,
                status,
            } => {
                self.scoreboard.header().note_reload(ok);
                self.scoreboard.header().set_generation(generation);
                self.notify.ready(&status);
                self.reload_waiting.answer(if ok {
                    generation as isize
                } else {
                    reload_reply::FAILED
                });
                None
            }
            Command::NotifyReady { status } => {
                self.notify.ready(&status);
                None
            }
            Command::NotifyStopping => {
                self.notify.stopping();
                None
            }
            Command::NotifyMainPid => {
                self.notify.main_pid(std::process::id());
                None
            }
            Command::Log { level, message } => {
                log::log!(level, "{message}");
                None
            }
            Command::Exit => {
                self.outcome = Some(Ok(()));
                None
            }
            Command::Halt { pid, reason } => {
                self.kill_all_and_wait();
                self.outcome = Some(Err(MasterError::BootFailed {
                    pid: pid.as_raw(),
                    reason,
                }));
                None
            }
        }
    }

    /// HUP: re-read the config and open its listeners beside the serving ones.
    fn load_config(&mut self) -> Event {
        self.notify.reloading();
        let config = match config::load(&self.source) {
            Ok(config) => config,
            Err(e) => {
                return Event::ReloadRejected {
                    reason: e.to_string(),
                }
            }
        };
        let current = self.generations.get(&self.pool.serving().number);
        match Listeners::open(&config, current.map(|r| &r.listeners)) {
            Ok(listeners) => {
                let spec = Spec::from(&config);
                self.staged = Some(Resources {
                    config: Arc::new(config),
                    listeners,
                });
                Event::ReloadLoaded { spec }
            }
            Err(e) => Event::ReloadRejected {
                reason: e.to_string(),
            },
        }
    }

    fn spawn(&mut self, generation: u64) -> Result<Pid, MasterError> {
        let slot = self
            .scoreboard
            .free_slot()
            .ok_or(MasterError::ScoreboardFull(SCOREBOARD_SLOTS))?;
        let resources = self
            .generations
            .get(&generation)
            .expect("the pool spawns only into generations it adopted");
        let (owned, listen_fds) = worker_fds(&resources.listeners, resources.config.backlog)?;
        let mut foreign_fds: Vec<RawFd> = self
            .generations
            .iter()
            .filter(|(n, _)| **n != generation)
            .flat_map(|(_, r)| r.listeners.fds())
            .collect();
        foreign_fds.extend(self.notify.fd());
        foreign_fds.extend(
            resources
                .listeners
                .fds()
                .into_iter()
                .filter(|fd| !listen_fds.contains(fd)),
        );
        let pid = spawn_worker(Spawn {
            slot,
            generation,
            config: &resources.config,
            listen_fds: &listen_fds,
            foreign_fds: &foreign_fds,
            scoreboard: &self.scoreboard,
            signals: &self.signals,
            worker_main: self.worker_main,
        })
        .map_err(MasterError::Fork)?;
        drop(owned); // per-worker reuse-port sockets now live in the child only
        log::info!("Booting worker with pid: {pid} (generation {generation})");
        self.slots.insert(pid, slot);
        Ok(pid)
    }

    /// USR2: rename the pidfile to `.oldbin`, hand the unix socket files over, exec the binary.
    fn start_upgrade(&mut self) -> Option<Event> {
        if let Some(pidfile) = &mut self.pidfile {
            let oldbin = upgrade::oldbin_path(pidfile.path());
            if let Err(e) = pidfile.rename(&oldbin) {
                log::error!(
                    "Upgrade not started: cannot rename the pidfile to {}: {e}",
                    oldbin.display()
                );
                return None;
            }
        }
        let serving = self.pool.serving().number;
        let (fds, activated) = match self.generations.get_mut(&serving) {
            Some(resources) => {
                resources.listeners.set_owns_paths(false);
                (resources.listeners.fds(), resources.listeners.activated)
            }
            None => (Vec::new(), false),
        };
        match upgrade::exec_new_master(&self.exe, &fds, activated) {
            Ok(new_master) => {
                log::info!(
                    "Upgrading: started new master {} ({})",
                    new_master.pid,
                    self.exe.path.display()
                );
                let pid = new_master.pid;
                self.upgrade = Some(new_master);
                Some(Event::UpgradeStarted { pid })
            }
            Err(e) => {
                log::error!("Upgrade failed: {e}");
                self.abort_upgrade();
                None
            }
        }
    }

    /// Takes back the pidfile and the unix socket files after a failed upgrade.
    fn abort_upgrade(&mut self) {
        let serving = self.pool.serving().number;
        let Some(resources) = self.generations.get_mut(&serving) else {
            return;
        };
        resources.listeners.set_owns_paths(true);
        if let (Some(pidfile), Some(path)) = (&mut self.pidfile, resources.config.pidfile.clone()) {
            if let Err(e) = pidfile.rename(&path) {
                log::error!("cannot restore the pidfile {}: {e}", path.display());
            }
        }
    }

    fn kill_all_and_wait(&mut self) {
        for pid in self.slots.keys() {
            send(*pid, Signal::SIGKILL);
        }
        for (pid, index) in std::mem::take(&mut self.slots) {
            let _ = waitpid(pid, None);
            self.scoreboard.retire_slot(index);
        }
    }
}

/// Per worker: the fds it accepts on. In reuse-port mode each TCP address gets a fresh socket,
/// returned as owned so the master closes its copy right after forking.
fn worker_fds(
    listeners: &Listeners,
    backlog: i32,
) -> Result<(Vec<OwnedFd>, Vec<RawFd>), MasterError> {
    let mut owned = Vec::new();
    let mut fds = Vec::new();
    for listener in &listeners.all {
        if listener.is_reuse_port_holder() {
            let fd = listeners::reuse_port_socket(listener, backlog)?;
            fds.push(std::os::fd::AsRawFd::as_raw_fd(&fd));
            owned.push(fd);
        } else {
            fds.push(listener.fd());
        }
    }
    Ok((owned, fds))
}

fn send(pid: Pid, signal: Signal) {
    if let Err(e) = kill(pid, signal) {
        if e != Errno::ESRCH {
            log::warn!("cannot send {signal} to {pid}: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
