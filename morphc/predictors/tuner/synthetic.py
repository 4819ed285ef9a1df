"""Synthetic ground-truth tables: latency from a simple parametric law, for fast tests and demos.

latency = base * batch^a * thread_speedup(threads)^-1 * backend factor * option factors * noise,
with per-model parameters drawn from a seed and tied to a made-up embedding, so models share
structure (what meta-learning exploits) but differ in where the best config lies.
"""

from __future__ import annotations

import numpy as np

from morphc.predictors.tuner.groundtruth import Table
from morphc.predictors.tuner.space import TuningSpace, cpu_space


def synthetic_tables(n_models: int, *, seed: int = 0, space: TuningSpace | None = None) -> list[Table]:
    space = space or cpu_space()
    rng = np.random.default_rng(seed)
    tables = []
    for m in range(n_models):
        size = rng.uniform(0.0, 1.0)  # 0 = overhead-bound tiny model, 1 = compute-bound
        base = 0.2 * 10 ** (2 * size)
        alpha = 0.35 + 0.6 * size  # batch scaling: small models batch almost for free
        ort_gain = rng.uniform(0.3, 0.9) if size < 0.5 else rng.uniform(0.7, 1.1)
        thread_gain = 1.0 + 0.8 * size
        lat = []
        for c in space.configs:
            x = base * c.batch ** alpha / (thread_gain if c.threads == 2 else 1.0)
            if c.backend == "onnxruntime":
                x *= ort_gain * {"disable": 1.3, "basic": 1.1, "extended": 1.0, "all": 0.95}[c.optimization or "all"]
                if c.execution_mode == "parallel":
                    x *= 1.05 if c.inter_op_threads == 1 else (3.0 if c.allow_spinning and c.threads == 2 else 1.2)
                x *= 0.97 if c.allow_spinning else 1.0
            elif c.pipeline:
                x *= 0.93
            lat.append(x * rng.lognormal(0.0, 0.03))
        embedding = np.array([size, alpha, ort_gain, thread_gain, 0, 0, 0, 0, 0.25], dtype=np.float32)
        tables.append(Table(f"synthetic-{m}", f"synthetic:{seed}:{m}", f"synthetic{seed}x{m}", embedding,
                            np.array(lat), space))
    return tables
