//! Per-block kernels on plain slices, written once for every element type and instruction set.
//!
//! They compute in the storage type, in SIMD vectors, and hand per-block results to `f64`. Two
//! things keep float32 accurate on data with a large offset: statistics are sums of
//! d = x − rough_mean, where rough_mean is the block's own approximate mean, so d is exact
//! (Sterbenz) and its sums are small; and the channel mean is subtracted as a pair of floats
//! (hi + lo), so it is never rounded to float32 before the subtraction.

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

/// The moments of one block (small enough to stay in L1 for its second pass).
#[inline(always)]
pub(crate) fn block_moments<T: Element, S: Simd>(simd: S, xs: &[T]) -> Moments {
    if xs.is_empty() {
        return Moments::default();
    }
    let count = xs.len() as f64;
    let rough = T::from_f64(sum(simd, xs) / count);
    let rough_v = T::vsplat(simd, rough);
    let (head, tail) = T::split::<S>(xs);
    let (pairs, rest) = pulp::as_arrays::<2, _>(head);
    let zero = T::vsplat(simd, T::ZERO);
    let (mut sum_d, mut sum_d2) = ([zero; 2], [zero; 2]);
    for pair in pairs {
        for i in 0..2 {
            let d = T::vsub(simd, pair[i], rough_v);
            sum_d[i] = T::vadd(simd, sum_d[i], d);
            sum_d2[i] = T::vmul_add(simd, d, d, sum_d2[i]);
        }
    }
    for &v in rest {
        let d = T::vsub(simd, v, rough_v);
        sum_d[0] = T::vadd(simd, sum_d[0], d);
        sum_d2[0] = T::vmul_add(simd, d, d, sum_d2[0]);
    }
    let mut total_d = T::sum_f64::<S>(T::vadd(simd, sum_d[0], sum_d[1]));
    let mut total_d2 = T::sum_f64::<S>(T::vadd(simd, sum_d2[0], sum_d2[1]));
    for &x in tail {
        let d = (x - rough).to_f64();
        total_d += d;
        total_d2 += d * d;
    }
    let m2 = (total_d2 - total_d * total_d / count).max(0.0);
    Moments { count, mean: rough.to_f64() + total_d / count, m2 }
}

/// y = (x − mean) · scale + offset: one fused multiply-add per value.
#[inline(always)]
pub(crate) fn normalize<T: Element, S: Simd>(simd: S, xs: &[T], ys: &mut [T], mean: Split<T>, scale: T, offset: T) {
    let (x_head, x_tail) = T::split::<S>(xs);
    let (y_head, y_tail) = T::split_mut::<S>(ys);
    let mean_v = SplitV::new(simd, mean);
    let (scale_v, offset_v) = (T::vsplat(simd, scale), T::vsplat(simd, offset));
    for (x, y) in x_head.iter().zip(y_head) {
        *y = T::vmul_add(simd, mean_v.centered(*x), scale_v, offset_v);
    }
    for (&x, y) in x_tail.iter().zip(y_tail) {
        *y = mean.centered(x) * scale + offset;
    }
}

/// Σ dy and Σ dy·(x − mean) over a block.
#[inline(always)]
pub(crate) fn grad_sums<T: Element, S: Simd>(simd: S, xs: &[T], gs: &[T], mean: Split<T>) -> (f64, f64) {
    let (x_head, x_tail) = T::split::<S>(xs);
    let (g_head, g_tail) = T::split::<S>(gs);
    let mean_v = SplitV::new(simd, mean);
    let zero = T::vsplat(simd, T::ZERO);
    let (mut sum_g, mut sum_gx) = ([zero; 2], [zero; 2]);
    let (x_pairs, x_rest) = pulp::as_arrays::<2, _>(x_head);
    let (g_pairs, g_rest) = pulp::as_arrays::<2, _>(g_head);
    for (x, g) in x_pairs.iter().zip(g_pairs) {
        for i in 0..2 {
            sum_g[i] = T::vadd(simd, sum_g[i], g[i]);
            sum_gx[i] = T::vmul_add(simd, g[i], mean_v.centered(x[i]), sum_gx[i]);
        }
    }
    for (&x, &g) in x_rest.iter().zip(g_rest) {
        sum_g[0] = T::vadd(simd, sum_g[0], g);
        sum_gx[0] = T::vmul_add(simd, g, mean_v.centered(x), sum_gx[0]);
    }
    let mut total_g = T::sum_f64::<S>(T::vadd(simd, sum_g[0], sum_g[1]));
    let mut total_gx = T::sum_f64::<S>(T::vadd(simd, sum_gx[0], sum_gx[1]));
    for (&x, &g) in x_tail.iter().zip(g_tail) {
        total_g += g.to_f64();
        total_gx += g.to_f64() * mean.centered(x).to_f64();
    }
    (total_g, total_gx)
}

/// dx = ((dy − mean_dy) − (x − mean) · k) · scale: the input gradient through batch statistics.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn grad_input_batch<T: Element, S: Simd>(
    simd: S,
    xs: &[T],
    gs: &[T],
    dx: &mut [T],
    mean: Split<T>,
    mean_dy: T,
    k: T,
    scale: T,
) {
    let (x_head, x_tail) = T::split::<S>(xs);
    let (g_head, g_tail) = T::split::<S>(gs);
    let (d_head, d_tail) = T::split_mut::<S>(dx);
    let mean_v = SplitV::new(simd, mean);
    let (mean_dy_v, neg_k_v, scale_v) = (T::vsplat(simd, mean_dy), T::vsplat(simd, -k), T::vsplat(simd, scale));
    for ((x, g), d) in x_head.iter().zip(g_head).zip(d_head) {
        let centered_dy = T::vsub(simd, *g, mean_dy_v);
        *d = T::vmul(simd, T::vmul_add(simd, mean_v.centered(*x), neg_k_v, centered_dy), scale_v);
    }
    for ((&x, &g), d) in x_tail.iter().zip(g_tail).zip(d_tail) {
        *d = ((g - mean_dy) - mean.centered(x) * k) * scale;
    }
}

/// dx = dy · scale: the input gradient when the statistics are constants.
#[inline(always)]
pub(crate) fn grad_input_fixed<T: Element, S: Simd>(simd: S, gs: &[T], dx: &mut [T], scale: T) {
    let (g_head, g_tail) = T::split::<S>(gs);
    let (d_head, d_tail) = T::split_mut::<S>(dx);
    let scale_v = T::vsplat(simd, scale);
    for (g, d) in g_head.iter().zip(d_head) {
        *d = T::vmul(simd, *g, scale_v);
    }
    for (&g, d) in g_tail.iter().zip(d_tail) {
        *d = g * scale;
    }
}
