//! The CPU backend: rayon-parallel, SIMD kernels over (N, C, H, W) tensors.
//!
//! - training forward: [`forward::train`] — each channel's statistics, then its normalization,
//!   by the same task while the channel is still in cache;
//! - eval forward: [`forward::eval`] — one read of x, one write of y;
//! - backward: [`backward::through_batch_stats`] and [`backward::through_fixed_stats`];
//! - the per-block loops: [`kernels`]; the SIMD dispatch point: [`simd`].
//!
//! Results depend on the values, the shape and the SIMD level alone, never on the thread count,
//! the work split or the addresses of the arrays. Two rules give that. Every per-channel sum runs
//! over fixed [`Pieces`] of the channel, cut from the shape alone, each summed from a fresh
//! accumulator and merged in piece order; a part of the work is a range of whole pieces, so how
//! many parts there are changes who sums a piece, not how. And every element-wise result is one
//! vector expression, also for the values before and after the whole vectors of a block, so
//! where a block starts never changes a value's arithmetic. The price: on small planes, where a
//! piece holds whole images of at least 2048 values, a channel's sums split at most into its
//! pieces (7 for 256×512×7×7), whatever the thread count.
//!
//! Work is cut into [`Part`]s, which the calling thread and the pool's workers take in turn (see
//! [`Plan`]). Two-pass work (training forward and its backward) takes groups of whole channels,
//! walked image by image in contiguous runs of up to [`RUN_BYTES`], and makes both passes over a
//! group while it is still in cache. When there are too few channels to keep every thread busy, a
//! part is a slice of a channel and the slices' partial results are merged between the passes.
//! One-pass work (eval), and two-pass work on tiny planes ([`IMAGE_MAJOR_BELOW_BYTES`]), streams
//! through contiguous image-major stretches. Calls under [`SEQUENTIAL_BELOW_BYTES`] run on the
//! caller.

pub(crate) mod backward;
pub(crate) mod forward;
pub(crate) mod kernels;
pub(crate) mod simd;

use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock};

use rayon::ThreadPool;

use crate::convert::{self, Half};
use crate::element::Element;
use crate::error::Result;
use crate::shape::{Layout, Shape, Target, TensorMut, TensorRef};
use crate::threads;
use simd::{PartTask, SimdLevel};

/// Logical positions per block: small enough that a second pass over a block hits L1, and the
/// size of the gather buffer for strided inputs.
const BLOCK: usize = 2048;
/// Below this many bytes of input a call runs on the calling thread: waking a worker costs tens
/// of microseconds, more than a second thread saves on less ([`Tuning::sequential_below_bytes`]).
const SEQUENTIAL_BELOW_BYTES: usize = 2 << 20;
/// A two-pass part groups enough channels that each image contributes a contiguous run of at
/// least this many bytes (long enough for the hardware prefetchers), while the group stays small
/// enough that the second pass finds it in cache.
const RUN_BYTES: usize = 64 << 10;
/// Two-pass work on planes smaller than this streams image-major too (statistics over contiguous
/// stretches, merged, then a second streaming pass): for 7×7 or 14×14 planes that beats channel
/// groups, whose runs are capped by the number of parts.
const IMAGE_MAJOR_BELOW_BYTES: usize = 4 << 10;
/// A part is never smaller than this many values.
const MIN_PART_VALUES: usize = 1 << 14;
/// Aim for this many parts per thread so uneven work still balances.
const PARTS_PER_THREAD: usize = 4;
/// Planes larger than this many values are cut into pieces within the image; smaller ones go
/// into pieces of whole images.
const SPLIT_PLANES_ABOVE: usize = 1 << 14;
/// Pieces of whole images hold at least this many values where the channel has them: one
/// accumulator window ([`kernels`]), so cutting a channel into pieces adds no flushes.
const PIECE_MIN_VALUES: usize = 2048;
/// A channel has at most about this many pieces of whole images: enough for every thread of a
/// large machine to take one in an image-major plan.
const MAX_IMAGE_PIECES: usize = 64;

/// How every channel's logical positions are cut, from the shape alone: into pieces of `images`
/// whole images each (the last may hold fewer), or each image into `per_image` near-equal
/// pieces. Sums run piece by piece, so this grid, not the thread count, decides how a channel's
/// sums are grouped. Pieces of whole images keep image-major parts contiguous in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pieces {
    images: usize,
    per_image: usize,
    count: usize,
    n: usize,
    plane: usize,
}

impl Pieces {
    /// The grid of work that sums: pieces of at least [`PIECE_MIN_VALUES`], planes over
    /// [`SPLIT_PLANES_ABOVE`] cut within the image.
    fn for_sums(shape: Shape) -> Pieces {
        let plane = shape.plane();
        if plane > SPLIT_PLANES_ABOVE {
            return Self::new(shape, 1, plane.div_ceil(SPLIT_PLANES_ABOVE));
        }
        let images = PIECE_MIN_VALUES.div_ceil(plane.max(1)).max(shape.n.div_ceil(MAX_IMAGE_PIECES));
        Self::new(shape, images, 1)
    }

    /// The grid of element-wise work, where a split changes no result: single images, or shares
    /// of one when there are few images.
    fn for_elementwise(shape: Shape) -> Pieces {
        if shape.n >= MAX_IMAGE_PIECES {
            return Self::new(shape, shape.n.div_ceil(MAX_IMAGE_PIECES), 1);
        }
        let shares = (MAX_IMAGE_PIECES / shape.n.max(1)).min(shape.plane().div_ceil(PIECE_MIN_VALUES));
        Self::new(shape, 1, shares.max(1))
    }

    fn new(shape: Shape, images: usize, per_image: usize) -> Pieces {
        let (n, plane) = (shape.n, shape.plane());
        let images = images.max(1);
        // n · per_image ≤ n · plane, which fits (Shape::check_size).
        let count = if per_image > 1 { n * per_image } else { n.div_ceil(images) }.max(1);
        Pieces { images, per_image, count, n, plane }
    }

    /// The position where piece `piece` starts (the end of the channel for `count`).
    fn start(&self, piece: usize) -> usize {
        if self.per_image > 1 {
            let (image, share) = (piece / self.per_image, piece % self.per_image);
            image * self.plane + share * self.plane / self.per_image
        } else {
            piece.saturating_mul(self.images).min(self.n) * self.plane
        }
    }

    fn per_channel(&self) -> usize {
        self.n * self.plane
    }
}

/// The size thresholds the planner works with. The defaults suit the machines measured (see the
/// README); tests lower them to run every plan on small shapes, and `BATCHNORM_SEQUENTIAL_BELOW_BYTES`
/// and `BATCHNORM_STREAM_AT_BYTES` set them for a whole process. They change speed, never results'
/// correctness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Calls reading fewer bytes than this run on the calling thread alone.
    pub sequential_below_bytes: usize,
    /// Outputs of at least this many bytes (with planes of at least 4 KiB) are written with
    /// non-temporal stores.
    pub stream_at_bytes: usize,
}

static SEQUENTIAL_BELOW: AtomicUsize = AtomicUsize::new(SEQUENTIAL_BELOW_BYTES);
static STREAM_AT: AtomicUsize = AtomicUsize::new(STREAM_AT_BYTES);
static FROM_ENVIRONMENT: Once = Once::new();

impl Tuning {
    /// The thresholds in use.
    pub fn get() -> Tuning {
        FROM_ENVIRONMENT.call_once(|| {
            let read = |name: &str, into: &AtomicUsize| {
                if let Some(value) = std::env::var(name).ok().and_then(|v| v.trim().parse().ok()) {
                    into.store(value, Ordering::Relaxed);
                }
            };
            read("BATCHNORM_SEQUENTIAL_BELOW_BYTES", &SEQUENTIAL_BELOW);
            read("BATCHNORM_STREAM_AT_BYTES", &STREAM_AT);
        });
        Tuning {
            sequential_below_bytes: SEQUENTIAL_BELOW.load(Ordering::Relaxed),
            stream_at_bytes: STREAM_AT.load(Ordering::Relaxed),
        }
    }

    /// Uses `self` for every call that starts from now on, in every thread.
    pub fn set(self) {
        Tuning::get();
        SEQUENTIAL_BELOW.store(self.sequential_below_bytes, Ordering::Relaxed);
        STREAM_AT.store(self.stream_at_bytes, Ordering::Relaxed);
    }

    /// The built-in defaults.
    pub const DEFAULT: Tuning =
        Tuning { sequential_below_bytes: SEQUENTIAL_BELOW_BYTES, stream_at_bytes: STREAM_AT_BYTES };
}

/// How a call's work was split (see [`last_plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanKind {
    /// Everything on the calling thread, in one part.
    Sequential,
    /// Contiguous image-major stretches (eval, and two-pass work on tiny planes).
    ImageMajor,
    /// Groups of whole channels, both passes by one task.
    ChannelGroups,
    /// Slices of channels, their partial statistics merged between the passes.
    SplitChannels,
}

/// What the most recent CPU call on this thread did: for tests and for explaining timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanReport {
    pub kind: PlanKind,
    /// Threads that took parts, the caller included.
    pub threads: usize,
    pub parts: usize,
    /// Whether the output was written with non-temporal stores.
    pub streaming: bool,
}

thread_local! {
    static LAST_PLAN: Cell<Option<PlanReport>> = const { Cell::new(None) };
}

/// The plan of the most recent CPU kernel call made from this thread (`None` before any). A
/// layer call may make more than one kernel call (a backward without saved statistics computes
/// them first); this is the last.
pub fn last_plan() -> Option<PlanReport> {
    LAST_PLAN.with(Cell::get)
}

/// How many times a call reads its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Passes {
    /// One streaming pass computing no sums (eval forward): split anywhere.
    Elementwise,
    /// One streaming pass with per-channel sums (statistics, backward through fixed statistics).
    One,
    /// Statistics, then a second pass that uses them (training forward and its backward).
    Two,
}

/// One task's share of the work: the same range of logical positions in a group of channels,
/// made of whole [`Pieces`].
#[derive(Clone, Debug)]
pub(crate) struct Part {
    pub channels: Range<usize>,
    pub range: Range<usize>,
    pieces: Range<usize>,
    grid: Pieces,
}

impl Part {
    fn new(channels: Range<usize>, pieces: Range<usize>, grid: Pieces) -> Part {
        Part { channels, range: grid.start(pieces.start)..grid.start(pieces.end), pieces, grid }
    }

    pub fn piece_count(&self) -> usize {
        self.pieces.len()
    }

    /// The part's pieces, in order, each as a part of its own.
    pub fn pieces(&self) -> impl Iterator<Item = Part> + '_ {
        self.pieces.clone().map(|piece| Part::new(self.channels.clone(), piece..piece + 1, self.grid))
    }
}

/// Folds per-piece results — the (piece, channel) order reductions return them in — into
/// `merged` (the part's channels), left to right in piece order: the same sequence of
/// operations for a channel however its pieces were spread over parts.
pub(crate) fn fold_pieces<R: Copy>(merged: &mut [Option<R>], results: &[R], combine: impl Fn(R, R) -> R) {
    for piece in results.chunks(merged.len().max(1)) {
        for (slot, &result) in merged.iter_mut().zip(piece) {
            *slot = Some(slot.map_or(result, |acc| combine(acc, result)));
        }
    }
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
    /// (one input for a forward, two for a backward). One-pass work streams through memory in
    /// contiguous image-major parts; two-pass work goes by channel groups.
    pub fn new(shape: Shape, bytes_per_value: usize, passes: Passes, level: SimdLevel) -> Result<Plan> {
        let grid = if passes == Passes::Elementwise { Pieces::for_elementwise(shape) } else { Pieces::for_sums(shape) };
        let c = shape.c;
        let bytes = shape.numel().saturating_mul(bytes_per_value);
        let (pool, threads) = if bytes < Tuning::get().sequential_below_bytes { (None, 1) } else { threads::pool()? };
        let report =
            |kind, parts| LAST_PLAN.with(|last| last.set(Some(PlanReport { kind, threads, parts, streaming: false })));
        let Some(pool) = pool else {
            report(PlanKind::Sequential, 1);
            let everything = vec![Part::new(0..c, 0..grid.count, grid)];
            return Ok(Plan { parts: everything, channels: c, whole_channels: true, pool: None, level });
        };
        let wanted = PARTS_PER_THREAD * threads;
        let tiny_planes = shape.plane() * bytes_per_value < IMAGE_MAJOR_BELOW_BYTES;
        let parts = match passes {
            Passes::Elementwise | Passes::One => Self::image_major(shape, grid, wanted),
            Passes::Two if tiny_planes => Self::image_major(shape, grid, wanted),
            Passes::Two => Self::channel_groups(shape, grid, bytes_per_value, wanted),
        };
        let whole_channels = parts.iter().all(|p| p.range.len() == grid.per_channel());
        let kind = match (passes, tiny_planes, whole_channels) {
            (Passes::Two, false, true) => PlanKind::ChannelGroups,
            (Passes::Two, false, false) => PlanKind::SplitChannels,
            _ => PlanKind::ImageMajor,
        };
        report(kind, parts.len());
        Ok(Plan { parts, channels: c, whole_channels, pool: Some(pool), level })
    }

    /// Contiguous stretches of the tensor: every channel, a range of pieces.
    fn image_major(shape: Shape, grid: Pieces, wanted: usize) -> Vec<Part> {
        let slices = wanted.min(shape.numel() / MIN_PART_VALUES).min(grid.count).max(1);
        let boundary = |s: usize| s * grid.count / slices;
        (0..slices).map(|s| Part::new(0..shape.c, boundary(s)..boundary(s + 1), grid)).collect()
    }

    /// Groups of whole channels (see [`RUN_BYTES`]), or slices of single channels when there are
    /// too few channels to keep every thread busy.
    fn channel_groups(shape: Shape, grid: Pieces, bytes_per_value: usize, wanted: usize) -> Vec<Part> {
        let c = shape.c;
        let contiguous_run = RUN_BYTES.div_ceil((shape.plane() * bytes_per_value).max(1));
        let group = contiguous_run.min(c.div_ceil(wanted)).max(1);
        let groups = c.div_ceil(group);
        let slices = if groups >= wanted {
            1
        } else {
            wanted.div_ceil(groups).min(grid.per_channel() / MIN_PART_VALUES).min(grid.count).max(1)
        };
        let boundary = |s: usize| s * grid.count / slices;
        (0..groups)
            .flat_map(|g| {
                let channels = g * group..((g + 1) * group).min(c);
                (0..slices).map(move |s| Part::new(channels.clone(), boundary(s)..boundary(s + 1), grid))
            })
            .collect()
    }

    /// Whether every part holds whole channels, so one task can make both passes over them.
    pub fn whole_channels(&self) -> bool {
        self.whole_channels
    }

    /// Runs `task` on every part, in parallel when the call is large enough; results in part order.
    /// The calling thread and the workers take parts from one counter until none are left.
    pub fn run<K: PartTask>(&self, task: &K) -> Vec<K::Output> {
        let one = |part: &Part| simd::dispatch(self.level, task, part);
        let Some(pool) = &self.pool else { return self.parts.iter().map(one).collect() };
        let results: Vec<OnceLock<K::Output>> = self.parts.iter().map(|_| OnceLock::new()).collect();
        let next = AtomicUsize::new(0);
        let take_parts = || loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(part) = self.parts.get(index) else { break };
            let _ = results[index].set(one(part));
        };
        pool.in_place_scope(|scope| {
            for _ in 0..pool.current_num_threads() {
                scope.spawn(|_| take_parts());
            }
            take_parts();
        });
        results.into_iter().map(|slot| slot.into_inner().expect("every part ran exactly once")).collect()
    }

    /// Folds the parts' per-piece results (see [`fold_pieces`]) into one result per channel.
    pub fn per_channel<R: Copy + Default>(&self, partials: Vec<Vec<R>>, combine: impl Fn(R, R) -> R) -> Vec<R> {
        let mut merged: Vec<Option<R>> = vec![None; self.channels];
        for (part, results) in self.parts.iter().zip(partials) {
            fold_pieces(&mut merged[part.channels.clone()], &results, &combine);
        }
        merged.into_iter().map(Option::unwrap_or_default).collect()
    }
}

/// Where a block sits: image `n`, channel `c`, offset `w` within the plane.
#[derive(Clone, Copy, Debug)]
pub(crate) struct At {
    pub n: usize,
    pub c: usize,
    pub w: usize,
}

/// Calls `visit(at, [values of each input])` for blocks covering the part: image by image, and
/// within an image channel by channel, each plane's stretch cut every [`BLOCK`] positions from
/// where it starts. No block crosses an image plane, so the matching output block is contiguous.
#[inline(always)]
pub(crate) fn for_each_block<T: Element, const K: usize>(
    inputs: [&TensorRef<'_, T>; K],
    part: &Part,
    mut visit: impl FnMut(At, [&[T]; K]),
) {
    let plane = inputs[0].shape().plane();
    if part.range.is_empty() || plane == 0 {
        return;
    }
    // Gather buffers only for inputs that are not contiguous: zeroing them costs more than a
    // small piece's work.
    let mut buffers = inputs.map(
        #[inline(always)]
        |tensor| if tensor.reads_in_place() { Vec::new() } else { vec![T::ZERO; BLOCK] },
    );
    let (first, last) = (part.range.start / plane, (part.range.end - 1) / plane);
    for n in first..=last {
        let from = if n == first { part.range.start - n * plane } else { 0 };
        let to = if n == last { part.range.end - n * plane } else { plane };
        for c in part.channels.clone() {
            let mut w = from;
            while w < to {
                let len = (to - w).min(BLOCK);
                let mut input = inputs.iter();
                let views = buffers.each_mut().map(
                    #[inline(always)]
                    |buffer| match input.next() {
                        Some(tensor) => tensor.read(n, c, w, len, buffer),
                        None => &[],
                    },
                );
                visit(At { n, c, w }, views);
                w += len;
            }
        }
    }
}

/// Outputs at least this large are written with non-temporal stores: they would not stay in
/// cache anyway, and writing around it spares the read-for-ownership and keeps the input in L3
/// for a second pass. Only for planes of at least [`IMAGE_MAJOR_BELOW_BYTES`]: the blocks of
/// smaller planes are mostly unaligned heads and tails, and streaming partial lines is slower.
const STREAM_AT_BYTES: usize = 16 << 20;

/// A C-contiguous output that parallel tasks write through, each to its own positions.
pub(crate) struct SharedOut<'a, T> {
    ptr: *mut T,
    len: usize,
    shape: Shape,
    stream: bool,
    /// Half output (its bits) that f32 blocks are narrowed into, in place of `ptr`.
    half: Option<(*mut u16, Half)>,
    /// Channels-last output: a block of a plane is scattered, one value every C.
    channels_last: bool,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: tasks only write disjoint blocks (see `block`), and T is Send.
unsafe impl<T: Send> Send for SharedOut<'_, T> {}
unsafe impl<T: Send> Sync for SharedOut<'_, T> {}

impl<'a, T: Element> SharedOut<'a, T> {
    pub fn new(out: TensorMut<'a, T>, shape: Shape) -> Self {
        assert_eq!(out.len(), shape.numel(), "output length checked by the caller");
        let channels_last = out.layout() == Layout::ChannelsLast;
        let (ptr, len, half) = match out.into_target() {
            Target::Values(values) => (values.as_mut_ptr(), values.len(), None),
            Target::Half(bits, half) => (std::ptr::null_mut(), bits.len(), Some((bits.as_mut_ptr(), half))),
        };
        // Half output goes through an f32 block in cache, channels-last output is scattered:
        // streaming stores have nothing to skip.
        let stream = half.is_none()
            && !channels_last
            && len * size_of::<T>() >= Tuning::get().stream_at_bytes
            && shape.plane() * size_of::<T>() >= IMAGE_MAJOR_BELOW_BYTES;
        if stream {
            LAST_PLAN.with(|last| last.set(last.get().map(|report| PlanReport { streaming: true, ..report })));
        }
        SharedOut { ptr, len, shape, stream, half, channels_last, _borrow: PhantomData }
    }

    /// Whether blocks are written with non-temporal stores; a part that wrote any must end with
    /// [`simd::store_fence`].
    pub fn stream(&self) -> bool {
        self.stream
    }

    /// A task's scratch for [`Self::write_block`]: one block of values for half or channels-last
    /// output (made once per task, not per block), nothing otherwise.
    pub fn staging(&self) -> Vec<T> {
        if self.half.is_some() || self.channels_last {
            vec![T::ZERO; BLOCK]
        } else {
            Vec::new()
        }
    }

    /// Writes the output block of `len` values at `at` with `write`: in place, or, for half or
    /// channels-last output, into `staged` (from [`Self::staging`]), which is then narrowed into
    /// it and scattered (one value every C) where it goes.
    ///
    /// # Safety
    /// No two blocks written at once may overlap: each (channel, position) must be written by one
    /// task. Parts of a [`Plan`] are disjoint, and blocks within a part are visited one at a time.
    #[inline(always)]
    pub unsafe fn write_block(&self, at: At, len: usize, staged: &mut [T], write: impl FnOnce(&mut [T])) {
        if !self.channels_last {
            let start = self.shape.contiguous_index(at.n, at.c, at.w);
            assert!(start + len <= self.len, "block inside the output");
            let Some((bits, half)) = self.half else {
                return write(std::slice::from_raw_parts_mut(self.ptr.add(start), len));
            };
            let staged = &mut staged[..len];
            write(staged);
            // Half output is only made for f32 results (see `TensorMut::half`).
            if let Some(values) = T::as_f32(staged) {
                convert::narrow_block(half, values, std::slice::from_raw_parts_mut(bits.add(start), len));
            }
            return;
        }
        let c = self.shape.c;
        let first = self.shape.channels_last_index(at.n, at.c, at.w);
        assert!(len == 0 || first + (len - 1) * c < self.len, "block inside the output");
        let staged = &mut staged[..len];
        write(staged);
        match self.half {
            None => {
                for (i, &value) in staged.iter().enumerate() {
                    *self.ptr.add(first + i * c) = value;
                }
            }
            Some((bits, half)) => {
                let mut narrowed = [0u16; BLOCK];
                if let Some(values) = T::as_f32(staged) {
                    convert::narrow_block(half, values, &mut narrowed[..len]);
                }
                for (i, &value) in narrowed[..len].iter().enumerate() {
                    *bits.add(first + i * c) = value;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every SIMD level this CPU has, against the scalar build of the same kernels, and at each
    //! level the same bits from the sequential and the parallel plans.

    use super::backward::{through_batch_stats, through_fixed_stats};
    use super::forward::{eval, statistics, train, ChannelAffine};
    use super::simd::SimdLevel;
    use super::Tuning;
    use crate::shape::{Shape, TensorRef};

    const SHAPES: [Shape; 8] = [
        Shape::new(3, 5, 7, 7),      // planes not a whole number of vectors
        Shape::new(16, 64, 16, 16),  // image-major parts
        Shape::new(16, 16, 40, 40),  // channel groups
        Shape::new(16, 3, 64, 64),   // slices of channels
        Shape::new(2, 2, 301, 303),  // planes cut into pieces within the image
        Shape::new(1024, 128, 1, 1), // one value per plane
        Shape::new(2, 3, 1, 17),     // vector plus tail
        Shape::new(4, 16, 256, 257), // 16 MiB: non-temporal stores at the default thresholds too
    ];

    /// Pseudo-random values in [offset, offset + 1), independent across seeds (xorshift).
    fn values(n: usize, seed: u64, offset: f64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (offset + (state >> 11) as f64 / (1u64 << 53) as f64) as f32
            })
            .collect()
    }

    /// ‖a − b‖ / ‖b‖: elementwise checks would trip on values that cancel to near zero.
    fn relative_error(a: &[f32], b: &[f32]) -> f64 {
        let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
    }

    /// Every kernel's outputs, and the per-channel statistics and sums in f64.
    fn run_all(shape: Shape, level: SimdLevel) -> (Vec<Vec<f32>>, Vec<f64>) {
        let (x, dy) = (values(shape.numel(), 1, 100.0), values(shape.numel(), 2, -0.5));
        let (xr, dyr) = (TensorRef::contiguous(&x, shape).unwrap(), TensorRef::contiguous(&dy, shape).unwrap());
        let weight: Vec<f32> = (0..shape.c).map(|c| 0.5 + c as f32).collect();
        let mut y = vec![0.0; shape.numel()];
        let moments = train(&xr, y.as_mut_slice().into(), Some(&weight), None, 1e-5, level).unwrap();
        let mean: Vec<f64> = moments.iter().map(|m| m.mean).collect();
        let invstd: Vec<f64> = moments.iter().map(|m| 1.0 / (m.biased_var() + 1e-5).sqrt()).collect();
        let affine: Vec<_> =
            (0..shape.c).map(|c| ChannelAffine::new(c, mean[c], invstd[c], Some(&weight), None)).collect();
        let mut y_eval = vec![0.0; shape.numel()];
        eval(&xr, y_eval.as_mut_slice().into(), &affine, level).unwrap();
        let mut dx = vec![0.0; shape.numel()];
        let sums =
            through_batch_stats(&xr, &dyr, dx.as_mut_slice().into(), &mean, &invstd, Some(&weight), level).unwrap();
        let mut dx_fixed = vec![0.0; shape.numel()];
        let fixed_sums =
            through_fixed_stats(&xr, &dyr, dx_fixed.as_mut_slice().into(), &mean, &invstd, Some(&weight), level)
                .unwrap();
        let recomputed = statistics(&xr, level).unwrap();
        assert_eq!(recomputed, moments, "statistics alone are the training forward's, bit for bit");
        let stats = moments.iter().flat_map(|m| [m.mean, m.biased_var()]);
        let grads = sums.iter().chain(&fixed_sums).flat_map(|s| [s.sum_dy, s.sum_dy_xmu]);
        (vec![y, y_eval, dx, dx_fixed], stats.chain(grads).collect())
    }

    /// Thresholds that send every shape down a parallel plan with non-temporal stores.
    const PARALLEL: Tuning = Tuning { sequential_below_bytes: 0, stream_at_bytes: 0 };

    /// One test: the thresholds and the thread count are process-wide.
    #[test]
    fn every_simd_level_matches_scalar_and_gives_the_same_bits_under_every_plan() {
        let levels = SimdLevel::available();
        assert_eq!(levels[0], SimdLevel::Scalar);
        crate::threads::set_num_threads(3).unwrap();
        for shape in SHAPES {
            Tuning::DEFAULT.set();
            let sequential: Vec<_> = levels.iter().map(|&level| run_all(shape, level)).collect();
            PARALLEL.set();
            for (&level, (outputs, sums)) in levels.iter().zip(&sequential) {
                let (parallel_outputs, parallel_sums) = run_all(shape, level);
                assert!(parallel_outputs == *outputs, "{level:?} outputs depend on the plan at {shape:?}");
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&parallel_sums), bits(sums), "{level:?} sums depend on the plan at {shape:?}");
            }
            let (reference, _) = &sequential[0];
            for (&level, (outputs, _)) in levels.iter().zip(&sequential).skip(1) {
                for (i, (got, want)) in outputs.iter().zip(reference).enumerate() {
                    let error = relative_error(got, want);
                    assert!(error < 1e-5, "{level:?} output {i} differs from scalar by {error:e} at {shape:?}");
                }
            }
        }
        Tuning::DEFAULT.set();
    }
}
