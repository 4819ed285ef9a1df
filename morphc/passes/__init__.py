"""Passes: the Pass base and registry, pipeline text, the PassManager and its instruments, and
the built-in passes (imported here so that they register)."""

from morphc.passes import (  # noqa: F401  (registration)
    annotate_config,
    batch_ops,
    canonicalize,
    cse,
    dce,
    fold_batchnorm,
    fold_constants,
    fusion,
    load_schedule,
    mutators,
)
from morphc.passes.base import Pass, PassResult, get_pass, option, register_pass, registered_passes
from morphc.passes.instruments import DumpIR, PassInstrument, PassTiming, PrintIR
from morphc.passes.manager import PassContext, PassManager
from morphc.passes.pipeline import Pipeline

__all__ = [
    "DumpIR", "Pass", "PassContext", "PassInstrument", "PassManager", "PassResult",
    "PassTiming", "Pipeline", "PrintIR", "get_pass", "option", "register_pass", "registered_passes",
]
