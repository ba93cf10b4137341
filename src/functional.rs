//! `torch.nn.functional.batch_norm` and its backward, on slices: for callers with their own
//! module or autograd. [`crate::BatchNorm`] is built on these two functions.

use crate::checks::{check_batch_size, check_eps, check_len, check_same_dims, check_target};
use crate::cpu::backward::{through_batch_stats, through_fixed_stats};
use crate::cpu::forward::{self, inv_std, ChannelAffine};
use crate::cpu::kernels::Moments;
use crate::cpu::simd::SimdLevel;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::shape::{Shape, TensorMut, TensorRef};

/// What a forward normalized with, kept for its backward: per-channel mean and 1/sqrt(var + eps),
/// and whether they were the batch's own statistics (so gradients flow through them) or
/// constants (running statistics in eval).
#[derive(Clone, Debug, PartialEq)]
pub struct SavedStats {
    shape: Shape,
    mean: Vec<f64>,
    invstd: Vec<f64>,
    from_batch: bool,
}

impl SavedStats {
    /// The statistics of `x` itself (what a training forward normalizes with).
    pub fn of_batch<T: Element>(x: &TensorRef<'_, T>, eps: f64) -> Result<Self> {
        check_eps(eps, true)?;
        let shape = x.shape();
        check_batch_size(shape, x.dims())?;
        if shape.numel() == 0 {
            return Ok(Self::empty_batch(shape));
        }
        Ok(Self::of_moments(shape, &forward::statistics(x, SimdLevel::active())?, eps))
    }

    fn of_moments(shape: Shape, moments: &[Moments], eps: f64) -> Self {
        SavedStats {
            shape,
            mean: moments.iter().map(|m| m.mean).collect(),
            invstd: moments.iter().map(|m| inv_std(m.biased_var(), eps)).collect(),
            from_batch: true,
        }
    }

    /// Running statistics used as constants (what an eval forward normalizes with).
    pub fn from_running<T: Element>(shape: Shape, running_mean: &[T], running_var: &[T], eps: f64) -> Result<Self> {
        check_eps(eps, false)?;
        check_len("running_mean", running_mean.len(), shape.c)?;
        check_len("running_var", running_var.len(), shape.c)?;
        Ok(SavedStats {
            shape,
            mean: running_mean.iter().map(|m| m.to_f64()).collect(),
            invstd: running_var.iter().map(|v| inv_std(v.to_f64(), eps)).collect(),
            from_batch: false,
        })
    }

    /// What the backward of a functional forward differentiates with: the batch's statistics
    /// when `training`, else the running statistics, which must then be given (as PyTorch's
    /// `batch_norm_backward` takes them).
    pub fn for_backward<T: Element>(
        x: &TensorRef<'_, T>,
        running_mean: Option<&[T]>,
        running_var: Option<&[T]>,
        training: bool,
        eps: f64,
    ) -> Result<Self> {
        match (training, running_mean, running_var) {
            (true, _, _) => Self::of_batch(x, eps),
            (false, Some(mean), Some(var)) => Self::from_running(x.shape(), mean, var, eps),
            (false, _, _) => {
                Err(Error::InvalidArgument("running_mean and running_var must be given when training is false".into()))
            }
        }
    }

    /// An empty batch has no statistics; zeros keep its (empty) gradients finite.
    fn empty_batch(shape: Shape) -> Self {
        SavedStats { shape, mean: vec![0.0; shape.c], invstd: vec![0.0; shape.c], from_batch: true }
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }
    pub fn invstd(&self) -> &[f64] {
        &self.invstd
    }
    /// Whether gradients flow through the statistics (they were computed from the input).
    pub fn is_from_batch(&self) -> bool {
        self.from_batch
    }
}

/// Gradients of the affine parameters for one backward.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGrads<T> {
    /// Σ dy · x̂ per channel.
    pub grad_weight: Vec<T>,
    /// Σ dy per channel.
    pub grad_bias: Vec<T>,
}

/// `torch.nn.functional.batch_norm`: normalizes `x` into `y` (C-contiguous, same shape): a
/// slice of the element type, or [`TensorMut::half`] output of a float32 computation (with `x`
/// from [`TensorRef::half`]: a float16 or bfloat16 batch normalized with float32 statistics, as
/// PyTorch's mixed precision).
///
/// With `training`, uses the batch's statistics and, when running buffers are given, updates
/// them in place: `running = (1 − momentum)·running + momentum·batch`, with the unbiased
/// variance for `running_var`. Without `training`, normalizes with the running buffers, which
/// must then be given. Nothing is written unless every argument is valid.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm<'y, T: Element>(
    x: &TensorRef<'_, T>,
    y: impl Into<TensorMut<'y, T>>,
    running_mean: Option<&mut [T]>,
    running_var: Option<&mut [T]>,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> Result<SavedStats> {
    let y = y.into();
    let shape = x.shape();
    let c = shape.c;
    check_eps(eps, training)?;
    check_target(shape, &y)?;
    if let Some(w) = weight {
        check_len("weight", w.len(), c)?;
    }
    if let Some(b) = bias {
        check_len("bias", b.len(), c)?;
    }
    let running = match (running_mean, running_var) {
        (Some(mean), Some(var)) => {
            check_len("running_mean", mean.len(), c)?;
            check_len("running_var", var.len(), c)?;
            Some((mean, var))
        }
        (None, None) => None,
        _ => {
            return Err(Error::InvalidArgument(
                "running_mean and running_var must be given together or both be None".into(),
            ))
        }
    };

    if !training {
        let Some((mean, var)) = running else {
            return Err(Error::InvalidArgument(
                "running_mean and running_var must be given when training is false".into(),
            ));
        };
        let saved = SavedStats::from_running(shape, mean, var, eps)?;
        if shape.numel() > 0 {
            let affine: Vec<ChannelAffine<T>> =
                (0..c).map(|ch| ChannelAffine::new(ch, saved.mean[ch], saved.invstd[ch], weight, bias)).collect();
            forward::eval(x, y, &affine, SimdLevel::active())?;
        }
        return Ok(saved);
    }

    check_batch_size(shape, x.dims())?;
    if shape.numel() == 0 {
        return Ok(SavedStats::empty_batch(shape));
    }
    let moments = forward::train(x, y, weight, bias, eps, SimdLevel::active())?;
    if let Some((running_mean, running_var)) = running {
        for (ch, m) in moments.iter().enumerate() {
            let blend = |old: T, new: f64| T::from_f64((1.0 - momentum) * old.to_f64() + momentum * new);
            running_mean[ch] = blend(running_mean[ch], m.mean);
            running_var[ch] = blend(running_var[ch], m.unbiased_var());
        }
    }
    Ok(SavedStats::of_moments(shape, &moments, eps))
}

/// The backward of [`batch_norm`]: writes grad_input into `dx` (C-contiguous; half output as for
/// [`batch_norm`]) and returns the gradients of weight and bias (computed whether or not the
/// forward had them).
pub fn batch_norm_backward<'d, T: Element>(
    dy: &TensorRef<'_, T>,
    x: &TensorRef<'_, T>,
    dx: impl Into<TensorMut<'d, T>>,
    saved: &SavedStats,
    weight: Option<&[T]>,
) -> Result<ParamGrads<T>> {
    let dx = dx.into();
    let shape = saved.shape;
    if x.shape() != shape {
        return Err(Error::ShapeMismatch {
            what: "input".into(),
            expected: shape.dims().to_vec(),
            got: x.shape().dims().to_vec(),
        });
    }
    check_same_dims("grad_output", dy.dims(), x.dims())?;
    check_target(shape, &dx)?;
    if let Some(w) = weight {
        check_len("weight", w.len(), shape.c)?;
    }
    if shape.numel() == 0 {
        let zeros = vec![T::default(); shape.c];
        return Ok(ParamGrads { grad_weight: zeros.clone(), grad_bias: zeros });
    }
    let pass = if saved.from_batch { through_batch_stats } else { through_fixed_stats };
    let sums = pass(x, dy, dx, &saved.mean, &saved.invstd, weight, SimdLevel::active())?;
    Ok(ParamGrads {
        grad_weight: sums.iter().zip(&saved.invstd).map(|(s, is)| T::from_f64(s.sum_dy_xmu * is)).collect(),
        grad_bias: sums.iter().map(|s| T::from_f64(s.sum_dy)).collect(),
    })
}
