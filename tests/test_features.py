"""Cost-model features: deterministic, over the real dataflow edges, batch scaling, stored form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import morphc
from morphc.predictors.features import (
    GRAPH_DIM,
    NODE_DIM,
    OpGraph,
    extract,
    graph_features,
    node_features,
    runtime_matrix,
)
from morphc.predictors.spaces import CpuConfig


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = h + self.conv2(h)
        return self.fc(h.mean(dim=(2, 3)))


def _program(batch: int = 2, seed: int = 0) -> morphc.Program:
    torch.manual_seed(seed)
    return morphc.lower(Residual().eval(), torch.randn(batch, 3, 8, 8))


def test_extraction_is_deterministic_and_ignores_weight_values() -> None:
    a, b = extract(_program(seed=0)), extract(_program(seed=1))
    assert a.ops == b.ops and a.names == b.names
    np.testing.assert_array_equal(a.numeric, b.numeric)
    np.testing.assert_array_equal(a.edges, b.edges)
    cfg = CpuConfig(threads=2)
    np.testing.assert_array_equal(node_features(a, cfg), node_features(extract(_program(seed=0)), cfg))
    assert node_features(a, cfg).shape == (a.num_nodes, NODE_DIM)
    assert graph_features(a, cfg).shape == (GRAPH_DIM,)


def test_edges_are_the_dataflow_edges() -> None:
    program = _program()
    graph = extract(program)
    kept = {n.name: i for i, n in enumerate(x for x in program.graph.nodes if x.op in ("placeholder",
                                                                                       "call_function"))}
    expected = sorted((kept[src.name], kept[n.name]) for n in program.graph.nodes if n.name in kept
                      for src in n.all_input_nodes if src.name in kept)
    assert sorted(map(tuple, graph.edges.tolist())) == expected
    add = graph.ops.index("add")
    assert (graph.edges[:, 1] == add).sum() == 2  # the residual add joins two branches
    relu = graph.ops.index("relu")
    assert (graph.edges[:, 0] == relu).sum() == 2  # relu fans out to conv2 and the add


def test_conv_attributes_and_param_bytes() -> None:
    graph = extract(_program())
    convs = [i for i, op in enumerate(graph.ops) if op == "conv2d"]
    kernel, stride, groups = graph.numeric[convs[1], 5:8]
    assert (kernel, stride, groups) == (9.0, 1.0, 8.0)
    assert graph.numeric[convs[0], 2] == (8 * 3 * 9 + 8) * 4  # weight + bias bytes
    assert graph.numeric[convs[0], 0] > 0  # FLOPs


def test_pooling_counts_one_operation_per_window_element() -> None:
    """FlopCounterMode leaves pools at 0 FLOPs; a 3x3 stride-1 pool does 9 operations per output,
    four times the outputs of the same pool with stride 2."""
    x = torch.randn(1, 4, 16, 16)
    work = {}
    for stride in (1, 2):
        graph = extract(morphc.lower(nn.MaxPool2d(3, stride, 1).eval(), x))
        i = graph.ops.index("max_pool2d")
        assert graph.numeric[i, 0] == 0  # not counted by the FLOP counter
        work[stride] = graph.work_flops[i]
    assert work[1] == 9 * 4 * 16 * 16
    assert work[2] == 9 * 4 * 8 * 8
    plain = extract(_program())
    np.testing.assert_array_equal(plain.work_flops, plain.numeric[:, 0])  # other operators: their FLOPs


def test_a_pool_window_is_clipped_to_its_padded_input() -> None:
    """EfficientNet's head pools a 4x4 map with a 1280-wide kernel (ceil_mode): each output reads the 16
    input elements, not 1280 squared; the stride is kept beside the window."""
    def window_and_stride(pool: nn.Module, size: int) -> tuple[float, float]:
        graph = extract(morphc.lower(pool.eval(), torch.randn(1, 4, size, size)))
        i = next(k for k, op in enumerate(graph.ops) if op.endswith("pool2d"))
        return graph.numeric[i, 5], graph.numeric[i, 6]

    assert window_and_stride(nn.AvgPool2d(1280, ceil_mode=True), 4) == (16, 1280)
    assert window_and_stride(nn.MaxPool2d(3, 1, 1), 8) == (9, 1)
    assert window_and_stride(nn.MaxPool2d(2), 8) == (4, 2)


def test_batch_scaling_matches_a_program_lowered_at_that_batch() -> None:
    small, big = extract(_program(batch=2)), extract(_program(batch=8))
    scaled = node_features(small, CpuConfig(threads=1, batch=8))
    exact = node_features(big, CpuConfig(threads=1, batch=8))
    numeric = slice(NODE_DIM - 16, NODE_DIM - 7)  # FLOPs, bytes, params, numel, rank, attrs, intensity
    np.testing.assert_allclose(scaled[:, numeric], exact[:, numeric], atol=0.02)
    assert graph_features(small, CpuConfig(batch=8))[0] == pytest.approx(graph_features(big, CpuConfig())[0],
                                                                          abs=0.01)


def test_stored_form_round_trips_and_corruption_is_refused() -> None:
    graph = extract(_program())
    again = OpGraph.from_json(graph.to_json())
    assert again.ops == graph.ops and again.batch == graph.batch
    np.testing.assert_array_equal(again.numeric, graph.numeric)
    with pytest.raises(ValueError, match="stored op graph is corrupt"):
        OpGraph.from_json({"opgraph": "bm90IHpsaWI="})


def test_runtime_features_are_optional_and_checked() -> None:
    graph = extract(_program())
    cfg = CpuConfig()
    plain = node_features(graph, cfg)
    per_thread = {t: {name: 0.01 * t for name in graph.names} for t in (1, 2)}
    runtime = runtime_matrix(graph, per_thread)
    assert runtime is not None and runtime.shape == (graph.num_nodes, 2)
    with_rt = node_features(graph, cfg, runtime)
    assert (plain != with_rt).any(axis=0).sum() == 3  # two latency columns and the present flag
    assert runtime_matrix(graph, {1: per_thread[1]}) is None
    with pytest.raises(ValueError, match="runtime features must be"):
        node_features(graph, cfg, np.zeros((3, 2)))
