"""The profiling corpus: model variants the shipped CPU cost model was trained on.

Families (a family is what "held out of training" means in benchmarks/cost_model.py):
hand-written MLPs and plain VGG-style CNNs varied in depth / width / kernel / resolution, the zoo's
residual and inception CNNs at several widths and resolutions, Hugging Face ResNet, ConvNeXt,
MobileNetV2, EfficientNet, RegNet, ViT, BERT, DistilBERT, GPT-2, OPT and Llama configs varied in
depth / width / resolution / sequence length, and fused multi-task graphs (several models lowered
together into one Program).
Every variant is deterministic (fixed seeds) and small enough that one measurement takes well under
a second on one core. `Variant.build(batch)` returns (models, example_inputs) for `morphc.lower`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Built = tuple[nn.Module | dict[str, nn.Module], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Variant:
    """One model configuration of a family; `name` is unique and stable across runs."""

    name: str
    family: str
    spec: dict[str, Any] = field(hash=False)
    builder: Callable[[int], Built] = field(hash=False, compare=False, repr=False)

    def build(self, batch: int) -> Built:
        torch.manual_seed(0)
        return self.builder(batch)


class MLP(nn.Module):
    def __init__(self, d_in: int, width: int, depth: int, act: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.GELU() if act == "gelu" else nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PlainCNN(nn.Module):
    """VGG-style: `depth` conv-BN-ReLU blocks, a max-pool every second block, pooled linear head."""

    def __init__(self, depth: int, width: int, kernel: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, c = 3, width
        for i in range(depth):
            layers += [nn.Conv2d(cin, c, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            cin = c
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
                c = min(2 * c, 128)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


POOLS = {"max2s2": lambda: nn.MaxPool2d(2), "max3s2": lambda: nn.MaxPool2d(3, 2, 1),
         "max3s1": lambda: nn.MaxPool2d(3, 1, 1), "avg2s2": lambda: nn.AvgPool2d(2),
         "avg3s1": lambda: nn.AvgPool2d(3, 1, 1)}


class PoolCNN(nn.Module):
    """Conv-BN-ReLU blocks each followed by a pooling layer of one kind (max/avg, window 2 or 3, stride
    1 or 2): pooling's cost follows its window and stride, which the other families vary little."""

    def __init__(self, depth: int, width: int, pool: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i in range(depth):
            c = min(width * 2 ** (i // 2), 128)
            layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), POOLS[pool]()]
            cin = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _image(batch: int, size: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _zoo(name: str, batch: int, **kwargs: Any) -> Built:
    from morphc import zoo

    z = zoo.build(name, batch_size=batch, **kwargs)
    return z.model, z.example_inputs


def _sample(grid: dict[str, tuple[Any, ...]], k: int, seed: int) -> list[dict[str, Any]]:
    """`k` distinct points of a grid, chosen with a fixed seed (all of them if the grid is smaller)."""
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    random.Random(seed).shuffle(points)
    return points[:k]


def _name(family: str, spec: dict[str, Any]) -> str:
    return family + "[" + ",".join(f"{k}={v}" for k, v in spec.items()) + "]"


def _variants() -> list[Variant]:
    out: list[Variant] = []

    def add(family: str, spec: dict[str, Any], builder: Callable[[int], Built]) -> None:
        out.append(Variant(_name(family, spec), family, spec, builder))

    for s in _sample({"d_in": (32, 128, 256), "width": (64, 256, 512), "depth": (2, 4, 6), "act": ("relu", "gelu")},
                     8, 1):
        add("mlp", s, lambda b, s=s: (MLP(**s).eval(), (torch.randn(b, s["d_in"]),)))
    for s in _sample({"depth": (2, 4, 6), "width": (8, 16, 32), "kernel": (3, 5), "image": (32, 48, 64)}, 12, 2):
        add("vgg", s, lambda b, s=s: (PlainCNN(s["depth"], s["width"], s["kernel"]).eval(), _image(b, s["image"])))
    for s in _sample({"depth": (2, 3, 4), "width": (8, 16, 32), "pool": tuple(POOLS), "image": (32, 48)}, 10, 19):
        add("poolcnn", s, lambda b, s=s: (PoolCNN(s["depth"], s["width"], s["pool"]).eval(), _image(b, s["image"])))
    for s in _sample({"width": (8, 16, 24, 32), "image_size": (32, 48, 64)}, 8, 3):
        add("resblock", s, lambda b, s=s: _zoo("resnet_block_cnn", b, **s))
    for s in _sample({"width": (8, 16, 32), "image_size": (32, 48)}, 6, 4):
        add("branchy", s, lambda b, s=s: _zoo("branchy_cnn", b, **s))
    for s in _sample({"scale": (8, 16, 32), "depth": (1, 2), "layer_type": ("basic", "bottleneck"),
                      "image_size": (32, 64)}, 8, 5):
        hs = [s["scale"] * m for m in (1, 2, 4, 8)]
        add("hf-resnet", s, lambda b, s=s, hs=hs: _zoo(
            "resnet-small", b, image_size=s["image_size"], hidden_sizes=hs, depths=[s["depth"]] * 4,
            embedding_size=s["scale"], layer_type=s["layer_type"]))
    for s in _sample({"scale": (8, 16, 32), "depth": (1, 2), "image_size": (32, 64)}, 6, 6):
        hs = [s["scale"] * m for m in (1, 2, 4, 8)]
        add("hf-convnext", s, lambda b, s=s, hs=hs: _zoo(
            "convnext-small", b, image_size=s["image_size"], hidden_sizes=hs, depths=[s["depth"]] * 4))
    for s in _sample({"depth_multiplier": (0.35, 0.5, 0.75), "image_size": (32, 64)}, 6, 7):
        add("hf-mobilenet", s, lambda b, s=s: _zoo("mobilenet_v2-small", b, **s))
    for s in _sample({"hidden": (32, 64, 128), "layers": (1, 2, 4), "patch": (4, 8)}, 8, 8):
        add("vit", s, lambda b, s=s: _zoo(
            "vit-small", b, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=4, intermediate_size=2 * s["hidden"], patch_size=s["patch"]))
    text_grid = {"hidden": (32, 64, 128), "layers": (1, 2, 4), "seq": (8, 16, 32, 64)}
    for s in _sample(text_grid, 10, 9):
        add("bert", s, lambda b, s=s: _zoo(
            "bert-small", b, seq_len=s["seq"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            intermediate_size=2 * s["hidden"]))
    for s in _sample(text_grid, 6, 10):
        add("distilbert", s, lambda b, s=s: _zoo(
            "distilbert-small", b, seq_len=s["seq"], dim=s["hidden"], n_layers=s["layers"],
            hidden_dim=2 * s["hidden"]))
    for s in _sample(text_grid, 8, 11):
        add("gpt2", s, lambda b, s=s: _zoo("gpt2-small", b, seq_len=s["seq"], n_embd=s["hidden"],
                                           n_layer=s["layers"]))
    for s in _sample({"width": (0.25, 0.5, 1.0), "depth": (0.25, 0.5), "image_size": (32, 64)}, 6, 15):
        add("hf-efficientnet", s, lambda b, s=s: _efficientnet(b, s["width"], s["depth"], s["image_size"]))
    for s in _sample({"scale": (8, 16, 32), "groups_width": (8, 16), "depth": (1, 2), "image_size": (32, 64)}, 6, 16):
        add("hf-regnet", s, lambda b, s=s: _hf_vision(
            b, "RegNetConfig", "RegNetForImageClassification", s["image_size"], embedding_size=s["scale"],
            hidden_sizes=[s["scale"] * m for m in (2, 4, 8, 16)], depths=[s["depth"]] * 4,
            groups_width=s["groups_width"], num_labels=10))
    for s in _sample(text_grid, 8, 17):
        add("opt", s, lambda b, s=s: _hf_decoder(
            b, "OPTConfig", "OPTForCausalLM", s["seq"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            ffn_dim=4 * s["hidden"], num_attention_heads=4, word_embed_proj_dim=s["hidden"]))
    for s in _sample(text_grid, 8, 18):
        add("llama", s, lambda b, s=s: _hf_decoder(
            b, "LlamaConfig", "LlamaForCausalLM", s["seq"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            intermediate_size=3 * s["hidden"], num_attention_heads=4, num_key_value_heads=2))
    for s in _sample({"image_size": (32, 48, 64)}, 3, 12):
        add("multitask", {"kind": "twin", **s}, lambda b, s=s: _twin(b, s["image_size"]))
    for s in _sample({"width": (8, 16, 32), "image": (32, 48)}, 3, 13):
        add("multitask", {"kind": "vgg+resblock", **s}, lambda b, s=s: _vgg_resblock(b, s["width"], s["image"]))
    for s in _sample({"hidden": (32, 64), "seq": (16, 32)}, 2, 14):
        add("multitask", {"kind": "bert+distilbert", **s}, lambda b, s=s: _two_text(b, s["hidden"], s["seq"]))
    return out


def _hf_vision(batch: int, config: str, model: str, image: int, **kwargs: Any) -> Built:
    """A transformers image classifier built from a config (random weights, no download)."""
    import transformers

    from morphc.zoo.hf import VisionWrapper

    hf = getattr(transformers, model)(getattr(transformers, config)(**kwargs))
    return VisionWrapper(hf).eval(), _image(batch, image)


def _efficientnet(batch: int, width: float, depth: float, image: int) -> Built:
    import transformers
    from transformers.models.efficientnet.modeling_efficientnet import round_filters

    # the config's default head width assumes width 2.0 (a B7-sized head): scale it with the width
    hidden_dim = round_filters(transformers.EfficientNetConfig(width_coefficient=width), 1280)
    return _hf_vision(batch, "EfficientNetConfig", "EfficientNetForImageClassification", image,
                      width_coefficient=width, depth_coefficient=depth, image_size=image, num_labels=10,
                      hidden_dim=hidden_dim)


def _hf_decoder(batch: int, config: str, model: str, seq: int, **kwargs: Any) -> Built:
    """A transformers causal LM built from a config (vocabulary 1000, no KV cache), with token inputs."""
    import transformers

    from morphc.zoo.hf import TextWrapper, text_inputs

    cfg = getattr(transformers, config)(vocab_size=1000, max_position_embeddings=128, use_cache=False,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
    return TextWrapper(getattr(transformers, model)(cfg), "logits", use_cache=False).eval(), text_inputs(
        batch, seq, cfg.vocab_size, 0, pad_id=0)


def _twin(batch: int, image: int) -> Built:
    from morphc import zoo

    return zoo.twin_tasks(batch_size=batch, image_size=image)


def _vgg_resblock(batch: int, width: int, image: int) -> Built:
    a, inputs = _zoo("resnet_block_cnn", batch, width=width, image_size=image)
    return {"plain": PlainCNN(4, width, 3).eval(), "res": a}, inputs


def _two_text(batch: int, hidden: int, seq: int) -> Built:
    a, inputs = _zoo("bert-small", batch, seq_len=seq, hidden_size=hidden, intermediate_size=2 * hidden)
    b, _ = _zoo("distilbert-small", batch, seq_len=seq, dim=hidden, hidden_dim=2 * hidden)
    return {"bert": a, "distil": b}, inputs


VARIANTS: tuple[Variant, ...] = tuple(_variants())
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(v.family for v in VARIANTS))
# Families the benchmark holds out of training entirely (split (b)); the shipped checkpoint is trained on all.
HELD_OUT_FAMILIES: tuple[str, ...] = ("gpt2", "hf-mobilenet", "branchy")


def variant(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"no corpus variant '{name}' ({len(VARIANTS)} variants; families: {', '.join(FAMILIES)})")
