//! The forward launchers. **The CUDA training forward is `train`**: pass 1 `statistics`
//! (kernels.cu) reduces each channel to moments, and its last block per channel finalizes them
//! and blends the running statistics; pass 2 `normalize` writes y once. Eval is `eval`.

use super::device::Device;
use super::launch::{launch, ForwardArgs, Geometry, Storage, Workspace};
use super::memory::{DeviceTensor, Stream};
use crate::element::Element;
use crate::error::Result;

/// What a forward reads besides x: the layer's (C,) arrays as device pointers (0 when absent),
/// the running-statistics blend factor and eps.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Parameters {
    pub weight: u64,
    pub bias: u64,
    pub running_mean: u64,
    pub running_var: u64,
    pub factor: f64,
    pub eps: f64,
}

/// Normalizes `x` into `y` with the batch's statistics, saving them in `workspace` for the
/// backward; blends them into the running statistics when those pointers are set.
///
/// # Safety
/// `x`, `y` and every pointer in `parameters` must be valid on `device` per [`DeviceTensor`].
pub(crate) unsafe fn train<T: Element>(
    device: &Device,
    stream: Stream,
    x: DeviceTensor<T>,
    y: DeviceTensor<T>,
    parameters: Parameters,
    workspace: &Workspace,
) -> Result<()> {
    let geometry = Geometry::new(Storage::of(&x, device)?, x.shape(), &[x.ptr(), y.ptr()])?;
    let splits = geometry.splits(device, workspace);
    // Every fallible step before the first launch, so a failure queues nothing.
    let tiles = geometry.tiles()?;
    let args = ForwardArgs { splits, ..arguments(&geometry, workspace, x, y, parameters) };
    launch(device, &geometry.reduction("statistics"), (geometry.channels as u32, splits as u32), stream, &args)?;
    launch(device, &geometry.kernel("normalize"), (tiles, 1), stream, &args)
}

/// Normalizes `x` into `y` with the running statistics (which `parameters` must point to),
/// saving them in `workspace` as the constants the backward uses.
///
/// # Safety
/// As [`train`].
pub(crate) unsafe fn eval<T: Element>(
    device: &Device,
    stream: Stream,
    x: DeviceTensor<T>,
    y: DeviceTensor<T>,
    parameters: Parameters,
    workspace: &Workspace,
) -> Result<()> {
    let geometry = Geometry::new(Storage::of(&x, device)?, x.shape(), &[x.ptr(), y.ptr()])?;
    let tiles = geometry.tiles()?;
    let args = arguments(&geometry, workspace, x, y, parameters);
    let coefficient_blocks = geometry.channels.div_ceil(256) as u32;
    let coefficients = format!("eval_coefficients_{}", super::launch::dtype_suffix::<T>());
    launch(device, &coefficients, (coefficient_blocks, 1), stream, &args)?;
    launch(device, &geometry.kernel("normalize"), (tiles, 1), stream, &args)
}

/// The kernels' arguments for a forward of `x` into `y` (one statistics split per channel).
fn arguments<T: Element>(
    geometry: &Geometry,
    workspace: &Workspace,
    x: DeviceTensor<T>,
    y: DeviceTensor<T>,
    parameters: Parameters,
) -> ForwardArgs {
    ForwardArgs {
        x: x.ptr(),
        y: y.ptr(),
        splits: 1,
        running_mean: parameters.running_mean,
        running_var: parameters.running_var,
        weight: parameters.weight,
        bias: parameters.bias,
        factor: parameters.factor,
        eps: parameters.eps,
        ..geometry.forward_args(workspace)
    }
}
