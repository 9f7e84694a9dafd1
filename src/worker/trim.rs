//! Memory that comes back after a burst: glibc keeps the pages of freed allocations in its
//! heap (it returns only the top of the heap, and only past `M_TRIM_THRESHOLD`), so a worker
//! that held 1,000 conversations stays at its peak RSS long after they ended.
//! `malloc_trim(0)` hands every whole free page back to the kernel (`MADV_DONTNEED`).
//!
//! Owns the policy of when to trim ([`TrimAfterBurst`], fed by the heartbeat with the
//! worker's open connections each beat) and the call itself. Why glibc plus this rather than
//! another allocator: the measurements in `benches/README.md` ("Memory after a burst").

/// Connections a worker must have held for the fall afterwards to count as a burst.
const BURST: u64 = 64;
/// A burst is over when open connections fell to at most its peak divided by this.
const FALL: u64 = 8;

/// Decides, beat by beat, when a burst of connections is over.
#[derive(Debug, Default)]
pub struct TrimAfterBurst {
    /// The most connections open at once since the last trim.
    peak: u64,
}

impl TrimAfterBurst {
    /// Records `open` connections; `true` once they fell well below a burst's peak (then the
    /// next burst is measured from here).
    pub fn observe(&mut self, open: u64) -> bool {
        self.peak = self.peak.max(open);
        if self.peak >= BURST && open <= self.peak / FALL {
            self.peak = open;
            return true;
        }
        false
    }
}

/// Returns the allocator's free pages to the kernel; a no-op where the C library has no
/// `malloc_trim`. Takes a few milliseconds on a heap of a few hundred MB (it runs on the
/// event loop, once per burst).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists under its locks;
        // it is thread-safe and has no preconditions.
        let released = unsafe { libc::malloc_trim(0) };
        log::debug!(
            "malloc_trim after a burst (released memory: {})",
            released == 1
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_when_a_burst_has_passed() {
        let mut trim = TrimAfterBurst::default();
        // Small traffic never trims.
        assert!(![0, 5, 20, 3, 0].into_iter().any(|n| trim.observe(n)));
        // A burst to 1,000 trims when it has fallen to an eighth, and again when the rest
        // (still a burst's worth) has drained.
        let beats = [200, 1000, 900, 400, 126, 125, 40, 0, 0];
        let trims: Vec<bool> = beats.into_iter().map(|n| trim.observe(n)).collect();
        assert_eq!(
            trims,
            [false, false, false, false, false, true, false, true, false]
        );
        // The next burst is measured afresh.
        assert!(!trim.observe(100));
        assert!(trim.observe(10));
    }
}
