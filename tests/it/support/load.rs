//! A bounded load generator: threads sending a request (`GET /health` over TCP by default, or
//! any probe: a unix socket, another network namespace) on fresh connections until stopped (or
//! until their hard time limit), counting successes and failures.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http;

/// No load run outlives this, whatever the test does.
const HARD_LIMIT: Duration = Duration::from_secs(180);

pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    /// Successes of each probe, in the order given (to show that every path was served).
    ok_by_probe: Vec<Arc<AtomicU64>>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    /// Successes of each probe, in the order given to [`Load::start_with`].
    pub ok_by_probe: Vec<u64>,
}

/// One request of the load: what a thread sends each turn (its own connection and transport).
pub type Probe = Box<dyn FnMut() -> std::io::Result<http::Response> + Send>;

impl Load {
    /// `threads` threads sending `GET /health` to the TCP address `addr`.
    pub fn start(addr: &str, threads: usize) -> Load {
        let probes = (0..threads)
            .map(|_| {
                let addr = addr.to_string();
                Box::new(move || http::get(&addr, "/health")) as Probe
            })
            .collect();
        Load::start_with(probes)
    }

    /// One thread per probe, each sending its request until stopped; a 200 counts as success.
    pub fn start_with(probes: Vec<Probe>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut ok_by_probe = Vec::new();
        let handles = probes
            .into_iter()
            .map(|mut probe| {
                let (stop, ok, failed, errors) =
                    (stop.clone(), ok.clone(), failed.clone(), errors.clone());
                let mine = Arc::new(AtomicU64::new(0));
                ok_by_probe.push(mine.clone());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < HARD_LIMIT {
                        match probe() {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                mine.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors
                                    .lock()
                                    .unwrap()
                                    .push(format!("status {}: {}", r.status, r.body));
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.lock().unwrap().push(e.to_string());
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            errors,
            ok_by_probe,
            threads: handles,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests succeed (proof the service answers right now).
    pub fn wait_for_progress(&self, n: u64, within: Duration) -> bool {
        let target = self.ok() + n;
        super::wait_until(within, || self.ok() >= target)
    }

    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        LoadReport {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            errors: self.errors.lock().unwrap().clone(),
            ok_by_probe: self
                .ok_by_probe
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect(),
        }
    }
}
