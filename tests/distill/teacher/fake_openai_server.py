"""A small OpenAI-compatible HTTP server for tests (127.0.0.1 only), backed by a tiny deterministic model.

The model is a tiny random ``LlamaForCausalLM`` with a word-level tokenizer trained in process on a
few sentences (no download). Every response carries *real* log-probs of that model: the raw
distribution (log-softmax of the logits, temperature 1) whatever the sampling temperature, like
vLLM's default ``raw_logprobs`` mode.

Two flavours:

* ``"vllm"``: ``/v1/models`` says ``owned_by: vllm`` and ``max_model_len``; honours
  ``return_tokens_as_token_ids`` / ``return_token_ids`` / ``top_k``; per-position ``top_logprobs``
  dicts also hold the sampled token (k+1 entries when it is outside the top-k), as vLLM does.
* ``"openai"``: strict like api.openai.com: unknown (vLLM-only) parameters are a 400, and
  ``top_logprobs`` is capped at 20.

Knobs for tests: ``api_key`` (401 without ``Authorization: Bearer <key>``), ``fail_next`` (answer
the next N POSTs with 503), ``delay_s`` (per-request latency, to observe concurrency),
``reject_word`` (a 400 for any request whose prompt or messages contain it); the server
records every request (``requests``) and the peak number handled at once (``max_in_flight``).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

SENTENCES = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran in the park with a red ball today",
    "what is the capital of france ? paris is the capital",
    "tell me a short story about a brave little robot",
    "the robot found a blue flower in the old garden",
    "please explain why the sky is blue in simple words",
    "one two three four five six seven eight nine ten",
]
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VLLM_ONLY_PARAMS = {"return_tokens_as_token_ids", "return_token_ids", "top_k", "prompt_logprobs"}
KNOWN_PARAMS = {
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "logprobs",
    "top_logprobs",
    "echo",
    "n",
    "stream",
}


def build_tokenizer(out_dir: str | Path) -> str:
    """Train a word-level tokenizer on :data:`SENTENCES`, save it with a chat template; returns the dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(SENTENCES, trainer=trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return str(out_dir)


def build_model(tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    """A tiny random LLaMA; a wide init spreads its distributions so top-k has no near ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


class TinyLM:
    """The model behind the server; ``position_logprobs`` is also the tests' direct forward pass."""

    def __init__(self, tokenizer_dir: str, seed: int = 0):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model = build_model(self.tokenizer, seed)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.lock = threading.Lock()

    @torch.inference_mode()
    def position_logprobs(self, ids: list[int]) -> torch.Tensor:
        """[L, V] raw log-probs: row i is the distribution over token i+1 given tokens 0..i."""
        with self.lock:
            logits = self.model(input_ids=torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def generate(
        self, prompt_ids: list[int], *, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None
    ) -> tuple[list[int], list[torch.Tensor], str]:
        """(generated ids, the raw [V] log-probs of each step, finish reason)."""
        ids, out, rows = list(prompt_ids), [], []
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        for _ in range(max_tokens):
            logprobs = self.position_logprobs(ids)[-1]
            if temperature <= 0:
                token = int(torch.argmax(logprobs))
            else:
                probs = torch.softmax(logprobs / temperature, dim=-1)
                if top_k:
                    probs[probs < torch.topk(probs, top_k).values[-1]] = 0
                if top_p < 1:
                    sorted_p, order = torch.sort(probs, descending=True)
                    drop = torch.cumsum(sorted_p, 0) - sorted_p > top_p
                    probs[order[drop]] = 0
                token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
            out.append(token)
            rows.append(logprobs)
            ids.append(token)
            if token == self.eos_id:
                return out, rows, "stop"
        return out, rows, "length"


class FakeOpenAIServer:
    def __init__(
        self,
        lm: TinyLM,
        *,
        model_name: str = "tiny-teacher",
        flavor: str = "vllm",
        api_key: str | None = None,
        max_model_len: int = 64,
        delay_s: float = 0.0,
        reject_word: str | None = None,
    ):
        self.lm = lm
        self.model_name = model_name
        self.flavor = flavor
        self.api_key = api_key
        self.max_model_len = max_model_len
        self.delay_s = delay_s
        self.reject_word = reject_word
        self.fail_next = 0
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                status, body = server.handle("GET", self.path, dict(self.headers), None)
                self._send(status, body)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, body = server.handle("POST", self.path, dict(self.headers), raw)
                self._send(status, body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- requests ----------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], raw: bytes | None) -> tuple[int, dict]:
        headers = {k.lower(): v for k, v in headers.items()}
        body = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                return 400, _error("body is not JSON")
        with self._lock:
            self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
                return 401, _error("Incorrect API key provided", code="invalid_api_key")
            if method == "GET" and path.rstrip("/") == "/v1/models":
                return 200, self._models()
            if method != "POST":
                return 404, _error(f"no route {method} {path}")
            with self._lock:
                if self.fail_next > 0:
                    self.fail_next -= 1
                    return 503, _error("overloaded, try again")
            if not isinstance(body, dict):
                return 400, _error("missing JSON body")
            if self.flavor == "openai":
                unknown = sorted(set(body) - KNOWN_PARAMS)
                if unknown:
                    return 400, _error(f"Unrecognized request argument supplied: {', '.join(unknown)}")
            if self.reject_word and self.reject_word in self._prompt_text(body):
                return 400, _error("This request was rejected by the content policy.", code="content_policy")
            if body.get("model") != self.model_name:
                return 404, _error(f"The model `{body.get('model')}` does not exist.")
            if path.rstrip("/") == "/v1/completions":
                return self._completions(body)
            if path.rstrip("/") == "/v1/chat/completions":
                return self._chat(body)
            return 404, _error(f"no route {path}")
        finally:
            with self._lock:
                self.in_flight -= 1

    def _prompt_text(self, body: dict[str, Any]) -> str:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = self.lm.tokenizer.decode([int(t) for t in prompt])
        return f"{prompt or ''} {json.dumps(body.get('messages') or [])}"

    def _models(self) -> dict[str, Any]:
        entry = {"id": self.model_name, "object": "model", "owned_by": "vllm" if self.flavor == "vllm" else "org"}
        if self.flavor == "vllm":
            entry["max_model_len"] = self.max_model_len
        return {"object": "list", "data": [entry]}

    def _token_str(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.lm.tokenizer.convert_ids_to_tokens(token_id)

    def _top(self, logprobs: torch.Tensor, k: int, sampled: int | None) -> list[tuple[int, float]]:
        values, ids = torch.topk(logprobs, k)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
        if self.flavor == "vllm" and sampled is not None and sampled not in {i for i, _ in top}:
            top = [(sampled, float(logprobs[sampled]))] + top  # vLLM puts the sampled token first
        return top

    def _check_len(self, prompt_ids: list[int], max_tokens: int) -> tuple[int, dict] | None:
        if len(prompt_ids) + max_tokens > self.max_model_len:
            return 400, _error(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                f"messages, {max_tokens} in the completion)."
            )
        return None

    def _run(self, prompt_ids: list[int], body: dict[str, Any]):
        return self.lm.generate(
            prompt_ids,
            max_tokens=int(body.get("max_tokens", 16)),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            top_k=int(body.get("top_k") or 0),
            seed=body.get("seed"),
        )

    def _completions(self, body: dict[str, Any]) -> tuple[int, dict]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            prompt_ids = list(prompt)
        elif isinstance(prompt, str) and prompt:
            prompt_ids = self.lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            return 400, _error("Either prompt or prompt_embeds must be provided and non-empty.")
        k = body.get("logprobs")
        if k is not None and k > 20:
            return 400, _error(f"Requested sample logprobs of {k}, which is greater than max allowed: 20")
        max_tokens = int(body.get("max_tokens", 16))
        too_long = self._check_len(prompt_ids, max_tokens)
        if too_long:
            return too_long
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        gen, rows, finish = self._run(prompt_ids, body) if max_tokens > 0 else ([], [], "length")
        text = self.lm.tokenizer.decode(gen, skip_special_tokens=True)
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if k is not None:
            tokens, token_lps, tops = [], [], []
            if body.get("echo"):
                prompt_rows = self.lm.position_logprobs(prompt_ids)
                for pos, tid in enumerate(prompt_ids):
                    tokens.append(self._token_str(tid, as_ids))
                    if pos == 0:
                        token_lps.append(None)
                        tops.append(None)
                    else:
                        row = prompt_rows[pos - 1]
                        token_lps.append(float(row[tid]))
                        tops.append({self._token_str(i, as_ids): v for i, v in self._top(row, k, tid)})
            for tid, row in zip(gen, rows):
                tokens.append(self._token_str(tid, as_ids))
                token_lps.append(float(row[tid]))
                tops.append({self._token_str(i, as_ids): v for i, v in self._top(row, k, tid)})
            choice["logprobs"] = {
                "tokens": tokens,
                "token_logprobs": token_lps,
                "top_logprobs": tops,
                "text_offset": list(range(len(tokens))),
            }
        if body.get("return_token_ids"):
            choice["token_ids"] = gen
            choice["prompt_token_ids"] = prompt_ids
        return 200, {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(gen),
                "total_tokens": len(prompt_ids) + len(gen),
            },
        }

    def _chat(self, body: dict[str, Any]) -> tuple[int, dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, _error("messages must be a non-empty list")
        encoded = self.lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt_ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        if k > 20:
            return 400, _error(f"top_logprobs must be <= 20, got {k}")
        too_long = self._check_len(prompt_ids, int(body.get("max_tokens", 16)))
        if too_long:
            return too_long
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        gen, rows, finish = self._run(prompt_ids, body)
        text = self.lm.tokenizer.decode(gen, skip_special_tokens=True)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
        if body.get("logprobs"):
            content = []
            for tid, row in zip(gen, rows):
                token = self._token_str(tid, as_ids)
                # vLLM's chat endpoint keeps the *first* k entries (sampled token first): emulate it.
                tops = self._top(row, k, tid)[:k] if k else []
                content.append(
                    {
                        "token": token,
                        "logprob": float(row[tid]),
                        "bytes": list(token.encode()),
                        "top_logprobs": [
                            {
                                "token": self._token_str(i, as_ids),
                                "logprob": v,
                                "bytes": list(self._token_str(i, as_ids).encode()),
                            }
                            for i, v in tops
                        ],
                    }
                )
            choice["logprobs"] = {"content": content}
        response: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(gen),
                "total_tokens": len(prompt_ids) + len(gen),
            },
        }
        if body.get("return_token_ids"):
            choice["token_ids"] = gen
            response["prompt_token_ids"] = prompt_ids
        return 200, response


def _error(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}
