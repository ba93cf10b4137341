//! Same values, same bits: every result depends on the values, the shape, the configuration and
//! the SIMD level alone — not on the run, the thread count, the plan the size thresholds pick,
//! where the arrays start in memory, or their layout.
//!
//! Each case runs the whole layer (training forward with running statistics, backward, eval
//! forward, backward through the running statistics) and the functional API with `out=`, once
//! sequentially as the baseline, then under every plan the planner can choose at 1, 2, 3 and 7
//! threads with the inputs and outputs 0–3 elements into their buffers, and compares bitwise. The
//! plans that ran are collected, so the test fails if a case stops reaching the plan it is for.
//!
//! One test function: the thread count and the thresholds are process-wide.

mod common;

use std::collections::BTreeSet;

use batchnorm::functional::batch_norm;
use batchnorm::{
    last_plan, set_num_threads, BatchNorm, Config, Element, Kind, Layout, Shape, TensorMut, TensorRef, Tuning,
};

/// Pseudo-random values near `offset` (xorshift), with a few large ones so that sums round.
fn values(count: usize, seed: u64, offset: f64) -> Vec<f64> {
    let far = |i: usize, u: f64| if i.is_multiple_of(97) { 1e3 * u } else { u };
    common::uniform(count, seed).enumerate().map(|(i, u)| offset + far(i, u)).collect()
}

/// Where the arrays of a run sit.
#[derive(Clone, Copy, Debug)]
enum Placement {
    /// `skip` elements into their buffers.
    Offset(usize),
    /// The input as a channels-last (N, H, W, C) buffer viewed as (N, C, H, W), and the outputs
    /// written channels-last too.
    ChannelsLast,
}

/// Everything a run produces, as bits.
#[derive(Debug, PartialEq, Eq)]
struct Results {
    arrays: Vec<(&'static str, Vec<u64>)>,
}

fn bits<T: Element>(values: &[T]) -> Vec<u64> {
    values.iter().map(|v| v.to_f64().to_bits()).collect()
}

/// `values` placed `skip` elements into a buffer of `T`.
fn placed<T: Element>(values: &[f64], skip: usize) -> Vec<T> {
    let mut buffer = vec![T::from_f64(0.0); skip + values.len()];
    for (slot, &v) in buffer[skip..].iter_mut().zip(values) {
        *slot = T::from_f64(v);
    }
    buffer
}

/// The C-contiguous `values` of `shape` rearranged as channels-last, and that layout's strides.
fn channels_last<T: Element>(values: &[f64], shape: Shape) -> (Vec<T>, [isize; 4]) {
    let Shape { c, h, w, .. } = shape;
    let mut buffer = vec![T::from_f64(0.0); values.len()];
    for (i, &v) in values.iter().enumerate() {
        let (ni, ci, hi, wi) = (i / (c * h * w), i / (h * w) % c, i / w % h, i % w);
        buffer[((ni * h + hi) * w + wi) * c + ci] = T::from_f64(v);
    }
    (buffer, [(h * w * c) as isize, 1, (w * c) as isize, c as isize])
}

/// The values of an output written in `layout`, in (N, C, H, W) order.
fn logical<T: Element>(out: &[T], shape: Shape, layout: Layout) -> Vec<T> {
    if layout == Layout::Contiguous {
        return out.to_vec();
    }
    let Shape { c, h, w, .. } = shape;
    (0..out.len())
        .map(|i| {
            let (ni, ci, hi, wi) = (i / (c * h * w), i / (h * w) % c, i / w % h, i % w);
            out[((ni * h + hi) * w + wi) * c + ci]
        })
        .collect()
}

fn view<'a, T: Element>(buffer: &'a [T], skip: usize, shape: Shape, layout: Option<[isize; 4]>) -> TensorRef<'a, T> {
    match layout {
        Some(strides) => TensorRef::strided(buffer, 0, shape, strides).unwrap(),
        None => TensorRef::contiguous(&buffer[skip..], shape).unwrap(),
    }
}

fn run<T: Element>(shape: Shape, placement: Placement, plans: &mut BTreeSet<String>) -> Results {
    let (x, dy) = (values(shape.numel(), 1, 3.0), values(shape.numel(), 2, -0.5));
    let skip = match placement {
        Placement::Offset(skip) => skip,
        Placement::ChannelsLast => 0,
    };
    let (x_buffer, layout) = match placement {
        Placement::Offset(_) => (placed::<T>(&x, skip), None),
        Placement::ChannelsLast => {
            let (buffer, strides) = channels_last::<T>(&x, shape);
            (buffer, Some(strides))
        }
    };
    let dy_buffer = placed::<T>(&dy, skip);
    let xr = view(&x_buffer, skip, shape, layout);
    let dyr = view(&dy_buffer, skip, shape, None);
    let mut note = |what: &str| {
        let plan = last_plan().unwrap();
        plans.insert(format!("{what} {:?}{}", plan.kind, if plan.streaming { " streaming" } else { "" }));
    };

    let config = Config { momentum: Some(0.3), ..Config::new(shape.c) };
    let mut layer = BatchNorm::<T>::new(Kind::BatchNorm2d, config).unwrap();
    let weights: Vec<f64> = (0..shape.c).map(|c| 0.5 + c as f64 / 3.0).collect();
    layer.buffer_mut(batchnorm::Buffer::Weight).unwrap().copy_from_slice(&placed::<T>(&weights, 0));
    let layout = if layout.is_some() { Layout::ChannelsLast } else { Layout::Contiguous };
    let mut out = placed::<T>(&vec![0.0; shape.numel()], skip);
    let target = |out: &mut [T]| -> Vec<T> { logical(out, shape, layout) };
    fn into<T>(out: &mut [T], skip: usize, layout: Layout) -> TensorMut<'_, T> {
        TensorMut::values(&mut out[skip..]).with_layout(layout)
    }
    layer.forward(&xr, into(&mut out, skip, layout)).unwrap();
    let saved = layer.saved().cloned().unwrap();
    note("train");
    let y = bits(&target(&mut out[skip..]));
    let recomputed = batchnorm::SavedStats::of_batch(&xr, 1e-5).unwrap();
    assert_eq!(bits(saved.mean()), bits(recomputed.mean()), "statistics recomputed for a backward");
    assert_eq!(bits(saved.invstd()), bits(recomputed.invstd()), "statistics recomputed for a backward");
    layer.backward(&xr, &dyr, into(&mut out, skip, layout)).unwrap();
    note("backward");
    let dx = bits(&target(&mut out[skip..]));
    layer.set_training(false);
    layer.forward(&xr, into(&mut out, skip, layout)).unwrap();
    note("eval");
    let y_eval = bits(&target(&mut out[skip..]));
    layer.backward(&xr, &dyr, into(&mut out, skip, layout)).unwrap();
    let dx_fixed = bits(&target(&mut out[skip..]));

    let (mut mean, mut var) = (placed::<T>(&vec![0.5; shape.c], 0), placed::<T>(&vec![2.0; shape.c], 0));
    batch_norm(&xr, into(&mut out, skip, layout), Some(&mut mean), Some(&mut var), None, None, true, 0.1, 1e-3)
        .unwrap();
    let y_functional = bits(&target(&mut out[skip..]));

    let grab = |buffer: Option<&[T]>| bits(buffer.unwrap());
    Results {
        arrays: vec![
            ("y", y),
            ("running_mean", grab(layer.running_mean())),
            ("running_var", grab(layer.running_var())),
            ("grad_input", dx),
            ("grad_weight", grab(layer.grad_weight())),
            ("grad_bias", grab(layer.grad_bias())),
            ("y eval", y_eval),
            ("grad_input eval", dx_fixed),
            ("y functional", y_functional),
            ("functional running_mean", bits(&mean)),
            ("functional running_var", bits(&var)),
        ],
    }
}

fn assert_same(got: &Results, want: &Results, context: &str) {
    for ((name, got), (_, want)) in got.arrays.iter().zip(&want.arrays) {
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            let (a, b) = (f64::from_bits(got[i]), f64::from_bits(want[i]));
            panic!("{name}[{i}] is {a:e}, {b:e} in the sequential baseline, {context}");
        }
    }
}

/// Thresholds that send small shapes down every parallel plan, with and without streaming stores.
const PARALLEL: [Tuning; 2] = [
    Tuning { sequential_below_bytes: 0, stream_at_bytes: usize::MAX },
    Tuning { sequential_below_bytes: 0, stream_at_bytes: 0 },
];

fn check<T: Element>(shapes: &[Shape], plans: &mut BTreeSet<String>) {
    for &shape in shapes {
        Tuning::DEFAULT.set();
        set_num_threads(1).unwrap();
        let baseline = run::<T>(shape, Placement::Offset(0), plans);
        let again = run::<T>(shape, Placement::Offset(0), plans);
        assert_same(&again, &baseline, &format!("in a second run at {shape:?}"));
        for threads in [1, 2, 3, 7] {
            set_num_threads(threads).unwrap();
            for tuning in PARALLEL {
                tuning.set();
                for placement in [0, 1, 2, 3].map(Placement::Offset).into_iter().chain([Placement::ChannelsLast]) {
                    let got = run::<T>(shape, placement, plans);
                    let context = format!("at {shape:?}, {threads} threads, {tuning:?}, {placement:?}");
                    assert_same(&got, &baseline, &context);
                }
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_threads_plans_or_addresses() {
    let shapes = [
        Shape::new(2, 16, 32, 32), // channel groups
        Shape::new(8, 2, 64, 64),  // split channels
        Shape::new(256, 8, 5, 7),  // image-major, tiny planes
        Shape::new(2, 8, 32, 33),  // odd planes of at least 4 KiB: streaming stores
        Shape::new(3, 7, 33, 17),  // odd everything
        Shape::new(1, 3, 7, 300),  // one image
    ];
    let mut plans = BTreeSet::new();
    check::<f32>(&shapes, &mut plans);
    check::<f64>(&shapes[..3], &mut plans);
    Tuning::DEFAULT.set();
    for wanted in [
        "train Sequential",
        "train ChannelGroups",
        "train ChannelGroups streaming",
        "train SplitChannels",
        "train ImageMajor",
        "backward ChannelGroups",
        "backward SplitChannels",
        "backward ImageMajor",
        "eval ImageMajor",
        "eval ImageMajor streaming",
    ] {
        assert!(plans.contains(wanted), "no case ran {wanted:?}; ran {plans:?}");
    }
}
