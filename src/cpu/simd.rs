//! The one SIMD dispatch point, and the vector operations kernels are written with.
//!
//! Kernels are written once against pulp's `Simd` trait and the [`Lanes`] operations below, and
//! run through [`dispatch`], which enters pulp's `#[target_feature]` trampoline for the
//! instruction set chosen at run time: a wheel built for generic x86-64 still uses AVX2 or
//! AVX-512. pulp, rather than hand-written `std::arch` per instruction set, because one generic
//! kernel then serves scalar, AVX2+FMA, AVX-512 and NEON, and the scalar build of that same
//! kernel is the reference every vector path is tested against. Every [`PartTask::run`] and every
//! closure on its path is `#[inline(always)]`, so the whole loop nest compiles inside the
//! trampoline with its features.

use std::sync::OnceLock;

use pulp::{Simd, WithSimd};

use super::Part;

/// Work on one [`Part`], compiled once per instruction set.
pub(crate) trait PartTask: Sync {
    type Output: Send + Sync;
    /// Implementations must be `#[inline(always)]`.
    fn run<S: Simd>(&self, simd: S, part: &Part) -> Self::Output;
}

/// The instruction sets kernels can run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// One value at a time: the reference.
    Scalar,
    /// x86-64 AVX2 + FMA (8 floats a vector).
    Avx2,
    /// x86-64 AVX-512 (16 floats a vector).
    Avx512,
    /// aarch64 NEON (4 floats a vector).
    Neon,
}

impl SimdLevel {
    pub const fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Neon => "neon",
        }
    }

    /// Every level this CPU can run, best last.
    pub fn available() -> Vec<SimdLevel> {
        let mut levels = vec![SimdLevel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if pulp::x86::V3::try_new().is_some() {
                levels.push(SimdLevel::Avx2);
            }
            if pulp::x86::V4::try_new().is_some() {
                levels.push(SimdLevel::Avx512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        levels.push(SimdLevel::Neon);
        levels
    }

    /// The level kernels use: the best available, or the one `BATCHNORM_SIMD` names
    /// (scalar, avx2, avx512, neon) when this CPU has it — for comparing kernels.
    pub fn active() -> SimdLevel {
        static ACTIVE: OnceLock<SimdLevel> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let available = Self::available();
            let best = available.last().copied().unwrap_or(SimdLevel::Scalar);
            let requested = std::env::var("BATCHNORM_SIMD").ok();
            available.into_iter().find(|level| requested.as_deref() == Some(level.name())).unwrap_or(best)
        })
    }
}

struct OnPart<'a, K> {
    task: &'a K,
    part: &'a Part,
}

impl<K: PartTask> WithSimd for OnPart<'_, K> {
    type Output = K::Output;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> K::Output {
        self.task.run(simd, self.part)
    }
}

/// Runs `task` on `part` with the instruction set `level` (one of [`SimdLevel::available`];
/// any other runs the scalar build).
#[inline]
pub(crate) fn dispatch<K: PartTask>(level: SimdLevel, task: &K, part: &Part) -> K::Output {
    let op = OnPart { task, part };
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => match pulp::x86::V4::try_new() {
            Some(simd) => Simd::vectorize(simd, op),
            None => op.with_simd(pulp::Scalar::new()),
        },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => match pulp::x86::V3::try_new() {
            Some(simd) => Simd::vectorize(simd, op),
            None => op.with_simd(pulp::Scalar::new()),
        },
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon => pulp::Arch::new().dispatch(op),
        _ => op.with_simd(pulp::Scalar::new()),
    }
}

/// The vector operations of an element type: f32 and f64 map onto pulp's `f32s` and `f64s`.
/// Public only inside a private module, which seals [`crate::Element`].
pub trait Lanes: Copy + bytemuck::Pod {
    type V<S: Simd>: Copy;
    fn split<S: Simd>(values: &[Self]) -> (&[Self::V<S>], &[Self]);
    fn split_mut<S: Simd>(values: &mut [Self]) -> (&mut [Self::V<S>], &mut [Self]);
    fn vsplat<S: Simd>(simd: S, value: Self) -> Self::V<S>;
    fn vadd<S: Simd>(simd: S, a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    fn vsub<S: Simd>(simd: S, a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    fn vmul<S: Simd>(simd: S, a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    /// a · b + c, fused where the instruction set has FMA.
    fn vmul_add<S: Simd>(simd: S, a: Self::V<S>, b: Self::V<S>, c: Self::V<S>) -> Self::V<S>;
    /// A vector of `values` (at most a vector's worth), the lanes past them zero.
    fn vload_partial<S: Simd>(simd: S, values: &[Self]) -> Self::V<S>;
    /// Stores the first `values.len()` lanes of `v` into `values`.
    fn vstore_partial<S: Simd>(simd: S, values: &mut [Self], v: Self::V<S>);
    /// The sum of the lanes, in f64.
    fn sum_f64<S: Simd>(v: Self::V<S>) -> f64;
    /// Stores `v` at `dst` bypassing the caches where the instruction set can (x86 AVX2 and
    /// AVX-512 non-temporal stores), so a large output neither pays a read-for-ownership nor
    /// evicts the input a second pass will read.
    ///
    /// # Safety
    /// `dst` must be valid for a vector's worth of writes and aligned to the vector's size; the
    /// caller must issue [`store_fence`] before another thread reads what was stored.
    unsafe fn vstream<S: Simd>(dst: *mut Self, v: Self::V<S>);
}

/// Orders earlier non-temporal stores before later stores (a no-op elsewhere than x86-64).
#[inline(always)]
pub(crate) fn store_fence() {
    // SAFETY: SFENCE has no preconditions; SSE is part of the x86-64 baseline.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

macro_rules! lanes {
    ($t:ty, $v:ident, $split:ident, $split_mut:ident, $splat:ident, $add:ident, $sub:ident, $mul:ident, $fma:ident,
     $load:ident, $store:ident, $stream256:ident, $stream512:ident) => {
        impl Lanes for $t {
            type V<S: Simd> = S::$v;
            #[inline(always)]
            fn split<S: Simd>(values: &[$t]) -> (&[S::$v], &[$t]) {
                S::$split(values)
            }
            #[inline(always)]
            fn split_mut<S: Simd>(values: &mut [$t]) -> (&mut [S::$v], &mut [$t]) {
                S::$split_mut(values)
            }
            #[inline(always)]
            fn vsplat<S: Simd>(simd: S, value: $t) -> S::$v {
                simd.$splat(value)
            }
            #[inline(always)]
            fn vadd<S: Simd>(simd: S, a: S::$v, b: S::$v) -> S::$v {
                simd.$add(a, b)
            }
            #[inline(always)]
            fn vsub<S: Simd>(simd: S, a: S::$v, b: S::$v) -> S::$v {
                simd.$sub(a, b)
            }
            #[inline(always)]
            fn vmul<S: Simd>(simd: S, a: S::$v, b: S::$v) -> S::$v {
                simd.$mul(a, b)
            }
            #[inline(always)]
            fn vmul_add<S: Simd>(simd: S, a: S::$v, b: S::$v, c: S::$v) -> S::$v {
                simd.$fma(a, b, c)
            }
            #[inline(always)]
            fn vload_partial<S: Simd>(simd: S, values: &[$t]) -> S::$v {
                simd.$load(values)
            }
            #[inline(always)]
            fn vstore_partial<S: Simd>(simd: S, values: &mut [$t], v: S::$v) {
                simd.$store(values, v)
            }
            #[inline(always)]
            fn sum_f64<S: Simd>(v: S::$v) -> f64 {
                let mut total = 0.0;
                for &lane in bytemuck::cast_slice::<S::$v, $t>(std::slice::from_ref(&v)) {
                    total += f64::from(lane);
                }
                total
            }
            #[inline(always)]
            unsafe fn vstream<S: Simd>(dst: *mut $t, v: S::$v) {
                // The vector's size tells the instruction set apart at compile time: the branch
                // for another size is never taken, and its intrinsic never runs without its feature.
                #[cfg(target_arch = "x86_64")]
                match size_of::<S::$v>() {
                    64 => return std::arch::x86_64::$stream512(dst, bytemuck::cast(v)),
                    32 => return std::arch::x86_64::$stream256(dst, bytemuck::cast(v)),
                    _ => {}
                }
                std::ptr::write_unaligned(dst.cast::<S::$v>(), v);
            }
        }
    };
}

lanes!(
    f32,
    f32s,
    as_simd_f32s,
    as_mut_simd_f32s,
    splat_f32s,
    add_f32s,
    sub_f32s,
    mul_f32s,
    mul_add_e_f32s,
    partial_load_f32s,
    partial_store_f32s,
    _mm256_stream_ps,
    _mm512_stream_ps
);
lanes!(
    f64,
    f64s,
    as_simd_f64s,
    as_mut_simd_f64s,
    splat_f64s,
    add_f64s,
    sub_f64s,
    mul_f64s,
    mul_add_e_f64s,
    partial_load_f64s,
    partial_store_f64s,
    _mm256_stream_pd,
    _mm512_stream_pd
);
