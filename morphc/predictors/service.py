"""A small HTTP prediction service over a cost-model checkpoint (RaPP offers one).

Why: a scheduler or a serving system written in another language, or running where JAX is not
installed, can ask for latency predictions without importing morphc. Standard library only.

    morphc serve-cost-model [--checkpoint X.npz] [--calibration C.json] [--host 127.0.0.1] [--port 8765]

Endpoints (JSON in, JSON out):
- `GET /v1/model`: what the checkpoint describes (device kind and fingerprint, feature schema,
  ensemble size, what it was trained on, the calibration to this machine's speed if one is applied).
- `POST /v1/predict` with `{"program": <base64 of a program saved by morphc.save>` or
  `"zoo": <zoo model name>, "batch_size": 1}` and `"configs": ["batch=8,threads=2", {"threads": 1}, ...]`
  (default: one thread) -> `{"configs": [{knob: value}], "latency_ms": [...]}`.
Bad input gets status 400 with `{"error": ...}` naming what is wrong; only saved programs and zoo
names are accepted (never a path on the server or a factory to import: the caller runs no code here).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from morphc.errors import MorphcError
from morphc.ir.program import Program
from morphc.ir.serialization import load
from morphc.predictors.cost_model import SPEED_GROUPS, CostModel
from morphc.predictors.spaces import config_from_dict, parse_config

DEFAULT_MAX_BODY = 2 << 30  # a saved BERT-base, base64-encoded, is ~0.6 GB


class RequestError(MorphcError):
    """A prediction request the service cannot answer (status 400)."""


class PredictionService:
    """The request logic, apart from HTTP: parse, predict under one lock (JAX calls are serialized)."""

    def __init__(self, model: CostModel) -> None:
        self.model = model
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        keep = ("device_kind", "device_fingerprint", "feature_schema", "format", "version", "target", "trained")
        calibrated = {str(t): {g: round(math.exp(v), 4) for g, v in zip(SPEED_GROUPS, f, strict=True)}
                      for t, f in sorted(self.model.log_factors.items())}
        return {**{k: self.model.meta[k] for k in keep if k in self.model.meta}, "members": len(self.model.members),
                "calibration_factor_by_threads": calibrated or None}

    def predict(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(request).__name__}")
        unknown = set(request) - {"program", "zoo", "batch_size", "configs"}
        if unknown:
            raise RequestError(f"unknown request field(s) {sorted(unknown)}; valid: batch_size, configs, program, zoo")
        specs = request.get("configs") or ["threads=1"]
        if not isinstance(specs, list):
            raise RequestError(f"'configs' must be a list of configs, got {type(specs).__name__} {specs!r}")
        configs = [self._config(c) for c in specs]
        program = self._program(request)
        with self._lock:
            latencies = self.model.predict_many([(program, c) for c in configs])
        return {"configs": [dataclasses.asdict(c) for c in configs],
                "latency_ms": [float(x) * 1e3 for x in latencies]}

    def _config(self, spec: Any) -> Any:
        if isinstance(spec, str):
            return parse_config(spec, self.model.device_kind)
        if isinstance(spec, dict):
            return config_from_dict(self.model.device_kind, spec)
        raise RequestError(f"a config must be a string like 'batch=8,threads=2' or an object of knobs, got {spec!r}")

    def _program(self, request: dict[str, Any]) -> Program:
        if ("program" in request) == ("zoo" in request):
            raise RequestError("give exactly one of 'program' (base64 of a file written by morphc.save) and 'zoo' "
                               "(a zoo model name)")
        if "zoo" in request:
            return self._zoo_program(request["zoo"], request.get("batch_size", 1))
        if "batch_size" in request:
            raise RequestError("'batch_size' applies to 'zoo' models only: a saved program has its batch; ask for "
                               "another with a config's 'batch' knob")
        try:
            data = base64.b64decode(request["program"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise RequestError(f"'program' is not valid base64: {exc}") from exc
        with tempfile.TemporaryDirectory(prefix="morphc-serve-") as tmp:
            path = Path(tmp) / "program.safetensors"
            path.write_bytes(data)
            return load(path)

    @staticmethod
    def _zoo_program(name: Any, batch_size: Any) -> Program:
        from morphc import zoo
        from morphc.ir.lowering import lower

        if not isinstance(batch_size, int) or batch_size < 1:
            raise RequestError(f"'batch_size' must be a positive integer, got {batch_size!r}")
        if name not in zoo.names():
            raise RequestError(f"no zoo model '{name}'; valid: {', '.join(zoo.names())}")
        built = zoo.build(name, batch_size=batch_size)
        return lower(built.model, built.example_inputs)


def make_server(model: CostModel, host: str = "127.0.0.1", port: int = 8765, *,
                max_body: int = DEFAULT_MAX_BODY) -> ThreadingHTTPServer:
    """An HTTP server answering the endpoints above (`port=0`: any free port; see `server_address`)."""
    service = PredictionService(model)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/model":
                self._reply(HTTPStatus.OK, service.describe())
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no endpoint GET {self.path}; valid: GET /v1/model, "
                                                            "POST /v1/predict"})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/predict":
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no endpoint POST {self.path}; valid: POST /v1/predict"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > max_body:
                self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            {"error": f"request body of {length} bytes exceeds the limit of {max_body}"})
                return
            try:
                request = json.loads(self.rfile.read(length) or b"null")
            except json.JSONDecodeError as exc:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"the request body is not JSON: {exc}"})
                return
            try:
                self._reply(HTTPStatus.OK, service.predict(request))
            except MorphcError as exc:  # bad config, unreadable program, wrong device kind: the caller's to fix
                self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc), "type": type(exc).__name__})
            except Exception as exc:  # a fault of ours: say so rather than drop the connection
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR,
                            {"error": f"internal error: {type(exc).__name__}: {exc}", "type": type(exc).__name__})

        def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet by default: the CLI prints where it listens

    return ThreadingHTTPServer((host, port), Handler)
