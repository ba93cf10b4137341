"""Two builds of batchnorm, timed against each other in one process: for "no shape got slower" checks.

    python benches/compare_builds.py OLD.whl NEW.whl [--threads 2] [--rounds 31] [--shapes 6]

Each wheel's extension is unpacked under its own package name and imported side by side; every
round times each op once with each build, in alternating order, so drift on a shared machine hits
both alike. Prints the medians, new/old, and each build's interquartile range. Run it against the
same build twice (OLD.whl OLD.whl) to see the machine's own spread.
"""

import argparse
import importlib
import pathlib
import sys
import tempfile
import time
import zipfile

import numpy as np

SHAPES = [
    (8, 64, 224, 224),
    (32, 64, 56, 56),
    (64, 256, 14, 14),
    (256, 512, 7, 7),
    (20, 100, 35, 45),
    (8, 32, 16, 16),
    (1, 64, 56, 56),
    (2, 3, 300, 301),
]


def load(wheel, name, root):
    """The `_core` extension of `wheel`, imported as package `name`."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    with zipfile.ZipFile(wheel) as archive:
        member = next(m for m in archive.namelist() if m.startswith("batchnorm/_core"))
        (package / pathlib.Path(member).name).write_bytes(archive.read(member))
    return importlib.import_module(f"{name}._core")


def layer_class(core):
    """A build's BatchNorm2d: in `_core` itself in older builds, a subclass of `_core._BatchNorm` since."""
    if hasattr(core, "BatchNorm2d"):
        return core.BatchNorm2d
    return type("BatchNorm2d", (core._BatchNorm,), {"_ranks": "2d"})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=pathlib.Path)
    parser.add_argument("new", type=pathlib.Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes of the list")
    args = parser.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="batchnorm-compare-"))
    sys.path.insert(0, str(root))
    builds = {"old": load(args.old, "batchnorm_old", root), "new": load(args.new, "batchnorm_new", root)}
    for core in builds.values():
        core.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    for shape in SHAPES[: args.shapes]:
        compare(builds, shape, args.rounds, rng)


def compare(builds, shape, rounds, rng):
    """Prints the medians of every op at `shape` for both builds, timed in alternating rounds."""
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    y = np.empty_like(x)
    train = {name: layer_class(core)(shape[1]) for name, core in builds.items()}
    evaluate = {name: layer_class(core)(shape[1]).eval() for name, core in builds.items()}

    def run(op, name):
        if op == "eval":
            evaluate[name](x, out=y)
            return
        train[name](x, out=y)
        if op == "backward":
            train[name].backward(dy, out=y)

    for op in ("train", "eval", "backward"):
        times = {name: [] for name in builds}
        for name in builds:
            run(op, name)
        for r in range(rounds):
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                start = time.perf_counter()
                run(op, name)
                times[name].append(time.perf_counter() - start)
        median = {name: np.median(t) * 1e3 for name, t in times.items()}
        old_iqr, new_iqr = (np.percentile(times[name], [25, 75]) * 1e3 for name in ("old", "new"))
        print(
            f"{str(shape):20s} {op:9s} old {median['old']:8.3f} ms  new {median['new']:8.3f} ms  "
            f"new/old {median['new'] / median['old']:5.2f}  "
            f"(IQR old {old_iqr[0]:.2f}-{old_iqr[1]:.2f}, new {new_iqr[0]:.2f}-{new_iqr[1]:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
