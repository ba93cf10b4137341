//! The thread pool every CPU kernel runs on. It is the crate's own (not rayon's global pool) so
//! that `set_num_threads` can change its size at any time, as `torch.set_num_threads` can.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

static POOL: Mutex<Option<Arc<ThreadPool>>> = Mutex::new(None);

fn slot() -> MutexGuard<'static, Option<Arc<ThreadPool>>> {
    // The slot only ever holds a fully built pool, so a panic elsewhere cannot leave it torn.
    POOL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn build(threads: usize) -> Result<ThreadPool> {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("batchnorm-{i}"))
        .build()
        .map_err(|e| Error::Unsupported(format!("could not start {threads} worker threads: {e}")))
}

/// The pool kernels run on; created on first use with one thread per core.
pub(crate) fn pool() -> Result<Arc<ThreadPool>> {
    let mut slot = slot();
    if let Some(pool) = slot.as_ref() {
        return Ok(Arc::clone(pool));
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let pool = Arc::new(build(cores)?);
    *slot = Some(Arc::clone(&pool));
    Ok(pool)
}

/// Sets how many threads the CPU kernels use (every core by default). Calls already running
/// finish on the pool they started with.
pub fn set_num_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Err(Error::InvalidArgument("number of threads must be a positive integer, got 0".into()));
    }
    let pool = Arc::new(build(threads)?);
    *slot() = Some(pool);
    Ok(())
}

/// How many threads the CPU kernels use.
pub fn get_num_threads() -> usize {
    pool().map_or(1, |pool| pool.current_num_threads())
}
