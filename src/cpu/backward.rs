//! The CPU backward passes. Both return per-channel Σ dy and Σ dy·(x − mean), from which the
//! caller forms grad_bias and grad_weight.

use pulp::Simd;

use super::kernels::{grad_input_batch, grad_input_fixed, GradAccumulator, Split};
use super::simd::{store_fence, PartTask, SimdLevel};
use super::{fold_pieces, for_each_block, At, Part, Passes, Plan, SharedOut};
use crate::element::Element;
use crate::error::Result;
use crate::shape::{TensorMut, TensorRef};

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

/// What the backward of each channel needs: its statistics and the weight.
struct Channels<'a, T> {
    x: &'a TensorRef<'a, T>,
    dy: &'a TensorRef<'a, T>,
    dx: &'a SharedOut<'a, T>,
    mean: Vec<Split<T>>,
    /// w · invstd, the factor dy is scaled by.
    scale: Vec<f64>,
    invstd: &'a [f64],
    count: f64,
}

impl<'a, T: Element> Channels<'a, T> {
    fn new(
        x: &'a TensorRef<'a, T>,
        dy: &'a TensorRef<'a, T>,
        dx: &'a SharedOut<'a, T>,
        mean: &[f64],
        invstd: &'a [f64],
        weight: Option<&[T]>,
    ) -> Self {
        let scale = invstd.iter().enumerate().map(|(c, is)| is * weight.map_or(1.0, |w| w[c].to_f64())).collect();
        let count = x.shape().values_per_channel() as f64;
        Channels { x, dy, dx, mean: mean.iter().map(|&m| Split::new(m)).collect(), scale, invstd, count }
    }

    /// The sums over each piece of the part, in (piece, channel) order, calling `also(at, xs, gs)`
    /// on each block while it is in L1. Plain loops, as in `forward::moments_of`.
    #[inline(always)]
    fn sums<S: Simd>(&self, simd: S, part: &Part, mut also: impl FnMut(At, &[T], &[T])) -> Vec<GradSums> {
        let mut sums = Vec::with_capacity(part.channels.len() * part.piece_count());
        let mut channels = Vec::with_capacity(part.channels.len());
        for piece in part.pieces() {
            for c in part.channels.clone() {
                channels.push(GradAccumulator::new(simd, self.mean[c]));
            }
            for_each_block(
                [self.x, self.dy],
                &piece,
                #[inline(always)]
                |at: At, [xs, gs]| {
                    channels[at.c - part.channels.start].add(xs, gs);
                    also(at, xs, gs);
                },
            );
            for channel in channels.drain(..) {
                let (sum_dy, sum_dy_xmu) = channel.finish();
                sums.push(GradSums { sum_dy, sum_dy_xmu });
            }
        }
        sums
    }

    /// dx through batch statistics, given the channels' complete sums.
    #[inline(always)]
    fn write_batch<S: Simd>(&self, simd: S, part: &Part, sums: impl Fn(usize) -> GradSums) {
        let coefficients: Vec<(T, T, T)> = part
            .channels
            .clone()
            .map(|c| {
                let s = sums(c);
                let k = s.sum_dy_xmu * self.invstd[c] * self.invstd[c] / self.count;
                (T::from_f64(s.sum_dy / self.count), T::from_f64(k), T::from_f64(self.scale[c]))
            })
            .collect();
        let mut staged = self.dx.staging();
        for_each_block(
            [self.x, self.dy],
            part,
            #[inline(always)]
            |at: At, [xs, gs]| {
                let (mean_dy, k, scale) = coefficients[at.c - part.channels.start];
                // SAFETY: parts are disjoint and this task owns every block of its part.
                unsafe {
                    self.dx.write_block(
                        at,
                        xs.len(),
                        &mut staged,
                        #[inline(always)]
                        |out| grad_input_batch(simd, self.dx.stream(), xs, gs, out, self.mean[at.c], mean_dy, k, scale),
                    )
                };
            },
        );
        if self.dx.stream() {
            store_fence();
        }
    }
}

struct Sums<'a, T>(&'a Channels<'a, T>);

impl<T: Element> PartTask for Sums<'_, T> {
    type Output = Vec<GradSums>;
    #[inline(always)]
    fn run<S: Simd>(&self, simd: S, part: &Part) -> Vec<GradSums> {
        self.0.sums(
            simd,
            part,
            #[inline(always)]
            |_, _, _| {},
        )
    }
}

struct WriteBatch<'a, T> {
    channels: &'a Channels<'a, T>,
    sums: &'a [GradSums],
}

impl<T: Element> PartTask for WriteBatch<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(&self, simd: S, part: &Part) {
        self.channels.write_batch(
            simd,
            part,
            #[inline(always)]
            |c| self.sums[c],
        );
    }
}

/// Both passes over parts of whole channels: the second pass finds the part in cache.
struct FusedBatch<'a, T>(&'a Channels<'a, T>);

impl<T: Element> PartTask for FusedBatch<'_, T> {
    type Output = Vec<GradSums>;
    #[inline(always)]
    fn run<S: Simd>(&self, simd: S, part: &Part) -> Vec<GradSums> {
        let sums = self.0.sums(
            simd,
            part,
            #[inline(always)]
            |_, _, _| {},
        );
        let mut merged = vec![None; part.channels.len()];
        fold_pieces(&mut merged, &sums, GradSums::add);
        self.0.write_batch(
            simd,
            part,
            #[inline(always)]
            |c| merged[c - part.channels.start].unwrap_or_default(),
        );
        sums
    }
}

/// Sums and dx = dy · scale in one pass.
struct Fixed<'a, T>(&'a Channels<'a, T>);

impl<T: Element> PartTask for Fixed<'_, T> {
    type Output = Vec<GradSums>;
    #[inline(always)]
    fn run<S: Simd>(&self, simd: S, part: &Part) -> Vec<GradSums> {
        let channels = self.0;
        let mut staged = channels.dx.staging();
        let sums = channels.sums(
            simd,
            part,
            #[inline(always)]
            |at: At, _, gs| {
                // SAFETY: parts are disjoint and this task owns every block of its part.
                unsafe {
                    channels.dx.write_block(
                        at,
                        gs.len(),
                        &mut staged,
                        #[inline(always)]
                        |out| grad_input_fixed(simd, channels.dx.stream(), gs, out, T::from_f64(channels.scale[at.c])),
                    )
                };
            },
        );
        if channels.dx.stream() {
            store_fence();
        }
        sums
    }
}

/// Gradients when the forward normalized with batch statistics, which depend on x:
/// dx = (w·invstd) · (dy − mean(dy) − (x − mean) · invstd² · mean(dy·(x − mean))).
pub(crate) fn through_batch_stats<T: Element>(
    x: &TensorRef<'_, T>,
    dy: &TensorRef<'_, T>,
    dx: TensorMut<'_, T>,
    mean: &[f64],
    invstd: &[f64],
    weight: Option<&[T]>,
    level: SimdLevel,
) -> Result<Vec<GradSums>> {
    let plan = Plan::new(x.shape(), 2 * size_of::<T>(), Passes::Two, level)?;
    let dx = SharedOut::new(dx, x.shape());
    let channels = Channels::new(x, dy, &dx, mean, invstd, weight);
    if plan.whole_channels() {
        return Ok(plan.per_channel(plan.run(&FusedBatch(&channels)), GradSums::add));
    }
    let sums = plan.per_channel(plan.run(&Sums(&channels)), GradSums::add);
    plan.run(&WriteBatch { channels: &channels, sums: &sums });
    Ok(sums)
}

/// Gradients when the forward normalized with constant statistics (eval with running stats):
/// dx = dy · w · invstd, in the same pass as the sums.
pub(crate) fn through_fixed_stats<T: Element>(
    x: &TensorRef<'_, T>,
    dy: &TensorRef<'_, T>,
    dx: TensorMut<'_, T>,
    mean: &[f64],
    invstd: &[f64],
    weight: Option<&[T]>,
    level: SimdLevel,
) -> Result<Vec<GradSums>> {
    let plan = Plan::new(x.shape(), 2 * size_of::<T>(), Passes::One, level)?;
    let dx = SharedOut::new(dx, x.shape());
    let channels = Channels::new(x, dy, &dx, mean, invstd, weight);
    Ok(plan.per_channel(plan.run(&Fixed(&channels)), GradSums::add))
}
