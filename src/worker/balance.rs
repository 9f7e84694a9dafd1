//! Who takes the next connection from a shared listener: the admission rule of the accept loop.
//!
//! Every worker waits on the same listening socket, and the kernel wakes them all; whichever
//! runs first would take the whole backlog, so one worker ends up holding most conversations
//! while the others idle. So a worker takes a connection only while it holds no more than its
//! fair share of the pool's (nginx's `accept_disabled`, keyed on the pool's mean rather than
//! on a fixed 7/8 of `worker_connections`): the mean over the live, accepting workers in the
//! scoreboard, plus [`headroom`]. The worker holding the fewest is always below the mean, so
//! someone can always accept; the others leave the connection in the kernel's backlog for it.
//! A worker whose heartbeat has stopped does not count, so a hung worker cannot hold the
//! others back.
//!
//! Owns only the rule; reading the scoreboard is cheap (atomics) and done per accept. It must
//! not wait or sleep: the accept loop decides what to do when the answer is "not now".

use crate::scoreboard::{monotonic_ms, Scoreboard, Slot, SlotState};

/// Connections a worker may hold above the pool's mean before it lets the others accept: at
/// least this many, so a handful of clients is not bounced around for nothing.
const MIN_HEADROOM: u64 = 4;

/// How far above the mean a worker may go: 1/16 of it (at least [`MIN_HEADROOM`]). With the
/// busiest at most ~6% above the mean, the least busy of 4 workers is at least ~80% of it.
pub fn headroom(mean: u64) -> u64 {
    (mean / 16).max(MIN_HEADROOM)
}

/// Whether the worker in `me`, holding `open` connections, may accept another one now.
/// `stale_ms`: a worker whose heartbeat is older is not counted (it is not accepting).
pub fn may_accept(board: &Scoreboard, me: &Slot, open: u64, stale_ms: u64) -> bool {
    let now = monotonic_ms();
    let (mut workers, mut total) = (1u64, open);
    for (_, slot) in board.slots() {
        if std::ptr::eq(slot, me)
            || slot.state() != SlotState::Ready
            || slot.silence_ms(now) > stale_ms
        {
            continue;
        }
        workers += 1;
        total += slot.connections();
    }
    within_fair_share(open, total, workers)
}

/// The rule itself: `open` is within the mean of `total` over `workers`, plus headroom.
pub fn within_fair_share(open: u64, total: u64, workers: u64) -> bool {
    let mean = total.div_ceil(workers.max(1));
    open < mean + headroom(mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_pool_lets_a_worker_take_a_few_then_the_others() {
        // 4 idle workers: the first to wake takes some, not the whole burst.
        let mut mine = 0;
        while within_fair_share(mine, mine, 4) {
            mine += 1;
        }
        assert!((4..=8).contains(&mine), "{mine}");
    }

    #[test]
    fn the_least_busy_worker_may_always_accept() {
        for (open, others) in [(0, [0, 0, 0]), (10, [500, 20, 900]), (249, [250, 251, 250])] {
            let total = open + others.iter().sum::<u64>();
            assert!(within_fair_share(open, total, 4), "{open} {others:?}");
        }
    }

    #[test]
    fn a_worker_well_above_the_mean_stops() {
        assert!(!within_fair_share(300, 1000, 4));
        assert!(within_fair_share(260, 1000, 4));
        assert!(!within_fair_share(266, 1000, 4));
    }

    /// Workers that accept in turns, each as long as the rule lets it, end up within a few
    /// percent of each other: the spread the rule promises.
    #[test]
    fn taking_turns_under_the_rule_spreads_a_burst_evenly() {
        for workers in [2usize, 4, 8] {
            let mut open = vec![0u64; workers];
            let mut left = 1000u64;
            // Worker 0 is the "fastest": it always tries first, and takes all it may.
            while left > 0 {
                for w in 0..workers {
                    while left > 0 && within_fair_share(open[w], open.iter().sum(), workers as u64)
                    {
                        open[w] += 1;
                        left -= 1;
                    }
                }
            }
            let mean = 1000.0 / workers as f64;
            for &n in &open {
                assert!(
                    (n as f64 - mean).abs() <= mean * 0.25,
                    "{workers} workers: {open:?}"
                );
            }
        }
    }

    #[test]
    fn stale_and_non_ready_workers_do_not_count() {
        let board = Scoreboard::new(3).unwrap();
        let me = board.slot(0);
        me.claim(1);
        me.set_state(SlotState::Ready);
        // A ready peer with 100 connections raises the mean...
        let busy = board.slot(1);
        busy.claim(1);
        busy.set_state(SlotState::Ready);
        for _ in 0..100 {
            busy.connection_opened();
        }
        assert!(may_accept(&board, me, 40, 60_000));
        // ...a booting one holds none and does not lower it.
        board.slot(2).claim(1);
        assert!(may_accept(&board, me, 40, 60_000));
        // Alone (the busy peer draining), the mean is this worker's own count: it may go on.
        busy.set_state(SlotState::Draining);
        assert!(may_accept(&board, me, 40, 60_000));
        // A peer with no connections pulls the mean down and stops a busy worker.
        busy.set_state(SlotState::Ready);
        for _ in 0..100 {
            busy.connection_closed();
        }
        assert!(!may_accept(&board, me, 40, 60_000));
    }
}
