"""`torch.compile(model, backend="morphc", options={...})`: morphc as a TorchDynamo backend.

Dynamo hands the backend a torch-level fx graph whose inputs are the user's tensors *and* the
model's parameters and buffers. The backend lowers that graph to a morphc Program with
torch.export, runs a pass pipeline on it, compiles it for a target and returns a callable with
Dynamo's calling convention (same positional inputs, same output structure as the graph).

Inference only: compiled graphs run under `torch.no_grad()`.

Options (unknown keys, wrong types, an unknown target or malformed pipeline text raise
BackendOptionError / PipelineSyntaxError: configuration mistakes are reported, never hidden):

    pipeline     pipeline text run before compiling (default DEFAULT_PIPELINE:
                 "canonicalize,fold-batchnorm,fold-constants,cse,dce"); it must not contain
                 the terminal `compile` pass: the backend adds it from `target`
    target       compile target, one of `morphc.runtime.targets()` (default "eager")
    strict       raise on any failure (default False: warn naming the failing stage and run the
                 graph as Dynamo captured it, which is always correct)
    verify_each  verify the IR after every pass (default False)
    freeze       make parameters/buffers constants of the Program so fold-constants and CSE can
                 work on weights (default True). Guarded by identity and version at each call:
                 a replaced or in-place-updated weight makes that call run the original graph
                 (with a one-time warning); `torch._dynamo.reset()` then recompiles.
    instruments  PassInstruments given to the PassContext, e.g. a PassTiming to read node counts

Failures that depend on the model (lowering, a pass, compiling, outputs differing from the
captured graph on the example inputs) fall back unless `strict`. Graphs with symbolic sizes
(dynamic shapes) fall back too: Programs have static shapes, so compile with `dynamic=False`.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from morphc.errors import MorphcError, did_you_mean
from morphc.ir.lowering import lower
from morphc.ir.program import Program
from morphc.passes.instruments import PassInstrument
from morphc.passes.manager import PassContext
from morphc.passes.pipeline import Pipeline
from morphc.runtime.compile_pass import Compile
from morphc.runtime.executable import Executable, max_abs_difference, targets

DEFAULT_PIPELINE = "canonicalize,fold-batchnorm,fold-constants,cse,dce"
ATOL, RTOL = 1e-4, 1e-4  # the check of compiled outputs against the captured graph


class BackendOptionError(MorphcError, ValueError):
    """An option given to the morphc torch.compile backend is unknown or has a bad value."""


class BackendCompileError(MorphcError):
    """With strict=True: a stage of compiling a Dynamo graph failed (the message names the stage)."""


class MorphcBackendWarning(UserWarning):
    """The morphc backend fell back to running a graph as Dynamo captured it."""


@dataclass(frozen=True)
class BackendOptions:
    """The validated `options` of `torch.compile(..., backend="morphc")`."""

    pipeline: str = DEFAULT_PIPELINE
    target: str = "eager"
    strict: bool = False
    verify_each: bool = False
    freeze: bool = True
    instruments: tuple[PassInstrument, ...] = field(default=())

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        for key in options:
            if key not in valid:
                raise BackendOptionError(f"morphc backend has no option '{key}'{did_you_mean(key, valid)}; "
                                         f"valid options: {', '.join(valid)}")
        for key in ("pipeline", "target"):
            if key in options and not isinstance(options[key], str):
                raise BackendOptionError(f"option '{key}' must be a str, got {type(options[key]).__name__}")
        for key in ("strict", "verify_each", "freeze"):
            if key in options and not isinstance(options[key], bool):
                raise BackendOptionError(f"option '{key}' must be True or False, got {options[key]!r}")
        instruments = tuple(options.pop("instruments", ()))
        for inst in instruments:
            if not isinstance(inst, PassInstrument):
                raise BackendOptionError(f"option 'instruments' takes PassInstrument objects, got "
                                         f"{type(inst).__name__}")
        opts = cls(**options, instruments=instruments)
        if opts.target not in targets():
            raise BackendOptionError(f"option 'target' must be one of {', '.join(targets())}; got "
                                     f"'{opts.target}'{did_you_mean(opts.target, targets())}")
        return opts

    def full_pipeline(self) -> Pipeline:
        """The user's pipeline plus the terminal compile pass for `target` (parse errors raise)."""
        passes = Pipeline.parse(self.pipeline).passes
        if any(p.terminal for p in passes):
            raise BackendOptionError(f"option 'pipeline' must not contain a terminal pass ({self.pipeline!r}): "
                                     "the backend compiles with options['target']")
        # verify=False: the backend checks the executable against the captured graph itself (which
        # also covers lowering), so the compile pass's own comparison with the Program is redundant.
        return Pipeline([*passes, Compile(target=self.target, verify=False)])


def morphc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
                   mode: str | None = None) -> Callable[..., Any]:
    """TorchDynamo backend: compile `gm` with a morphc pipeline, or fall back to `gm.forward`.

    Registered under the `torch_dynamo_backends` entry point as "morphc"; torch.compile passes
    its `options` dict here (and `mode` only when one other than "default" is asked for).
    """
    if mode is not None:
        raise BackendOptionError(f"the morphc backend has no compile modes (got mode={mode!r}); "
                                 "configure it with options={'pipeline': ..., 'target': ...}")
    opts = BackendOptions.from_dict(options)
    pipeline = opts.full_pipeline()
    try:
        _check_inputs(gm, example_inputs)
    except _StageError as err:
        return _fall_back(gm, err, opts)
    if any(isinstance(a, FakeTensor) for a in example_inputs):
        return _LazyCompiled(gm, pipeline, opts)  # need real tensors: compile at the first call
    return _compile_or_fall_back(gm, list(example_inputs), pipeline, opts)


class _StageError(Exception):
    def __init__(self, stage: str, cause: BaseException | str) -> None:
        self.stage = stage
        self.cause = cause
        detail = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
        super().__init__(f"morphc backend could not compile graph at stage '{stage}': {detail}")


def _fall_back(gm: fx.GraphModule, err: _StageError, opts: BackendOptions) -> Callable[..., Any]:
    if opts.strict:
        cause = err.cause if isinstance(err.cause, BaseException) else None
        raise BackendCompileError(str(err)) from cause
    warnings.warn(f"{err}; running this graph as captured (eager torch) instead. "
                  "Pass options={'strict': True} to raise.", MorphcBackendWarning, stacklevel=3)
    return gm.forward


def _check_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Reject, before running anything, what a Program cannot express: symbolic sizes (dynamic
    shapes) and graphs that update their inputs in place (e.g. a buffer counting calls)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, arg in zip(placeholders, example_inputs):
        if not isinstance(arg, torch.Tensor):
            raise _StageError("inputs", f"graph input '{node.name}' is a {type(arg).__name__}, not a tensor "
                                        "(symbolic sizes from dynamic shapes?); use torch.compile(..., dynamic=False)")
        val = node.meta.get("example_value")
        if isinstance(val, torch.Tensor) and not all(isinstance(d, int) for d in val.shape):
            raise _StageError("inputs", f"graph input '{node.name}' has symbolic shape {tuple(val.shape)}; "
                                        "use torch.compile(..., dynamic=False)")
        if getattr(val, "_version", 0):  # Dynamo traced an in-place op on this input's fake tensor
            raise _StageError("inputs", f"the graph updates input '{node.name}' in place; morphc compiles "
                                        "side-effect-free inference graphs")


def _is_model_state(node: fx.Node, arg: torch.Tensor) -> bool:
    """Is this graph input a parameter or buffer of the model (Dynamo's source says so)?"""
    if isinstance(arg, torch.nn.Parameter):
        return True
    try:
        from torch._dynamo.source import ParamBufferSource, UnspecializedParamBufferSource
    except ImportError:  # pragma: no cover - other torch versions: parameters only
        return False
    source = getattr(node.meta.get("grapharg"), "source", None)
    while source is not None:
        if isinstance(source, (ParamBufferSource, UnspecializedParamBufferSource)):
            return True
        source = getattr(source, "base", None)
    return False


def _state_name(placeholder: str, taken: set[str]) -> str:
    """`l_self_modules_fc1_parameters_weight_` -> `fc1_weight`: readable names in the IR."""
    name = re.sub(r"^l_+self_+", "", placeholder)
    name = re.sub(r"(^|_)(modules|parameters|buffers)_", r"\1", name).strip("_") or "state"
    base, k = name, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


class _FrozenGraph(torch.nn.Module):
    """The Dynamo graph as a module whose frozen inputs are buffers: what torch.export captures."""

    def __init__(self, gm: fx.GraphModule, frozen: dict[int, torch.Tensor], n_inputs: int) -> None:
        super().__init__()
        # A GraphModule is in training mode by default, which lower() refuses; its flag changes nothing
        # in the traced code, so flip it on a copy rather than on Dynamo's module. Real submodules the
        # graph calls are shared and keep their mode (lower() reports those in training mode).
        self.gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        self.gm.training = False
        self.slots: list[tuple[bool, str | int]] = []  # per graph input: (is frozen, buffer name | user index)
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        taken: set[str] = set()
        user = 0
        for i in range(n_inputs):
            if i in frozen:
                attr = _state_name(names[i], taken)
                self.register_buffer(attr, frozen[i].detach())
                self.slots.append((True, attr))
            else:
                self.slots.append((False, user))
                user += 1
        self.training = False

    def forward(self, *user: torch.Tensor) -> Any:
        args = [getattr(self, str(s)) if frozen else user[int(s)] for frozen, s in self.slots]
        return self.gm(*args)


def _compile_or_fall_back(gm: fx.GraphModule, args: list[Any], pipeline: Pipeline,
                          opts: BackendOptions) -> Callable[..., Any]:
    try:
        return _compile(gm, args, pipeline, opts)
    except _StageError as err:
        return _fall_back(gm, err, opts)


def _compile(gm: fx.GraphModule, args: list[Any], pipeline: Pipeline, opts: BackendOptions) -> _Compiled:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    frozen = {i: a for i, (n, a) in enumerate(zip(placeholders, args))
              if opts.freeze and _is_model_state(n, a)}
    user_idx = [i for i in range(len(args)) if i not in frozen]
    user_args = [args[i] for i in user_idx]
    with torch.no_grad():
        expected = gm(*args)
    flat_expected, out_spec = pytree.tree_flatten(expected)
    try:
        program: Program = lower(_FrozenGraph(gm, frozen, len(args)), tuple(user_args))
    except Exception as exc:
        raise _StageError("lower", exc) from exc
    try:
        ctx = PassContext(verify_each=opts.verify_each, instruments=list(opts.instruments))
        exe: Executable = pipeline.run(program, ctx)
    except Exception as exc:
        raise _StageError("pipeline", exc) from exc
    try:
        with torch.no_grad():
            got = exe(*user_args)
        names = [o.name for o in exe.program.outputs]
        want = dict(zip(names, flat_expected))
        if len(names) != len(flat_expected):
            raise ValueError(f"the program has {len(names)} outputs, the graph {len(flat_expected)}")
        err, where = max_abs_difference(want, got)
        scale = max((v.abs().max().item() for v in want.values() if v.numel()), default=0.0)
        if not err <= ATOL + RTOL * scale:
            raise ValueError(f"output '{where}' differs from the captured graph by {err:.3g}")
    except Exception as exc:
        raise _StageError("check", exc) from exc
    return _Compiled(gm, exe, frozen, user_idx, names, out_spec)


class _Compiled:
    """Dynamo-convention callable: guard the frozen weights, run the executable, rebuild outputs."""

    def __init__(self, gm: fx.GraphModule, exe: Executable, frozen: dict[int, torch.Tensor],
                 user_idx: list[int], names: list[str], out_spec: pytree.TreeSpec) -> None:
        self.gm = gm
        self.executable = exe
        self.frozen = [(i, t, t._version) for i, t in frozen.items()]
        self.user_idx = user_idx
        self.names = names
        self.out_spec = out_spec
        self.warned = False

    def __call__(self, *args: Any) -> Any:
        for i, t, version in self.frozen:
            if args[i] is not t or t._version != version:
                return self._stale(args, i)
        with torch.no_grad():
            out = self.executable(*(args[i] for i in self.user_idx))
        return pytree.tree_unflatten([out[n] for n in self.names], self.out_spec)

    def _stale(self, args: tuple[Any, ...], i: int) -> Any:
        if not self.warned:
            self.warned = True
            name = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"][i]
            warnings.warn(f"morphc backend: frozen weight '{name}' was replaced or modified in place since "
                          "compiling; running the captured graph instead (call torch._dynamo.reset() to "
                          "recompile with the new weights, or pass options={'freeze': False})",
                          MorphcBackendWarning, stacklevel=2)
        return self.gm(*args)


class _LazyCompiled:
    """Dynamo gave fake tensors: compile on the first call, with the real ones."""

    def __init__(self, gm: fx.GraphModule, pipeline: Pipeline, opts: BackendOptions) -> None:
        self.gm, self.pipeline, self.opts = gm, pipeline, opts
        self.impl: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.impl is None:
            self.impl = _compile_or_fall_back(self.gm, list(args), self.pipeline, self.opts)
        return self.impl(*args)
