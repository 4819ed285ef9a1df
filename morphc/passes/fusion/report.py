"""The fusion report: every candidate, the Pareto front of latency vs accuracy drop, a table and a plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morphc.passes.fusion.search import Evaluated, SearchOutcome


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


@dataclass
class FusionReport:
    """What a fusion search found; `markdown()`, `plot(path)`, `write(directory)`, `to_json()`."""

    outcome: SearchOutcome
    tasks: tuple[str, ...]

    @property
    def pareto(self) -> list[Evaluated]:
        return self.outcome.pareto()

    def table(self, rows: list[Evaluated]) -> str:
        head = ["candidate", "merges", "latency (ms)", "speed-up", "acc. drop", *[f"{t} score" for t in self.tasks],
                "steps", "stopped", "status"]
        base = self.outcome.original.latency
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for c in rows:
            merges = "; ".join(f"{t}←{s}" for t, s in sorted(c.merges)) or "(originals)"
            cells = [c.key[:8], merges, f"{c.latency * 1e3:.3f}", f"{base / c.latency:.2f}x", _fmt(c.drop),
                     *[_fmt(c.scores.get(t)) for t in self.tasks], str(c.steps), c.stopped or "", c.status]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def markdown(self, plot_name: str | None = None) -> str:
        o = self.outcome
        verdict = (f"best candidate meets max-acc-drop={o.max_acc_drop}: {o.original.latency / o.best.latency:.2f}x "
                   f"lower latency, accuracy drop {_fmt(o.best.drop)}" if o.met_bound else
                   f"no candidate met max-acc-drop={o.max_acc_drop}: the original models are returned unchanged")
        parts = [
            "## Fusion search", "",
            f"- {verdict}",
            f"- search: {o.seconds:.1f} s, {o.proposals} proposals, {o.trained} candidates trained "
            f"({o.resumed} resumed from state), filtered: {o.filtered_latency} by latency, "
            f"{o.filtered_dominated} dominated by a failed candidate; {o.stopped_early} stopped early as hopeless",
            *([f"- latency: {o.latency_source}"] if o.latency_source else []),
            "", "### Pareto front (latency vs accuracy drop)", "", self.table(self.pareto),
        ]
        if plot_name:
            parts += ["", f"![pareto]({plot_name})"]
        trained = [c for c in o.candidates if c.status == "trained"]
        parts += ["", "### Every trained candidate", "", self.table(sorted(trained, key=lambda c: c.latency))]
        return "\n".join(parts) + "\n"

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        o = self.outcome
        fig, ax = plt.subplots(figsize=(6, 4))
        trained = [c for c in o.candidates if c.drop is not None]
        ax.scatter([c.latency * 1e3 for c in trained], [c.drop * 100 for c in trained],  # type: ignore[operator]
                   s=18, alpha=0.6, label="trained candidates")
        front = self.pareto
        ax.plot([c.latency * 1e3 for c in front], [(c.drop or 0) * 100 for c in front], "o-", color="C3",
                label="Pareto front")
        ax.scatter([o.original.latency * 1e3], [0], marker="*", s=120, color="k", label="original models")
        ax.axhline(o.max_acc_drop * 100, ls="--", color="gray", label="max-acc-drop")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("accuracy drop (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write(self, directory: str | Path, name: str = "fusion") -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        plot = self.plot(directory / f"{name}_pareto.png")
        md = directory / f"{name}_report.md"
        md.write_text(self.markdown(plot.name))
        return md

    def to_json(self) -> dict[str, Any]:
        o = self.outcome
        return {"original": o.original.summary(), "best": o.best.summary(), "met_bound": o.met_bound,
                "pareto": [c.summary() for c in self.pareto], "candidates": [c.summary() for c in o.candidates],
                "trained": o.trained, "resumed": o.resumed, "filtered_latency": o.filtered_latency,
                "filtered_dominated": o.filtered_dominated, "stopped_early": o.stopped_early,
                "proposals": o.proposals, "search_seconds": o.seconds, "max_acc_drop": o.max_acc_drop}


_LAST: list[FusionReport] = []


def set_last_report(report: FusionReport) -> None:
    _LAST[:] = [report]


def last_report() -> FusionReport | None:
    """The report of the most recent `fuse-models` run in this process (also in ctx.options["fusion_report"])."""
    return _LAST[0] if _LAST else None
