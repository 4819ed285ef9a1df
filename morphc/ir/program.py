"""The Program: one ATen-level torch.fx graph holding one or several task models.

N task models sharing an input are one graph with shared input placeholders and one named output
per task (or per output leaf, "task.key", when a task returns several tensors). Running the
Program equals running the N models; fusion and cross-model CSE are then rewrites of one graph.

Parameters and buffers are `get_attr` nodes reading tensors registered on the GraphModule, so
passes see weights as graph values (CSE can merge equal weights, folding can precompute on them).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.fx as fx

from morphc.errors import InputMismatchError
from morphc.ir.annotations import ANNOTATIONS_KEY, Annotation
from morphc.ir.metadata import NodeMeta, TensorMeta, compute_metadata, node_meta

A = TypeVar("A", bound=Annotation)


@dataclass(frozen=True)
class TensorSpec:
    """A named, statically shaped tensor at the Program boundary."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.name}: {TensorMeta(self.shape, self.dtype)}"

    def matches(self, t: torch.Tensor) -> bool:
        return tuple(t.shape) == self.shape and t.dtype == self.dtype


@dataclass(frozen=True)
class OutputSpec(TensorSpec):
    """An output, with the task model it belongs to."""

    task: str = ""


class Program:
    """One or several models as one ATen graph, with metadata, annotations and example inputs."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[OutputSpec],
        example_inputs: Sequence[torch.Tensor],
        annotations: Mapping[str, Annotation] | None = None,
        *,
        compute_meta: bool = True,
    ) -> None:
        self.graph_module = graph_module
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.example_inputs = tuple(example_inputs)
        self.annotations: dict[str, Annotation] = dict(annotations or {})
        self.generation = 0  # bumped whenever the graph changes; keys analysis caches
        if compute_meta:
            self.refresh_metadata()

    # --- structure ---------------------------------------------------------------------------

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.graph.nodes)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o.task for o in self.outputs))

    @property
    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def tensor(self, target: str) -> torch.Tensor:
        """The parameter/constant a get_attr node reads."""
        return getattr(self.graph_module, target)

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every tensor the graph reads through get_attr, by attribute name, in graph order."""
        return {str(n.target): self.tensor(str(n.target)) for n in self.graph.nodes if n.op == "get_attr"}

    def param_bytes(self) -> int:
        seen: set[str] = set()
        total = 0
        for n in self.graph.nodes:
            if n.op == "get_attr" and n.target not in seen:
                seen.add(str(n.target))
                t = self.tensor(str(n.target))
                total += t.numel() * t.element_size()
        return total

    def meta(self, node: fx.Node) -> NodeMeta:
        return node_meta(node)

    def node(self, name: str) -> fx.Node:
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named '{name}' in the program")

    # --- annotations -------------------------------------------------------------------------

    def annotate(self, ann: Annotation, node: fx.Node | None = None) -> None:
        """Attach `ann` to the program (node=None) or to `node`, replacing one of the same kind."""
        if node is None:
            if ann.scope != "program":
                raise ValueError(f"annotation '{ann.kind}' is node-scoped; pass the node to attach it to")
            self.annotations[ann.kind] = ann
        else:
            if ann.scope != "node":
                raise ValueError(f"annotation '{ann.kind}' is program-scoped; attach it without a node")
            node.meta.setdefault(ANNOTATIONS_KEY, {})[ann.kind] = ann

    def annotation(self, kind: type[A], node: fx.Node | None = None) -> A | None:
        """The annotation of `kind` on the program or on `node`, or None."""
        store = self.annotations if node is None else node.meta.get(ANNOTATIONS_KEY, {})
        return store.get(kind.kind)  # type: ignore[return-value]

    @staticmethod
    def node_annotations(node: fx.Node) -> dict[str, Annotation]:
        return dict(node.meta.get(ANNOTATIONS_KEY, {}))

    # --- change tracking ---------------------------------------------------------------------

    def refresh_metadata(self) -> None:
        """Recompile the GraphModule and recompute every node's metadata on the example inputs."""
        self.graph_module.recompile()
        compute_metadata(self.graph_module, self.example_inputs)

    def mark_modified(self) -> None:
        """Called after a pass changed the graph: new code, new metadata, analyses invalidated."""
        self.generation += 1
        self.refresh_metadata()

    def clone(self) -> Program:
        """A copy whose graph can be rewritten without touching this one (tensors are shared)."""
        graph = fx.Graph()
        # graph_copy copies node.meta shallowly: metadata and annotations are frozen values
        out = graph.output(graph.graph_copy(self.graph, {}))
        out.meta.update(self.output_node.meta)
        for node in graph.nodes:  # annotation dicts are mutable: give the copy its own
            if ANNOTATIONS_KEY in node.meta:
                node.meta[ANNOTATIONS_KEY] = dict(node.meta[ANNOTATIONS_KEY])
        gm = fx.GraphModule(self.graph_module, graph)
        return Program(gm, self.inputs, self.outputs, self.example_inputs, self.annotations, compute_meta=False)

    def to(self, device: str | torch.device, skip: Collection[str] = ()) -> Program:
        """A copy that runs on `device`: every tensor the graph reads moved there (but the attributes in
        `skip`: the cold-start executor streams weights in itself), the example inputs too, and every
        op's `device=` argument (torch.export bakes the capture's device into factory ops such as
        `arange` and into `_assert_tensor_metadata`) rewritten. Annotations and metadata are kept."""
        device = torch.device(device)
        moved = self.clone()
        gm = moved.graph_module
        for node in moved.graph.nodes:
            if node.op == "get_attr" and str(node.target) not in skip:
                owner, _, leaf = str(node.target).rpartition(".")
                module = gm.get_submodule(owner) if owner else gm
                value = getattr(module, leaf)
                if isinstance(value, torch.Tensor) and value.device != device:
                    if isinstance(value, torch.nn.Parameter):
                        module.register_parameter(leaf, torch.nn.Parameter(value.detach().to(device),
                                                                           requires_grad=value.requires_grad))
                    elif leaf in module._buffers:
                        module.register_buffer(leaf, value.to(device))
                    else:
                        setattr(module, leaf, value.to(device))
            elif node.op == "call_function" and isinstance(node.kwargs.get("device"), torch.device):
                node.kwargs = {**node.kwargs, "device": device}
        gm.recompile()
        moved.example_inputs = tuple(t.to(device) for t in self.example_inputs)
        return moved

    # --- running -----------------------------------------------------------------------------

    def check_inputs(self, args: Sequence[Any]) -> None:
        """Raise InputMismatchError naming the input when args do not match the input specs."""
        if len(args) != len(self.inputs):
            expected = ", ".join(str(s) for s in self.inputs)
            raise InputMismatchError(f"expected {len(self.inputs)} input(s) ({expected}), got {len(args)}")
        for i, (spec, arg) in enumerate(zip(self.inputs, args)):
            if not isinstance(arg, torch.Tensor):
                raise InputMismatchError(
                    f"input '{spec.name}' (#{i}) must be a tensor {spec}, got {type(arg).__name__}")
            if not spec.matches(arg):
                got = TensorMeta(tuple(arg.shape), arg.dtype)
                raise InputMismatchError(
                    f"input '{spec.name}' (#{i}) expects {TensorMeta(spec.shape, spec.dtype)}, got {got}"
                    " (programs are lowered for static shapes: lower again with example inputs of this shape)"
                )

    @torch.no_grad()
    def __call__(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run eagerly; returns {output name: tensor}."""
        self.check_inputs(args)
        flat = self.graph_module(*args)
        return dict(zip((o.name for o in self.outputs), flat))

    def __repr__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        return (f"Program(tasks={list(self.tasks)}, inputs=({ins}), nodes={len(self.graph.nodes)}, "
                f"params={self.param_bytes() / 1e6:.2f} MB)")

    def __str__(self) -> str:
        from morphc.ir.printer import print_program

        return print_program(self)

