//! float16 and bfloat16 to and from float32, a pass over the values on the module's threads: how
//! half inputs reach the float32 kernels (PyTorch's mixed precision: float32 statistics, output in
//! the input's dtype) until the kernels read half values in their SIMD lanes themselves.
//!
//! float16 converts with the CPU's F16C instructions where it has them (the `half` crate detects
//! them at run time); bfloat16 is the upper half of a float32, a shift either way, rounded to
//! nearest even when narrowing. Every value converts alone, so the result does not depend on the
//! thread count or the split.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::Result;
use crate::threads;

/// The half-precision storage types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    F16,
    BF16,
}

/// Values per task: large enough that a task's overhead is noise, small enough to balance.
const CHUNK: usize = 1 << 16;

/// Runs `convert` on matching chunks of `src` and `dst`, in parallel when the pool has threads.
fn chunked<A: Sync, B: Send>(src: &[A], dst: &mut [B], convert: impl Fn(&[A], &mut [B]) + Sync) -> Result<()> {
    let (pool, _) = if src.len() < CHUNK { (None, 1) } else { threads::pool()? };
    let run = || src.par_chunks(CHUNK).zip(dst.par_chunks_mut(CHUNK)).for_each(|(s, d)| convert(s, d));
    match pool {
        Some(pool) => pool.install(run),
        None => src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)).for_each(|(s, d)| convert(s, d)),
    }
    Ok(())
}

/// `src`'s half values (as their bits) into `dst`, exactly: every half value is a float32.
pub fn widen(half: Half, src: &[u16], dst: &mut [f32]) -> Result<()> {
    assert_eq!(src.len(), dst.len(), "convert::widen takes slices of one length");
    match half {
        Half::F16 => chunked(src, dst, |s, d| s.reinterpret_cast::<f16>().convert_to_f32_slice(d)),
        Half::BF16 => chunked(src, dst, |s, d| s.reinterpret_cast::<bf16>().convert_to_f32_slice(d)),
    }
}

/// `src` rounded to the nearest half value (ties to even) into `dst`, as bits.
pub fn narrow(half: Half, src: &[f32], dst: &mut [u16]) -> Result<()> {
    assert_eq!(src.len(), dst.len(), "convert::narrow takes slices of one length");
    match half {
        Half::F16 => chunked(src, dst, |s, d| d.reinterpret_cast_mut::<f16>().convert_from_f32_slice(s)),
        Half::BF16 => chunked(src, dst, |s, d| d.reinterpret_cast_mut::<bf16>().convert_from_f32_slice(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact_and_narrowing_rounds_to_nearest_even_at_any_length() {
        for len in [0, 1, 7, CHUNK - 1, CHUNK + 3, 3 * CHUNK] {
            let values: Vec<f32> = (0..len).map(|i| (i as f32 - 1000.5) * 0.37).collect();
            for half in [Half::F16, Half::BF16] {
                let mut bits = vec![0u16; len];
                narrow(half, &values, &mut bits).unwrap();
                let mut back = vec![0f32; len];
                widen(half, &bits, &mut back).unwrap();
                for ((&v, &b), &w) in values.iter().zip(&bits).zip(&back) {
                    let one = match half {
                        Half::F16 => (f16::from_f32(v).to_bits(), f16::from_bits(b).to_f32()),
                        Half::BF16 => (bf16::from_f32(v).to_bits(), bf16::from_bits(b).to_f32()),
                    };
                    assert_eq!((b, w), one, "{half:?} {v}");
                }
            }
        }
    }
}
