//! The half conversions of the CUDA kernels, checked for every half value: shared by the emulator
//! tests (the kernels' software conversions) and the GPU tests (the GPU's instructions).

use std::sync::Arc;

use batchnorm::convert::Half;
use batchnorm::cuda::{Device, DeviceBuffer, DeviceTensor, Stream};
use batchnorm::{BatchNorm, Buffer, Config, Kind, Ranks};

pub fn narrow(half: Half, value: f32) -> u16 {
    match half {
        Half::F16 => half::f16::from_f32(value).to_bits(),
        Half::BF16 => half::bf16::from_f32(value).to_bits(),
    }
}

pub fn widen(half: Half, bits: u16) -> f32 {
    match half {
        Half::F16 => half::f16::from_bits(bits).to_f32(),
        Half::BF16 => half::bf16::from_bits(bits).to_f32(),
    }
}

/// Every half value through eval forwards that multiply by a scale: the kernels' conversions
/// give what the `half` crate gives for the same float32 product, rounding included: a third
/// (inexact products), 1 + 2⁻¹¹ and 1 + 2⁻⁸ (ties to even for float16 and bfloat16 powers of
/// two), 2⁻²⁰ (subnormal results) and 3·10⁴ (overflow to infinity); NaN stays NaN.
pub fn every_half_value_converts_as_the_half_crate_does(device: &Arc<Device>) {
    let x: Vec<u16> = (0..=u16::MAX).collect();
    let xb = DeviceBuffer::from_host(device, &x).unwrap();
    for half in [Half::F16, Half::BF16] {
        for wanted_scale in [1.0 / 3.0, 1.0 + 2f64.powi(-11), 1.0 + 2f64.powi(-8), 2f64.powi(-20), 3e4] {
            let config = Config { affine: false, eps: 0.0, ..Config::new(1) };
            let mut module = BatchNorm::<f32>::new(Kind::BatchNorm1d, config).unwrap();
            let var = (1.0 / (wanted_scale * wanted_scale)) as f32;
            module.buffer_mut(Buffer::RunningVar).unwrap().fill(var);
            module.set_training(false);
            module.to_device(device).unwrap();
            // The kernels' scale: 1 / sqrt(var + eps) in double, rounded to float32.
            let scale = (1.0 / f64::from(var).sqrt()) as f32;
            // (N, 1) reads a value a load; (N, 1, 8) eight.
            for dims in [vec![x.len(), 1], vec![x.len() / 8, 1, 8]] {
                let yb = DeviceBuffer::<u16>::unset(device, x.len()).unwrap();
                // SAFETY: two live buffers of 65536 half values on the module's device.
                unsafe {
                    let tensor =
                        |b: &DeviceBuffer<u16>| DeviceTensor::half(b.ptr(), &dims, Ranks::Sequence, half).unwrap();
                    module.forward_on_device(tensor(&xb), tensor(&yb), Stream::DEFAULT).unwrap();
                }
                module.synchronize().unwrap();
                for (&bits, &got) in x.iter().zip(&yb.to_host().unwrap()) {
                    let value = widen(half, bits);
                    let context = format!("{half:?} {bits:#06x} ({value}) * {scale}, {dims:?}");
                    if value.is_nan() {
                        assert!(widen(half, got).is_nan(), "{context}: {got:#06x}");
                    } else {
                        assert_eq!(got, narrow(half, value * scale + 0.0), "{context}");
                    }
                }
            }
        }
    }
}
