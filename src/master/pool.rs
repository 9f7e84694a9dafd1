//! The pool core: every supervision decision of the master, as a pure function of the pool's
//! state, one event and the time (`Pool::on_event(event, now) -> Vec<Command>`).
//!
//! It owns the lifecycle of each worker (one [`WorkerState`] per process), the generations (the
//! serving one and at most one pending reload, each a [`Generation`] with its own seats), the
//! boot backoff per seat, the boot-rate bucket, the phase of the master and the restart causes.
//! It decides reaping, murdering, recycling, reload commit and rollback, TTIN/TTOU, the upgrade
//! hand-over and the drain.
//!
//! It must not make a syscall, read a clock, touch the scoreboard or log: the effectful shell in
//! [`super`] forks, signals, reaps, reads the scoreboard into [`Event::Tick`] samples, and carries
//! out the [`Command`]s in order (logging included). So every decision here is unit-tested by
//! feeding events, without forking.
//!
//! # The state of one worker
//!
//! ```text
//!             ready                 max_requests / memory          replacement serves
//!  Booting ───────────▶ Serving ─────────────────────▶ Recycling ─────────────────────▶ Retiring
//!     │                   │  │ reload commit, TTOU, stop, rollback                 ▲       │
//!     │ silent            │  └─────────────────────────────────────────────────────┘       │
//!     ▼ > timeout         ▼ silent > timeout                      past graceful_timeout    ▼
//!  Aborted (SIGABRT) ◀────┘          Aborted ── ABORT_GRACE ──▶ Killed (SIGKILL) ◀── Retiring
//! ```
//! Any state ends in an exit. An exit from `Booting` is a boot failure (per-seat backoff, or a
//! rollback for a pending reload, or a halt for the first generation); from `Serving` or
//! `Recycling` a crash, replaced at once; from the others it was asked for.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::policy::{self, Action, Phase};
use crate::config::{Config, MAX_WORKERS};

pub use crate::scoreboard::{EXIT_APP_LOAD_ERROR, EXIT_BOOT_ERROR};

/// After SIGABRT, how long a hung worker gets before SIGKILL.
pub const ABORT_GRACE: Duration = Duration::from_secs(2);
/// A retiring worker gets `graceful_timeout` plus this before SIGKILL.
pub const RETIRE_GRACE: Duration = Duration::from_secs(1);
/// Workers told to stop quickly (INT) get this before SIGKILL.
pub const QUICK_STOP_GRACE: Duration = Duration::from_secs(2);
/// Backoff after a boot failure: doubles from the base up to the cap, per seat.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// The boot-rate bucket holds this many boots per seat of the target (the burst), and at least
/// [`BOOT_BURST_MIN`]...
pub const BOOT_BURST_PER_SEAT: u64 = 2;
pub const BOOT_BURST_MIN: u64 = 8;
/// ...and refills one boot per seat per this interval, so once the burst is spent a vacant seat
/// waits at most this long for a token even when every worker dies right after booting.
pub const BOOT_REFILL_INTERVAL: Duration = Duration::from_secs(1);

/// How many boots the bucket holds for a target of `seats` workers.
pub fn boot_burst(seats: usize) -> u64 {
    (seats.max(1) as u64 * BOOT_BURST_PER_SEAT).max(BOOT_BURST_MIN)
}

/// What the core needs to know of a generation's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// How many workers the generation has (its seats).
    pub workers: usize,
    /// A worker silent longer than this is aborted.
    pub timeout: Duration,
    /// How long a retiring worker may take to finish.
    pub graceful_timeout: Duration,
    /// How long a reload's new generation may take to serve before it is rolled back.
    pub boot_timeout: Duration,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub max_worker_memory_mib: u64,
}

impl From<&Config> for Spec {
    fn from(config: &Config) -> Spec {
        Spec {
            workers: config.workers,
            timeout: config.timeout,
            graceful_timeout: config.graceful_timeout,
            boot_timeout: config.boot_timeout,
            max_requests: config.max_requests,
            max_requests_jitter: config.max_requests_jitter,
            max_worker_memory_mib: config.max_worker_memory_mib,
        }
    }
}

/// Why a worker was replaced: the `cause` label of `ragpool_worker_restarts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// It died without being asked to (including a failed boot).
    Crash,
    /// Its event loop was silent past `timeout`.
    Timeout,
    MaxRequests,
    Memory,
    /// Its generation was replaced by a reload.
    Reload,
    /// TTOU lowered the target.
    ScaleDown,
}

impl Cause {
    pub const ALL: [Cause; 6] = [
        Cause::Crash,
        Cause::Timeout,
        Cause::MaxRequests,
        Cause::Memory,
        Cause::Reload,
        Cause::ScaleDown,
    ];

    /// The metric label (one of [`crate::metrics::CAUSES`]).
    pub fn label(self) -> &'static str {
        match self {
            Cause::Crash => "crash",
            Cause::Timeout => "timeout",
            Cause::MaxRequests => "max_requests",
            Cause::Memory => "memory",
            Cause::Reload => "reload",
            Cause::ScaleDown => "scale_down",
        }
    }
}

/// Where one worker is in its life (see the diagram in the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Forked; has not reported ready yet.
    Booting,
    /// Ready and counted towards its generation's target.
    Serving,
    /// Still serving, but marked for replacement; retired once its replacement serves.
    Recycling(Cause),
    /// Told to finish in-flight requests and exit (SIGTERM); `count_as` is the restart cause
    /// its exit is counted under (`None`: not a replacement, e.g. a rolled-back reload).
    Retiring {
        since: Instant,
        count_as: Option<Cause>,
    },
    /// Silent past `timeout`: SIGABRT sent at `since`.
    Aborted { since: Instant },
    /// SIGKILL sent; nothing more to do but reap.
    Killed { count_as: Option<Cause> },
}

impl WorkerState {
    /// The restart cause an exit in this state counts as (when the master is not stopping).
    fn count_as(self) -> Option<Cause> {
        match self {
            WorkerState::Booting | WorkerState::Serving | WorkerState::Recycling(_) => {
                Some(Cause::Crash)
            }
            WorkerState::Retiring { count_as, .. } | WorkerState::Killed { count_as } => count_as,
            WorkerState::Aborted { .. } => Some(Cause::Timeout),
        }
    }

    /// Whether the master asked for this exit (so it is logged as an exit, not a death).
    fn exit_was_asked_for(self) -> bool {
        match self {
            WorkerState::Retiring { .. } => true,
            WorkerState::Killed { count_as } => count_as != Some(Cause::Timeout),
            _ => false,
        }
    }
}

/// The master's view of one worker process.
#[derive(Debug, Clone)]
pub struct Worker {
    pub pid: Pid,
    pub generation: u64,
    /// The seat it fills in its generation; `None` once it no longer counts towards the target.
    pub seat: Option<usize>,
    pub spawned: Instant,
    /// Has reported ready at least once.
    pub booted: bool,
    /// Requests after which it is recycled (0 = never); includes its jitter.
    pub request_limit: u64,
    pub state: WorkerState,
}

/// One place in a generation's target: its boot-failure history outlives the processes.
#[derive(Debug, Clone, Default)]
struct Seat {
    /// Boot failures in a row (reset when a worker in this seat reports ready).
    failures: u32,
    /// No spawn into this seat before then (backoff).
    not_before: Option<Instant>,
    /// A spawn was ordered and its result has not come back yet.
    reserved: bool,
}

/// A generation: its number, what its config asks for, and its seats.
#[derive(Debug, Clone)]
pub struct Generation {
    pub number: u64,
    pub spec: Spec,
    seats: Vec<Seat>,
}

impl Generation {
    fn new(number: u64, spec: Spec) -> Generation {
        let seats = vec![Seat::default(); spec.workers.max(1)];
        Generation {
            number,
            spec,
            seats,
        }
    }

    /// How many workers it should have.
    pub fn target(&self) -> usize {
        self.seats.len()
    }
}

/// A reload that has not taken over yet.
#[derive(Debug, Clone)]
struct Pending {
    generation: Generation,
    started: Instant,
}

/// Boots allowed right now: refilled over time, spent by each spawn into a serving seat.
#[derive(Debug, Clone)]
struct BootBucket {
    /// In thousandths of a boot, so refills stay exact in integers.
    milli: u64,
    capacity_milli: u64,
    /// Thousandths of a boot gained per millisecond (= seats per refill interval).
    refill_per_ms: u64,
    last: Instant,
}

impl BootBucket {
    fn new(target: usize, now: Instant) -> BootBucket {
        let mut bucket = BootBucket {
            milli: 0,
            capacity_milli: 0,
            refill_per_ms: 0,
            last: now,
        };
        bucket.resize(target);
        bucket.milli = bucket.capacity_milli;
        bucket
    }

    fn resize(&mut self, target: usize) {
        let seats = target.max(1) as u64;
        self.capacity_milli = boot_burst(target) * 1000;
        self.refill_per_ms = seats * 1000 / (BOOT_REFILL_INTERVAL.as_millis() as u64).max(1);
        self.milli = self.milli.min(self.capacity_milli);
    }

    fn refill(&mut self, now: Instant) {
        let ms = now.saturating_duration_since(self.last).as_millis() as u64;
        if ms > 0 {
            self.milli = (self.milli + ms * self.refill_per_ms).min(self.capacity_milli);
            self.last += Duration::from_millis(ms);
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }

    /// When the next whole boot will be available.
    fn next_token(&self) -> Instant {
        let missing = 1000u64.saturating_sub(self.milli);
        let ms = missing.div_ceil(self.refill_per_ms.max(1));
        self.last + Duration::from_millis(ms)
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(Signal),
}

impl ExitStatus {
    /// The worker said it could not boot (exit code 3 or 4).
    pub fn is_boot_failure(self) -> bool {
        matches!(
            self,
            ExitStatus::Code(EXIT_BOOT_ERROR | EXIT_APP_LOAD_ERROR)
        )
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(0) => write!(f, "exited normally"),
            ExitStatus::Code(EXIT_BOOT_ERROR) => {
                write!(f, "exit code {EXIT_BOOT_ERROR} (boot error)")
            }
            ExitStatus::Code(EXIT_APP_LOAD_ERROR) => {
                write!(f, "exit code {EXIT_APP_LOAD_ERROR} (app load error)")
            }
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(sig) => write!(f, "killed by {sig}"),
        }
    }
}

/// What the shell read of one worker's scoreboard slot this turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub pid: Pid,
    /// The slot says Ready (or Draining, which only a ready worker reaches).
    pub ready: bool,
    /// Since the worker's event loop last stamped its heartbeat.
    pub silence: Duration,
    pub requests: u64,
    pub rss_mib: u64,
}

/// Something that happened, as the shell saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The master is up: boot the first generation.
    Start,
    /// A signal the master handles arrived.
    Signal(Signal),
    /// A [`Command::Spawn`] forked this worker.
    Spawned {
        pid: Pid,
        generation: u64,
        seat: usize,
    },
    /// A [`Command::Spawn`] could not fork.
    SpawnFailed {
        generation: u64,
        seat: usize,
        error: String,
    },
    /// A child was reaped. `was_ready` and `boot_error` come from its scoreboard slot.
    Exited {
        pid: Pid,
        status: ExitStatus,
        was_ready: bool,
        boot_error: Option<String>,
    },
    /// A turn of the loop, with every live worker's slot.
    Tick { samples: Vec<Sample> },
    /// After [`Command::LoadConfig`]: the new config loaded and its listeners are open (staged).
    ReloadLoaded { spec: Spec },
    /// After [`Command::LoadConfig`]: the new config or its listeners failed; nothing changes.
    ReloadRejected { reason: String },
    /// After [`Command::StartUpgrade`]: the new master runs with this pid.
    UpgradeStarted { pid: Pid },
    /// The new master exited (seen through its pidfd: it is not our child).
    UpgradeExited,
}

/// Something the shell must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Fork a worker of this generation into this seat; answer with `Spawned` or `SpawnFailed`.
    Spawn {
        generation: u64,
        seat: usize,
    },
    /// Send a signal to a worker (or to the old master after an upgrade).
    Signal {
        pid: Pid,
        signal: Signal,
    },
    /// HUP accepted: re-read the config, open its listeners; answer with `ReloadLoaded` or
    /// `ReloadRejected`.
    LoadConfig,
    /// HUP declined (booting, stopping): answer waiting `ragpool reload` clients "not now".
    DeclineReload,
    /// The staged config and listeners become this generation's.
    AdoptGeneration {
        generation: u64,
    },
    /// `generation` takes over from `previous`, whose listeners the master closes.
    CommitGeneration {
        generation: u64,
        previous: u64,
    },
    /// Close a rolled-back generation's listeners.
    DropGeneration {
        generation: u64,
    },
    /// Stopping: close every listener the master holds.
    CloseListeners,
    /// USR2: exec the binary on disk, handing it the listeners; answer with `UpgradeStarted`.
    StartUpgrade,
    /// The new master died before taking over: take the pidfile and socket paths back.
    AbortUpgrade,
    /// USR1: reopen the master's own log file.
    ReopenLogs,
    /// Count one replacement under its cause in the shared metrics.
    CountRestart(Cause),
    /// A reload ended: record it, and tell systemd the service is ready again.
    FinishReload {
        ok: bool,
        generation: u64,
        status: String,
    },
    /// The first generation serves (READY=1).
    NotifyReady {
        status: String,
    },
    /// The service is stopping (STOPPING=1).
    NotifyStopping,
    /// This master has taken over from the old one (MAINPID=).
    NotifyMainPid,
    Log {
        level: log::Level,
        message: String,
    },
    /// Every worker is gone after a stop: the master exits 0.
    Exit,
    /// The first generation cannot boot: kill everything and exit with the worker's error.
    Halt {
        pid: Pid,
        reason: String,
    },
}

/// The whole supervision state.
#[derive(Debug)]
pub struct Pool {
    phase: Phase,
    serving: Generation,
    pending: Option<Pending>,
    /// Source of generation numbers; never reused, even after a rollback.
    last_generation: u64,
    workers: BTreeMap<Pid, Worker>,
    bucket: BootBucket,
    /// When stopping: when to stop waiting and SIGKILL.
    stop_deadline: Option<Instant>,
    /// A new master started by USR2 that has not yet taken over.
    upgrade: Option<Pid>,
    /// When this master was started by USR2: the old master to stop once we serve.
    upgraded_from: Option<Pid>,
    /// Seed for `max_requests_jitter` (xorshift: spread, not secrecy).
    jitter_seed: u64,
    /// How the last reload ended, for STATUS= lines.
    last_reload: String,
    /// `Exit` or `Halt` was ordered: nothing more to decide.
    finished: bool,
    /// Commands of the event being handled.
    out: Vec<Command>,
}

impl Pool {
    pub fn new(spec: Spec, upgraded_from: Option<Pid>, jitter_seed: u64, now: Instant) -> Pool {
        let serving = Generation::new(1, spec);
        Pool {
            phase: Phase::Booting,
            bucket: BootBucket::new(serving.target(), now),
            serving,
            pending: None,
            last_generation: 1,
            workers: BTreeMap::new(),
            stop_deadline: None,
            upgrade: None,
            upgraded_from,
            jitter_seed: jitter_seed | 1,
            last_reload: String::from("none"),
            finished: false,
            out: Vec::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn serving(&self) -> &Generation {
        &self.serving
    }

    pub fn pending_generation(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.generation.number)
    }

    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    pub fn worker(&self, pid: Pid) -> Option<&Worker> {
        self.workers.get(&pid)
    }

    /// The one step of the master: what `event` at `now` means, as commands for the shell.
    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Command> {
        if self.finished {
            return Vec::new();
        }
        match event {
            Event::Start => {}
            Event::Signal(signal) => self.on_signal(signal, now),
            Event::Spawned {
                pid,
                generation,
                seat,
            } => self.on_spawned(pid, generation, seat, now),
            Event::SpawnFailed {
                generation,
                seat,
                error,
            } => self.on_spawn_failed(generation, seat, &error, now),
            Event::Exited {
                pid,
                status,
                was_ready,
                boot_error,
            } => self.on_exit(pid, status, was_ready, boot_error, now),
            Event::Tick { samples } => self.on_tick(&samples, now),
            Event::ReloadLoaded { spec } => self.start_reload(spec, now),
            Event::ReloadRejected { reason } => {
                self.log(
                    log::Level::Error,
                    format!("Reload rejected, the running workers are untouched: {reason}"),
                );
                self.finish_reload(false, format!("rejected ({reason})"));
            }
            Event::UpgradeStarted { pid } => self.upgrade = Some(pid),
            Event::UpgradeExited => {
                if let Some(pid) = self.upgrade.take() {
                    self.log(
                        log::Level::Error,
                        format!("Upgrade failed: the new master (pid {pid}) exited before taking over; this master keeps serving"),
                    );
                    self.out.push(Command::AbortUpgrade);
                }
            }
        }
        if !self.finished {
            self.reconcile(now);
        }
        std::mem::take(&mut self.out)
    }

    /// When the shell should run a turn even if nothing happens (a backoff or a token is due).
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        if !matches!(self.phase, Phase::Booting | Phase::Running) {
            return None;
        }
        let mut wake: Option<Instant> = None;
        let mut blocked_on_token = false;
        for (i, seat) in self.serving.seats.iter().enumerate() {
            if seat.reserved || self.occupant(&self.serving, i).is_some() {
                continue;
            }
            match seat.not_before {
                Some(t) if t > now => wake = Some(wake.map_or(t, |w| w.min(t))),
                _ => blocked_on_token = true,
            }
        }
        if blocked_on_token {
            let t = self.bucket.next_token().max(now);
            wake = Some(wake.map_or(t, |w| w.min(t)));
        }
        wake
    }

    /// One line for `systemctl status`.
    pub fn status_line(&self) -> String {
        let serving = self
            .workers
            .values()
            .filter(|w| {
                w.generation == self.serving.number
                    && matches!(w.state, WorkerState::Serving | WorkerState::Recycling(_))
            })
            .count();
        format!(
            "{serving} workers serving, generation {}, last reload: {}",
            self.serving.number, self.last_reload
        )
    }

    // ----- events --------------------------------------------------------------------------

    fn on_signal(&mut self, signal: Signal, now: Instant) {
        match policy::action_for(self.phase, signal) {
            Action::Reap => {}
            Action::Reload => {
                self.log(log::Level::Info, format!("Handling signal: {signal}"));
                self.out.push(Command::LoadConfig);
            }
            Action::StopGracefully => {
                self.log(
                    log::Level::Info,
                    format!("Handling signal: {signal}: graceful shutdown"),
                );
                self.stop(false, now);
            }
            Action::StopQuickly => {
                self.log(
                    log::Level::Info,
                    format!("Handling signal: {signal}: quick shutdown"),
                );
                self.stop(true, now);
            }
            Action::AddWorker => {
                let target = (self.serving.target() + 1).min(MAX_WORKERS);
                self.set_target(target, now);
                self.log(
                    log::Level::Info,
                    format!("Handling signal: {signal}: target is now {target} workers"),
                );
            }
            Action::RemoveWorker => {
                let target = self.serving.target().saturating_sub(1).max(1);
                self.set_target(target, now);
                self.log(
                    log::Level::Info,
                    format!("Handling signal: {signal}: target is now {target} workers"),
                );
            }
            Action::ReopenLogs => {
                self.log(
                    log::Level::Info,
                    format!("Handling signal: {signal}: reopening log files"),
                );
                self.out.push(Command::ReopenLogs);
                let pids: Vec<Pid> = self.workers.keys().copied().collect();
                for pid in pids {
                    self.signal(pid, Signal::SIGUSR1);
                }
            }
            Action::Upgrade => {
                if let Some(pid) = self.upgrade {
                    self.log(
                        log::Level::Warn,
                        format!("An upgrade (new master pid {pid}) is already in progress"),
                    );
                } else {
                    self.log(
                        log::Level::Info,
                        format!("Handling signal: {signal}: binary upgrade"),
                    );
                    self.out.push(Command::StartUpgrade);
                }
            }
            Action::Ignore(why) => {
                self.log(log::Level::Info, format!("Ignoring signal {signal}: {why}"));
                if signal == Signal::SIGHUP {
                    self.out.push(Command::DeclineReload);
                }
            }
        }
    }

    fn on_spawned(&mut self, pid: Pid, generation: u64, seat: usize, now: Instant) {
        let Some(gen) = self.generation_mut(generation) else {
            // Its generation was dropped meanwhile: it has no place.
            self.workers
                .insert(pid, orphan_worker(pid, generation, now));
            self.retire(pid, "its generation is gone", None, now);
            return;
        };
        if let Some(s) = gen.seats.get_mut(seat) {
            s.reserved = false;
        }
        let spec = gen.spec.clone();
        let target = gen.target();
        let seat_free = seat < target && self.occupant_of(generation, seat).is_none();
        let request_limit = self.request_limit(&spec);
        self.workers.insert(
            pid,
            Worker {
                pid,
                generation,
                seat: seat_free.then_some(seat),
                spawned: now,
                booted: false,
                request_limit,
                state: WorkerState::Booting,
            },
        );
        if !seat_free {
            self.retire(pid, "above the target worker count", None, now);
        }
    }

    fn on_spawn_failed(&mut self, generation: u64, seat: usize, error: &str, now: Instant) {
        self.log(log::Level::Error, error.to_string());
        if self.pending_generation() == Some(generation) {
            self.rollback(error, now);
            return;
        }
        if generation == self.serving.number {
            if let Some(s) = self.serving.seats.get_mut(seat) {
                s.reserved = false;
            }
            self.record_boot_failure(seat, now);
        }
    }

    fn on_exit(
        &mut self,
        pid: Pid,
        status: ExitStatus,
        was_ready: bool,
        boot_error: Option<String>,
        now: Instant,
    ) {
        if self.upgrade == Some(pid) {
            self.upgrade = None;
            self.log(
                log::Level::Error,
                format!("Upgrade failed: the new master (pid {pid}) {status} before taking over; this master keeps serving"),
            );
            self.out.push(Command::AbortUpgrade);
            return;
        }
        let Some(worker) = self.workers.remove(&pid) else {
            self.log(
                log::Level::Debug,
                format!("reaped unknown child {pid} ({status})"),
            );
            return;
        };
        let stopping = self.is_stopping();
        if !stopping {
            if let Some(cause) = worker.state.count_as() {
                self.out.push(Command::CountRestart(cause));
            }
        }
        if stopping || worker.state.exit_was_asked_for() {
            self.log(
                log::Level::Info,
                format!(
                    "Worker exiting (pid: {pid}, generation {}): {status}",
                    worker.generation
                ),
            );
            return;
        }
        self.log(
            log::Level::Error,
            format!(
                "Worker (pid: {pid}, generation {}) died: {status}",
                worker.generation
            ),
        );
        if worker.booted || was_ready {
            // Served, then died: its seat is vacant and `reconcile` refills it now.
            return;
        }
        let reason = boot_error.unwrap_or_else(|| status.to_string());
        if self.pending_generation() == Some(worker.generation) {
            self.rollback(
                &format!("a new worker (pid {pid}) failed to boot: {reason}"),
                now,
            );
        } else if worker.generation == self.serving.number {
            if self.phase == Phase::Booting && status.is_boot_failure() {
                self.log(
                    log::Level::Error,
                    format!("Worker failed to boot: {reason}"),
                );
                self.finished = true;
                self.out.push(Command::Halt { pid, reason });
                return;
            }
            self.log(
                log::Level::Error,
                format!("Worker (pid: {pid}) failed to boot: {reason}"),
            );
            if let Some(seat) = worker.seat {
                self.record_boot_failure(seat, now);
            }
        }
    }

    fn on_tick(&mut self, samples: &[Sample], now: Instant) {
        self.observe_workers(samples);
        if self.is_stopping() {
            return;
        }
        self.murder_stale_workers(samples, now);
        self.mark_recycling(samples);
    }

    // ----- reconcilers ---------------------------------------------------------------------

    /// After every event: when stopping, exit or escalate; otherwise the idempotent steps.
    fn reconcile(&mut self, now: Instant) {
        if self.is_stopping() {
            if self.workers.is_empty() {
                self.log(log::Level::Info, "Shutting down: master exits".into());
                self.finished = true;
                self.out.push(Command::Exit);
            } else {
                self.escalate_stop(now);
            }
            return;
        }
        self.murder_overdue_retirees(now);
        self.advance_reload(now);
        self.manage_workers(now);
        self.retire_replaced_workers(now);
        self.note_first_generation_booted();
    }

    /// Notes which workers have reported ready; a ready worker clears its seat's backoff.
    fn observe_workers(&mut self, samples: &[Sample]) {
        for sample in samples.iter().filter(|s| s.ready) {
            let Some(worker) = self.workers.get_mut(&sample.pid) else {
                continue;
            };
            if worker.booted {
                continue;
            }
            worker.booted = true;
            if worker.state == WorkerState::Booting {
                worker.state = WorkerState::Serving;
            }
            let (generation, seat) = (worker.generation, worker.seat);
            if let (Some(gen), Some(seat)) = (self.generation_mut(generation), seat) {
                if let Some(s) = gen.seats.get_mut(seat) {
                    s.failures = 0;
                    s.not_before = None;
                }
            }
            self.log(
                log::Level::Debug,
                format!("worker {} (generation {generation}) is serving", sample.pid),
            );
        }
    }

    /// Aborts workers silent past `timeout` (SIGABRT) and kills those that ignore it (SIGKILL).
    /// An aborted worker leaves its seat at once, so its replacement boots without waiting.
    fn murder_stale_workers(&mut self, samples: &[Sample], now: Instant) {
        for sample in samples {
            let Some(worker) = self.workers.get(&sample.pid) else {
                continue;
            };
            let timeout = self
                .spec_of(worker.generation)
                .map_or(self.serving.spec.timeout, |s| s.timeout);
            let pid = worker.pid;
            match worker.state {
                WorkerState::Killed { .. } => {}
                WorkerState::Aborted { since } => {
                    if now.saturating_duration_since(since) > ABORT_GRACE {
                        self.log(
                            log::Level::Error,
                            format!("Worker (pid: {pid}) ignored SIGABRT; sending SIGKILL"),
                        );
                        self.kill(pid, Some(Cause::Timeout));
                    }
                }
                _ if sample.silence > timeout => {
                    let (booting, seat, generation) = (
                        worker.state == WorkerState::Booting,
                        worker.seat,
                        worker.generation,
                    );
                    self.log(
                        log::Level::Error,
                        format!(
                            "WORKER TIMEOUT (pid: {pid}): silent for {} ms; sending SIGABRT",
                            sample.silence.as_millis()
                        ),
                    );
                    self.signal(pid, Signal::SIGABRT);
                    self.set_state(pid, WorkerState::Aborted { since: now });
                    if booting && generation == self.serving.number {
                        if let Some(seat) = seat {
                            self.record_boot_failure(seat, now);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Kills retiring workers that did not finish within `graceful_timeout`.
    fn murder_overdue_retirees(&mut self, now: Instant) {
        let overdue: Vec<(Pid, Option<Cause>)> = self
            .workers
            .values()
            .filter_map(|w| match w.state {
                WorkerState::Retiring { since, count_as } => {
                    let grace = self
                        .spec_of(w.generation)
                        .map_or(self.serving.spec.graceful_timeout, |s| s.graceful_timeout)
                        + RETIRE_GRACE;
                    (now.saturating_duration_since(since) > grace).then_some((w.pid, count_as))
                }
                _ => None,
            })
            .collect();
        for (pid, count_as) in overdue {
            self.log(
                log::Level::Warn,
                format!("Worker (pid: {pid}) did not finish within graceful_timeout; killing it"),
            );
            self.kill(pid, count_as);
        }
    }

    /// Commits a pending reload once every seat of it serves; rolls it back past `boot_timeout`.
    fn advance_reload(&mut self, now: Instant) {
        let Some(pending) = &self.pending else { return };
        let number = pending.generation.number;
        let all_serve = (0..pending.generation.target()).all(|seat| {
            self.occupant_of(number, seat)
                .is_some_and(|w| w.state == WorkerState::Serving)
        });
        if all_serve {
            self.commit_reload(now);
        } else if now.saturating_duration_since(pending.started)
            > pending.generation.spec.boot_timeout
        {
            let message = format!(
                "new workers did not boot within boot_timeout ({:?})",
                pending.generation.spec.boot_timeout
            );
            self.rollback(&message, now);
        }
    }

    /// Marks serving workers past `max_requests` or `max_worker_memory` for replacement; they
    /// leave their seat, so a replacement boots while they keep serving.
    fn mark_recycling(&mut self, samples: &[Sample]) {
        let spec = self.serving.spec.clone();
        for sample in samples {
            let Some(worker) = self.workers.get_mut(&sample.pid) else {
                continue;
            };
            if worker.generation != self.serving.number || worker.state != WorkerState::Serving {
                continue;
            }
            let pid = worker.pid;
            let cause = if worker.request_limit > 0 && sample.requests >= worker.request_limit {
                Some((
                    Cause::MaxRequests,
                    format!(
                        "Worker (pid: {pid}) served {} requests (max_requests); recycling",
                        sample.requests
                    ),
                ))
            } else if spec.max_worker_memory_mib > 0 && sample.rss_mib > spec.max_worker_memory_mib
            {
                Some((
                    Cause::Memory,
                    format!(
                        "Worker (pid: {pid}) uses {} MiB > max_worker_memory {}; recycling",
                        sample.rss_mib, spec.max_worker_memory_mib
                    ),
                ))
            } else {
                None
            };
            if let Some((cause, message)) = cause {
                worker.state = WorkerState::Recycling(cause);
                worker.seat = None;
                self.log(log::Level::Info, message);
            }
        }
    }

    /// Fills every vacant seat whose backoff has passed, all at once, as far as the boot bucket
    /// allows (the serving generation) or at once (a pending reload, which boots as a whole).
    fn manage_workers(&mut self, now: Instant) {
        if let Some(pending) = &self.pending {
            let number = pending.generation.number;
            for seat in 0..pending.generation.target() {
                let reserved = self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.generation.seats[seat].reserved);
                if reserved || self.occupant_of(number, seat).is_some() {
                    continue;
                }
                if let Some(p) = self.pending.as_mut() {
                    p.generation.seats[seat].reserved = true;
                }
                self.out.push(Command::Spawn {
                    generation: number,
                    seat,
                });
            }
        }
        let number = self.serving.number;
        for seat in 0..self.serving.target() {
            let s = &self.serving.seats[seat];
            if s.reserved || s.not_before.is_some_and(|t| t > now) {
                continue;
            }
            if self.occupant_of(number, seat).is_some() {
                continue;
            }
            if !self.bucket.take(now) {
                break;
            }
            self.serving.seats[seat].reserved = true;
            self.out.push(Command::Spawn {
                generation: number,
                seat,
            });
        }
    }

    /// Retires recycled workers, oldest first, only while the serving workers that would remain
    /// still number at least the target: capacity never dips below it.
    fn retire_replaced_workers(&mut self, now: Instant) {
        let number = self.serving.number;
        let mut serving: Vec<&Worker> = self
            .workers
            .values()
            .filter(|w| {
                w.generation == number
                    && matches!(w.state, WorkerState::Serving | WorkerState::Recycling(_))
            })
            .collect();
        serving.sort_by_key(|w| (w.spawned, w.pid));
        let mut capacity = serving.len();
        let mut to_retire = Vec::new();
        for worker in &serving {
            let WorkerState::Recycling(cause) = worker.state else {
                continue;
            };
            if capacity <= self.serving.target() {
                break;
            }
            to_retire.push((worker.pid, cause));
            capacity -= 1;
        }
        for (pid, cause) in to_retire {
            self.retire(pid, "its replacement is serving", Some(cause), now);
        }
    }

    fn note_first_generation_booted(&mut self) {
        if self.phase != Phase::Booting {
            return;
        }
        let number = self.serving.number;
        // Workers marked for recycling have left their seats but serve until their
        // replacements do (say every first heartbeat is over `max_worker_memory`): they count.
        let serving = self
            .workers
            .values()
            .filter(|w| {
                w.generation == number
                    && matches!(w.state, WorkerState::Serving | WorkerState::Recycling(_))
            })
            .count();
        if serving < self.serving.target() {
            return;
        }
        self.phase = Phase::Running;
        self.log(
            log::Level::Info,
            format!("All {serving} workers of generation {number} are serving"),
        );
        let status = self.status_line();
        self.out.push(Command::NotifyReady { status });
        if let Some(old) = self.upgraded_from.take() {
            self.log(
                log::Level::Info,
                format!("Upgrade complete: this master serves; telling the old master (pid {old}) to stop"),
            );
            self.out.push(Command::NotifyMainPid);
            self.out.push(Command::Signal {
                pid: old,
                signal: Signal::SIGTERM,
            });
        }
    }

    // ----- reload --------------------------------------------------------------------------

    fn start_reload(&mut self, spec: Spec, now: Instant) {
        if self.is_stopping() {
            return;
        }
        if self.pending.is_some() {
            self.rollback("superseded by a newer reload", now);
        }
        self.last_generation += 1;
        let number = self.last_generation;
        self.log(
            log::Level::Info,
            format!(
                "Reloading: starting generation {number} with {} workers",
                spec.workers
            ),
        );
        self.out
            .push(Command::AdoptGeneration { generation: number });
        self.pending = Some(Pending {
            generation: Generation::new(number, spec),
            started: now,
        });
        // `reconcile` spawns its workers.
    }

    /// The new generation serves: it becomes current and every older worker retires gracefully.
    fn commit_reload(&mut self, now: Instant) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let previous = self.serving.number;
        self.serving = pending.generation;
        self.bucket.resize(self.serving.target());
        self.out.push(Command::CommitGeneration {
            generation: self.serving.number,
            previous,
        });
        let old: Vec<Pid> = self
            .workers
            .values()
            .filter(|w| w.generation < self.serving.number)
            .map(|w| w.pid)
            .collect();
        for pid in old {
            self.retire(pid, "replaced by a reload", Some(Cause::Reload), now);
        }
        let number = self.serving.number;
        self.log(
            log::Level::Info,
            format!("Reload complete: generation {number} is serving"),
        );
        self.finish_reload(true, format!("ok (generation {number})"));
    }

    /// Rolls back the pending reload: its workers stop, its listeners close, nothing else changes.
    fn rollback(&mut self, reason: &str, now: Instant) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let number = pending.generation.number;
        let doomed: Vec<Pid> = self
            .workers
            .values()
            .filter(|w| w.generation == number)
            .map(|w| w.pid)
            .collect();
        for pid in doomed {
            self.retire(pid, "its reload was rolled back", None, now);
        }
        self.out
            .push(Command::DropGeneration { generation: number });
        self.log(
            log::Level::Error,
            format!(
                "Reload to generation {number} failed: {reason}; generation {} keeps serving",
                self.serving.number
            ),
        );
        if reason != "superseded by a newer reload" {
            self.finish_reload(false, format!("failed ({reason})"));
        }
    }

    fn finish_reload(&mut self, ok: bool, outcome: String) {
        self.last_reload = outcome;
        let status = self.status_line();
        self.out.push(Command::FinishReload {
            ok,
            generation: self.serving.number,
            status,
        });
    }

    // ----- stopping ------------------------------------------------------------------------

    /// TERM/QUIT (graceful) or INT (quick): close the listeners and tell every worker.
    fn stop(&mut self, quick: bool, now: Instant) {
        let (phase, signal, grace) = if quick {
            (Phase::Halting, Signal::SIGINT, QUICK_STOP_GRACE)
        } else {
            (
                Phase::Draining,
                Signal::SIGTERM,
                self.serving.spec.graceful_timeout + RETIRE_GRACE,
            )
        };
        if let Some(successor) = self.upgrade {
            // Stopped by our successor after an upgrade: the service is not stopping, so no
            // STOPPING=1 (systemd already follows the new MAINPID).
            self.log(
                log::Level::Info,
                format!("Handing over to the new master (pid {successor})"),
            );
        } else if !self.is_stopping() {
            self.out.push(Command::NotifyStopping);
        }
        self.phase = phase;
        self.stop_deadline = Some(now + grace);
        if let Some(pending) = self.pending.take() {
            self.out.push(Command::DropGeneration {
                generation: pending.generation.number,
            });
        }
        // Closing our copies (and removing unix socket files) stops new connections from being
        // queued once the workers have drained what is already in the backlog.
        self.out.push(Command::CloseListeners);
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            let worker = &self.workers[&pid];
            if matches!(worker.state, WorkerState::Killed { .. }) {
                continue;
            }
            let since = match worker.state {
                WorkerState::Retiring { since, .. } => since,
                _ => now,
            };
            self.signal(pid, signal);
            self.set_state(
                pid,
                WorkerState::Retiring {
                    since,
                    count_as: None,
                },
            );
        }
    }

    fn escalate_stop(&mut self, now: Instant) {
        if !self.stop_deadline.is_some_and(|d| now >= d) {
            return;
        }
        let alive: Vec<Pid> = self
            .workers
            .values()
            .filter(|w| !matches!(w.state, WorkerState::Killed { .. }))
            .map(|w| w.pid)
            .collect();
        for pid in alive {
            self.log(
                log::Level::Warn,
                format!("Worker (pid: {pid}) still running at the shutdown deadline; killing it"),
            );
            self.kill(pid, None);
        }
    }

    // ----- helpers -------------------------------------------------------------------------

    fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Draining | Phase::Halting)
    }

    fn log(&mut self, level: log::Level, message: String) {
        self.out.push(Command::Log { level, message });
    }

    fn signal(&mut self, pid: Pid, signal: Signal) {
        self.out.push(Command::Signal { pid, signal });
    }

    fn set_state(&mut self, pid: Pid, state: WorkerState) {
        if let Some(worker) = self.workers.get_mut(&pid) {
            worker.state = state;
            if !matches!(state, WorkerState::Booting | WorkerState::Serving) {
                worker.seat = None;
            }
        }
    }

    fn kill(&mut self, pid: Pid, count_as: Option<Cause>) {
        self.signal(pid, Signal::SIGKILL);
        self.set_state(pid, WorkerState::Killed { count_as });
    }

    /// Tells one worker to finish its in-flight requests and exit (once).
    fn retire(&mut self, pid: Pid, why: &str, count_as: Option<Cause>, now: Instant) {
        let Some(worker) = self.workers.get(&pid) else {
            return;
        };
        if matches!(
            worker.state,
            WorkerState::Retiring { .. } | WorkerState::Killed { .. } | WorkerState::Aborted { .. }
        ) {
            return;
        }
        let generation = worker.generation;
        self.log(
            log::Level::Info,
            format!("Retiring worker (pid: {pid}, generation {generation}): {why}"),
        );
        self.signal(pid, Signal::SIGTERM);
        self.set_state(
            pid,
            WorkerState::Retiring {
                since: now,
                count_as,
            },
        );
    }

    /// A boot failure in a serving seat: the seat waits 0.1 s, 0.2 s, 0.4 s, ... (capped).
    fn record_boot_failure(&mut self, seat: usize, now: Instant) {
        let Some(s) = self.serving.seats.get_mut(seat) else {
            return;
        };
        s.failures = s.failures.saturating_add(1);
        let delay = backoff(s.failures);
        s.not_before = Some(now + delay);
        let failures = s.failures;
        self.log(
            log::Level::Warn,
            format!("workers keep failing to boot (seat {seat}: {failures} in a row); next spawn in {delay:?}"),
        );
    }

    /// TTIN/TTOU: grow or shrink the serving generation's seats. Shrinking retires the oldest
    /// workers beyond the target and moves the survivors into the seats that remain.
    fn set_target(&mut self, target: usize, now: Instant) {
        let number = self.serving.number;
        let mut active: Vec<(Instant, Pid)> = self
            .workers
            .values()
            .filter(|w| w.generation == number && w.seat.is_some())
            .map(|w| (w.spawned, w.pid))
            .collect();
        active.sort();
        let excess = active.len().saturating_sub(target);
        for (_, pid) in active.iter().take(excess) {
            self.retire(
                *pid,
                "above the target worker count",
                Some(Cause::ScaleDown),
                now,
            );
        }
        self.serving.seats.resize(target, Seat::default());
        let mut free: Vec<usize> = (0..target)
            .filter(|seat| {
                !self.serving.seats[*seat].reserved && self.occupant_of(number, *seat).is_none()
            })
            .collect();
        for (_, pid) in active.iter().skip(excess) {
            if let Some(worker) = self.workers.get_mut(pid) {
                if worker.seat.is_some_and(|s| s >= target) {
                    worker.seat = free.pop();
                }
            }
        }
        self.bucket.resize(target);
    }

    fn generation_mut(&mut self, number: u64) -> Option<&mut Generation> {
        if self.serving.number == number {
            Some(&mut self.serving)
        } else {
            self.pending
                .as_mut()
                .map(|p| &mut p.generation)
                .filter(|g| g.number == number)
        }
    }

    fn spec_of(&self, number: u64) -> Option<&Spec> {
        if self.serving.number == number {
            Some(&self.serving.spec)
        } else {
            self.pending
                .as_ref()
                .filter(|p| p.generation.number == number)
                .map(|p| &p.generation.spec)
        }
    }

    fn occupant(&self, generation: &Generation, seat: usize) -> Option<&Worker> {
        self.occupant_of(generation.number, seat)
    }

    fn occupant_of(&self, generation: u64, seat: usize) -> Option<&Worker> {
        self.workers
            .values()
            .find(|w| w.generation == generation && w.seat == Some(seat))
    }

    fn request_limit(&mut self, spec: &Spec) -> u64 {
        if spec.max_requests == 0 {
            return 0;
        }
        self.jitter_seed ^= self.jitter_seed << 13;
        self.jitter_seed ^= self.jitter_seed >> 7;
        self.jitter_seed ^= self.jitter_seed << 17;
        spec.max_requests + self.jitter_seed % (spec.max_requests_jitter + 1)
    }
}

/// The backoff before the next boot into a seat after `failures` boot failures in a row.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP)
}

fn orphan_worker(pid: Pid, generation: u64, now: Instant) -> Worker {
    Worker {
        pid,
        generation,
        seat: None,
        spawned: now,
        booted: false,
        request_limit: 0,
        state: WorkerState::Booting,
    }
}

#[cfg(test)]
mod tests;
