"""The IR: Program over an ATen-level torch.fx graph, metadata, annotations, lowering, verifier, printer, save/load."""
