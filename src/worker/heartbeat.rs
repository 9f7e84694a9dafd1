//! The heartbeat: a task on the worker's own event loop that stamps its scoreboard slot.
//!
//! If the loop is blocked, the stamps stop and the master kills the worker after `timeout`.
//! The same task notices when the master has gone (our parent changed) and starts a graceful
//! stop, so workers never outlive their master for long. Each beat also tells
//! [`super::trim`] how many connections are open, so memory comes back after a burst.

use std::time::Duration;

use nix::unistd::Pid;

use super::server::Stopper;
use super::trim::{self, TrimAfterBurst};
use crate::scoreboard::Slot;

/// Stamp often enough that `timeout` means "several missed beats", but not busily.
pub fn period(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(25), Duration::from_secs(1))
}

pub async fn run(slot: &'static Slot, timeout: Duration, master: Pid, stopper: Stopper) {
    let mut tick = tokio::time::interval(period(timeout));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut after_burst = TrimAfterBurst::default();
    loop {
        tick.tick().await;
        slot.stamp_heartbeat();
        if after_burst.observe(slot.connections()) {
            trim::release_free_memory();
        }
        if let Some(kib) = resident_kib() {
            slot.rss_kib
                .store(kib, std::sync::atomic::Ordering::Relaxed);
        }
        if nix::unistd::getppid() != master {
            log::warn!("master {master} is gone; stopping gracefully");
            stopper.stop();
        }
    }
}

/// This process's resident set in KiB, from /proc/self/statm (one small read per beat).
fn resident_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(pages * page / 1024)
}
