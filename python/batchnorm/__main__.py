"""`python -m batchnorm`: a short demonstration of training, eval and backward, with one timing."""

import numpy as np

import batchnorm
from batchnorm.bench import median_seconds, numpy_training_forward


def main() -> None:
    rng = np.random.default_rng(0)
    shape = (20, 100, 35, 45)
    m = batchnorm.BatchNorm2d(100)
    print(f"{m} on {shape} float32, {batchnorm.get_num_threads()} threads")
    for step in range(1, 4):
        x = (rng.standard_normal(shape) * 10 + 5).astype(np.float32)
        y = m(x)
        print(
            f"train step {step}: output mean {y.mean():+.2e}, std {y.std():.4f}; "
            f"running_mean[0] {m.running_mean[0]:.4f}, running_var[0] {m.running_var[0]:.4f}, "
            f"num_batches_tracked {m.num_batches_tracked}"
        )
    grad_input = m.backward(rng.standard_normal(shape).astype(np.float32))
    print(
        f"backward: grad_input std {grad_input.std():.4f}, grad_weight[:3] {np.round(m.grad_weight[:3], 2)}, "
        f"grad_bias[:3] {np.round(m.grad_bias[:3], 2)}"
    )
    m.eval()
    y = m(x)
    print(
        f"eval: output mean {y.mean():+.4f}, std {y.std():.4f} (running statistics, nothing updated: "
        f"num_batches_tracked {m.num_batches_tracked})"
    )

    m.train()
    out = np.empty_like(x)
    ours = median_seconds(lambda: m(x, out=out))
    theirs = median_seconds(lambda: numpy_training_forward(x, m.weight, m.bias), repeat=5)
    print(
        f"training forward on {shape}: batchnorm {ours * 1e3:.2f} ms, NumPy {theirs * 1e3:.2f} ms "
        f"({theirs / ours:.1f}x faster; medians)"
    )


if __name__ == "__main__":
    main()
