"""Registry of zoo entries: names, metadata, and the builder behind each name.

Kept free of any model code so that `cnn`, `hf` and `pretrained` can all register
into it without importing each other, and so that listing names never imports
transformers.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch

SIZES = ("small", "base")
FAMILIES = ("cnn", "transformer", "mlp")


@dataclass(frozen=True, eq=False)
class ZooModel:
    """A ready-to-run model: `model(*example_inputs)` returns one tensor.

    `eq=False` because tensors have no total equality; two ZooModels compare by identity.
    """

    name: str
    model: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    family: str


# A builder gets (batch_size, seed, **kwargs) and returns (model, example_inputs).
Builder = Callable[..., tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]


@dataclass(frozen=True)
class ZooEntry:
    """Metadata for one name; `builder` is only called by `build`, so listing stays cheap."""

    name: str
    family: str
    size: str
    pretrained: bool
    builder: Builder
    description: str = ""


_REGISTRY: dict[str, ZooEntry] = {}


def register(
    name: str,
    *,
    family: str,
    size: str,
    pretrained: bool = False,
    description: str = "",
) -> Callable[[Builder], Builder]:
    """Decorator adding a builder under `name`; a duplicate name is a programming error."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"zoo name {name!r} registered twice")
        _REGISTRY[name] = ZooEntry(name, family, size, pretrained, fn, description)
        return fn

    return deco


def entry(name: str) -> ZooEntry:
    """Look up a name; unknown names raise ValueError with a close-match hint."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown zoo model {name!r}.{hint} Valid names: {', '.join(valid)}"
        ) from None


def names(
    *,
    size: str | None = None,
    pretrained: bool | None = None,
    family: str | None = None,
) -> list[str]:
    """Sorted names, optionally filtered by size, pretrained-ness and family."""
    if size is not None and size not in SIZES:
        raise ValueError(f"size must be one of {SIZES} or None, got {size!r}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    return sorted(
        e.name
        for e in _REGISTRY.values()
        if (size is None or e.size == size)
        and (pretrained is None or e.pretrained == pretrained)
        and (family is None or e.family == family)
    )


def build(
    name: str, *, batch_size: int = 1, seed: int = 0, **kwargs: object
) -> ZooModel:
    """Build `name` with weights seeded by `seed`, in eval mode, on CPU, float32.

    Seeding happens here (not in each builder) so every entry is deterministic the
    same way; pretrained entries ignore the weight seed but still use it for inputs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    e = entry(name)
    torch.manual_seed(seed)
    model, inputs = e.builder(batch_size=batch_size, seed=seed, **kwargs)
    # Parameters keep requires_grad: fusion passes may fine-tune a merged model.
    model = model.to(device="cpu", dtype=torch.float32).eval()
    return ZooModel(
        name=name, model=model, example_inputs=tuple(inputs), family=e.family
    )


def generator(seed: int) -> torch.Generator:
    """A private RNG for example inputs, so inputs do not depend on how many random
    numbers weight initialisation happened to draw."""
    return torch.Generator().manual_seed(seed)
