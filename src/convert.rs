//! float16 and bfloat16 values, and their conversions to and from float32: how half tensors reach
//! the float32 kernels (PyTorch's mixed precision: float32 statistics, output in the input's
//! dtype). A kernel reading a [`crate::TensorRef::half`] widens each block as it reads it; one
//! writing [`crate::TensorMut::half`] narrows each finished block.
//!
//! float16 converts with the CPU's F16C instructions where it has them, eight values an
//! instruction, a whole block per call (the `half` crate's slices enter a feature-checked function
//! every eight values, which cost more than the kernels themselves); elsewhere through the `half`
//! crate. bfloat16 is the upper half of a float32: a shift to widen, and to narrow a rounding to
//! nearest even that plain loops vectorize. Every value converts alone, by IEEE rules, so a result
//! never depends on the method or on how the work was split.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

/// The half-precision storage types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    F16,
    BF16,
}

impl Half {
    /// NumPy's (and PyTorch's) name for the type.
    pub fn name(self) -> &'static str {
        match self {
            Half::F16 => "float16",
            Half::BF16 => "bfloat16",
        }
    }
}

/// `src`'s half values (as their bits) into `dst`, exactly: every half value is a float32.
#[inline]
pub(crate) fn widen_block(half: Half, src: &[u16], dst: &mut [f32]) {
    match half {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has F16C (and AVX, which F16C requires).
        Half::F16 if has_f16c() => unsafe { x86::widen_f16(src, dst) },
        Half::F16 => src.reinterpret_cast::<f16>().convert_to_f32_slice(dst),
        Half::BF16 => {
            for (to, &from) in dst.iter_mut().zip(src) {
                *to = f32::from_bits(u32::from(from) << 16);
            }
        }
    }
}

/// `src` rounded to the nearest half values (ties to even) into `dst`, as bits.
#[inline]
pub(crate) fn narrow_block(half: Half, src: &[f32], dst: &mut [u16]) {
    match half {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `widen_block`.
        Half::F16 if has_f16c() => unsafe { x86::narrow_f16(src, dst) },
        Half::F16 => dst.reinterpret_cast_mut::<f16>().convert_from_f32_slice(src),
        Half::BF16 => {
            for (to, &from) in dst.iter_mut().zip(src) {
                *to = narrow_bf16(from);
            }
        }
    }
}

/// One float32 to bfloat16 bits, to nearest, ties to even; NaN stays a (quiet) NaN.
#[inline(always)]
fn narrow_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return (bits >> 16) as u16 | 0x0040;
    }
    // Adding 0x7FFF plus the bit that stays rounds the dropped half to nearest, ties to even.
    (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    static F16C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F16C.get_or_init(|| std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx"))
}

/// float16 conversions with F16C, eight values an instruction; the tail through the `half` crate.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps, _mm_loadu_si128,
        _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };

    use half::f16;
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

    /// # Safety
    /// The CPU must have F16C and AVX.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
        let whole = src.len().min(dst.len()) / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 ≤ whole ≤ both lengths; unaligned loads and stores.
            unsafe {
                let packed = _mm_loadu_si128(src.as_ptr().add(i).cast::<__m128i>());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(packed));
            }
        }
        src[whole..].reinterpret_cast::<f16>().convert_to_f32_slice(&mut dst[whole..]);
    }

    /// # Safety
    /// As [`widen_f16`].
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn narrow_f16(src: &[f32], dst: &mut [u16]) {
        let whole = src.len().min(dst.len()) / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: as in `widen_f16`.
            unsafe {
                let values = _mm256_loadu_ps(src.as_ptr().add(i));
                let packed = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(values);
                _mm_storeu_si128(dst.as_mut_ptr().add(i).cast::<__m128i>(), packed);
            }
        }
        dst[whole..].reinterpret_cast_mut::<f16>().convert_from_f32_slice(&src[whole..]);
    }
}

/// One half value (its bits) as f32.
#[inline]
pub(crate) fn widen_one(half: Half, bits: u16) -> f32 {
    match half {
        Half::F16 => f16::from_bits(bits).to_f32(),
        Half::BF16 => bf16::from_bits(bits).to_f32(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_convert_as_single_values_do() {
        // Every width the vector conversions split into (8 and 16 lanes, and tails).
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 2048] {
            let mut values: Vec<f32> = (0..len).map(|i| (i as f32 - 1000.5) * 0.37).collect();
            // Ties, overflow, subnormals, infinities and NaN, where there is room.
            let special =
                [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 70000.0, 1e-7, f32::INFINITY, -0.0, f32::NAN];
            for (slot, &v) in values.iter_mut().zip(&special) {
                *slot = v;
            }
            for half in [Half::F16, Half::BF16] {
                let mut bits = vec![0u16; len];
                narrow_block(half, &values, &mut bits);
                let mut back = vec![0f32; len];
                widen_block(half, &bits, &mut back);
                for ((&v, &b), &w) in values.iter().zip(&bits).zip(&back) {
                    let one = match half {
                        Half::F16 => f16::from_f32(v).to_bits(),
                        Half::BF16 => bf16::from_f32(v).to_bits(),
                    };
                    let same = b == one || (v.is_nan() && widen_one(half, b).is_nan());
                    assert!(same && w.to_bits() == widen_one(half, b).to_bits(), "{half:?} {v}: {b:#x} vs {one:#x}");
                }
            }
        }
    }
}
