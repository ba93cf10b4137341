//! The CPU backward passes. Both return per-channel Σ dy and Σ dy·(x − mean), from which the
//! caller forms grad_bias and grad_weight.

use super::kernels::{grad_input_batch, grad_input_fixed, grad_sums};
use super::{for_each_block, Part, Plan, SharedOut};
use crate::element::Element;
use crate::error::Result;
use crate::shape::TensorRef;

/// Per-channel sums the parameter gradients are made of.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct GradSums {
    pub sum_dy: f64,
    pub sum_dy_xmu: f64,
}

impl GradSums {
    fn add(self, other: GradSums) -> GradSums {
        GradSums { sum_dy: self.sum_dy + other.sum_dy, sum_dy_xmu: self.sum_dy_xmu + other.sum_dy_xmu }
    }
}

/// The sums over one part, calling `also(pos, xs, gs)` on each block while it is in L1.
fn sums_of<T: Element>(
    x: &TensorRef<'_, T>,
    dy: &TensorRef<'_, T>,
    part: &Part,
    mean: f64,
    mut also: impl FnMut(usize, &[T], &[T]),
) -> GradSums {
    let mut sums = GradSums::default();
    for_each_block([x, dy], part.channel, part.range.clone(), |pos, [xs, gs]| {
        let (sum_dy, sum_dy_xmu) = grad_sums(xs, gs, mean);
        sums = sums.add(GradSums { sum_dy, sum_dy_xmu });
        also(pos, xs, gs);
    });
    sums
}

/// Gradients when the forward normalized with batch statistics, which depend on x:
/// dx = (w·invstd) · (dy − mean(dy) − (x − mean) · invstd² · mean(dy·(x − mean))).
pub(crate) fn through_batch_stats<T: Element>(
    x: &TensorRef<'_, T>,
    dy: &TensorRef<'_, T>,
    dx: &mut [T],
    mean: &[f64],
    invstd: &[f64],
    weight: Option<&[T]>,
) -> Result<Vec<GradSums>> {
    let shape = x.shape();
    let count = shape.values_per_channel() as f64;
    let plan = Plan::new(shape)?;
    let dx = SharedOut::new(dx, shape);
    let write_dx = |part: &Part, sums: GradSums| {
        let c = part.channel;
        let scale = invstd[c] * weight.map_or(1.0, |w| w[c].to_f64());
        let k = sums.sum_dy_xmu * invstd[c] * invstd[c] / count;
        let mean_dy = sums.sum_dy / count;
        for_each_block([x, dy], c, part.range.clone(), |pos, [xs, gs]| {
            // SAFETY: parts are disjoint and this task owns every block of its part.
            let out = unsafe { dx.block(c, pos, xs.len()) };
            grad_input_batch(xs, gs, out, mean[c], mean_dy, k, scale);
        });
    };
    if plan.whole_channels() {
        return Ok(plan.map(|part| {
            let sums = sums_of(x, dy, part, mean[part.channel], |_, _, _| {});
            write_dx(part, sums);
            sums
        }));
    }
    let sums = plan.merge(plan.map(|part| sums_of(x, dy, part, mean[part.channel], |_, _, _| {})), GradSums::add);
    plan.map(|part| write_dx(part, sums[part.channel]));
    Ok(sums)
}

/// Gradients when the forward normalized with constant statistics (eval with running stats):
/// dx = dy · w · invstd, in the same pass as the sums.
pub(crate) fn through_fixed_stats<T: Element>(
    x: &TensorRef<'_, T>,
    dy: &TensorRef<'_, T>,
    dx: &mut [T],
    mean: &[f64],
    invstd: &[f64],
    weight: Option<&[T]>,
) -> Result<Vec<GradSums>> {
    let plan = Plan::new(x.shape())?;
    let dx = SharedOut::new(dx, x.shape());
    let partials = plan.map(|part| {
        let c = part.channel;
        let scale = invstd[c] * weight.map_or(1.0, |w| w[c].to_f64());
        sums_of(x, dy, part, mean[c], |pos, _, gs| {
            // SAFETY: parts are disjoint and this task owns every block of its part.
            let out = unsafe { dx.block(c, pos, gs.len()) };
            grad_input_fixed(gs, out, scale);
        })
    });
    Ok(plan.merge(partials, GradSums::add))
}
