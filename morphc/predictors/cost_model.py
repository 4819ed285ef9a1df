"""The latency cost model: a Flax NNX graph neural network over a Program's dataflow graph.

Structure (why): latency of eager inference is close to a sum of per-operator times plus a fixed
per-call overhead, so the network predicts a log-time for every operator from its features, its
neighbourhood (3 rounds of message passing along the fx dataflow edges, in both directions) and the
serving config, adds them up in log space (`logsumexp` over the graph's nodes), and adds a
graph-level MLP correction (per-call overhead, contention between threads) computed from pooled
node states and graph features. Trained with optax (AdamW, cosine schedule) on mean squared error
of log latency, i.e. relative error, which is what passes compare. Per-op runtime features (op
latency measured under 1 and 2 threads, as RaPP) are optional inputs: training hides them at
random, so the same network predicts never-profiled programs from static features alone.

API for passes: `ctx.cost_model.predict(program, config) -> seconds` (PassContext's contract),
`predict_ms`, `predict_many` (one jitted call for many queries), `embed(program) -> vector` (a
graph embedding for the meta-learned tuner). `load_default()` loads the checkpoint shipped in
`morphc/predictors/checkpoints/`. Checkpoints are one `.npz` (no pickle) holding the parameters and
a JSON header with the feature schema, the hyperparameters, and the device fingerprint of the
machine the training data was measured on; another schema, a corrupt file or a device kind that
does not match the config is refused with a clear error, never answered with a number.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
import warnings
import weakref
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from morphc.errors import MorphcError
from morphc.ir.program import Program
from morphc.predictors.features import (
    FEATURE_SCHEMA,
    GRAPH_DIM,
    NODE_DIM,
    OP_CLASSES,
    VOCAB_COLUMNS,
    VOCAB_NAMES,
    OpGraph,
    extract,
    graph_features,
    node_features,
    node_work,
    runtime_column,
    static_node_block,
)
from morphc.predictors.records import device_fingerprint
from morphc.predictors.spaces import CpuConfig, GpuConfig

CHECKPOINT_FORMAT = "morphc-cost-model"
CHECKPOINT_VERSION = 3  # 3: ensemble members, the profiler-overhead parameter
DEFAULT_CHECKPOINT = "cpu-default.npz"
DEFAULT_MEMBERS = 4  # ensemble size of the shipped checkpoint (see train)
NODE_FLOOR_MS = 1e-3  # per-operator times below a microsecond are measurement noise: compared above this floor
NODE_LOSS = 0.2  # weight of the per-operator loss (see train)
CONTEXT_BOUND = 0.5  # how far message passing may move a bounded node's log time (see train's context_bound)
CONTEXT_CLASSES = ("conv", "pool")  # the operator classes bounded by default (adopted in session 17)
# The operator groups a calibration gives their own speed (`morphc.predictors.calibration`): machines differ per
# kernel kind. On the Intel Xeon VM the EPYC checkpoint's linear layers ran at its speed, its convolutions 1.4x
# slower and the rest 1.6x. Every class not named is in the last group.
SPEED_GROUPS: dict[str, tuple[str, ...]] = {"conv": ("conv",), "matmul": ("linear", "attention"), "other": ()}
_GROUP_OF_CLASS = {cls: i for i, members in enumerate(SPEED_GROUPS.values()) for cls in members}
# [operator classes, groups]: each class's group as a one-hot row
_CLASS_GROUP = np.eye(len(SPEED_GROUPS), dtype=np.float32)[[_GROUP_OF_CLASS.get(cls, len(SPEED_GROUPS) - 1)
                                                             for cls in OP_CLASSES]]


def _speed_groups(x: Any) -> Any:
    """[N, groups] each node's SPEED_GROUPS group as a one-hot, from the class one-hot of its features `x`
    (numpy or traced jax)."""
    return x[:, :len(OP_CLASSES)] @ _CLASS_GROUP


class CostModelError(MorphcError):
    """A cost-model checkpoint is missing, corrupt, or made for other features or another device kind."""


class CostModelWarning(UserWarning):
    """The checkpoint describes another machine than this one: predictions are for that machine."""


# --- the network ------------------------------------------------------------------------------

NODE_HEAD_INIT = (3.0, 4.6, -4.6)  # ~20 ms/GFLOP, ~100 ms/GB, ~10 us per operator


class LatencyGNN(nnx.Module):
    """Message passing over dataflow edges + per-node log-time head + graph-level MLP correction."""

    def __init__(self, node_dim: int, graph_dim: int, hidden: int = 64, layers: int = 3,
                 context_bound: float = 0.0, context_classes: Sequence[str] = (), correction_bound: float = 0.0,
                 correction_offset: bool = False, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Linear(node_dim, hidden, rngs=rngs)
        self.msg_fwd = nnx.List([nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(layers)])
        self.msg_bwd = nnx.List([nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(layers)])
        self.update = nnx.List([nnx.Linear(3 * hidden, hidden, rngs=rngs) for _ in range(layers)])
        self.norms = nnx.List([nnx.LayerNorm(hidden, rngs=rngs) for _ in range(layers)])
        # per node: log ms per GFLOP, log ms per GB moved, log ms of fixed overhead (a roofline with
        # learned, context-dependent coefficients); initialised near a single CPU core's values
        every_class = context_bound and not context_classes
        self.node_head = nnx.Linear(hidden, 3, rngs=rngs, kernel_init=nnx.initializers.normal(0.01),
                                    bias_init=lambda *_: jnp.asarray((0.0,) * 3 if every_class else NODE_HEAD_INIT))
        # context_bound > 0: the coefficients come from the node's own features alone (`local`), and what the
        # messages add is bounded to +-context_bound in log space; only for the operator classes in
        # context_classes where it names some (their columns of the class one-hot); see train's `context_bound`
        self.context_bound = context_bound
        self.context_columns = tuple(OP_CLASSES.index(c) for c in context_classes)
        self.local: nnx.Linear | None = nnx.data(None)
        self.local_head: nnx.Linear | None = nnx.data(None)
        if context_bound:
            self.local = nnx.data(nnx.Linear(node_dim, hidden, rngs=rngs))
            self.local_head = nnx.data(nnx.Linear(hidden, 3, rngs=rngs, kernel_init=nnx.initializers.normal(0.01),
                                                  bias_init=lambda *_: jnp.asarray(NODE_HEAD_INIT)))
        # log ms the per-operator profiler adds to every operator it times (its interpreter and timer):
        # fitted with the per-operator loss only, so that node times stay operator times
        self.probe_log_ms = nnx.Param(jnp.asarray(math.log(0.005), dtype=jnp.float32))
        self.graph_hidden = nnx.Linear(2 * hidden + graph_dim, hidden, rngs=rngs)
        self.graph_out = nnx.Linear(hidden, 1, rngs=rngs, kernel_init=nnx.initializers.zeros)
        # correction_bound > 0: the graph MLP may move the summed node times by at most +-correction_bound in log
        # space (tanh); see train's `correction_bound`
        self.correction_bound = correction_bound
        # correction_offset: the bound is around a learned log offset shared by every graph, not around 0
        self.correction_offset: nnx.Param | None = nnx.data(None)
        if correction_offset:
            self.correction_offset = nnx.Param(jnp.zeros((), dtype=jnp.float32))

    def __call__(self, batch: dict[str, jax.Array], num_graphs: int) -> tuple[jax.Array, jax.Array]:
        """(log-ms per graph [num_graphs], embedding per graph [num_graphs, 2*hidden])."""
        out, emb, _ = self.with_nodes(batch, num_graphs)
        return out, emb

    def with_nodes(self, batch: dict[str, jax.Array], num_graphs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """As __call__, plus every node's own log-ms [nodes] (-inf on padding)."""
        x, mask = batch["x"], batch["mask"]
        senders, receivers, gid = batch["senders"], batch["receivers"], batch["graph"]
        n = x.shape[0]
        segments = num_graphs + 1  # the last segment collects padding
        ones = jnp.ones_like(senders, dtype=x.dtype)
        deg_in = jnp.maximum(jax.ops.segment_sum(ones, receivers, n), 1.0)[:, None]
        deg_out = jnp.maximum(jax.ops.segment_sum(ones, senders, n), 1.0)[:, None]
        h = nnx.gelu(self.embed(x))
        for fwd, bwd, upd, norm in zip(self.msg_fwd, self.msg_bwd, self.update, self.norms):
            m_in = jax.ops.segment_sum(fwd(h)[senders], receivers, n) / deg_in
            m_out = jax.ops.segment_sum(bwd(h)[receivers], senders, n) / deg_out
            h = norm(h + nnx.gelu(upd(jnp.concatenate([h, m_in, m_out], axis=-1))))
        h = h * mask[:, None]
        coef = self.node_head(h)
        if self.local is not None and self.local_head is not None:
            bound = self.context_bound
            local = self.local_head(nnx.gelu(self.local(x)))
            if not self.context_columns:
                coef = local + bound * jnp.tanh(coef / bound)
            else:  # the node head starts at the roofline init here, and its departure from it is bounded
                chosen = x[:, list(self.context_columns)].sum(axis=-1, keepdims=True) > 0
                bounded = local + bound * jnp.tanh((coef - jnp.asarray(NODE_HEAD_INIT)) / bound)
                coef = jnp.where(chosen, bounded, coef)
        scales = jnp.log(jnp.concatenate([batch["work"], jnp.ones_like(batch["work"][:, :1])], axis=-1) + 1e-12)
        z = jnp.where(mask > 0, jax.nn.logsumexp(coef + scales, axis=-1), -jnp.inf)
        zmax = jax.ops.segment_max(z, gid, segments)
        zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)
        total = jax.ops.segment_sum(jnp.exp(z - zmax[gid]), gid, segments)
        lse = jnp.log(jnp.maximum(total, 1e-30)) + zmax
        count = jnp.maximum(jax.ops.segment_sum(mask, gid, segments), 1.0)[:, None]
        mean = jax.ops.segment_sum(h, gid, segments) / count
        hmax = jax.ops.segment_max(jnp.where(mask[:, None] > 0, h, -1e9), gid, segments)
        hmax = jnp.where(count > 0, jnp.maximum(hmax, -1e3), 0.0)
        emb = jnp.concatenate([mean, hmax], axis=-1)[:num_graphs]
        g = nnx.gelu(self.graph_hidden(jnp.concatenate([emb, batch["gfeat"]], axis=-1)))
        correction = self.graph_out(g)[:, 0]
        if self.correction_bound:
            correction = self.correction_bound * jnp.tanh(correction / self.correction_bound)
        if self.correction_offset is not None:
            correction = correction + self.correction_offset[...]
        return lse[:num_graphs] + correction, emb, z


# --- batching -----------------------------------------------------------------------------------


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))


@dataclass(frozen=True)
class Query:
    """One graph under one config, as arrays: node features, edges, graph features."""

    x: np.ndarray
    work: np.ndarray  # [N, 2] GFLOPs and GB per node (features.node_work)
    edges: np.ndarray
    gfeat: np.ndarray
    threads: int = 1  # the config's intra-op threads (0 for a GPU config): which calibration scale applies


def make_query(graph: OpGraph, config: CpuConfig | GpuConfig, runtime: np.ndarray | None = None,
               static_block: np.ndarray | None = None) -> Query:
    return Query(node_features(graph, config, runtime, static_block), node_work(graph, config), graph.edges,
                 graph_features(graph, config), getattr(config, "threads", 0))


def pack(queries: Sequence[Query], num_graphs: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Concatenate queries into one padded batch (node/edge counts rounded up to powers of two)."""
    g = num_graphs or _bucket(len(queries), 1)
    n_real = sum(q.x.shape[0] for q in queries)
    e_real = sum(len(q.edges) for q in queries)
    n_pad, e_pad = _bucket(n_real + 1, 64), _bucket(e_real + 1, 64)
    x = np.zeros((n_pad, NODE_DIM), np.float32)
    work = np.zeros((n_pad, 2), np.float32)
    mask = np.zeros(n_pad, np.float32)
    gid = np.full(n_pad, g, np.int32)
    senders = np.full(e_pad, n_pad - 1, np.int32)
    receivers = np.full(e_pad, n_pad - 1, np.int32)
    gfeat = np.zeros((g, GRAPH_DIM), np.float32)
    n0 = e0 = 0
    for i, q in enumerate(queries):
        k, e = q.x.shape[0], len(q.edges)
        x[n0:n0 + k] = q.x
        work[n0:n0 + k] = q.work
        mask[n0:n0 + k] = 1.0
        gid[n0:n0 + k] = i
        if e:
            senders[e0:e0 + e] = q.edges[:, 0] + n0
            receivers[e0:e0 + e] = q.edges[:, 1] + n0
        gfeat[i] = q.gfeat
        n0, e0 = n0 + k, e0 + e
    return {"x": x, "work": work, "mask": mask, "graph": gid, "senders": senders, "receivers": receivers,
            "gfeat": gfeat}, g


def _compile_forward(members: Sequence[LatencyGNN]
                     ) -> Callable[[dict[str, np.ndarray], int], tuple[jax.Array, jax.Array, jax.Array]]:
    """One plain jax.jit over the members' split states (no NNX graph traversal per query): the mean of
    their log-ms predictions, the first member's embedding, and each graph's node time split by SPEED_GROUPS
    (shares of the members' node times averaged in log space: what a calibration's factors weigh)."""
    graphdef, _ = nnx.split(members[0])
    states = [nnx.split(m)[1] for m in members]

    @partial(jax.jit, static_argnums=(2,))
    def forward(states: list[nnx.State], batch: dict[str, jax.Array], num_graphs: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        outs = [nnx.merge(graphdef, state).with_nodes(batch, num_graphs) for state in states]
        z = jnp.mean(jnp.stack([nodes for _, _, nodes in outs]), axis=0)
        gid, segments = batch["graph"], num_graphs + 1
        zmax = jax.ops.segment_max(z, gid, segments)
        zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)
        weight = jnp.exp(z - zmax[gid])[:, None] * _speed_groups(batch["x"])
        per_group = jax.ops.segment_sum(weight, gid, segments)[:num_graphs]
        shares = per_group / jnp.maximum(per_group.sum(axis=-1, keepdims=True), 1e-30)
        return jnp.mean(jnp.stack([log_ms for log_ms, _, _ in outs]), axis=0), outs[0][1], shares

    return lambda batch, num_graphs: forward(states, batch, num_graphs)


# --- the predictor ------------------------------------------------------------------------------


@dataclass
class CostModel:
    """Trained LatencyGNNs (an ensemble of independently seeded members, whose log-ms predictions
    are averaged) with what they were trained for; see the module docstring."""

    members: tuple[LatencyGNN, ...]
    meta: dict[str, Any]
    # an operator name no training graph had is predicted as if its name were hidden (see _hide_op_names)
    hide_unseen_ops: bool = True
    # per intra-op thread count, log(this machine's time / the checkpoint machine's) of each SPEED_GROUPS group's
    # operators: a prediction is scaled by its groups' factors weighted by their shares of its node time. Set by a
    # calibration (`morphc.predictors.calibration.apply`); empty for the checkpoint's own machine
    log_factors: dict[int, tuple[float, ...]] = field(default_factory=dict)
    _graphs: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)  # the warnings given (each once)
    _forward: Callable[..., tuple[jax.Array, jax.Array]] | None = field(default=None, repr=False)

    @property
    def device_kind(self) -> str:
        return str(self.meta["device_kind"])

    def _check_config(self, config: CpuConfig | GpuConfig) -> None:
        if config.device != self.device_kind:
            raise CostModelError(f"this cost model was trained on '{self.device_kind}' measurements and cannot "
                                 f"predict a {type(config).__name__} ({config.device}); load a {config.device} "
                                 "checkpoint (train one with `morphc train-cost-model`)")
        if self.device_kind != "cpu":
            return
        trained_flushed = bool(self.meta.get("flush_denormal", False))
        if config.flush_denormal != trained_flushed and "flush" not in self._warned:  # type: ignore[union-attr]
            self._warned.add("flush")
            protocol = {True: "with subnormals flushed to zero", False: "without flushing subnormals"}
            warnings.warn(f"cost model was trained on latencies measured {protocol[trained_flushed]}, the query "
                          f"asks for {protocol[not trained_flushed]}: predictions are for the former (they differ "
                          "where a program computes on subnormals, on Intel CPUs)", CostModelWarning, stacklevel=3)
        other_machine = self.meta["device_fingerprint"] != device_fingerprint()
        # a calibrated model predicts this machine: calibration.apply checked the calibration was measured here
        if "machine" not in self._warned and other_machine and not self.log_factors:
            self._warned.add("machine")
            warnings.warn(f"cost model describes '{self.meta['device_fingerprint']}', this machine is "
                          f"'{device_fingerprint()}': predictions are for the former (calibrate it to this one "
                          "with `morphc calibrate-cost-model`, or retrain with `morphc profile --corpus` + "
                          "`morphc train-cost-model`)",
                          CostModelWarning, stacklevel=3)

    def graph_of(self, program: Program) -> tuple[OpGraph, np.ndarray]:
        """The program's OpGraph (cached per program and graph generation)."""
        cached = self._graphs.get(program)
        if cached is None or cached[0] != program.generation:
            graph = extract(program)
            cached = (program.generation, graph, static_node_block(graph))
            self._graphs[program] = cached
        return cached[1], cached[2]

    def _queries(self, pairs: Sequence[tuple[Program, CpuConfig | GpuConfig]]) -> list[Query]:
        out = []
        for program, config in pairs:
            self._check_config(config)
            graph, block = self.graph_of(program)
            out.append(make_query(graph, config, static_block=block))
        return out

    def predict_queries(self, queries: Sequence[Query]) -> tuple[np.ndarray, np.ndarray]:
        """(latency ms [Q], embeddings [Q, D]) for prepared queries, in chunks of up to 64 graphs."""
        ms, emb, shares = self.predict_with_shares(queries)
        if self.log_factors:
            ms = ms * np.einsum("qg,qg->q", shares, np.exp([self.factors_of(q.threads) for q in queries]))
        return ms, emb

    def predict_with_shares(self, queries: Sequence[Query]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Uncalibrated (latency ms [Q], embeddings [Q, D], share of each SPEED_GROUPS group in the node time
        [Q, groups]) for prepared queries: what a calibration is fitted to."""
        preds, embs, shares = [], [], []
        queries = self._names_seen(queries)
        for start in range(0, len(queries), 64):
            chunk = queries[start:start + 64]
            batch, g = pack(chunk)
            if self._forward is None:
                self._forward = _compile_forward(self.members)
            log_ms, emb, share = self._forward(batch, g)
            preds.append(np.exp(np.asarray(log_ms, dtype=np.float64))[:len(chunk)])
            embs.append(np.asarray(emb)[:len(chunk)])
            shares.append(np.asarray(share, dtype=np.float64)[:len(chunk)])
        if not preds:
            return np.zeros(0), np.zeros((0, 2 * int(self.meta["hidden"]))), np.zeros((0, len(SPEED_GROUPS)))
        out = np.concatenate(preds)
        if not np.all(np.isfinite(out)):
            raise CostModelError("the cost model produced a non-finite prediction (corrupt checkpoint?)")
        return out, np.concatenate(embs), np.concatenate(shares)

    def predict_node_ms(self, query: Query) -> np.ndarray:
        """[N] each operator's own predicted time in ms (the members' node times averaged in log space), the
        terms the graph's prediction sums before its graph-level correction. For diagnosis: set against
        measured per-operator times (the profiler's, less `probe_ms`), they say which operators a prediction
        gets wrong; sessions 6, 13 and 15 found branchy's pools and GPT-2's names this way."""
        query = self._names_seen([query])[0]
        batch = {k: jnp.asarray(v) for k, v in pack([query])[0].items()}
        z = np.mean([np.asarray(m.with_nodes(batch, 1)[2]) for m in self.members], axis=0)
        z = z[:query.x.shape[0]].astype(np.float64)
        if self.log_factors:
            z = z + _speed_groups(query.x) @ np.asarray(self.factors_of(query.threads))
        return np.exp(z)

    def factors_of(self, threads: int) -> tuple[float, ...]:
        """The calibrated log factor of each SPEED_GROUPS group at `threads` intra-op threads: those of the
        nearest calibrated thread count (the larger one on a tie); zeros where the model is not calibrated."""
        return nearest_factors(self.log_factors, threads)

    def uncalibrated(self) -> CostModel:
        """This model predicting for the checkpoint's own machine (no calibration), sharing its caches."""
        return dataclasses.replace(self, log_factors={}, _graphs=self._graphs, _forward=self._forward)

    @property
    def digest(self) -> str:
        """A short hash of what decides a prediction (every parameter, the operator names seen in training):
        which checkpoint a calibration was fitted to, the same for a trained model and its saved file."""
        h = hashlib.blake2b(str(self.meta.get("seen_ops")).encode(), digest_size=8)
        for member in self.members:
            for _, leaf in _param_leaves(member):
                h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        return h.hexdigest()

    @property
    def probe_ms(self) -> float:
        """What the per-operator profiler adds to each operator it times, as learned (mean over members)."""
        return float(np.exp(np.mean([float(m.probe_log_ms[...]) for m in self.members])))

    def _names_seen(self, queries: Sequence[Query]) -> Sequence[Query]:
        """`queries` with the operator names no training graph had hidden (see `unseen_op_columns`)."""
        if not self.hide_unseen_ops or not (unseen := self.unseen_op_columns()).any():
            return queries
        return [_hide_op_names(q, q.x[:, VOCAB_COLUMNS][:, unseen].any(axis=1)) for q in queries]

    def unseen_op_columns(self) -> np.ndarray:
        """[vocabulary] bool: the operator-name columns no training graph had (all False for a checkpoint
        that does not record them). Their weights kept their random initialisation, and a new family's
        operator with such a name fed that noise into its own time and, through the messages, its
        neighbours': GPT-2's `addmm`, hf-mobilenet's `hardtanh` (see docs/cost_model.md)."""
        seen = self.meta.get("seen_ops")
        if seen is None:
            return np.zeros(len(VOCAB_NAMES), dtype=bool)
        return np.asarray([name not in seen and name != "other" for name in VOCAB_NAMES])

    def predict_ms(self, program: Program, config: CpuConfig | GpuConfig | None = None) -> float:
        """Predicted median latency in milliseconds of `program` under `config` (default: 1 thread)."""
        return float(self.predict_many([(program, config or CpuConfig())])[0] * 1e3)

    def predict(self, program: Program, config: CpuConfig | GpuConfig | None = None) -> float:
        """Predicted median latency in seconds (the PassContext contract)."""
        return float(self.predict_many([(program, config or CpuConfig())])[0])

    def predict_many(self, pairs: Sequence[tuple[Program, CpuConfig | GpuConfig]]) -> np.ndarray:
        """Predicted latencies in seconds for many (program, config) pairs, in one jitted call per 64."""
        return self.predict_queries(self._queries(pairs))[0] / 1e3

    def embed(self, program: Program, config: CpuConfig | GpuConfig | None = None) -> np.ndarray:
        """A fixed-length graph embedding (pooled node states) of `program` under `config`."""
        return self.predict_queries(self._queries([(program, config or CpuConfig())]))[1][0]

    # --- checkpoint IO ----------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """One .npz: parameters by path plus a JSON header (format, schema, hyperparameters, device)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {_array_name(k, i): np.asarray(leaf) for k, member in enumerate(self.members)
                  for i, (_, leaf) in enumerate(_param_leaves(member))}
        names = [name for name, _ in _param_leaves(self.members[0])]
        header = {**self.meta, "members": len(self.members), "param_names": names}
        arrays["__meta__"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path


def nearest_factors(log_factors: dict[int, tuple[float, ...]], threads: int) -> tuple[float, ...]:
    """The log factors calibrated for the thread count nearest `threads` (the larger on a tie); zeros if none."""
    if not log_factors:
        return (0.0,) * len(SPEED_GROUPS)
    return log_factors[min(log_factors, key=lambda t: (abs(t - threads), -t))]


def _param_leaves(model: LatencyGNN) -> list[tuple[str, jax.Array]]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in leaves]


def _array_name(member: int, index: int) -> str:
    """The .npz name of a member's parameter (the first member's keep the single-model names)."""
    return f"p{index}" if member == 0 else f"m{member}_p{index}"


def _new_model(meta: dict[str, Any], seed: int = 0) -> LatencyGNN:
    return LatencyGNN(NODE_DIM, GRAPH_DIM, int(meta["hidden"]), int(meta["layers"]),
                      float(meta.get("context_bound", 0.0)), tuple(meta.get("context_classes", ())),
                      float(meta.get("correction_bound", 0.0)), bool(meta.get("correction_offset", False)),
                      rngs=nnx.Rngs(seed))


def load(path: str | Path | io.BytesIO) -> CostModel:
    """Load a checkpoint; CostModelError (naming the problem) for anything but a valid, matching one."""
    where = f"'{path}'" if not isinstance(path, io.BytesIO) else "the checkpoint"
    if not isinstance(path, io.BytesIO) and not Path(path).is_file():
        raise CostModelError(f"cost-model checkpoint {where} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CostModelError(f"{where} is not a morphc cost-model checkpoint (unreadable .npz: {exc})") from exc
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise CostModelError(f"{where} has no valid morphc cost-model header: {exc}") from exc
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise CostModelError(f"{where} is format {meta.get('format')!r} version {meta.get('version')}; this morphc "
                             f"reads {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}")
    if meta.get("feature_schema") != FEATURE_SCHEMA:
        raise CostModelError(f"{where} was trained on feature schema {meta.get('feature_schema')!r}; this morphc "
                             f"computes {FEATURE_SCHEMA!r}: retrain it (`morphc train-cost-model`)")
    if meta.get("node_dim") != NODE_DIM or meta.get("graph_dim") != GRAPH_DIM:
        raise CostModelError(f"{where} expects {meta.get('node_dim')}/{meta.get('graph_dim')} node/graph features; "
                             f"this morphc computes {NODE_DIM}/{GRAPH_DIM}")
    count = meta.get("members", 1)
    if not isinstance(count, int) or count < 1:
        raise CostModelError(f"{where} declares {count!r} ensemble members; expected a positive integer")
    members = []
    for k in range(count):
        model = _new_model(meta)
        expected = _param_leaves(model)
        if meta.get("param_names") != [name for name, _ in expected]:
            raise CostModelError(f"{where} holds other parameters than a LatencyGNN(hidden={meta.get('hidden')}, "
                                 f"layers={meta.get('layers')}) has")
        leaves = []
        for i, (name, ref) in enumerate(expected):
            arr = arrays.get(_array_name(k, i))
            if arr is None or arr.shape != ref.shape:
                raise CostModelError(f"{where}: parameter {name} of member {k} is missing or has shape "
                                     f"{None if arr is None else list(arr.shape)}, expected {list(ref.shape)}")
            if not np.all(np.isfinite(arr)):
                raise CostModelError(f"{where}: parameter {name} of member {k} holds non-finite values "
                                     "(corrupt checkpoint)")
            leaves.append(jnp.asarray(arr, dtype=ref.dtype))
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), leaves))
        members.append(model)
    meta.pop("param_names", None)
    return CostModel(tuple(members), meta)


def shipped_checkpoints() -> dict[Path, str]:
    """The CPU checkpoints shipped in the package, each with the device fingerprint of the machine its
    training data was measured on (read from its header alone)."""
    folder = Path(str(resources.files("morphc.predictors") / "checkpoints"))
    found = {}
    for path in sorted(folder.glob("cpu-*.npz")):
        with np.load(path, allow_pickle=False) as data:
            found[path] = str(json.loads(data["__meta__"].tobytes().decode())["device_fingerprint"])
    return found


def default_checkpoint_path(fingerprint: str | None = None) -> Path:
    """The shipped checkpoint for the machine `fingerprint` (default: this one): the one measured on it
    (the same fingerprint, else the same CPU model), otherwise DEFAULT_CHECKPOINT, whose predictions then
    describe the machine it was measured on (`CostModel` warns)."""
    fingerprint = fingerprint or device_fingerprint("cpu")
    shipped = shipped_checkpoints()
    cpu_model = fingerprint.split("|")[1] if "|" in fingerprint else fingerprint
    for match in (lambda fp: fp == fingerprint, lambda fp: fp.split("|")[1:2] == [cpu_model]):
        if found := [path for path, fp in shipped.items() if match(fp)]:
            return found[0]
    return Path(str(resources.files("morphc.predictors") / "checkpoints" / DEFAULT_CHECKPOINT))


def load_or_default(path: str | Path | None) -> CostModel:
    """The checkpoint at `path`, or the shipped one for this machine (`load_default`) when None."""
    return load(path) if path else load_default()


def load_default() -> CostModel:
    """The CPU cost model shipped with morphc for this machine (see `default_checkpoint_path`; README:
    the machines the shipped ones describe, how to retrain for another)."""
    return load(default_checkpoint_path())


# --- training -----------------------------------------------------------------------------------


def _hide_op_names(query: Query, hide: np.ndarray) -> Query:
    """`query` with the operator-name one-hot of the nodes in `hide` replaced by "other": a random share
    of them in training (op dropout), those whose names no training graph had at prediction.

    Training sees operators as if their names were unknown, so the network learns what their class,
    shapes and neighbourhood say: what it has to go on for the operators of a family it never saw.
    """
    if not hide.any():
        return query
    x = query.x.copy()
    x[hide, VOCAB_COLUMNS] = 0.0
    x[hide, VOCAB_COLUMNS.stop - 1] = 1.0
    return dataclasses.replace(query, x=x)


@dataclass(frozen=True)
class TrainItem:
    """A training example: graph, config, measured latency, optional per-op runtime features."""

    graph: OpGraph
    config: CpuConfig | GpuConfig
    latency_ms: float
    runtime: np.ndarray | None = None
    group: str = ""  # family or variant, for reporting


def train(items: Sequence[TrainItem], *, device: str | None = None, hidden: int = 64, layers: int = 3,
          steps: int = 3000, batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 1e-4,
          runtime_dropout: float = 0.5, op_dropout: float = 0.25, node_loss: float = NODE_LOSS,
          context_bound: float = CONTEXT_BOUND, context_classes: Sequence[str] = CONTEXT_CLASSES,
          correction_bound: float = 0.0, correction_offset: bool = False, seed: int = 0, members: int = 1,
          show_progress: bool = True) -> tuple[CostModel, list[float]]:
    """Train `members` LatencyGNNs on `items` (seeds seed, seed+1, ...: their own initialisation, batches
    and dropout masks); returns the ensemble and the loss per step (MSE of log latency, mean over members).

    Why a per-operator loss (`node_loss`): where a program's operators were profiled, each node's own
    predicted time plus the profiler's own per-operator cost (learned: `LatencyGNN.probe_log_ms`) is
    also fitted to its measured time (log ms above `NODE_FLOOR_MS`). End-to-end latencies only say how
    the node times add up; operator times say which operator costs what, and an unseen family is a new
    mix of known operators (nn-Meter's kernel-level insight). Measured on the benchmark's splits (one
    seed): 0.2 took held-out configs from 5.0% to 4.2% MAPE and held-out families from 13.9% to 12.1%
    (10.2% with the profiler term); 1.0 made MobileNetV2 worse (12-19%).

    Why an ensemble: the members disagree most where the data says least (an unseen operator mix, a
    batch size between measured ones); averaging their log predictions cancels much of that variance.

    `context_bound` > 0 (0.5 for convolutions and pools by default): each node's roofline coefficients come from a
    per-node MLP of its own features, and what message passing adds is bounded to +-context_bound in log space
    (tanh). An operator in a neighbourhood no training graph had is then predicted near what the same operator
    costs elsewhere, not moved by an extrapolating context (held-out branchy's max pools were predicted at 0.45x
    their measured time, `poolcnn`'s at 0.9-1.0x). 0.5 is the largest in-program slowdown measured for a small
    operator (about 1.5x its time alone; docs/cost_model.md, session 8). Judged on validation families over 8
    seeds (session 15) it was better by 0.8 points on average, less than twice its standard error.
    `context_classes` bounds only the operators of those classes (("conv", "pool"): the diagnosis was about pools,
    and the bound on every class cost the transformers); the others keep the unbounded head. That form was adopted
    in session 17 on 16 seeds no earlier run had used, by a rule committed before the run: -0.71 +- 0.25 points
    (t = -2.82) over both validation splits. `context_bound=0` trains the unbounded network.

    `correction_bound` > 0 bounds the graph-level MLP's correction of the summed node times to +-correction_bound
    in log space (tanh). On training families it moves predictions by a few percent; on a family no training graph
    resembles it extrapolates (held-out resblock at batch 16: node times summed to 0.84 of the measured operator
    times, and the correction took another 18% off). Unbounded (0) by default: see docs/cost_model.md (session 19).
    `correction_offset` centres that bound on a learned log offset shared by every graph: the unbounded correction
    is about -0.15 on every family (node times overshoot by a similar factor everywhere), and only what varies
    between graphs extrapolates.
    """
    if not items:
        raise ValueError("train() needs at least one item (is the records database empty?)")
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    if correction_bound < 0:
        raise ValueError(f"correction_bound must be >= 0 (0: unbounded correction), got {correction_bound}")
    if correction_offset and not correction_bound:
        raise ValueError("correction_offset centres the correction_bound: it needs correction_bound > 0")
    if context_bound < 0:
        raise ValueError(f"context_bound must be >= 0 (0: unbounded context), got {context_bound}")
    if unknown := [c for c in context_classes if c not in OP_CLASSES]:
        raise ValueError(f"context_classes names unknown operator classes {unknown}; valid: {', '.join(OP_CLASSES)}")
    if not context_bound:  # unbounded: no class is bounded
        context_classes = ()
    kinds = sorted({it.config.device for it in items})
    if len(kinds) > 1:
        raise ValueError(f"train() fits one device kind (a checkpoint predicts one); the items mix {kinds}")
    if kinds[0] != "cpu" and device is None:
        raise ValueError(f"train() on {kinds[0]} items needs `device`: the fingerprint of the machine they were "
                         "measured on (the records' device field), not this machine's")
    blocks: dict[int, np.ndarray] = {}
    with_rt, without_rt = [], []
    node_targets: list[np.ndarray | None] = []
    for it in items:
        block = blocks.setdefault(id(it.graph), static_node_block(it.graph))
        q = make_query(it.graph, it.config, None, block)
        without_rt.append(q)
        with_rt.append(make_query(it.graph, it.config, it.runtime, block) if it.runtime is not None else q)
        column = runtime_column(it.config)  # per-op times were measured at 1 and 2 threads (GPU: 2 SM shares)
        node_targets.append(None if it.runtime is None or column is None
                            else _node_targets(it.graph, it.runtime[:, column]))
    targets = np.log(np.asarray([it.latency_ms for it in items], dtype=np.float32))
    seen = np.any([q.x[:, VOCAB_COLUMNS].any(axis=0) for q in without_rt], axis=0)
    flushed = {bool(getattr(it.config, "flush_denormal", False)) for it in items}
    if len(flushed) > 1:
        raise ValueError("train() fits one measurement protocol; the items mix latencies measured with and without "
                         "subnormals flushed (load_samples(..., flush_denormal=...) reads one)")
    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "feature_schema": FEATURE_SCHEMA,
            "node_dim": NODE_DIM, "graph_dim": GRAPH_DIM, "hidden": hidden, "layers": layers,
            **({"context_bound": context_bound} if context_bound else {}),
            **({"context_classes": list(context_classes)} if context_classes else {}),
            **({"correction_bound": correction_bound} if correction_bound else {}),
            **({"correction_offset": True} if correction_offset else {}),
            "device_kind": kinds[0], "device_fingerprint": device or device_fingerprint("cpu"), "target": "log-ms",
            "seen_ops": [name for name, hit in zip(VOCAB_NAMES, seen) if hit], "flush_denormal": flushed.pop(),
            "trained": {"samples": len(items), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                        "members": members, "node_loss": node_loss, "groups": sorted({it.group for it in items}),
                        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("training cost model {task.fields[member]}  loss {task.fields[loss]:.4f}"), BarColumn(),
               MofNCompleteColumn(), TimeRemainingColumn())
    trained: list[LatencyGNN] = []
    member_losses: list[list[float]] = []
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("train", total=steps * members, loss=float("nan"), member="")
        for k in range(members):
            def report(i: int, loss: float, k: int = k) -> None:
                if i % 25 == 0 or i == steps - 1:
                    progress.update(task, completed=k * steps + i + 1, loss=loss,
                                    member=f"{k + 1}/{members}" if members > 1 else "")

            model, losses = _train_member(meta, with_rt, without_rt, targets, node_targets, seed + k, steps=steps,
                                          batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                          runtime_dropout=runtime_dropout, op_dropout=op_dropout,
                                          node_loss=node_loss, on_step=report)
            trained.append(model)
            member_losses.append(losses)
    losses = [float(v) for v in np.mean(np.asarray(member_losses), axis=0)]
    return CostModel(tuple(trained), meta), losses


def _node_targets(graph: OpGraph, op_ms: np.ndarray) -> np.ndarray:
    """Log ms each operator was measured at (above the floor); NaN for the graph's inputs, which the
    per-operator profiler does not time. Fitting them as zero-time operators would pull the profiler's
    per-operator cost (`probe_log_ms`) towards zero, leaving its real cost inside the node times."""
    logged = np.log(np.maximum(op_ms, 0.0) + NODE_FLOOR_MS)
    return np.where(np.asarray(graph.ops) == "input", np.nan, logged)


def _train_member(meta: dict[str, Any], with_rt: list[Query], without_rt: list[Query], targets: np.ndarray,
                  node_targets: list[np.ndarray | None], seed: int, *, steps: int, batch_size: int, lr: float,
                  weight_decay: float, runtime_dropout: float, op_dropout: float, node_loss: float,
                  on_step: Callable[[int, float], None]) -> tuple[LatencyGNN, list[float]]:
    """One member: AdamW with warm-up and cosine decay on random batches; the model and its loss per step."""
    rng = np.random.default_rng(seed)
    model = _new_model(meta, seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10 + 1), steps, lr * 0.02)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                                 optax.adamw(schedule, weight_decay=weight_decay)), wrt=nnx.Param)

    @nnx.jit(static_argnums=(3,))
    def step(model: LatencyGNN, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], g: int,
             y: jax.Array, w: jax.Array, y_node: jax.Array, w_node: jax.Array) -> jax.Array:
        def loss_fn(m: LatencyGNN) -> jax.Array:
            pred, _, z = m.with_nodes(batch, g)
            probed = jnp.logaddexp(jnp.logaddexp(z, m.probe_log_ms[...]), jnp.log(NODE_FLOOR_MS))
            node = jnp.where(w_node > 0, (probed - y_node) ** 2, 0.0)
            return (jnp.sum(w * (pred - y) ** 2) / jnp.sum(w)
                    + node_loss * jnp.sum(node) / jnp.maximum(jnp.sum(w_node), 1.0))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    n = len(targets)
    bs = min(batch_size, n)
    losses: list[float] = []
    for i in range(steps):
        idx = rng.choice(n, size=bs, replace=n < bs)
        queries = [with_rt[j] if rng.random() >= runtime_dropout else without_rt[j] for j in idx]
        if op_dropout > 0:
            queries = [_hide_op_names(q, rng.random(q.x.shape[0]) < op_dropout) for q in queries]
        batch, g = pack(queries, bs)
        y = np.zeros(g, np.float32)
        y[:bs] = targets[idx]
        w = np.zeros(g, np.float32)
        w[:bs] = 1.0
        y_node = np.zeros(len(batch["mask"]), np.float32)
        w_node = np.zeros(len(batch["mask"]), np.float32)
        n0 = 0
        for j, q in zip(idx, queries):
            k = q.x.shape[0]
            if node_loss > 0 and node_targets[j] is not None:
                timed = np.isfinite(node_targets[j])
                y_node[n0:n0 + k] = np.where(timed, node_targets[j], 0.0)
                w_node[n0:n0 + k] = timed
            n0 += k
        loss = float(step(model, optimizer, {k: jnp.asarray(v) for k, v in batch.items()}, g, jnp.asarray(y),
                          jnp.asarray(w), jnp.asarray(y_node), jnp.asarray(w_node)))
        losses.append(loss)
        on_step(i, loss)
    return model, losses
