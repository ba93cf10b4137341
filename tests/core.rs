//! The pure-Rust core against a plain scalar f64 implementation, on every kernel path:
//! sequential, parallel by channel, split within a channel, and strided (gathered) inputs.

use batchnorm::functional::{batch_norm, batch_norm_backward};
use batchnorm::{BatchNorm, Buffer, Config, Error, Kind, Ranks, SavedStats, Shape, StateTensor, TensorRef, Tuning};

/// Deterministic pseudo-random values with an offset (a small LCG; no extra dependency).
fn data(len: usize, seed: u64, offset: f64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            offset + ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 4.0
        })
        .collect()
}

fn at(shape: Shape, n: usize, c: usize, hw: usize) -> usize {
    (n * shape.c + c) * shape.plane() + hw
}

/// The plain scalar path: per-channel mean and biased variance, then the normalization.
fn scalar_forward(x: &[f64], shape: Shape, eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let m = shape.values_per_channel() as f64;
    let mut y = vec![0.0; x.len()];
    let (mut means, mut vars) = (vec![], vec![]);
    for c in 0..shape.c {
        let values: Vec<f64> = (0..shape.n)
            .flat_map(|n| (0..shape.plane()).map(move |i| (n, i)))
            .map(|(n, i)| x[at(shape, n, c, i)])
            .collect();
        let mean = values.iter().sum::<f64>() / m;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / m;
        for n in 0..shape.n {
            for i in 0..shape.plane() {
                y[at(shape, n, c, i)] = (x[at(shape, n, c, i)] - mean) / (var + eps).sqrt();
            }
        }
        means.push(mean);
        vars.push(var);
    }
    (y, means, vars)
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "index {i}: got {g}, want {w}");
    }
}

/// With the sequential threshold lowered, every plan the CPU backend can choose: tiny planes
/// (image-major), many channels with large planes (channel groups), few channels (split within
/// channels), one image (split within a plane).
const SHAPES: [Shape; 6] = [
    Shape::new(2, 3, 4, 5),
    Shape::new(4, 64, 16, 16),
    Shape::new(2, 16, 32, 32),
    Shape::new(8, 3, 64, 64),
    Shape::new(1, 1, 300, 300),
    Shape::new(3, 2, 1, 1),
];

/// The default thresholds run these small shapes on the calling thread; lowered, the same shapes
/// take the parallel plans, and the plans seen are checked so the test reaches what it names.
#[test]
fn training_forward_matches_scalar_path_on_every_plan() {
    let mut plans = std::collections::BTreeSet::new();
    for (tuning, shape) in [Tuning::DEFAULT, Tuning { sequential_below_bytes: 0, ..Tuning::DEFAULT }]
        .into_iter()
        .flat_map(|tuning| SHAPES.map(|shape| (tuning, shape)))
    {
        tuning.set();
        let x = data(shape.numel(), 1, 100.0);
        let (want, means, vars) = scalar_forward(&x, shape, 1e-5);
        let mut layer = BatchNorm::<f64>::new(Kind::BatchNorm2d, Config::new(shape.c)).unwrap();
        let mut y = vec![0.0; shape.numel()];
        layer.forward(&TensorRef::contiguous(&x, shape).unwrap(), &mut y).unwrap();
        let saved = layer.saved().cloned().unwrap();
        plans.insert(format!("{:?}", batchnorm::last_plan().unwrap().kind));
        assert_close(&y, &want, 1e-10);
        assert_close(saved.mean(), &means, 1e-12);
        let count = shape.values_per_channel() as f64;
        let running: Vec<f64> = vars.iter().map(|v| 0.9 + 0.1 * v * count / (count - 1.0)).collect();
        assert_close(layer.running_var().unwrap(), &running, 1e-12);
    }
    Tuning::DEFAULT.set();
    if batchnorm::get_num_threads() > 1 {
        for kind in ["Sequential", "ChannelGroups", "SplitChannels", "ImageMajor"] {
            assert!(plans.contains(kind), "no shape ran {kind}: {plans:?}");
        }
    }
}

#[test]
fn float32_statistics_are_accurate_on_offset_data() {
    let shape = Shape::new(8, 3, 64, 64);
    let x64 = data(shape.numel(), 2, 1e4);
    let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
    let exact: Vec<f64> = x32.iter().map(|&v| f64::from(v)).collect();
    let (want, _, _) = scalar_forward(&exact, shape, 1e-5);
    let mut y = vec![0.0f32; shape.numel()];
    BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(3))
        .unwrap()
        .forward(&TensorRef::contiguous(&x32, shape).unwrap(), &mut y)
        .unwrap();
    let err: f64 = y.iter().zip(&want).map(|(&g, w)| (f64::from(g) - w).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    assert!(err / norm < 1e-6, "relative error {}", err / norm);
}

#[test]
fn strided_views_match_contiguous() {
    let shape = Shape::new(3, 4, 5, 6);
    let x = data(shape.numel(), 3, -2.0);
    // The same tensor stored channels-last: element (n, c, h, w) at ((n·H + h)·W + w)·C + c.
    let mut nhwc = vec![0.0; x.len()];
    for n in 0..3 {
        for c in 0..4 {
            for i in 0..30 {
                nhwc[(n * 30 + i) * 4 + c] = x[at(shape, n, c, i)];
            }
        }
    }
    let channels_last = TensorRef::strided(&nhwc, 0, shape, [120, 1, 24, 4]).unwrap();
    assert!(!channels_last.is_contiguous());
    // And reversed along W: negative strides from the last element of each row.
    let mut reversed = vec![0.0; x.len()];
    for row in 0..(3 * 4 * 5) {
        for w in 0..6 {
            reversed[row * 6 + 5 - w] = x[row * 6 + w];
        }
    }
    let flipped = TensorRef::strided(&reversed, 5, shape, [120, 30, 6, -1]).unwrap();
    let (want, _, _) = scalar_forward(&x, shape, 1e-5);
    for view in [channels_last, flipped] {
        let mut y = vec![0.0; x.len()];
        BatchNorm::<f64>::new(Kind::BatchNorm2d, Config::new(4)).unwrap().forward(&view, &mut y).unwrap();
        assert_close(&y, &want, 1e-12);
    }
}

#[test]
fn strided_view_out_of_bounds_is_an_error() {
    let data = vec![0.0f32; 10];
    let err = TensorRef::strided(&data, 0, Shape::new(1, 2, 2, 2), [8, 8, 2, 1]).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { .. }), "{err}");
    let err = TensorRef::strided(&data, 0, Shape::new(1, 1, 1, 2), [1, 1, 1, -1]).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { .. }), "{err}");
}

#[test]
fn backward_matches_finite_differences() {
    let shape = Shape::new(2, 2, 2, 3);
    let x = data(shape.numel(), 4, 1.0);
    let probe = data(shape.numel(), 5, 0.0);
    let weight = vec![1.5, -0.5];
    let loss = |x: &[f64]| {
        let mut y = vec![0.0; x.len()];
        batch_norm(&TensorRef::contiguous(x, shape).unwrap(), &mut y, None, None, Some(&weight), None, true, 0.1, 1e-3)
            .unwrap();
        y.iter().zip(&probe).map(|(a, b)| a * b).sum::<f64>()
    };
    let saved = SavedStats::of_batch(&TensorRef::contiguous(&x, shape).unwrap(), 1e-3).unwrap();
    let mut dx = vec![0.0; x.len()];
    let dy = TensorRef::contiguous(&probe, shape).unwrap();
    batch_norm_backward(&dy, &TensorRef::contiguous(&x, shape).unwrap(), &mut dx, &saved, Some(&weight)).unwrap();
    for i in 0..x.len() {
        let (mut up, mut down) = (x.clone(), x.clone());
        up[i] += 1e-6;
        down[i] -= 1e-6;
        let numeric = (loss(&up) - loss(&down)) / 2e-6;
        assert!((numeric - dx[i]).abs() < 1e-6, "index {i}: {numeric} vs {}", dx[i]);
    }
}

#[test]
fn split_and_whole_channel_backward_agree() {
    // (8, 3, 64, 64) splits each channel across tasks; the same data as 3 separate
    // single-channel calls on (8, 1, 64, 64) must give the same gradients.
    let shape = Shape::new(8, 3, 64, 64);
    let (x, g) = (data(shape.numel(), 6, 3.0), data(shape.numel(), 7, 0.0));
    let run = |x: &[f64], g: &[f64], shape: Shape| {
        let mut layer = BatchNorm::<f64>::new(Kind::BatchNorm2d, Config::new(shape.c)).unwrap();
        let mut y = vec![0.0; x.len()];
        let xr = TensorRef::contiguous(x, shape).unwrap();
        layer.forward(&xr, &mut y).unwrap();
        let mut dx = vec![0.0; x.len()];
        layer.backward(&xr, &TensorRef::contiguous(g, shape).unwrap(), &mut dx).unwrap();
        (dx, layer.grad_weight().unwrap().to_vec())
    };
    let (dx, grad_weight) = run(&x, &g, shape);
    for c in 0..3 {
        let pick = |v: &[f64]| -> Vec<f64> {
            (0..8).flat_map(|n| v[at(shape, n, c, 0)..at(shape, n, c, 0) + 4096].to_vec()).collect()
        };
        let (dx_c, gw_c) = run(&pick(&x), &pick(&g), Shape::new(8, 1, 64, 64));
        assert_close(&pick(&dx), &dx_c, 1e-10);
        assert_close(&grad_weight[c..c + 1], &gw_c, 1e-9);
    }
}

#[test]
fn failed_calls_change_nothing() {
    let mut layer = BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(2)).unwrap();
    let one_value = vec![1.0f32, 2.0];
    let shape = Shape::new(1, 2, 1, 1);
    let mut y = vec![0.0; 2];
    let err = layer.forward(&TensorRef::contiguous(&one_value, shape).unwrap(), &mut y).unwrap_err();
    assert!(err.to_string().contains("Expected more than 1 value per channel"), "{err}");
    assert_eq!(layer.num_batches_tracked(), Some(0));
    assert_eq!(layer.running_mean(), Some(&[0.0, 0.0][..]));
    let wrong_channels = vec![0.0f32; 6];
    let err = layer
        .forward(&TensorRef::contiguous(&wrong_channels, Shape::new(2, 3, 1, 1)).unwrap(), &mut [0.0; 6])
        .unwrap_err();
    assert!(matches!(err, Error::ChannelMismatch { expected: 2, got: 3, .. }));
    assert_eq!(layer.num_batches_tracked(), Some(0));
}

#[test]
fn num_features_zero_is_rejected() {
    assert!(matches!(BatchNorm::<f64>::new(Kind::BatchNorm2d, Config::new(0)), Err(Error::InvalidArgument(_))));
}

#[test]
fn state_dict_round_trip_and_strict_errors() {
    let mut a = BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(3)).unwrap();
    a.buffer_mut(Buffer::Weight).unwrap().copy_from_slice(&[1.0, 2.0, 3.0]);
    let entries: Vec<(String, StateTensor)> =
        a.state_dict().unwrap().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let mut b = BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(3)).unwrap();
    assert_eq!(b.load_state_dict(&entries, true).unwrap(), Default::default());
    assert_eq!(b.weight(), Some(&[1.0, 2.0, 3.0][..]));

    let mut partial = entries.clone();
    partial.retain(|(k, _)| k != "bias");
    partial.push(("extra".into(), StateTensor::float(&[0.0f32])));
    let err = b.load_state_dict(&partial, true).unwrap_err().to_string();
    assert!(err.contains("\"bias\"") && err.contains("\"extra\""), "{err}");
    let report = b.load_state_dict(&partial, false).unwrap();
    assert_eq!((report.missing_keys, report.unexpected_keys), (vec!["bias".to_string()], vec!["extra".to_string()]));

    let mut wrong = entries;
    wrong[0].1 = StateTensor::float(&[9.0f32; 4]);
    let err = b.load_state_dict(&wrong, false).unwrap_err().to_string();
    assert!(err.contains("weight") && err.contains("(4,)") && err.contains("(3,)"), "{err}");
    assert_eq!(b.weight(), Some(&[1.0, 2.0, 3.0][..]));
}

#[test]
fn every_rank_from_2_to_5_has_an_n_c_h_w_view() {
    use batchnorm::Ranks;
    let view = |dims: &[usize], strides: &[isize]| Shape::view_of(dims, strides, Ranks::Any, "input").unwrap();
    assert_eq!(view(&[6, 4], &[4, 1]), Some((Shape::new(6, 4, 1, 1), [4, 1, 1, 1])));
    assert_eq!(view(&[5, 4, 7], &[28, 7, 1]), Some((Shape::new(5, 4, 1, 7), [28, 7, 1, 1])));
    // (N, C, D, H, W) contiguous: D and H merge.
    assert_eq!(view(&[2, 3, 4, 5, 6], &[360, 120, 30, 6, 1]), Some((Shape::new(2, 3, 20, 6), [360, 120, 6, 1])));
    // Every other D of a contiguous array: H and W still nest.
    assert_eq!(view(&[2, 3, 2, 5, 6], &[360, 120, 60, 6, 1]), Some((Shape::new(2, 3, 2, 30), [360, 120, 60, 1])));
    // Every other value along each of D, H, W: nothing nests, a copy is needed.
    assert_eq!(view(&[2, 3, 2, 3, 3], &[360, 120, 60, 12, 2]), None);
    // A 3D input is (N, C, L) for the functional API and (C, H, W) for BatchNorm2d.
    let planes = Shape::view_of(&[5, 4, 7], &[28, 7, 1], Ranks::Planes, "input").unwrap();
    assert_eq!(planes, Some((Shape::new(1, 5, 4, 7), [0, 28, 7, 1])));
    let error = Shape::view_of(&[5], &[1], Ranks::Any, "input").unwrap_err().to_string();
    assert_eq!(error, "expected input to be 2D to 5D (N, C, *), got 1D input of shape (5,)");
}

/// Every kind over every rank it takes, against the plain reference on the same values laid out
/// as (N, C, 1, S); the ranks a kind does not take are errors naming the ones it does.
#[test]
fn every_kind_normalizes_every_rank_it_takes() {
    let cases: [(Kind, &[usize], Ranks); 5] = [
        (Kind::BatchNorm1d, &[6, 3], Ranks::Sequence),
        (Kind::BatchNorm1d, &[4, 3, 7], Ranks::Sequence),
        (Kind::BatchNorm2d, &[4, 3, 5, 6], Ranks::Planes),
        (Kind::BatchNorm3d, &[2, 3, 4, 5, 6], Ranks::Volumes),
        (Kind::BatchNorm3d, &[3, 3, 1, 2, 1], Ranks::Volumes),
    ];
    for (kind, dims, ranks) in cases {
        let (n, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let x = data(n * c * spatial, 9, 4.0);
        let (want, means, _) = scalar_forward(&x, Shape::new(n, c, 1, spatial), 1e-5);
        let mut module = BatchNorm::<f64>::new(kind, Config::new(c)).unwrap();
        let mut y = vec![0.0; x.len()];
        module.forward(&TensorRef::contiguous_dims(&x, dims, ranks).unwrap(), &mut y).unwrap();
        assert_close(&y, &want, 1e-10);
        assert_close(module.saved().unwrap().mean(), &means, 1e-12);
        let dy = data(x.len(), 10, 0.0);
        let mut dx = vec![0.0; x.len()];
        let (xr, dyr) = (
            TensorRef::contiguous_dims(&x, dims, ranks).unwrap(),
            TensorRef::contiguous_dims(&dy, dims, ranks).unwrap(),
        );
        module.backward(&xr, &dyr, &mut dx).unwrap();
        // grad_input sums to zero over each channel when normalizing by batch statistics.
        for channel in 0..c {
            let total: f64 =
                (0..n).flat_map(|i| (0..spatial).map(move |s| (i * c + channel) * spatial + s)).map(|k| dx[k]).sum();
            assert!(total.abs() < 1e-9, "{kind:?} {dims:?}: Σ dx = {total}");
        }
    }
    let mut bn1d = BatchNorm::<f32>::new(Kind::BatchNorm1d, Config::new(3)).unwrap();
    let planes = vec![0.0f32; 2 * 3 * 4 * 4];
    let err = bn1d.forward(&TensorRef::contiguous_dims(&planes, &[2, 3, 4, 4], Ranks::Planes).unwrap(), &mut [0.0; 96]);
    assert!(matches!(err, Err(Error::Rank { .. })), "{err:?}");
    assert_eq!(bn1d.num_batches_tracked(), Some(0));
}

/// Half tensors (read with `TensorRef::half`, written through `TensorMut::half`) give the bits of
/// the same values in float32, rounded once: for contiguous, channels-last and padded layouts, in
/// train, eval and backward, at the plans these shapes choose.
#[test]
fn half_tensors_give_the_bits_of_their_float32_values_rounded_once() {
    use batchnorm::convert::Half;
    use batchnorm::TensorMut;
    use half::{bf16, f16};
    let narrow = |half: Half, v: f32| match half {
        Half::F16 => f16::from_f32(v).to_bits(),
        Half::BF16 => bf16::from_f32(v).to_bits(),
    };
    let widen = |half: Half, b: u16| match half {
        Half::F16 => f16::from_bits(b).to_f32(),
        Half::BF16 => bf16::from_bits(b).to_f32(),
    };
    for half in [Half::F16, Half::BF16] {
        for shape in [Shape::new(4, 3, 5, 7), Shape::new(16, 8, 32, 32), Shape::new(2, 2, 150, 151)] {
            let bits: Vec<u16> = data(shape.numel(), 11, 2.0).iter().map(|&v| narrow(half, (v * 3.0) as f32)).collect();
            let values: Vec<f32> = bits.iter().map(|&b| widen(half, b)).collect();
            let dims = shape.dims();
            // The same values channels-last: (N, H, W, C) memory viewed as (N, C, H, W).
            let (c, h, w) = (shape.c, shape.h, shape.w);
            let mut nhwc = vec![0u16; bits.len()];
            for (i, &b) in bits.iter().enumerate() {
                let (ni, ci, hi, wi) = (i / (c * h * w), i / (h * w) % c, i / w % h, i % w);
                nhwc[((ni * h + hi) * w + wi) * c + ci] = b;
            }
            let cl_strides = [(h * w * c) as isize, 1, (w * c) as isize, c as isize];
            let layouts: [(&[u16], Vec<isize>); 2] =
                [(&bits, vec![(c * h * w) as isize, (h * w) as isize, w as isize, 1]), (&nhwc, cl_strides.to_vec())];
            for (storage, strides) in layouts {
                let mut wide = BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(c)).unwrap();
                let mut narrow_module = BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(c)).unwrap();
                let xr = TensorRef::contiguous(&values, shape).unwrap();
                let hr = TensorRef::half(storage, half, 0, &dims, &strides, Ranks::Planes).unwrap();
                for training in [true, false] {
                    wide.set_training(training);
                    narrow_module.set_training(training);
                    let (mut y, mut yb) = (vec![0f32; values.len()], vec![0u16; values.len()]);
                    wide.forward(&xr, &mut y).unwrap();
                    narrow_module.forward(&hr, TensorMut::half(&mut yb, half)).unwrap();
                    let expected: Vec<u16> = y.iter().map(|&v| narrow(half, v)).collect();
                    assert_eq!(yb, expected, "{half:?} {shape:?} {strides:?} training {training}");
                    let (mut dx, mut dxb) = (vec![0f32; values.len()], vec![0u16; values.len()]);
                    wide.backward(&xr, &xr, &mut dx).unwrap();
                    narrow_module.backward(&hr, &hr, TensorMut::half(&mut dxb, half)).unwrap();
                    let expected: Vec<u16> = dx.iter().map(|&v| narrow(half, v)).collect();
                    assert_eq!(dxb, expected, "grad_input {half:?} {shape:?} {strides:?}");
                }
                assert_eq!(wide.running_var(), narrow_module.running_var());
                assert_eq!(wide.grad_weight(), narrow_module.grad_weight());
            }
        }
    }
    // Half output of a float64 computation is refused: half results come from float32.
    let mut f64_module = BatchNorm::<f64>::new(Kind::BatchNorm2d, Config::new(1)).unwrap();
    let x = [1.0, 2.0];
    let err = f64_module
        .forward(&TensorRef::contiguous(&x, Shape::new(2, 1, 1, 1)).unwrap(), TensorMut::half(&mut [0; 2], Half::F16));
    assert!(matches!(err, Err(Error::DType { .. })), "{err:?}");
}
