"""The benchmark suite: ``python -m batchnorm.bench [--quick] [--json PATH] [--png PATH]``.

Times, side by side in one process, batchnorm, a NumPy implementation, PyTorch's CPU kernels
(when torch is importable) and a memcpy (``np.copyto``, the physical floor: read x once, write y
once) on the training forward, the eval forward and the backward (grad_input, grad_weight and
grad_bias), for the shapes people use, on one thread and on all, in float32 and float64.
Measurements rotate through the implementations round by round, so drift on a shared machine
hits all of them alike; the table reports medians and each time as a multiple of the memcpy.
batchnorm is timed with ``out=`` given, so only the kernel is measured; the small shape is also
timed as a whole call from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable

import numpy as np

import batchnorm

SHAPES = [(8, 64, 224, 224), (32, 64, 56, 56), (64, 256, 14, 14), (256, 512, 7, 7), (20, 100, 35, 45), (8, 32, 16, 16)]
QUICK_SHAPES = [(32, 64, 56, 56), (256, 512, 7, 7), (20, 100, 35, 45), (8, 32, 16, 16)]
OPS = ("train", "eval", "backward")
AXES = (0, 2, 3)


def numpy_training_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """BatchNorm2d's training forward in plain NumPy (batch statistics over N, H, W)."""
    mean = x.mean(axis=AXES, keepdims=True)
    var = x.var(axis=AXES, keepdims=True)
    scale = weight.reshape(1, -1, 1, 1) / np.sqrt(var + eps)
    return (x - mean) * scale + bias.reshape(1, -1, 1, 1)


def numpy_eval_forward(x, mean, var, weight, bias, eps=1e-5):
    scale = weight / np.sqrt(var + eps)
    return x * scale.reshape(1, -1, 1, 1) + (bias - mean * scale).reshape(1, -1, 1, 1)


def numpy_backward(dy, x, weight, eps=1e-5):
    mean = x.mean(axis=AXES, keepdims=True)
    invstd = 1.0 / np.sqrt(x.var(axis=AXES, keepdims=True) + eps)
    xhat = (x - mean) * invstd
    count = x.size // x.shape[1]
    grad_bias = dy.sum(axis=AXES)
    grad_weight = (dy * xhat).sum(axis=AXES)
    scale = weight.reshape(1, -1, 1, 1) * invstd / count
    grad_input = scale * (count * dy - grad_bias.reshape(1, -1, 1, 1) - xhat * grad_weight.reshape(1, -1, 1, 1))
    return grad_input, grad_weight, grad_bias


def median_seconds(call: Callable[[], object], repeat: int = 20, warmup: int = 2) -> float:
    """Median wall time of `call` over `repeat` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def interleaved_medians(calls: dict[str, Callable[[], object]], budget: float, max_rounds: int) -> dict[str, float]:
    """Median time of each call, measured in rounds that run every call once, in turn."""
    for call in calls.values():
        call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    started = time.perf_counter()
    for round_index in range(max_rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
        if round_index >= 2 and time.perf_counter() - started > budget:
            break
    return {name: float(np.median(times)) for name, times in samples.items()}


def load_torch():
    """PyTorch, or None with a line saying why its columns are left out."""
    if os.environ.get("BATCHNORM_BENCH_NO_TORCH"):
        print("PyTorch columns skipped: BATCHNORM_BENCH_NO_TORCH is set")
        return None
    try:
        import torch
    except ImportError:
        print("PyTorch columns skipped: torch is not installed (pip install torch)")
        return None
    return torch


def element_types(name):
    """The NumPy types `--dtype NAME` times."""
    if name == "both":
        return [np.float32, np.float64]
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            sys.exit("--dtype bfloat16 needs ml_dtypes (pip install ml_dtypes): NumPy has no bfloat16 of its own")
        return [ml_dtypes.bfloat16]
    return [np.dtype(name).type]


def channels_last(a):
    """`a` (N, C, H, W) with the same values, laid out (N, H, W, C), as PyTorch's channels_last."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def implementations(shape, dtype, op, torch, layout="nchw"):
    """The calls to time for one (shape, dtype, op): name → zero-argument callable. Channels-last
    inputs go to every implementation as they are (PyTorch takes them as channels_last tensors),
    and the outputs are channels-last too."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if layout == "channels-last":
        x, dy = channels_last(x), channels_last(dy)
    y = np.empty_like(x)
    c = shape[1]
    # Half inputs (float16, bfloat16) run on a float32 module, as in PyTorch; NumPy has no such path.
    half = np.dtype(dtype).itemsize == 2
    m = batchnorm.BatchNorm2d(c, dtype=np.float32 if half else dtype)
    m.weight[:] = rng.uniform(0.5, 1.5, c)
    calls: dict[str, Callable[[], object]] = {"memcpy": lambda: np.copyto(y, x)}
    w, b = m.weight.copy(), m.bias.copy()
    if op == "train":
        calls["batchnorm"] = lambda: m(x, out=y)
        if not half:
            calls["numpy"] = lambda: numpy_training_forward(x, w, b)
    elif op == "eval":
        m.eval()
        rm, rv = m.running_mean.copy(), m.running_var.copy()
        calls["batchnorm"] = lambda: m(x, out=y)
        if not half:
            calls["numpy"] = lambda: numpy_eval_forward(x, rm, rv, w, b)
    else:
        m(x)
        grad_input = np.empty_like(x)

        def ours():
            m.zero_grad()
            return m.backward(dy, out=grad_input)

        calls["batchnorm"] = ours
        if not half:
            calls["numpy"] = lambda: numpy_backward(dy, x, w)
    if torch is not None:
        calls["torch"] = torch_call(torch, x, dy, w, b, op)
    if shape == (8, 32, 16, 16) and op == "train":
        calls["batchnorm (whole call)"] = lambda: m(x)
    return calls


def torch_call(torch, x, dy, w, b, op):
    if x.dtype.name == "bfloat16":  # torch reads no ml_dtypes array: the same values through float32
        tx, tdy = (torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16) for a in (x, dy))
    else:
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    rm, rv = torch.zeros(x.shape[1], dtype=tw.dtype), torch.ones(x.shape[1], dtype=tw.dtype)
    if op == "backward":
        _, save_mean, save_invstd = torch.native_batch_norm(tx, tw, tb, rm, rv, True, 0.1, 1e-5)

        def backward():
            return torch.ops.aten.native_batch_norm_backward(
                tdy, tx, tw, rm, rv, save_mean, save_invstd, True, 1e-5, [True, True, True]
            )

        return backward
    training = op == "train"

    def forward():
        with torch.no_grad():
            return torch.nn.functional.batch_norm(tx, rm, rv, tw, tb, training, 0.1, 1e-5)

    return forward


def run(shapes, dtypes, thread_counts, budget, max_rounds, torch, layout="nchw"):
    rows = []
    total, done = len(dtypes) * len(thread_counts) * len(shapes) * len(OPS), 0
    for dtype in dtypes:
        for threads in thread_counts:
            batchnorm.set_num_threads(threads)
            if torch is not None:
                torch.set_num_threads(threads)
            for shape in shapes:
                for op in OPS:
                    done += 1
                    print(f"[{done}/{total}] ", end="")
                    calls = implementations(shape, dtype, op, torch, layout)
                    medians = interleaved_medians(calls, budget, max_rounds)
                    floor = medians["memcpy"]
                    for name, seconds in medians.items():
                        rows.append(
                            {
                                "dtype": np.dtype(dtype).name + (" channels-last" if layout == "channels-last" else ""),
                                "threads": threads,
                                "shape": list(shape),
                                "op": op,
                                "impl": name,
                                "median_s": seconds,
                                "vs_memcpy": seconds / floor,
                                "vs_torch": seconds / medians["torch"] if "torch" in medians else None,
                            }
                        )
                    print(format_group(rows[-len(medians) :]), flush=True)
    return rows


def format_group(rows):
    first = rows[0]
    head = f"{first['dtype']:7s} {first['threads']:2d}t {str(tuple(first['shape'])):18s} {first['op']:8s}"
    cells = []
    for row in rows:
        torch_ratio = (
            f", {1 / row['vs_torch']:.1f}x faster than torch" if row["impl"] == "batchnorm" and row["vs_torch"] else ""
        )
        cells.append(f"{row['impl']} {row['median_s'] * 1e3:.3f} ms ({row['vs_memcpy']:.2f}x{torch_ratio})")
    return head + " | " + " | ".join(cells)


COLUMNS = [
    ("train", "batchnorm", "train: batchnorm"),
    ("train", "torch", "train: PyTorch"),
    ("train", "numpy", "train: NumPy"),
    ("eval", "batchnorm", "eval: batchnorm"),
    ("eval", "torch", "eval: PyTorch"),
    ("backward", "batchnorm", "backward: batchnorm"),
    ("backward", "torch", "backward: PyTorch"),
]


def markdown_tables(rows):
    """The README's tables: per dtype and thread count, median times and time ÷ memcpy of each shape."""
    lines = []
    groups = list(dict.fromkeys((r["dtype"], r["threads"]) for r in rows))
    for dtype, threads in groups:
        group = [r for r in rows if r["dtype"] == dtype and r["threads"] == threads]
        columns = [c for c in COLUMNS if any(r["op"] == c[0] and r["impl"] == c[1] for r in group)]
        noun = "thread" if threads == 1 else "threads"
        lines += [f"**{dtype}, {threads} {noun}** — median time, and in brackets time ÷ memcpy of the same tensor", ""]
        lines.append("| shape | memcpy | " + " | ".join(title for _, _, title in columns) + " |")
        lines.append("|---" * (len(columns) + 2) + "|")
        for shape in dict.fromkeys(tuple(r["shape"]) for r in group):

            def cell(op, impl, shape=shape, group=group):
                matches = (r for r in group if r["op"] == op and r["impl"] == impl and tuple(r["shape"]) == shape)
                row = next(matches, None)
                if row is None:
                    return "—"
                if impl == "memcpy":
                    return f"{row['median_s'] * 1e3:.3f} ms"
                return f"{row['median_s'] * 1e3:.3f} ms ({row['vs_memcpy']:.2f}×)"

            cells = [cell("train", "memcpy")] + [cell(op, impl) for op, impl, _ in columns]
            lines.append(f"| {'×'.join(map(str, shape))} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "simd": batchnorm.simd_level(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "batchnorm": getattr(batchnorm, "__version__", "dev"),
    }


def draw_chart(rows, path, machine):
    """Every dtype and thread count measured: one row of charts each, one chart per op; lower is better."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    groups = list(dict.fromkeys((r["dtype"], r["threads"]) for r in rows))
    fig, axes = plt.subplots(len(groups), len(OPS), figsize=(15, 4.2 * len(groups)), sharey=True, squeeze=False)
    for axes_row, (dtype, threads) in zip(axes, groups, strict=True):
        chosen = [r for r in rows if r["dtype"] == dtype and r["threads"] == threads and r["impl"] != "memcpy"]
        names = [n for n in ("batchnorm", "torch", "numpy") if any(r["impl"] == n for r in chosen)]
        for axis, op in zip(axes_row, OPS, strict=True):
            shapes = list(dict.fromkeys(tuple(r["shape"]) for r in chosen if r["op"] == op))
            width = 0.8 / max(len(names), 1)
            for i, name in enumerate(names):
                ratios = [
                    next(
                        (
                            r["vs_memcpy"]
                            for r in chosen
                            if r["op"] == op and r["impl"] == name and tuple(r["shape"]) == s
                        ),
                        np.nan,
                    )
                    for s in shapes
                ]
                axis.bar(np.arange(len(shapes)) + i * width, ratios, width, label=name)
            axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="memcpy (1×)")
            axis.set_yscale("log")
            axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
            axis.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
            axis.set_title(f"{op}, {dtype}, {threads} {'thread' if threads == 1 else 'threads'}")
            axis.set_xticks(
                np.arange(len(shapes)) + 0.4 - width / 2,
                ["×".join(map(str, s)) for s in shapes],
                rotation=30,
                ha="right",
                fontsize=8,
            )
        axes_row[0].set_ylabel("time ÷ memcpy of the same tensor (lower is better)")
    axes[0][0].legend()
    fig.suptitle(f"batchnorm {machine.get('batchnorm', '')} on {machine.get('cpu', '')} ({machine.get('simd', '')})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"chart written to {path}")


# Other libraries' idle worker threads spin after each call (OpenMP in PyTorch, OpenBLAS in
# NumPy) and would steal the cores from whichever implementation runs next; these settings make
# them sleep. They only take effect at start-up, so main() re-executes once with them set.
QUIET_THREADS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}


def main(argv=None):
    if any(os.environ.get(k) != v for k, v in QUIET_THREADS.items()) and argv is None:
        os.execve(
            sys.executable, [sys.executable, "-m", "batchnorm.bench", *sys.argv[1:]], {**os.environ, **QUIET_THREADS}
        )
    parser = argparse.ArgumentParser(prog="python -m batchnorm.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and rounds: under a minute")
    parser.add_argument("--json", default="bench-results/bench.json", help="where to write the results")
    parser.add_argument("--png", default="bench-results/bench.png", help="where to draw the chart")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64", "both", "float16", "bfloat16"],
        nargs="+",
        default=["both"],
        help="element types to time (both: float32 and float64; float16 and bfloat16 inputs run on float32 modules; "
        "bfloat16 needs ml_dtypes)",
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", help="thread counts to time (default: 1 and every core)", metavar="N"
    )
    parser.add_argument(
        "--shapes", nargs="+", help="shapes to time, as N,C,H,W (default: the README's)", metavar="N,C,H,W"
    )
    parser.add_argument(
        "--layout", choices=["nchw", "channels-last"], default="nchw", help="the inputs' and outputs' memory layout"
    )
    parser.add_argument("--table", metavar="JSON", help="print the tables of an earlier run's JSON, and stop")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(markdown_tables(json.load(f)["rows"]))
        return

    torch = load_torch()
    machine = machine_description()
    if torch is not None:
        machine["torch"] = torch.__version__
    print("machine:", ", ".join(f"{k} {v}" for k, v in machine.items()))
    cores = os.cpu_count() or 1
    thread_counts = sorted(set(args.threads)) if args.threads else sorted({1, cores})
    dtypes = [dtype for name in args.dtype for dtype in element_types(name)]
    if args.quick:
        shapes, budget, max_rounds = QUICK_SHAPES, 0.15, 15
        dtypes = dtypes[:1] if args.dtype == ["both"] else dtypes
    else:
        shapes, budget, max_rounds = SHAPES, 1.0, 60
    if args.shapes:
        shapes = [parse_shape(text, parser) for text in args.shapes]
    rows = run(shapes, dtypes, thread_counts, budget, max_rounds, torch, args.layout)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak_rss_mib:.0f} MiB")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": machine, "peak_rss_mib": peak_rss_mib, "rows": rows}, f, indent=1)
    print(f"results written to {args.json}")
    print()
    print(markdown_tables(rows))
    draw_chart(rows, args.png, machine)


def parse_shape(text, parser):
    """'8,64,56,56' → (8, 64, 56, 56); anything else is a usage error."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        parser.error(f"--shapes takes N,C,H,W with four positive integers, got {text!r}")
    return shape


if __name__ == "__main__":
    main()
