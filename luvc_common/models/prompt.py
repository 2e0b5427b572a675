"""Chat prompts with placeholder runs per media item, sized from the (merged) grid, in a family's tokens.

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


def build_prompt_ids(tokenizer, chat: ChatTokens, question: str, kinds: list[str], token_counts: list[int], max_tokens: int,
                     frames: list[int] | None = None) -> list[int]:
    """Token ids of a one-turn chat prompt asking `question` about the media items.

    `<image>` / `<video>` markers in the question place the items; without markers all items go
    first, in order. Each item's placeholder token is repeated token_counts[i] times, in one run, or in
    one run per grid frame (frames[i]) for a family whose videos are runs of frames (ChatTokens.frame_prefix).
    """
    marks = [_KIND[m] for m in _MARK.findall(question)]
    texts = _MARK.split(question)
    if not marks:
        texts = [""] * len(kinds) + texts
    elif marks != kinds:
        raise PromptError(f"prompt places media {_describe(marks)} but the request has media {_describe(kinds)}")
    if sum(token_counts) > max_tokens:
        raise PromptError(f"media need {sum(token_counts)} placeholder tokens, exceeds max_prompt_tokens={max_tokens}")
    special = tokenizer.convert_tokens_to_ids
    encode = lambda text: tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # noqa: E731

    def placeholders(kind: str, count: int, frames: int) -> list[int]:
        runs = chat.runs(kind, frames)
        run = [special(chat.media_start), *[special(chat.placeholder(kind))] * (count // runs), special(chat.media_end)]
        if runs == 1:
            return run
        return [i for f in range(runs) for i in [*(encode("\n") if f else []), *encode(chat.frame_prefix.format(i=f + 1)), *run]]

    texts = [encode(t) for t in ["user\n" + texts[0], *texts[1:]]]
    ids = [special(chat.turn_start), *texts[0]]
    for kind, count, t, text in zip(kinds, token_counts, frames or [1] * len(kinds), texts[1:]):
        ids += placeholders(kind, count, t) + text
    ids += [special(chat.turn_end), *encode("\n"), special(chat.turn_start), *encode("assistant\n")]
    if len(ids) > max_tokens:
        raise PromptError(f"prompt is {len(ids)} tokens, exceeds max_prompt_tokens={max_tokens}")
    return ids
