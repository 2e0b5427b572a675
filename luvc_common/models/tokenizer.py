"""A small word-level tokenizer built locally (no hub download) for the project's own models.

WordPiece over a closed vocabulary: whole words, and numbers split into digits ("417" -> "4 ##1 ##7")
so any number is representable and decodes back without spaces. It carries a family's special
tokens (models/family.ChatTokens), so that family's stock model classes and prompt format work unchanged.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from luvc_common.models.family import ChatTokens

UNK = "[UNK]"

BASE_WORDS = (
    "user assistant system what which where who how many much is are was the a an of in on at to and or "
    "it this that there image picture video frame color shape object number written tallest bar chart "
    "red green blue yellow purple orange black white gray circle circles square squares triangle triangles "
    "top bottom left right center middle yes no describe answer question b c d e f"
).split()
PUNCTUATION = list(".,?!:;'\"()-")


def build_tokenizer(chat: ChatTokens, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A lowercase WordPiece tokenizer over chat's special tokens, BASE_WORDS + extra_words, digits and punctuation."""
    special = [chat.pad, UNK, *chat.all[1:]]
    words = list(dict.fromkeys([*BASE_WORDS, *(w.lower() for w in extra_words)]))
    digits = [str(d) for d in range(10)]
    vocab = {tok: i for i, tok in enumerate([*special, *words, *digits, *(f"##{d}" for d in digits), *PUNCTUATION])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=32))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, pad_token=chat.pad, eos_token=chat.turn_end, padding_side="left"
    )
