"""Hypothesis strategies: random valid multi-task models and random pass pipelines.

Models are drawn as *specs* (frozen dataclasses of plain values) and built by `SpecNet`, a real
`nn.Module` that interprets a spec, so Hypothesis shrinks a failing case to a small spec. A spec
is a DAG: every op reads any earlier value; when shapes differ an adapter (pooling, 1x1 conv,
linear, reshape) makes them compatible. Several task models read the same input; tasks may start
with a `copy.deepcopy` of one shared prefix (or be a deep copy of an earlier task) so `cse` has
work, and ops such as a weight transposed twice, a buffer scaled by a constant or a
`torch.arange` position range give `fold-constants` work. A copied task or a task over the
shared prefix may be `perturb`ed (its weights get noise): same architecture, other weights, which
is what `batch-ops` batches. Some activations and additions run in
place, so passes that reorder or merge values must respect mutation.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import morphc
from morphc.passes.base import Pass

# --- model specs --------------------------------------------------------------------------------

Shape = tuple[int, ...]  # (B, C, H, W) image-like or (B, F) feature-like

ACTIVATIONS = ("relu", "gelu", "sigmoid", "tanh", "relu_")  # relu_ runs in place
UNARY = ("conv", "conv_bn", "linear", "batchnorm", "layernorm", "act", "pool", "flatten", "reshape",
         "twice_transposed", "scaled_buffer", "arange", "position_embedding")
BINARY = ("add", "mul", "concat", "iadd")  # iadd: `a += b`, in place
OP_KINDS = UNARY + BINARY


@dataclass(frozen=True)
class OpSpec:
    """One node of a body: `kind` applied to value `src` (and `other` for binary ops).

    `width` is an output channel/feature count where the op has one, `variant` picks among an
    op's forms (activation function, kernel/stride, pooling kind, ...).
    """

    kind: str
    src: int
    other: int = 0
    width: int = 4
    variant: int = 0


@dataclass(frozen=True)
class BodySpec:
    """A DAG of ops over the values [input, prefix output?]; the body returns its last value."""

    ops: tuple[OpSpec, ...]
    seed: int


@dataclass(frozen=True)
class TaskSpec:
    name: str
    body: BodySpec
    use_prefix: bool = False  # start with a deep copy of the shared prefix
    copy_of: int | None = None  # a deep copy of an earlier task (identical model)
    outputs: int = 1  # 1: a tensor; 2: a dict {"logits", "features"}
    head_width: int = 3
    perturb: bool = False  # add noise to every weight: same architecture, other weights (batch-ops has work)


@dataclass(frozen=True)
class MultiTaskSpec:
    batch: int
    channels: int
    size: int
    prefix: BodySpec | None
    tasks: tuple[TaskSpec, ...]
    input_seed: int = 0

    @property
    def input_shape(self) -> Shape:
        return (self.batch, self.channels, self.size, self.size)


# --- adapters: make any value fit a wanted shape -----------------------------------------------


class Adapter(nn.Module):
    """Maps a tensor of shape `src` to shape `dst` with real layers (pooling, 1x1 conv, linear)."""

    def __init__(self, src: Shape, dst: Shape) -> None:
        super().__init__()
        self.src, self.dst = src, dst
        layers: list[nn.Module] = []
        if len(src) == 4 and len(dst) == 4:
            if src[2:] != dst[2:]:
                layers.append(nn.AdaptiveAvgPool2d(dst[2:]))
            if src[1] != dst[1]:
                layers.append(nn.Conv2d(src[1], dst[1], 1))
        elif len(src) == 2 and len(dst) == 2:
            if src[1] != dst[1]:
                layers.append(nn.Linear(src[1], dst[1]))
        elif len(src) == 4 and len(dst) == 2:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            if src[1] != dst[1]:
                layers.append(nn.Linear(src[1], dst[1]))
        else:  # 2 -> 4
            layers += [nn.Linear(src[1], dst[1] * dst[2] * dst[3]), nn.Unflatten(1, dst[1:])]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# --- the interpreter module ----------------------------------------------------------------------


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _randomize_norm(m: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so folding/merging them matters."""
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.copy_(torch.randn_like(mod.running_mean) * 0.5)
                mod.running_var.copy_(torch.rand_like(mod.running_var) * 1.5 + 0.5)
                mod.weight.copy_(torch.randn_like(mod.weight) * 0.5 + 1.0)
                mod.bias.copy_(torch.randn_like(mod.bias) * 0.2)
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(torch.randn_like(mod.weight) * 0.5 + 1.0)
                mod.bias.copy_(torch.randn_like(mod.bias) * 0.2)


class SpecNet(nn.Module):
    """A body: interprets a BodySpec over input values of known shapes.

    `forward(*values)` returns the last value. Values produced by views of an input (flatten,
    reshape) are never updated in place, so the model never mutates its own inputs.
    """

    def __init__(self, spec: BodySpec, in_shapes: tuple[Shape, ...]) -> None:
        super().__init__()
        self.spec = spec
        self.n_inputs = len(in_shapes)
        shapes: list[Shape] = list(in_shapes)
        fresh: list[bool] = [False] * len(in_shapes)  # may be updated in place
        self.layers = nn.ModuleList()
        self.plan: list[tuple[str, int, int, int]] = []  # (kind, src, other, variant) per op
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            for op in spec.ops:
                src = min(op.src, len(shapes) - 1)
                other = min(op.other, len(shapes) - 1)
                layer, shape, is_fresh, kind, variant = self._build(op, src, other, shapes, fresh)
                self.layers.append(layer)
                self.plan.append((kind, src, other, variant))
                shapes.append(shape)
                fresh.append(is_fresh)
            _randomize_norm(self)
        self.out_shape = shapes[-1]

    @staticmethod
    def _build(op: OpSpec, src: int, other: int, shapes: list[Shape],
               fresh: list[bool]) -> tuple[nn.Module, Shape, bool, str, int]:
        s = shapes[src]
        kind, v, w = op.kind, op.variant, max(1, op.width)
        four = len(s) == 4
        if kind == "conv":
            if not four:
                return nn.Linear(s[1], w), (s[0], w), True, "module", 0
            k, stride = ((1, 1), (3, 1), (3, 2), (1, 2))[v % 4]
            groups = 2 if (v % 5 == 4 and s[1] % 2 == 0 and w % 2 == 0) else 1
            conv = nn.Conv2d(s[1], w, k, stride=stride, padding=k // 2, groups=groups, bias=v % 3 != 0)
            h = (s[2] + 2 * (k // 2) - k) // stride + 1
            ww = (s[3] + 2 * (k // 2) - k) // stride + 1
            return conv, (s[0], w, h, ww), True, "module", 0
        if kind == "conv_bn":  # conv (or linear) -> batch norm [-> relu, in place or not]: what fold-batchnorm wants
            if four:
                k, stride = ((1, 1), (3, 1), (3, 2))[v % 3]
                layers: list[nn.Module] = [nn.Conv2d(s[1], w, k, stride=stride, padding=k // 2, bias=v % 2 == 0),
                                           nn.BatchNorm2d(w)]
                out: Shape = (s[0], w, (s[2] - 1) // stride + 1, (s[3] - 1) // stride + 1)
            else:
                layers = [nn.Linear(s[1], w), nn.BatchNorm1d(w)]
                out = (s[0], w)
            if v % 4 != 3:
                layers.append(nn.ReLU(inplace=v % 4 == 1))
            return nn.Sequential(*layers), out, True, "module", 0
        if kind == "linear":  # on the last dimension, also for 4-d values
            return nn.Linear(s[-1], w, bias=v % 2 == 0), (*s[:-1], w), True, "module", 0
        if kind == "batchnorm":
            bn = nn.BatchNorm2d(s[1]) if four else nn.BatchNorm1d(s[1])
            return bn, s, True, "module", 0
        if kind == "layernorm":
            return nn.LayerNorm(s[-1]), s, True, "module", 0
        if kind == "act":
            name = ACTIVATIONS[v % len(ACTIVATIONS)]
            if name == "relu_" and not fresh[src]:
                name = "relu"
            mod = {"relu": nn.ReLU(), "gelu": nn.GELU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(),
                   "relu_": nn.ReLU(inplace=True)}[name]
            # an in-place activation returns (and updates) its input: the result is that value
            return mod, s, True, "module", 0
        if kind == "pool":
            if not four:
                return nn.Identity(), s, fresh[src], "module", 0
            if v % 3 == 0 and s[2] >= 2 and s[3] >= 2:
                return nn.MaxPool2d(2), (s[0], s[1], s[2] // 2, s[3] // 2), True, "module", 0
            if v % 3 == 1 and s[2] >= 2 and s[3] >= 2:
                return nn.AvgPool2d(2), (s[0], s[1], s[2] // 2, s[3] // 2), True, "module", 0
            return nn.AdaptiveAvgPool2d(1), (s[0], s[1], 1, 1), True, "module", 0
        if kind == "flatten":
            if not four:
                return nn.Identity(), s, fresh[src], "module", 0
            return nn.Flatten(), (s[0], _numel(s[1:])), False, "module", 0
        if kind == "reshape":  # a view: (B, F) <-> (B, F, 1, 1), (B, C, H, W) -> (B, C, H*W, 1)
            new = (s[0], s[1], 1, 1) if not four else (s[0], s[1], s[2] * s[3], 1)
            return nn.Identity(), new, False, "reshape", 0
        if kind == "twice_transposed":  # a weight transposed twice: folds to the weight itself
            return TwiceTransposedLinear(s[-1], w), (*s[:-1], w), True, "module", 0
        if kind == "scaled_buffer":  # x * (buffer * 2 + 1): the factor folds
            return ScaledBuffer(s[1:]), s, True, "module", 0
        if kind == "arange":  # x + arange(n) * 0.1 over the last dim: the range folds
            return ArangeOffset(), s, True, "module", 0
        if kind == "position_embedding":  # x + emb(arange(n)).mean(-1): a lookup on constants
            return PositionEmbedding(s[-1]), s, True, "module", 0
        o = shapes[other]
        if kind in ("add", "mul"):
            return Adapter(o, s), s, True, kind, 0
        if kind == "iadd":
            if not fresh[src]:
                return Adapter(o, s), s, True, "add", 0
            return Adapter(o, s), s, True, "iadd", 0
        if kind == "concat":
            if four:
                target = (o[0], o[1], s[2], s[3]) if len(o) == 4 else (s[0], min(o[1], 8), s[2], s[3])
                return Adapter(o, target), (s[0], s[1] + target[1], s[2], s[3]), True, "concat", 0
            return Adapter(o, o if len(o) == 2 else (o[0], o[1])), (s[0], s[1] + o[1]), True, "concat", 0
        raise ValueError(f"unknown op kind {kind!r}")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        values = list(inputs)
        for layer, (kind, src, other, _) in zip(self.layers, self.plan):
            x = values[src]
            if kind == "module":
                y = layer(x)
            elif kind == "reshape":
                y = x.reshape(x.shape[0], x.shape[1], 1, 1) if x.dim() == 2 else x.reshape(
                    x.shape[0], x.shape[1], x.shape[2] * x.shape[3], 1)
            elif kind == "add":
                y = x + layer(values[other])
            elif kind == "mul":
                y = x * layer(values[other])
            elif kind == "iadd":
                x += layer(values[other])
                y = x
            else:  # concat
                y = torch.cat([x, layer(values[other])], dim=1)
            values.append(y)
        return values[-1]


class TwiceTransposedLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t().t(), self.bias)


class ScaledBuffer(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.register_buffer("scale", torch.rand(*shape) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.scale * 2.0 + 1.0)


class ArangeOffset(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[-1], dtype=x.dtype, device=x.device) * 0.1


class PositionEmbedding(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.emb(torch.arange(x.shape[-1], device=x.device)).mean(-1)


class TaskModel(nn.Module):
    """[shared prefix] -> body -> head (a tensor, or a dict of two tensors)."""

    def __init__(self, prefix: SpecNet | None, body: SpecNet, head_width: int, outputs: int, seed: int) -> None:
        super().__init__()
        self.prefix = prefix
        self.body = body
        self.outputs = outputs
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1000)
            self.to_features = Adapter(body.out_shape, (body.out_shape[0], 6))
            self.head = nn.Linear(6, head_width)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.body(x, self.prefix(x)) if self.prefix is not None else self.body(x)
        features = self.to_features(h)
        logits = self.head(features)
        if self.outputs == 1:
            return logits
        return {"logits": logits, "features": features}


def build_models(spec: MultiTaskSpec) -> dict[str, nn.Module]:
    """The task models of a spec, in eval mode; prefixes and copied tasks are deep copies."""
    prefix = SpecNet(spec.prefix, (spec.input_shape,)) if spec.prefix is not None else None
    models: dict[str, nn.Module] = {}
    for i, task in enumerate(spec.tasks):
        if task.copy_of is not None and task.copy_of < i:
            models[task.name] = copy.deepcopy(models[spec.tasks[task.copy_of].name])
            continue
        task_prefix = copy.deepcopy(prefix) if (task.use_prefix and prefix is not None) else None
        in_shapes = (spec.input_shape,) + ((prefix.out_shape,) if task_prefix is not None else ())
        body = SpecNet(task.body, in_shapes)
        models[task.name] = TaskModel(task_prefix, body, task.head_width, task.outputs, task.body.seed)
    for i, task in enumerate(spec.tasks):
        if task.perturb:  # a "fine-tuned" twin: the copy (or the shared prefix copy) gets other weights
            perturb_weights(models[task.name], seed=task.body.seed + i)
    for m in models.values():
        m.eval()
    return models


def perturb_weights(model: nn.Module, seed: int) -> None:
    """Noise on every floating parameter and buffer (variances stay positive), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.mul_(1.0 + 0.1 * noise.tanh())
            else:
                t.add_(0.1 * noise)


def make_input(spec: MultiTaskSpec, seed: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.input_seed if seed is None else seed)
    return torch.randn(*spec.input_shape, generator=g)


# --- strategies ----------------------------------------------------------------------------------


@st.composite
def op_specs(draw: st.DrawFn, n_inputs: int, max_ops: int) -> tuple[OpSpec, ...]:
    n = draw(st.integers(1, max_ops))
    ops = []
    for i in range(n):
        available = n_inputs + i
        kind = draw(st.sampled_from(OP_KINDS))
        # prefer reading the previous value (a chain) but allow any earlier one (branches)
        src = draw(st.one_of(st.just(available - 1), st.integers(0, available - 1)))
        other = draw(st.integers(0, available - 1))
        ops.append(OpSpec(kind, src, other, width=draw(st.integers(1, 8)), variant=draw(st.integers(0, 9))))
    return tuple(ops)


@st.composite
def body_specs(draw: st.DrawFn, n_inputs: int = 1, max_ops: int = 6) -> BodySpec:
    return BodySpec(draw(op_specs(n_inputs, max_ops)), seed=draw(st.integers(0, 2**16)))


TASK_NAMES = ("age", "gender", "emotion")


@st.composite
def multi_task_specs(draw: st.DrawFn, max_tasks: int = 3, max_ops: int = 6) -> MultiTaskSpec:
    """1..max_tasks task models over one image-like input (see the module docstring)."""
    n_tasks = draw(st.integers(1, max_tasks))
    prefix = draw(st.one_of(st.none(), body_specs(1, max_ops=4)))
    tasks = []
    for i in range(n_tasks):
        copy_of = draw(st.one_of(st.none(), st.integers(0, i - 1))) if i > 0 else None
        use_prefix = prefix is not None and draw(st.booleans())
        body = draw(body_specs(2 if use_prefix else 1, max_ops=max_ops))
        # perturb: a copied task (or a task over the shared prefix) becomes a twin with other weights
        perturb = (copy_of is not None or use_prefix) and draw(st.booleans())
        tasks.append(TaskSpec(TASK_NAMES[i], body, use_prefix=use_prefix, copy_of=copy_of,
                              outputs=draw(st.sampled_from((1, 1, 2))), head_width=draw(st.integers(1, 4)),
                              perturb=perturb))
    return MultiTaskSpec(
        batch=draw(st.integers(1, 2)),
        channels=draw(st.integers(1, 4)),
        size=draw(st.integers(3, 8)),
        prefix=prefix,
        tasks=tuple(tasks),
        input_seed=draw(st.integers(0, 2**16)),
    )


def reference_outputs(models: dict[str, nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The eager models' outputs under the Program's output names ("task" or "task.key")."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, model in models.items():
            # models may update intermediates in place, never their input; clone to be sure
            y = model(x.clone())
            if isinstance(y, torch.Tensor):
                out[name] = y
            else:
                out.update({f"{name}.{k}": v for k, v in y.items()})
    return out


# --- pipelines -----------------------------------------------------------------------------------

FLOAT_VALUES = st.one_of(
    st.sampled_from([0.0, 1e-6, 0.001, 0.5, 1.0, 64.0, 1e9]),
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
)


def option_values(option_type: Any, *, text: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    """Values of one option type; PassOptionError from the pass filters out invalid combinations."""
    if get_origin(option_type) is Literal:
        return st.sampled_from(get_args(option_type))
    if option_type is bool:
        return st.booleans()
    if option_type is int:
        return st.integers(min_value=0, max_value=1000)
    if option_type is float:
        return FLOAT_VALUES
    if option_type is str:
        return text if text is not None else st.text(max_size=12)
    raise TypeError(f"no strategy for option type {option_type!r}: extend tests/strategies.py")


@st.composite
def pass_instances(draw: st.DrawFn, cls: type[Pass], *, text: st.SearchStrategy[str] | None = None) -> Pass:
    """`cls` with random option values; options are left at their default about a third of the time."""
    hints = typing.get_type_hints(cls)
    for _ in range(20):
        kwargs = {}
        for f in dataclasses.fields(cls):
            has_default = f.default is not dataclasses.MISSING
            if has_default and draw(st.integers(0, 2)) == 0:
                continue
            value_text = text
            if cls.name == "compile" and f.name == "target":  # only registered targets are valid
                value_text = st.sampled_from(sorted(morphc.runtime.targets()))
            kwargs[f.name] = draw(option_values(hints[f.name], text=value_text))
        try:
            return cls(**kwargs)
        except morphc.PassOptionError:
            continue
    return cls()


# The registry as morphc (and installed plugins) define it, before any test module adds a
# test-only pass: tests/conftest.py imports this module first.
PASSES: dict[str, type[Pass]] = dict(morphc.registered_passes())


def examples(n: int) -> int:
    """A test's example count, scaled by MORPHC_TEST_SCALE (the `thorough` profile sets 10)."""
    return max(1, round(n * float(os.environ.get("MORPHC_TEST_SCALE", "1"))))


def optimization_passes() -> list[type[Pass]]:
    """Every registered non-terminal pass (what random pipelines are made of)."""
    return [cls for cls in PASSES.values() if not cls.terminal]


def semantics_preserving_passes() -> list[type[Pass]]:
    return [cls for cls in optimization_passes() if cls.preserves_semantics]


@st.composite
def pipelines(draw: st.DrawFn, *, min_size: int = 1, max_size: int = 5, semantic_only: bool = False,
              terminal: bool = False, extra: tuple[type[Pass], ...] = (),
              text: st.SearchStrategy[str] | None = None) -> morphc.Pipeline:
    """A random Pipeline of registered non-terminal passes with random valid options.

    `terminal=True` may end it with a terminal pass (e.g. `compile{...}`); `extra` adds passes
    (test-only ones registered by the caller).
    """
    classes = (semantics_preserving_passes() if semantic_only else optimization_passes()) + list(extra)
    n = draw(st.integers(min_size, max_size))
    passes = [draw(pass_instances(draw(st.sampled_from(classes)), text=text)) for _ in range(n)]
    if terminal:
        ends = [c for c in PASSES.values() if c.terminal]
        if ends and draw(st.booleans()):
            passes.append(draw(pass_instances(draw(st.sampled_from(ends)), text=text)))
    return morphc.Pipeline(passes)


# --- a fixed spec for example-based tests ---------------------------------------------------------

SMALL_SPEC = MultiTaskSpec(
    batch=2, channels=3, size=6,
    prefix=BodySpec((OpSpec("conv", 0, width=4, variant=1), OpSpec("batchnorm", 1), OpSpec("act", 2)), seed=1),
    tasks=(
        TaskSpec("age", BodySpec((OpSpec("conv", 1, width=5), OpSpec("arange", 2)), seed=2), use_prefix=True),
        TaskSpec("gender", BodySpec((OpSpec("pool", 1, variant=2), OpSpec("flatten", 2),
                                     OpSpec("twice_transposed", 3, width=5)), seed=3),
                 use_prefix=True, outputs=2),
    ),
    input_seed=0,
)
