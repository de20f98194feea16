//! Connection workers: one thread per core, each running its own
//! single-threaded tokio runtime, and every session placed on one of them
//! for its whole life.
//!
//! Why not the daemon's multi-threaded runtime: a session is several tasks
//! (hyper's connection and its upstream connection's driver, russh's
//! session loop, the relay) that hand each other buffers. On a runtime
//! that moves tasks between threads, one thread frees what another
//! allocated, and glibc takes the owning arena's lock for every such free;
//! each hand-off may also wake a parked thread. Measured on the HTTP bench,
//! a request cost about 90 µs of CPU on two work-stealing workers and about
//! 60 µs on one thread (docs/performance.md, "Seventh round"). Pinning a
//! session's tasks to one thread keeps its allocations and wake-ups local;
//! sessions are spread over the workers in turn, as nginx and Envoy spread
//! connections over their workers.
//!
//! Owns the worker threads, their runtimes and the hand-off of new
//! sessions to them. It must not know what a session is: callers hand it
//! a job that spawns the session's task on the worker it runs on. The
//! daemon's control plane (admin socket, reloads, fleet, console) stays on
//! the daemon's own runtime.

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// New sessions waiting for one worker; when it is full the accepting loop
/// waits (and the kernel's accept queue holds the rest).
const QUEUE: usize = 1024;

/// How long a worker's runtime may take to drop its sessions at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What a worker runs: called on the worker's thread, inside its runtime,
/// so `tokio::spawn` and `TcpStream::from_std` there belong to it.
pub type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Which worker the calling thread is, `None` off the workers. Per-worker
/// caches (the HTTP upstream pool) key by it so a session only meets
/// connections whose tasks live on its own thread.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// The worker threads.
pub struct Workers {
    queues: Vec<mpsc::Sender<Job>>,
    next: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.queues.len())
            .finish()
    }
}

impl Workers {
    /// Starts `count` workers (at least one), threads named `<name>-<i>`
    /// (keep `name` short: Linux cuts thread names at 15 bytes).
    pub fn start(count: usize, name: &str) -> std::io::Result<Self> {
        let count = count.max(1);
        let mut workers = Self {
            queues: Vec::with_capacity(count),
            next: AtomicUsize::new(0),
            threads: Mutex::new(Vec::with_capacity(count)),
            stop: CancellationToken::new(),
        };
        for i in 0..count {
            match workers.start_one(i, name) {
                Ok((queue, thread)) => {
                    workers.queues.push(queue);
                    workers
                        .threads
                        .get_mut()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(thread);
                }
                Err(e) => {
                    workers.stop();
                    return Err(e);
                }
            }
        }
        Ok(workers)
    }

    fn start_one(
        &self,
        i: usize,
        name: &str,
    ) -> std::io::Result<(mpsc::Sender<Job>, JoinHandle<()>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(format!("{name}-{i}-blocking"))
            .build()?;
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let stopped = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                INDEX.with(|c| c.set(Some(i)));
                runtime.block_on(async move {
                    loop {
                        tokio::select! {
                            _ = stopped.cancelled() => break,
                            job = rx.recv() => match job {
                                Some(job) => job(),
                                None => break,
                            },
                        }
                    }
                });
                // The sessions still on this worker are dropped here, as
                // the daemon's runtime drops its tasks on exit.
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
            })?;
        Ok((tx, thread))
    }

    /// The number of workers.
    pub fn len(&self) -> usize {
        self.queues.len()
    }

    /// Whether there are no workers (never: [`Workers::start`] makes one at
    /// least).
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Runs `job` on the next worker in turn; a worker whose queue is full
    /// is skipped for one that has room, and when every queue is full this
    /// waits for the first to make room (so one stuck worker never holds
    /// up the accepting loop while another drains). A worker that has
    /// stopped (only at shutdown) is skipped too; when none takes the job,
    /// it runs on the caller's thread.
    pub async fn submit(&self, job: Job) {
        let n = self.queues.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut job = job;
        for k in 0..n {
            match self.queues[(first + k) % n].try_send(job) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(back))
                | Err(mpsc::error::TrySendError::Closed(back)) => job = back,
            }
        }
        let mut open: Vec<_> = self
            .queues
            .iter()
            .filter(|q| !q.is_closed())
            .map(|q| Box::pin(q.reserve()))
            .collect();
        while !open.is_empty() {
            let (permit, _, rest) = futures_util::future::select_all(open).await;
            match permit {
                Ok(permit) => {
                    permit.send(job);
                    return;
                }
                // That worker stopped; wait for the others.
                Err(_) => open = rest,
            }
        }
        warn!("no connection worker running; the session runs on the daemon's runtime");
        job();
    }

    /// Stops the workers: each drops the sessions it still runs and its
    /// thread ends; later jobs run on the caller's thread. Waits for the
    /// threads (blocking: call it off the async threads, or last).
    pub fn stop(&self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc as std_mpsc, Arc};

    #[tokio::test]
    async fn jobs_go_round_robin_and_run_inside_their_workers_runtime() {
        let workers = Workers::start(2, "test-worker").unwrap();
        let (tx, rx) = std_mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            workers
                .submit(Box::new(move || {
                    let me = current();
                    // A task spawned by the job runs on the same worker.
                    tokio::spawn(async move {
                        tokio::task::yield_now().await;
                        let _ = tx.send((me, current()));
                    });
                }))
                .await;
        }
        let mut seen: Vec<_> = (0..4)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (Some(0), Some(0)),
                (Some(0), Some(0)),
                (Some(1), Some(1)),
                (Some(1), Some(1))
            ]
        );
        assert_eq!(current(), None);
        tokio::task::spawn_blocking(move || workers.stop())
            .await
            .unwrap();
    }

    /// A worker that is stuck (here: blocked outright) does not stall the
    /// accepting loop once its queue is full: new sessions go to the
    /// others.
    #[tokio::test]
    async fn a_full_queue_is_skipped_for_a_worker_with_room() {
        let workers = Workers::start(2, "test-worker").unwrap();
        let (release, blocked) = std_mpsc::channel::<()>();
        workers
            .submit(Box::new(move || {
                let _ = blocked.recv();
            }))
            .await;
        let (tx, rx) = std_mpsc::channel();
        let jobs = 3 * QUEUE;
        let submitted = tokio::time::timeout(Duration::from_secs(20), async {
            for _ in 0..jobs {
                let tx = tx.clone();
                workers
                    .submit(Box::new(move || {
                        let _ = tx.send(current());
                    }))
                    .await;
            }
        })
        .await;
        assert!(submitted.is_ok(), "submitting waited on the stuck worker");
        let on_free = (0..jobs - QUEUE)
            .filter(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap() == Some(1))
            .count();
        assert_eq!(on_free, jobs - QUEUE);
        let _ = release.send(());
        tokio::task::spawn_blocking(move || workers.stop())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn stopping_drops_the_sessions_still_running() {
        struct Dropped(std_mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let workers = Workers::start(1, "test-worker").unwrap();
        let (tx, rx) = std_mpsc::channel();
        let started = Arc::new(tokio::sync::Notify::new());
        let s = started.clone();
        workers
            .submit(Box::new(move || {
                tokio::spawn(async move {
                    let _guard = Dropped(tx);
                    s.notify_one();
                    std::future::pending::<()>().await;
                });
            }))
            .await;
        started.notified().await;
        tokio::task::spawn_blocking(move || workers.stop())
            .await
            .unwrap();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the pending session was dropped at stop");
    }
}
