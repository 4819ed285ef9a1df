"""The CLI as a library call: it must not leave global torch state behind."""

from __future__ import annotations

import torch

from morphc import cli


def test_main_restores_grad_mode(capsys) -> None:
    """`main` runs inference commands without autograd, but a caller (or the next test) that trains
    afterwards must still have gradients."""
    assert torch.is_grad_enabled()
    assert cli.main(["passes"]) == 0
    assert "cse" in capsys.readouterr().out
    assert torch.is_grad_enabled()
