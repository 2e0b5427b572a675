"""Chat prompts with one placeholder run per media item, sized from the (merged) grid, in a family's tokens.

The client's text is tokenized as text only (`split_special_tokens`): whatever it contains, the only
special tokens in a prompt are the ones the template puts there.
"""
from __future__ import annotations

import re

from luvc_common.errors import PromptError, shorten
from luvc_common.models.family import ChatTokens

MARKS = {"image": "<image>", "video": "<video>"}
_MARK = re.compile("|".join(map(re.escape, MARKS.values())))
_KIND = {mark: kind for kind, mark in MARKS.items()}


def check_question(question: str, max_chars: int) -> None:
    """A question must have text and fit max_chars; checked before anything tokenizes it."""
    if len(question) > max_chars:
        raise PromptError(f"prompt is {len(question)} characters, exceeds max_prompt_chars={max_chars}")
    if not question.strip():
        raise PromptError("empty prompt")


def chat_turn(chat: ChatTokens, question: str) -> str:
    """A user turn asking `question`, then the assistant header its answer follows."""
    return f"{chat.turn_start}user\n{question}{chat.turn_end}\n{chat.turn_start}assistant\n"


def _describe(kinds: list[str]) -> str:
    return shorten(str(kinds), 80) if len(kinds) <= 8 else f"{len(kinds)} items"


def build_prompt_ids(tokenizer, chat: ChatTokens, question: str, kinds: list[str], token_counts: list[int], max_tokens: int) -> list[int]:
    """Token ids of a one-turn chat prompt asking `question` about the media items.

    `<image>` / `<video>` markers in the question place the items; without markers all items go
    first, in order. Each item's placeholder token is repeated token_counts[i] times.
    """
    marks = [_KIND[m] for m in _MARK.findall(question)]
    texts = _MARK.split(question)
    if not marks:
        texts = [""] * len(kinds) + texts
    elif marks != kinds:
        raise PromptError(f"prompt places media {_describe(marks)} but the request has media {_describe(kinds)}")
    special = tokenizer.convert_tokens_to_ids
    encode = lambda text: tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # noqa: E731
    runs = [encode(t) for t in ["user\n" + texts[0], *texts[1:]]]
    tail = [special(chat.turn_end), *encode("\n"), special(chat.turn_start), *encode("assistant\n")]
    length = 1 + sum(map(len, runs)) + sum(token_counts) + 2 * len(kinds) + len(tail)
    if length > max_tokens:
        raise PromptError(f"prompt is {length} tokens, exceeds max_prompt_tokens={max_tokens}")
    ids = [special(chat.turn_start), *runs[0]]
    for kind, count, run in zip(kinds, token_counts, runs[1:]):
        ids += [special(chat.media_start), *[special(chat.placeholder(kind))] * count, special(chat.media_end), *run]
    return ids + tail
