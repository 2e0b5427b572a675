"""`luvc load`: a load generator through the real client, one concurrency level after another.

At each level, `concurrency` clients (one channel each) send requests back to back until `--requests`
have been sent or `--max-seconds` have passed; every request is streamed, so time to first token is
the first chunk with tokens. Per level: requests/s and generated tokens/s over the level's wall time,
p50/p95/p99 TTFT and latency of the answered requests, and every status code. `--precomputed` encodes
the image once through the encoder and then sends its visual tokens with every request, so the LLM
stage is measured without the encoder. `--ignore-eos` makes every answer exactly --max-new-tokens long
(methods then compare on equal work). `--metrics URL` scrapes a Prometheus endpoint twice a second
during each level and reports how many scrapes answered, failed, and their p95 time.

    luvc load --target 127.0.0.1:50051 --concurrency 1,4,16 --requests 64 --json load.json --plot load.png
"""
from __future__ import annotations

import argparse
import json
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from luvc_common.errors import UserError
from luvc_common.research.evaluate import int_at_least, positive_int

DEMO_IMAGE = Path(__file__).resolve().parents[2] / "assets" / "demo.png"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _one(client, request: dict, timeout: float) -> dict:
    """One streamed request: its status code, TTFT and latency in ms, and generated tokens."""
    import grpc

    t0, first, tokens = time.perf_counter(), None, 0
    try:
        for chunk in client.stream(**request, timeout=timeout):
            if chunk.token_ids and first is None:
                first = time.perf_counter()
            tokens += len(chunk.token_ids)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    end = time.perf_counter()
    return {"code": code, "tokens": tokens, "latency_ms": (end - t0) * 1e3, "ttft_ms": None if first is None else (first - t0) * 1e3}


def run_level(target: str, options, request: dict, concurrency: int, requests: int, max_seconds: float, timeout: float,
              on_done=lambda: None) -> list[dict]:
    """Outcomes of up to `requests` requests sent by `concurrency` clients, each sending back to back."""
    from luvc_common.client import LUVCClient

    sent, lock, outcomes, end = 0, threading.Lock(), [], time.monotonic() + max_seconds

    def client_loop():
        nonlocal sent
        with LUVCClient(target, options) as client:
            while True:
                with lock:
                    if sent >= requests or time.monotonic() >= end:
                        return
                    sent += 1
                outcome = _one(client, request, timeout)
                with lock:
                    outcomes.append(outcome)
                on_done()

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    return outcomes


class Scraper:
    """Within its `with` block, scrapes Prometheus endpoints every `period` s on a thread (none without URLs)."""

    def __init__(self, urls: list[str], period: float = 0.5):
        self.urls, self.period, self._stop = urls, period, threading.Event()
        self.times: dict[str, list[float]] = {u: [] for u in urls}
        self.failed: Counter = Counter()

    def _run(self) -> None:
        import urllib.request

        while not self._stop.is_set():
            for url in self.urls:
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(url, timeout=5) as reply:
                        if b"# TYPE" not in reply.read():
                            raise ValueError("not a metrics page")
                    self.times[url].append((time.perf_counter() - t0) * 1e3)
                except (OSError, ValueError):
                    self.failed[url] += 1
            self._stop.wait(self.period)

    def __enter__(self) -> "Scraper":
        self._thread = threading.Thread(target=self._run, daemon=True) if self.urls else None
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def report(self) -> dict:
        return {u: {"scrapes": len(t) + self.failed[u], "failed": self.failed[u], "p95_ms": percentile(t, 95)} for u, t in self.times.items()}


def summarise(outcomes: list[dict], wall_s: float, method: str, concurrency: int) -> dict:
    ok = [o for o in outcomes if o["code"] == "OK"]
    ttft = [o["ttft_ms"] for o in ok if o["ttft_ms"] is not None]
    latency = [o["latency_ms"] for o in ok]
    row = {"method": method, "concurrency": concurrency, "requests": len(outcomes), "wall_s": wall_s,
           "req_s": len(ok) / wall_s, "tok_s": sum(o["tokens"] for o in ok) / wall_s,
           "codes": dict(Counter(o["code"] for o in outcomes))}
    for q in (50, 95, 99):
        row[f"ttft_p{q}_ms"], row[f"latency_p{q}_ms"] = percentile(ttft, q), percentile(latency, q)
    return row


def load(target: str, concurrency: list[int], requests: int, method: str = "luvc", image: Path = DEMO_IMAGE,
         prompt: str = "What color is the circle?", max_new_tokens: int = 16, encoder: str | None = None,
         token: str | None = None, max_seconds: float = 300.0, timeout: float = 120.0, progress: bool = True,
         ignore_eos: bool = False, metrics: list[str] = ()) -> dict:
    """Run every concurrency level; `encoder` set: precomputed visual tokens (encoded once, here)."""
    from tqdm import tqdm

    from luvc_common.client import ClientOptions, LUVCClient, image_file

    options = ClientOptions(token=token)
    request = dict(prompt=prompt, method=method, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    if encoder:
        with LUVCClient(encoder, options) as client:
            request["visual"] = client.encode([image_file(image)], method=method, timeout=timeout)
    else:
        request["media"] = [image_file(image)]
    results = []
    with tqdm(total=requests * len(concurrency), desc=f"load {method}", unit="req", disable=not progress) as bar:
        for level in concurrency:
            t0 = time.perf_counter()
            with Scraper(list(metrics)) as scraper:
                outcomes = run_level(target, options, request, level, requests, max_seconds, timeout, lambda: bar.update())
            results.append(summarise(outcomes, time.perf_counter() - t0, method, level))
            if metrics:
                results[-1]["metrics"] = scraper.report()
    return {"target": target, "precomputed": bool(encoder), "image": str(image), "max_new_tokens": max_new_tokens,
            "ignore_eos": ignore_eos, "results": results}


def format_table(report: dict) -> str:
    head = f"{'method':<10} {'conc':>4} {'req/s':>7} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9} {'lat p95':>9}  codes"
    ms = lambda v: "-" if v is None else f"{v:.0f}ms"  # noqa: E731
    rows = [f"{r['method']:<10} {r['concurrency']:>4} {r['req_s']:>7.2f} {r['tok_s']:>8.1f} {ms(r['ttft_p50_ms']):>9} "
            f"{ms(r['ttft_p95_ms']):>9} {ms(r['latency_p95_ms']):>9}  {r['codes']}" + _scrapes(r) for r in report["results"]]
    return "\n".join([head, *rows])


def _scrapes(row: dict) -> str:
    return "".join(f"  /metrics {m['scrapes'] - m['failed']}/{m['scrapes']} answered (p95 {m['p95_ms'] or 0:.0f}ms)"
                   for m in row.get("metrics", {}).values())


def plot(reports: list[dict], out: str | Path) -> None:
    """Generated tokens/s against concurrency, one line per method (and precomputed or not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for report in reports:
        rows = report["results"]
        label = rows[0]["method"] + (" (LLM only)" if report["precomputed"] else "")
        ax.plot([r["concurrency"] for r in rows], [r["tok_s"] for r in rows], marker="o", label=label)
    ax.set(xscale="log", xlabel="concurrent clients", ylabel="generated tokens / s", title="luvc load")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def _levels(value: str) -> list[int]:
    return [positive_int(v) for v in value.split(",") if v.strip()]


def add_load_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("load", help="load-test a running LLM service through the client",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="the LLM service")
    p.add_argument("--concurrency", type=_levels, default=[1, 4, 16, 64], help="comma-separated client counts")
    p.add_argument("--requests", type=positive_int, default=64, help="requests per concurrency level")
    p.add_argument("--method", action="append", help="method spec (repeat for several; default luvc)")
    p.add_argument("--image", type=Path, default=DEMO_IMAGE)
    p.add_argument("--prompt", default="What color is the circle?")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=16)
    p.add_argument("--ignore-eos", action="store_true", help="every answer exactly --max-new-tokens long")
    p.add_argument("--metrics", action="append", default=[], metavar="URL",
                   help="a Prometheus endpoint to scrape during each level (repeat for several)")
    p.add_argument("--precomputed", action="store_true", help="encode the image once at --encoder, then send its visual tokens "
                   "with every request: the LLM stage alone")
    p.add_argument("--encoder", metavar="HOST:PORT", help="the encoder service (for --precomputed)")
    p.add_argument("--token", help="bearer token for both services")
    p.add_argument("--max-seconds", type=float, default=300.0, help="per level: stop sending new requests after this")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each request")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--plot", metavar="PNG")
    p.set_defaults(func=cmd_load)
    return p


def cmd_load(args: argparse.Namespace) -> int:
    if args.precomputed and not args.encoder:
        raise UserError("--precomputed needs --encoder HOST:PORT (where the image is encoded once)")
    encoder = args.encoder if args.precomputed else None
    reports = [load(args.target, args.concurrency, args.requests, method, args.image, args.prompt, args.max_new_tokens,
                    encoder, args.token, args.max_seconds, args.timeout, ignore_eos=args.ignore_eos, metrics=args.metrics)
               for method in args.method or ["luvc"]]
    for report in reports:
        print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": [r for rep in reports for r in rep["results"]], "runs": reports}, indent=2) + "\n")
    if args.plot:
        plot(reports, args.plot)
    return 0
