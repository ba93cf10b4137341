//! The element types the layer computes on: `f32` and `f64`.
//!
//! Kernels accumulate and normalize in `f64` whatever the storage type: BatchNorm is bound by
//! memory traffic, so the wider arithmetic costs nothing measurable and keeps float32 statistics
//! accurate on data with a large offset.

/// A floating-point storage type the layer can run on.
pub trait Element: Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static {
    /// NumPy's name for the type (`"float32"`, `"float64"`).
    const DTYPE: &'static str;
    fn to_f64(self) -> f64;
    fn from_f64(value: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: &'static str = "float32";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn from_f64(value: f64) -> Self {
        value as f32
    }
}

impl Element for f64 {
    const DTYPE: &'static str = "float64";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(value: f64) -> Self {
        value
    }
}
