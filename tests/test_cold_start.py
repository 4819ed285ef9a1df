"""Cold-start executor: the weights file, a cold state that is truly cold, outputs equal to eager for
every strategy, a real timeline, direct access reading only touched pages, the layer profile in the
records database, and the GPU tier up to the edge this machine allows (no GPU here)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import safetensors
import torch
from torch import nn

import morphc
from morphc import zoo
from morphc.ir.load_plan import LoadPlan, group_layers
from morphc.passes import PassContext
from morphc.predictors import layer_profile
from morphc.predictors.records import RecordsDB
from morphc.runtime import cold_start, memory_tiers, weights_file
from morphc.runtime.cold_start import ColdStartExecutor, read_bytes
from morphc.runtime.memory_tiers import (
    CUDA_HOST_REGISTER_MAPPED,
    CUDA_HOST_REGISTER_PORTABLE,
    cuda_array_interface,
    direct_device_view,
    register_mapped,
)
from morphc.runtime.weights_file import ALIGN, LAYER_ALIGN, ColdStartError, WeightsFile, write_weights

STRATEGIES = ["plan", "pipeline", "on-demand", "direct"]


def _schedule(program: morphc.Program, strategy: str = "plan", **ctx) -> morphc.Program:
    return morphc.Pipeline.parse(f"insert-load-schedule{{strategy={strategy}}}").run(
        program, PassContext(verify_each=True, reproducer_dir=None, **ctx))


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[morphc.Program, WeightsFile]:
    """4 MB of weights in 4 layers: large enough that the page cache state is unambiguous."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    program = morphc.lower(model, torch.randn(2, 512))
    return program, write_weights(program, tmp_path_factory.mktemp("w") / "mlp.safetensors")


class Lookup(nn.Module):
    """A 16 MB embedding table of which a lookup of 4 ids touches a few pages, then a small head."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(16384, 256)
        self.head = nn.Linear(256, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids).sum(1))


def test_weights_file_is_valid_safetensors_in_load_order(mlp) -> None:
    program, weights = mlp
    with safetensors.safe_open(str(weights.path), framework="pt") as f:
        for attr in program.parameters():
            assert torch.equal(f.get_tensor(attr), program.tensor(attr))
    layers = group_layers(program)
    assert [r.name for r in weights.layers] == [layer.name for layer in layers]
    assert all(a.end <= b.start for a, b in zip(weights.layers, weights.layers[1:], strict=False))
    assert all(e.start % ALIGN == 0 for e in weights.tensors.values())
    assert all(r.start % LAYER_ALIGN == 0 for r in weights.layers)  # O_DIRECT reads one layer, no neighbour
    assert sum(r.end - r.start for r in weights.layers) >= layers.nbytes


def test_cold_state_is_truly_cold(mlp) -> None:
    """Evicting empties the page cache for the file; a cold run then reads the weights from storage,
    a warm run right after does not (so the check can tell the two apart)."""
    program, weights = mlp
    # through the page cache, whose state this checks (cold loads with O_DIRECT never fill it: below)
    exe = ColdStartExecutor(_schedule(program, "pipeline"), weights, direct_io=False)
    x = program.example_inputs[0]
    exe.run(x, cold=False)
    assert weights.resident_fraction() > 0.99
    weights.evict()
    assert weights.resident_fraction() == 0.0
    _, cold = exe.run(x, cold=True)
    assert weights.resident_fraction() > 0.9  # the run brought the layers in
    _, warm = exe.run(x, cold=False)
    if cold.read_bytes is None:
        pytest.skip("/proc/self/io is not available: residency (mincore) was checked above")
    nbytes = group_layers(program).nbytes
    assert cold.read_bytes >= 0.9 * nbytes, f"a cold run read {cold.read_bytes} of {nbytes} bytes"
    assert warm.read_bytes < 0.1 * nbytes


def test_loads_bypass_the_page_cache_where_the_file_system_allows(mlp) -> None:
    """With O_DIRECT the disk writes into the arena itself: the same outputs as reads through the page
    cache, no page of the file left cached by the loads, and every load done that way. Where the file
    system refuses O_DIRECT (tmpfs), every load falls back to the page cache, with the same outputs."""
    program, weights = mlp
    x = program.example_inputs[0]
    scheduled = _schedule(program, "pipeline")
    buffered = ColdStartExecutor(scheduled, weights, direct_io=False)
    expected, _ = buffered.run(x)
    assert buffered.tier.direct_reads == 0 and buffered.tier.cached_reads > 0
    # every strategy reads with O_DIRECT unless told otherwise, on-demand's one bulk read included
    assert ColdStartExecutor(_schedule(program, "on-demand"), weights).tier.direct_io is True
    direct = ColdStartExecutor(scheduled, weights)
    assert direct.tier.direct_io is True
    out, timeline = direct.run(x)
    assert torch.equal(out["model"], expected["model"])
    if not weights_file.supports_o_direct(weights.path):
        assert direct.tier.direct_reads == 0
        return
    assert direct.tier.direct_reads > 0 and direct.tier.cached_reads == 0
    assert weights.resident_fraction() < 0.05  # nothing went through the page cache
    if timeline.read_bytes is not None:
        assert timeline.read_bytes >= group_layers(program).nbytes


def test_the_bulk_read_rate_is_measured_in_the_mode_asked_for(mlp, monkeypatch) -> None:
    """The planner's streaming rate comes from a bulk read in the loader's own mode (O_DIRECT and the
    page cache stream at different rates on a virtual disk); the bound's from the faster of both."""
    program, weights = mlp
    assert weights.cold_read_gbs(direct=False) > 0
    assert weights.resident_fraction() > 0.95  # read through the page cache, which keeps it
    assert weights.cold_read_gbs(direct=True) > 0
    if weights_file.supports_o_direct(weights.path):
        assert weights.resident_fraction() < 0.05  # read with O_DIRECT: nothing cached
    modes = []
    real = WeightsFile.cold_read_gbs
    monkeypatch.setattr(WeightsFile, "cold_read_gbs",
                        lambda self, *a, direct=None, **k: modes.append(direct) or real(self, *a, direct=direct, **k))
    for direct_io in (True, False):
        modes.clear()
        layer_profile.measure_layer_costs(program, weights, runs=1, direct_io=direct_io)
        assert modes and set(modes) == {direct_io}


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_the_arena_is_aligned_and_asks_for_huge_pages() -> None:
    """O_DIRECT needs the buffer aligned as the file offset is; huge pages make its requests large."""
    for phase in (0, 64, 4032):
        buf = weights_file.aligned_empty(3 << 20, phase)
        assert buf.numel() == 3 << 20 and buf.data_ptr() % weights_file.HUGE_PAGE == phase
        buf.fill_(7)  # writable, and private: nothing else sees it
        assert int(buf[-1]) == 7
        assert "hg" in _vm_flags(buf.data_ptr())  # madvise(MADV_HUGEPAGE) on its map
    with pytest.raises(ValueError, match="phase"):
        weights_file.aligned_empty(10, LAYER_ALIGN)


def test_an_o_direct_read_covers_only_padding_past_its_layer(tmp_path: Path) -> None:
    program = morphc.lower(nn.Sequential(nn.Linear(10, 3), nn.Linear(3, 2)).eval(), torch.randn(1, 10))
    weights = write_weights(program, tmp_path / "small.safetensors")
    first, second = weights.layers
    end = weights.direct_span(first.start, first.end)
    assert end is not None and end % LAYER_ALIGN == 0 and first.end <= end <= second.start
    assert weights.direct_span(first.start + ALIGN, first.end) is None  # unaligned start: page cache
    weight = weights.tensors[first.attrs[0]]
    assert weight.end < first.end  # the layer's bias follows its weight within the same block
    assert weights.direct_span(weight.start, weight.end) is None  # rounding up would overwrite the bias


def test_direct_access_reads_only_the_touched_pages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Lookup().eval()
    ids = torch.tensor([[1, 5000, 9000, 16000]])
    program = morphc.lower(model, ids)
    weights = write_weights(program, tmp_path / "lookup.safetensors")
    table = 16384 * 256 * 4
    direct = ColdStartExecutor(_schedule(program, "direct"), weights)
    # /proc/self/io counts every read of the process: a first run may also fault in code pages of
    # libraries (after the page cache was dropped, say) and read more than the table. Judge the second.
    direct.run(ids)
    out, timeline = direct.run(ids)
    assert torch.equal(out["model"], program(ids)["model"])
    loaded_fraction = weights.resident_fraction(*_range(weights, "table"))
    assert loaded_fraction < 0.25, f"direct access brought {loaded_fraction:.0%} of the table in"
    # through the page cache, so that residency shows what it read (O_DIRECT leaves no pages behind)
    _, on_demand = ColdStartExecutor(_schedule(program, "on-demand"), weights, direct_io=False).run(ids)
    cached = weights.resident_fraction(*_range(weights, "table"))
    assert cached > 0.99, f"on-demand left only {cached:.0%} of the table cached"
    if timeline.read_bytes is not None:
        assert timeline.read_bytes < 0.25 * table <= on_demand.read_bytes, \
            f"direct access read {timeline.read_bytes} B, on-demand {on_demand.read_bytes} B of a {table} B table"


def test_a_lookup_asks_for_all_its_rows_before_it_runs(tmp_path: Path, monkeypatch) -> None:
    """Sparse direct access queues the touched rows' reads together (not one fault after another)."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 5000, 9000, 16000, 5000]])
    program = morphc.lower(Lookup().eval(), ids)
    weights = write_weights(program, tmp_path / "lookup.safetensors")
    asked: list[tuple[int, int]] = []
    real = mmap.mmap.madvise

    class Spy(mmap.mmap):
        def madvise(self, option: int, start: int = 0, length: int = 0) -> None:  # type: ignore[override]
            if option == mmap.MADV_WILLNEED:
                asked.append((start, length))
            real(self, option, start, length)

    monkeypatch.setattr(memory_tiers.mmap, "mmap", Spy)
    out, _ = ColdStartExecutor(_schedule(program, "direct"), weights).run(ids)
    assert torch.equal(out["model"], program(ids)["model"])
    table = next(e for e in weights.tensors.values() if e.shape == (16384, 256))
    rows = {(s + n - table.start) // (256 * 4) - 1 for s, n in asked if table.start < s + n <= table.end}
    assert rows == {1, 5000, 9000, 16000}  # every row once, asked for before the gather


def test_a_file_written_for_the_plan_puts_direct_layers_after_the_loads(tmp_path: Path) -> None:
    """The plan's loads then read one contiguous stream; the same file still runs every other schedule
    (a group split by the layout is read as several runs) with unchanged outputs."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 5000, 9000, 16000]])
    program = morphc.lower(Lookup().eval(), ids)
    scheduled = _schedule(program, options={"layer-profile": _costs_favouring_direct(program)})
    modes = dict(zip((e[0] for e in scheduled.annotation(LoadPlan).layers), scheduled.annotation(LoadPlan).modes()))
    assert modes["table"] == "direct" and modes["head"] == "load"
    weights = write_weights(scheduled, tmp_path / "plan.safetensors")
    assert [r.name for r in weights.layers] == ["head", "table"]
    assert weights.by_name["head"].start < weights.by_name["table"].start
    assert [r.name for r in write_weights(program, tmp_path / "first-use.safetensors").layers] == ["table", "head"]
    expected = program(ids)["model"]
    for strategy in STRATEGIES:
        out, _ = ColdStartExecutor(_schedule(program, strategy), weights).run(ids)
        assert torch.equal(out["model"], expected), strategy
    out, _ = ColdStartExecutor(scheduled, weights).run(ids)
    assert torch.equal(out["model"], expected)


def test_contiguous_runs_split_only_at_real_gaps() -> None:
    r = weights_file.LayerRange
    a, b, c = r("a", 0, 100, ()), r("b", 128, 200, ()), r("c", 8192, 9000, ())
    assert [[x.name for x in run] for run in weights_file.contiguous_runs([a, b, c])] == [["a", "b"], ["c"]]
    assert [[x.name for x in run] for run in weights_file.contiguous_runs([b, a])] == [["b"], ["a"]]


def _costs_favouring_direct(program: morphc.Program):
    """A profile where the table's lookup reads little in place and its load is slow: the plan computes
    on the table where it lies and loads the head."""
    from morphc.ir.load_plan import LayerCost, LayerCosts

    layers = group_layers(program)
    costs = tuple(LayerCost(layer.name, layer.nbytes, layer.touched_bytes, layer.nbytes / 1e6, 0.1,
                            0.2 if layer.touched_bytes < layer.nbytes // 2 else 10.0) for layer in layers)
    return LayerCosts(costs, 0.0, "test", "disk", 1.0)


def _range(weights: WeightsFile, name: str) -> tuple[int, int]:
    r = weights.by_name[name]
    return r.start, r.end


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[morphc.Program, WeightsFile, tuple[torch.Tensor, ...]]:
    z = zoo.build("bert-small")
    program = morphc.lower(z.model, z.example_inputs)
    return program, write_weights(program, tmp_path_factory.mktemp("w") / "bert.safetensors"), z.example_inputs


@pytest.mark.parametrize("depth", [1, 3])
def test_streamed_chunk_reads_match_whole_group_reads(depth: int, bert) -> None:
    """The disk loads as one stream of chunk reads with several in flight: the same outputs as one whole
    read per group at a time, every chunk read (more reads than groups), and no layer computed before
    all of its chunks are in."""
    program, weights, inputs = bert
    scheduled = _schedule(program, "pipeline")
    expected, _ = ColdStartExecutor(scheduled, weights, read_depth=1).run(*inputs)
    exe = ColdStartExecutor(scheduled, weights, read_depth=depth, read_chunk=8192)
    outputs, timeline = exe.run(*inputs)
    assert all(torch.equal(outputs[k], expected[k]) for k in expected)
    groups = {g for g in scheduled.annotation(LoadPlan).groups() if g >= 0}
    reads = exe.tier.direct_reads + exe.tier.cached_reads
    if depth > 1:
        assert reads > len(groups), f"{reads} reads for {len(groups)} groups: the loads were not cut into chunks"
    for t in timeline.layers:
        if t.mode == "load":
            assert 0 <= t.load_start_ms <= t.load_end_ms <= t.compute_start_ms + 1e-6, t
    with pytest.raises(ColdStartError, match="read_depth"):
        ColdStartExecutor(scheduled, weights, read_depth=0)


def test_the_streams_workers_run_before_the_clock_starts(bert, monkeypatch) -> None:
    """A server's I/O workers are waiting when a request comes: the run's clock starts once every stream
    worker is running, so waking a pool thread is not counted against the first read."""
    import time

    program, weights, inputs = bert
    entered: list[float] = []
    restarts: list[float] = []
    work, restart = cold_start._ChunkStream.work, cold_start._Clock.restart

    def recording_work(self, k: int) -> None:
        entered.append(time.perf_counter())
        work(self, k)

    def recording_restart(self) -> None:
        restart(self)
        restarts.append(self.t0)

    monkeypatch.setattr(cold_start._ChunkStream, "work", recording_work)
    monkeypatch.setattr(cold_start._Clock, "restart", recording_restart)
    ColdStartExecutor(_schedule(program, "pipeline"), weights, read_depth=2).run(*inputs)
    assert len(entered) == 2 and max(entered) <= restarts[-1]


def test_a_stream_whose_workers_cannot_all_run_is_an_error_not_a_hang() -> None:
    from concurrent.futures import ThreadPoolExecutor

    stream = cold_start._ChunkStream(None, cold_start._Clock(), lambda g, start: None, depth=2)  # type: ignore[arg-type]
    with ThreadPoolExecutor(max_workers=1) as pool:  # room for one of its two workers
        with pytest.raises(ColdStartError, match="2 read workers were not all running after 0 s"):
            stream.start(pool, timeout_s=0.2)
        stream.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_executor_matches_eager_and_records_the_timeline(strategy: str, bert) -> None:
    program, weights, inputs = bert
    scheduled = _schedule(program, strategy)
    outputs, timeline = ColdStartExecutor(scheduled, weights).run(*inputs)
    expected = program(*inputs)
    assert all(torch.equal(outputs[k], expected[k]) for k in expected)
    plan = scheduled.annotation(LoadPlan)
    assert [t.name for t in timeline.layers] == [e[0] for e in plan.layers]
    assert [t.mode for t in timeline.layers] == list(plan.modes())
    end = 0.0
    for t in timeline.layers:
        assert t.compute_start_ms >= end - 1e-6 and t.compute_end_ms >= t.compute_start_ms
        end = t.compute_end_ms
        if t.mode == "load":
            assert 0 <= t.load_start_ms <= t.load_end_ms <= t.compute_start_ms + 1e-6
        else:
            assert t.load_start_ms == -1.0
    if strategy == "on-demand":
        last_load = max(t.load_end_ms for t in timeline.layers)
        assert all(t.compute_start_ms >= last_load for t in timeline.layers)
    assert timeline.total_ms >= end and timeline.cold


def test_executor_errors_name_the_problem(mlp, tmp_path: Path) -> None:
    program, weights = mlp
    with pytest.raises(ColdStartError, match="no load plan"):
        ColdStartExecutor(program, weights)
    scheduled = _schedule(program)
    with pytest.raises(ColdStartError, match="CUDA"):
        if torch.cuda.is_available():
            pytest.skip("this check is for machines without a GPU")
        ColdStartExecutor(scheduled, weights, device="cuda")
    with pytest.raises(ColdStartError, match="unknown device"):
        ColdStartExecutor(scheduled, weights, device="tpu")
    with pytest.raises(ColdStartError, match="no weights file"):
        ColdStartExecutor(scheduled, tmp_path / "missing.safetensors")
    other = morphc.lower(nn.Linear(3, 3).eval(), torch.randn(1, 3))
    other_weights = write_weights(other, tmp_path / "other.safetensors")
    with pytest.raises(ColdStartError, match="lacks"):
        ColdStartExecutor(scheduled, other_weights)
    (tmp_path / "bad.safetensors").write_bytes((4).to_bytes(8, "little") + b"{}  ")
    with pytest.raises(ColdStartError, match="not a morphc weights file"):
        WeightsFile(tmp_path / "bad.safetensors")
    with pytest.raises(morphc.InputMismatchError):
        ColdStartExecutor(scheduled, weights).run(torch.randn(3, 512))


def test_pinned_threads_leave_the_callers_cpus_as_they_were(mlp, monkeypatch) -> None:
    """The compute thread is pinned only for the run: after it, and after a failed start, the caller
    runs on the CPUs it had."""
    program, weights = mlp
    before = os.sched_getaffinity(0)
    first = min(before)
    exe = ColdStartExecutor(_schedule(program, "pipeline"), weights)
    monkeypatch.setattr(exe, "_cpus", lambda: ({first}, (set(before) - {first}) or {first}))
    pinned: list[set[int] | None] = []
    real = cold_start._pin_this_thread
    monkeypatch.setattr(cold_start, "_pin_this_thread", lambda cpus: (pinned.append(cpus), real(cpus))[1])
    x = program.example_inputs[0]
    out, _ = exe.run(x)
    assert torch.equal(out["model"], program(x)["model"])
    assert {first} in pinned and os.sched_getaffinity(0) == before

    def broken(cold: bool) -> None:
        raise RuntimeError("the tier could not start")

    monkeypatch.setattr(exe.tier, "begin", broken)
    with pytest.raises(RuntimeError, match="could not start"):
        exe.run(x)
    assert os.sched_getaffinity(0) == before


def test_read_bytes_counts_this_process() -> None:
    value = read_bytes()
    assert value is None or value >= 0


# --- the layer profile ----------------------------------------------------------------------------


def test_layer_profile_is_measured_stored_and_used(mlp, monkeypatch) -> None:
    program, weights = mlp
    db = RecordsDB(":memory:")
    costs = layer_profile.profile_layers(program, db, weights, runs=1)
    assert costs.source == "measured" and len(costs.layers) == len(group_layers(program))
    assert all(c.load_ms > 0 and c.compute_ms >= 0 and c.direct_ms > 0 for c in costs.layers)
    assert costs.bandwidth_gbs > 0 and costs.extra["runs"] == 1
    # every read costs something besides its bytes: measured directly, the planner's overhead is never below it
    assert costs.extra["read_latency_ms"] > 0
    assert costs.read_overhead_ms >= costs.extra["read_latency_ms"]
    assert layer_profile.stored_profile(db, program) == costs

    def fail(*args, **kwargs):
        raise AssertionError("measured again although the database has the profile")

    monkeypatch.setattr(layer_profile, "measure_layer_costs", fail)
    assert layer_profile.profile_layers(program, db, weights, runs=1) == costs
    plan = _schedule(program, records=db).annotation(LoadPlan)
    assert plan.profile == "measured"


def test_one_cold_reads_latency_is_measured(mlp) -> None:
    _, weights = mlp
    for direct in (True, False):
        ms = weights.read_latency_ms(direct=direct, samples=4)
        assert 0 < ms < 1000


# --- the GPU tier, up to the edge (no GPU here) ----------------------------------------------------


class FakeCudart:
    """Stands in for torch.cuda.cudart(): records the calls, returns a chosen CUDA error code."""

    def __init__(self, code: int = 0) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.code = code

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        self.calls.append((ptr, nbytes, flags))
        return self.code


def test_direct_host_access_wraps_registered_memory_without_copying() -> None:
    host = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    interface = cuda_array_interface(host)
    assert interface == {"shape": (3, 4), "typestr": "<f4", "data": (host.data_ptr(), False), "strides": None,
                         "version": 3}
    cudart = FakeCudart()
    seen = {}

    def as_tensor(obj, device):
        seen["interface"], seen["device"] = obj.__cuda_array_interface__, device
        assert obj.owner is host  # the host memory lives as long as the device view
        return torch.empty(0)

    direct_device_view(host, "cuda:0", cudart=cudart, as_tensor=as_tensor)
    assert cudart.calls == [(host.data_ptr(), 48, CUDA_HOST_REGISTER_MAPPED | CUDA_HOST_REGISTER_PORTABLE)]
    assert seen == {"interface": interface, "device": "cuda:0"}
    with pytest.raises(ColdStartError, match="cudaHostRegister failed with CUDA error 712"):
        register_mapped(host, FakeCudart(712))
    with pytest.raises(ColdStartError, match="contiguous"):
        cuda_array_interface(host.t())


def test_compiled_operator_runs_compute_what_the_graph_does() -> None:
    """The walk's straight runs of operators, compiled into one function each: nested arguments (lists, tuples,
    slices, keyword arguments, constants) reach every operator as the graph holds them, and the results
    equal the traced module's."""

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = torch.cat([x, y * 2.0], dim=1)
        parts = torch.split(z, [3, 5], dim=1)
        w = torch.nn.functional.pad(parts[1][:, 1:4], (1, 2), value=0.5)
        return torch.clamp(torch.stack((torch.sum(w, dim=1, keepdim=True), parts[0][:, :1]), dim=0), min=-1.0, max=3.0)

    gm = torch.fx.symbolic_trace(f)
    nodes = list(gm.graph.nodes)
    assert all(n.op in ("placeholder", "call_function", "output") for n in nodes)  # as in an exported program
    steps = [(n, 0 if n.op == "call_function" else None) for n in nodes]
    compiled = cold_start._compile_runs(steps, singles=())
    runs = [run for _, _, run in compiled if run is not None]
    assert len(runs) == 1 and len(compiled) == 4  # placeholders x, y; one run of every operator; the output
    x, y = torch.randn(2, 3), torch.randn(2, 5)
    env = {nodes[0]: x, nodes[1]: y}
    runs[0](env)
    assert torch.equal(env[nodes[-1].args[0]], gm(x, y))
    # an operator in `singles` (an embedding lookup on the disk tier) stays a step of its own, splitting the run
    lone = next(n for n in nodes if n.op == "call_function" and n.target is torch.split)
    split = cold_start._compile_runs(steps, singles={lone})
    assert [run is None for n, _, run in split if n.op == "call_function"] == [False, True, False]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_round_orders_are_balanced(n: int) -> None:
    """The layer profile and benchmarks/cold_start.py run their strategies in a Williams design: what ran
    just before a cold run changes it, so every strategy must go first, and follow every other, equally often."""
    from collections import Counter
    from itertools import pairwise

    from morphc.predictors.layer_profile import balanced_orders

    rows = balanced_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    firsts = Counter(row[0] for row in rows)
    pairs = Counter(pair for row in rows for pair in pairwise(row))
    assert set(firsts) == set(range(n)) and len(set(firsts.values())) == 1
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) == 1
