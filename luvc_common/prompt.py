"""Qwen-VL chat prompts with one placeholder run per media item, sized from the (merged) grid."""
from __future__ import annotations

from luvc_common.errors import PromptError
from luvc_common.tokenizer import IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

MARKS = {"image": "<image>", "video": "<video>"}
PADS = {"image": IMAGE_PAD, "video": VIDEO_PAD}
RESERVED = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


def _marks_in_order(text: str) -> list[str]:
    found, i = [], 0
    while True:
        hits = [(text.find(m, i), kind) for kind, m in MARKS.items() if text.find(m, i) >= 0]
        if not hits:
            return found
        pos, kind = min(hits)
        found.append(kind)
        i = pos + len(MARKS[kind])


def check_question(question: str) -> None:
    """A question must have text and must not smuggle in the chat or vision special tokens."""
    if not question.strip():
        raise PromptError("empty prompt")
    if any(tok in question for tok in RESERVED):
        raise PromptError(f"prompt contains a reserved special token (one of {RESERVED})")


def chat_turn(question: str) -> str:
    """A user turn asking `question`, then the assistant header its answer follows (Qwen chat format)."""
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"


def build_prompt_ids(tokenizer, question: str, kinds: list[str], token_counts: list[int], max_tokens: int) -> list[int]:
    """Token ids of a one-turn chat prompt asking `question` about the media items.

    `<image>` / `<video>` markers in the question place the items; without markers all items go
    first, in order. Each item's placeholder token is repeated token_counts[i] times.
    """
    check_question(question)
    marks = _marks_in_order(question)
    if not marks:
        question = "".join(MARKS[k] for k in kinds) + question
    elif marks != kinds:
        raise PromptError(f"prompt places media {marks} but the request has media {kinds}")
    for kind in kinds:
        question = question.replace(MARKS[kind], VISION_START + PADS[kind] + VISION_END, 1)
    ids = tokenizer(chat_turn(question), add_special_tokens=False)["input_ids"]
    pad_ids = {tokenizer.convert_tokens_to_ids(p) for p in PADS.values()}
    counts = iter(token_counts)
    expanded = [t for i in ids for t in ([i] * next(counts) if i in pad_ids else [i])]
    if len(expanded) > max_tokens:
        raise PromptError(f"prompt is {len(expanded)} tokens, exceeds max_prompt_tokens={max_tokens}")
    return expanded
