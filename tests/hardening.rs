//! Hostile sizes and values through the Rust API: errors, never panics or aborts; and every
//! work plan the planner can choose, at several thread counts, against a float64 reference.

mod common;

use batchnorm::functional::{batch_norm, batch_norm_backward};
use batchnorm::{
    last_plan, set_num_threads, BatchNorm, Config, Error, Kind, PlanKind, SavedStats, Shape, TensorRef, Tuning,
};

#[test]
fn num_features_too_large_to_allocate_is_an_error() {
    for count in [usize::MAX, usize::MAX / 4, 1 << 62, 1_000_000_000_000] {
        let error = BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(count)).unwrap_err();
        assert!(matches!(error, Error::Memory(_)), "{count}: {error}");
    }
}

#[test]
fn shapes_whose_size_overflows_are_refused() {
    let error = TensorRef::<f32>::contiguous(&[], Shape::new(1 << 62, 4, 1, 1)).unwrap_err();
    assert!(matches!(error, Error::InvalidArgument(_)), "{error}");
    // Zero channels: no elements, but N·H·W alone overflows.
    let error = TensorRef::<f32>::strided(&[], 0, Shape::new(1 << 40, 0, 1 << 40, 1), [0, 0, 0, 0]).unwrap_err();
    assert!(error.to_string().contains("too large"), "{error}");
}

#[test]
fn messages_say_what_was_expected() {
    let error = TensorRef::contiguous(&[0.0f32; 40], Shape::new(1, 3, 4, 4)).unwrap_err().to_string();
    assert_eq!(error, "expected data for the shape of length 48, got length 40");
    let data = [0.0f32; 4];
    let error = TensorRef::strided(&data, 0, Shape::new(1, 1, 1, 2), [1, 1, 1, -1]).unwrap_err().to_string();
    assert!(error.contains("before the start"), "{error}");
    let error = TensorRef::strided(&data, 0, Shape::new(1, 1, 1, 5), [5, 5, 5, 1]).unwrap_err().to_string();
    assert!(error.contains("reaches element 4") && error.contains("holds 4 elements"), "{error}");
}

#[test]
fn eps_follows_pytorch() {
    let shape = Shape::new(2, 1, 1, 2);
    let x = [1.0f64, 2.0, 3.0, 5.0];
    let x = TensorRef::contiguous(&x, shape).unwrap();
    let mut y = [0.0; 4];
    let (mut mean, mut var) = ([0.0], [1.0]);
    for eps in [0.0, -1e-5] {
        let error = batch_norm(&x, &mut y, None, None, None, None, true, 0.1, eps).unwrap_err();
        assert!(error.to_string().contains("eps must be positive"), "{error}");
    }
    let error = batch_norm(&x, &mut y, Some(&mut mean), Some(&mut var), None, None, false, 0.1, -1e-5).unwrap_err();
    assert!(error.to_string().contains("non-negative"), "{error}");
    batch_norm(&x, &mut y, Some(&mut mean), Some(&mut var), None, None, false, 0.1, 0.0).unwrap();
    let mut layer = BatchNorm::<f64>::new(Kind::BatchNorm2d, Config { eps: 0.0, ..Config::new(1) }).unwrap();
    assert!(layer.forward(&x, &mut y).is_err());
    assert_eq!(layer.num_batches_tracked(), Some(0), "a failed call changes nothing");
}

#[test]
fn nan_in_a_batch_reaches_the_running_variance() {
    for values_per_channel in [4, 2048, 2049, 10_000] {
        let shape = Shape::new(1, 1, 1, values_per_channel);
        let mut x: Vec<f32> = (0..values_per_channel).map(|i| i as f32).collect();
        x[values_per_channel / 2] = f32::NAN;
        let mut layer = BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(1)).unwrap();
        let mut y = vec![0.0; x.len()];
        layer.forward(&TensorRef::contiguous(&x, shape).unwrap(), &mut y).unwrap();
        assert!(layer.running_var().unwrap()[0].is_nan(), "{values_per_channel} values");
        assert!(layer.running_mean().unwrap()[0].is_nan(), "{values_per_channel} values");
    }
}

/// Pseudo-random values in [-1, 1) plus `offset` (xorshift).
fn values(count: usize, seed: u64, offset: f64) -> Vec<f64> {
    common::uniform(count, seed).map(|u| offset + 2.0 * u - 1.0).collect()
}

/// Training forward and backward of BatchNorm2d in plain f64, the way the documentation states it.
fn reference(x: &[f64], dy: &[f64], shape: Shape, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let (plane, count) = (shape.plane(), shape.values_per_channel() as f64);
    let index = |n: usize, c: usize, i: usize| (n * shape.c + c) * plane + i;
    let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    for c in 0..shape.c {
        let all = || (0..shape.n).flat_map(move |n| (0..plane).map(move |i| index(n, c, i)));
        let mean = all().map(|k| x[k]).sum::<f64>() / count;
        let var = all().map(|k| (x[k] - mean).powi(2)).sum::<f64>() / count;
        let invstd = 1.0 / (var + eps).sqrt();
        let mean_dy = all().map(|k| dy[k]).sum::<f64>() / count;
        let mean_dy_xhat = all().map(|k| dy[k] * (x[k] - mean) * invstd).sum::<f64>() / count;
        for k in all() {
            let xhat = (x[k] - mean) * invstd;
            y[k] = xhat;
            dx[k] = invstd * (dy[k] - mean_dy - xhat * mean_dy_xhat);
        }
    }
    (y, dx)
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((f64::from(g) - w).abs() <= 2e-5 * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
}

/// Lowered thresholds make small shapes take every plan; each plan runs at 1, 2, 3 and 7 threads.
/// One test, so the process-wide thread count and thresholds are not changed under another test.
#[test]
fn every_plan_at_every_thread_count_matches_the_reference() {
    let cases = [
        (Shape::new(4, 32, 32, 32), PlanKind::ChannelGroups, false),
        (Shape::new(8, 2, 64, 64), PlanKind::SplitChannels, false),
        (Shape::new(64, 16, 5, 7), PlanKind::ImageMajor, false),
        (Shape::new(2, 8, 32, 33), PlanKind::ChannelGroups, true),
    ];
    assert!(set_num_threads(0).is_err());
    assert!(set_num_threads(usize::MAX).is_err(), "the pool is bounded");
    for threads in [1, 2, 3, 7] {
        set_num_threads(threads).unwrap();
        for &(shape, kind, streaming) in &cases {
            let stream_at_bytes = if streaming { 0 } else { usize::MAX };
            Tuning { sequential_below_bytes: 0, stream_at_bytes }.set();
            let x64 = values(shape.numel(), 1, 3.0);
            let dy64 = values(shape.numel(), 2, 0.0);
            let x: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
            let dy: Vec<f32> = dy64.iter().map(|&v| v as f32).collect();
            let exact_x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            let exact_dy: Vec<f64> = dy.iter().map(|&v| f64::from(v)).collect();
            let (want_y, want_dx) = reference(&exact_x, &exact_dy, shape, 1e-5);
            let (xr, dyr) = (TensorRef::contiguous(&x, shape).unwrap(), TensorRef::contiguous(&dy, shape).unwrap());
            let mut y = vec![0.0; x.len()];
            batch_norm(&xr, &mut y, None, None, None, None, true, 0.1, 1e-5).unwrap();
            let plan = last_plan().unwrap();
            let expected_kind = if threads == 1 { PlanKind::Sequential } else { kind };
            assert_eq!(plan.kind, expected_kind, "{shape:?} at {threads} threads: {plan:?}");
            assert_eq!(plan.threads, threads);
            assert_eq!(plan.streaming, streaming, "{shape:?} at {threads} threads: {plan:?}");
            assert_close(&y, &want_y, &format!("y {shape:?} {threads} threads"));
            let saved = SavedStats::of_batch(&xr, 1e-5).unwrap();
            let mut dx = vec![0.0; x.len()];
            batch_norm_backward(&dyr, &xr, &mut dx, &saved, None).unwrap();
            assert_close(&dx, &want_dx, &format!("dx {shape:?} {threads} threads"));
        }
    }
    Tuning::DEFAULT.set();
}
