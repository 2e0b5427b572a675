"""The batching LLM engine: requests arrive from any thread; one worker thread owns the model.

In the spirit of vLLM's engine core, the transport only calls `add` (with a thread-safe sink for the
request's outputs) and lets a request's `stopped()` turn true to abort it. The worker takes every
request waiting when it is free that shares the first one's compression config (up to `max_batch`
requests and `max_batch_tokens` prompt tokens), prefills them together (left-padded; each row is
pruned by its own items' schedule) and decodes them together. A row leaves the batch on EOS, on its
token limit or when stopped, and its rows are dropped from every layer's KV cache; the batch runs
until its last row leaves. Requests that arrive meanwhile wait for the next batch.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from luvc_common.compression.config import CompressionConfig
from luvc_common.compression.visual import VisualTokens
from luvc_common.engine.language import LanguageEngine, PrefillState, Request


@dataclass
class Output:
    """What one engine step produced for one request."""

    token_ids: list[int]
    """New tokens (EOS excluded)."""
    finished: str | None = None
    """None while running; "eos", "length" or "stopped" on its last output; "error" if the batch failed."""
    visual_per_layer: list[int] | None = None
    """Visual tokens entering each decoder layer (first output only)."""
    prefill_ms: float = 0.0
    """Prefill of the request's batch (first output only)."""
    batch_size: int = 0
    """Requests prefilled together with this one, itself included (first output only)."""
    error: BaseException | None = None


@dataclass
class EngineRequest:
    input_ids: list[int]
    visual: VisualTokens
    compression: CompressionConfig
    max_new_tokens: int
    emit: Callable[[Output], None]
    """Called on the worker thread with each Output; must not block."""
    stopped: Callable[[], bool] = lambda: False
    """Polled between steps: true once the client cancelled or the deadline passed."""
    generated: int = field(default=0, init=False)


def drop_rows(state: PrefillState, keep: list[int]) -> None:
    """Keep only rows `keep` of a running batch: every layer's KV cache, masks and positions."""
    index = torch.tensor(keep, device=state.next_position.device)
    for layer in state.cache.layers:
        layer.batch_select_indices(index.to(layer.keys.device))
    state.layer_valid = [valid[index.to(valid.device)] for valid in state.layer_valid]
    state.next_position = state.next_position[index]


class BatchingEngine:
    def __init__(self, engine: LanguageEngine, max_batch: int = 16, max_batch_tokens: int = 32768):
        self.engine = engine
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        eos = engine.config.text_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self._waiting: deque[EngineRequest] = deque()
        self._wake = threading.Condition()
        self._running = 0
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._worker.start()

    def add(self, *requests: EngineRequest) -> None:
        """Queue requests (several at once: they can share the next batch)."""
        with self._wake:
            self._waiting.extend(requests)
            self._wake.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(requests waiting, requests in the running batch)."""
        return len(self._waiting), self._running

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join()

    def _next_batch(self) -> list[EngineRequest]:
        """Block until requests wait; take the first and every later one with the same compression, within the limits."""
        with self._wake:
            while not self._waiting and not self._closed:
                self._wake.wait()
            if self._closed:
                return []
            batch, tokens, rest = [], 0, deque()
            while self._waiting:
                r = self._waiting.popleft()
                fits = len(batch) < self.max_batch and (not batch or tokens + len(r.input_ids) <= self.max_batch_tokens)
                if fits and (not batch or r.compression == batch[0].compression):
                    batch.append(r)
                    tokens += len(r.input_ids)
                else:
                    rest.append(r)
            self._waiting = rest
            self._running = len(batch)
            return batch

    def _loop(self) -> None:
        while batch := self._next_batch():
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - every request of a failed batch gets the error
                for r in batch:
                    r.emit(Output([], "error", error=e))
            finally:
                self._running = 0

    @torch.no_grad()
    def _run(self, batch: list[EngineRequest]) -> None:
        t0 = time.perf_counter()
        state = self.engine.prefill([Request(r.input_ids, r.visual) for r in batch], batch[0].compression)
        logits = state.logits
        prefill_ms = (time.perf_counter() - t0) * 1e3
        rows, first = list(batch), True
        while rows:
            tokens = logits.argmax(-1).cpu()
            keep = []
            for i, (r, token) in enumerate(zip(rows, tokens.tolist())):
                out = Output([])
                if first:  # rows are still the whole batch, in order
                    out.visual_per_layer, out.prefill_ms, out.batch_size = state.visual_per_layer[i], prefill_ms, len(batch)
                if r.stopped():
                    out.finished = "stopped"
                elif token in self.eos:
                    out.finished = "eos"
                else:
                    out.token_ids = [token]
                    r.generated += 1
                    out.finished = "length" if r.generated >= r.max_new_tokens else None
                r.emit(out)
                if out.finished is None:
                    keep.append(i)
            first = False
            if len(keep) < len(rows) and keep:
                drop_rows(state, keep)
                tokens = tokens[keep]
            rows = [rows[i] for i in keep]
            self._running = len(rows)
            if rows:
                logits = self.engine.decode_step(state, tokens)
