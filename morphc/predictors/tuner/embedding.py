"""The model embedding the meta-model is conditioned on.

`static`: graph-level facts from the IR's metadata of the batch-1 Program (log FLOPs, bytes moved,
parameter bytes, node count, and the share of FLOPs in convolutions, linear layers and attention,
and the share of nodes that are cheap shape/elementwise ops, which is what makes small models
overhead-bound). `gnn`: the learned graph embedding of the cost model (`cost_model.embed(program)`),
a drop-in replacement when a trained cost model is given; the benchmark says which one it used.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from morphc.ir.metadata import OpClass, node_meta
from morphc.ir.program import Program

STATIC_DIM = 9


def static_embedding(program: Program) -> np.ndarray:
    """[STATIC_DIM] float32 description of a Program from its node metadata."""
    flops = nbytes = 0.0
    by_class: dict[str, float] = {}
    nodes = cheap = 0
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        meta = node_meta(node)
        nodes += 1
        flops += meta.flops
        nbytes += meta.bytes_moved
        by_class[meta.op_class] = by_class.get(meta.op_class, 0.0) + meta.flops
        cheap += meta.op_class in (OpClass.SHAPE, OpClass.ELEMENTWISE, OpClass.CREATION)
    total = max(flops, 1.0)
    return np.array([
        math.log10(flops + 1.0) / 10, math.log10(nbytes + 1.0) / 10, math.log10(program.param_bytes() + 1.0) / 10,
        math.log10(nodes + 1.0) / 3, by_class.get(OpClass.CONV, 0.0) / total, by_class.get(OpClass.LINEAR, 0.0) / total,
        by_class.get(OpClass.ATTENTION, 0.0) / total, cheap / max(nodes, 1), len(program.tasks) / 4,
    ], dtype=np.float32)


def embed(program: Program, kind: str = "static", cost_model: Any = None) -> np.ndarray:
    """The embedding of `kind` ("static", or "gnn" with a cost model that has `embed(program)`)."""
    if kind == "static":
        return static_embedding(program)
    if kind == "gnn":
        if cost_model is None or not hasattr(cost_model, "embed"):
            raise ValueError("embedding 'gnn' needs a trained cost model with embed(program) (ctx.cost_model); "
                             "use embedding 'static' without one")
        return np.asarray(cost_model.embed(program), dtype=np.float32)
    raise ValueError(f"unknown embedding '{kind}'; valid: static, gnn")


def standardize(train: np.ndarray, rows: np.ndarray, clip: float = 3.0) -> np.ndarray:
    """`rows` z-scored per dimension with the mean/std of `train` (the meta-training models only, so a held-out
    model's embedding never shapes its own normalization), clipped to +-`clip`; constant dimensions become 0.
    Why: GNN node-state pools have arbitrary per-dimension scales, and an unscaled dimension would dominate
    the meta-model's first layer."""
    train = np.asarray(train, dtype=np.float64)
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-8, std, np.inf)
    return np.clip((np.asarray(rows, dtype=np.float64) - mean) / std, -clip, clip).astype(np.float32)


def combine(parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Concatenation of several embeddings, each standardized on its own training rows and weighted by
    1/sqrt(dim) so every part carries the same expected squared norm (a 128-d GNN pool does not drown a 9-d
    static vector); scaled back by sqrt(smallest dim). `parts`: name -> (train rows [n, d], rows [m, d])."""
    dims = [rows.shape[-1] for _, rows in parts.values()]
    smallest = min(dims)
    return np.concatenate([standardize(train, rows) * math.sqrt(smallest / rows.shape[-1])
                           for train, rows in parts.values()], axis=-1).astype(np.float32)
