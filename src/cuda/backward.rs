//! The backward launcher: pass 1 `gradient_sums` (kernels.cu) reads x and dy once for both
//! reductions and finalizes grad_weight, grad_bias and pass 2's coefficients in each channel's
//! last block; pass 2 `input_gradient` writes dx once.

use super::device::Device;
use super::launch::{launch, BackwardArgs, Geometry, Storage, Workspace};
use super::memory::{DeviceTensor, Stream};
use crate::element::Element;
use crate::error::Result;

/// Where the backward writes the parameter gradients, and how.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Gradients {
    /// The forward's weight (0 without affine), which scales dx.
    pub weight: u64,
    pub grad_weight: u64,
    pub grad_bias: u64,
    /// Add into the gradients instead of overwriting them.
    pub accumulate: bool,
    /// The forward normalized with the batch's own statistics, so the gradient flows through them.
    pub from_batch: bool,
}

/// grad_input of a forward that saved its statistics in `workspace`.
///
/// # Safety
/// `x`, `dy`, `dx` and the pointers in `gradients` must be valid on `device` per [`DeviceTensor`].
pub(crate) unsafe fn backward<T: Element>(
    device: &Device,
    stream: Stream,
    x: DeviceTensor<T>,
    dy: DeviceTensor<T>,
    dx: DeviceTensor<T>,
    gradients: Gradients,
    workspace: &Workspace,
) -> Result<()> {
    let geometry = Geometry::new(Storage::of(&x, device)?, x.shape(), &[x.ptr(), dy.ptr(), dx.ptr()])?;
    let splits = geometry.splits(device, workspace);
    // Every fallible step before the first launch, so a failure queues nothing.
    let tiles = geometry.tiles()?;
    let args = BackwardArgs {
        x: x.ptr(),
        dy: dy.ptr(),
        dx: dx.ptr(),
        splits,
        weight: gradients.weight,
        grad_weight: gradients.grad_weight,
        grad_bias: gradients.grad_bias,
        from_batch: u64::from(gradients.from_batch),
        accumulate: u64::from(gradients.accumulate),
        ..geometry.backward_args(workspace)
    };
    launch(device, &geometry.reduction("gradient_sums"), (geometry.channels as u32, splits as u32), stream, &args)?;
    launch(device, &geometry.kernel("input_gradient"), (tiles, 1), stream, &args)
}
