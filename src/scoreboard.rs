//! The shared-memory scoreboard: one slot per worker, mapped before the first fork and shared by
//! the master and every worker (Apache's scoreboard, Gunicorn's heartbeat file without the file).
//!
//! A worker writes only its own slot: a heartbeat stamped by its event loop, requests served,
//! requests in flight, open connections, and a boot error if it fails to start. The master reads
//! every slot to find hung workers, decide recycling, and (later) to serve metrics and status.
//! Everything is a plain atomic in a `MAP_SHARED | MAP_ANONYMOUS` mapping, so no locks cross
//! process boundaries and a worker that dies mid-write cannot wedge anyone.
//!
//! In front of the slots, the pool header holds what outlives a worker, among it the pool-wide
//! LLM admission ([`LlmGate`]): the line, and each LLM backend's places and circuit breaker, so
//! every worker routes answers and ejects failing backends alike. A dead worker's places are
//! given back by the master when it retires the slot.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};

use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::metrics::{MetricCells, Snapshot, CAUSES};

/// Cells for this many LLM backends are mapped (`config::app::MAX_LLM_BACKENDS`, the most a
/// config may list; the two are pinned equal in `http`, which sees both).
pub const MAX_LLM_BACKENDS: usize = 16;

/// Exit code by which a worker says it could not set itself up (Gunicorn's WORKER_BOOT_ERROR),
/// its reason in its slot's boot error. This and [`EXIT_APP_LOAD_ERROR`] are part of the
/// contract between master and worker that this module holds, so neither imports the other.
pub const EXIT_BOOT_ERROR: i32 = 3;
/// Exit code by which a worker says its app could not load (Gunicorn's APP_LOAD_ERROR).
pub const EXIT_APP_LOAD_ERROR: i32 = 4;

/// Bytes kept of a worker's boot error.
pub const BOOT_ERROR_LEN: usize = 480;

/// What a slot's worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SlotState {
    /// No worker.
    Free = 0,
    /// Forked, building its runtime and app.
    Booting = 1,
    /// Accepting and serving.
    Ready = 2,
    /// Told to stop: finishing in-flight requests, accepting nothing new.
    Draining = 3,
}

impl SlotState {
    fn from_u32(v: u32) -> SlotState {
        match v {
            1 => SlotState::Booting,
            2 => SlotState::Ready,
            3 => SlotState::Draining,
            _ => SlotState::Free,
        }
    }
}

/// One worker's slot. `repr(C)` and atomics only: valid when zeroed, safe to share.
#[repr(C)]
pub struct Slot {
    pid: AtomicI32,
    state: AtomicU32,
    generation: AtomicU64,
    /// Monotonic milliseconds at which the worker's event loop last ran its heartbeat.
    heartbeat_ms: AtomicU64,
    /// Monotonic milliseconds at which the master forked this worker.
    spawned_ms: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicU64,
    connections: AtomicU64,
    boot_error_len: AtomicU32,
    boot_error: [AtomicU8; BOOT_ERROR_LEN],
    /// Resident memory in KiB, stamped by the worker with its heartbeat.
    pub rss_kib: AtomicU64,
    /// This worker's share of the pool metrics.
    pub metrics: MetricCells,
    /// Gate places this worker holds and waits for, given back by the master if it dies.
    llm_held: AtomicU64,
    llm_waiting: AtomicU64,
    /// Of those, the places held on each LLM backend (given back the same way).
    llm_backend_held: [AtomicU64; MAX_LLM_BACKENDS],
    /// Calls this worker has running on each embedding backend (given back the same way).
    embed_backend_held: [AtomicU64; MAX_LLM_BACKENDS],
}

impl Slot {
    /// Master: claims the slot for a worker about to be forked.
    pub fn claim(&self, generation: u64) {
        let now = monotonic_ms();
        self.pid.store(0, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Relaxed);
        self.heartbeat_ms.store(now, Ordering::Relaxed);
        self.spawned_ms.store(now, Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
        self.in_flight.store(0, Ordering::Relaxed);
        self.connections.store(0, Ordering::Relaxed);
        self.boot_error_len.store(0, Ordering::Relaxed);
        self.rss_kib.store(0, Ordering::Relaxed);
        self.metrics.reset();
        self.llm_held.store(0, Ordering::Relaxed);
        self.llm_waiting.store(0, Ordering::Relaxed);
        for held in self.llm_backend_held.iter().chain(&self.embed_backend_held) {
            held.store(0, Ordering::Relaxed);
        }
        self.state
            .store(SlotState::Booting as u32, Ordering::Release);
    }

    /// Master: records the child's pid right after fork.
    pub fn set_pid(&self, pid: i32) {
        self.pid.store(pid, Ordering::Release);
    }

    /// Master: returns the slot to the free list after the worker is reaped.
    pub fn release(&self) {
        self.pid.store(0, Ordering::Relaxed);
        self.state.store(SlotState::Free as u32, Ordering::Release);
    }

    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::Acquire)
    }

    pub fn state(&self) -> SlotState {
        SlotState::from_u32(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, state: SlotState) {
        self.state.store(state as u32, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Worker: proves its event loop is alive.
    pub fn stamp_heartbeat(&self) {
        self.heartbeat_ms.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the last heartbeat.
    pub fn silence_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed))
    }

    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.spawned_ms.load(Ordering::Relaxed))
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Worker: a request has started.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Worker: a request has finished (its response body is done or dropped).
    pub fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Worker: leaves a message for the master before exiting with a boot-error code.
    pub fn set_boot_error(&self, message: &str) {
        let bytes = message.as_bytes();
        // Cut on a char boundary so the master reads valid UTF-8.
        let mut len = bytes.len().min(BOOT_ERROR_LEN);
        while !message.is_char_boundary(len) {
            len -= 1;
        }
        for (cell, b) in self.boot_error.iter().zip(&bytes[..len]) {
            cell.store(*b, Ordering::Relaxed);
        }
        self.boot_error_len.store(len as u32, Ordering::Release);
    }

    /// Master: the boot error the worker left, if any.
    pub fn boot_error(&self) -> Option<String> {
        let len = self.boot_error_len.load(Ordering::Acquire) as usize;
        if len == 0 {
            return None;
        }
        let bytes: Vec<u8> = self.boot_error[..len.min(BOOT_ERROR_LEN)]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The mapping itself. Created once by the master before any fork; inherited by workers.
pub struct Scoreboard {
    /// Start of the mapping: the [`PoolHeader`], then the slots.
    base: NonNull<u8>,
    len: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot map the shared scoreboard ({slots} slots): {source}")]
pub struct ScoreboardError {
    slots: usize,
    #[source]
    source: nix::Error,
}

/// Pool-wide state in front of the slots: what outlives any one worker.
#[repr(C)]
pub struct PoolHeader {
    /// Seqlock around folds: odd while the master moves a dead worker's counters into
    /// `retired`, so a reader never counts them twice or not at all.
    seq: AtomicU64,
    /// Counters of workers that have exited.
    pub retired: MetricCells,
    /// Worker replacements by cause (see [`crate::metrics::CAUSES`]).
    restarts: [AtomicU64; CAUSES.len()],
    master_pid: AtomicU64,
    started_unix_ms: AtomicU64,
    config_loaded_unix_ms: AtomicU64,
    generation: AtomicU64,
    last_reload_unix_ms: AtomicU64,
    /// 0 = none yet, 1 = ok, 2 = failed or rejected.
    last_reload_result: AtomicU64,
    /// Pool-wide LLM gate (`[llm] max_concurrent`): generations running now,
    llm_active: AtomicU64,
    /// tickets handed to waiters so far,
    llm_tickets: AtomicU64,
    /// and tickets that have left the line (admitted or given up): a waiter's place is
    /// its ticket minus this.
    llm_left_line: AtomicU64,
    /// Each LLM backend of the pool (`[[llm.backend]]`, by position): its slots in use and
    /// its circuit breaker, shared so every worker routes and ejects alike.
    llm_backends: [BackendCells; MAX_LLM_BACKENDS],
    /// The same for each embedding backend (`[embed] url` list): calls, not answers.
    embed_backends: [BackendCells; MAX_LLM_BACKENDS],
}

/// One LLM backend's shared state: answers running on it, what it has done, and its breaker.
#[repr(C)]
pub struct BackendCells {
    /// Answers generating on it now (never above its `max_concurrent` when it has one).
    active: AtomicU64,
    /// Answers admitted to it so far.
    admitted: AtomicU64,
    /// Failed answers (an error before or during the stream) so far.
    failures: AtomicU64,
    /// Failures since its last success: `breaker_failures` of them open the breaker.
    consecutive: AtomicU64,
    /// A [`BreakerState`].
    state: AtomicU64,
    /// Monotonic ms: while open, when a health probe may be tried; the prober moves it on
    /// (compare-and-swap), which is its lease, so a prober that dies is taken over.
    open_until_ms: AtomicU64,
    /// Times the breaker opened.
    opened: AtomicU64,
}

/// A backend's circuit breaker (Nygard's): closed = in use; open = ejected until a health
/// probe passes after the cool-down; half-open = probe passed, one answer at a time on trial
/// (its success closes the breaker, its failure opens it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    fn from_u64(v: u64) -> BreakerState {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// One backend's cells, read for `/metrics` and `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendView {
    pub active: u64,
    pub admitted: u64,
    pub failures: u64,
    pub opened: u64,
    pub state: BreakerState,
}

/// Master facts as the header holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolInfo {
    pub master_pid: u64,
    pub started_unix_ms: u64,
    pub config_loaded_unix_ms: u64,
    pub generation: u64,
    pub last_reload_unix_ms: u64,
    /// None before the first reload; Some(true) when it succeeded.
    pub last_reload_ok: Option<bool>,
}

impl PoolHeader {
    pub fn count_restart(&self, cause: &str) {
        if let Some(i) = CAUSES.iter().position(|c| *c == cause) {
            self.restarts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn restarts(&self, cause: usize) -> u64 {
        self.restarts[cause].load(Ordering::Relaxed)
    }

    pub fn set_master(&self, pid: u32) {
        let now = unix_ms();
        self.master_pid.store(u64::from(pid), Ordering::Relaxed);
        self.started_unix_ms.store(now, Ordering::Relaxed);
        self.config_loaded_unix_ms.store(now, Ordering::Relaxed);
    }

    pub fn set_generation(&self, generation: u64) {
        self.generation.store(generation, Ordering::Relaxed);
    }

    /// Master: a reload ended; when it succeeded the config was (re)loaded now.
    pub fn note_reload(&self, ok: bool) {
        let now = unix_ms();
        self.last_reload_unix_ms.store(now, Ordering::Relaxed);
        self.last_reload_result
            .store(if ok { 1 } else { 2 }, Ordering::Relaxed);
        if ok {
            self.config_loaded_unix_ms.store(now, Ordering::Relaxed);
        }
    }

    pub fn info(&self) -> PoolInfo {
        PoolInfo {
            master_pid: self.master_pid.load(Ordering::Relaxed),
            started_unix_ms: self.started_unix_ms.load(Ordering::Relaxed),
            config_loaded_unix_ms: self.config_loaded_unix_ms.load(Ordering::Relaxed),
            generation: self.generation.load(Ordering::Relaxed),
            last_reload_unix_ms: self.last_reload_unix_ms.load(Ordering::Relaxed),
            last_reload_ok: match self.last_reload_result.load(Ordering::Relaxed) {
                0 => None,
                r => Some(r == 1),
            },
        }
    }
}

/// One live worker as `/status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    pub slot: usize,
    pub pid: i32,
    pub state: SlotState,
    pub generation: u64,
    pub age_ms: u64,
    pub heartbeat_ms_ago: u64,
    pub requests: u64,
    pub in_flight: u64,
    pub connections: u64,
    pub rss_bytes: u64,
}

impl Scoreboard {
    /// Maps the pool header and `len` zeroed slots, shared with every process forked afterwards.
    pub fn new(len: usize) -> Result<Scoreboard, ScoreboardError> {
        let len = len.max(1);
        let size = NonZeroUsize::new(Self::bytes(len)).expect("non-empty mapping");
        // SAFETY: an anonymous shared mapping of fresh zeroed pages; the header and `Slot` are
        // `repr(C)` atomics, for which all-zero bytes are valid. Nothing else aliases it yet.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }
        .map_err(|source| ScoreboardError { slots: len, source })?;
        Ok(Scoreboard {
            base: ptr.cast(),
            len,
        })
    }

    /// Header, padded to the slots' alignment, then the slots.
    fn slots_offset() -> usize {
        std::mem::size_of::<PoolHeader>().next_multiple_of(std::mem::align_of::<Slot>())
    }

    fn bytes(len: usize) -> usize {
        Self::slots_offset() + std::mem::size_of::<Slot>() * len
    }

    pub fn header(&self) -> &PoolHeader {
        // SAFETY: the header sits at the start of the mapping, which lives as long as `self`.
        unsafe { &*self.base.as_ptr().cast::<PoolHeader>() }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn slot(&self, index: usize) -> &Slot {
        assert!(index < self.len, "slot {index} out of {}", self.len);
        // SAFETY: in bounds of the mapping (offset computed as in `bytes`), aligned for `Slot`.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(Self::slots_offset())
                .cast::<Slot>()
                .add(index)
        }
    }

    pub fn slots(&self) -> impl Iterator<Item = (usize, &Slot)> {
        (0..self.len).map(move |i| (i, self.slot(i)))
    }

    /// The first free slot, if any.
    pub fn free_slot(&self) -> Option<usize> {
        self.slots()
            .find(|(_, s)| s.state() == SlotState::Free)
            .map(|(i, _)| i)
    }

    /// Master, after reaping a worker: moves its counters into the pool's and frees the slot.
    pub fn retire_slot(&self, index: usize) {
        let header = self.header();
        header.seq.fetch_add(1, Ordering::AcqRel);
        let slot = self.slot(index);
        slot.metrics.fold_into(&header.retired);
        // A worker that died mid-generation or in line must not keep its gate places.
        header
            .llm_active
            .fetch_sub(slot.llm_held.swap(0, Ordering::AcqRel), Ordering::AcqRel);
        header
            .llm_left_line
            .fetch_add(slot.llm_waiting.swap(0, Ordering::AcqRel), Ordering::AcqRel);
        let llm = slot.llm_backend_held.iter().zip(&header.llm_backends);
        let embed = slot.embed_backend_held.iter().zip(&header.embed_backends);
        for (held, cells) in llm.chain(embed) {
            cells
                .active
                .fetch_sub(held.swap(0, Ordering::AcqRel), Ordering::AcqRel);
        }
        slot.release();
        header.seq.fetch_add(1, Ordering::AcqRel);
    }

    /// Pool-wide counters (retired + every live slot) and the live workers, read consistently
    /// with respect to folds.
    pub fn snapshot(&self) -> (Snapshot, Vec<WorkerView>) {
        let header = self.header();
        let now = monotonic_ms();
        for _ in 0..1000 {
            let before = header.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let mut totals = Snapshot::default();
            header.retired.add_to(&mut totals);
            let mut workers = Vec::new();
            for (index, slot) in self.slots() {
                let state = slot.state();
                if state == SlotState::Free {
                    continue;
                }
                slot.metrics.add_to(&mut totals);
                workers.push(WorkerView {
                    slot: index,
                    pid: slot.pid(),
                    state,
                    generation: slot.generation(),
                    age_ms: slot.age_ms(now),
                    heartbeat_ms_ago: slot.silence_ms(now),
                    requests: slot.requests(),
                    in_flight: slot.in_flight(),
                    connections: slot.connections(),
                    rss_bytes: slot.rss_kib.load(Ordering::Relaxed) * 1024,
                });
            }
            if header.seq.load(Ordering::Acquire) == before {
                return (totals, workers);
            }
        }
        (Snapshot::default(), Vec::new())
    }
}

impl Scoreboard {
    /// The cells of LLM backend `index` (`index < MAX_LLM_BACKENDS`).
    pub fn backend(&self, index: usize) -> BackendView {
        self.view(&self.header().llm_backends[index])
    }

    /// The cells of embedding backend `index` (`index < MAX_LLM_BACKENDS`).
    pub fn embed_backend(&self, index: usize) -> BackendView {
        self.view(&self.header().embed_backends[index])
    }

    fn view(&self, cells: &BackendCells) -> BackendView {
        BackendView {
            active: cells.active.load(Ordering::Acquire),
            admitted: cells.admitted.load(Ordering::Relaxed),
            failures: cells.failures.load(Ordering::Relaxed),
            opened: cells.opened.load(Ordering::Relaxed),
            state: BreakerState::from_u64(cells.state.load(Ordering::Acquire)),
        }
    }
}

/// What [`LlmGate::try_admit`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A place on this backend: generate there, then `release` it.
    Backend(usize),
    /// Every usable backend (or the pool-wide cap) is full: wait in line.
    Full,
    /// No backend may take an answer (breakers open, or all tried already): do without.
    Unavailable,
}

/// One LLM backend as the gate routes to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendLimit {
    /// Its `max_concurrent`, pool-wide; 0 = no cap of its own.
    pub max_concurrent: u64,
}

/// How backends are ejected and taken back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failures that open a closed breaker.
    pub failures: u64,
    /// Milliseconds an open breaker waits before a health probe.
    pub cooldown_ms: u64,
}

/// The pool-wide admission of LLM generations, shared by every worker: the `[llm]
/// max_concurrent` cap on all of them, then a place on one backend, the least loaded (its
/// answers running over its cap) of those with a free place and a closed (or half-open and
/// idle) breaker. Every place is a compare-and-swap on a shared count, so no cap is ever
/// exceeded, whatever the number of workers; the place in line is approximate (workers poll),
/// which is what a waiting user needs to see.
///
/// The same type routes embedding calls over the `[embed]` servers ([`LlmGate::embedding`]):
/// their own cells, no line and no pool-wide cap, the least busy server with a closed breaker.
pub struct LlmGate {
    board: &'static Scoreboard,
    slot: &'static Slot,
    /// `[llm] max_concurrent`; 0 = none.
    max: u64,
    backends: Vec<BackendLimit>,
    breaker: BreakerPolicy,
    /// Embedding servers rather than LLM servers: the other cells, and no pool-wide count.
    embedding: bool,
}

impl LlmGate {
    /// `backends` are at most [`MAX_LLM_BACKENDS`] (config checks it; more are ignored).
    pub fn new(
        board: &'static Scoreboard,
        slot: &'static Slot,
        max: usize,
        backends: Vec<BackendLimit>,
        breaker: BreakerPolicy,
    ) -> LlmGate {
        let mut backends = backends;
        backends.truncate(MAX_LLM_BACKENDS);
        LlmGate {
            board,
            slot,
            max: max as u64,
            backends,
            breaker,
            embedding: false,
        }
    }

    /// The router of `count` embedding servers: take a place with [`LlmGate::try_take`].
    pub fn embedding(
        board: &'static Scoreboard,
        slot: &'static Slot,
        count: usize,
        breaker: BreakerPolicy,
    ) -> LlmGate {
        let backends = vec![BackendLimit { max_concurrent: 0 }; count.min(MAX_LLM_BACKENDS)];
        LlmGate {
            embedding: true,
            ..LlmGate::new(board, slot, 0, backends, breaker)
        }
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    fn cells(&self, index: usize) -> &BackendCells {
        match self.embedding {
            false => &self.board.header().llm_backends[index],
            true => &self.board.header().embed_backends[index],
        }
    }

    fn held(&self, index: usize) -> &AtomicU64 {
        match self.embedding {
            false => &self.slot.llm_backend_held[index],
            true => &self.slot.embed_backend_held[index],
        }
    }

    /// Joins the line; returns the ticket.
    pub fn enqueue(&self) -> u64 {
        self.slot.llm_waiting.fetch_add(1, Ordering::AcqRel);
        self.board
            .header()
            .llm_tickets
            .fetch_add(1, Ordering::AcqRel)
    }

    /// Starts a generation on a backend not in `tried` (a bit per backend) if the pool-wide
    /// cap and that backend's allow it; after [`Admit::Backend`] the caller must `release`.
    /// A ticket holder that is [`Admit::Unavailable`] should `abandon` its place.
    pub fn try_admit(&self, tried: u64) -> Admit {
        self.admit(tried, true)
    }

    /// A place on a backend not in `tried`, taken now without a ticket (a short call that
    /// must not wait in line: the rewrite of a follow-up, an embedding call); `release` it
    /// after [`Admit::Backend`].
    pub fn try_take(&self, tried: u64) -> Admit {
        self.admit(tried, false)
    }

    fn admit(&self, tried: u64, in_line: bool) -> Admit {
        let header = self.board.header();
        let mut active = header.llm_active.load(Ordering::Acquire);
        while !self.embedding {
            if self.max > 0 && active >= self.max {
                // Full, unless nothing could take it anyway.
                return match self.candidates(tried).is_empty() {
                    true => Admit::Unavailable,
                    false => Admit::Full,
                };
            }
            match header.llm_active.compare_exchange(
                active,
                active + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => active = now,
            }
        }
        let candidates = self.candidates(tried);
        for &(index, _) in &candidates {
            if self.take_place(index) {
                if !self.embedding {
                    self.slot.llm_held.fetch_add(1, Ordering::AcqRel);
                }
                self.held(index).fetch_add(1, Ordering::AcqRel);
                self.cells(index).admitted.fetch_add(1, Ordering::Relaxed);
                if in_line {
                    self.leave_line();
                }
                return Admit::Backend(index);
            }
        }
        if !self.embedding {
            header.llm_active.fetch_sub(1, Ordering::AcqRel);
        }
        match candidates.is_empty() {
            true => Admit::Unavailable,
            false => Admit::Full,
        }
    }

    /// Backends an answer may go to, least loaded first: not tried yet, breaker closed or
    /// half-open. Load is answers running over the cap (an uncapped backend counts as a cap of
    /// 1 per answer running); ties go to the one that has taken fewer answers.
    fn candidates(&self, tried: u64) -> Vec<(usize, (u64, u64))> {
        let mut candidates: Vec<(usize, (u64, u64))> = self
            .backends
            .iter()
            .enumerate()
            .filter(|(i, _)| tried & (1 << i) == 0)
            .filter(|(i, _)| self.breaker_state(*i) != BreakerState::Open)
            .map(|(i, limit)| {
                let cells = self.cells(i);
                let active = cells.active.load(Ordering::Acquire);
                let load = active * 1_000_000 / limit.max_concurrent.max(1);
                (i, (load, cells.admitted.load(Ordering::Relaxed)))
            })
            .collect();
        candidates.sort_by_key(|&(_, key)| key);
        candidates
    }

    /// One place on backend `index` under its cap (1 while its breaker is half-open).
    fn take_place(&self, index: usize) -> bool {
        let cells = self.cells(index);
        let cap = match self.breaker_state(index) {
            BreakerState::Open => return false,
            BreakerState::HalfOpen => 1,
            BreakerState::Closed => match self.backends[index].max_concurrent {
                0 => u64::MAX,
                cap => cap,
            },
        };
        let mut active = cells.active.load(Ordering::Acquire);
        while active < cap {
            match cells.active.compare_exchange(
                active,
                active + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => active = now,
            }
        }
        false
    }

    pub fn breaker_state(&self, index: usize) -> BreakerState {
        BreakerState::from_u64(self.cells(index).state.load(Ordering::Acquire))
    }

    /// An answer on `index` went well (its first token came, or it ended cleanly): the
    /// backend's failures are forgotten and its breaker closes.
    pub fn record_success(&self, index: usize) {
        let cells = self.cells(index);
        cells.consecutive.store(0, Ordering::Release);
        if cells
            .state
            .swap(BreakerState::Closed as u64, Ordering::AcqRel)
            != BreakerState::Closed as u64
        {
            log::info!("LLM backend {index}: breaker closed (an answer succeeded)");
        }
    }

    /// An answer on `index` failed: the breaker opens after `failures` in a row, or at once
    /// while it is half-open. Returns whether this failure opened it.
    pub fn record_failure(&self, index: usize) -> bool {
        let cells = self.cells(index);
        cells.failures.fetch_add(1, Ordering::Relaxed);
        let consecutive = cells.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        let state = self.breaker_state(index);
        let trips = match state {
            BreakerState::Closed => consecutive >= self.breaker.failures,
            BreakerState::HalfOpen => true,
            BreakerState::Open => false,
        };
        if trips
            && cells
                .state
                .compare_exchange(
                    state as u64,
                    BreakerState::Open as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            cells
                .open_until_ms
                .store(monotonic_ms() + self.breaker.cooldown_ms, Ordering::Release);
            cells.opened.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Whether this worker should probe backend `index` now: its breaker is open and the
    /// cool-down is over. The first worker to ask wins (a lease of one cool-down).
    pub fn claim_probe(&self, index: usize) -> bool {
        let cells = self.cells(index);
        if self.breaker_state(index) != BreakerState::Open {
            return false;
        }
        let now = monotonic_ms();
        let until = cells.open_until_ms.load(Ordering::Acquire);
        now >= until
            && cells
                .open_until_ms
                .compare_exchange(
                    until,
                    now + self.breaker.cooldown_ms,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// The health probe of an open backend answered: one answer at a time may try it.
    pub fn probe_passed(&self, index: usize) {
        let _ = self.cells(index).state.compare_exchange(
            BreakerState::Open as u64,
            BreakerState::HalfOpen as u64,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// 1 = next in line.
    pub fn position(&self, ticket: u64) -> u64 {
        ticket.saturating_sub(self.board.header().llm_left_line.load(Ordering::Acquire)) + 1
    }

    /// Gives up a place in line (the client went away).
    pub fn abandon(&self) {
        self.leave_line();
    }

    fn leave_line(&self) {
        self.slot.llm_waiting.fetch_sub(1, Ordering::AcqRel);
        self.board
            .header()
            .llm_left_line
            .fetch_add(1, Ordering::AcqRel);
    }

    /// Ends an admitted generation on `index`.
    pub fn release(&self, index: usize) {
        self.held(index).fetch_sub(1, Ordering::AcqRel);
        self.cells(index).active.fetch_sub(1, Ordering::AcqRel);
        if self.embedding {
            return;
        }
        self.slot.llm_held.fetch_sub(1, Ordering::AcqRel);
        self.board
            .header()
            .llm_active
            .fetch_sub(1, Ordering::AcqRel);
    }

    pub fn active(&self) -> u64 {
        self.board.header().llm_active.load(Ordering::Acquire)
    }
}

impl Drop for Scoreboard {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no reference outlives `self`.
        let _ = unsafe { munmap(self.base.cast(), Self::bytes(self.len)) };
    }
}

/// Milliseconds on `CLOCK_MONOTONIC`, which is system-wide, so master and workers agree.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Milliseconds since the Unix epoch (for timestamps shown to people).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_start_free_and_round_trip() {
        let board = Scoreboard::new(4).unwrap();
        assert_eq!(board.free_slot(), Some(0));
        let slot = board.slot(0);
        slot.claim(7);
        slot.set_pid(1234);
        assert_eq!(slot.state(), SlotState::Booting);
        assert_eq!(board.free_slot(), Some(1));
        slot.request_started();
        slot.request_finished();
        assert_eq!((slot.requests(), slot.in_flight()), (1, 0));
        slot.set_boot_error("не удалось открыть хранилище");
        assert_eq!(
            slot.boot_error().as_deref(),
            Some("не удалось открыть хранилище")
        );
        slot.release();
        assert_eq!(board.free_slot(), Some(0));
    }

    #[test]
    fn boot_error_is_cut_on_a_char_boundary() {
        let board = Scoreboard::new(1).unwrap();
        let long = "я".repeat(BOOT_ERROR_LEN);
        board.slot(0).set_boot_error(&long);
        let kept = board.slot(0).boot_error().unwrap();
        assert!(kept.len() <= BOOT_ERROR_LEN && kept.chars().all(|c| c == 'я'));
    }

    #[test]
    fn the_llm_gate_caps_admission_and_a_dead_workers_places_come_back() {
        let board: &'static Scoreboard = Box::leak(Box::new(Scoreboard::new(2).unwrap()));
        board.slot(0).claim(1);
        board.slot(1).claim(1);
        let one = || vec![BackendLimit { max_concurrent: 0 }];
        let (a, b) = (
            LlmGate::new(board, board.slot(0), 1, one(), POLICY),
            LlmGate::new(board, board.slot(1), 1, one(), POLICY),
        );
        let (ta, tb) = (a.enqueue(), b.enqueue());
        assert_eq!(a.try_admit(0), Admit::Backend(0));
        assert_eq!(b.try_admit(0), Admit::Full, "the cap is 1");
        assert_eq!(b.position(tb), 1, "b is next once a left the line");
        assert_eq!(ta, 0);
        // Worker 0 dies mid-generation: the master gives its place back.
        board.retire_slot(0);
        assert_eq!(a.active(), 0);
        assert_eq!(board.backend(0).active, 0);
        assert_eq!(b.try_admit(0), Admit::Backend(0));
        b.release(0);
        assert_eq!(b.active(), 0);
    }

    const POLICY: BreakerPolicy = BreakerPolicy {
        failures: 2,
        cooldown_ms: 0,
    };

    #[test]
    fn backends_are_filled_least_loaded_first_and_never_past_their_cap() {
        let board: &'static Scoreboard = Box::leak(Box::new(Scoreboard::new(2).unwrap()));
        board.slot(0).claim(1);
        board.slot(1).claim(1);
        let limits = vec![
            BackendLimit { max_concurrent: 2 },
            BackendLimit { max_concurrent: 4 },
        ];
        let gates = [
            LlmGate::new(board, board.slot(0), 0, limits.clone(), POLICY),
            LlmGate::new(board, board.slot(1), 0, limits, POLICY),
        ];
        let mut on = [0; 2];
        for i in 0..6 {
            match gates[i % 2].try_admit(0) {
                Admit::Backend(b) => on[b] += 1,
                other => panic!("answer {i}: {other:?}"),
            }
        }
        assert_eq!(on, [2, 4], "capacity decides");
        assert_eq!(gates[0].try_admit(0), Admit::Full);
        assert_eq!(gates[1].try_admit(0b10), Admit::Full, "backend 0 is full");
        gates[0].release(1);
        assert_eq!(gates[0].try_admit(0), Admit::Backend(1));
        assert_eq!(board.backend(1).active, 4);
        // Worker 1 dies: its places on both backends come back.
        board.retire_slot(1);
        let left = board.backend(0).active + board.backend(1).active;
        assert!(left < 6, "{left}");
    }

    #[test]
    fn embedding_servers_have_their_own_cells_and_no_line() {
        let board: &'static Scoreboard = Box::leak(Box::new(Scoreboard::new(1).unwrap()));
        board.slot(0).claim(1);
        let embed = LlmGate::embedding(board, board.slot(0), 2, POLICY);
        assert_eq!(embed.try_take(0), Admit::Backend(0));
        assert_eq!(embed.try_take(0), Admit::Backend(1), "the least busy");
        assert_eq!(embed.active(), 0, "not counted as generations");
        assert_eq!(board.backend(0).active, 0);
        assert_eq!(board.embed_backend(0).active, 1);
        embed.record_failure(1);
        embed.record_failure(1);
        embed.release(1);
        assert_eq!(embed.try_take(0b01), Admit::Unavailable, "1 is ejected");
        board.retire_slot(0);
        assert_eq!(board.embed_backend(0).active, 0);
    }

    #[test]
    fn a_breaker_opens_after_failures_probes_then_closes_on_success() {
        let board: &'static Scoreboard = Box::leak(Box::new(Scoreboard::new(1).unwrap()));
        board.slot(0).claim(1);
        let limits = vec![BackendLimit { max_concurrent: 0 }; 2];
        let gate = LlmGate::new(board, board.slot(0), 0, limits, POLICY);
        assert!(!gate.record_failure(0));
        assert!(gate.record_failure(0), "two in a row open it");
        assert_eq!(gate.breaker_state(0), BreakerState::Open);
        for _ in 0..3 {
            assert_eq!(gate.try_admit(0), Admit::Backend(1), "0 is ejected");
            gate.release(1);
        }
        assert_eq!(gate.try_admit(0b10), Admit::Unavailable);
        assert!(gate.claim_probe(0));
        gate.probe_passed(0);
        assert_eq!(gate.breaker_state(0), BreakerState::HalfOpen);
        assert_eq!(gate.try_admit(0b10), Admit::Backend(0));
        assert_eq!(gate.try_admit(0b10), Admit::Full, "one answer on trial");
        gate.record_success(0);
        gate.release(0);
        assert_eq!(gate.breaker_state(0), BreakerState::Closed);
        assert_eq!(board.backend(0).opened, 1);
        assert_eq!(board.backend(0).failures, 2);
    }

    #[test]
    fn writes_in_a_child_are_seen_by_the_parent() {
        let board = Scoreboard::new(2).unwrap();
        board.slot(1).claim(1);
        // SAFETY: the child only touches atomics in the shared mapping, then _exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                board.slot(1).request_started();
                board.slot(1).request_finished();
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(board.slot(1).requests(), 1);
            }
        }
    }
}
