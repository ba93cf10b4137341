"""Where a GPU call's time goes: device time (calls queued behind a sleeping kernel, so the host's
issue cost is hidden) and the host's issue cost per call (measured while the GPU sleeps, so no call
waits for the GPU; a call that blocks on the GPU shows as a sleep-length cost). Run on a GPU
machine with torch and the batchnorm wheel: python benches/gpu_diagnose.py [--ncu]."""

import statistics
import sys
import time

import torch

import batchnorm

SHAPES = [(32, 64, 56, 56), (256, 64, 56, 56), (64, 512, 7, 7), (64, 2048, 7, 7)]
CALLS, ROUNDS = 20, 9
SLEEP_CYCLES = 40_000_000  # about 20 ms at 2 GHz: longer than issuing CALLS calls


def cases(shape):
    c = shape[1]
    F = torch.nn.functional
    sets = max(2, -(-4 * 60 * 2**20 // (4 * torch.Size(shape).numel())))
    inputs = [(torch.randn(shape, device="cuda") * 2 + 1, torch.randn(shape, device="cuda")) for _ in range(sets)]
    out = torch.empty(shape, device="cuda")
    w, b = torch.rand(c, device="cuda", requires_grad=True), torch.randn(c, device="cuda", requires_grad=True)
    mean, var = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    ours, ours_eval = batchnorm.BatchNorm2d(c, device="cuda"), batchnorm.BatchNorm2d(c, device="cuda").eval()
    ours(inputs[0][0], out=out)

    def torch_fb(x, dy):
        x = x.detach().requires_grad_()
        torch.autograd.grad(F.batch_norm(x, mean, var, w, b, training=True), (x, w, b), dy)

    return inputs, {
        "copy": lambda x, _: out.copy_(x),
        "ours train": lambda x, _: ours(x, out=out),
        "ours eval": lambda x, _: ours_eval(x, out=out),
        "ours backward": lambda _, dy: ours.backward(dy, out=out),
        "ours train, fresh output": lambda x, _: ours(x),
        "torch train": lambda x, _: F.batch_norm(x, mean, var, w, b, training=True),
        "torch eval": lambda x, _: F.batch_norm(x, mean, var, w, b, training=False),
        "torch train+backward": torch_fb,
        "dlpack export of x": lambda x, _: x.__dlpack__(stream=1),
        # Yardsticks for the statistics pass: PyTorch's per-channel and whole-tensor sums.
        "torch x.sum((0, 2, 3))": lambda x, _: x.sum((0, 2, 3)),
        "torch x.sum()": lambda x, _: x.sum(),
    }


def measure(shape):
    inputs, rows = cases(shape)
    device, host = {k: [] for k in rows}, {k: [] for k in rows}
    for _ in range(ROUNDS):
        for name, call in rows.items():
            torch.cuda.synchronize()
            torch.cuda._sleep(SLEEP_CYCLES)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for i in range(CALLS):
                call(*inputs[i % len(inputs)])
            t1 = time.perf_counter()
            end.record()
            end.synchronize()
            device[name].append(start.elapsed_time(end) / CALLS * 1e3)
            host[name].append((t1 - t0) / CALLS * 1e6)
    print(f"\n{shape}: per call, µs (median of {ROUNDS} rounds of {CALLS})")
    print(f"  {'case':28s} {'device':>9s} {'host issue':>11s}")
    for name in rows:
        print(f"  {name:28s} {statistics.median(device[name]):9.1f} {statistics.median(host[name]):11.1f}")


def ncu_target():
    """Two forward+backward steps per headline shape, for ncu's per-kernel counters."""
    for shape in SHAPES[:2]:
        # Three sets, so each step's inputs come from memory, not from what the last step left in L2.
        sets = [(torch.randn(shape, device="cuda") + 1, torch.randn(shape, device="cuda")) for _ in range(3)]
        m = batchnorm.BatchNorm2d(shape[1], device="cuda")
        for x, dy in sets[:2]:
            m(x)
            m.backward(dy)
        torch.cuda.synchronize()


if __name__ == "__main__":
    if "--ncu-target" in sys.argv:
        ncu_target()
    else:
        print(torch.cuda.get_device_name(), torch.__version__, batchnorm.cuda_versions())
        for shape in SHAPES:
            measure(shape)
            torch.cuda.empty_cache()
