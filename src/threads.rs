//! The threads CPU kernels run on: the calling thread plus a pool of `n − 1` workers. The pool is
//! the crate's own (not rayon's global one) so that `set_num_threads` can change it at any time,
//! as `torch.set_num_threads` can; the caller works too, so a call never waits idle for workers
//! to wake, and `n` threads never compete for `n` cores with a blocked caller.
//!
//! The pool is fork-safe: a child made by `fork()` (multiprocessing, data-loader workers) has
//! none of its parent's worker threads, so the pool remembers the process that built it and a
//! child builds its own on first use instead of waiting forever for workers that do not exist.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

struct Threads {
    count: usize,
    /// `count − 1` workers; `None` when the caller works alone.
    pool: Option<Arc<ThreadPool>>,
    /// The process whose threads these are.
    pid: u32,
}

/// The most threads [`set_num_threads`] accepts: 1024, or 64 per core on larger machines. More
/// would only exhaust the system's threads.
pub fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from).saturating_mul(64).max(1024)
}

static THREADS: Mutex<Option<Threads>> = Mutex::new(None);

fn slot() -> MutexGuard<'static, Option<Threads>> {
    // The slot only ever holds a fully built value, so a panic elsewhere cannot leave it torn.
    THREADS.lock().unwrap_or_else(PoisonError::into_inner)
}

fn build(count: usize) -> Result<Threads> {
    let pool = match count {
        1 => None,
        _ => Some(Arc::new(
            ThreadPoolBuilder::new()
                .num_threads(count - 1)
                .thread_name(|i| format!("batchnorm-{i}"))
                .build()
                .map_err(|e| Error::Unsupported(format!("could not start {} worker threads: {e}", count - 1)))?,
        )),
    };
    Ok(Threads { count, pool, pid: std::process::id() })
}

/// The worker pool (if more than one thread is in use) and the total thread count.
pub(crate) fn pool() -> Result<(Option<Arc<ThreadPool>>, usize)> {
    let mut slot = slot();
    let count = match slot.as_ref() {
        Some(threads) if threads.pid == std::process::id() => None,
        Some(inherited) => Some(inherited.count),
        None => Some(std::thread::available_parallelism().map_or(1, usize::from)),
    };
    if let Some(count) = count {
        // A pool inherited through fork() is never dropped: dropping it would signal worker
        // threads that exist only in the parent.
        if let Some(inherited) = slot.take() {
            std::mem::forget(inherited);
        }
        *slot = Some(build(count)?);
    }
    let threads = slot.as_ref().map_or((None, 1), |t| (t.pool.clone(), t.count));
    Ok(threads)
}

/// Sets how many threads the CPU kernels use, the caller included (every core by default).
/// Calls already running finish with the threads they started with.
pub fn set_num_threads(threads: usize) -> Result<()> {
    if threads == 0 || threads > max_threads() {
        return Err(Error::InvalidArgument(format!(
            "number of threads must be a positive integer, at most {}, got {threads}",
            max_threads()
        )));
    }
    let threads = build(threads)?;
    let mut slot = slot();
    if let Some(previous) = slot.replace(threads) {
        if previous.pid != std::process::id() {
            std::mem::forget(previous);
        }
    }
    Ok(())
}

/// How many threads the CPU kernels use.
pub fn get_num_threads() -> usize {
    pool().map_or(1, |(_, count)| count)
}
