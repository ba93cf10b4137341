//! # batchnorm
//!
//! PyTorch's `BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d`, exactly, as a multithreaded Rust core:
//! training and eval forward, running statistics (momentum or cumulative), affine parameters and
//! backward, on `f32` and `f64` tensors of shape (N, C, *) with any strides, on the CPU or (feature
//! `cuda`) an NVIDIA GPU. No Python needed; the bindings live behind the `python` feature.
//!
//! Where things are:
//! - the module, [`BatchNorm`] (`src/module.rs`): one type for the whole family ([`Kind`] decides
//!   the input ranks), over the element type, holding its arrays on the CPU or a device; its
//!   configuration and arrays are in `src/config.rs`, every argument check in `src/checks.rs`;
//! - the functional API, [`functional::batch_norm`] and [`functional::batch_norm_backward`]
//!   (`src/functional.rs`), which dispatches to
//! - the CPU kernels in `src/cpu/`: **the CPU training forward is `cpu::forward::train`**
//!   (`src/cpu/forward.rs`), the eval forward `cpu::forward::eval` beside it, and the backward
//!   passes in `src/cpu/backward.rs`; the innermost per-block loops are in `src/cpu/kernels.rs`,
//!   written once for scalar, AVX2, AVX-512 and NEON and dispatched at run time in
//!   `src/cpu/simd.rs` ([`SimdLevel`]); how work is split across threads is in `src/cpu/mod.rs`;
//! - the CUDA backend in `src/cuda/` (feature `cuda`): a module's arrays on a device
//!   (`src/cuda/arrays.rs`), and **the CUDA training forward, `cuda::forward::train`**
//!   (`src/cuda/forward.rs`), launching the kernels of `src/cuda/kernels.cu`;
//! - shapes and strided views, [`Shape`], [`Dims`] and [`TensorRef`] (`src/shape.rs`);
//! - the one error type, [`Error`] (`src/error.rs`), mapped to Python exceptions in
//!   `src/python/`, the only code that knows PyO3;
//! - the thread pool, [`set_num_threads`] (`src/threads.rs`).
//!
//! ```
//! use batchnorm::{BatchNorm, Config, Kind, Shape, TensorRef};
//!
//! let mut bn = BatchNorm::<f64>::new(Kind::BatchNorm2d, Config { momentum: None, ..Config::new(3) })?;
//! let shape = Shape::new(4, 3, 5, 5);
//! let x: Vec<f64> = (0..shape.numel()).map(|i| (i % 7) as f64).collect();
//! let mut y = vec![0.0; shape.numel()];
//! bn.forward(&TensorRef::contiguous(&x, shape)?, &mut y)?;
//! bn.set_training(false);
//! bn.forward(&TensorRef::contiguous(&x, shape)?, &mut y)?; // uses the running statistics
//! # Ok::<(), batchnorm::Error>(())
//! ```

mod checks;
mod config;
pub mod convert;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod element;
mod error;
pub mod functional;
mod module;
mod shape;
mod state;
pub mod state_file;
mod threads;

#[cfg(feature = "python")]
mod python;

pub use config::{Buffer, Config, ConfigOverrides};
pub use cpu::simd::SimdLevel;
pub use cpu::{last_plan, PlanKind, PlanReport, Tuning};
pub use element::Element;
pub use error::{Error, Result};
pub use functional::{ParamGrads, SavedStats};
pub use module::{BatchNorm, Kind};
pub use shape::{Dims, Layout, Ranks, Shape, TensorMut, TensorRef};
pub use state::{LoadReport, StateTensor, StateValues};
pub use threads::{get_num_threads, set_num_threads};
