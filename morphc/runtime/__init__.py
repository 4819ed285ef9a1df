"""Runtime: executables for each target, the compile pass, and the torch.compile backend."""

# registration (tvm and tensorrt themselves are imported lazily, when compiling)
from morphc.runtime import compile_pass, eager, onnx_runtime, tensorrt_target, tvm_target  # noqa: F401
from morphc.runtime.executable import (
    CompileError,
    CompileReport,
    Executable,
    Fallback,
    compile_program,
    load_executable,
    register_target,
    targets,
)
from morphc.runtime.executors import Executor, ExecutorError, TaskError, get_executor

__all__ = ["CompileError", "CompileReport", "Executable", "Fallback", "compile_program", "load_executable",
           "register_target", "targets"]
__all__ += ["Executor", "ExecutorError", "TaskError", "get_executor"]
