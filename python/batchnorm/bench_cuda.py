"""CUDA benchmark: batchnorm on the GPU beside PyTorch (cuDNN on and off) and a device-to-device copy.

Run `python -m batchnorm.bench_cuda [--json PATH] [--quick] [--dtype float16]` on a machine with a
GPU, PyTorch (CUDA) and the batchnorm wheel; `--table PATH` prints the Markdown tables of a saved
run. Rounds are interleaved: each round times every case once, as CALLS back-to-back calls between
two CUDA events, rotating among input sets larger than L2 together; a case's time is the median
over rounds, per call. Two times per case: a call's time as a Python loop sees it ("call": the GPU
idles while the host is slower than the kernels, as it is for small tensors), and the device's time
("device": the calls are queued behind a sleeping kernel first, so the host's cost is hidden).
Bandwidth is the device time against each operation's floor: one read of every input and one write
of every output (train and eval: x, y; backward: x, dy, dx), compared with the copy's (read +
write), timed the same way. With --dtype float16 or bfloat16, the tensors are of that dtype and
the modules float32 (PyTorch's mixed precision, which cuDNN runs too).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import batchnorm

# The issue's two shapes, then ResNet-50's batch-norm shapes at batch 64 (each (C, H, W) once).
HEADLINE = [(32, 64, 56, 56), (256, 64, 56, 56)]
RESNET50 = [
    (64, c, h, h)
    for c, h in [
        (64, 112),
        (64, 56),
        (128, 56),
        (256, 56),
        (128, 28),
        (256, 28),
        (512, 28),
        (256, 14),
        (512, 14),
        (1024, 14),
        (512, 7),
        (2048, 7),
    ]
]
ROUNDS, CALLS, WARMUP = 15, 10, 3
SLEEP_CYCLES = 20_000_000  # ~10 ms at 2 GHz: longer than the host takes to queue CALLS calls
L2_MULTIPLE = 4  # input sets together this many times the L2, so no call finds its input cached

# Per case: which columns of the table it belongs to, and how many tensor-sized transfers its
# floor moves.
FLOOR_TRANSFERS = {"copy": 2, "train": 2, "eval": 2, "backward": 3, "train+backward": 5}


def median_ms_per_call(torch, rows, inputs, queued):
    """Interleaved rounds over every row; the median time per call of each row, in ms. `queued`:
    each row's calls wait behind a sleeping kernel, so the time is the device's alone."""
    for call in rows.values():
        for i in range(WARMUP):
            call(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = {name: [] for name in rows}
    position = 0
    for _ in range(ROUNDS):
        events = {}
        for name, call in rows.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if queued:
                torch.cuda.synchronize()
                torch.cuda._sleep(SLEEP_CYCLES)
            start.record()
            for _ in range(CALLS):
                call(*inputs[position % len(inputs)])
                position += 1
            end.record()
            events[name] = (start, end)
        torch.cuda.synchronize()
        for name, (start, end) in events.items():
            times[name].append(start.elapsed_time(end) / CALLS)
    return {name: statistics.median(values) for name, values in times.items()}


def rows_for(torch, shape, channels_last, dtype):
    """The timed calls for one shape: name -> (operation, function of (x, dy))."""
    functional = torch.nn.functional
    c = shape[1]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(shape, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
    weight = torch.rand(c, device="cuda", requires_grad=True)
    bias = torch.randn(c, device="cuda", requires_grad=True)
    mean, var = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    rows = {"copy": ("copy", lambda x, _: out.copy_(x))}

    def torch_train(x, _):
        functional.batch_norm(x, mean, var, weight, bias, training=True)

    def torch_eval(x, _):
        functional.batch_norm(x, mean, var, weight, bias, training=False)

    def torch_train_backward(x, dy):
        x = x.detach().requires_grad_()
        y = functional.batch_norm(x, mean, var, weight, bias, training=True)
        torch.autograd.grad(y, (x, weight, bias), dy)

    rows["torch train"] = ("train", torch_train)
    rows["torch eval"] = ("eval", torch_eval)
    rows["torch train+backward"] = ("train+backward", torch_train_backward)
    if channels_last:
        return rows  # the GPU backend takes C-contiguous (NCHW) arrays only, so far

    ours = batchnorm.BatchNorm2d(c, device="cuda")
    ours.weight, ours.bias = weight.detach(), bias.detach()
    ours_eval = batchnorm.BatchNorm2d(c, device="cuda").eval()

    def ours_train_backward(x, dy):
        ours(x, out=out)
        ours.backward(dy, out=out)

    rows["batchnorm train"] = ("train", lambda x, _: ours(x, out=out))
    rows["batchnorm eval"] = ("eval", lambda x, _: ours_eval(x, out=out))
    rows["batchnorm train+backward"] = ("train+backward", ours_train_backward)
    # The backward alone, of the forward just before it in each round (train+backward's).
    rows["batchnorm backward"] = ("backward", lambda _, dy: ours.backward(dy, out=out))
    return rows


def measure(torch, shape, channels_last=False, dtype=None):
    dtype = dtype or torch.float32
    sets = max(2, -(-L2_MULTIPLE * l2_bytes(torch) // (dtype.itemsize * torch.Size(shape).numel())))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [
        (
            (torch.randn(shape, device="cuda") * 2 + 1).to(dtype).contiguous(memory_format=memory_format),
            torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=memory_format),
        )
        for _ in range(sets)
    ]
    rows = rows_for(torch, shape, channels_last, dtype)
    calls = {name: call for name, (_, call) in rows.items()}
    operations = {name: operation for name, (operation, _) in rows.items()}
    operations.update({f"{name} (no cuDNN)": operations[name] for name in calls if name.startswith("torch")})
    results = {name: {"operation": operation} for name, operation in operations.items()}
    for key, queued in (("ms", False), ("device_ms", True)):
        for name, ms in median_ms_per_call(torch, calls, inputs, queued).items():
            results[name][key] = ms
        with torch.backends.cudnn.flags(enabled=False):
            plain = {f"{name} (no cuDNN)": calls[name] for name in calls if name.startswith("torch")}
            for name, ms in median_ms_per_call(torch, plain, inputs, queued).items():
                results[name][key] = ms
    return results


def l2_bytes(torch):
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 * 2**20)


def environment(torch, dtype):
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {
        "device": torch.cuda.get_device_name(),
        "multiprocessors": props.multi_processor_count,
        "l2_bytes": l2_bytes(torch),
        "driver": driver,
        "cuda": batchnorm.cuda_versions(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "batchnorm": batchnorm.__version__,
        "rounds": ROUNDS,
        "calls_per_round": CALLS,
        "dtype": dtype,
    }


ITEM_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def rate(shape, entry, copy_ms, dtype="float32"):
    """GB/s over the operation's floor in device time, and that as a fraction of the copy's."""
    item = ITEM_SIZE[dtype]
    floor = FLOOR_TRANSFERS[entry["operation"]] * item * _numel(shape)
    copy_rate = 2 * item * _numel(shape) / copy_ms / 1e6
    achieved = floor / entry["device_ms"] / 1e6
    return achieved, achieved / copy_rate


def tables(report):
    """Markdown: per shape and layout, each case's times, bandwidth, share of the copy's, and
    PyTorch's (cuDNN) time over ours."""
    env = report["environment"]
    dtype = env.get("dtype", "float32")
    lines = [
        f"{env['device']} ({env['multiprocessors']} SMs), driver {env['driver']}, CUDA {env['cuda']}, "
        f"torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}); {dtype} tensors; median of "
        f"{env['rounds']} interleaved rounds of {env['calls_per_round']} calls. 'call': a Python loop's time "
        "per call; 'device': the GPU's alone; 'of copy': bandwidth over the operation's floor (device time) "
        "over the D2D copy's; 'torch / ours': PyTorch's (cuDNN) time over ours, per call and device.",
        "",
    ]
    for key, results in report["shapes"].items():
        shape = tuple(results["shape"])
        copy = results["cases"]["copy"]
        rate_copy = 2 * ITEM_SIZE[dtype] * _numel(shape) / copy["device_ms"] / 1e6
        lines += [f"**{key}** (copy {copy['device_ms'] * 1e3:.1f} µs on the device, {rate_copy:.0f} GB/s)", ""]
        lines += [
            "| case | call µs | device µs | GB/s | of copy | torch / ours (call) | torch / ours (device) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, entry in results["cases"].items():
            if name == "copy":
                continue
            achieved, share = rate(shape, entry, copy["device_ms"], dtype)
            speedups = ["", ""]
            theirs = results["cases"].get("torch " + name.removeprefix("batchnorm "))
            if name.startswith("batchnorm") and theirs:
                speedups = [f"{theirs[k] / entry[k]:.2f}×" for k in ("ms", "device_ms")]
            lines.append(
                f"| {name} | {entry['ms'] * 1e3:.1f} | {entry['device_ms'] * 1e3:.1f} | {achieved:.0f} | "
                f"{share:.0%} | {speedups[0]} | {speedups[1]} |"
            )
        lines.append("")
    return "\n".join(lines)


def summary(report):
    """Markdown: one row per shape and layout, device times in µs, ours beside PyTorch's (cuDNN), and
    our bandwidth as a share of the copy's; per-call times in the detailed tables."""
    dtype = report["environment"].get("dtype", "float32")
    lines = [
        "| (N, C, H, W) | copy | train: ours (of copy) / torch | eval: ours (of copy) / torch "
        "| train+backward: ours (of copy) / torch |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, results in report["shapes"].items():
        shape, cases = tuple(results["shape"]), results["cases"]
        copy_ms = cases["copy"]["device_ms"]
        cells = []
        for operation in ("train", "eval", "train+backward"):
            theirs = f"{cases[f'torch {operation}']['device_ms'] * 1e3:.1f}"
            ours = cases.get(f"batchnorm {operation}")
            if ours is None:
                cells.append(f"n/a / {theirs}")
                continue
            share = rate(shape, ours, copy_ms, dtype)[1]
            cells.append(f"{ours['device_ms'] * 1e3:.1f} ({share:.0%}) / {theirs}")
        lines.append(f"| {key} | {copy_ms * 1e3:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _numel(shape):
    numel = 1
    for d in shape:
        numel *= d
    return numel


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m batchnorm.bench_cuda", description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench-results/bench_cuda.json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="the two headline shapes only, NCHW")
    parser.add_argument("--table", metavar="JSON", help="print the Markdown tables of a saved run and exit")
    parser.add_argument("--summary", metavar="JSON", help="print the one-row-per-shape summary of a saved run")
    parser.add_argument("--dtype", choices=sorted(ITEM_SIZE), default="float32", help="the tensors' dtype")
    args = parser.parse_args(argv)
    if args.table or args.summary:
        with open(args.table or args.summary) as f:
            report = json.load(f)
        print(tables(report) if args.table else summary(report))
        return
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

    report = {"environment": environment(torch, args.dtype), "shapes": {}}
    print(json.dumps(report["environment"]))
    plan = [(shape, False) for shape in HEADLINE]
    if not args.quick:
        plan += [(shape, layout) for shape in RESNET50 for layout in (False, True)]
    for index, (shape, channels_last) in enumerate(plan, 1):
        key = f"{shape}{' channels-last' if channels_last else ''}"
        print(f"[{index}/{len(plan)}] {key}", flush=True)
        report["shapes"][key] = {
            "shape": list(shape),
            "channels_last": channels_last,
            "cases": measure(torch, shape, channels_last, getattr(torch, args.dtype)),
        }
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(tables(report))
    print(summary(report))


if __name__ == "__main__":
    main()
