"""Features of a Program for the latency cost model, over the IR's real dataflow graph.

Two steps, so that collected data outlives feature changes:

1. `extract(program) -> OpGraph`: the raw, device-independent description of the graph. One node
   per input placeholder and operator (parameters are folded into the operators that read them, as
   parameter bytes), each with its ATen operator name, OpClass, FLOPs, activation bytes, parameter
   bytes, output elements and rank, and key attributes (conv kernel area / stride / groups, matmul
   reduction size, attention sequence and head size); edges are the fx dataflow edges (RaPP used
   only sequential order). Deterministic: the same Program always gives the same OpGraph.
   `OpGraph.to_json` / `from_json` store it in the records database.
2. `node_features` / `graph_features`: fixed-length numeric vectors (log-scaled), with the serving
   config (batch, threads) as inputs, and optional per-op runtime features (measured op latency
   under 1 and 2 threads, RaPP's runtime features) plus a flag saying whether they are present, so
   a new, never-profiled program is predicted from static features alone. A config whose batch
   differs from the graph's scales the batch-proportional quantities (FLOPs, activation bytes,
   output elements) by the ratio; parameter bytes do not scale.
   GPU configs use the same layout, so one schema serves both device kinds (a checkpoint is trained
   on one kind, which it records): the resource value in the threads' place is the SM share as a
   fraction (sm_share / 100 x time_quota: 1.0, 0.5, 0.2), and the two runtime columns are the
   op latencies at SM shares `spaces.GPU_RUNTIME_SHARES` (100% and 50%) instead of 1 and 2 threads.

`FEATURE_SCHEMA` names the layout; checkpoints store it and refuse another.
"""

from __future__ import annotations

import json
import math
import zlib
from base64 import b64decode, b64encode
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch.fx as fx

from morphc.ir.metadata import OpClass, node_meta, op_name
from morphc.ir.program import Program
from morphc.predictors.spaces import GPU_RUNTIME_SHARES, CpuConfig, GpuConfig

OPGRAPH_VERSION = 2  # 2: pool windows clipped to the padded input, pool stride as attr1
FEATURE_SCHEMA = "morphc-cost-features-v4"  # v3: pooling windows count as work; v4: windows clipped to the input

OP_CLASSES: tuple[str, ...] = tuple(c.value for c in OpClass)
# Operators frequent enough in inference graphs to get their own one-hot column; the rest share "other".
OP_VOCAB: tuple[str, ...] = (
    "conv2d", "convolution", "linear", "addmm", "mm", "bmm", "matmul", "scaled_dot_product_attention",
    "batch_norm", "_native_batch_norm_legit_no_training", "layer_norm", "group_norm", "relu", "relu6", "gelu",
    "silu", "sigmoid", "tanh", "hardtanh", "softmax", "_softmax", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
    "mean", "sum", "add", "sub", "mul", "div", "where", "masked_fill", "embedding", "view", "reshape", "permute",
    "transpose", "flatten", "cat", "slice", "select", "expand", "contiguous", "unsqueeze", "split", "clone",
    "_to_copy", "to", "arange", "pow", "tanh", "dropout", "layer_norm", "rsub",
)
_VOCAB_INDEX = {name: i for i, name in enumerate(dict.fromkeys(OP_VOCAB))}
N_VOCAB = len(_VOCAB_INDEX) + 1
N_NUMERIC = 9  # flops, act bytes, param bytes, out numel, out rank, attr0..2, intensity
N_RUNTIME = 3  # log op ms at 1 thread, at 2 threads, present flag
N_CONFIG = 4  # log2 batch, batch scale ratio, 1/threads, log2 threads
NODE_DIM = len(OP_CLASSES) + N_VOCAB + N_NUMERIC + N_RUNTIME + N_CONFIG
VOCAB_COLUMNS = slice(len(OP_CLASSES), len(OP_CLASSES) + N_VOCAB)  # the operator-name one-hot
VOCAB_NAMES: tuple[str, ...] = (*_VOCAB_INDEX, "other")  # the name of each of those columns, in order
GRAPH_DIM = 12


WINDOW_OPS = frozenset({"max_pool2d", "avg_pool2d"})  # attr0 is their window size (see _attrs)


@dataclass(frozen=True)
class OpGraph:
    """Raw per-node facts and dataflow edges of one Program (see the module docstring)."""

    ops: tuple[str, ...]
    classes: tuple[str, ...]
    numeric: np.ndarray  # [N, 8] float64: flops, act_bytes, param_bytes, out_numel, out_rank, attr0, attr1, attr2
    edges: np.ndarray  # [E, 2] int32 (source, destination) indices into the nodes
    names: tuple[str, ...]  # fx node names, to attach per-op measurements
    batch: int
    n_inputs: int
    n_outputs: int

    @property
    def num_nodes(self) -> int:
        return len(self.ops)

    @cached_property
    def work_flops(self) -> np.ndarray:
        """[N] each node's arithmetic work at the graph's own batch: counted FLOPs (torch's FlopCounterMode:
        matmuls, convolutions, attention), plus one operation per window element for pooling, which the
        counter leaves at 0. Without it a pool's time could only follow its bytes, and a 3x3 stride-1 pool
        does 2.5x more work per byte than the 3x3 stride-2 pools the training families have. Computed once
        per graph: every query's node and graph features read it."""
        window = np.asarray([op in WINDOW_OPS for op in self.ops], dtype=bool)
        return self.numeric[:, 0] + np.where(window, self.numeric[:, 3] * self.numeric[:, 5], 0.0)

    def to_json(self) -> dict[str, Any]:
        """A compact JSON-able form (zlib + base64) for the records database."""
        raw = {"version": OPGRAPH_VERSION, "ops": self.ops, "classes": self.classes,
               "numeric": self.numeric.tolist(), "edges": self.edges.tolist(), "names": self.names,
               "batch": self.batch, "n_inputs": self.n_inputs, "n_outputs": self.n_outputs}
        return {"opgraph": b64encode(zlib.compress(json.dumps(raw).encode(), 9)).decode()}

    @staticmethod
    def from_json(data: dict[str, Any]) -> OpGraph:
        try:
            raw = json.loads(zlib.decompress(b64decode(data["opgraph"])))
        except (KeyError, ValueError, zlib.error, TypeError) as exc:
            raise ValueError(f"stored op graph is corrupt: {exc}") from exc
        if raw.get("version") != OPGRAPH_VERSION:
            raise ValueError(f"stored op graph has version {raw.get('version')}; this morphc reads {OPGRAPH_VERSION}")
        return OpGraph(tuple(raw["ops"]), tuple(raw["classes"]), np.asarray(raw["numeric"], dtype=np.float64),
                       np.asarray(raw["edges"], dtype=np.int32).reshape(-1, 2), tuple(raw["names"]), int(raw["batch"]),
                       int(raw["n_inputs"]), int(raw["n_outputs"]))


def _shape(node: Any) -> tuple[int, ...]:
    if isinstance(node, fx.Node) and "morphc" in node.meta:
        s = node_meta(node).shape
        return tuple(s) if s is not None else ()
    return ()


def _attrs(node: fx.Node, name: str) -> tuple[float, float, float]:
    """Key attributes by operator family; zeros where they do not apply."""
    args = node.args
    if name in ("conv2d", "convolution", "conv1d", "_convolution") and len(args) >= 2:
        w = _shape(args[1])
        kernel = math.prod(w[2:]) if len(w) > 2 else 1
        stride = args[3] if len(args) > 3 else 1
        stride_v = float(stride[0] if isinstance(stride, (list, tuple)) else stride)
        groups = args[6] if name == "conv2d" and len(args) > 6 else args[8] if len(args) > 8 else 1
        return float(kernel), stride_v, float(groups if isinstance(groups, int) else 1)
    if name in ("linear", "addmm", "mm", "bmm", "matmul") and args:
        a = _shape(args[1] if name == "addmm" and len(args) > 1 else args[0])
        return (float(a[-1]) if a else 0.0), float(len(a)), 0.0
    if name == "scaled_dot_product_attention" and len(args) >= 2:
        q, k = _shape(args[0]), _shape(args[1])
        return (float(q[-2]) if len(q) >= 2 else 0.0), (float(k[-2]) if len(k) >= 2 else 0.0), (
            float(q[-1]) if q else 0.0)
    if name in WINDOW_OPS and len(args) >= 2:
        return _pool_window(node)
    return 0.0, 0.0, 0.0


def _pair(value: Any, default: tuple[int, int]) -> tuple[int, int]:
    if value is None or value == [] or value == ():
        return default
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def _pool_window(node: fx.Node) -> tuple[float, float, float]:
    """(elements each output reads, stride, 0) of a max/avg pool. The window is clipped to the padded
    input: a pool whose kernel exceeds its input (EfficientNet's head pools with a 1280-wide kernel
    and ceil_mode) reads the whole input once per output, not kernel-squared elements."""
    kernel = _pair(node.args[1], (1, 1))
    stride = _pair(node.args[2] if len(node.args) > 2 else None, kernel)
    padding = _pair(node.args[3] if len(node.args) > 3 else 0, (0, 0))
    spatial = _shape(node.args[0])[-2:]
    if len(spatial) == 2:
        kernel = (min(kernel[0], spatial[0] + 2 * padding[0]), min(kernel[1], spatial[1] + 2 * padding[1]))
    return float(kernel[0] * kernel[1]), float(stride[0]), 0.0


def extract(program: Program) -> OpGraph:
    """The OpGraph of `program` (deterministic: graph order, no hashing of object ids)."""
    index: dict[fx.Node, int] = {}
    ops: list[str] = []
    classes: list[str] = []
    numeric: list[list[float]] = []
    names: list[str] = []
    edges: list[tuple[int, int]] = []
    n_outputs = 0
    for node in program.graph.nodes:
        if node.op == "output":
            n_outputs = len(program.outputs)
            continue
        if node.op not in ("placeholder", "call_function"):
            continue
        meta = node_meta(node)
        name = "input" if node.op == "placeholder" else op_name(node.target)
        out_numel = sum(math.prod(o.shape) for o in meta.outputs)
        out_rank = max((len(o.shape) for o in meta.outputs), default=0)
        act = max(meta.bytes_moved - meta.param_bytes, 0)
        index[node] = len(ops)
        ops.append(name)
        classes.append(meta.op_class.value)
        numeric.append([float(meta.flops), float(act), float(meta.param_bytes), float(out_numel), float(out_rank),
                        *_attrs(node, name)])
        names.append(node.name)
        for src in node.all_input_nodes:
            if src in index:
                edges.append((index[src], index[node]))
    batch = int(program.inputs[0].shape[0]) if program.inputs and program.inputs[0].shape else 1
    return OpGraph(tuple(ops), tuple(classes), np.asarray(numeric, dtype=np.float64).reshape(-1, 8),
                   np.asarray(edges, dtype=np.int32).reshape(-1, 2), tuple(names), batch,
                   len(program.inputs), n_outputs)


def _config_values(graph: OpGraph, config: CpuConfig | GpuConfig) -> tuple[float, float, float]:
    """(batch, batch ratio, resource) of `config` for `graph`: the resource is the thread count on CPU, the
    SM share as a fraction (times the time quota) on GPU."""
    batch = float(config.batch if config.batch is not None else graph.batch)
    share = float(config.threads) if isinstance(config, CpuConfig) else config.sm_share / 100 * config.time_quota
    return batch, batch / graph.batch, share


def static_node_block(graph: OpGraph) -> np.ndarray:
    """The config-independent columns (one-hots) of the node features; cached by callers."""
    n = graph.num_nodes
    block = np.zeros((n, len(OP_CLASSES) + N_VOCAB), dtype=np.float32)
    cls_index = {c: i for i, c in enumerate(OP_CLASSES)}
    for i, (cls, op) in enumerate(zip(graph.classes, graph.ops)):
        block[i, cls_index.get(cls, cls_index["other"])] = 1.0
        block[i, len(OP_CLASSES) + _VOCAB_INDEX.get(op, N_VOCAB - 1)] = 1.0
    return block


def node_features(graph: OpGraph, config: CpuConfig | GpuConfig, runtime: np.ndarray | None = None,
                  static_block: np.ndarray | None = None) -> np.ndarray:
    """[N, NODE_DIM] float32 features; `runtime` is [N, 2] measured op ms at 1 and 2 threads on CPU, at SM
    shares GPU_RUNTIME_SHARES on GPU (or None)."""
    batch, ratio, share = _config_values(graph, config)
    num = graph.numeric
    flops, act, params, numel = graph.work_flops * ratio, num[:, 1] * ratio, num[:, 2], num[:, 3] * ratio
    intensity = np.log1p(flops / np.maximum(act + params, 1.0))
    numeric = np.stack([np.log1p(flops) / 20, np.log1p(act) / 20, np.log1p(params) / 20, np.log1p(numel) / 15,
                        num[:, 4] / 4, np.log1p(num[:, 5]) / 5, np.log1p(num[:, 6]) / 5, np.log1p(num[:, 7]) / 5,
                        intensity / 5], axis=1)
    rt = np.zeros((graph.num_nodes, N_RUNTIME))
    if runtime is not None:
        if runtime.shape != (graph.num_nodes, 2):
            raise ValueError(f"runtime features must be [{graph.num_nodes}, 2] (op ms at 1 and 2 threads, or at "
                             f"SM shares {GPU_RUNTIME_SHARES} on GPU), got {list(runtime.shape)}")
        rt[:, :2] = np.log1p(np.maximum(runtime, 0.0) * 1e3 * ratio) / 10
        rt[:, 2] = 1.0
    cfg = np.tile([math.log2(batch) / 4, math.log2(ratio) / 4, 1.0 / share, math.log2(share) / 2],
                  (graph.num_nodes, 1))
    block = static_block if static_block is not None else static_node_block(graph)
    return np.concatenate([block, numeric, rt, cfg], axis=1).astype(np.float32)


def node_work(graph: OpGraph, config: CpuConfig | GpuConfig) -> np.ndarray:
    """[N, 2] float32: each node's GFLOPs and GB moved (activations + parameters) under `config`'s batch.

    The raw scales the network's per-node roofline multiplies (cost_model.LatencyGNN): they span
    orders of magnitude, which a network extrapolates badly from log-features alone.
    """
    _, ratio, _ = _config_values(graph, config)
    num = graph.numeric
    return np.stack([graph.work_flops * ratio / 1e9, (num[:, 1] * ratio + num[:, 2]) / 1e9],
                    axis=1).astype(np.float32)


def graph_features(graph: OpGraph, config: CpuConfig | GpuConfig) -> np.ndarray:
    """[GRAPH_DIM] float32: totals (log FLOPs, bytes, params, nodes, edges), op mix, config."""
    batch, ratio, share = _config_values(graph, config)
    num = graph.numeric
    classes = np.asarray(graph.classes)
    heavy = np.isin(classes, ("conv", "linear", "attention")).sum()
    shape_ops = (classes == "shape").sum()
    return np.asarray([
        np.log1p(graph.work_flops.sum() * ratio) / 20, np.log1p(num[:, 1].sum() * ratio) / 20,
        np.log1p(num[:, 2].sum()) / 20, math.log1p(graph.num_nodes) / 7, math.log1p(len(graph.edges)) / 7,
        math.log1p(heavy) / 5, math.log1p(shape_ops) / 5, graph.n_outputs / 4, math.log2(batch) / 4,
        math.log2(ratio) / 4, 1.0 / share, math.log2(share) / 2,
    ], dtype=np.float32)


def runtime_column(config: CpuConfig | GpuConfig) -> int | None:
    """Which column of the runtime features was measured under `config`'s own resources (the per-op
    times that describe its operators), or None when neither was: on CPU the 1- or 2-thread column
    (more threads than 2: the 2-thread one); on GPU the column of its SM share, if it is one of
    GPU_RUNTIME_SHARES at the full time quota."""
    if isinstance(config, CpuConfig):
        return min(config.threads, 2) - 1
    if config.time_quota == 1.0 and config.sm_share in GPU_RUNTIME_SHARES:
        return GPU_RUNTIME_SHARES.index(config.sm_share)
    return None


def runtime_matrix(graph: OpGraph, per_thread: dict[int, dict[str, float]]) -> np.ndarray | None:
    """[N, 2] per-op ms at 1 and 2 threads from `profile_ops` results by thread count (None if missing)."""
    if 1 not in per_thread or 2 not in per_thread:
        return None
    out = np.zeros((graph.num_nodes, 2))
    for j, threads in enumerate((1, 2)):
        times = per_thread[threads]
        out[:, j] = [times.get(name, 0.0) for name in graph.names]
    return out
