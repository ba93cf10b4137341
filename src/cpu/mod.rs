//! The CPU backend: rayon-parallel, SIMD kernels over (N, C, H, W) tensors.
//!
//! - training forward: [`forward::train`] — each channel's statistics, then its normalization,
//!   by the same task while the channel is still in cache;
//! - eval forward: [`forward::eval`] — one read of x, one write of y;
//! - backward: [`backward::through_batch_stats`] and [`backward::through_fixed_stats`];
//! - the per-block loops: [`kernels`]; the SIMD dispatch point: [`simd`].
//!
//! Work is cut into [`Part`]s. A part is a group of whole channels sized to fit in L2, walked
//! image by image so that small planes (7×7, 14×14) are read as contiguous runs; when there are
//! fewer channels than threads, a part is a slice of one channel, and the partial results of a
//! channel's slices are merged between the two passes.

pub(crate) mod backward;
pub(crate) mod forward;
pub(crate) mod kernels;
pub(crate) mod simd;

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::element::Element;
use crate::error::Result;
use crate::shape::{Shape, TensorRef};
use crate::threads;
use simd::{PartTask, SimdLevel};

/// Logical positions per block: small enough that a second pass over a block hits L1, and the
/// size of the gather buffer for strided inputs.
const BLOCK: usize = 2048;
/// Below this many elements a call runs on the calling thread: waking the pool would cost more.
const SEQUENTIAL_BELOW: usize = 1 << 16;
/// Bytes of input a part of whole channels may span, so its second pass still hits L2.
const PART_BYTES: usize = 512 << 10;
/// A slice of a channel given to one task is never smaller than this many values.
const MIN_SLICE: usize = 1 << 14;
/// Aim for this many parts per thread so uneven channel counts still balance.
const PARTS_PER_THREAD: usize = 4;

/// One task's share of the work: the same range of logical positions in a group of channels.
#[derive(Clone, Debug)]
pub(crate) struct Part {
    pub channels: Range<usize>,
    pub range: Range<usize>,
}

/// How a call's work is split, where it runs and which kernels it uses.
pub(crate) struct Plan {
    parts: Vec<Part>,
    channels: usize,
    whole_channels: bool,
    pool: Option<Arc<ThreadPool>>,
    level: SimdLevel,
}

impl Plan {
    /// A plan for tensors of `shape` where each logical position reads `bytes_per_value` bytes
    /// (one input for a forward, two for a backward).
    pub fn new(shape: Shape, bytes_per_value: usize, level: SimdLevel) -> Result<Plan> {
        let (c, per_channel) = (shape.c, shape.values_per_channel());
        if shape.numel() < SEQUENTIAL_BELOW {
            let parts = vec![Part { channels: 0..c, range: 0..per_channel }];
            return Ok(Plan { parts, channels: c, whole_channels: true, pool: None, level });
        }
        let pool = threads::pool()?;
        let wanted = PARTS_PER_THREAD * pool.current_num_threads();
        let fits_in_cache = (PART_BYTES / (per_channel * bytes_per_value).max(1)).max(1);
        let group = fits_in_cache.min(c.div_ceil(wanted)).max(1);
        let groups = c.div_ceil(group);
        let slices = if groups >= wanted { 1 } else { wanted.div_ceil(groups).min(per_channel / MIN_SLICE).max(1) };
        let parts = (0..groups)
            .flat_map(|g| {
                let channels = g * group..((g + 1) * group).min(c);
                (0..slices).map(move |s| Part {
                    channels: channels.clone(),
                    range: s * per_channel / slices..(s + 1) * per_channel / slices,
                })
            })
            .collect();
        Ok(Plan { parts, channels: c, whole_channels: slices == 1, pool: Some(pool), level })
    }

    /// Whether every part holds whole channels, so one task can make both passes over them.
    pub fn whole_channels(&self) -> bool {
        self.whole_channels
    }

    /// Runs `task` on every part, in parallel when the call is large enough; results in part order.
    pub fn run<K: PartTask>(&self, task: &K) -> Vec<K::Output> {
        let one = |part: &Part| simd::dispatch(self.level, task, part);
        match &self.pool {
            Some(pool) => pool.install(|| self.parts.par_iter().map(one).collect()),
            None => self.parts.iter().map(one).collect(),
        }
    }

    /// Folds each part's per-channel results into one result per channel.
    pub fn per_channel<R: Copy + Default>(&self, partials: Vec<Vec<R>>, combine: impl Fn(R, R) -> R) -> Vec<R> {
        let mut merged: Vec<Option<R>> = vec![None; self.channels];
        for (part, results) in self.parts.iter().zip(partials) {
            for (slot, result) in merged[part.channels.clone()].iter_mut().zip(results) {
                *slot = Some(slot.map_or(result, |acc| combine(acc, result)));
            }
        }
        merged.into_iter().map(Option::unwrap_or_default).collect()
    }
}

/// Calls `visit(c, pos, [values of each input])` for blocks covering the part: image by image,
/// and within an image channel by channel. No block crosses a run of any input, nor an image
/// plane, so the matching output block is contiguous too.
#[inline(always)]
pub(crate) fn for_each_block<T: Element, const K: usize>(
    inputs: [&TensorRef<'_, T>; K],
    part: &Part,
    mut visit: impl FnMut(usize, usize, [&[T]; K]),
) {
    let plane = inputs[0].shape().plane();
    let mut buffers = [[T::ZERO; BLOCK]; K];
    let mut start = part.range.start;
    while start < part.range.end {
        let end = part.range.end.min((start / plane + 1) * plane);
        for c in part.channels.clone() {
            let mut pos = start;
            while pos < end {
                let mut len = (end - pos).min(BLOCK);
                for tensor in &inputs {
                    len = len.min(tensor.run_remaining(pos));
                }
                let mut input = inputs.iter();
                let views = buffers.each_mut().map(
                    #[inline(always)]
                    |buffer| match input.next() {
                        Some(tensor) => tensor.read(c, pos, len, buffer),
                        None => &buffer[..0],
                    },
                );
                visit(c, pos, views);
                pos += len;
            }
        }
        start = end;
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
    #[inline(always)]
    pub unsafe fn block(&self, c: usize, pos: usize, len: usize) -> &mut [T] {
        let start = self.shape.contiguous_index(c, pos);
        assert!(start + len <= self.len, "block inside the output");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}
