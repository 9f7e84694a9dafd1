//! A fixed pool of threads for blocking store work, each thread owning one connection: the
//! embedded store's SQLite calls run here, off the event loop, on at most `threads` threads
//! and `threads` connections, whatever the number of concurrent requests. Calls beyond that
//! wait in a FIFO queue (tokio's own blocking pool would instead start one thread per waiting
//! call, up to 512).
//!
//! Owns the threads, the queue and the per-thread connection slot; knows nothing about SQL.
//! Threads start on demand (the first call starts one; another starts only when every
//! started thread is busy) and then live as long as the pool; dropping the pool waits for
//! them to finish what is queued and close their connections. A pool belongs to the process
//! that created it: after a fork the child has none of its threads, so [`Pool::run`] refuses
//! there instead of queueing work that nobody would run.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// A job: runs on a pool thread with that thread's connection slot (`None` until opened).
type Job<C> = Box<dyn FnOnce(&mut Option<C>) + Send>;

/// Why a call did not produce a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The call panicked on its thread (the thread survives; its connection is closed).
    #[error("a store thread panicked while running a call")]
    Panicked,
    /// The pool was created by another process (we are a forked copy).
    #[error("the store's threads belong to process {owner}, not to {this}")]
    ForeignProcess { owner: u32, this: u32 },
    /// The operating system refused to start the pool's first thread.
    #[error("cannot start a store thread: {0}")]
    Spawn(std::io::ErrorKind),
}

/// A fixed-size pool; cheap to share by reference.
pub struct Pool<C: Send + 'static> {
    inner: Arc<Inner<C>>,
    /// The process that created the pool and owns its threads.
    owner: u32,
    /// Upper bound on threads (and so on connections).
    threads: usize,
    /// Thread name prefix, so `top -H` and `/proc/PID/task` say what a thread is for.
    name: &'static str,
    /// The started threads, joined on drop: their connections are closed by then, so no
    /// thread is inside SQLite after the store is gone (a fork right after must not copy one).
    handles: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct Inner<C> {
    state: Mutex<State<C>>,
    /// Signalled when a job is queued or the pool shuts down.
    work: Condvar,
}

struct State<C> {
    queue: VecDeque<Job<C>>,
    /// Threads started so far.
    started: usize,
    /// Started threads waiting for work.
    idle: usize,
    /// Set when the pool is dropped: threads finish the queue and exit.
    shutdown: bool,
}

impl<C: Send + 'static> Pool<C> {
    /// A pool of at most `threads` (at least 1) threads named `name-N`; none started yet.
    pub fn new(name: &'static str, threads: usize) -> Pool<C> {
        Pool {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    started: 0,
                    idle: 0,
                    shutdown: false,
                }),
                work: Condvar::new(),
            }),
            owner: std::process::id(),
            threads: threads.max(1),
            name,
            handles: Mutex::new(Vec::new()),
        }
    }

    /// The most threads this pool runs.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on a pool thread with its connection slot and returns what it returns; waits
    /// in line while every thread is busy.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Option<C>) -> T + Send + 'static,
    {
        let this = std::process::id();
        if this != self.owner {
            return Err(PoolError::ForeignProcess {
                owner: self.owner,
                this,
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |slot: &mut Option<C>| {
            match catch_unwind(AssertUnwindSafe(|| f(slot))) {
                Ok(value) => {
                    let _ = tx.send(value); // the caller may have gone away; nothing to do
                }
                Err(_) => {
                    // The connection may be mid-statement: close it, the next call opens anew.
                    *slot = None;
                }
            }
        }))?;
        rx.await.map_err(|_| PoolError::Panicked)
    }

    fn submit(&self, job: Job<C>) -> Result<(), PoolError> {
        let mut state = self.lock();
        state.queue.push_back(job);
        if state.idle == 0 && state.started < self.threads {
            let index = state.started;
            match self.spawn(index) {
                Ok(()) => state.started += 1,
                // With a thread running already the job still runs; with none it never would.
                Err(e) if state.started == 0 => {
                    state.queue.pop_back();
                    return Err(PoolError::Spawn(e.kind()));
                }
                Err(e) => log::warn!("cannot start store thread {}: {e}", index + 1),
            }
        }
        drop(state);
        self.inner.work.notify_one();
        Ok(())
    }

    fn spawn(&self, index: usize) -> std::io::Result<()> {
        let inner = Arc::clone(&self.inner);
        let handle = std::thread::Builder::new()
            .name(format!("{}-{}", self.name, index + 1))
            .spawn(move || work(&inner))?;
        self.handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A pool thread: take jobs in order until shut down and the queue is empty.
fn work<C>(inner: &Inner<C>) {
    let mut slot: Option<C> = None;
    loop {
        let job = {
            let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(job) = state.queue.pop_front() {
                    break job;
                }
                if state.shutdown {
                    return;
                }
                state.idle += 1;
                state = inner
                    .work
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.idle -= 1;
            }
        };
        job(&mut slot);
    }
}

impl<C: Send + 'static> Drop for Pool<C> {
    fn drop(&mut self) {
        if std::process::id() != self.owner {
            // A forked copy: the threads (and the lock's holder, if any) are not here. Touch
            // nothing; the copy's memory goes with the process.
            return;
        }
        self.lock().shutdown = true;
        self.inner.work.notify_all();
        // Calls still queued (their callers gone) run first; each is one short statement.
        let handles = std::mem::take(
            self.handles
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for handle in handles {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// 64 concurrent calls that each block for a while run on exactly 2 threads, 2 at a time,
    /// each thread keeping its own connection.
    #[test]
    fn many_concurrent_calls_run_on_the_fixed_threads_and_queue() {
        let pool: Pool<usize> = Pool::new("test-store", 2);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let opened = Arc::new(AtomicUsize::new(0));
        let results = runtime().block_on(async {
            let calls = (0..64).map(|i| {
                let (running, most, opened) = (running.clone(), most.clone(), opened.clone());
                pool.run(move |slot: &mut Option<usize>| {
                    let conn = *slot.get_or_insert_with(|| opened.fetch_add(1, Ordering::SeqCst));
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                    running.fetch_sub(1, Ordering::SeqCst);
                    (i, conn, std::thread::current().name().map(str::to_string))
                })
            });
            futures_util::future::join_all(calls).await
        });
        let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
        let order: Vec<usize> = results.iter().map(|r| r.0).collect();
        assert_eq!(order, (0..64).collect::<Vec<_>>());
        let threads: HashSet<_> = results.iter().map(|r| r.2.clone().unwrap()).collect();
        assert!(threads.len() <= 2, "{threads:?}");
        assert!(threads.iter().all(|t| t.starts_with("test-store-")));
        assert!(most.load(Ordering::SeqCst) <= 2);
        let connections: HashSet<_> = results.iter().map(|r| r.1).collect();
        assert_eq!(
            connections.len(),
            threads.len(),
            "one connection per thread"
        );
        assert_eq!(opened.load(Ordering::SeqCst), threads.len());
    }

    #[test]
    fn a_panicking_call_is_an_error_and_the_thread_goes_on_with_a_fresh_connection() {
        let pool: Pool<u32> = Pool::new("test-store", 1);
        let rt = runtime();
        rt.block_on(pool.run(|slot: &mut Option<u32>| *slot = Some(7)))
            .unwrap();
        let panicked = rt.block_on(pool.run(|_: &mut Option<u32>| -> u32 { panic!("boom") }));
        assert_eq!(panicked, Err(PoolError::Panicked));
        let after = rt.block_on(pool.run(|slot: &mut Option<u32>| *slot));
        assert_eq!(
            after,
            Ok(None),
            "the connection of a panicked call is closed"
        );
    }

    #[test]
    fn a_call_whose_caller_went_away_still_leaves_the_pool_usable() {
        let pool: Pool<u32> = Pool::new("test-store", 1);
        let rt = runtime();
        rt.block_on(async {
            let slow =
                pool.run(|_: &mut Option<u32>| std::thread::sleep(Duration::from_millis(20)));
            // Dropped before it finishes: its result has nowhere to go.
            let _ = tokio::time::timeout(Duration::from_millis(1), slow).await;
            assert_eq!(pool.run(|_: &mut Option<u32>| 5).await, Ok(5));
        });
    }
}
