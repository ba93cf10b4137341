"""CUDA benchmark: batchnorm on the GPU beside PyTorch (cuDNN on and off) and a device-to-device copy.

Run `python -m batchnorm.bench_cuda [--json PATH]` on a machine with a GPU, PyTorch (CUDA) and the
batchnorm wheel. Each case is timed with CUDA events around every call, after warm-up, rotating
among input sets larger than L2 together, and reported as the median; bandwidth counts one read of
x and one write of y (the floor), and is compared with the copy's, measured the same way.
"""

import argparse
import json
import os
import statistics
import sys

import batchnorm

SHAPES = [(32, 64, 56, 56), (256, 64, 56, 56)]
REPEAT = 50
WARMUP = 5


def timed_median_ms(torch, call, inputs):
    for i in range(WARMUP):
        call(*inputs[i % len(inputs)])
    times = []
    for i in range(REPEAT):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[i % len(inputs)]
        start.record()
        call(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cases(torch, shape):
    functional = torch.nn.functional
    c = shape[1]
    sets = max(2, -(-256 * 2**20 // (4 * torch.Size(shape).numel())))  # > 256 MiB in all: beyond any L2
    inputs = [(torch.randn(shape, device="cuda") * 2 + 1, torch.randn(shape, device="cuda")) for _ in range(sets)]
    out = torch.empty(shape, device="cuda")
    ours = batchnorm.BatchNorm2d(c, device="cuda")
    ours_eval = batchnorm.BatchNorm2d(c, device="cuda").eval()
    weight = torch.ones(c, device="cuda", requires_grad=True)
    bias = torch.zeros(c, device="cuda", requires_grad=True)
    mean, var = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")

    def torch_train(x, _):
        functional.batch_norm(x, mean, var, weight, bias, training=True)

    def torch_eval(x, _):
        functional.batch_norm(x, mean, var, weight, bias, training=False)

    def torch_backward(x, dy):
        x = x.detach().requires_grad_()
        y = functional.batch_norm(x, mean, var, weight, bias, training=True)
        torch.autograd.grad(y, (x, weight, bias), dy)

    def ours_backward(x, dy):
        ours(x, out=out)
        ours.backward(dy, out=out)

    rows = {
        "copy": lambda x, _: out.copy_(x),
        "batchnorm train": lambda x, _: ours(x, out=out),
        "batchnorm eval": lambda x, _: ours_eval(x, out=out),
        "batchnorm train+backward": ours_backward,
        "torch train": torch_train,
        "torch eval": torch_eval,
        "torch train+backward": torch_backward,
    }
    results = {name: timed_median_ms(torch, call, inputs) for name, call in rows.items()}
    with torch.backends.cudnn.flags(enabled=False):
        for name in ("train", "eval", "train+backward"):
            results[f"torch (no cuDNN) {name}"] = timed_median_ms(torch, rows[f"torch {name}"], inputs)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m batchnorm.bench_cuda", description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench-results/bench_cuda.json", help="where to write the results")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("python -m batchnorm.bench_cuda needs PyTorch with CUDA (it makes the GPU arrays): pip install torch")
    if not torch.cuda.is_available():
        sys.exit("python -m batchnorm.bench_cuda needs a GPU: PyTorch sees no CUDA device on this machine")
    try:
        batchnorm.BatchNorm2d(1, device="cuda")
    except RuntimeError as error:
        sys.exit(f"python -m batchnorm.bench_cuda: batchnorm cannot use the GPU: {error}")

    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}, batchnorm {batchnorm.__version__}")
    report = {"device": device, "torch": torch.__version__, "shapes": {}}
    for shape in SHAPES:
        results = cases(torch, shape)
        floor_bytes = 2 * 4 * torch.Size(shape).numel()
        copy_rate = floor_bytes / results["copy"] / 1e6
        print(f"\n(N, C, H, W) = {shape}, float32; copy {results['copy']:.3f} ms = {copy_rate:.0f} GB/s")
        for name, ms in results.items():
            rate = floor_bytes / ms / 1e6
            print(f"  {name:34s} {ms:8.3f} ms  {rate:7.0f} GB/s  {rate / copy_rate:6.1%} of copy")
        report["shapes"][str(shape)] = results
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
