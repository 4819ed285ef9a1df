"""Hugging Face transformers architectures built from configs with random weights.

Real architectures (attention masks, layer norms, GELU, depthwise convs, ...) without
any download: the config fixes the graph, `torch.manual_seed` fixes the weights.
Each architecture comes in a `small` config for tests and a `base` config of the
published size for benchmarks. transformers is imported lazily so that listing the
zoo stays cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .registry import generator, register


class VisionWrapper(nn.Module):
    """`pixel_values -> logits`: positional tensor in, single tensor out."""

    def __init__(self, hf_model: nn.Module, output: str = "logits") -> None:
        super().__init__()
        self.hf = hf_model
        self.output = output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.hf(pixel_values=pixel_values, return_dict=True)
        return out[self.output]


class TextWrapper(nn.Module):
    """`(input_ids, attention_mask) -> logits | last_hidden_state`, both inputs int64."""

    def __init__(
        self, hf_model: nn.Module, output: str = "logits", use_cache: bool | None = None
    ) -> None:
        super().__init__()
        self.hf = hf_model
        self.output = output
        self.use_cache = use_cache

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self.use_cache is not None:
            kwargs["use_cache"] = self.use_cache
        out = self.hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            return_dict=True,
            **kwargs,
        )
        return out[self.output]


def text_inputs(
    batch_size: int, seq_len: int, vocab_size: int, seed: int, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids plus a right-padded mask.

    Row 0 is unpadded; later rows lose a growing number of trailing tokens (at most
    half) so that masking actually changes the result when batch_size > 1.
    """
    g = generator(seed)
    ids = torch.randint(
        1, vocab_size, (batch_size, seq_len), generator=g, dtype=torch.int64
    )
    mask = torch.ones(batch_size, seq_len, dtype=torch.int64)
    for b in range(batch_size):
        pad = b % (seq_len // 2 + 1)
        if pad:
            mask[b, seq_len - pad :] = 0
            ids[b, seq_len - pad :] = pad_id
    return ids, mask


def image_inputs(batch_size: int, image_size: int, seed: int) -> tuple[torch.Tensor]:
    """Standard-normal pixels, roughly what normalised images look like."""
    return (
        torch.randn(batch_size, 3, image_size, image_size, generator=generator(seed)),
    )


# --- vision -----------------------------------------------------------------------

_TINY_STAGES: dict[str, Any] = {
    "hidden_sizes": [16, 32, 64, 128],
    "depths": [1, 1, 1, 1],
}

# name -> (config class, model class, size, default image size, config kwargs, description).
# Base entries use the config defaults, which are the published architectures.
_VISION: dict[str, tuple[str, str, str, int, dict[str, Any], str]] = {
    "resnet-small": (
        "ResNetConfig", "ResNetForImageClassification", "small", 64,
        {**_TINY_STAGES, "embedding_size": 16, "layer_type": "basic", "num_labels": 10},
        "HF ResNet, 4 basic stages of depth 1, 64x64",
    ),
    "resnet50": (
        "ResNetConfig", "ResNetForImageClassification", "base", 224,
        {"num_labels": 1000}, "HF ResNet-50, random weights, 224x224",
    ),
    "convnext-small": (
        "ConvNextConfig", "ConvNextForImageClassification", "small", 64,
        {**_TINY_STAGES, "num_labels": 10, "image_size": 64},
        "HF ConvNeXt, 4 stages of depth 1, 64x64",
    ),
    "convnext-t": (
        "ConvNextConfig", "ConvNextForImageClassification", "base", 224,
        {"num_labels": 1000}, "HF ConvNeXt-T, random weights, 224x224",
    ),
    "mobilenet_v2-small": (
        "MobileNetV2Config", "MobileNetV2ForImageClassification", "small", 64,
        {"depth_multiplier": 0.35, "image_size": 64, "num_labels": 10},
        "HF MobileNetV2 x0.35 (TF padding), 64x64",
    ),
    "mobilenet_v2-base": (
        "MobileNetV2Config", "MobileNetV2ForImageClassification", "base", 224,
        {"num_labels": 1000}, "HF MobileNetV2 1.0 (TF padding), random weights, 224x224",
    ),
    "vit-small": (
        "ViTConfig", "ViTForImageClassification", "small", 32,
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "image_size": 32, "patch_size": 8, "num_labels": 10},
        "HF ViT, 2 layers, hidden 64, patch 8, 32x32",
    ),
    "vit-b16": (
        "ViTConfig", "ViTForImageClassification", "base", 224,
        {"num_labels": 1000}, "HF ViT-B/16, random weights, 224x224",
    ),
}  # fmt: skip


def _vision(name: str) -> Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """Builder for an image classifier; extra kwargs override config fields."""
    cfg_cls, model_cls, _, default_image_size, cfg_kwargs, _ = _VISION[name]

    def builder(
        *,
        batch_size: int,
        seed: int,
        image_size: int = default_image_size,
        **overrides: Any,
    ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import transformers

        config = getattr(transformers, cfg_cls)(
            **copy.deepcopy({**cfg_kwargs, **overrides})
        )
        hf = getattr(transformers, model_cls)(config)
        return VisionWrapper(hf), image_inputs(batch_size, image_size, seed)

    return builder


for _name, (_, _, _size, _, _, _desc) in _VISION.items():
    _family = "transformer" if _name.startswith("vit") else "cnn"
    register(_name, family=_family, size=_size, description=_desc)(_vision(_name))


# --- text -------------------------------------------------------------------------

_SMALL_TEXT: dict[str, dict[str, Any]] = {
    "bert": {
        "vocab_size": 1000,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 64,
    },
    "distilbert": {
        "vocab_size": 1000,
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "hidden_dim": 128,
        "max_position_embeddings": 64,
    },
    # bos/eos default to 50256; keep them inside the small vocabulary.
    "gpt2": {
        "vocab_size": 1000,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 64,
        "bos_token_id": 999,
        "eos_token_id": 999,
    },
}

_TEXT_CLASSES: dict[str, tuple[str, str]] = {
    "bert": ("BertConfig", "BertForSequenceClassification"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
}


def _text(
    arch: str, small: bool, default_seq_len: int
) -> Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """Builder for a text model: BERT/DistilBERT classify (2 labels), GPT-2 gives LM logits."""

    def builder(
        *, batch_size: int, seed: int, seq_len: int = default_seq_len, **overrides: Any
    ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import transformers

        cfg_name, model_name = _TEXT_CLASSES[arch]
        kw: dict[str, Any] = dict(_SMALL_TEXT[arch]) if small else {}
        if arch == "gpt2":
            # The KV cache is an extra output and a dynamic object; inference graphs skip it.
            kw["use_cache"] = False
        else:
            kw["num_labels"] = 2
        kw.update(overrides)
        config = getattr(transformers, cfg_name)(**kw)
        hf = getattr(transformers, model_name)(config)
        wrapper = TextWrapper(hf, "logits", use_cache=False if arch == "gpt2" else None)
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        return wrapper, text_inputs(
            batch_size, seq_len, config.vocab_size, seed, pad_id=pad
        )

    return builder


for _arch, _base_name, _base_desc in [
    ("bert", "bert-base", "BERT-base (12x768), sequence classification"),
    (
        "distilbert",
        "distilbert-base",
        "DistilBERT-base (6x768), sequence classification",
    ),
    ("gpt2", "gpt2-base", "GPT-2 124M, LM logits, use_cache=False"),
]:
    register(
        f"{_arch}-small",
        family="transformer",
        size="small",
        description=f"{_arch}, 2 layers, hidden 64, vocab 1000, 16 tokens",
    )(_text(_arch, True, 16))
    register(
        _base_name,
        family="transformer",
        size="base",
        description=f"{_base_desc}, random weights, 128 tokens",
    )(_text(_arch, False, 128))
