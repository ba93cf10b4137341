//! Criterion benches of the CPU kernels: training forward, eval forward and backward, at a few
//! shapes, on one thread and on all. `cargo bench` (or `make bench-rust`).

use batchnorm::{BatchNorm, Config, Kind, Shape, TensorRef};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SHAPES: [Shape; 3] = [Shape::new(8, 64, 112, 112), Shape::new(32, 64, 56, 56), Shape::new(256, 512, 7, 7)];

fn bench(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut group = c.benchmark_group("batchnorm_f32");
    group.sample_size(20);
    for shape in SHAPES {
        let x: Vec<f32> = (0..shape.numel()).map(|i| ((i * 7919) % 1000) as f32 * 0.01).collect();
        let mut y = vec![0.0f32; shape.numel()];
        let mut dx = vec![0.0f32; shape.numel()];
        group.throughput(Throughput::Bytes((2 * shape.numel() * 4) as u64));
        for threads in [1, cores] {
            batchnorm::set_num_threads(threads).expect("thread pool");
            let label = format!("{:?}/{threads}t", shape.dims());
            let xr = TensorRef::contiguous(&x, shape).expect("shape matches data");
            let mut layer = BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(shape.c)).expect("valid config");
            group.bench_function(BenchmarkId::new("memcpy", &label), |b| b.iter(|| y.copy_from_slice(&x)));
            group.bench_function(BenchmarkId::new("train_forward", &label), |b| {
                b.iter(|| layer.forward(&xr, &mut y).expect("forward"))
            });
            layer.forward(&xr, &mut y).expect("forward");
            group.bench_function(BenchmarkId::new("backward", &label), |b| {
                b.iter(|| layer.backward(&xr, &xr, &mut dx).expect("backward"))
            });
            layer.set_training(false);
            group.bench_function(BenchmarkId::new("eval_forward", &label), |b| {
                b.iter(|| layer.forward(&xr, &mut y).expect("forward"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
