//! The CPU backend: rayon-parallel kernels over (N, C, H, W) tensors.
//!
//! - training forward: [`forward::train`] — each channel's statistics, then its normalization,
//!   by the same task while the channel is still in cache;
//! - eval forward: [`forward::eval`] — one read of x, one write of y;
//! - backward: [`backward::through_batch_stats`] and [`backward::through_fixed_stats`].
//!
//! Work is cut into [`Part`]s: whole channels when there are enough of them to keep every thread
//! busy, otherwise slices of a channel whose partial sums are merged before the second pass.

pub(crate) mod backward;
pub(crate) mod forward;
pub(crate) mod kernels;

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::element::Element;
use crate::error::Result;
use crate::shape::{Shape, TensorRef};
use crate::threads;

/// Logical positions per block: small enough that a second pass over a block hits L1, and the
/// size of the gather buffer for strided inputs.
const BLOCK: usize = 2048;
/// Below this many elements a call runs on the calling thread: dispatch would cost more.
const SEQUENTIAL_BELOW: usize = 1 << 15;
/// A slice of a channel given to one task is never smaller than this.
const MIN_PART: usize = 1 << 14;
/// Aim for this many parts per thread so uneven channel counts still balance.
const PARTS_PER_THREAD: usize = 4;

/// One task's share of the work: a range of logical positions of one channel.
#[derive(Clone, Debug)]
pub(crate) struct Part {
    pub channel: usize,
    pub range: Range<usize>,
}

/// How a call's work is split and where it runs.
pub(crate) struct Plan {
    parts: Vec<Part>,
    parts_per_channel: usize,
    pool: Option<Arc<ThreadPool>>,
}

impl Plan {
    pub fn new(shape: Shape) -> Result<Plan> {
        let per_channel = shape.values_per_channel();
        let (pool, parts_per_channel) = if shape.numel() < SEQUENTIAL_BELOW {
            (None, 1)
        } else {
            let pool = threads::pool()?;
            let wanted = PARTS_PER_THREAD * pool.current_num_threads();
            let split = if shape.c >= wanted { 1 } else { wanted.div_ceil(shape.c) };
            (Some(pool), split.min(per_channel / MIN_PART).max(1))
        };
        let parts = (0..shape.c)
            .flat_map(|channel| {
                (0..parts_per_channel).map(move |i| Part {
                    channel,
                    range: i * per_channel / parts_per_channel..(i + 1) * per_channel / parts_per_channel,
                })
            })
            .collect();
        Ok(Plan { parts, parts_per_channel, pool })
    }

    /// Whether every part is a whole channel, so one task can make both passes over it.
    pub fn whole_channels(&self) -> bool {
        self.parts_per_channel == 1
    }

    /// Runs `task` on every part, in parallel when the call is large enough; results in part order.
    pub fn map<R: Send>(&self, task: impl Fn(&Part) -> R + Sync + Send) -> Vec<R> {
        match &self.pool {
            Some(pool) => pool.install(|| self.parts.par_iter().map(&task).collect()),
            None => self.parts.iter().map(task).collect(),
        }
    }

    /// Folds per-part results into per-channel results.
    pub fn merge<R: Copy>(&self, partials: Vec<R>, combine: impl Fn(R, R) -> R) -> Vec<R> {
        partials.chunks(self.parts_per_channel).filter_map(|chunk| chunk.iter().copied().reduce(&combine)).collect()
    }
}

/// Calls `visit(pos, [values of each input])` for consecutive blocks covering `range` of channel
/// `c`. No block crosses a run of any input, nor an image plane, so the matching output block is
/// contiguous too.
#[inline]
pub(crate) fn for_each_block<T: Element, const K: usize>(
    inputs: [&TensorRef<'_, T>; K],
    c: usize,
    range: Range<usize>,
    mut visit: impl FnMut(usize, [&[T]; K]),
) {
    let mut buffers = [[T::default(); BLOCK]; K];
    let mut pos = range.start;
    while pos < range.end {
        let len = inputs.iter().fold((range.end - pos).min(BLOCK), |len, t| len.min(t.run_remaining(pos)));
        let mut input = inputs.iter();
        let views = buffers.each_mut().map(|buffer| match input.next() {
            Some(tensor) => tensor.read(c, pos, len, buffer),
            None => &buffer[..0],
        });
        visit(pos, views);
        pos += len;
    }
}

/// A C-contiguous output that parallel tasks write through, each to its own positions.
pub(crate) struct SharedOut<'a, T> {
    ptr: *mut T,
    len: usize,
    shape: Shape,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: tasks only write disjoint blocks (see `block`), and T is Send.
unsafe impl<T: Send> Send for SharedOut<'_, T> {}
unsafe impl<T: Send> Sync for SharedOut<'_, T> {}

impl<'a, T> SharedOut<'a, T> {
    pub fn new(out: &'a mut [T], shape: Shape) -> Self {
        assert_eq!(out.len(), shape.numel(), "output length checked by the caller");
        SharedOut { ptr: out.as_mut_ptr(), len: out.len(), shape, _borrow: PhantomData }
    }

    /// The output block for logical positions `pos..pos + len` of channel `c`.
    ///
    /// # Safety
    /// No two live blocks may overlap: each (channel, position) must be written by one task.
    /// Parts of a [`Plan`] are disjoint, and blocks within a part are visited one at a time.
    #[allow(clippy::mut_from_ref)]
    #[inline]
    pub unsafe fn block(&self, c: usize, pos: usize, len: usize) -> &mut [T] {
        let start = self.shape.contiguous_index(c, pos);
        assert!(start + len <= self.len, "block inside the output");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}
