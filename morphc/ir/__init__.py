"""The IR: Program over an ATen-level torch.fx graph, metadata, annotations, lowering, verifier, printer, save/load."""

from morphc.ir import load_plan  # noqa: F401  (registers the load-plan annotation and the morphc:: schedule ops)
