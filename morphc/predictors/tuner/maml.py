"""The meta-model: an MLP in JAX from (config features, model embedding) to log latency, meta-trained
with MAML (optax) across profiled models so that a few gradient steps on K measurements of a new
model fit it.

Why log latency rather than the objective directly: the objective (throughput per core, with the
SLO) is an exact function of latency and the config, so predicting latency gives both the objective
and the SLO feasibility, and infeasible measurements still teach the model something. Performance is
normalized per model in log space: adaptation first sets the model's offset in closed form (the mean
residual on the support set, i.e. "how much slower is this model than the meta-model thought"),
then takes `inner_steps` SGD steps on the support set (MAML's inner loop). Meta-training
differentiates through both (second-order MAML) and adds the zero-shot loss, so the meta-initialization
also predicts unseen models before any measurement.

An ensemble of `members` networks (different initializations and task draws, trained together with
`jax.vmap`) gives the spread the ensemble-EI acquisition needs; Morphling's acquisition uses their mean.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INNER_CLIP = 5.0  # largest gradient norm of one inner-loop step
Params = list[tuple[Any, Any]]  # [(W, b)] per layer; with a leading ensemble axis when stacked


@dataclass(frozen=True)
class MetaConfig:
    """Hyper-parameters of the meta-model and of MAML meta-training."""

    hidden: tuple[int, ...] = (64, 64)
    members: int = 4
    inner_steps: int = 5
    inner_lr: float = 0.02
    outer_lr: float = 2e-3
    meta_steps: int = 1500
    meta_batch: int = 8
    max_support: int = 12
    query: int = 48
    zero_shot_weight: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class TaskData:
    """One profiled model: config features (n, d_cfg), its embedding (d_emb), log latency (n,)."""

    features: np.ndarray
    embedding: np.ndarray
    log_latency: np.ndarray


def _jax() -> tuple[Any, Any, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    return jax, jnp, optax


def _init(key: Any, sizes: Sequence[int]) -> Params:
    jax, jnp, _ = _jax()
    params = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        k = jax.random.fold_in(key, i)
        params.append((jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), jnp.zeros((b,))))
    return params


def _forward(params: Params, x: Any) -> Any:
    import jax

    for w, b in params[:-1]:
        x = jax.nn.silu(x @ w + b)
    w, b = params[-1]
    return (x @ w + b)[..., 0]


def _adapt(params: Params, xs: Any, ys: Any, mask: Any, steps: int, lr: float) -> Params:
    """Closed-form offset, then `steps` SGD steps on the masked support MSE (MAML's inner loop)."""
    jax, jnp, _ = _jax()
    n = jnp.maximum(mask.sum(), 1.0)
    offset = jnp.sum(mask * (ys - _forward(params, xs))) / n
    w, b = params[-1]
    params = [*params[:-1], (w, b + offset)]

    def loss(p: Params) -> Any:
        return jnp.sum(mask * (_forward(p, xs) - ys) ** 2) / n

    for _ in range(steps):
        grads = jax.grad(loss)(params)
        norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(grads)) + 1e-12)
        scale = jnp.minimum(1.0, INNER_CLIP / (norm + 1e-12))  # keeps the inner loop from diverging
        params = jax.tree_util.tree_map(lambda p, g, s=scale: p - lr * s * g, params, grads)
    return params


@dataclass
class MetaModel:
    """A meta-trained ensemble; `predict` is zero-shot, `adapt` returns the few-shot adapted ensemble."""

    params: Params  # leading axis: ensemble member
    config: MetaConfig
    y_mean: float
    y_std: float
    embedding_kind: str = "static"
    trained_on: tuple[str, ...] = field(default_factory=tuple)

    def _inputs(self, features: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        emb = np.broadcast_to(embedding, (features.shape[0], embedding.shape[-1]))
        return np.concatenate([features, emb], axis=1).astype(np.float32)

    def predict(self, features: np.ndarray, embedding: np.ndarray, params: Params | None = None) -> np.ndarray:
        """(members, n) predicted log latency (ms) of each config."""
        jax, jnp, _ = _jax()
        x = jnp.asarray(self._inputs(features, embedding))
        out = jax.vmap(lambda p: _forward(p, x))(params if params is not None else self.params)
        return np.asarray(out) * self.y_std + self.y_mean

    def adapt(self, features: np.ndarray, embedding: np.ndarray, log_latency: np.ndarray,
              steps: int | None = None) -> Params:
        """Ensemble parameters adapted to measured (features, log latency) pairs (steps=0: offset only)."""
        _, jnp, _ = _jax()
        if len(log_latency) == 0:
            return self.params
        k = len(log_latency)
        padded = -(-k // 16) * 16  # pad to a multiple of 16 so the jitted adaptation compiles once per bucket
        x = np.zeros((padded, features.shape[1] + embedding.shape[-1]), dtype=np.float32)
        x[:k] = self._inputs(features, embedding)
        y = np.zeros(padded, dtype=np.float32)
        y[:k] = (np.asarray(log_latency) - self.y_mean) / self.y_std
        mask = np.zeros(padded, dtype=np.float32)
        mask[:k] = 1.0
        steps = self.config.inner_steps if steps is None else steps
        return _adapt_jit(steps, self.config.inner_lr)(self.params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))

    # --- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"l{i}_{n}": np.asarray(a) for i, layer in enumerate(self.params) for n, a in zip("wb", layer)}
        header = {"config": self.config.__dict__, "y_mean": self.y_mean, "y_std": self.y_std,
                  "embedding_kind": self.embedding_kind, "trained_on": list(self.trained_on),
                  "layers": len(self.params)}
        np.savez(path, header=np.array(json.dumps(header)), **arrays)
        return path

    @staticmethod
    def load(path: str | Path) -> MetaModel:
        _, jnp, _ = _jax()
        data = np.load(path)
        header = json.loads(str(data["header"]))
        cfg = header["config"]
        config = MetaConfig(**{**cfg, "hidden": tuple(cfg["hidden"])})
        params = [(jnp.asarray(data[f"l{i}_w"]), jnp.asarray(data[f"l{i}_b"])) for i in range(header["layers"])]
        return MetaModel(params, config, header["y_mean"], header["y_std"], header["embedding_kind"],
                         tuple(header["trained_on"]))


_ADAPT_CACHE: dict[tuple[int, float], Any] = {}


def _adapt_jit(steps: int, lr: float) -> Any:
    jax, _, _ = _jax()
    if (steps, lr) not in _ADAPT_CACHE:
        _ADAPT_CACHE[(steps, lr)] = jax.jit(jax.vmap(lambda p, x, y, m: _adapt(p, x, y, m, steps, lr),
                                                     in_axes=(0, None, None, None)))
    return _ADAPT_CACHE[(steps, lr)]


def meta_train(tasks: Sequence[TaskData], config: MetaConfig | None = None, *, names: Sequence[str] = (),
               embedding_kind: str = "static") -> MetaModel:
    """MAML over `tasks` (one per profiled model): sample tasks, K support configs (0..max_support),
    adapt, and minimize the query loss after adaptation plus the zero-shot query loss."""
    jax, jnp, optax = _jax()
    config = config or MetaConfig()
    if not tasks:
        raise ValueError("meta_train needs at least one profiled model (ground-truth table)")
    n_configs = {t.features.shape[0] for t in tasks}
    if len(n_configs) != 1:
        raise ValueError(f"every task must cover the same configs; got sizes {sorted(n_configs)}")
    n = n_configs.pop()
    ys = np.stack([t.log_latency for t in tasks])
    y_mean, y_std = float(ys.mean()), float(ys.std() + 1e-6)
    X = jnp.asarray(np.stack([np.concatenate([t.features, np.broadcast_to(t.embedding, (n, t.embedding.shape[-1]))],
                                             axis=1) for t in tasks]).astype(np.float32))
    Y = jnp.asarray(((ys - y_mean) / y_std).astype(np.float32))
    n_tasks = len(tasks)
    sizes = (X.shape[-1], *config.hidden, 1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(config.outer_lr))
    steps, lr, K, Q = config.inner_steps, config.inner_lr, config.max_support, config.query

    def task_loss(params: Params, key: Any) -> Any:
        k1, k2, k3 = jax.random.split(key, 3)
        t = jax.random.randint(k1, (), 0, n_tasks)
        order = jax.random.permutation(k2, n)
        support, query = order[:K], order[K:K + Q]
        k_used = jax.random.randint(k3, (), 0, K + 1)
        mask = (jnp.arange(K) < k_used).astype(jnp.float32)
        adapted = _adapt(params, X[t, support], Y[t, support], mask, steps, lr)
        after = jnp.mean((_forward(adapted, X[t, query]) - Y[t, query]) ** 2)
        before = jnp.mean((_forward(params, X[t, query]) - Y[t, query]) ** 2)
        return after + config.zero_shot_weight * before

    def batch_loss(params: Params, key: Any) -> Any:
        return jnp.mean(jax.vmap(lambda k: task_loss(params, k))(jax.random.split(key, config.meta_batch)))

    def step(params: Params, opt_state: Any, key: Any) -> tuple[Params, Any, Any]:
        loss, grads = jax.value_and_grad(batch_loss)(params, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    root = jax.random.PRNGKey(config.seed)
    member_keys = jax.random.split(root, config.members)
    params = jax.vmap(lambda k: _init(k, sizes))(member_keys)
    opt_state = jax.vmap(tx.init)(params)
    vstep = jax.jit(jax.vmap(step))

    for i in range(config.meta_steps):
        keys = jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(member_keys)
        params, opt_state, loss = vstep(params, opt_state, keys)
    if not np.isfinite(np.asarray(loss)).all():
        raise FloatingPointError(f"meta-training diverged (loss {np.asarray(loss)}); lower inner_lr or outer_lr")
    return MetaModel(list(params), config, y_mean, y_std, embedding_kind, tuple(names))
