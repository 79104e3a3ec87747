"""Helpers shared by the inference tests: tiny tokenizers, models and local HTTP servers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from floe_jax.config import ModelConfig
from floe_jax.model import init_params

TEXT_A = [
    "the quick brown fox jumps over the lazy dog",
    "the cat sat on the mat and the dog sat on the log",
    "federated learning keeps the data on the device",
    "small models run on the edge and large models in the cloud",
] * 4
TEXT_B = [
    "the cloud model answers the question in the cloud",
    "a large language model fuses logits with a small model",
    "the dog and the cat play in the garden near the house",
    "privacy matters: the data stays on the device",
] * 4


def bytelevel_tokenizer(texts=TEXT_A, vocab_size=300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def metaspace_tokenizer(texts=TEXT_B, vocab_size=200) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def tiny_model(vocab: int, seed: int, layers: int = 2):
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
    )
    return cfg, init_params(cfg, key=jax.random.key(seed))


RECORDED_VOCAB = {" the": 0, " a": 1, "x": 2}  # the tokens RecordingServer's answers name


class RecordingServer:
    """A real HTTP server on 127.0.0.1 that records every request body and answers with `mode`:
    `ok` (a valid top-k reply), `500`, `garbage`, `nan`, `hang` (never answers until closed)."""

    def __init__(self, mode: str = "ok"):
        self.mode, self.bodies = mode, []
        self.release = threading.Event()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                outer.bodies.append(body)
                if outer.mode == "hang":
                    outer.release.wait(10)
                    return
                if outer.mode == "500":
                    data, code = b'{"error": "boom"}', 500
                elif outer.mode == "garbage":
                    data, code = b"<html>not json", 200
                elif outer.mode == "nan":
                    data, code = b'{"choices":[{"logprobs":{"top_logprobs":[{"a": NaN}]}}]}', 200
                else:
                    top = {" the": -0.5, " a": -1.5, "x": -3.0}
                    data = json.dumps({"choices": [{"logprobs": {"top_logprobs": [top]}}]})
                    data, code = data.encode(), 200
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
