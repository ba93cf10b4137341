//! Kernel arguments and launch geometry, shared by the forward and backward launchers.

use std::sync::Arc;

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use super::device::{driver_error, Backend, Device};
use super::memory::{DeviceBuffer, DeviceTensor, Stream};
use crate::convert::Half;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::shape::Shape;

/// `THREADS` and `UNROLL` of kernels.cu.
const THREADS: u32 = 256;
const UNROLL: u64 = 4;
/// `REDUCTION_BLOCKS_PER_MULTIPROCESSOR` of kernels.cu: the reduction passes' blocks resident
/// on one multiprocessor (their launch bounds), so that a grid of that many per multiprocessor
/// runs in one wave, with no second partial wave at the end.
const BLOCKS_PER_MULTIPROCESSOR: u64 = 4;
/// `step_loads` of kernels.cu: the packs of `width` values of `element_bytes` a reduction's
/// thread loads per step, UNROLL 16-byte loads' worth (half that for 2-byte values), at most 16.
fn step_loads(element_bytes: u64, width: u64) -> u64 {
    let bytes = if element_bytes == 2 { UNROLL * 8 } else { UNROLL * 16 };
    (bytes / (element_bytes * width)).min(16)
}
/// The size of the larger per-block partial of kernels.cu (`Moments`: three doubles).
const PARTIAL_BYTES: usize = 24;
/// The size of the larger per-channel coefficient record (`GradAffine<double>`: five doubles).
const COEFFICIENT_BYTES: usize = 40;

/// `ForwardArgs` of kernels.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ForwardArgs {
    pub x: u64,
    pub y: u64,
    pub images: u64,
    pub channels: u64,
    pub plane: u64,
    pub reduction_plane_divisor: u64,
    pub plane_divisor: u64,
    pub channel_divisor: u64,
    pub splits: u64,
    pub partials: u64,
    pub arrivals: u64,
    pub coefficients: u64,
    pub saved_mean: u64,
    pub saved_invstd: u64,
    pub running_mean: u64,
    pub running_var: u64,
    pub weight: u64,
    pub bias: u64,
    pub factor: f64,
    pub eps: f64,
}

/// `BackwardArgs` of kernels.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BackwardArgs {
    pub x: u64,
    pub dy: u64,
    pub dx: u64,
    pub images: u64,
    pub channels: u64,
    pub plane: u64,
    pub reduction_plane_divisor: u64,
    pub plane_divisor: u64,
    pub channel_divisor: u64,
    pub splits: u64,
    pub partials: u64,
    pub arrivals: u64,
    pub coefficients: u64,
    pub saved_mean: u64,
    pub saved_invstd: u64,
    pub weight: u64,
    pub grad_weight: u64,
    pub grad_bias: u64,
    pub from_batch: u64,
    pub accumulate: u64,
}

// SAFETY: plain #[repr(C)] structs of 8-byte fields, laid out as their kernels.cu twins.
unsafe impl DeviceRepr for ForwardArgs {}
unsafe impl DeviceRepr for BackwardArgs {}

/// Scratch memory for one layer's launches: per-block partials, per-channel arrival counters
/// (zero between calls), coefficients, and the statistics saved for the backward.
pub(crate) struct Workspace {
    partials: DeviceBuffer<u8>,
    arrivals: DeviceBuffer<u32>,
    coefficients: DeviceBuffer<u8>,
    pub saved_mean: DeviceBuffer<f64>,
    pub saved_invstd: DeviceBuffer<f64>,
    max_splits_total: u64,
}

impl Workspace {
    pub(crate) fn new(device: &Arc<Device>, channels: usize) -> Result<Workspace> {
        // splits ≤ ⌈target / C⌉, so C · splits ≤ target + C.
        let max_splits_total = reduction_target(device) + channels as u64;
        Ok(Workspace {
            partials: DeviceBuffer::unset(device, max_splits_total as usize * PARTIAL_BYTES)?,
            // The kernels count arrivals from zero and reset them to zero after each launch.
            arrivals: DeviceBuffer::zeroed(device, channels)?,
            coefficients: DeviceBuffer::unset(device, channels * COEFFICIENT_BYTES)?,
            saved_mean: DeviceBuffer::unset(device, channels)?,
            saved_invstd: DeviceBuffer::unset(device, channels)?,
            max_splits_total,
        })
    }
}

fn reduction_target(device: &Device) -> u64 {
    BLOCKS_PER_MULTIPROCESSOR * u64::from(device.multiprocessors())
}

/// How a tensor's values sit in device memory: the kernels' name for them, and their size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Storage {
    suffix: &'static str,
    bytes: u64,
}

/// Set to 1, lets half tensors run on a GPU before their kernels have been verified on one.
pub const UNVERIFIED_HALF_KERNELS: &str = "BATCHNORM_UNVERIFIED_HALF_KERNELS";

impl Storage {
    /// The storage of `tensor` for a launch on `device`. The half kernels have passed the CPU
    /// emulator's tests but have not yet run on a GPU, so a GPU refuses them (the backend ships
    /// no path a GPU has not run) unless `UNVERIFIED_HALF_KERNELS` is 1, as the GPU tests set it.
    pub(crate) fn of<T: Element>(tensor: &DeviceTensor<T>, device: &Device) -> Result<Storage> {
        let verified = || {
            matches!(device.backend, Backend::Emulator(_))
                || std::env::var(UNVERIFIED_HALF_KERNELS).is_ok_and(|value| value == "1")
        };
        match tensor.half_type() {
            Some(half) if !verified() => Err(Error::Unsupported(format!(
                "{} tensors on a GPU: their CUDA kernels have passed the CPU emulator's tests but have not yet run on \
                 a GPU; set {UNVERIFIED_HALF_KERNELS}=1 to use them anyway, or keep the module on the CPU, which \
                 runs half inputs",
                half.name()
            ))),
            None => Ok(Storage { suffix: dtype_suffix::<T>(), bytes: std::mem::size_of::<T>() as u64 }),
            // Half kernels compute in float32, for float32 modules only.
            Some(half) if T::DTYPE != "float32" => Err(Error::DType {
                what: "input".into(),
                expected: T::DTYPE.into(),
                got: format!("{} (half inputs run on float32 modules)", half.name()),
            }),
            Some(Half::F16) => Ok(Storage { suffix: "f16", bytes: 2 }),
            Some(Half::BF16) => Ok(Storage { suffix: "bf16", bytes: 2 }),
        }
    }

    /// The pack widths kernels.cu has for these values, widest first: 16 bytes' worth, for
    /// halves also 8 bytes' (planes such as 14x14), and one value.
    fn widths(self) -> [u64; 3] {
        let wide = 16 / self.bytes;
        [wide, if self.bytes == 2 { 4 } else { wide }, 1]
    }
}

/// How a launch walks a tensor: its dims and the load widths.
pub(crate) struct Geometry {
    pub images: u64,
    pub channels: u64,
    pub plane: u64,
    /// Values per load of the element-wise passes: 16 bytes' worth when every plane and pointer
    /// allows it, else 1 (no value depends on it).
    pub width: u64,
    /// Values per pack of the reductions: the widest the plane allows, whatever the pointers,
    /// so that which thread sums which value depends on the shape alone.
    pub reduction_width: u64,
    /// Whether every pointer is 16-byte aligned, so wide packs load in one instruction.
    aligned: bool,
    storage: Storage,
}

impl Geometry {
    pub(crate) fn new(storage: Storage, shape: Shape, pointers: &[u64]) -> Result<Geometry> {
        // A launch's gridDim.x (one block per channel) is at most 2³¹ − 1.
        if shape.c > i32::MAX as usize {
            return Err(Error::Unsupported(format!(
                "the CUDA kernels take at most {} channels, got {}",
                i32::MAX,
                shape.c
            )));
        }
        let plane = (shape.h * shape.w) as u64;
        let aligned = pointers.iter().all(|p| p % 16 == 0);
        let reduction_width = storage.widths().into_iter().find(|&w| plane.is_multiple_of(w)).unwrap_or(1);
        let width = if aligned { reduction_width } else { 1 };
        Ok(Geometry {
            images: shape.n as u64,
            channels: shape.c as u64,
            plane,
            width,
            reduction_width,
            aligned,
            storage,
        })
    }

    /// `normalize_f32x4` and the like.
    pub(crate) fn kernel(&self, kernel: &str) -> String {
        format!("{kernel}_{}x{}", self.storage.suffix, self.width)
    }

    /// `statistics_f32x4`, `statistics_f32x4u` (wide packs, unaligned pointers) and the like.
    pub(crate) fn reduction(&self, kernel: &str) -> String {
        let unaligned = if self.reduction_width > 1 && !self.aligned { "u" } else { "" };
        format!("{kernel}_{}x{}{unaligned}", self.storage.suffix, self.reduction_width)
    }

    /// Blocks per channel for a reduction pass: as many as one wave of blocks allows (at least
    /// one), never so many that a thread has fewer than two steps of loads.
    pub(crate) fn splits(&self, device: &Device, workspace: &Workspace) -> u64 {
        let packs = self.images * (self.plane / self.reduction_width);
        let min_packs_per_block = 2 * u64::from(THREADS) * step_loads(self.storage.bytes, self.reduction_width);
        let wanted = reduction_target(device) / self.channels;
        let affordable = (packs / min_packs_per_block).max(1);
        wanted.min(affordable).min(u64::from(u16::MAX)).min(workspace.max_splits_total / self.channels).max(1)
    }

    /// Blocks of an elementwise pass over the whole tensor.
    pub(crate) fn tiles(&self) -> Result<u32> {
        let packs = self.images * self.channels * (self.plane / self.width);
        // gridDim.x is at most 2³¹ − 1.
        u32::try_from(packs.div_ceil(u64::from(THREADS) * UNROLL).min(i32::MAX as u64))
            .ok()
            .filter(|&tiles| u64::from(tiles) * u64::from(THREADS) * UNROLL >= packs)
            .ok_or_else(|| Error::Unsupported(format!("a tensor of {packs} packs is too large for one launch")))
    }

    pub(crate) fn forward_args(&self, workspace: &Workspace) -> ForwardArgs {
        ForwardArgs {
            images: self.images,
            channels: self.channels,
            plane: self.plane,
            reduction_plane_divisor: divisor(self.plane / self.reduction_width),
            plane_divisor: divisor(self.plane / self.width),
            channel_divisor: divisor(self.channels),
            partials: workspace.partials.ptr(),
            arrivals: workspace.arrivals.ptr(),
            coefficients: workspace.coefficients.ptr(),
            saved_mean: workspace.saved_mean.ptr(),
            saved_invstd: workspace.saved_invstd.ptr(),
            ..ForwardArgs::default()
        }
    }

    pub(crate) fn backward_args(&self, workspace: &Workspace) -> BackwardArgs {
        BackwardArgs {
            images: self.images,
            channels: self.channels,
            plane: self.plane,
            reduction_plane_divisor: divisor(self.plane / self.reduction_width),
            plane_divisor: divisor(self.plane / self.width),
            channel_divisor: divisor(self.channels),
            partials: workspace.partials.ptr(),
            arrivals: workspace.arrivals.ptr(),
            coefficients: workspace.coefficients.ptr(),
            saved_mean: workspace.saved_mean.ptr(),
            saved_invstd: workspace.saved_invstd.ptr(),
            ..BackwardArgs::default()
        }
    }
}

/// The constants with which kernels.cu's `divide` divides a 32-bit index `n < 2³¹` by `d`:
/// `n / d == umulhi(n, multiplier) >> shift` for `shift = ⌈log2 d⌉ − 1` and `multiplier =
/// ⌈2^(32 + shift) / d⌉` (< 2³² for `d < 2³¹`), packed as `multiplier | shift << 32`; 0 for
/// `d ≤ 1`, which divides by one. Larger `d` only occur with 64-bit indices, which divide plainly.
pub(crate) fn divisor(d: u64) -> u64 {
    if d <= 1 || d >= 1 << 31 {
        return 0;
    }
    let shift = u64::from(64 - (d - 1).leading_zeros()) - 1;
    let multiplier = (1u128 << (32 + shift)).div_ceil(u128::from(d));
    // Below 2³² for every d in range (see above), so the cast keeps it whole.
    multiplier as u64 | shift << 32
}

pub(crate) fn dtype_suffix<T: Element>() -> &'static str {
    if std::mem::size_of::<T>() == 4 {
        "f32"
    } else {
        "f64"
    }
}

/// Queues kernel `name` on `stream` with `THREADS`-thread blocks and its one struct argument.
///
/// # Safety
/// Every pointer in `args` must be valid for what the kernel does with it until the stream's
/// work finishes.
pub(crate) unsafe fn launch<A: DeviceRepr>(
    device: &Device,
    name: &str,
    grid: (u32, u32),
    stream: Stream,
    args: &A,
) -> Result<()> {
    match &device.backend {
        Backend::Driver { context, functions, .. } => {
            let function =
                functions.get(name).ok_or_else(|| Error::Cuda(format!("kernel {name} is missing from kernels.cu")))?;
            let borrowed = context.wrap_borrowed_stream(stream.cu());
            let mut builder = borrowed.launch_builder(function);
            builder.arg(args);
            let config =
                LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            builder.launch(config).map(drop).map_err(|e| driver_error(&format!("launching {name}"), e))
        }
        Backend::Emulator(emulator) => emulator.launch(name, grid, THREADS, (args as *const A).cast()),
    }
}

#[cfg(test)]
mod tests {
    use super::divisor;

    /// kernels.cu's `divide`, on the host.
    fn divide(n: u32, d: u32) -> u32 {
        let magic = divisor(u64::from(d));
        let multiplier = magic as u32;
        if multiplier == 0 {
            return n;
        }
        ((u64::from(n) * u64::from(multiplier)) >> 32) as u32 >> (magic >> 32)
    }

    #[test]
    fn division_by_multiply_and_shift_is_exact_below_two_to_the_31() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut random = |below: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % below
        };
        let mut divisors: Vec<u64> = (1..3000).chain([1 << 30, (1 << 30) + 1, (1 << 31) - 1, 3 << 29]).collect();
        divisors.extend((0..3000).map(|_| 1 + random((1 << 31) - 1)));
        for d in divisors {
            let edges = [0, 1, d - 1, d, d + 1, 2 * d - 1, (1 << 31) - 1, (1 << 31) - 2];
            let samples = (0..40).map(|_| random(1 << 31));
            for n in edges.into_iter().chain(samples).filter(|&n| n < 1 << 31) {
                assert_eq!(u64::from(divide(n as u32, d as u32)), n / d, "{n} / {d}");
            }
        }
    }
}
