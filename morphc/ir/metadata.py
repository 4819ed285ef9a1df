"""Per-node metadata: shapes, dtypes, FLOPs, bytes, parameter bytes, op class, source module.

Computed once by running the graph on the Program's example inputs (real tensors, so no symbolic
shapes leak in), and recomputed only when a pass reports that it changed the graph. FLOPs use
torch's own `FlopCounterMode` formulas (matmul, conv, attention; pointwise ops count 0 FLOPs and
show up in `bytes_moved` instead).
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

META_KEY = "morphc"  # node.meta[META_KEY] -> NodeMeta
MODULE_PATH_KEY = "morphc.module_path"  # set at lowering, survives metadata recomputation


class OpClass(enum.StrEnum):
    """Coarse operator families: what passes, cost models and schedules reason about."""

    INPUT = "input"
    PARAM = "param"
    OUTPUT = "output"
    CONV = "conv"
    LINEAR = "linear"
    ATTENTION = "attention"
    NORM = "norm"
    ACTIVATION = "activation"
    POOL = "pool"
    ELEMENTWISE = "elementwise"
    REDUCTION = "reduction"
    EMBEDDING = "embedding"
    SHAPE = "shape"
    CREATION = "creation"
    OTHER = "other"


_OP_CLASSES: dict[OpClass, frozenset[str]] = {
    OpClass.CONV: frozenset({"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose2d", "_convolution"}),
    OpClass.LINEAR: frozenset({"linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "einsum"}),
    OpClass.ATTENTION: frozenset({"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"}),
    OpClass.NORM: frozenset(
        {"batch_norm", "layer_norm", "group_norm", "native_layer_norm", "_native_batch_norm_legit_no_training",
         "instance_norm", "rms_norm"}
    ),
    OpClass.ACTIVATION: frozenset(
        {"relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid",
         "leaky_relu", "elu", "softmax", "_softmax", "log_softmax", "_log_softmax", "mish", "softplus", "clamp",
         "clamp_min", "clamp_max"}
    ),
    OpClass.POOL: frozenset(
        {"max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_avg_pool1d", "max_pool2d_with_indices",
         "max_pool1d", "avg_pool1d", "_adaptive_avg_pool2d"}
    ),
    OpClass.ELEMENTWISE: frozenset(
        {"add", "sub", "mul", "div", "rsub", "pow", "sqrt", "rsqrt", "exp", "log", "neg", "abs", "where", "eq",
         "ne", "lt", "le", "gt", "ge", "bitwise_not", "bitwise_and", "bitwise_or", "logical_not", "masked_fill",
         "erf", "reciprocal", "to", "_to_copy", "type_as", "float", "sin", "cos", "maximum", "minimum",
         "dropout", "lift_fresh_copy", "clone", "alias", "fill"}
    ),
    OpClass.REDUCTION: frozenset({"mean", "sum", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "var",
                                  "std", "norm", "linalg_vector_norm", "cumsum", "any", "all"}),
    OpClass.EMBEDDING: frozenset({"embedding", "index_select", "gather", "index"}),
    OpClass.SHAPE: frozenset(
        {"view", "reshape", "_unsafe_view", "permute", "transpose", "t", "flatten", "unflatten", "cat", "stack",
         "slice", "select", "expand", "expand_as", "contiguous", "unsqueeze", "squeeze", "split", "split_with_sizes",
         "chunk", "narrow", "repeat", "getitem", "flip", "roll", "pad", "constant_pad_nd", "unbind", "tile",
         "split_tensor", "view_as", "movedim", "detach", "_assert_tensor_metadata", "sym_size", "size"}
    ),
    OpClass.CREATION: frozenset({"arange", "zeros", "ones", "full", "empty", "zeros_like", "ones_like",
                                 "full_like", "scalar_tensor", "new_zeros", "new_ones", "tensor"}),
}
_CLASS_OF_NAME = {name: cls for cls, names in _OP_CLASSES.items() for name in names}


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor a node produces."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * _itemsize(self.dtype)

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class NodeMeta:
    """What morphc knows about one node after running the graph once on the example inputs."""

    outputs: tuple[TensorMeta, ...]  # one per tensor produced; empty for non-tensor results
    flops: int
    bytes_moved: int  # bytes of tensor inputs read plus tensor outputs written
    param_bytes: int  # bytes of parameters/constants this node reads directly
    op_class: OpClass
    module_path: str  # originating nn.Module path ("age.layer1.0.conv1"); "" when unknown

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self.outputs[0].shape if len(self.outputs) == 1 else None

    @property
    def dtype(self) -> torch.dtype | None:
        return self.outputs[0].dtype if len(self.outputs) == 1 else None


_SHORT_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool", torch.complex64: "c64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short stable dtype name used by the printer and error messages (f32, i64, ...)."""
    return _SHORT_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def op_name(target: Any) -> str:
    """The bare operator name of a call target: aten.conv2d.default -> 'conv2d'."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def classify(node: fx.Node) -> OpClass:
    """The OpClass of a node, from its op kind and ATen operator name."""
    if node.op == "placeholder":
        return OpClass.INPUT
    if node.op == "get_attr":
        return OpClass.PARAM
    if node.op == "output":
        return OpClass.OUTPUT
    return _CLASS_OF_NAME.get(op_name(node.target), OpClass.OTHER)


def _tensor_metas(value: Any) -> tuple[TensorMeta, ...]:
    if isinstance(value, torch.Tensor):
        return (TensorMeta(tuple(value.shape), value.dtype),)
    if isinstance(value, (tuple, list)):
        return tuple(m for v in value for m in _tensor_metas(v))
    return ()


class _MetadataInterpreter(fx.Interpreter):
    """Runs the graph once and records a NodeMeta per node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.metas: dict[fx.Node, NodeMeta] = {}

    def run_node(self, n: fx.Node) -> Any:
        flops = 0
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            with FlopCounterMode(display=False) as counter:
                result = super().run_node(n)
            flops = int(counter.get_total_flops())
        else:
            result = super().run_node(n)
        outputs = _tensor_metas(result)
        inputs = n.all_input_nodes
        read = sum(sum(o.nbytes for o in self.metas[i].outputs) for i in inputs if i in self.metas)
        written = sum(o.nbytes for o in outputs) if n.op not in ("get_attr", "placeholder", "output") else 0
        param_bytes = sum(sum(o.nbytes for o in self.metas[i].outputs) for i in inputs if i.op == "get_attr")
        self.metas[n] = NodeMeta(
            outputs=outputs if n.op != "output" else (),
            flops=flops,
            bytes_moved=(read + written) if n.op not in ("get_attr", "placeholder", "output") else 0,
            param_bytes=param_bytes if n.op != "output" else 0,
            op_class=classify(n),
            module_path=n.meta.get(MODULE_PATH_KEY, ""),
        )
        return result


@torch.no_grad()
def compute_metadata(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Store a NodeMeta in every node's meta, from one run of `gm` on `example_inputs`' shapes.

    The run uses fake tensors (shapes and dtypes only, no arithmetic), so refreshing metadata after
    a pass costs milliseconds even for base-size models; graphs whose shapes depend on values
    (e.g. `nonzero`) or ops without a fake implementation are run on the real example inputs.
    """
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_inputs = [mode.from_tensor(t) for t in example_inputs]
            metas = _run(gm, fake_inputs)
        if all(isinstance(d, int) for m in metas.values() for o in m.outputs for d in o.shape):
            _store(metas)
            return
    except Exception:  # no fake kernel, data-dependent shape, ...: fall back to real tensors
        pass
    _store(_run(gm, list(example_inputs)))


def _run(gm: fx.GraphModule, inputs: list[torch.Tensor]) -> dict[fx.Node, NodeMeta]:
    interp = _MetadataInterpreter(gm)
    interp.run(*inputs)
    return interp.metas


def _store(metas: dict[fx.Node, NodeMeta]) -> None:
    for node, meta in metas.items():
        node.meta[META_KEY] = meta


def node_meta(node: fx.Node) -> NodeMeta:
    """The NodeMeta of a node; KeyError with the node's name if metadata was never computed."""
    try:
        return node.meta[META_KEY]
    except KeyError:
        raise KeyError(f"node '{node.name}' has no morphc metadata; run Program.refresh_metadata()") from None
