"""The HTTP prediction service answers what the cost model answers in process, and refuses bad requests
with a status and a message that names the problem."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import morphc
from morphc import zoo
from morphc.predictors import cost_model
from morphc.predictors.service import PredictionService, make_server
from morphc.predictors.spaces import CpuConfig


@pytest.fixture(scope="module")
def model() -> cost_model.CostModel:
    return cost_model.load_default()


@pytest.fixture(scope="module")
def url(model: cost_model.CostModel) -> Iterator[str]:
    server = make_server(model, "127.0.0.1", 0, max_body=64 << 20)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _call(url: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_describes_the_checkpoint(url: str, model: cost_model.CostModel) -> None:
    status, body = _call(url, "/v1/model")
    assert status == 200
    assert body["device_kind"] == "cpu"
    assert body["device_fingerprint"] == model.meta["device_fingerprint"]
    assert body["members"] == len(model.members)
    assert body["calibration_factor_by_threads"] is None
    calibrated = dataclasses.replace(model, log_factors={1: (0.0, math.log(1.5), math.log(2.0))})
    assert PredictionService(calibrated).describe()["calibration_factor_by_threads"] == {
        "1": {"conv": 1.0, "matmul": 1.5, "other": 2.0}}


@pytest.mark.filterwarnings("ignore::morphc.predictors.cost_model.CostModelWarning")
def test_a_saved_program_is_predicted_as_in_process(url: str, model: cost_model.CostModel, tmp_path: Path) -> None:
    built = zoo.build("resnet_block_cnn", batch_size=1)
    program = morphc.lower(built.model, built.example_inputs)
    path = morphc.save(program, tmp_path / "p.safetensors")
    configs = ["threads=1", {"threads": 2, "batch": 4}]
    status, body = _call(url, "/v1/predict", {"program": base64.b64encode(path.read_bytes()).decode(),
                                               "configs": configs})
    assert status == 200, body
    expected = model.predict_many([(program, CpuConfig(threads=1)), (program, CpuConfig(threads=2, batch=4))])
    assert body["latency_ms"] == pytest.approx([x * 1e3 for x in expected], rel=1e-5)
    assert body["configs"][1] == {"threads": 2, "batch": 4, "flush_denormal": False}
    assert body["latency_ms"][1] < body["latency_ms"][0] * 4  # 4x the work on 2 threads: sanity, not a threshold


@pytest.mark.filterwarnings("ignore::morphc.predictors.cost_model.CostModelWarning")
def test_a_zoo_model_by_name(url: str, model: cost_model.CostModel) -> None:
    status, body = _call(url, "/v1/predict", {"zoo": "tiny_mlp", "batch_size": 2})
    assert status == 200, body
    built = zoo.build("tiny_mlp", batch_size=2)
    expected = model.predict(morphc.lower(built.model, built.example_inputs), CpuConfig(threads=1))
    assert body["latency_ms"] == pytest.approx([expected * 1e3], rel=1e-5)


@pytest.mark.parametrize(("request_body", "status", "names"), [
    ({"zoo": "tiny_mlp", "configs": ["cores=2"]}, 400, "cores"),  # unknown knob: the valid ones are named
    ({"zoo": "tiny_mlp", "configs": ["threads=two"]}, 400, "two"),
    ({"zoo": "tiny_mlp", "configs": [7]}, 400, "config"),
    ({"zoo": "no-such-model"}, 400, "no-such-model"),
    ({"zoo": "tiny_mlp", "batch_size": 0}, 400, "batch_size"),
    ({"configs": ["threads=1"]}, 400, "exactly one of 'program'"),
    ({"zoo": "tiny_mlp", "program": "AAAA"}, 400, "exactly one of 'program'"),
    ({"program": "not base64!"}, 400, "base64"),
    ({"program": base64.b64encode(b"garbage").decode()}, 400, "safetensors"),
    ({"zoo": "tiny_mlp", "path": "/etc/passwd"}, 400, "path"),
    ([1, 2], 400, "JSON object"),
    ({"zoo": "tiny_mlp", "configs": "threads=1"}, 400, "must be a list"),
    ({"program": "AAAA", "batch_size": 2}, 400, "'batch' knob"),
])
def test_bad_requests_are_refused_with_the_reason(url: str, request_body: Any, status: int, names: str) -> None:
    got, body = _call(url, "/v1/predict", request_body)
    assert got == status
    assert names in body["error"]


def test_bad_paths_and_bodies(url: str) -> None:
    assert _call(url, "/v2/predict", {})[0] == 404
    assert _call(url, "/nothing")[0] == 404
    status, body = _call(url, "/v1/predict", raw=b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    # a body over the limit is refused from its Content-Length, before it is read
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/predict")
    conn.putheader("Content-Length", str((64 << 20) + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]
    conn.close()


def test_an_internal_fault_is_a_500_not_a_dropped_connection(model: cost_model.CostModel,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_server(model, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("simulated fault")

        monkeypatch.setattr(model, "predict_many", broken)
        status, body = _call(f"http://127.0.0.1:{server.server_address[1]}", "/v1/predict", {"zoo": "tiny_mlp"})
        assert status == 500 and "simulated fault" in body["error"]
    finally:
        server.shutdown()
        server.server_close()
