"""The batching LLM engine: requests arrive from any thread; one worker thread owns the model.

In the spirit of vLLM's engine core, the transport only calls `add` (with a thread-safe sink for the
request's outputs) and lets a request's `stopped()` turn true to abort it. The worker loops over
steps. At each step boundary it takes the first waiting request and every other waiting one with the
same compression config (up to `max_batch` rows in all and `max_batch_tokens` prompt tokens),
prefills them together (left-padded; each row pruned by its own items' schedule) and joins them to
the running batch: nothing is pruned during decode, so rows of any method decode together, their
per-layer KV caches concatenated with left padding. Then one token is chosen for every row and one
decode step runs. A row leaves on EOS, on its token limit or when stopped, and is dropped from every
layer's cache.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from luvc_common.compression.config import CompressionConfig
from luvc_common.compression.visual import VisualTokens
from luvc_common.config import Limits
from luvc_common.engine.language import LanguageEngine, PrefillState, Request
from luvc_common.engine.media import MediaFiles
from luvc_common.engine.pipeline import VisionEncoder


@dataclass
class Output:
    """What one engine step produced for one request."""

    token_ids: list[int]
    """New tokens (EOS excluded unless the request ignores EOS)."""
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
    ignore_eos: bool = False
    """Generate exactly max_new_tokens, EOS included (benchmarks: every request the same length)."""
    generated: int = field(default=0, init=False)


def drop_rows(state: PrefillState, keep: list[int]) -> None:
    """Keep only rows `keep` of a running batch: every layer's KV cache, masks and positions."""
    index = torch.tensor(keep, device=state.next_position.device)
    for layer in state.cache.layers:
        layer.batch_select_indices(index.to(layer.keys.device))
    state.layer_valid = [valid[index.to(valid.device)] for valid in state.layer_valid]
    state.next_position = state.next_position[index]


def _left_pad(x: Tensor, length: int, dim: int) -> Tensor:
    pad = [0, 0] * (x.dim() - 1 - dim) + [length - x.shape[dim], 0]
    return F.pad(x, pad, value=False if x.dtype == torch.bool else 0)


def join_rows(state: PrefillState, new: PrefillState) -> None:
    """Append `new`'s rows to a running batch: per layer, both caches left-padded to the longer one
    (padding is masked out, and rotary positions are already in the keys)."""
    for layer, (mine, theirs) in enumerate(zip(state.cache.layers, new.cache.layers)):
        length = max(mine.keys.shape[2], theirs.keys.shape[2])
        mine.keys, mine.values = (torch.cat([_left_pad(a, length, 2), _left_pad(b, length, 2)])
                                  for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)))
        valid, other = state.layer_valid[layer], new.layer_valid[layer]
        state.layer_valid[layer] = torch.cat([_left_pad(valid, length, 1), _left_pad(other.to(valid.device), length, 1)])
    state.next_position = torch.cat([state.next_position, new.next_position])


@dataclass
class _Row:
    request: EngineRequest
    first: Output | None
    """Metadata for the row's first output, until it is sent."""


class _QueueWorker:
    """Jobs queued from any thread, served by one daemon worker thread running `_loop`."""

    def __init__(self, name: str):
        self._waiting: deque = deque()
        self._wake = threading.Condition()
        self._running = 0
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    def _put(self, *jobs) -> None:
        with self._wake:
            self._waiting.extend(jobs)
            self._wake.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(jobs waiting, jobs being computed)."""
        return len(self._waiting), self._running

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join()

    def _group(self, room: int, budget: int, cost: Callable, block: bool) -> list | None:
        """The first waiting job and every later one with the same compression, at most `room` jobs and
        `budget` in summed cost (the first job alone may exceed it). Blocks while nothing waits and
        `block`; None once closed."""
        with self._wake:
            while block and not self._waiting and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            group, total, rest = [], 0, deque()
            while self._waiting:
                job = self._waiting.popleft()
                c = cost(job)
                fits = len(group) < room and (not group or total + c <= budget)
                if fits and (not group or job.compression == group[0].compression):
                    group.append(job)
                    total += c
                else:
                    rest.append(job)
            self._waiting = rest
            return group

    def _loop(self) -> None:
        raise NotImplementedError


class BatchingEngine(_QueueWorker):
    def __init__(self, engine: LanguageEngine, max_batch: int = 16, max_batch_tokens: int = 32768):
        self.engine = engine
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        eos = engine.config.text_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.kv_cache_bytes = 0
        """Bytes of the running batch's KV cache (padding included), as of the last step."""
        super().__init__("llm-engine")

    def add(self, *requests: EngineRequest) -> None:
        """Queue requests (several at once: they can share one prefill)."""
        self._put(*requests)

    def _loop(self) -> None:
        state, rows, logits = None, [], None
        while (group := self._group(self.max_batch - len(rows), self.max_batch_tokens, lambda r: len(r.input_ids), not rows)) is not None:
            if group:
                try:
                    new, prefill_ms = self._prefill(group)
                except Exception as e:  # noqa: BLE001 - the group's requests get the error; running rows go on
                    for r in group:
                        r.emit(Output([], "error", error=e))
                else:
                    if state is None:
                        state, logits = new, new.logits
                    else:
                        join_rows(state, new)
                        logits = torch.cat([logits, new.logits.to(logits.device)])
                    rows += [_Row(r, Output([], visual_per_layer=v, prefill_ms=prefill_ms, batch_size=len(group)))
                             for r, v in zip(group, new.visual_per_layer)]
            self._running = len(rows)
            if not rows:
                continue
            try:
                state, rows, logits = self._step(state, rows, logits)
            except Exception as e:  # noqa: BLE001 - every running request gets the error
                for row in rows:
                    row.request.emit(Output([], "error", error=e))
                state, rows, logits = None, [], None
            self._running = len(rows)
            self.kv_cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in state.cache.layers) if state else 0

    @torch.no_grad()
    def _prefill(self, group: list[EngineRequest]) -> tuple[PrefillState, float]:
        """The group's prefill state and its time in ms."""
        t0 = time.perf_counter()
        state = self.engine.prefill([Request(r.input_ids, r.visual) for r in group], group[0].compression)
        state.logits.cpu()  # waits for the device
        return state, (time.perf_counter() - t0) * 1e3

    @torch.no_grad()
    def _step(self, state: PrefillState, rows: list[_Row], logits: Tensor):
        """Choose every row's next token, send it, drop the rows that finished, decode the rest one step."""
        tokens = logits.argmax(-1).cpu()
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            out, row.first, r = row.first or Output([]), None, row.request
            if r.stopped():
                out.finished = "stopped"
            elif token in self.eos and not r.ignore_eos:
                out.finished = "eos"
            else:
                out.token_ids = [token]
                r.generated += 1
                out.finished = "length" if r.generated >= r.max_new_tokens else None
            r.emit(out)
            if out.finished is None:
                keep.append(i)
        if not keep:
            return None, [], None
        if len(keep) < len(rows):
            drop_rows(state, keep)
        return state, [rows[i] for i in keep], self.engine.decode_step(state, tokens[keep])


class Cancelled(Exception):
    """An encode request stopped (cancel or deadline) before its batch finished."""


@dataclass
class EncodeJob:
    files: list[MediaFiles]
    compression: CompressionConfig
    stopped: Callable[[], bool] = lambda: False
    result: Future = field(default_factory=Future)
    """EncodedMedia of the job's media, or the exception that ended it (Cancelled when stopped)."""


class EncoderBatcher(_QueueWorker):
    """The vision tower on one worker thread: media of every waiting request with the first one's
    compression (up to `max_batch` requests and `limits.max_vit_patches` patches in all) are decoded
    and encoded as one packed forward (each item still its own attention segment, merged and pruned
    on its own grid), then split back per request. A stopped request is skipped before its media are
    decoded; the forward stops only when every request in it has stopped."""

    def __init__(self, encoder: VisionEncoder, limits: Limits, max_batch: int = 8):
        self.encoder, self.limits, self.max_batch = encoder, limits, max_batch
        super().__init__("encoder-engine")

    def submit(self, job: EncodeJob) -> Future:
        self._put(job)
        return job.result

    def _loop(self) -> None:
        while (group := self._group(self.max_batch, self.limits.max_vit_patches, lambda j: self.encoder.patches(j.files), True)) is not None:
            self._running = len(group)
            try:
                self._encode(group)
            except BaseException as e:  # noqa: BLE001 - every unfinished job of the batch gets the error
                for job in group:
                    if not job.result.done():
                        job.result.set_exception(e)
            finally:
                self._running = 0

    def _encode(self, group: list[EncodeJob]) -> None:
        live, media = [], []
        for job in group:
            try:
                media.append(self.encoder.decode(job.files, self.limits, lambda job=job: _raise_if(job.stopped())))
                live.append(job)
            except Cancelled as e:
                job.result.set_exception(e)
            except Exception as e:  # noqa: BLE001 - a bad file fails its own request only
                job.result.set_exception(e)
        if not live:
            return
        every_stopped = lambda: _raise_if(all(job.stopped() for job in live))  # noqa: E731
        encoded = self.encoder.encode([m for items in media for m in items], live[0].compression, every_stopped)
        for job, part in zip(live, encoded.split([len(items) for items in media], self.encoder.unit)):
            job.result.set_result(part)


def _raise_if(stopped: bool) -> None:
    if stopped:
        raise Cancelled
