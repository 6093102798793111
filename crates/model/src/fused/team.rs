//! A product split between the cores by helper threads that wait spinning, not asleep: what a
//! decoding step's few-rows products need from a thread pool.
//!
//! Written by hand because rayon's idle worker goes to sleep within microseconds, and a
//! decoding step keeps it idle that long between products: a batch-1 step of `small` is 57
//! products of 1-4 MiB of weights, 50-200 µs apiece from memory, with a little one-thread work
//! (a norm, the rotary embedding, attention over one query) between some of them. Waking the
//! worker again (a futex, and on a VM an interrupt to a halted virtual CPU) then costs more than
//! the product's second half saves. Measured on a 2-core Xeon VM, inside rayon's pool as `kiln`
//! runs:
//! - `examples/stream_pieces.rs` (118 MB streamed in 57 two-thread pieces, 100 µs of one-thread
//!   work after each): rayon's `join` 9.4-11.3 GB/s, this 16.7-21.9; with no gaps, 19.8 and 22.7.
//! - `examples/rayon_overhead.rs` (two 10 µs tasks a call, 100 µs between calls): rayon 37-39 µs
//!   a call, this 12-15.
//! - `small`'s 57 products of a token alone (`examples/decode_products.rs`): 9.8-11.3 ms with
//!   rayon, 6.5-6.6 ms (18 GB/s, the machine's streaming bandwidth) with this.
//!
//! So [`for_each`] publishes a job of numbered pieces; helper threads that have seen a job in
//! the last [`SPIN`] are still spinning and claim pieces at once (an atomic counter), and the
//! calling thread claims pieces too, so a job finishes even when no helper comes (a busy
//! machine, a helper preempted): which thread runs a piece never changes what it computes. Past
//! [`SPIN`] without work a helper parks and costs nothing; the first product after that wakes it.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper keeps spinning after its last job before it parks. Long enough to span a
/// decoding step's gaps between products and between tokens (sampling, detokenizing), short
/// enough that a helper left spinning after generation ends costs nothing anyone would notice.
/// After the first few microseconds a spinning helper yields its core to any other runnable
/// thread between checks (rayon's workers during batched attention, for instance).
pub const SPIN: Duration = Duration::from_millis(5);

/// Spins (checks of the job counter) before a waiting thread starts yielding between them.
const PURE_SPINS: u32 = 2_000;

/// One published job: `n` pieces of `f`, claimed in order.
struct Job {
    /// The caller's closure, its lifetime erased: it lives until every piece is done, which the
    /// caller waits for before returning.
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `f` is `Sync` and outlives every use (see `Job::work`).
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs pieces until none is left. A piece that panics still counts as done (its
    /// panic is kept for the caller), so the caller's wait always ends.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: piece i < n was claimed before `done` reached n, and the caller keeps `f`
            // alive until `done` reaches n.
            let f = unsafe { &*self.f };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                self.panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(p);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Team {
    /// Bumped for each published job (helpers spin on it).
    generation: AtomicU64,
    /// The job of the current generation.
    slot: Mutex<Option<Arc<Job>>>,
    /// Helpers parked, or about to park.
    sleepers: AtomicUsize,
    /// The helpers' handles, for unparking.
    helpers: Mutex<Vec<Thread>>,
    /// Held by the thread whose job is published: one job at a time.
    caller: Mutex<()>,
}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| Team {
        generation: AtomicU64::new(0),
        slot: Mutex::new(None),
        sleepers: AtomicUsize::new(0),
        helpers: Mutex::new(Vec::new()),
        caller: Mutex::new(()),
    })
}

/// Waits while `busy()` holds: spinning, then spinning and yielding between checks.
fn wait_while(mut busy: impl FnMut() -> bool) {
    let mut spins = 0u32;
    while busy() {
        if spins < PURE_SPINS {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// A helper's life: spin on the generation for up to [`SPIN`], work on each new job, park when
/// none came. `seen` is the generation before the job that started it: a new thread begins
/// running after its caller has published that job, and reading the generation itself it would
/// take the job for one already seen and leave it to the caller.
fn helper(team: &'static Team, mut seen: u64) {
    loop {
        let idle = Instant::now();
        let mut spins = 0u32;
        while team.generation.load(Ordering::Acquire) == seen {
            spins = spins.wrapping_add(1);
            if spins < PURE_SPINS {
                std::hint::spin_loop();
                continue;
            }
            if idle.elapsed() < SPIN {
                std::thread::yield_now();
                continue;
            }
            // Park. A caller bumps the generation, then unparks if it sees a sleeper; this
            // helper counts itself a sleeper, then checks the generation: one of the two sees
            // the other (both sequentially consistent), so no job goes unnoticed.
            team.sleepers.fetch_add(1, Ordering::SeqCst);
            if team.generation.load(Ordering::SeqCst) == seen {
                std::thread::park();
            }
            team.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        seen = team.generation.load(Ordering::Acquire);
        let job = team.slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

/// Starts helpers until there are `want` of them (called before the caller's job is published).
fn ensure_helpers(team: &'static Team, want: usize) {
    let mut helpers = team.helpers.lock().unwrap_or_else(|e| e.into_inner());
    while helpers.len() < want {
        let seen = team.generation.load(Ordering::Acquire);
        let spawned = std::thread::Builder::new()
            .name(format!("kiln-team-{}", helpers.len()))
            .spawn(move || helper(team, seen));
        match spawned {
            Ok(h) => helpers.push(h.thread().clone()),
            Err(_) => break, // no thread to spare: the callers run their pieces themselves
        }
    }
}

/// The cores this process may use, read once: `available_parallelism` reads the cgroup's quota
/// files at every call (10-20 µs, as long as a small product).
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |c| c.get()))
}

/// Runs `f(0)`, ..., `f(n - 1)`, each exactly once, on the calling thread and on up to
/// `threads - 1` helpers; returns when all are done. A panic in a piece is raised here, after
/// every piece has finished. Where another thread's job is running, the pieces go to rayon
/// instead. `f` must not call `for_each` itself.
pub fn for_each(n: usize, threads: usize, f: &(dyn Fn(usize) + Sync)) {
    let helpers = threads.min(cores()).min(n).saturating_sub(1);
    if helpers == 0 {
        (0..n).for_each(f);
        return;
    }
    let team = team();
    // (A job whose piece panicked poisons the lock as its panic leaves: nothing it guards broke.)
    let _caller = match team.caller.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            use rayon::prelude::*;
            (0..n).into_par_iter().for_each(f);
            return;
        }
    };
    ensure_helpers(team, helpers);
    // SAFETY (of the erased lifetime): this function returns only once `done` reaches n, after
    // which no thread calls `f` again (every later claim finds the counter at n or past it).
    let f: *const (dyn Fn(usize) + Sync + '_) = f;
    let job = Arc::new(Job {
        f: unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(
                f,
            )
        },
        n,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panic: Mutex::new(None),
    });
    *team.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.clone());
    team.generation.fetch_add(1, Ordering::SeqCst);
    if team.sleepers.load(Ordering::SeqCst) > 0 {
        for h in team
            .helpers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            h.unpark();
        }
    }
    job.work();
    wait_while(|| job.done.load(Ordering::Acquire) < n);
    // Drop the slot's reference, so a late helper finds nothing to claim.
    *team.slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let panic = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = panic {
        resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// These tests one at a time: the helpers test must find the team free.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a job of `n` pieces on `threads` and returns how often each piece ran.
    fn counts(n: usize, threads: usize) -> Vec<u32> {
        let runs: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
        for_each(n, threads, &|i| {
            runs[i].fetch_add(1, Ordering::Relaxed);
        });
        runs.into_iter().map(|c| c.into_inner()).collect()
    }

    #[test]
    fn every_piece_runs_exactly_once_from_concurrent_callers() {
        let _serial = serial();
        // Four callers at once: one holds the team, the others fall back to rayon; each job
        // must still run each piece once.
        std::thread::scope(|s| {
            for caller in 0..4 {
                s.spawn(move || {
                    for round in 0..200 {
                        let n = 1 + (caller * 7 + round) % 13;
                        assert_eq!(counts(n, 1 + round % 3), vec![1; n], "{n} pieces");
                    }
                });
            }
        });
        assert_eq!(counts(0, 2), Vec::<u32>::new());
    }

    #[test]
    fn helpers_take_pieces_and_wake_after_parking() {
        let _serial = serial();
        if cores() < 2 {
            return; // one core: no helper, which `every_piece_runs...` covers
        }
        let ran_elsewhere = |round: usize| {
            let others = AtomicU32::new(0);
            // The caller's pieces wait for a helper to take one, up to a deadline: on a loaded
            // machine (other tests beside this one) a spinning or woken helper may be scheduled
            // late, and pieces of a fixed length let the caller claim them all first. A
            // helper that never comes (one that is not woken) still fails.
            let deadline = Instant::now() + Duration::from_secs(10);
            for_each(8, 2, &|_| {
                let name = std::thread::current().name().map(str::to_owned);
                if name.is_some_and(|n| n.starts_with("kiln-team-")) {
                    others.fetch_add(1, Ordering::Relaxed);
                } else {
                    while others.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            });
            assert!(
                others.into_inner() > 0,
                "round {round}: no helper took a piece"
            );
        };
        ran_elsewhere(0);
        // Long enough without work that the helper parked: the next job must wake it.
        std::thread::sleep(SPIN * 4);
        ran_elsewhere(1);
        // These tests want at most 3 threads: never more helpers than that allows, whatever the
        // machine's core count.
        let most = 3.min(cores()) - 1;
        assert!(
            team().helpers.lock().unwrap().len() <= most,
            "at most {most} helpers for 3 threads on {} cores",
            cores()
        );
    }

    #[test]
    fn a_panicking_piece_is_raised_after_every_piece_finished() {
        let _serial = serial();
        let runs: Vec<AtomicU32> = (0..8).map(|_| AtomicU32::new(0)).collect();
        let caught = catch_unwind(AssertUnwindSafe(|| {
            for_each(8, 2, &|i| {
                std::thread::sleep(Duration::from_millis(1));
                runs[i].fetch_add(1, Ordering::Relaxed);
                assert!(i != 3, "piece 3 fails");
            })
        }));
        let payload = caught.expect_err("the panic reaches the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"piece 3 fails"));
        assert!(runs.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        // The team still works afterwards.
        assert_eq!(counts(5, 2), vec![1; 5]);
    }
}
