//! The CUDA backend (feature `cuda`): the same module with its arrays on an NVIDIA GPU.
//!
//! Where things are:
//! - a module's arrays on a device, [`DeviceArrays`] (`arrays.rs`), held by [`crate::BatchNorm`]
//!   while it is on a device, with the work on them ordered across streams by events;
//! - **the CUDA training forward is `forward::train`** (`forward.rs`), eval beside it; the
//!   backward is `backward.rs`; both launch the kernels of `kernels.cu`, which sit next to the
//!   CPU versions they must match (`src/cpu/forward.rs`, `src/cpu/backward.rs`);
//! - kernel arguments, workspace and launch geometry: `launch.rs`;
//! - devices, and the kernels compiled by NVRTC for each, once per process: `device.rs`; there
//!   too [`Device::emulator`], the CPU emulator of `kernels.cu` (`tests/cuda_emulator/`) standing
//!   in for a GPU, so tests drive the kernels through this same launcher without one;
//! - device memory, borrowed tensors, streams and events: `memory.rs`;
//! - finding the driver and NVRTC (pip's `nvidia-cuda-nvrtc` included): `library.rs`.
//!
//! Nothing here links against CUDA: the driver and NVRTC are opened at run time, so a build with
//! this feature runs on a machine without a GPU, where [`device`] returns an error saying so.

mod arrays;
mod backward;
mod device;
pub mod forward;
mod launch;
pub mod library;
mod memory;

pub use arrays::DeviceArrays;
pub use device::{compile, device, device_count, Device};
pub use launch::UNVERIFIED_HALF_KERNELS;
pub use memory::{copy_to_host, device_of_pointer, DeviceBuffer, DeviceTensor, Event, Stream};
