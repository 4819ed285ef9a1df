"""Tests for morphc.zoo: every small entry builds, is deterministic and exports exactly.

Base-size entries are never built here (benchmarks only); pretrained entries are
checked against their published behaviour.
"""

from __future__ import annotations

import pytest
import torch

from morphc import zoo

SMALL = zoo.names(size="small")
TEXT = {"bert-small", "distilbert-small", "gpt2-small"}

# Output shape per small entry for batch size B (text models use 16 tokens).
EXPECTED_SHAPE = {
    "bert-small": lambda b: (b, 2),
    "distilbert-small": lambda b: (b, 2),
    "gpt2-small": lambda b: (b, 16, 1000),
    "branchy_cnn": lambda b: (b, 10),
    "resnet_block_cnn": lambda b: (b, 10),
    "tiny_mlp": lambda b: (b, 10),
    "resnet-small": lambda b: (b, 10),
    "convnext-small": lambda b: (b, 10),
    "mobilenet_v2-small": lambda b: (b, 10),
    "vit-small": lambda b: (b, 10),
}


def _run(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def test_names_and_filters() -> None:
    all_names = zoo.names()
    assert set(EXPECTED_SHAPE) == set(SMALL)
    assert set(SMALL) | set(zoo.names(size="base")) == set(all_names)
    assert zoo.names(pretrained=True) == ["minilm", "mobilenet_v2-imagenet"]
    assert not set(zoo.names(pretrained=True)) & set(SMALL)
    for base in [
        "resnet50",
        "convnext-t",
        "mobilenet_v2-base",
        "vit-b16",
        "bert-base",
        "distilbert-base",
        "gpt2-base",
    ]:
        assert zoo.entry(base).size == "base" and not zoo.entry(base).pretrained
    assert set(zoo.names(family="mlp")) == {"tiny_mlp"}
    with pytest.raises(ValueError):
        zoo.names(size="huge")


def test_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match="bert-small") as info:
        zoo.build("bert-smal")
    assert "Valid names" in str(info.value)


@pytest.mark.parametrize("name", SMALL)
def test_small_entry(name: str) -> None:
    m = zoo.build(name, batch_size=2, seed=0)
    assert isinstance(m, zoo.ZooModel) and m.name == name
    assert m.family in {"cnn", "transformer", "mlp"}
    assert not m.model.training
    assert all(
        p.dtype == torch.float32 and p.device.type == "cpu"
        for p in m.model.parameters()
    )
    if name in TEXT:
        assert len(m.example_inputs) == 2
        assert all(t.dtype == torch.int64 for t in m.example_inputs)

    out = _run(m.model, m.example_inputs)
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == EXPECTED_SHAPE[name](2)
    assert torch.isfinite(out).all()

    # Same seed -> identical weights, inputs and outputs; another seed -> different.
    again = zoo.build(name, batch_size=2, seed=0)
    for a, b in zip(m.example_inputs, again.example_inputs, strict=True):
        assert torch.equal(a, b)
    sd_a, sd_b = m.model.state_dict(), again.model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(out, _run(again.model, again.example_inputs))
    other = zoo.build(name, batch_size=2, seed=1)
    assert not torch.equal(out, _run(other.model, other.example_inputs))

    # Export captures the model exactly.
    ep = torch.export.export(m.model, m.example_inputs, strict=False)
    torch.testing.assert_close(
        _run(ep.module(), m.example_inputs), out, atol=1e-5, rtol=0
    )


def test_batch_size_one() -> None:
    m = zoo.build("branchy_cnn")
    assert m.example_inputs[0].shape[0] == 1
    with pytest.raises(ValueError):
        zoo.build("branchy_cnn", batch_size=0)


def test_text_mask_has_padding() -> None:
    ids, mask = zoo.build("bert-small", batch_size=3).example_inputs
    assert mask[0].all() and not mask[1:].all()
    assert (ids[mask == 0] == 0).all()


def test_twin_tasks_share_equal_but_distinct_prefix() -> None:
    models, inputs = zoo.twin_tasks(batch_size=2, seed=0)
    assert set(models) == {"classify", "regress"}
    a, b = models["classify"], models["regress"]
    assert a.prefix is not b.prefix
    pa, pb = a.prefix.state_dict(), b.prefix.state_dict()
    for k in pa:
        assert torch.equal(pa[k], pb[k])
        assert pa[k].data_ptr() != pb[k].data_ptr() or pa[k].numel() == 0
    assert all(not p.requires_grad for p in a.prefix.parameters())
    assert torch.equal(_run(a.prefix, inputs), _run(b.prefix, inputs))
    assert tuple(_run(a, inputs).shape) == (2, 10)
    assert tuple(_run(b, inputs).shape) == (2, 4)
    assert set(a.head.state_dict()) != set(b.head.state_dict())
    for m in (a, b):
        ep = torch.export.export(m, inputs, strict=False)
        torch.testing.assert_close(
            _run(ep.module(), inputs), _run(m, inputs), atol=1e-5, rtol=0
        )
    again, inputs2 = zoo.twin_tasks(batch_size=2, seed=0)
    assert torch.equal(inputs[0], inputs2[0])
    assert torch.equal(_run(again["regress"], inputs2), _run(b, inputs))


def test_minilm_matches_sentence_transformers() -> None:
    m = zoo.build("minilm", batch_size=2)
    assert m.family == "transformer"
    out = _run(m.model, m.example_inputs)
    assert tuple(out.shape) == (2, 384)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    # Cosine similarities printed in the sentence-transformers README for all-MiniLM-L6-v2.
    sentences = [
        "The weather is lovely today.",
        "It's so sunny outside!",
        "He drove to the stadium.",
    ]
    emb = _run(m.model, zoo.minilm_inputs(sentences, seq_len=32))
    sim = emb @ emb.T
    torch.testing.assert_close(sim[0, 1], torch.tensor(0.6660), atol=1e-3, rtol=0)
    torch.testing.assert_close(sim[0, 2], torch.tensor(0.1046), atol=1e-3, rtol=0)
    torch.testing.assert_close(sim[1, 2], torch.tensor(0.1411), atol=1e-3, rtol=0)
    # Padding must not change the embedding (the mask is honoured in pooling).
    torch.testing.assert_close(
        _run(m.model, zoo.minilm_inputs(sentences, seq_len=16)), emb, atol=1e-5, rtol=0
    )
    tok = zoo.minilm_tokenizer()
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id
    ep = torch.export.export(m.model, m.example_inputs, strict=False)
    torch.testing.assert_close(
        _run(ep.module(), m.example_inputs), out, atol=1e-5, rtol=0
    )


def test_mobilenet_v2_imagenet_checkpoint() -> None:
    m = zoo.build("mobilenet_v2-imagenet", batch_size=1)
    state = torch.load(
        zoo.mobilenet_v2_imagenet_checkpoint(), map_location="cpu", weights_only=True
    )
    assert "features.0.0.weight" in state and "classifier.1.weight" in state
    assert set(state) == set(m.model.state_dict())  # strict load already enforced
    out = _run(m.model, m.example_inputs)
    assert tuple(out.shape) == (1, 1000)
    torch.manual_seed(0)
    random_init = zoo.MobileNetV2()
    w, w0 = m.model.classifier[1].weight, random_init.classifier[1].weight
    assert w.shape == w0.shape and not torch.allclose(w, w0)
    # Trained BN statistics are far from the fresh (0, 1) init.
    assert m.model.features[0][1].running_var.sub(1).abs().max() > 0.1
    ep = torch.export.export(m.model, m.example_inputs, strict=False)
    torch.testing.assert_close(
        _run(ep.module(), m.example_inputs), out, atol=1e-5, rtol=0
    )
