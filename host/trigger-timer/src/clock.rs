//! Wall-clock time and precise waits for the timer trigger.
//!
//! tokio's timer wheel has 1 ms granularity and rounds up: its sleeps end
//! 0.8–2 ms late on this machine kind. Timers promise sub-millisecond jitter,
//! so [`Clock::System`] waits on one dedicated thread that parks until the
//! earliest deadline (the kernel's timer slack makes that ~0.1 ms late) and
//! then wakes the waiting task. [`Clock::Virtual`] follows tokio's clock
//! instead, so tests can pause and advance time.

use chrono::{DateTime, Utc};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The longest single wait: a long sleep is re-planned against the wall clock
/// at least this often, so clock steps (NTP) and suspends are noticed.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// The time source of the timer trigger.
#[derive(Debug, Clone)]
pub enum Clock {
    /// The system clock, with precise waits.
    System(Arc<PreciseTimer>),
    /// Wall time derived from tokio's (pausable) clock: `base` + elapsed tokio time.
    Virtual {
        /// Wall time at `base_instant`.
        base: DateTime<Utc>,
        /// The tokio instant that corresponds to `base`.
        base_instant: tokio::time::Instant,
    },
}

impl Clock {
    /// The system clock; starts the precise-wait thread.
    pub fn system() -> std::io::Result<Self> {
        Ok(Clock::System(Arc::new(PreciseTimer::start()?)))
    }

    /// A clock that reads `base` now and advances with tokio's clock.
    pub fn virtual_at(base: DateTime<Utc>) -> Self {
        Clock::Virtual {
            base,
            base_instant: tokio::time::Instant::now(),
        }
    }

    /// The current wall time.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System(_) => Utc::now(),
            Clock::Virtual { base, base_instant } => {
                *base
                    + chrono::Duration::from_std(base_instant.elapsed())
                        .unwrap_or(chrono::Duration::MAX)
            }
        }
    }

    /// Waits until the wall clock reads `t` (returns at once if it has passed).
    pub async fn sleep_until(&self, t: DateTime<Utc>) {
        loop {
            let now = self.now();
            let Ok(left) = (t - now).to_std() else { return };
            if left.is_zero() {
                return;
            }
            let wait = left.min(MAX_WAIT);
            match self {
                Clock::System(precise) => precise.sleep(wait).await,
                Clock::Virtual { .. } => tokio::time::sleep(wait).await,
            }
        }
    }
}

struct Waiter {
    deadline: Instant,
    seq: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

/// One thread that wakes waiters at their deadlines, ~0.1 ms late at most
/// on an idle machine. It exits when the last handle is dropped.
pub struct PreciseTimer {
    tx: Mutex<mpsc::Sender<(Instant, oneshot::Sender<()>)>>,
    thread: Thread,
}

impl std::fmt::Debug for PreciseTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreciseTimer").finish_non_exhaustive()
    }
}

impl PreciseTimer {
    fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(Instant, oneshot::Sender<()>)>();
        let handle = std::thread::Builder::new()
            .name("wasmgate-timer".into())
            .spawn(move || {
                let mut heap: BinaryHeap<Reverse<Waiter>> = BinaryHeap::new();
                let mut seq = 0u64;
                loop {
                    loop {
                        match rx.try_recv() {
                            Ok((deadline, wake)) => {
                                seq += 1;
                                heap.push(Reverse(Waiter {
                                    deadline,
                                    seq,
                                    wake,
                                }));
                            }
                            Err(mpsc::TryRecvError::Empty) => break,
                            Err(mpsc::TryRecvError::Disconnected) => return,
                        }
                    }
                    let now = Instant::now();
                    while heap.peek().is_some_and(|Reverse(w)| w.deadline <= now) {
                        let Reverse(w) = heap.pop().expect("peeked");
                        // The waiter may have gone away (cancelled): nothing to do.
                        let _ = w.wake.send(());
                    }
                    match heap.peek() {
                        Some(Reverse(w)) => std::thread::park_timeout(w.deadline - now),
                        None => std::thread::park_timeout(MAX_WAIT),
                    }
                }
            })?;
        Ok(Self {
            tx: Mutex::new(tx),
            thread: handle.thread().clone(),
        })
    }

    /// Sleeps for `d`, woken by the timer thread.
    pub async fn sleep(&self, d: Duration) {
        let (wake, woken) = oneshot::channel();
        let sent = self
            .tx
            .lock()
            .expect("timer channel lock poisoned")
            .send((Instant::now() + d, wake));
        if sent.is_err() {
            // The thread is gone (cannot happen while `self` lives); fall back.
            tokio::time::sleep(d).await;
            return;
        }
        self.thread.unpark();
        let _ = woken.await;
    }
}

impl Drop for PreciseTimer {
    fn drop(&mut self) {
        // Replace (and so drop) the only sender: the channel disconnects, and
        // the woken thread sees that and exits.
        if let Ok(mut tx) = self.tx.lock() {
            drop(std::mem::replace(&mut *tx, mpsc::channel().0));
        }
        self.thread.unpark();
    }
}
