"""The cold-start executor's GPU tier (host RAM -> GPU): outputs equal to the warm GPU program for every
strategy, a cold state that is truly cold (the device arena holds zeros until a load lands), a timeline
in which no layer computes before its load, direct host access reading the registered host memory, and
the layer profile measured on the host tier.

Needs a CUDA device: the CUDA tests skip where there is none (the developer and CI machines), and run on
the lent GPU machine (see benchmarks/README.md, "GPU tier"). `Program.to`, which the GPU tier relies
on, is tested everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import morphc
from morphc.ir.load_plan import group_layers
from morphc.passes import PassContext
from morphc.predictors import layer_profile
from morphc.runtime.cold_start import ColdStartExecutor
from morphc.runtime.memory_tiers import HostTier
from morphc.runtime.weights_file import WeightsFile, write_weights

STRATEGIES = ["plan", "pipeline", "on-demand", "direct"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU tier)")


class Lookup(nn.Module):
    """An embedding table (direct host access reads only the rows looked up), a conv stack, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(4096, 64)
        self.convs = nn.Sequential(nn.Conv1d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv1d(64, 64, 3, padding=1))
        self.head = nn.Linear(64, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.table(ids).transpose(1, 2)  # (batch, 64, seq)
        positions = torch.arange(ids.shape[1])  # a factory op: export bakes the device into it
        x = self.convs(x) + positions.to(x.dtype)
        return self.head(x.mean(-1))


@pytest.fixture(scope="module")
def lookup(tmp_path_factory) -> tuple[morphc.Program, WeightsFile]:
    torch.manual_seed(0)
    program = morphc.lower(Lookup().eval(), torch.randint(0, 4096, (2, 16)))
    return program, write_weights(program, tmp_path_factory.mktemp("w") / "lookup.safetensors")


def _schedule(program: morphc.Program, strategy: str) -> morphc.Program:
    return morphc.Pipeline.parse(f"insert-load-schedule{{strategy={strategy}}}").run(
        program, PassContext(device="cuda", reproducer_dir=None))


def test_program_to_moves_tensors_and_device_arguments_but_the_skipped(lookup) -> None:
    program, _ = lookup
    skipped = next(iter(program.parameters()))
    moved = program.to("meta", skip={skipped})
    devices = {attr: t.device.type for attr, t in moved.parameters().items()}
    assert devices.pop(skipped) == "cpu"
    assert set(devices.values()) == {"meta"}
    baked = [n.kwargs["device"] for n in moved.graph.nodes if n.op == "call_function" and "device" in n.kwargs]
    assert baked and all(d == torch.device("meta") for d in baked)
    assert all(t.device.type == "meta" for t in moved.example_inputs)
    # the original is untouched
    assert {t.device.type for t in program.parameters().values()} == {"cpu"}
    assert all(n.kwargs["device"] == torch.device("cpu") for n in program.graph.nodes
               if n.op == "call_function" and "device" in n.kwargs)


@cuda
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_computes_what_the_warm_gpu_program_does(lookup, strategy) -> None:
    program, weights = lookup
    expected = program.to("cuda")(*(t.cuda() for t in program.example_inputs))
    exe = ColdStartExecutor(_schedule(program, strategy), weights, device="cuda")
    assert isinstance(exe.tier, HostTier)
    for _ in range(2):
        out, timeline = exe.run(*program.example_inputs)
        assert {t.device.type for t in out.values()} == {"cuda"}
        for k, ref in expected.items():
            torch.testing.assert_close(out[k], ref, rtol=1e-4, atol=1e-5)
        assert timeline.tier == "host" and timeline.total_ms > 0


@cuda
def test_the_device_holds_no_weight_before_its_load(lookup) -> None:
    """Cold is truly cold: the arena the loads land in is zeroed, so outputs are right only because every
    loaded layer waited for its copy; in the timeline no loaded layer computes before its load ends."""
    program, weights = lookup
    exe = ColdStartExecutor(_schedule(program, "pipeline"), weights, device="cuda")
    tier = exe.tier
    assert isinstance(tier, HostTier)
    tier.begin(cold=True)
    assert int(torch.count_nonzero(tier._arena)) == 0
    _, timeline = exe.run(*program.example_inputs)
    loaded = [t for t in timeline.layers if t.mode == "load"]
    assert loaded and all(0 <= t.load_start_ms <= t.load_end_ms for t in loaded)
    assert all(t.compute_start_ms >= t.load_end_ms - 1e-3 for t in loaded), [
        (t.name, t.load_end_ms, t.compute_start_ms) for t in loaded]


@cuda
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_captured_cuda_graph_computes_the_same_from_the_cold_state(lookup, strategy) -> None:
    """The first inference as one CUDA graph: replayed after the device arena is zeroed, it is right only
    because the graph itself copies the weights in (and reads direct-access ones from host memory)."""
    program, weights = lookup
    expected = program.to("cuda")(*(t.cuda() for t in program.example_inputs))
    exe = ColdStartExecutor(_schedule(program, strategy), weights, device="cuda")
    exe.capture(*program.example_inputs)
    for cold, timed in ((True, False), (False, False), (True, True)):
        out, timeline = exe.replay(*program.example_inputs, cold=cold, timed=timed)
        assert timeline.total_ms > 0
        for k, ref in expected.items():
            torch.testing.assert_close(out[k], ref, rtol=1e-4, atol=1e-5)
    # the timed graph's own marks: no loaded layer computes before its copy has landed
    assert len(timeline.layers) == len(exe.layers)
    for t in timeline.layers:
        assert 0 <= t.compute_start_ms <= t.compute_end_ms <= timeline.total_ms + 1e-3
        if t.mode == "load":
            assert 0 <= t.load_start_ms <= t.load_end_ms <= t.compute_start_ms + 1e-3, t
    loaded = [layer for layer, m in zip(exe.layers, exe.plan.modes()) if m == "load"]
    if loaded:  # the resident graph copies nothing: with the arena zeroed it computes on zeros
        exe.tier.begin(cold=True)
        graph, leaves, _ = exe._graphs[False, False]
        graph.replay()
        torch.cuda.synchronize()
        assert any(not torch.allclose(leaf, expected[o.name]) for o, leaf in zip(program.outputs, leaves))


@cuda
def test_copy_streams_never_alias_a_capture_stream(lookup) -> None:
    """torch pools streams (32 per priority, round robin): after many executors a low-priority copy stream
    was the capture stream itself, and the graph ran every copy before any compute."""
    _, weights = lookup
    pooled = {torch.cuda.Stream().cuda_stream for _ in range(64)}  # the whole low-priority pool
    tiers = [HostTier(weights, "cuda") for _ in range(3)]
    assert not {s.cuda_stream for t in tiers for s in t.streams} & pooled
    for t in tiers:
        t.close()


@cuda
def test_a_warm_run_finds_the_weights_on_the_device(lookup) -> None:
    """Warm on the GPU means resident: nothing is copied, and the outputs are the same."""
    program, weights = lookup
    exe = ColdStartExecutor(_schedule(program, "pipeline"), weights, device="cuda")
    cold, _ = exe.run(*program.example_inputs, cold=True)
    warm, timeline = exe.run(*program.example_inputs, cold=False)
    assert all(t.load_start_ms == -1.0 for t in timeline.layers)
    assert all(t.dispatch_ms > 0 for t in timeline.layers if t.compute_end_ms > t.compute_start_ms)
    for k, ref in cold.items():
        torch.testing.assert_close(warm[k], ref)


@cuda
def test_direct_host_access_reads_the_registered_host_memory(lookup) -> None:
    _, weights = lookup
    tier = HostTier(weights, "cuda")
    attr = next(iter(weights.tensors))
    view = tier.view(attr)
    assert view.device.type == "cuda"
    assert view.data_ptr() == tier.host_view(attr).data_ptr()  # zero copy: the host address itself (UVA)
    torch.testing.assert_close(view.sum().cpu(), tier.host_view(attr).sum())
    tier.host_view(attr).add_(1)  # the device sees the host's writes: it reads the memory in place
    torch.cuda.synchronize()
    torch.testing.assert_close(view.sum().cpu(), tier.host_view(attr).sum())
    assert tier.copy_gbs() > 0
    tier.close()


@cuda
def test_the_layer_profile_is_measured_on_the_host_tier(lookup) -> None:
    program, weights = lookup
    costs = layer_profile.measure_layer_costs(program, weights, runs=2, device="cuda")
    assert costs.tier == "host" and costs.bandwidth_gbs > 0
    assert len(costs.layers) == len(group_layers(program))
    assert all(c.load_ms > 0 and c.compute_ms >= 0 and c.direct_ms >= c.compute_ms for c in costs.layers)
    assert sum(c.dispatch_ms for c in costs.layers) > 0  # the CPU's time queueing kernels is measured
    graphed = layer_profile.measure_layer_costs(program, weights, runs=2, device="cuda", cuda_graph=True)
    assert graphed.tier == "host" and graphed.extra["cuda_graph"] is True
    assert all(c.dispatch_ms == 0 and c.load_ms > 0 and c.direct_ms >= c.compute_ms for c in graphed.layers)
    planned = morphc.Pipeline.parse("insert-load-schedule").run(
        program, PassContext(device="cuda", reproducer_dir=None, options={"layer-profile": costs}))
    out, _ = ColdStartExecutor(planned, weights, device="cuda").run(*program.example_inputs)
    expected = program.to("cuda")(*(t.cuda() for t in program.example_inputs))
    for k, ref in expected.items():
        torch.testing.assert_close(out[k], ref, rtol=1e-4, atol=1e-5)


def test_cuda_graphs_are_refused_on_the_disk_tier(lookup) -> None:
    program, weights = lookup
    exe = ColdStartExecutor(_schedule(program, "pipeline"), weights)
    with pytest.raises(morphc.errors.MorphcError, match="device='cuda'"):
        exe.capture(*program.example_inputs)
    with pytest.raises(morphc.errors.MorphcError, match="capture"):
        exe.replay(*program.example_inputs)


def test_the_gpu_tier_says_it_needs_cuda_where_there_is_none(lookup, monkeypatch) -> None:
    program, weights = lookup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(morphc.errors.MorphcError, match="needs CUDA"):
        ColdStartExecutor(_schedule(program, "pipeline"), weights, device="cuda")
