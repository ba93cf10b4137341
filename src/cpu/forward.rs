//! The CPU forward passes.

use super::kernels::{normalize, Moments};
use super::{for_each_block, Part, Plan, SharedOut};
use crate::element::Element;
use crate::error::Result;
use crate::shape::TensorRef;

/// Per-channel y = (x − shift) · scale + offset.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChannelAffine {
    pub shift: f64,
    pub scale: f64,
    pub offset: f64,
}

impl ChannelAffine {
    /// The affine map of channel `c` for statistics (mean, invstd) and optional weight and bias.
    pub fn new<T: Element>(c: usize, mean: f64, invstd: f64, weight: Option<&[T]>, bias: Option<&[T]>) -> Self {
        let w = weight.map_or(1.0, |w| w[c].to_f64());
        let b = bias.map_or(0.0, |b| b[c].to_f64());
        ChannelAffine { shift: mean, scale: invstd * w, offset: b }
    }
}

fn moments_of<T: Element>(x: &TensorRef<'_, T>, part: &Part) -> Moments {
    let mut moments = Moments::default();
    for_each_block([x], part.channel, part.range.clone(), |_, [xs]| {
        moments = moments.merge(Moments::of(xs));
    });
    moments
}

fn normalize_part<T: Element>(x: &TensorRef<'_, T>, y: &SharedOut<'_, T>, part: &Part, affine: ChannelAffine) {
    let c = part.channel;
    for_each_block([x], c, part.range.clone(), |pos, [xs]| {
        // SAFETY: parts are disjoint and this task owns every block of its part.
        let ys = unsafe { y.block(c, pos, xs.len()) };
        normalize(xs, ys, affine.shift, affine.scale, affine.offset);
    });
}

/// The CPU training forward: per-channel mean and biased variance of `x`, and `y` normalized
/// with them. Returns each channel's moments. `x` must hold at least one element.
pub(crate) fn train<T: Element>(
    x: &TensorRef<'_, T>,
    y: &mut [T],
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
) -> Result<Vec<Moments>> {
    let plan = Plan::new(x.shape())?;
    let y = SharedOut::new(y, x.shape());
    let affine = |c: usize, m: &Moments| ChannelAffine::new(c, m.mean, inv_std(m.biased_var(), eps), weight, bias);
    if plan.whole_channels() {
        return Ok(plan.map(|part| {
            let moments = moments_of(x, part);
            normalize_part(x, &y, part, affine(part.channel, &moments));
            moments
        }));
    }
    let moments = plan.merge(plan.map(|part| moments_of(x, part)), Moments::merge);
    plan.map(|part| normalize_part(x, &y, part, affine(part.channel, &moments[part.channel])));
    Ok(moments)
}

/// Per-channel moments of `x` alone, for a backward whose forward statistics were not kept.
pub(crate) fn statistics<T: Element>(x: &TensorRef<'_, T>) -> Result<Vec<Moments>> {
    let plan = Plan::new(x.shape())?;
    Ok(plan.merge(plan.map(|part| moments_of(x, part)), Moments::merge))
}

/// The CPU eval forward: `y` from `x` with fixed per-channel affine maps, one read and one write.
pub(crate) fn eval<T: Element>(x: &TensorRef<'_, T>, y: &mut [T], affine: &[ChannelAffine]) -> Result<()> {
    let plan = Plan::new(x.shape())?;
    let y = SharedOut::new(y, x.shape());
    plan.map(|part| normalize_part(x, &y, part, affine[part.channel]));
    Ok(())
}

/// 1 / sqrt(var + eps), the factor every normalization multiplies by.
pub(crate) fn inv_std(var: f64, eps: f64) -> f64 {
    1.0 / (var + eps).sqrt()
}
