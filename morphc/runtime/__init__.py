"""Runtime: executables for each target, the compile pass, and the torch.compile backend."""

from morphc.runtime import compile_pass, eager, onnx_runtime  # noqa: F401  (registration)
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
