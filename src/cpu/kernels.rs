//! Per-block kernels on plain slices: the innermost loops, and the one place a SIMD version of
//! each will plug in. They accumulate in `f64` over eight independent lanes so the compiler can
//! vectorize the sums without reordering a single dependency chain.

use crate::element::Element;

const LANES: usize = 8;

/// Count, mean and sum of squared deviations of a set of values: merged with Chan's formula, so
/// partial results from blocks and threads combine without the cancellation of E[x²] − E[x]².
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Moments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    /// Two passes over a block small enough to stay in L1: the mean, then squared deviations
    /// from it.
    pub fn of<T: Element>(xs: &[T]) -> Self {
        if xs.is_empty() {
            return Moments::default();
        }
        let count = xs.len() as f64;
        let mean = sum_by(xs, |x| x) / count;
        let m2 = sum_by(xs, |x| (x - mean) * (x - mean));
        Moments { count, mean, m2 }
    }

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

#[inline(always)]
fn sum_by<T: Element>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += f(x.to_f64());
        }
    }
    let tail_sum: f64 = tail.iter().map(|&x| f(x.to_f64())).sum();
    lanes.iter().sum::<f64>() + tail_sum
}

/// Σ dy and Σ dy·(x − mean) over a block.
#[inline]
pub(crate) fn grad_sums<T: Element>(x: &[T], dy: &[T], mean: f64) -> (f64, f64) {
    let mut sum_dy = [0.0f64; LANES];
    let mut sum_dy_xmu = [0.0f64; LANES];
    let (xc, dyc) = (x.chunks_exact(LANES), dy.chunks_exact(LANES));
    let (x_tail, dy_tail) = (xc.remainder(), dyc.remainder());
    for (xs, gs) in xc.zip(dyc) {
        for lane in 0..LANES {
            let g = gs[lane].to_f64();
            sum_dy[lane] += g;
            sum_dy_xmu[lane] += g * (xs[lane].to_f64() - mean);
        }
    }
    let (mut tail_dy, mut tail_dy_xmu) = (0.0, 0.0);
    for (&xv, &gv) in x_tail.iter().zip(dy_tail) {
        tail_dy += gv.to_f64();
        tail_dy_xmu += gv.to_f64() * (xv.to_f64() - mean);
    }
    (sum_dy.iter().sum::<f64>() + tail_dy, sum_dy_xmu.iter().sum::<f64>() + tail_dy_xmu)
}

/// y = (x − shift) · scale + offset.
#[inline]
pub(crate) fn normalize<T: Element>(x: &[T], y: &mut [T], shift: f64, scale: f64, offset: f64) {
    for (out, &v) in y.iter_mut().zip(x) {
        *out = T::from_f64((v.to_f64() - shift) * scale + offset);
    }
}

/// dx = ((dy − mean_dy) − (x − mean) · k) · scale: the input gradient through batch statistics.
#[inline]
pub(crate) fn grad_input_batch<T: Element>(
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    mean: f64,
    mean_dy: f64,
    k: f64,
    scale: f64,
) {
    for ((out, &xv), &gv) in dx.iter_mut().zip(x).zip(dy) {
        *out = T::from_f64(((gv.to_f64() - mean_dy) - (xv.to_f64() - mean) * k) * scale);
    }
}

/// dx = dy · scale: the input gradient when the statistics are constants.
#[inline]
pub(crate) fn grad_input_fixed<T: Element>(dy: &[T], dx: &mut [T], scale: f64) {
    for (out, &gv) in dx.iter_mut().zip(dy) {
        *out = T::from_f64(gv.to_f64() * scale);
    }
}
