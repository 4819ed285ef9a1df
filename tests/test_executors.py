"""Executors: local inline, local process pool and Ray give the same results; errors name the task."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from morphc.errors import MorphcError
from morphc.runtime.executors import (
    ExecutorError,
    InlineExecutor,
    LocalPoolExecutor,
    RayExecutor,
    TaskError,
    get_executor,
)

ITEMS = list(range(7))


def seeded_work(seed: int) -> tuple[int, float]:
    """A small torch computation that depends only on its input (so every executor must agree)."""
    torch.manual_seed(seed)
    x = torch.randn(16, 16)
    return seed, float((x @ x.T).trace())


def fail_on_three(i: int) -> int:
    if i == 3:
        raise ValueError(f"bad item {i}")
    return i * 2


def expected() -> dict[int, tuple[int, float]]:
    return dict(enumerate(seeded_work(i) for i in ITEMS))


def check_same_results(executor: object) -> None:
    got = dict(executor.map_unordered(seeded_work, ITEMS))  # type: ignore[attr-defined]
    assert got == expected()
    assert executor.map(seeded_work, ITEMS) == [seeded_work(i) for i in ITEMS]  # type: ignore[attr-defined]


def check_error_names_index(executor: object, name: str) -> None:
    with pytest.raises(TaskError, match=rf"task 3 failed on executor '{name}': ValueError: bad item 3") as info:
        dict(executor.map_unordered(fail_on_three, ITEMS))  # type: ignore[attr-defined]
    assert info.value.index == 3
    assert isinstance(info.value.cause, ValueError)
    assert isinstance(info.value, MorphcError)


def test_local_inline_is_in_order_and_in_process() -> None:
    with get_executor("local", max_workers=1) as ex:
        assert isinstance(ex, InlineExecutor)
        assert [i for i, _ in ex.map_unordered(seeded_work, ITEMS)] == ITEMS
        check_same_results(ex)
        # inline: closures work, and results are produced lazily one by one
        seen: list[int] = []
        it = ex.map_unordered(lambda i: seen.append(i) or i, ITEMS)
        assert next(it) == (0, 0) and seen == [0]
        check_error_names_index(ex, "local")
    with pytest.raises(ExecutorError, match="shut down"):
        list(ex.map_unordered(seeded_work, ITEMS))


def test_local_pool_of_two() -> None:
    with get_executor("local", max_workers=2) as ex:
        assert isinstance(ex, LocalPoolExecutor)
        check_same_results(ex)
        check_error_names_index(ex, "local")
        check_same_results(ex)  # still usable after a failed map
        with pytest.raises(ExecutorError, match="picklable"):
            list(ex.map_unordered(lambda i: i, ITEMS))
    assert ex._pool is None


def test_empty_items_and_stopping_early() -> None:
    with get_executor("local", max_workers=2) as ex:
        assert list(ex.map_unordered(seeded_work, [])) == []
        it = ex.map_unordered(seeded_work, list(range(20)))
        first_index, _ = next(it)
        assert 0 <= first_index < 20
        it.close()  # a caller that stops iterating: the rest is cancelled, the pool stays usable
        check_same_results(ex)


@pytest.fixture(scope="module")
def ray_executor() -> Iterator[RayExecutor]:
    pytest.importorskip("ray", reason="ray is an optional extra (morphc[ray]); installed in CI")
    ex = get_executor("ray", max_workers=2)
    assert isinstance(ex, RayExecutor)
    yield ex
    ex.shutdown()
    import ray

    assert not ray.is_initialized()


def test_ray_same_results_as_local(ray_executor: RayExecutor) -> None:
    check_same_results(ray_executor)


def test_ray_error_names_index(ray_executor: RayExecutor) -> None:
    check_error_names_index(ray_executor, "ray")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "dask"}, r"unknown executor 'dask'; valid executors: local, ray"),
    ({"name": "rey"}, r"did you mean 'ray'"),
    ({"name": "local", "max_workers": 0}, r"max_workers must be a positive integer"),
    ({"name": "local", "max_workers": "2"}, r"max_workers must be a positive integer"),
    ({"name": "local", "address": "auto"}, r"only applies to executor 'ray'"),
    ({"name": "ray", "address": "auto", "max_workers": 2}, r"either address .* or max_workers"),
])
def test_bad_options(kwargs: dict[str, object], message: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ExecutorError, match=message):
        get_executor(name, **kwargs)  # type: ignore[arg-type]
