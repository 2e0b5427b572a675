import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from luvc_common.config import Limits
from luvc_common.engine.media import Media, load_image, load_video_dir
from luvc_common.models.tiny import save_random_checkpoint

ASSETS = __import__("pathlib").Path(__file__).resolve().parents[1] / "assets"
ATTENTION_CALLS = {"refuse_weights": 0}


def refuse_weights_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa that never returns attention weights: anything relying on them breaks."""
    ATTENTION_CALLS["refuse_weights"] += 1
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out, None


AttentionInterface.register("refuse_weights", refuse_weights_attention)


def generate_with_logits(engine, requests, compression, max_new_tokens):
    """engine.generate, plus the logits of every step (collected through on_step)."""
    logits = []
    out = engine.generate(requests, compression, max_new_tokens, on_step=lambda _new, step: logits.append(step))
    return out, logits


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_model(request, tmp_path_factory) -> str:
    """A tiny random checkpoint directory of each supported family."""
    return str(save_random_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1))


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory) -> str:
    return str(save_random_checkpoint(tmp_path_factory.mktemp("qwen2_vl"), "qwen2_vl", seed=1))


@pytest.fixture(scope="session")
def demo_image() -> Media:
    return load_image(ASSETS / "demo.png", Limits())


@pytest.fixture(scope="session")
def demo_video() -> Media:
    return load_video_dir(ASSETS / "demo_video", Limits())
