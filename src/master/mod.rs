//! The master (Gunicorn's arbiter, nginx's master cycle): binds, forks, supervises.
//!
//! It is single-threaded for its whole life and never imports tokio, hyper or the app. One loop,
//! the same every turn:
//!
//! 1. wait for signals (or the tick) and dispatch each through [`policy::action_for`];
//! 2. reap exited workers and decide what each exit means (crash, boot failure, retirement);
//! 3. when stopping: escalate to SIGKILL at the deadline, return once every worker is gone;
//! 4. otherwise run the reconcilers, each idempotent: `observe_workers` (who has booted),
//!    `murder_stale_workers` (silent past `timeout`), `advance_reload` (commit or roll back a
//!    new generation), `mark_recycling` (max_requests, memory), `manage_workers` (top up or trim
//!    to the target), `retire_replaced_workers` (retire recycled workers once their replacements
//!    serve) and `note_first_generation_booted`.
//!
//! All policy lives in those small named functions.

mod listeners;
pub mod notify;
mod pidfile;
pub mod policy;
pub mod reload_reply;
pub mod signals;
mod spawn;
mod upgrade;

use std::collections::BTreeMap;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::config::{self, Config, ConfigSource, MAX_WORKERS};
use crate::scoreboard::{monotonic_ms, Scoreboard, ScoreboardError, SlotState};
use crate::worker::{EXIT_APP_LOAD_ERROR, EXIT_BOOT_ERROR};
pub use listeners::{ListenError, Listeners};
use notify::Notifier;
pub use pidfile::{Pidfile, PidfileError};
use policy::{Action, Phase};
use signals::{SignalError, SignalQueue};
use spawn::{spawn_worker, Spawn};
use upgrade::Executable;

/// How long the loop sleeps when nothing happens. Signals wake it at once.
const LOOP_TICK: Duration = Duration::from_millis(200);
/// After SIGABRT, how long a hung worker gets before SIGKILL.
const ABORT_GRACE: Duration = Duration::from_secs(2);
/// A retiring worker gets `graceful_timeout` plus this before SIGKILL.
const RETIRE_GRACE: Duration = Duration::from_secs(1);
/// Workers told to stop quickly (INT) get this before SIGKILL.
const QUICK_STOP_GRACE: Duration = Duration::from_secs(2);
/// A worker that dies younger than this counts towards the crash-loop backoff.
const MIN_HEALTHY_LIFETIME: Duration = Duration::from_secs(5);
/// Backoff between respawns in a crash loop: doubles from the base up to the cap.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
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

/// Why a worker is being replaced while still healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecycleCause {
    MaxRequests,
    Memory,
}

/// The master's view of one worker process.
#[derive(Debug)]
struct Worker {
    pid: Pid,
    /// Its scoreboard slot.
    slot: usize,
    generation: u64,
    spawned: Instant,
    /// Requests after which it is recycled (0 = never); includes its jitter.
    request_limit: u64,
    /// Seen in state Ready at least once.
    booted: bool,
    /// Marked for replacement; keeps serving until its replacement has booted.
    recycle: Option<RecycleCause>,
    /// When it was told to stop (SIGTERM).
    retiring_since: Option<Instant>,
    /// When SIGABRT was sent for silence.
    aborted_at: Option<Instant>,
    /// SIGKILL sent; nothing more to do but reap.
    killed: bool,
    /// Why it is being replaced, for the restart counters (None: not a replacement).
    cause: Option<&'static str>,
}

/// A new generation started by HUP that has not yet taken over.
struct Reload {
    config: Arc<Config>,
    generation: u64,
    listeners: Listeners,
    started: Instant,
}

/// Exponential backoff for respawning in a crash loop.
struct Backoff {
    failures: u32,
    not_before: Instant,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            failures: 0,
            not_before: Instant::now(),
        }
    }

    fn record_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(16);
        let delay = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP);
        self.not_before = Instant::now() + delay;
        if self.failures > 1 {
            log::warn!(
                "workers keep failing ({} in a row); next spawn in {delay:?}",
                self.failures
            );
        }
    }

    fn reset(&mut self) {
        self.failures = 0;
    }

    fn allows_spawn(&self) -> bool {
        Instant::now() >= self.not_before
    }
}

pub struct Arbiter {
    /// Where the config comes from, so HUP can read it again.
    source: ConfigSource,
    /// The configuration of the serving generation.
    config: Arc<Config>,
    /// The serving generation's number.
    generation: u64,
    /// Source of generation numbers; never reused, even after a rolled-back reload.
    last_generation: u64,
    /// How many workers the serving generation should have (config, adjusted by TTIN/TTOU).
    target: usize,
    phase: Phase,
    /// When stopping: when to stop waiting and SIGKILL.
    stop_deadline: Option<Instant>,
    listeners: Listeners,
    reload: Option<Reload>,
    workers: BTreeMap<Pid, Worker>,
    scoreboard: Scoreboard,
    signals: SignalQueue,
    backoff: Backoff,
    /// Set when the master must give up (first generation cannot boot).
    halt: Option<MasterError>,
    pidfile: Option<Pidfile>,
    /// The binary and arguments to exec on USR2.
    exe: Executable,
    /// A new master started by USR2 that has not yet taken over.
    upgrade: Option<upgrade::NewMaster>,
    /// When this master was started by USR2: the old master to stop once we serve.
    upgraded_from: Option<Pid>,
    /// Seed for `max_requests_jitter`.
    jitter_seed: u64,
    /// systemd's notify socket (no-op when not run by systemd).
    notify: Notifier,
    /// How the last reload ended, for STATUS= lines.
    last_reload: String,
    /// `ragpool reload` clients waiting for the pending reload's outcome.
    reload_waiting: reload_reply::Waiting,
}

/// Runs the master until it is told to stop. Returns once every worker has exited.
pub fn run(source: ConfigSource, config: Config) -> Result<(), MasterError> {
    let mut arbiter = Arbiter::start(source, config)?;
    arbiter.run_loop()
}

impl Arbiter {
    /// Binds, maps the scoreboard and installs signal handlers. Forks nothing yet.
    pub fn start(source: ConfigSource, config: Config) -> Result<Arbiter, MasterError> {
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
        Ok(Arbiter {
            source,
            target: config.workers,
            config: Arc::new(config),
            generation: 1,
            last_generation: 1,
            phase: Phase::Booting,
            stop_deadline: None,
            listeners,
            reload: None,
            workers: BTreeMap::new(),
            scoreboard,
            signals,
            backoff: Backoff::new(),
            halt: None,
            pidfile,
            exe: Executable::current(),
            upgrade: None,
            upgraded_from: upgrade::upgraded_from(),
            jitter_seed: u64::from(me) ^ monotonic_ms(),
            notify: Notifier::from_env(),
            last_reload: String::from("none"),
            reload_waiting: reload_reply::Waiting::default(),
        })
    }

    pub fn run_loop(&mut self) -> Result<(), MasterError> {
        self.manage_workers(); // the first generation, without waiting for the first tick
        loop {
            let tick = self
                .notify
                .max_sleep()
                .map_or(LOOP_TICK, |d| d.min(LOOP_TICK));
            for signal in self.signals.wait(tick) {
                self.dispatch(signal);
            }
            self.reap_workers();
            if let Some(error) = self.halt.take() {
                self.kill_all_and_wait();
                return Err(error);
            }
            self.observe_workers();
            if matches!(self.phase, Phase::Draining | Phase::Halting) {
                if self.workers.is_empty() {
                    log::info!("Shutting down: master exits");
                    return Ok(());
                }
                self.escalate_stop();
                continue;
            }
            self.murder_stale_workers();
            self.advance_reload();
            self.mark_recycling();
            self.manage_workers();
            self.retire_replaced_workers();
            self.note_first_generation_booted();
            self.notify.watchdog();
        }
    }

    // ----- signals -------------------------------------------------------------------------

    fn dispatch(&mut self, signal: Signal) {
        match policy::action_for(self.phase, signal) {
            Action::Reap => {}
            Action::Reload => {
                log::info!("Handling signal: {signal}");
                self.reload();
            }
            Action::StopGracefully => {
                log::info!("Handling signal: {signal}: graceful shutdown");
                self.stop(false);
            }
            Action::StopQuickly => {
                log::info!("Handling signal: {signal}: quick shutdown");
                self.stop(true);
            }
            Action::AddWorker => {
                self.target = (self.target + 1).min(MAX_WORKERS);
                log::info!(
                    "Handling signal: {signal}: target is now {} workers",
                    self.target
                );
            }
            Action::RemoveWorker => {
                self.target = self.target.saturating_sub(1).max(1);
                log::info!(
                    "Handling signal: {signal}: target is now {} workers",
                    self.target
                );
            }
            Action::ReopenLogs => {
                log::info!("Handling signal: {signal}: reopening log files");
                if let Err(e) = crate::logging::reopen_error_log() {
                    log::error!("cannot reopen the error log: {e}");
                }
                self.signal_workers(Signal::SIGUSR1, |_| true);
            }
            Action::Upgrade => {
                log::info!("Handling signal: {signal}: binary upgrade");
                self.start_upgrade();
            }
            Action::Ignore(why) => {
                log::info!("Ignoring signal {signal}: {why}");
                if signal == Signal::SIGHUP {
                    reload_reply::decline_recorded();
                }
            }
        }
    }

    // ----- reaping -------------------------------------------------------------------------

    fn reap_workers(&mut self) {
        if let Some(new_master) = self.upgrade.take_if(|m| m.has_exited()) {
            log::error!("Upgrade failed: the new master (pid {}) exited before taking over; this master keeps serving", new_master.pid);
            self.abort_upgrade();
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(WaitStatus::Exited(pid, code)) => self.on_worker_exit(pid, ExitKind::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.on_worker_exit(pid, ExitKind::Signal(sig))
                }
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitpid failed: {e}");
                    return;
                }
            }
        }
    }

    fn on_worker_exit(&mut self, pid: Pid, how: ExitKind) {
        let Some(worker) = self.workers.remove(&pid) else {
            log::debug!("reaped unknown child {pid} ({how})");
            return;
        };
        let slot = self.scoreboard.slot(worker.slot);
        let booted =
            worker.booted || matches!(slot.state(), SlotState::Ready | SlotState::Draining);
        let boot_error = slot.boot_error();
        self.scoreboard.retire_slot(worker.slot);

        let stopping = matches!(self.phase, Phase::Draining | Phase::Halting);
        let cause = match (stopping, worker.cause, worker.retiring_since) {
            (true, _, _) => None,
            (false, Some(cause), _) => Some(cause),
            (false, None, None) => Some("crash"),
            (false, None, Some(_)) => None,
        };
        if let Some(cause) = cause {
            self.scoreboard.header().count_restart(cause);
        }
        let expected = worker.retiring_since.is_some() || stopping;
        if expected {
            log::info!(
                "Worker exiting (pid: {pid}, generation {}): {how}",
                worker.generation
            );
            return;
        }
        log::error!(
            "Worker (pid: {pid}, generation {}) died: {how}",
            worker.generation
        );

        let boot_failure = !booted && how.is_boot_failure();
        let in_pending_reload = self
            .reload
            .as_ref()
            .is_some_and(|r| r.generation == worker.generation);
        if in_pending_reload && !booted {
            let reason = boot_error.unwrap_or_else(|| how.to_string());
            self.abort_reload(&format!(
                "a new worker (pid {pid}) failed to boot: {reason}"
            ));
        } else if boot_failure && self.phase == Phase::Booting {
            let reason = boot_error.unwrap_or_else(|| how.to_string());
            log::error!("Worker failed to boot: {reason}");
            self.halt = Some(MasterError::BootFailed {
                pid: pid.as_raw(),
                reason,
            });
        } else if worker.spawned.elapsed() < MIN_HEALTHY_LIFETIME || boot_failure {
            if let Some(reason) = boot_error {
                log::error!("Worker failed to boot: {reason}");
            }
            self.backoff.record_failure();
        } else {
            self.backoff.reset();
        }
    }

    // ----- reconcilers ---------------------------------------------------------------------

    /// Notes which workers have finished booting.
    fn observe_workers(&mut self) {
        for worker in self.workers.values_mut() {
            if !worker.booted && self.scoreboard.slot(worker.slot).state() == SlotState::Ready {
                worker.booted = true;
                log::debug!(
                    "worker {} (generation {}) is serving",
                    worker.pid,
                    worker.generation
                );
            }
        }
    }

    /// Kills workers whose event loop has been silent longer than `timeout`: SIGABRT, then SIGKILL.
    fn murder_stale_workers(&mut self) {
        let now_ms = monotonic_ms();
        let timeout_ms = self.config.timeout.as_millis() as u64;
        let retire_limit = self.config.graceful_timeout + RETIRE_GRACE;
        for worker in self.workers.values_mut().filter(|w| !w.killed) {
            let silence = self.scoreboard.slot(worker.slot).silence_ms(now_ms);
            let overdue_retiree = worker
                .retiring_since
                .is_some_and(|t| t.elapsed() > retire_limit);
            match worker.aborted_at {
                _ if overdue_retiree => {
                    log::warn!(
                        "Worker (pid: {}) did not finish within graceful_timeout; killing it",
                        worker.pid
                    );
                    send(worker.pid, Signal::SIGKILL);
                    worker.killed = true;
                }
                None if silence > timeout_ms => {
                    log::error!(
                        "WORKER TIMEOUT (pid: {}): silent for {silence} ms; sending SIGABRT",
                        worker.pid
                    );
                    send(worker.pid, Signal::SIGABRT);
                    worker.aborted_at = Some(Instant::now());
                    worker.cause = Some("timeout");
                }
                Some(at) if at.elapsed() > ABORT_GRACE => {
                    log::error!(
                        "Worker (pid: {}) ignored SIGABRT; sending SIGKILL",
                        worker.pid
                    );
                    send(worker.pid, Signal::SIGKILL);
                    worker.killed = true;
                }
                _ => {}
            }
        }
    }

    /// Commits a pending reload once all its workers serve, or rolls it back when it overruns.
    fn advance_reload(&mut self) {
        let Some(reload) = &self.reload else { return };
        let booted = self
            .workers
            .values()
            .filter(|w| w.generation == reload.generation && w.booted)
            .count();
        if booted >= reload.config.workers {
            self.commit_reload();
        } else if reload.started.elapsed() > reload.config.timeout.max(Duration::from_secs(1)) {
            let message = format!(
                "new workers did not boot within timeout ({:?})",
                reload.config.timeout
            );
            self.abort_reload(&message);
        }
    }

    /// Marks workers that reached `max_requests` or `max_worker_memory` for replacement.
    fn mark_recycling(&mut self) {
        let max_mib = self.config.max_worker_memory_mib;
        for worker in self.workers.values_mut() {
            if worker.generation != self.generation
                || worker.retiring_since.is_some()
                || worker.recycle.is_some()
            {
                continue;
            }
            let served = self.scoreboard.slot(worker.slot).requests();
            if worker.request_limit > 0 && served >= worker.request_limit {
                log::info!(
                    "Worker (pid: {}) served {served} requests (max_requests); recycling",
                    worker.pid
                );
                worker.recycle = Some(RecycleCause::MaxRequests);
            } else if max_mib > 0 {
                // Stamped by the worker's own heartbeat: no /proc read here.
                let rss = self
                    .scoreboard
                    .slot(worker.slot)
                    .rss_kib
                    .load(std::sync::atomic::Ordering::Relaxed)
                    / 1024;
                if rss > max_mib {
                    log::info!(
                        "Worker (pid: {}) uses {rss} MiB > max_worker_memory {max_mib}; recycling",
                        worker.pid
                    );
                    worker.recycle = Some(RecycleCause::Memory);
                }
            }
        }
    }

    /// Tops the serving generation up to `target`, or retires the oldest beyond it.
    fn manage_workers(&mut self) {
        let active = self.active_workers();
        if active.len() > self.target {
            let excess = active.len() - self.target;
            for pid in active.into_iter().take(excess) {
                self.retire(pid, "above the target worker count", Some("scale_down"));
            }
            return;
        }
        let missing = self.target - active.len();
        if missing == 0 || !self.backoff.allows_spawn() {
            return;
        }
        // In a crash loop, one at a time; otherwise all at once.
        let count = if self.backoff.failures > 0 {
            1
        } else {
            missing
        };
        let config = Arc::clone(&self.config);
        for _ in 0..count {
            if let Err(e) = self.spawn(self.generation, &config, false) {
                log::error!("{e}");
                self.backoff.record_failure();
                return;
            }
        }
    }

    /// Retires recycled workers, oldest first, only while the booted workers that would remain
    /// still number at least `target`: capacity never dips below it.
    fn retire_replaced_workers(&mut self) {
        let mut serving: Vec<&Worker> = self
            .workers
            .values()
            .filter(|w| w.generation == self.generation && w.booted && w.retiring_since.is_none())
            .collect();
        serving.sort_by_key(|w| w.spawned);
        let mut capacity = serving.len();
        let mut to_retire = Vec::new();
        for worker in serving.iter().filter(|w| w.recycle.is_some()) {
            if capacity <= self.target {
                break;
            }
            let cause = match worker.recycle {
                Some(RecycleCause::Memory) => "memory",
                _ => "max_requests",
            };
            to_retire.push((worker.pid, cause));
            capacity -= 1;
        }
        for (pid, cause) in to_retire {
            self.retire(pid, "its replacement is serving", Some(cause));
        }
    }

    fn note_first_generation_booted(&mut self) {
        if self.phase != Phase::Booting {
            return;
        }
        let booted = self
            .workers
            .values()
            .filter(|w| w.generation == self.generation && w.booted)
            .count();
        if booted >= self.target {
            self.phase = Phase::Running;
            log::info!(
                "All {booted} workers of generation {} are serving",
                self.generation
            );
            self.notify.ready(&self.status_line());
            if let Some(old) = self.upgraded_from.take() {
                log::info!("Upgrade complete: this master serves; telling the old master (pid {old}) to stop");
                self.notify.main_pid(std::process::id());
                send(old, Signal::SIGTERM);
            }
        }
    }

    /// USR2: rename the pidfile to `.oldbin`, hand the unix socket files over, exec the binary.
    fn start_upgrade(&mut self) {
        if let Some(new_master) = &self.upgrade {
            log::warn!(
                "An upgrade (new master pid {}) is already in progress",
                new_master.pid
            );
            return;
        }
        if let Some(pidfile) = &mut self.pidfile {
            let oldbin = upgrade::oldbin_path(pidfile.path());
            if let Err(e) = pidfile.rename(&oldbin) {
                log::error!(
                    "Upgrade not started: cannot rename the pidfile to {}: {e}",
                    oldbin.display()
                );
                return;
            }
        }
        self.listeners.set_owns_paths(false);
        let activated = self.listeners.activated;
        match upgrade::exec_new_master(&self.exe, &self.listeners.fds(), activated) {
            Ok(new_master) => {
                log::info!(
                    "Upgrading: started new master {} ({})",
                    new_master.pid,
                    self.exe.path.display()
                );
                self.upgrade = Some(new_master);
            }
            Err(e) => {
                log::error!("Upgrade failed: {e}");
                self.abort_upgrade();
            }
        }
    }

    /// Takes back the pidfile and the unix socket files after a failed upgrade.
    fn abort_upgrade(&mut self) {
        self.listeners.set_owns_paths(true);
        if let (Some(pidfile), Some(path)) = (&mut self.pidfile, self.config.pidfile.clone()) {
            if let Err(e) = pidfile.rename(&path) {
                log::error!("cannot restore the pidfile {}: {e}", path.display());
            }
        }
    }

    // ----- actions -------------------------------------------------------------------------

    /// Pids of the serving generation that count towards the target, oldest first.
    fn active_workers(&self) -> Vec<Pid> {
        let mut active: Vec<&Worker> = self
            .workers
            .values()
            .filter(|w| {
                w.generation == self.generation && w.retiring_since.is_none() && w.recycle.is_none()
            })
            .collect();
        active.sort_by_key(|w| w.spawned);
        active.into_iter().map(|w| w.pid).collect()
    }

    fn spawn(
        &mut self,
        generation: u64,
        config: &Arc<Config>,
        for_reload: bool,
    ) -> Result<Pid, MasterError> {
        let slot = self
            .scoreboard
            .free_slot()
            .ok_or(MasterError::ScoreboardFull(SCOREBOARD_SLOTS))?;
        let (listeners, foreign) = match (&self.reload, for_reload) {
            (Some(reload), true) => (&reload.listeners, &self.listeners),
            (Some(reload), false) => (&self.listeners, &reload.listeners),
            (None, _) => (&self.listeners, &self.listeners),
        };
        let (owned, listen_fds) = worker_fds(listeners, config.backlog)?;
        let mut foreign_fds: Vec<RawFd> = foreign.fds();
        foreign_fds.extend(self.notify.fd());
        foreign_fds.extend(
            listeners
                .fds()
                .into_iter()
                .filter(|fd| !listen_fds.contains(fd)),
        );
        let pid = spawn_worker(Spawn {
            slot,
            generation,
            config,
            listen_fds: &listen_fds,
            foreign_fds: &foreign_fds,
            scoreboard: &self.scoreboard,
            signals: &self.signals,
        })
        .map_err(MasterError::Fork)?;
        drop(owned); // per-worker reuse-port sockets now live in the child only
        log::info!("Booting worker with pid: {pid} (generation {generation})");
        let request_limit = self.request_limit(config);
        self.workers.insert(
            pid,
            Worker {
                pid,
                slot,
                generation,
                spawned: Instant::now(),
                request_limit,
                booted: false,
                recycle: None,
                retiring_since: None,
                aborted_at: None,
                killed: false,
                cause: None,
            },
        );
        Ok(pid)
    }

    fn request_limit(&mut self, config: &Config) -> u64 {
        if config.max_requests == 0 {
            return 0;
        }
        // xorshift: jitter needs spread, not cryptographic quality.
        self.jitter_seed ^= self.jitter_seed << 13;
        self.jitter_seed ^= self.jitter_seed >> 7;
        self.jitter_seed ^= self.jitter_seed << 17;
        config.max_requests + self.jitter_seed % (config.max_requests_jitter + 1)
    }

    /// Tells one worker to finish its in-flight requests and exit.
    fn retire(&mut self, pid: Pid, why: &str, cause: Option<&'static str>) {
        if let Some(worker) = self.workers.get_mut(&pid) {
            if worker.retiring_since.is_none() {
                worker.cause = cause;
                log::info!(
                    "Retiring worker (pid: {pid}, generation {}): {why}",
                    worker.generation
                );
                worker.retiring_since = Some(Instant::now());
                send(pid, Signal::SIGTERM);
            }
        }
    }

    fn signal_workers(&self, signal: Signal, which: impl Fn(&Worker) -> bool) {
        for worker in self.workers.values().filter(|w| which(w)) {
            send(worker.pid, signal);
        }
    }

    /// One line for `systemctl status`.
    fn status_line(&self) -> String {
        let serving = self
            .workers
            .values()
            .filter(|w| w.generation == self.generation && w.booted)
            .count();
        format!(
            "{serving} workers serving, generation {}, last reload: {}",
            self.generation, self.last_reload
        )
    }

    /// Records how a reload ended and tells systemd the reload is over (READY=1).
    fn finish_reload(&mut self, outcome: String) {
        let ok = outcome.starts_with("ok");
        self.scoreboard.header().note_reload(ok);
        self.scoreboard.header().set_generation(self.generation);
        self.last_reload = outcome;
        self.notify.ready(&self.status_line());
        let answer = if ok {
            self.generation as isize
        } else {
            reload_reply::FAILED
        };
        self.reload_waiting.answer(answer);
    }

    /// HUP: validate the config; if good, start a new generation beside the serving one.
    fn reload(&mut self) {
        self.reload_waiting.add_recorded();
        self.notify.reloading();
        let config = match config::load(&self.source) {
            Ok(config) => Arc::new(config),
            Err(e) => {
                log::error!("Reload rejected, the running workers are untouched: {e}");
                self.finish_reload(format!("rejected ({e})"));
                return;
            }
        };
        if self.reload.is_some() {
            self.abort_reload("superseded by a newer reload");
        }
        let listeners = match Listeners::open(&config, Some(&self.listeners)) {
            Ok(listeners) => listeners,
            Err(e) => {
                log::error!("Reload rejected, the running workers are untouched: {e}");
                self.finish_reload(format!("rejected ({e})"));
                return;
            }
        };
        self.last_generation += 1;
        let generation = self.last_generation;
        log::info!(
            "Reloading: starting generation {generation} with {} workers",
            config.workers
        );
        for address in listeners.describe() {
            log::info!("Listening at: {address} ({})", std::process::id());
        }
        self.reload = Some(Reload {
            config: Arc::clone(&config),
            generation,
            listeners,
            started: Instant::now(),
        });
        for _ in 0..config.workers {
            if let Err(e) = self.spawn(generation, &config, true) {
                self.abort_reload(&e.to_string());
                return;
            }
        }
    }

    /// The new generation serves: it becomes current, and the old one retires gracefully.
    fn commit_reload(&mut self) {
        let Some(mut reload) = self.reload.take() else {
            return;
        };
        reload
            .listeners
            .take_path_ownership_from(&mut self.listeners);
        // Dropping the old listeners closes the master's copies; addresses that stay open were
        // duplicated into the new set, and unix paths no longer bound are removed.
        self.listeners = reload.listeners;
        self.config = reload.config;
        self.generation = reload.generation;
        self.target = self.config.workers;
        let old: Vec<Pid> = self
            .workers
            .values()
            .filter(|w| w.generation < self.generation)
            .map(|w| w.pid)
            .collect();
        for pid in old {
            self.retire(pid, "replaced by a reload", Some("reload"));
        }
        log::info!("Reload complete: generation {} is serving", self.generation);
        self.finish_reload(format!("ok (generation {})", self.generation));
    }

    /// Rolls back a pending reload: its workers stop, its new listeners close, nothing else changes.
    fn abort_reload(&mut self, reason: &str) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        let doomed: Vec<Pid> = self
            .workers
            .values()
            .filter(|w| w.generation == reload.generation)
            .map(|w| w.pid)
            .collect();
        for pid in doomed {
            self.retire(pid, "its reload was rolled back", None);
        }
        log::error!(
            "Reload to generation {} failed: {reason}; generation {} keeps serving",
            reload.generation,
            self.generation
        );
        if !reason.starts_with("superseded") {
            self.finish_reload(format!("failed ({reason})"));
        }
    }

    /// TERM/QUIT (graceful) or INT (quick): close the listeners and tell every worker.
    fn stop(&mut self, quick: bool) {
        let (phase, signal, grace) = if quick {
            (Phase::Halting, Signal::SIGINT, QUICK_STOP_GRACE)
        } else {
            (
                Phase::Draining,
                Signal::SIGTERM,
                self.config.graceful_timeout + RETIRE_GRACE,
            )
        };
        if let Some(successor) = &self.upgrade {
            // Stopped by our successor after an upgrade: the service is not stopping, so no
            // STOPPING=1 (systemd already follows the new MAINPID).
            log::info!("Handing over to the new master (pid {})", successor.pid);
        } else if !matches!(self.phase, Phase::Draining | Phase::Halting) {
            self.notify.stopping();
        }
        self.phase = phase;
        self.stop_deadline = Some(Instant::now() + grace);
        self.reload = None;
        self.reload_waiting.answer(reload_reply::NOT_NOW);
        // Closing our copies (and removing unix socket files) stops new connections from being
        // queued once the workers have drained what is already in the backlog.
        self.listeners = Listeners::default();
        self.signal_workers(signal, |w| !w.killed);
    }

    fn escalate_stop(&mut self) {
        if self.stop_deadline.is_some_and(|d| Instant::now() >= d) {
            for worker in self.workers.values_mut().filter(|w| !w.killed) {
                log::warn!(
                    "Worker (pid: {}) still running at the shutdown deadline; killing it",
                    worker.pid
                );
                send(worker.pid, Signal::SIGKILL);
                worker.killed = true;
            }
        }
    }

    fn kill_all_and_wait(&mut self) {
        for pid in self.workers.keys() {
            send(*pid, Signal::SIGKILL);
        }
        for pid in std::mem::take(&mut self.workers).into_keys() {
            let _ = waitpid(pid, None);
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

/// How a worker ended.
#[derive(Debug, Clone, Copy)]
enum ExitKind {
    Code(i32),
    Signal(Signal),
}

impl ExitKind {
    fn is_boot_failure(self) -> bool {
        matches!(self, ExitKind::Code(EXIT_BOOT_ERROR | EXIT_APP_LOAD_ERROR))
    }
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Code(0) => write!(f, "exited normally"),
            ExitKind::Code(EXIT_BOOT_ERROR) => {
                write!(f, "exit code {EXIT_BOOT_ERROR} (boot error)")
            }
            ExitKind::Code(EXIT_APP_LOAD_ERROR) => {
                write!(f, "exit code {EXIT_APP_LOAD_ERROR} (app load error)")
            }
            ExitKind::Code(code) => write!(f, "exit code {code}"),
            ExitKind::Signal(sig) => write!(f, "killed by {sig}"),
        }
    }
}
