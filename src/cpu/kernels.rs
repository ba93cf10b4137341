//! Per-block kernels on plain slices, written once for every element type and instruction set.
//!
//! They compute in the storage type, in SIMD vectors, and hand per-block results to `f64`. Two
//! things keep float32 accurate on data with a large offset: statistics are sums of
//! d = x − shift, where the shift is close to the channel's mean (the rough mean of its first
//! block, then the running mean), so d is exact (Sterbenz) and its sums are small; and the
//! channel mean is subtracted as a pair of floats (hi + lo), so it is never rounded to float32
//! before the subtraction.

use pulp::Simd;

use crate::element::Element;

/// Count, mean and sum of squared deviations of a set of values: merged with Chan's formula, so
/// partial results from blocks and threads combine without the cancellation of E[x²] − E[x]².
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Moments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    pub fn merge(self, other: Moments) -> Moments {
        if other.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return other;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * (other.count / count),
            m2: self.m2 + other.m2 + delta * delta * (self.count * other.count / count),
        }
    }

    pub fn biased_var(&self) -> f64 {
        self.m2 / self.count
    }

    pub fn unbiased_var(&self) -> f64 {
        self.m2 / (self.count - 1.0)
    }
}

/// A per-channel value held as a storage-type pair hi + lo, to about twice the storage precision.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Split<T> {
    pub hi: T,
    pub lo: T,
}

impl<T: Element> Split<T> {
    pub fn new(value: f64) -> Self {
        let hi = T::from_f64(value);
        Split { hi, lo: T::from_f64(value - hi.to_f64()) }
    }

    /// (x − hi) − lo: exact in its first step when x is near the value.
    #[inline(always)]
    fn centered(self, x: T) -> T {
        (x - self.hi) - self.lo
    }
}

/// The same split, broadcast to vectors.
struct SplitV<T: Element, S: Simd> {
    simd: S,
    hi: T::V<S>,
    lo: T::V<S>,
}

impl<T: Element, S: Simd> SplitV<T, S> {
    #[inline(always)]
    fn new(simd: S, split: Split<T>) -> Self {
        SplitV { simd, hi: T::vsplat(simd, split.hi), lo: T::vsplat(simd, split.lo) }
    }

    #[inline(always)]
    fn centered(&self, x: T::V<S>) -> T::V<S> {
        T::vsub(self.simd, T::vsub(self.simd, x, self.hi), self.lo)
    }
}

#[inline(always)]
fn sum<T: Element, S: Simd>(simd: S, xs: &[T]) -> f64 {
    let (head, tail) = T::split::<S>(xs);
    let (quads, rest) = pulp::as_arrays::<4, _>(head);
    let mut acc = [T::vsplat(simd, T::ZERO); 4];
    for quad in quads {
        for i in 0..4 {
            acc[i] = T::vadd(simd, acc[i], quad[i]);
        }
    }
    for &v in rest {
        acc[0] = T::vadd(simd, acc[0], v);
    }
    let mut total = T::sum_f64::<S>(T::vadd(simd, T::vadd(simd, acc[0], acc[1]), T::vadd(simd, acc[2], acc[3])));
    for v in tail {
        total += v.to_f64();
    }
    total
}

/// Values a vector accumulator takes before it is flushed to f64: float32 lanes then never sum
/// more than a few dozen terms each.
const WINDOW: usize = 2048;

/// Two running sums kept in vector lanes, plus the scalar tails of blocks that are not a whole
/// number of vectors. One vector per sum between blocks keeps the per-channel state small: with
/// tiny planes a part holds hundreds of these and touches one per 49-value block.
struct LaneSums<T: Element, S: Simd> {
    simd: S,
    a: T::V<S>,
    b: T::V<S>,
    tail_a: f64,
    tail_b: f64,
    count: usize,
}

impl<T: Element, S: Simd> LaneSums<T, S> {
    #[inline(always)]
    fn new(simd: S) -> Self {
        let zero = T::vsplat(simd, T::ZERO);
        LaneSums { simd, a: zero, b: zero, tail_a: 0.0, tail_b: 0.0, count: 0 }
    }

    /// Adds `f(v)` → (a, b) for each vector `v` of `xs` (paired with `ys`), and `tail` for the
    /// values past the last whole vector.
    #[inline(always)]
    fn add(
        &mut self,
        xs: &[T],
        ys: &[T],
        f: impl Fn(T::V<S>, T::V<S>, T::V<S>, T::V<S>) -> (T::V<S>, T::V<S>),
        tail: impl Fn(T, T) -> (f64, f64),
    ) {
        let (x_head, x_tail) = T::split::<S>(xs);
        let (y_head, y_tail) = T::split::<S>(ys);
        let (x_pairs, x_rest) = pulp::as_arrays::<2, _>(x_head);
        let (y_pairs, y_rest) = pulp::as_arrays::<2, _>(y_head);
        // Two chains per sum for instruction-level parallelism, in locals that LLVM keeps in
        // registers across the loop.
        let (simd, zero) = (self.simd, T::vsplat(self.simd, T::ZERO));
        let (mut a, mut b) = ([self.a, zero], [self.b, zero]);
        for (x, y) in x_pairs.iter().zip(y_pairs) {
            for i in 0..2 {
                (a[i], b[i]) = f(x[i], y[i], a[i], b[i]);
            }
        }
        for (&x, &y) in x_rest.iter().zip(y_rest) {
            (a[0], b[0]) = f(x, y, a[0], b[0]);
        }
        (self.a, self.b) = (T::vadd(simd, a[0], a[1]), T::vadd(simd, b[0], b[1]));
        for (&x, &y) in x_tail.iter().zip(y_tail) {
            let (a, b) = tail(x, y);
            self.tail_a += a;
            self.tail_b += b;
        }
        self.count += xs.len();
    }

    /// The sums and their count so far, in f64; starts over.
    #[inline(always)]
    fn take(&mut self) -> (f64, f64, f64) {
        let simd = self.simd;
        let a = T::sum_f64::<S>(self.a) + self.tail_a;
        let b = T::sum_f64::<S>(self.b) + self.tail_b;
        let count = self.count as f64;
        *self = LaneSums::new(simd);
        (a, b, count)
    }
}

/// The mean of `xs`, roughly: a channel's first block gives the shift its sums start from.
#[inline(always)]
pub(crate) fn rough_mean<T: Element, S: Simd>(simd: S, xs: &[T]) -> T {
    T::from_f64(sum(simd, xs) / xs.len().max(1) as f64)
}

/// The moments of one piece of a channel, fed block by block. Sums are of d = x − shift, where
/// the shift is the channel's rough mean and then, after each window, the piece's running mean,
/// so d stays small and exact.
pub(crate) struct MomentsAccumulator<T: Element, S: Simd> {
    sums: LaneSums<T, S>,
    shift: T,
    done: Moments,
}

impl<T: Element, S: Simd> MomentsAccumulator<T, S> {
    #[inline(always)]
    pub fn new(simd: S, shift: T) -> Self {
        MomentsAccumulator { sums: LaneSums::new(simd), shift, done: Moments::default() }
    }

    #[inline(always)]
    pub fn add(&mut self, xs: &[T]) {
        let simd = self.sums.simd;
        let (shift, shift_v) = (self.shift, T::vsplat(simd, self.shift));
        self.sums.add(
            xs,
            xs,
            #[inline(always)]
            |x, _, sum_d, sum_d2| {
                let d = T::vsub(simd, x, shift_v);
                (T::vadd(simd, sum_d, d), T::vmul_add(simd, d, d, sum_d2))
            },
            #[inline(always)]
            |x, _| {
                let d = (x - shift).to_f64();
                (d, d * d)
            },
        );
        if self.sums.count >= WINDOW {
            self.flush();
        }
    }

    #[inline(always)]
    fn flush(&mut self) {
        let (sum_d, sum_d2, count) = self.sums.take();
        if count == 0.0 {
            return;
        }
        let mean = self.shift.to_f64() + sum_d / count;
        // Rounding can leave the sum of squared deviations a hair below zero; clamp it, but let a
        // NaN through (f64::max would drop it): NaN in a batch must reach the statistics.
        let m2 = sum_d2 - sum_d * sum_d / count;
        let window = Moments { count, mean, m2: if m2 < 0.0 { 0.0 } else { m2 } };
        self.done = self.done.merge(window);
        self.shift = T::from_f64(self.done.mean);
    }

    #[inline(always)]
    pub fn finish(mut self) -> Moments {
        self.flush();
        self.done
    }
}

/// Σ dy and Σ dy·(x − mean) of one channel, fed block by block.
pub(crate) struct GradAccumulator<T: Element, S: Simd> {
    sums: LaneSums<T, S>,
    mean: Split<T>,
    done: (f64, f64),
}

impl<T: Element, S: Simd> GradAccumulator<T, S> {
    #[inline(always)]
    pub fn new(simd: S, mean: Split<T>) -> Self {
        GradAccumulator { sums: LaneSums::new(simd), mean, done: (0.0, 0.0) }
    }

    #[inline(always)]
    pub fn add(&mut self, xs: &[T], gs: &[T]) {
        let simd = self.sums.simd;
        let (mean, mean_v) = (self.mean, SplitV::new(simd, self.mean));
        self.sums.add(
            xs,
            gs,
            #[inline(always)]
            |x, g, sum_g, sum_gx| (T::vadd(simd, sum_g, g), T::vmul_add(simd, g, mean_v.centered(x), sum_gx)),
            #[inline(always)]
            |x, g| (g.to_f64(), g.to_f64() * mean.centered(x).to_f64()),
        );
        if self.sums.count >= WINDOW {
            self.flush();
        }
    }

    #[inline(always)]
    fn flush(&mut self) {
        let (sum_g, sum_gx, _) = self.sums.take();
        self.done = (self.done.0 + sum_g, self.done.1 + sum_gx);
    }

    /// (Σ dy, Σ dy·(x − mean)).
    #[inline(always)]
    pub fn finish(mut self) -> (f64, f64) {
        self.flush();
        self.done
    }
}

/// Writes `out[i] = vector(inputs[..][i])`, vector by vector. The values before the first
/// vector-aligned position (when streaming) and after the last whole vector go through the same
/// vector expression as partial vectors, so every value gets the same arithmetic wherever it sits
/// in its block and in memory. With `stream`, whole vectors go to memory with non-temporal stores.
#[inline(always)]
fn write_each<T: Element, S: Simd, const K: usize>(
    simd: S,
    stream: bool,
    inputs: [&[T]; K],
    out: &mut [T],
    vector: impl Fn([T::V<S>; K]) -> T::V<S>,
) {
    let len = out.len();
    let head = if stream { out.as_ptr().align_offset(size_of::<T::V<S>>()).min(len) } else { 0 };
    let (out_head, out_body) = out.split_at_mut(head);
    if head > 0 {
        write_partial(simd, inputs, 0, out_head, &vector);
    }
    let (out_vectors, out_tail) = T::split_mut::<S>(out_body);
    let vectors = inputs.map(
        #[inline(always)]
        |values| T::split::<S>(&values[head..]).0,
    );
    for (j, slot) in out_vectors.iter_mut().enumerate() {
        let v = vector(vectors.map(
            #[inline(always)]
            |vectors| vectors[j],
        ));
        if stream {
            // SAFETY: `slot` is a whole vector of `out`, aligned to the vector's size (the head
            // above stops at the first aligned position); the part's writer fences afterwards.
            unsafe { T::vstream::<S>((slot as *mut T::V<S>).cast::<T>(), v) };
        } else {
            *slot = v;
        }
    }
    if !out_tail.is_empty() {
        write_partial(simd, inputs, len - out_tail.len(), out_tail, &vector);
    }
}

/// `out` = `vector` of the values of `inputs` from `from` on, as one partial vector.
#[inline(always)]
fn write_partial<T: Element, S: Simd, const K: usize>(
    simd: S,
    inputs: [&[T]; K],
    from: usize,
    out: &mut [T],
    vector: &impl Fn([T::V<S>; K]) -> T::V<S>,
) {
    let v = vector(inputs.map(
        #[inline(always)]
        |values| T::vload_partial(simd, &values[from..from + out.len()]),
    ));
    T::vstore_partial(simd, out, v);
}

/// y = (x − mean) · scale + offset: one fused multiply-add per value.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn normalize<T: Element, S: Simd>(
    simd: S,
    stream: bool,
    xs: &[T],
    ys: &mut [T],
    mean: Split<T>,
    scale: T,
    offset: T,
) {
    let mean_v = SplitV::new(simd, mean);
    let (scale_v, offset_v) = (T::vsplat(simd, scale), T::vsplat(simd, offset));
    write_each::<T, S, 1>(
        simd,
        stream,
        [xs],
        ys,
        #[inline(always)]
        |[x]| T::vmul_add(simd, mean_v.centered(x), scale_v, offset_v),
    );
}

/// dx = ((dy − mean_dy) − (x − mean) · k) · scale: the input gradient through batch statistics.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn grad_input_batch<T: Element, S: Simd>(
    simd: S,
    stream: bool,
    xs: &[T],
    gs: &[T],
    dx: &mut [T],
    mean: Split<T>,
    mean_dy: T,
    k: T,
    scale: T,
) {
    let mean_v = SplitV::new(simd, mean);
    let (mean_dy_v, neg_k_v, scale_v) = (T::vsplat(simd, mean_dy), T::vsplat(simd, -k), T::vsplat(simd, scale));
    write_each::<T, S, 2>(
        simd,
        stream,
        [xs, gs],
        dx,
        #[inline(always)]
        |[x, g]| {
            let centered_dy = T::vsub(simd, g, mean_dy_v);
            T::vmul(simd, T::vmul_add(simd, mean_v.centered(x), neg_k_v, centered_dy), scale_v)
        },
    );
}

/// dx = dy · scale: the input gradient when the statistics are constants.
#[inline(always)]
pub(crate) fn grad_input_fixed<T: Element, S: Simd>(simd: S, stream: bool, gs: &[T], dx: &mut [T], scale: T) {
    let scale_v = T::vsplat(simd, scale);
    write_each::<T, S, 1>(
        simd,
        stream,
        [gs],
        dx,
        #[inline(always)]
        |[g]| T::vmul(simd, g, scale_v),
    );
}
