"""The main job: two task models sharing a frozen backbone become one optimized program.

Runs on the embedded defaults (CPU, eager target, no database needed) and writes a Markdown report
with a plot to out/quickstart/. Steps:
  1. lower two separately built task models (same input) into one morphc Program;
  2. run the default pipeline plus `compile{target=eager}`, with IR verification and pass timing;
  3. check the executable against the original models and time both side by side;
  4. save the executable, load it back without the model code, check it again;
  5. use morphc as a torch.compile backend on a small BERT and check it against eager.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

import morphc as mc
from morphc import zoo
from morphc.predictors.profiler import measure

PIPELINE = "canonicalize,fold-batchnorm,fold-constants,cse,dce"


def median_ms(fn: Callable[[], object]) -> float:
    """Median latency over 50 calls after 5 warm-up calls (the profiler's own measurement)."""
    return measure(fn, warmup=5, repeats=50).median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/quickstart", help="directory for the report and the executable")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)

    # 1. two task models that share an identical frozen prefix (separate modules, equal weights)
    models, example_inputs = zoo.twin_tasks(batch_size=args.batch_size)
    program = mc.lower(models, example_inputs)
    print(f"lowered: {program!r}")

    # 2. the pipeline, verified after every pass, timed per pass
    timing = mc.PassTiming()
    pipeline = mc.Pipeline.parse(f"{PIPELINE},compile{{target=eager}}")
    exe = pipeline.run(program, mc.PassContext(verify_each=True, instruments=[timing]))
    print(timing.report())

    # 3. same outputs as the original models, and how much faster
    outputs = exe(*example_inputs)
    worst = max((outputs[name] - m(*example_inputs)).abs().max().item() for name, m in models.items())
    separate_ms = median_ms(lambda: [m(*example_inputs) for m in models.values()])
    fused_ms = median_ms(lambda: exe(*example_inputs))
    print(f"max |morphc - eager| = {worst:.2e}")
    print(f"separately: {separate_ms:.2f} ms   morphc: {fused_ms:.2f} ms   speed-up {separate_ms / fused_ms:.2f}x")
    assert worst < 1e-4, "morphc output differs from the original models"

    # 3b. the same optimized program on ONNX Runtime (compile checks it against eager itself)
    ort_exe = mc.Pipeline.parse(f"{PIPELINE},compile{{target=onnxruntime}}").run(program)
    ort_ms = median_ms(lambda: ort_exe(*example_inputs))
    print(f"morphc on onnxruntime: {ort_ms:.2f} ms   speed-up {separate_ms / ort_ms:.2f}x "
          f"(max |diff| vs eager {ort_exe.report.max_abs_error:.1e})")

    # 4. save, load without the model code, same outputs
    saved = exe.save(out / "twin_tasks.exe")
    reloaded = mc.load_executable(saved)
    again = reloaded(*example_inputs)
    assert all(torch.equal(again[k], outputs[k]) for k in outputs), "reloaded executable differs"
    print(f"saved and reloaded: {saved}")

    # 5. torch.compile backend on a small BERT
    bert = zoo.build("bert-small")
    compiled = torch.compile(bert.model, backend="morphc", options={"pipeline": PIPELINE})
    bert_err = (compiled(*bert.example_inputs) - bert.model(*bert.example_inputs)).abs().max().item()
    print(f"torch.compile(backend='morphc') on bert-small: max |diff| vs eager = {bert_err:.2e}")
    assert bert_err < 1e-4

    _write_report(out, program, exe, timing, {"two models\n(separately)": separate_ms, "morphc\n(eager)": fused_ms,
                                              "morphc\n(onnxruntime)": ort_ms}, worst, bert_err, args.batch_size)
    print(f"report: {out / 'report.md'}")


def _write_report(out: Path, program: mc.Program, exe: mc.Executable, timing: mc.PassTiming,
                  latency_ms: dict[str, float], worst: float, bert_err: float, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = list(latency_ms), list(latency_ms.values())
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(labels, values, color=["#999", "#2a7", "#27a"][: len(values)])
    ax.set_ylabel(f"latency per call, ms (batch {batch})")
    ax.set_title(f"two task models sharing a prefix: up to {values[0] / min(values[1:]):.2f}x faster")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
    rows = "".join(f"| {k.replace(chr(10), ' ')} | {v:.2f} | {values[0] / v:.2f}x |\n" for k, v in latency_ms.items())
    (out / "report.md").write_text(
        "# morphc quickstart\n\n"
        f"Input: {program!r}\n\nResult: {len(exe.program.graph.nodes)} nodes after `{PIPELINE}` "
        f"(from {len(program.graph.nodes)}).\n\n"
        f"| | latency (ms, batch {batch}) | speed-up |\n|---|---|---|\n{rows}\n![latency](latency.png)\n\n"
        f"Max difference from the original models: {worst:.2e}; torch.compile backend on bert-small: "
        f"{bert_err:.2e}.\n\n## Passes\n\n```\n{timing.report()}\n```\n"
    )


if __name__ == "__main__":
    main()
