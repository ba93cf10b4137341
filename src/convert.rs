//! float16 and bfloat16 values, and their conversions to and from float32: how half tensors reach
//! the float32 kernels (PyTorch's mixed precision: float32 statistics, output in the input's
//! dtype). A kernel reading a [`crate::TensorRef::half`] widens each block as it reads it; one
//! writing [`crate::TensorMut::Half`] narrows each finished block.
//!
//! float16 converts with the CPU's F16C instructions where it has them (the `half` crate detects
//! them at run time); bfloat16 is the upper half of a float32, a shift either way, rounded to
//! nearest even when narrowing. Every value converts alone, so a result never depends on how the
//! work was split.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

/// The half-precision storage types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    F16,
    BF16,
}

/// `src`'s half values (as their bits) into `dst`, exactly: every half value is a float32.
#[inline]
pub(crate) fn widen_block(half: Half, src: &[u16], dst: &mut [f32]) {
    match half {
        Half::F16 => src.reinterpret_cast::<f16>().convert_to_f32_slice(dst),
        Half::BF16 => src.reinterpret_cast::<bf16>().convert_to_f32_slice(dst),
    }
}

/// `src` rounded to the nearest half values (ties to even) into `dst`, as bits.
#[inline]
pub(crate) fn narrow_block(half: Half, src: &[f32], dst: &mut [u16]) {
    match half {
        Half::F16 => dst.reinterpret_cast_mut::<f16>().convert_from_f32_slice(src),
        Half::BF16 => dst.reinterpret_cast_mut::<bf16>().convert_from_f32_slice(src),
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
            let values: Vec<f32> = (0..len).map(|i| (i as f32 - 1000.5) * 0.37).collect();
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
                    assert_eq!((b, w), (one, widen_one(half, one)), "{half:?} {v}");
                }
            }
        }
    }
}
