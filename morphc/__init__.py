"""morphc: a compiler-style optimization pass suite for deep-learning inference.

    import morphc as mc
    prog = mc.lower({"age": age_net, "gender": gender_net}, example_inputs)
    exe = mc.Pipeline.parse("canonicalize,fold-batchnorm,fold-constants,cse,dce,compile{target=eager}").run(prog)
    outputs = exe(images)   # {"age": ..., "gender": ...}
"""

from morphc.errors import (
    InputMismatchError,
    LoweringError,
    MorphcError,
    PassFailure,
    PassOptionError,
    PipelineSyntaxError,
    SerializationError,
    UnknownPassError,
    VerificationError,
)
from morphc.ir.annotations import Annotation, annotation
from morphc.ir.lowering import lower
from morphc.ir.printer import print_program
from morphc.ir.program import OutputSpec, Program, TensorSpec
from morphc.ir.serialization import load, save
from morphc.ir.verifier import verify
from morphc.passes import (
    DumpIR,
    Pass,
    PassContext,
    PassInstrument,
    PassManager,
    PassResult,
    PassTiming,
    Pipeline,
    PrintIR,
    option,
    register_pass,
    registered_passes,
)
from morphc.runtime import CompileError, Executable, compile_program, load_executable

__version__ = "0.1.0"

__all__ = [
    "Annotation", "CompileError", "DumpIR", "Executable", "InputMismatchError", "LoweringError", "MorphcError",
    "OutputSpec", "Pass", "PassContext", "PassFailure", "PassInstrument", "PassManager", "PassOptionError",
    "PassResult", "PassTiming", "Pipeline", "PipelineSyntaxError", "PrintIR", "Program", "SerializationError",
    "TensorSpec", "UnknownPassError", "VerificationError", "annotation", "compile_program", "load",
    "load_executable", "lower", "option", "print_program", "register_pass", "registered_passes", "save", "verify",
]
