//! The element types the layer computes on: `f32` and `f64`.

use std::ops::{Add, Mul, Neg, Sub};

use crate::cpu::simd::Lanes;

/// A floating-point storage type the layer can run on: `f32` or `f64` (the trait is sealed).
/// Kernels compute in this type, in SIMD lanes, and combine per-block results in `f64`.
pub trait Element:
    Lanes
    + Default
    + PartialEq
    + Send
    + Sync
    + std::fmt::Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Neg<Output = Self>
    + 'static
{
    /// NumPy's name for the type (`"float32"`, `"float64"`).
    const DTYPE: &'static str;
    const ZERO: Self;
    fn to_f64(self) -> f64;
    fn from_f64(value: f64) -> Self;
    /// The values as `f32`s when they are: half storage converts to and from f32 blocks.
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]>;
}

impl Element for f32 {
    const DTYPE: &'static str = "float32";
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn as_f32(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]> {
        Some(values)
    }
}

impl Element for f64 {
    const DTYPE: &'static str = "float64";
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(value: f64) -> Self {
        value
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}
