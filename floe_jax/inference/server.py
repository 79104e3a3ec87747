"""`serve_cloud`: an OpenAI-compatible HTTP server for a floe_jax model (standard library only).

Endpoints:
  POST /v1/completions  `prompt` (text, token ids, or a list of either), `max_tokens` (>= 1),
                        `temperature` (0 = greedy), `seed`, `logprobs` (top-k, <= max_logprobs),
                        `return_tokens_as_token_ids`; answers in the completions schema with
                        `choices[i].logprobs.{tokens, token_logprobs, top_logprobs, text_offset}`.
  GET  /v1/models       the served model.
  GET  /health          `{"status": "ok"}`.

Top-k keys are the decoded token text (as vLLM and hosted APIs send them; two ids that decode to
the same text keep the likelier), or `token_id:N` when asked. The model runs through `LocalCloud`,
so a multi-token completion reuses its KV cache between tokens.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from floe_jax.config import ModelConfig
from floe_jax.inference.cloud import LocalCloud, decode_ids, encode_text, token_string
from floe_jax.lora import LoRA


class _BadRequest(ValueError):
    pass


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return list(prompt)
    raise _BadRequest("prompt must be a string, a list of token ids, or a list of either")


class CloudService:
    """The request logic behind the HTTP handler (testable without a socket)."""

    def __init__(
        self,
        params: dict,
        cfg: ModelConfig,
        tokenizer,
        *,
        lora: LoRA | None = None,
        model_name: str = "floe-cloud",
        max_logprobs: int = 20,
        max_tokens_limit: int = 256,
        eos_id: int | None = None,
    ):
        self.engine = LocalCloud(
            params, cfg, lora=lora, tokenizer=tokenizer, inputs="ids", headroom=max_tokens_limit
        )
        self.tokenizer, self.model_name = tokenizer, model_name
        self.max_logprobs, self.max_tokens_limit = max_logprobs, max_tokens_limit
        self.eos_id = cfg.eos_token_id if eos_id is None else eos_id
        self.created = int(time.time())

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {"id": self.model_name, "object": "model", "created": self.created,
                 "owned_by": "floe_jax"}
            ],
        }  # fmt: skip

    def _top(self, lp: np.ndarray, k: int, as_ids: bool) -> dict[str, float]:
        idx = np.argsort(-lp, kind="stable")[:k]
        out: dict[str, float] = {}
        for i in idx:
            key = f"token_id:{int(i)}" if as_ids else token_string(self.tokenizer, int(i))
            if key not in out:
                out[key] = float(lp[i])
        return out

    def complete(self, req: dict) -> dict:
        if not isinstance(req, dict):
            raise _BadRequest("request body must be a JSON object")
        prompts = _prompts(req.get("prompt"))
        max_tokens = req.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.max_tokens_limit:
            raise _BadRequest(f"max_tokens must be an integer in [1, {self.max_tokens_limit}]")
        k = req.get("logprobs")
        if k is not None and (not isinstance(k, int) or not 0 <= k <= self.max_logprobs):
            raise _BadRequest(f"logprobs must be an integer in [0, {self.max_logprobs}]")
        if req.get("echo", False):
            raise _BadRequest("echo=true is not supported")
        temperature = float(req.get("temperature", 1.0))
        if temperature < 0:
            raise _BadRequest("temperature must be >= 0")
        as_ids = bool(req.get("return_tokens_as_token_ids", False))
        rng = np.random.default_rng(req.get("seed"))
        choices, n_prompt, n_out = [], 0, 0
        for ci, prompt in enumerate(prompts):
            ids = list(prompt) if isinstance(prompt, list) else encode_text(self.tokenizer, prompt)
            if not ids:
                raise _BadRequest(f"prompt {ci} is empty")
            if max(ids) >= self.engine.cfg.vocab_size or min(ids) < 0:
                raise _BadRequest(f"prompt {ci} has a token id outside the vocabulary")
            n_prompt += len(ids)
            stream = uuid.uuid4().hex
            out, toks, tlps, tops, offs, text, finish = [], [], [], [], [], "", "length"
            try:
                for _ in range(max_tokens):
                    lp = self.engine.logprobs(ids + out, stream)
                    if temperature == 0:
                        t = int(np.argmax(lp))
                    else:
                        z = lp.astype(np.float64) / temperature
                        p = np.exp(z - z.max())
                        t = int(rng.choice(len(p), p=p / p.sum()))
                    out.append(t)
                    piece = f"token_id:{t}" if as_ids else token_string(self.tokenizer, t)
                    offs.append(len(text))
                    text += token_string(self.tokenizer, t)
                    toks.append(piece)
                    tlps.append(float(lp[t]))
                    if k:
                        tops.append(self._top(lp, k, as_ids))
                    if self.eos_id is not None and t == self.eos_id:
                        finish = "stop"
                        break
            finally:
                self.engine.drop(stream)
            n_out += len(out)
            logprobs = None
            if k is not None:
                logprobs = {
                    "tokens": toks,
                    "token_logprobs": tlps,
                    "top_logprobs": tops if k else None,
                    "text_offset": offs,
                }
            choices.append(
                {
                    "index": ci,
                    "text": decode_ids(self.tokenizer, out),
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
            )
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_out,
                "total_tokens": n_prompt + n_out,
            },
        }


def _handler(service: CloudService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet by default
            pass

        def _send(self, code: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, msg: str, kind: str = "invalid_request_error"):
            self._send(code, {"error": {"message": msg, "type": kind, "code": code}})

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                self._send(200, {"status": "ok"})
            elif path in ("/v1/models", "/models"):
                self._send(200, service.models())
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            path = self.path.split("?")[0].rstrip("/")
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if path not in ("/v1/completions", "/completions"):
                self._error(404, f"no route {self.path}")
                return
            try:
                req = json.loads(raw or b"null")
            except ValueError:
                self._error(400, "body is not valid JSON")
                return
            try:
                self._send(200, service.complete(req))
            except _BadRequest as e:
                self._error(400, str(e))
            except Exception as e:  # noqa: BLE001  (a server answers, it does not die)
                self._error(500, f"{type(e).__name__}: {e}", "server_error")

    return Handler


def serve_cloud(
    params: dict,
    cfg: ModelConfig,
    tokenizer,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    lora: LoRA | None = None,
    model_name: str = "floe-cloud",
    max_logprobs: int = 20,
    block: bool = True,
) -> ThreadingHTTPServer:
    """Serves a floe_jax model + tokenizer as an OpenAI-compatible completions server.

    `port=0` picks a free port (read `server.server_address`). With `block=False` the server runs
    on a daemon thread and is returned at once; call `server.shutdown()` to stop it.
    """
    service = CloudService(
        params, cfg, tokenizer, lora=lora, model_name=model_name, max_logprobs=max_logprobs
    )
    server = ThreadingHTTPServer((host, port), _handler(service))
    server.daemon_threads = True
    server.service = service  # type: ignore[attr-defined]
    if block:
        try:
            server.serve_forever()
        finally:
            server.server_close()
    else:
        threading.Thread(target=server.serve_forever, daemon=True, name="serve_cloud").start()
    return server
