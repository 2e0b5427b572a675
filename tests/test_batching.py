"""The batching engine: requests prefilled and decoded together return, token for token, what each
returns alone (prefilled together or joined during decode); a stopped row leaves without disturbing the others."""
import threading

import pytest
import torch

from luvc_common.compression.methods import method_config
from luvc_common.config import ModelConfig
from luvc_common.engine.batching import BatchingEngine, EngineRequest
from luvc_common.engine.pipeline import Pipeline

QUESTIONS = ["What color is the circle?", "How many squares are there in this picture?", "Where is it?",
             "What is written on the left of the image, and what color is it?"]


@pytest.fixture(scope="module")
def pipeline(tiny_qwen2vl):
    return Pipeline(ModelConfig(tiny_qwen2vl))


def _collect(engine: BatchingEngine, jobs: list[dict]) -> list[dict]:
    """Run jobs through the engine (all queued at once); per job its tokens and outputs."""
    done = [threading.Event() for _ in jobs]
    results = [{"tokens": [], "outputs": []} for _ in jobs]

    def sink(i):
        def emit(out):
            results[i]["tokens"] += out.token_ids
            results[i]["outputs"].append(out)
            if out.finished:
                done[i].set()
        return emit

    engine.add(*[EngineRequest(j["ids"], j["encoded"], j["cfg"], j["max_new"], sink(i), j.get("stopped", lambda: False),
                               j.get("ignore_eos", False)) for i, j in enumerate(jobs)])
    for event in done:
        assert event.wait(300)
    return results


def _jobs(pipeline, demo_image, demo_video, spec: str) -> list[dict]:
    """Mixed prompt lengths, media (image, video, both, none) and token limits, one method."""
    cfg = method_config(spec)
    media = [[demo_image], [demo_video], [demo_image, demo_video], []]
    jobs = []
    for question, items, max_new in zip(QUESTIONS, media, (6, 3, 8, 5)):
        encoded = pipeline.encoder.encode(items, cfg)
        jobs.append({"ids": pipeline.generator.prompt_ids(question, encoded), "encoded": encoded, "cfg": cfg, "max_new": max_new,
                     "question": question})
    return jobs


@pytest.mark.parametrize("spec", ["luvc", "none", "fastv", "tome:keep=0.5"])
def test_a_batch_returns_what_each_request_returns_alone(pipeline, demo_image, demo_video, spec):
    jobs = _jobs(pipeline, demo_image, demo_video, spec)
    alone = [pipeline.generator.generate(j["question"], j["encoded"], j["cfg"], j["max_new"], ids=j["ids"]) for j in jobs]
    engine = BatchingEngine(pipeline.generator.engine)
    try:
        batched = _collect(engine, jobs)
    finally:
        engine.close()
    for a, b in zip(alone, batched):
        assert b["tokens"] == a.token_ids
        assert b["outputs"][0].visual_per_layer == a.visual_tokens["llm_per_layer"]
        assert b["outputs"][0].batch_size == len(jobs)  # prefilled together
        assert b["outputs"][-1].finished in ("eos", "length")


def test_requests_with_other_methods_are_prefilled_in_their_own_group(pipeline, demo_image, demo_video):
    luvc, none = _jobs(pipeline, demo_image, demo_video, "luvc")[:2], _jobs(pipeline, demo_image, demo_video, "none")[:2]
    engine = BatchingEngine(pipeline.generator.engine)
    try:
        results = _collect(engine, [luvc[0], none[0], luvc[1], none[1]])
    finally:
        engine.close()
    assert [r["outputs"][0].batch_size for r in results] == [2, 2, 2, 2]
    for job, r in zip([luvc[0], none[0], luvc[1], none[1]], results):
        alone = pipeline.generator.generate(job["question"], job["encoded"], job["cfg"], job["max_new"], ids=job["ids"])
        assert r["tokens"] == alone.token_ids


def test_a_stopped_row_leaves_and_the_others_are_undisturbed(pipeline, demo_image, demo_video):
    jobs = _jobs(pipeline, demo_image, demo_video, "luvc")
    for j in jobs:
        j["max_new"] = 8
    calls = {"n": 0}

    def stop_after_two_steps():
        calls["n"] += 1
        return calls["n"] > 2

    jobs[1]["stopped"] = stop_after_two_steps
    alone = [pipeline.generator.generate(j["question"], j["encoded"], j["cfg"], j["max_new"], ids=j["ids"]).token_ids for j in jobs]
    engine = BatchingEngine(pipeline.generator.engine)
    try:
        results = _collect(engine, jobs)
    finally:
        engine.close()
    assert results[1]["outputs"][-1].finished == "stopped" and results[1]["tokens"] == alone[1][: len(results[1]["tokens"])]
    assert len(results[1]["tokens"]) <= 2
    assert [r["tokens"] for i, r in enumerate(results) if i != 1] == [t for i, t in enumerate(alone) if i != 1]


def test_requests_arriving_during_decode_join_the_running_batch(pipeline, demo_image, demo_video):
    """A and B run; C (another method, another length) and D arrive after A's first tokens and join at a
    step boundary: everyone's tokens equal their answer alone, and C starts before A finishes."""
    luvc = _jobs(pipeline, demo_image, demo_video, "luvc")
    jobs = [dict(luvc[0], max_new=12), dict(luvc[1], max_new=12), _jobs(pipeline, demo_image, demo_video, "fastv")[2], luvc[3]]
    alone = [pipeline.generator.generate(j["question"], j["encoded"], j["cfg"], j["max_new"], ids=j["ids"]).token_ids for j in jobs]
    events, a_started, done = [], threading.Event(), [threading.Event() for _ in jobs]
    results = [[] for _ in jobs]

    kv_seen = []

    def sink(i):
        def emit(out):
            kv_seen.append(engine.kv_cache_bytes)
            results[i] += out.token_ids
            events.append((i, out.finished))
            if i == 0 and len(results[0]) >= 2:
                a_started.set()
            if out.finished:
                done[i].set()
        return emit

    requests = [EngineRequest(j["ids"], j["encoded"], j["cfg"], j["max_new"], sink(i)) for i, j in enumerate(jobs)]
    engine = BatchingEngine(pipeline.generator.engine)
    try:
        engine.add(*requests[:2])
        assert a_started.wait(300)
        engine.add(*requests[2:])
        for event in done:
            assert event.wait(300)
    finally:
        engine.close()
    assert results == alone
    assert events.index((2, None)) < events.index((0, "length"))  # C joined while A was decoding
    assert max(kv_seen) > 0 and engine.kv_cache_bytes == 0  # the running batch's cache, freed when it ends


def _files(paths: list, kind: str = "image"):
    from luvc_common.config import Limits
    from luvc_common.engine.media import MediaFiles, probe_image

    return MediaFiles(kind, [probe_image(p.read_bytes(), Limits(), str(p)) for p in paths])


@pytest.mark.parametrize("spec", ["luvc", "tome:keep=0.5", "random:keep=0.3", "visionzip"])
def test_an_encoder_batch_returns_what_each_request_returns_alone(pipeline, spec):
    """Media of several requests in one packed forward, split back per request, equal each encoded
    alone; a request stopped before its batch runs is skipped with Cancelled."""
    import conftest
    from luvc_common.config import Limits
    from luvc_common.engine.batching import Cancelled, EncodeJob, EncoderBatcher

    image, frames = conftest.ASSETS / "demo.png", sorted((conftest.ASSETS / "demo_video").glob("*.png"))
    requests = [[_files([image])], [_files(frames, "video"), _files([image])], [_files([image]), _files([image])]]
    encoder, limits, cfg = pipeline.encoder, Limits(), method_config(spec)
    alone = [encoder.encode(encoder.decode(files, limits), cfg) for files in requests]
    batcher = EncoderBatcher(encoder, limits)
    try:
        with batcher._wake:  # queue every job before the worker looks: one batch
            jobs = [EncodeJob(files, cfg) for files in requests] + [EncodeJob(requests[0], cfg, stopped=lambda: True)]
            futures = [batcher.submit(job) for job in jobs]
        results = [f.result(timeout=300) for f in futures[:-1]]
        with pytest.raises(Cancelled):
            futures[-1].result(timeout=300)
    finally:
        batcher.close()
    for a, b in zip(alone, results):
        assert b.grids == a.grids and b.kinds == a.kinds and b.vit_patches == a.vit_patches
        assert [None if c is None else c.tolist() for c in b.cells] == [None if c is None else c.tolist() for c in a.cells]
        assert torch.allclose(b.embeds, a.embeds, atol=1e-5)


def test_ignore_eos_generates_exactly_max_new_tokens(pipeline, demo_image, demo_video):
    """A row that ignores EOS goes on past it (the EOS id among its tokens); the same request beside it stops there."""
    job = {**_jobs(pipeline, demo_image, demo_video, "luvc")[0], "max_new": 6}
    engine = BatchingEngine(pipeline.generator.engine)
    try:
        (free,) = _collect(engine, [job])
        assert len(free["tokens"]) == 6, "the tiny model's answer must not end early for this check"
        eos = free["tokens"][2]
        engine.eos = {eos}  # the engine takes EOS from the config; here a token this answer is known to contain plays it
        stops, goes_on = _collect(engine, [job, {**job, "ignore_eos": True}])
    finally:
        engine.close()
    assert stops["tokens"] == free["tokens"][: free["tokens"].index(eos)] and stops["outputs"][-1].finished == "eos"
    assert goes_on["tokens"] == free["tokens"] and goes_on["outputs"][-1].finished == "length"
