//! # batchnorm
//!
//! PyTorch's `BatchNorm2d`, exactly, as a multithreaded Rust core: training and eval forward,
//! running statistics (momentum or cumulative), affine parameters and backward, on `f32` and
//! `f64` tensors of shape (N, C, H, W) with any strides. No Python needed; the bindings live
//! behind the `python` feature.
//!
//! Where things are:
//! - the layer type, [`BatchNorm2d`] (`src/layer.rs`), built on
//! - the functional API, [`functional::batch_norm`] and [`functional::batch_norm_backward`]
//!   (`src/functional.rs`), which validates arguments and dispatches to
//! - the CPU kernels in `src/cpu/`: **the CPU training forward is `cpu::forward::train`**
//!   (`src/cpu/forward.rs`), the eval forward `cpu::forward::eval` beside it, and the backward
//!   passes in `src/cpu/backward.rs`; the innermost per-block loops are in `src/cpu/kernels.rs`,
//!   written once for scalar, AVX2, AVX-512 and NEON and dispatched at run time in
//!   `src/cpu/simd.rs` ([`SimdLevel`]); how work is split across threads is in `src/cpu/mod.rs`;
//! - the CUDA backend in `src/cuda/` (feature `cuda`): [`cuda::CudaBatchNorm2d`], and **the CUDA
//!   training forward, `cuda::forward::train`** (`src/cuda/forward.rs`), launching the kernels of
//!   `src/cuda/kernels.cu`;
//! - shapes and strided views, [`Shape`] and [`TensorRef`] (`src/shape.rs`);
//! - the one error type, [`Error`] (`src/error.rs`), mapped to Python exceptions in
//!   `src/python.rs`, the only file that knows PyO3;
//! - the thread pool, [`set_num_threads`] (`src/threads.rs`).
//!
//! ```
//! use batchnorm::{BatchNorm2d, Config, Shape, TensorRef};
//!
//! let mut bn = BatchNorm2d::<f64>::new(Config { momentum: None, ..Config::new(3) })?;
//! let shape = Shape::new(4, 3, 5, 5);
//! let x: Vec<f64> = (0..shape.numel()).map(|i| (i % 7) as f64).collect();
//! let mut y = vec![0.0; shape.numel()];
//! bn.forward(&TensorRef::contiguous(&x, shape)?, &mut y)?;
//! bn.set_training(false);
//! bn.forward(&TensorRef::contiguous(&x, shape)?, &mut y)?; // uses the running statistics
//! # Ok::<(), batchnorm::Error>(())
//! ```

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod element;
mod error;
pub mod functional;
mod layer;
mod shape;
mod state;
pub mod state_file;
mod threads;

#[cfg(feature = "python")]
mod python;

pub use cpu::simd::SimdLevel;
pub use cpu::{last_plan, PlanKind, PlanReport, Tuning};
pub use element::Element;
pub use error::{Error, Result};
pub use functional::{ParamGrads, SavedStats};
pub use layer::{BatchNorm2d, Buffer, Config, ConfigOverrides};
pub use shape::{Ranks, Shape, TensorRef};
pub use state::{LoadReport, StateTensor, StateValues};
pub use threads::{get_num_threads, set_num_threads};
