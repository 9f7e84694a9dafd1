//! The pool core driven by event sequences, as the shell would feed it: no fork, no clock.
//! A small simulated shell answers every `Spawn` with a fresh fake pid, as the real one does.

use super::*;

fn spec(workers: usize) -> Spec {
    Spec {
        workers,
        timeout: Duration::from_secs(30),
        graceful_timeout: Duration::from_secs(30),
        boot_timeout: Duration::from_secs(30),
        max_requests: 0,
        max_requests_jitter: 0,
        max_worker_memory_mib: 0,
    }
}

/// The pool plus what a shell would remember: the time, fake pids, every command so far.
struct Sim {
    pool: Pool,
    t0: Instant,
    now: Instant,
    next_pid: i32,
    /// Spawns fail (fork error) while set.
    fail_spawns: bool,
    /// Pids forked by the last `send`.
    forked: Vec<Pid>,
    history: Vec<Command>,
}

impl Sim {
    fn new(spec: Spec) -> Sim {
        Sim::with_upgrade(spec, None)
    }

    fn with_upgrade(spec: Spec, upgraded_from: Option<Pid>) -> Sim {
        let t0 = Instant::now();
        Sim {
            pool: Pool::new(spec, upgraded_from, 7, t0),
            t0,
            now: t0,
            next_pid: 100,
            fail_spawns: false,
            forked: Vec::new(),
            history: Vec::new(),
        }
    }

    /// A pool whose first generation serves.
    fn serving_with(spec: Spec) -> Sim {
        let workers = spec.workers;
        let mut sim = Sim::new(spec);
        sim.send(Event::Start);
        assert_eq!(
            sim.forked.len(),
            workers,
            "the first generation boots at once"
        );
        let pids = sim.forked.clone();
        sim.ready(&pids);
        assert_eq!(sim.pool.phase(), Phase::Running);
        sim
    }

    fn serving(workers: usize) -> Sim {
        Sim::serving_with(spec(workers))
    }

    fn at(&mut self, secs: f64) {
        self.now = self.t0 + Duration::from_secs_f64(secs);
    }

    fn secs(&self) -> f64 {
        (self.now - self.t0).as_secs_f64()
    }

    /// Feeds one event, then answers spawns as the shell does; returns every command.
    fn send(&mut self, event: Event) -> Vec<Command> {
        self.forked.clear();
        let mut all = Vec::new();
        let mut queue = std::collections::VecDeque::from(self.pool.on_event(event, self.now));
        while let Some(command) = queue.pop_front() {
            if let Command::Spawn { generation, seat } = command {
                let answer = if self.fail_spawns {
                    Event::SpawnFailed {
                        generation,
                        seat,
                        error: "cannot fork a worker: EAGAIN".into(),
                    }
                } else {
                    self.next_pid += 1;
                    let pid = Pid::from_raw(self.next_pid);
                    self.forked.push(pid);
                    Event::Spawned {
                        pid,
                        generation,
                        seat,
                    }
                };
                queue.extend(self.pool.on_event(answer, self.now));
            }
            all.push(command);
        }
        self.history.extend(all.iter().cloned());
        all
    }

    fn tick(&mut self, samples: Vec<Sample>) -> Vec<Command> {
        self.send(Event::Tick { samples })
    }

    /// These workers report ready; every other live worker is a quiet, healthy sample.
    fn ready(&mut self, pids: &[Pid]) -> Vec<Command> {
        let samples = self
            .pool
            .workers()
            .map(|w| Sample {
                ready: w.booted || pids.contains(&w.pid),
                ..sample(w.pid)
            })
            .collect();
        self.tick(samples)
    }

    /// A turn with nothing new.
    fn idle(&mut self) -> Vec<Command> {
        self.ready(&[])
    }

    fn exit_with(
        &mut self,
        pid: Pid,
        status: ExitStatus,
        boot_error: Option<&str>,
    ) -> Vec<Command> {
        self.send(Event::Exited {
            pid,
            status,
            was_ready: false,
            boot_error: boot_error.map(str::to_string),
        })
    }

    fn sigkill(&mut self, pid: Pid) -> Vec<Command> {
        self.exit_with(pid, ExitStatus::Signal(Signal::SIGKILL), None)
    }

    fn in_state(&self, want: fn(&WorkerState) -> bool) -> Vec<Pid> {
        self.pool
            .workers()
            .filter(|w| want(&w.state))
            .map(|w| w.pid)
            .collect()
    }

    fn serving_pids(&self) -> Vec<Pid> {
        self.in_state(|s| *s == WorkerState::Serving)
    }

    fn booting_pids(&self) -> Vec<Pid> {
        self.in_state(|s| *s == WorkerState::Booting)
    }

    fn restarts(&self, cause: Cause) -> usize {
        self.history
            .iter()
            .filter(|c| **c == Command::CountRestart(cause))
            .count()
    }

    fn logged(&self, needle: &str) -> usize {
        self.history
            .iter()
            .filter(|c| matches!(c, Command::Log { message, .. } if message.contains(needle)))
            .count()
    }
}

fn sample(pid: Pid) -> Sample {
    Sample {
        pid,
        ready: false,
        silence: Duration::from_millis(10),
        requests: 0,
        rss_mib: 50,
    }
}

fn spawns(commands: &[Command]) -> usize {
    commands
        .iter()
        .filter(|c| matches!(c, Command::Spawn { .. }))
        .count()
}

fn signals(commands: &[Command], signal: Signal) -> Vec<Pid> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Signal { pid, signal: s } if *s == signal => Some(*pid),
            _ => None,
        })
        .collect()
}

fn has(commands: &[Command], want: &Command) -> bool {
    commands.contains(want)
}

// ----- boot --------------------------------------------------------------------------------

#[test]
fn the_first_generation_boots_every_seat_at_once_then_reports_ready() {
    let mut sim = Sim::new(spec(4));
    let start = sim.send(Event::Start);
    assert_eq!(spawns(&start), 4);
    assert!(
        sim.pool.next_wakeup(sim.now).is_none(),
        "nothing is waiting"
    );
    let first = sim.forked.clone();
    let partial = sim.ready(&first[..3]);
    assert!(!partial
        .iter()
        .any(|c| matches!(c, Command::NotifyReady { .. })));
    assert_eq!(sim.pool.phase(), Phase::Booting);
    let all = sim.ready(&first[3..]);
    assert!(all.iter().any(
        |c| matches!(c, Command::NotifyReady { status } if status.starts_with("4 workers serving"))
    ));
    assert_eq!(sim.logged("All 4 workers of generation 1 are serving"), 1);
}

#[test]
fn a_first_generation_that_cannot_boot_halts_with_the_workers_own_error() {
    let mut sim = Sim::new(spec(2));
    sim.send(Event::Start);
    let pid = sim.forked[0];
    let out = sim.exit_with(
        pid,
        ExitStatus::Code(EXIT_BOOT_ERROR),
        Some("cannot open access log /x/access.log: No such file or directory"),
    );
    assert!(has(
        &out,
        &Command::Halt {
            pid,
            reason: "cannot open access log /x/access.log: No such file or directory".into()
        }
    ));
    assert_eq!(spawns(&out), 0, "no crash loop");
    // Nothing more is decided after a halt.
    assert!(sim.sigkill(sim.booting_pids()[0]).is_empty());
}

#[test]
fn a_first_generation_worker_killed_during_boot_is_a_boot_failure_not_a_halt() {
    let mut sim = Sim::new(spec(2));
    sim.send(Event::Start);
    let victim = sim.forked[0];
    let out = sim.sigkill(victim);
    assert!(!out.iter().any(|c| matches!(c, Command::Halt { .. })));
    assert_eq!(spawns(&out), 0, "backoff first");
    sim.at(0.1);
    assert_eq!(spawns(&sim.idle()), 1);
}

#[test]
fn boot_failures_back_off_per_seat_doubling_and_log_once_per_step() {
    let mut sim = Sim::serving(1);
    // The serving worker dies; its replacement, and each one after, fails to boot.
    let first = sim.serving_pids()[0];
    sim.sigkill(first);
    let expected = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2];
    for (n, delay) in expected.iter().enumerate() {
        let pid = *sim.booting_pids().first().expect("a worker boots");
        let out = sim.exit_with(
            pid,
            ExitStatus::Code(EXIT_APP_LOAD_ERROR),
            Some("cannot open the store"),
        );
        assert_eq!(
            spawns(&out),
            0,
            "failure {}: no respawn before the backoff",
            n + 1
        );
        let failed_at = sim.secs();
        let due = sim.pool.next_wakeup(sim.now).expect("a respawn is due");
        assert_eq!(
            due - sim.now,
            Duration::from_secs_f64(*delay),
            "failure {}",
            n + 1
        );
        sim.at(failed_at + delay * 0.9);
        assert_eq!(spawns(&sim.idle()), 0, "failure {}: too early", n + 1);
        sim.at(failed_at + delay);
        assert_eq!(spawns(&sim.idle()), 1, "failure {}: due now", n + 1);
    }
    // The error and the step are each logged once per failure.
    assert_eq!(
        sim.logged("failed to boot: cannot open the store"),
        expected.len()
    );
    for (n, ms) in [100, 200, 400, 800].iter().enumerate() {
        assert_eq!(
            sim.logged(&format!(
                "seat 0: {} in a row); next spawn in {ms}ms",
                n + 1
            )),
            1,
            "{ms}ms"
        );
    }
    assert_eq!(backoff(100), BACKOFF_CAP);
}

#[test]
fn a_successful_boot_resets_the_backoff_of_its_seat() {
    let mut sim = Sim::serving(1);
    sim.sigkill(sim.serving_pids()[0]);
    for _ in 0..3 {
        let pid = sim.booting_pids()[0];
        sim.exit_with(pid, ExitStatus::Code(EXIT_BOOT_ERROR), None);
        let due = sim.pool.next_wakeup(sim.now).unwrap();
        sim.now = due;
        sim.idle();
    }
    let pid = sim.booting_pids()[0];
    sim.ready(&[pid]);
    // Served, then failed: a crash, replaced now; that replacement fails: backoff from 0.1 s.
    assert_eq!(spawns(&sim.sigkill(pid)), 1);
    let next = sim.booting_pids()[0];
    sim.exit_with(next, ExitStatus::Code(EXIT_BOOT_ERROR), None);
    assert_eq!(
        sim.pool.next_wakeup(sim.now).unwrap() - sim.now,
        Duration::from_millis(100)
    );
}

#[test]
fn a_failing_seat_does_not_delay_the_others() {
    let mut sim = Sim::serving(3);
    let pids = sim.serving_pids();
    sim.sigkill(pids[0]);
    let booting = sim.booting_pids()[0];
    sim.exit_with(booting, ExitStatus::Code(EXIT_BOOT_ERROR), None);
    // Another serving worker dies while seat 0 backs off: replaced at once.
    assert_eq!(spawns(&sim.sigkill(pids[1])), 1);
}

#[test]
fn a_fork_failure_backs_off_like_a_boot_failure() {
    let mut sim = Sim::serving(1);
    sim.fail_spawns = true;
    let out = sim.sigkill(sim.serving_pids()[0]);
    assert_eq!(spawns(&out), 1);
    assert!(sim.logged("cannot fork a worker") == 1);
    assert_eq!(spawns(&sim.idle()), 0);
    sim.fail_spawns = false;
    sim.at(0.1);
    assert_eq!(spawns(&sim.idle()), 1);
}

// ----- replacing served workers ------------------------------------------------------------

#[test]
fn a_serving_worker_killed_is_replaced_now_and_counted_as_a_crash() {
    let mut sim = Sim::serving(4);
    let victim = sim.serving_pids()[2];
    let out = sim.sigkill(victim);
    assert_eq!(spawns(&out), 1, "{out:?}");
    assert!(has(&out, &Command::CountRestart(Cause::Crash)));
    assert!(
        sim.logged(&format!(
            "Worker (pid: {victim}, generation 1) died: killed by SIGKILL"
        )) == 1
    );
    assert_eq!(
        sim.logged("keep failing"),
        0,
        "a served worker is not a boot failure"
    );
}

#[test]
fn a_worker_ready_in_its_slot_but_not_yet_seen_counts_as_served() {
    let mut sim = Sim::serving(1);
    sim.sigkill(sim.serving_pids()[0]);
    let fresh = sim.booting_pids()[0];
    // Ready in the scoreboard, reaped before a tick saw it.
    let out = sim.send(Event::Exited {
        pid: fresh,
        status: ExitStatus::Signal(Signal::SIGSEGV),
        was_ready: true,
        boot_error: None,
    });
    assert_eq!(spawns(&out), 1);
}

#[test]
fn every_missing_worker_is_replaced_in_parallel() {
    let mut sim = Sim::serving(4);
    let pids = sim.serving_pids();
    let mut total = 0;
    for pid in &pids[..3] {
        total += spawns(&sim.sigkill(*pid));
    }
    assert_eq!(
        total, 3,
        "three deaths in the same instant, three spawns in the same instant"
    );
    assert_eq!(sim.booting_pids().len(), 3);
}

#[test]
fn a_kill_storm_never_leaves_the_pool_below_target_minus_one_for_long() {
    // SIGKILL a serving worker every 0.5 s for 20 s; a worker boots in 0.2 s.
    let mut sim = Sim::serving(4);
    let boot = 0.2;
    let mut booting_since: Vec<(Pid, f64)> = Vec::new();
    let mut low_since: Option<f64> = None;
    let mut worst_low = 0.0f64;
    let mut fewest = usize::MAX;
    let mut kills = 0;
    let mut t = 0.0;
    while t < 20.0 {
        t += 0.05;
        sim.at(t);
        // Workers finish booting.
        let done: Vec<Pid> = booting_since
            .iter()
            .filter(|(_, since)| t - since >= boot)
            .map(|(p, _)| *p)
            .collect();
        booting_since.retain(|(p, _)| !done.contains(p));
        sim.ready(&done);
        if (t * 20.0).round() as u64 % 10 == 0 {
            let victims = sim.serving_pids();
            let victim = victims[kills % victims.len()];
            sim.sigkill(victim);
            kills += 1;
        } else {
            sim.idle();
        }
        for pid in sim.booting_pids() {
            if !booting_since.iter().any(|(p, _)| *p == pid) {
                booting_since.push((pid, t));
            }
        }
        let live = sim.serving_pids().len();
        fewest = fewest.min(live);
        if live < 3 {
            let since = *low_since.get_or_insert(t);
            worst_low = worst_low.max(t - since);
        } else {
            low_since = None;
        }
    }
    assert!(kills >= 39, "{kills}");
    assert!(fewest >= 3, "fewest serving: {fewest}");
    assert!(worst_low <= 1.0, "below 3 for {worst_low} s");
    assert_eq!(sim.restarts(Cause::Crash), kills);
    assert_eq!(sim.logged("keep failing"), 0);
}

#[test]
fn the_boot_bucket_caps_boots_of_workers_that_die_right_after_booting() {
    // A poison request kills each worker as soon as it serves; all at the same instant.
    let mut sim = Sim::serving(1);
    let mut boots = 0;
    // The first generation spent one boot.
    for _ in 1..boot_burst(1) {
        let pid = sim.serving_pids()[0];
        boots += spawns(&sim.sigkill(pid));
        let fresh = sim.booting_pids()[0];
        sim.ready(&[fresh]);
    }
    assert_eq!(boots as u64, boot_burst(1) - 1, "the burst boots at once");
    let pid = sim.serving_pids()[0];
    assert_eq!(spawns(&sim.sigkill(pid)), 0, "bucket empty");
    let due = sim.pool.next_wakeup(sim.now).expect("a token is due");
    assert!(due - sim.now <= BOOT_REFILL_INTERVAL, "{:?}", due - sim.now);
    sim.now = due;
    assert_eq!(
        spawns(&sim.idle()),
        1,
        "the seat waited at most one refill interval"
    );
}

#[test]
fn the_boot_bucket_holds_a_whole_pool_so_losing_every_worker_refills_at_once() {
    let mut sim = Sim::serving(4);
    let mut total = 0;
    for pid in sim.serving_pids() {
        total += spawns(&sim.sigkill(pid));
    }
    assert_eq!(total, 4);
}

// ----- hung workers ------------------------------------------------------------------------

#[test]
fn a_silent_worker_is_aborted_replaced_at_once_then_killed_and_counted_as_timeout() {
    let mut sim = Sim::serving(2);
    let hung = sim.serving_pids()[0];
    let silent = |sim: &Sim| -> Vec<Sample> {
        sim.pool
            .workers()
            .map(|w| Sample {
                ready: true,
                silence: if w.pid == hung {
                    Duration::from_secs(31)
                } else {
                    Duration::from_millis(10)
                },
                ..sample(w.pid)
            })
            .collect()
    };
    sim.at(31.0);
    let out = sim.tick(silent(&sim));
    assert_eq!(signals(&out, Signal::SIGABRT), vec![hung]);
    assert_eq!(
        spawns(&out),
        1,
        "the replacement does not wait for the hung worker to die"
    );
    assert_eq!(sim.logged(&format!("WORKER TIMEOUT (pid: {hung})")), 1);
    sim.at(32.0);
    assert!(signals(&sim.tick(silent(&sim)), Signal::SIGKILL).is_empty());
    sim.at(33.5);
    assert_eq!(
        signals(&sim.tick(silent(&sim)), Signal::SIGKILL),
        vec![hung]
    );
    let out = sim.sigkill(hung);
    assert_eq!(spawns(&out), 0, "already replaced");
    assert!(has(&out, &Command::CountRestart(Cause::Timeout)));
    assert_eq!(sim.restarts(Cause::Crash), 0);
}

#[test]
fn a_retiring_worker_past_graceful_timeout_is_killed() {
    let mut sim = Sim::serving(2);
    let old = sim.serving_pids()[0];
    sim.send(Event::Signal(Signal::SIGTTOU));
    sim.at(30.5);
    assert!(signals(&sim.idle(), Signal::SIGKILL).is_empty());
    sim.at(31.5);
    assert_eq!(signals(&sim.idle(), Signal::SIGKILL), vec![old]);
    let out = sim.sigkill(old);
    assert!(has(&out, &Command::CountRestart(Cause::ScaleDown)));
    assert!(sim.logged("Worker exiting") == 1);
}

// ----- recycling ---------------------------------------------------------------------------

#[test]
fn recycling_boots_the_replacement_first_and_retires_once_it_serves() {
    for (max_requests, rss, cause) in [(40, 50, Cause::MaxRequests), (0, 900, Cause::Memory)] {
        let mut sim = Sim::serving_with(Spec {
            max_requests,
            max_worker_memory_mib: 512,
            ..spec(2)
        });
        let old = sim.serving_pids()[0];
        let samples = sim
            .pool
            .workers()
            .map(|w| Sample {
                ready: true,
                requests: if w.pid == old { 40 } else { 1 },
                rss_mib: if w.pid == old { rss } else { 50 },
                ..sample(w.pid)
            })
            .collect();
        let out = sim.tick(samples);
        assert_eq!(spawns(&out), 1, "{cause:?}");
        assert!(
            signals(&out, Signal::SIGTERM).is_empty(),
            "{cause:?}: still serving"
        );
        let fresh = sim.forked[0];
        let out = sim.ready(&[fresh]);
        assert_eq!(signals(&out, Signal::SIGTERM), vec![old], "{cause:?}");
        let out = sim.exit_with(old, ExitStatus::Code(0), None);
        assert!(has(&out, &Command::CountRestart(cause)), "{cause:?}");
        assert_eq!(spawns(&out), 0);
        assert_eq!(sim.serving_pids().len(), 2);
    }
}

#[test]
fn a_first_generation_marked_for_recycling_as_it_boots_still_reports_ready() {
    // max_worker_memory below any real worker: each one is marked for recycling on the same
    // turn it reports ready. The pool must still say READY once every seat serves.
    let mut sim = Sim::new(Spec {
        max_worker_memory_mib: 1,
        ..spec(1)
    });
    sim.send(Event::Start);
    let first = sim.forked[0];
    let out = sim.tick(vec![Sample {
        ready: true,
        rss_mib: 18,
        ..sample(first)
    }]);
    assert_eq!(spawns(&out), 1, "the replacement boots first");
    assert!(
        out.iter().any(|c| matches!(c, Command::NotifyReady { .. })),
        "a recycling worker still serves its seat: {out:?}"
    );
    assert_eq!(sim.pool.phase(), Phase::Running);
}

#[test]
fn a_recycled_worker_keeps_serving_while_its_replacement_fails_to_boot() {
    let mut sim = Sim::serving_with(Spec {
        max_requests: 10,
        ..spec(1)
    });
    let old = sim.serving_pids()[0];
    sim.tick(vec![Sample {
        ready: true,
        requests: 10,
        ..sample(old)
    }]);
    let fresh = sim.booting_pids()[0];
    sim.exit_with(fresh, ExitStatus::Code(EXIT_BOOT_ERROR), None);
    assert!(signals(&sim.history, Signal::SIGTERM).is_empty());
    assert!(matches!(
        sim.pool.worker(old).unwrap().state,
        WorkerState::Recycling(Cause::MaxRequests)
    ));
}

// ----- TTIN / TTOU -------------------------------------------------------------------------

#[test]
fn ttin_adds_a_worker_now_and_ttou_retires_the_oldest_never_below_one() {
    let mut sim = Sim::serving(2);
    let oldest = sim.serving_pids()[0];
    let out = sim.send(Event::Signal(Signal::SIGTTIN));
    assert_eq!(spawns(&out), 1);
    assert_eq!(sim.logged("target is now 3 workers"), 1);
    let fresh = sim.forked[0];
    sim.ready(&[fresh]);
    let out = sim.send(Event::Signal(Signal::SIGTTOU));
    assert_eq!(signals(&out, Signal::SIGTERM), vec![oldest]);
    assert_eq!(spawns(&out), 0);
    let out = sim.exit_with(oldest, ExitStatus::Code(0), None);
    assert_eq!(spawns(&out), 0, "the seat is gone");
    for _ in 0..3 {
        sim.send(Event::Signal(Signal::SIGTTOU));
    }
    assert_eq!(sim.pool.serving().target(), 1);
    assert_eq!(sim.logged("target is now 1 workers"), 3);
    let live = sim.serving_pids();
    assert_eq!(live.len(), 1);
    // The survivor holds the remaining seat: its death is replaced.
    let retiring = sim.in_state(|s| matches!(s, WorkerState::Retiring { .. }));
    for pid in retiring {
        sim.exit_with(pid, ExitStatus::Code(0), None);
    }
    assert_eq!(spawns(&sim.sigkill(live[0])), 1);
    assert_eq!(sim.restarts(Cause::ScaleDown), 2);
}

// ----- reload ------------------------------------------------------------------------------

fn hup_and_load(sim: &mut Sim, new: Spec) -> Vec<Command> {
    let out = sim.send(Event::Signal(Signal::SIGHUP));
    assert!(has(&out, &Command::LoadConfig), "{out:?}");
    sim.send(Event::ReloadLoaded { spec: new })
}

#[test]
fn hup_is_ignored_until_the_first_generation_serves() {
    let mut sim = Sim::new(spec(1));
    sim.send(Event::Start);
    let out = sim.send(Event::Signal(Signal::SIGHUP));
    assert!(!has(&out, &Command::LoadConfig));
    assert!(
        has(&out, &Command::DeclineReload),
        "a waiting `ragpool reload` hears no"
    );
    assert_eq!(sim.logged("Ignoring signal SIGHUP"), 1);
}

#[test]
fn a_reload_commits_once_every_new_worker_serves_then_retires_the_old_generation() {
    let mut sim = Sim::serving(2);
    let old = sim.serving_pids();
    let out = hup_and_load(&mut sim, spec(3));
    assert_eq!(out[1], Command::AdoptGeneration { generation: 2 });
    assert_eq!(spawns(&out), 3);
    assert!(out
        .iter()
        .all(|c| !matches!(c, Command::Spawn { generation, .. } if *generation != 2)));
    let new = sim.forked.clone();
    let out = sim.ready(&new[..2]);
    assert!(
        signals(&out, Signal::SIGTERM).is_empty(),
        "not before all serve"
    );
    let out = sim.ready(&new[2..]);
    assert!(has(
        &out,
        &Command::CommitGeneration {
            generation: 2,
            previous: 1
        }
    ));
    let mut retired = signals(&out, Signal::SIGTERM);
    retired.sort();
    assert_eq!(retired, old);
    assert!(out.iter().any(|c| matches!(
        c,
        Command::FinishReload { ok: true, generation: 2, status } if status.contains("last reload: ok (generation 2)")
    )));
    for pid in old {
        let out = sim.exit_with(pid, ExitStatus::Code(0), None);
        assert_eq!(spawns(&out), 0);
    }
    assert_eq!(sim.restarts(Cause::Reload), 2);
    assert_eq!(sim.pool.serving().number, 2);
    assert_eq!(sim.pool.serving().target(), 3);
}

#[test]
fn a_reload_whose_worker_fails_to_boot_rolls_back_and_counts_nothing() {
    let mut sim = Sim::serving(2);
    let old = sim.serving_pids();
    hup_and_load(&mut sim, spec(2));
    let new = sim.forked.clone();
    let out = sim.exit_with(
        new[0],
        ExitStatus::Code(EXIT_BOOT_ERROR),
        Some("cannot open access log"),
    );
    assert!(has(&out, &Command::DropGeneration { generation: 2 }));
    assert_eq!(signals(&out, Signal::SIGTERM), vec![new[1]]);
    assert!(out.iter().any(|c| matches!(
        c,
        Command::FinishReload {
            ok: false,
            generation: 1,
            ..
        }
    )));
    assert_eq!(sim.logged("a new worker"), 1);
    assert_eq!(
        sim.logged("cannot open access log; generation 1 keeps serving"),
        1
    );
    sim.exit_with(new[1], ExitStatus::Code(0), None);
    assert_eq!(sim.serving_pids(), old);
    assert_eq!(
        sim.restarts(Cause::Crash) + sim.restarts(Cause::Reload),
        1,
        "the failed boot only"
    );
    // The next reload gets a fresh number.
    let out = hup_and_load(&mut sim, spec(2));
    assert_eq!(out[1], Command::AdoptGeneration { generation: 3 });
}

#[test]
fn a_reload_that_overruns_boot_timeout_rolls_back() {
    let mut sim = Sim::serving(1);
    hup_and_load(
        &mut sim,
        Spec {
            boot_timeout: Duration::from_secs(5),
            ..spec(1)
        },
    );
    let new = sim.forked[0];
    sim.at(4.9);
    assert!(!has(
        &sim.idle(),
        &Command::DropGeneration { generation: 2 }
    ));
    sim.at(5.1);
    let out = sim.idle();
    assert!(has(&out, &Command::DropGeneration { generation: 2 }));
    assert_eq!(signals(&out, Signal::SIGTERM), vec![new]);
    assert_eq!(sim.logged("did not boot within boot_timeout (5s)"), 1);
}

#[test]
fn a_new_reload_supersedes_a_pending_one_quietly() {
    let mut sim = Sim::serving(1);
    hup_and_load(&mut sim, spec(1));
    let first_try = sim.forked[0];
    let out = hup_and_load(&mut sim, spec(1));
    assert!(has(&out, &Command::DropGeneration { generation: 2 }));
    assert!(has(&out, &Command::AdoptGeneration { generation: 3 }));
    assert_eq!(signals(&out, Signal::SIGTERM), vec![first_try]);
    assert!(!out
        .iter()
        .any(|c| matches!(c, Command::FinishReload { .. })));
}

#[test]
fn a_rejected_config_changes_nothing() {
    let mut sim = Sim::serving(2);
    sim.send(Event::Signal(Signal::SIGHUP));
    let out = sim.send(Event::ReloadRejected {
        reason: "workers.toml:3: unknown key".into(),
    });
    assert_eq!(spawns(&out), 0);
    assert!(signals(&out, Signal::SIGTERM).is_empty());
    assert!(out
        .iter()
        .any(|c| matches!(c, Command::FinishReload { ok: false, .. })));
}

#[test]
fn a_new_worker_that_served_then_died_before_the_commit_is_replaced_in_its_generation() {
    let mut sim = Sim::serving(1);
    hup_and_load(&mut sim, spec(2));
    let new = sim.forked.clone();
    sim.ready(&new[..1]);
    let out = sim.sigkill(new[0]);
    assert_eq!(
        out.iter()
            .filter(|c| matches!(c, Command::Spawn { generation: 2, .. }))
            .count(),
        1
    );
    assert_eq!(sim.pool.pending_generation(), Some(2), "not rolled back");
}

// ----- stopping ----------------------------------------------------------------------------

#[test]
fn term_drains_every_worker_counts_nothing_and_exits_once_all_are_gone() {
    let mut sim = Sim::serving(3);
    let pids = sim.serving_pids();
    let out = sim.send(Event::Signal(Signal::SIGTERM));
    assert!(has(&out, &Command::NotifyStopping));
    assert!(has(&out, &Command::CloseListeners));
    assert_eq!(signals(&out, Signal::SIGTERM), pids);
    for pid in &pids[..2] {
        let out = sim.sigkill(*pid);
        assert_eq!(spawns(&out), 0);
        assert!(!has(&out, &Command::Exit));
    }
    let out = sim.exit_with(pids[2], ExitStatus::Code(0), None);
    assert!(has(&out, &Command::Exit));
    assert_eq!(sim.restarts(Cause::Crash), 0);
}

#[test]
fn a_drain_escalates_to_sigkill_at_the_deadline_and_a_second_term_to_sigint() {
    let mut sim = Sim::serving(2);
    sim.send(Event::Signal(Signal::SIGTERM));
    sim.at(30.9);
    assert!(signals(&sim.idle(), Signal::SIGKILL).is_empty());
    let out = sim.send(Event::Signal(Signal::SIGTERM));
    assert_eq!(signals(&out, Signal::SIGINT).len(), 2);
    assert!(!has(&out, &Command::NotifyStopping), "STOPPING=1 once");
    sim.at(33.0);
    assert_eq!(signals(&sim.idle(), Signal::SIGKILL).len(), 2);
}

#[test]
fn a_stop_during_a_reload_drops_the_new_generation() {
    let mut sim = Sim::serving(1);
    hup_and_load(&mut sim, spec(1));
    let out = sim.send(Event::Signal(Signal::SIGINT));
    assert!(has(&out, &Command::DropGeneration { generation: 2 }));
    assert_eq!(signals(&out, Signal::SIGINT).len(), 2);
}

// ----- upgrade -----------------------------------------------------------------------------

#[test]
fn usr2_starts_one_upgrade_and_a_dead_successor_is_rolled_back() {
    let mut sim = Sim::serving(1);
    assert!(has(
        &sim.send(Event::Signal(Signal::SIGUSR2)),
        &Command::StartUpgrade
    ));
    let successor = Pid::from_raw(9000);
    sim.send(Event::UpgradeStarted { pid: successor });
    assert!(!has(
        &sim.send(Event::Signal(Signal::SIGUSR2)),
        &Command::StartUpgrade
    ));
    let out = sim.send(Event::UpgradeExited);
    assert!(has(&out, &Command::AbortUpgrade));
    assert_eq!(
        sim.logged("Upgrade failed: the new master (pid 9000) exited"),
        1
    );
    assert_eq!(spawns(&out), 0);
    assert!(has(
        &sim.send(Event::Signal(Signal::SIGUSR2)),
        &Command::StartUpgrade
    ));
}

#[test]
fn stopped_by_the_successor_the_old_master_drains_without_stopping_the_service() {
    let mut sim = Sim::serving(1);
    sim.send(Event::Signal(Signal::SIGUSR2));
    sim.send(Event::UpgradeStarted {
        pid: Pid::from_raw(9000),
    });
    let out = sim.send(Event::Signal(Signal::SIGTERM));
    assert!(!has(&out, &Command::NotifyStopping));
    assert_eq!(sim.logged("Handing over to the new master (pid 9000)"), 1);
}

#[test]
fn a_new_master_stops_the_old_one_once_its_first_generation_serves() {
    let old = Pid::from_raw(42);
    let mut sim = Sim::with_upgrade(spec(2), Some(old));
    sim.send(Event::Start);
    let pids = sim.forked.clone();
    assert!(signals(&sim.ready(&pids[..1]), Signal::SIGTERM).is_empty());
    let out = sim.ready(&pids[1..]);
    assert!(has(&out, &Command::NotifyMainPid));
    assert_eq!(signals(&out, Signal::SIGTERM), vec![old]);
}

// ----- the rest ----------------------------------------------------------------------------

#[test]
fn usr1_reopens_the_masters_log_and_tells_every_worker() {
    let mut sim = Sim::serving(3);
    let out = sim.send(Event::Signal(Signal::SIGUSR1));
    assert!(has(&out, &Command::ReopenLogs));
    assert_eq!(signals(&out, Signal::SIGUSR1), sim.serving_pids());
}

#[test]
fn restart_counts_by_cause_are_exact_over_a_mixed_life() {
    let mut sim = Sim::serving_with(Spec {
        max_requests: 5,
        ..spec(2)
    });
    // Two crashes.
    for _ in 0..2 {
        let pid = sim.serving_pids()[0];
        sim.sigkill(pid);
        let fresh = sim.forked[0];
        sim.ready(&[fresh]);
    }
    // One recycle.
    let pid = sim.serving_pids()[0];
    let samples = sim
        .pool
        .workers()
        .map(|w| Sample {
            ready: true,
            requests: if w.pid == pid { 5 } else { 0 },
            ..sample(w.pid)
        })
        .collect();
    sim.tick(samples);
    let fresh = sim.forked[0];
    sim.ready(&[fresh]);
    sim.exit_with(pid, ExitStatus::Code(0), None);
    // One reload of two workers.
    hup_and_load(&mut sim, spec(2));
    let new = sim.forked.clone();
    sim.ready(&new);
    for pid in sim.in_state(|s| matches!(s, WorkerState::Retiring { .. })) {
        sim.exit_with(pid, ExitStatus::Code(0), None);
    }
    // A stop counts nothing.
    sim.send(Event::Signal(Signal::SIGTERM));
    for pid in sim.pool.workers().map(|w| w.pid).collect::<Vec<_>>() {
        sim.exit_with(pid, ExitStatus::Code(0), None);
    }
    let counts: Vec<(Cause, usize)> = Cause::ALL.iter().map(|c| (*c, sim.restarts(*c))).collect();
    assert_eq!(
        counts,
        vec![
            (Cause::Crash, 2),
            (Cause::Timeout, 0),
            (Cause::MaxRequests, 1),
            (Cause::Memory, 0),
            (Cause::Reload, 2),
            (Cause::ScaleDown, 0),
        ]
    );
}

#[test]
fn every_cause_is_a_metric_label() {
    for cause in Cause::ALL {
        assert!(crate::metrics::CAUSES.contains(&cause.label()), "{cause:?}");
    }
    assert_eq!(Cause::ALL.len(), crate::metrics::CAUSES.len());
}
