//! The CPU forward passes.

use super::kernels::{normalize, rough_mean, Moments, MomentsAccumulator, Split};
use super::simd::{store_fence, PartTask, SimdLevel};
use super::{fold_pieces, for_each_block, At, Part, Passes, Plan, SharedOut, BLOCK};
use crate::element::Element;
use crate::error::Result;
use crate::shape::{TensorMut, TensorRef};
use pulp::Simd;

/// Per-channel y = (x − mean) · scale + offset, in the storage type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChannelAffine<T> {
    mean: Split<T>,
    scale: T,
    offset: T,
}

impl<T: Element> ChannelAffine<T> {
    /// The affine map of channel `c` for statistics (mean, invstd) and optional weight and bias.
    pub fn new(c: usize, mean: f64, invstd: f64, weight: Option<&[T]>, bias: Option<&[T]>) -> Self {
        let w = weight.map_or(1.0, |w| w[c].to_f64());
        let b = bias.map_or(0.0, |b| b[c].to_f64());
        ChannelAffine { mean: Split::new(mean), scale: T::from_f64(invstd * w), offset: T::from_f64(b) }
    }
}

/// Each channel's moments over each piece of the part, in (piece, channel) order.
///
/// Plain loops, not iterator adaptors: a closure handed to `collect` or `map` is compiled as a
/// function of its own, outside the SIMD trampoline, and its vector operations stop inlining.
#[inline(always)]
fn moments_of<T: Element, S: Simd>(simd: S, x: &TensorRef<'_, T>, part: &Part) -> Vec<Moments> {
    let first_block = x.shape().plane().min(BLOCK);
    let mut buffer = [T::ZERO; BLOCK];
    let mut shifts = Vec::with_capacity(part.channels.len());
    for c in part.channels.clone() {
        shifts.push(rough_mean(simd, x.read(0, c, 0, first_block, &mut buffer)));
    }
    let mut moments = Vec::with_capacity(part.channels.len() * part.piece_count());
    let mut channels = Vec::with_capacity(part.channels.len());
    for piece in part.pieces() {
        for &shift in &shifts {
            channels.push(MomentsAccumulator::new(simd, shift));
        }
        for_each_block(
            [x],
            &piece,
            #[inline(always)]
            |at: At, [xs]| channels[at.c - part.channels.start].add(xs),
        );
        for channel in channels.drain(..) {
            moments.push(channel.finish());
        }
    }
    moments
}

#[inline(always)]
fn normalize_part<T: Element, S: Simd>(
    simd: S,
    x: &TensorRef<'_, T>,
    y: &SharedOut<'_, T>,
    part: &Part,
    affine: impl Fn(usize) -> ChannelAffine<T>,
) {
    let mut staged = y.staging();
    for_each_block(
        [x],
        part,
        #[inline(always)]
        |at: At, [xs]| {
            let a = affine(at.c);
            // SAFETY: parts are disjoint and this task owns every block of its part.
            unsafe {
                y.write_block(
                    at,
                    xs.len(),
                    &mut staged,
                    #[inline(always)]
                    |ys| normalize(simd, y.stream(), xs, ys, a.mean, a.scale, a.offset),
                )
            };
        },
    );
    if y.stream() {
        store_fence();
    }
}

struct Statistics<'a, T> {
    x: &'a TensorRef<'a, T>,
}

impl<T: Element> PartTask for Statistics<'_, T> {
    type Output = Vec<Moments>;
    #[inline(always)]
    fn run<S: Simd>(&self, simd: S, part: &Part) -> Vec<Moments> {
        moments_of(simd, self.x, part)
    }
}

struct Normalize<'a, T> {
    x: &'a TensorRef<'a, T>,
    y: &'a SharedOut<'a, T>,
    affine: &'a [ChannelAffine<T>],
}

impl<T: Element> PartTask for Normalize<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(&self, simd: S, part: &Part) {
        normalize_part(
            simd,
            self.x,
            self.y,
            part,
            #[inline(always)]
            |c| self.affine[c],
        );
    }
}

/// Both passes over parts of whole channels: the second pass finds the part in cache.
struct Train<'a, T> {
    x: &'a TensorRef<'a, T>,
    y: &'a SharedOut<'a, T>,
    affine: &'a (dyn Fn(usize, &Moments) -> ChannelAffine<T> + Sync),
}

impl<T: Element> PartTask for Train<'_, T> {
    type Output = Vec<Moments>;
    #[inline(always)]
    fn run<S: Simd>(&self, simd: S, part: &Part) -> Vec<Moments> {
        let moments = moments_of(simd, self.x, part);
        let mut merged = vec![None; part.channels.len()];
        fold_pieces(&mut merged, &moments, Moments::merge);
        let affine: Vec<_> =
            part.channels.clone().zip(merged).map(|(c, m)| (self.affine)(c, &m.unwrap_or_default())).collect();
        normalize_part(
            simd,
            self.x,
            self.y,
            part,
            #[inline(always)]
            |c| affine[c - part.channels.start],
        );
        moments
    }
}

/// The CPU training forward: per-channel mean and biased variance of `x`, and `y` normalized
/// with them. Returns each channel's moments. `x` must hold at least one element.
pub(crate) fn train<T: Element>(
    x: &TensorRef<'_, T>,
    y: TensorMut<'_, T>,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
    level: SimdLevel,
) -> Result<Vec<Moments>> {
    let plan = Plan::new(x.shape(), size_of::<T>(), Passes::Two, level)?;
    let y = SharedOut::new(y, x.shape());
    let affine = |c: usize, m: &Moments| ChannelAffine::new(c, m.mean, inv_std(m.biased_var(), eps), weight, bias);
    if plan.whole_channels() {
        let moments = plan.run(&Train { x, y: &y, affine: &affine });
        return Ok(plan.per_channel(moments, Moments::merge));
    }
    let moments = plan.per_channel(plan.run(&Statistics { x }), Moments::merge);
    let coefficients: Vec<_> = moments.iter().enumerate().map(|(c, m)| affine(c, m)).collect();
    plan.run(&Normalize { x, y: &y, affine: &coefficients });
    Ok(moments)
}

/// Per-channel moments of `x` alone, for a backward whose forward statistics were not kept.
pub(crate) fn statistics<T: Element>(x: &TensorRef<'_, T>, level: SimdLevel) -> Result<Vec<Moments>> {
    let plan = Plan::new(x.shape(), size_of::<T>(), Passes::One, level)?;
    Ok(plan.per_channel(plan.run(&Statistics { x }), Moments::merge))
}

/// The CPU eval forward: `y` from `x` with fixed per-channel affine maps, one read and one write.
pub(crate) fn eval<T: Element>(
    x: &TensorRef<'_, T>,
    y: TensorMut<'_, T>,
    affine: &[ChannelAffine<T>],
    level: SimdLevel,
) -> Result<()> {
    let plan = Plan::new(x.shape(), size_of::<T>(), Passes::Elementwise, level)?;
    let y = SharedOut::new(y, x.shape());
    plan.run(&Normalize { x, y: &y, affine });
    Ok(())
}

/// 1 / sqrt(var + eps), the factor every normalization multiplies by.
pub(crate) fn inv_std(var: f64, eps: f64) -> f64 {
    1.0 / (var + eps).sqrt()
}
