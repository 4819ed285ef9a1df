"""morphc model zoo: deterministic models for tests and benchmarks.

Every entry's forward takes positional tensors and returns one tensor, is in eval
mode on CPU in float32, and exports with `torch.export.export(..., strict=False)`.

    >>> from morphc import zoo
    >>> m = zoo.build("branchy_cnn", batch_size=2, seed=0)
    >>> m.model(*m.example_inputs).shape
    torch.Size([2, 10])

Sizes: `small` entries (a few layers, tiny widths) are for tests; `base` entries are
real-size architectures (or real pretrained models) for benchmarks and are only
built on demand. Note that "-small" names mean "test-sized", not the published
"small" variants (e.g. `gpt2-small` is 2 layers x 64; GPT-2 124M is `gpt2-base`).

The zoo imports nothing else from morphc, so it can be used to test any part of it.
"""

from __future__ import annotations

from . import cnn, hf, pretrained  # noqa: F401  (importing registers the entries)
from .cnn import SeparateInputs, twin_tasks
from .mobilenet import MobileNetV2
from .pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SentenceEmbedding,
    load_mobilenet_v2_imagenet,
    minilm_inputs,
    minilm_path,
    minilm_tokenizer,
    mobilenet_v2_imagenet_checkpoint,
    preprocess_imagenet,
)
from .registry import ZooEntry, ZooModel, build, entry, names

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MobileNetV2",
    "SentenceEmbedding",
    "SeparateInputs",
    "ZooEntry",
    "ZooModel",
    "build",
    "entry",
    "load_mobilenet_v2_imagenet",
    "minilm_inputs",
    "minilm_path",
    "minilm_tokenizer",
    "mobilenet_v2_imagenet_checkpoint",
    "names",
    "preprocess_imagenet",
    "twin_tasks",
]
