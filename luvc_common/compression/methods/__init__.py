"""The compression methods, one module each, and the method specs that name them.

A new method is a module here defining `METHOD` (a `base.Method`) and one line in MODULES. Importing
this package is torch-free (the client's command line lists the names); a method's module is
imported on first use.
"""
from __future__ import annotations

import importlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from luvc_common.errors import ConfigError, shorten

if TYPE_CHECKING:
    from luvc_common.compression.config import CompressionConfig
    from luvc_common.compression.methods.base import Method

MODULES = {"none": "none", "luvc": "luvc", "tome": "tome", "visionzip": "visionzip", "pool": "pool",
           "random": "random_subset", "fastv": "fastv", "dart": "dart"}
"""Method name -> module in this package."""
NAMES = tuple(MODULES)
MAX_SPEC_CHARS = 200
"""Longest method spec accepted."""


def _floats(text: str) -> tuple[float, ...] | None:
    return None if text == "none" else tuple(float(v) for v in text.split("/"))


def _stages(text: str) -> tuple[tuple[float, float], ...] | None:
    if text == "none":
        return None
    pairs = tuple(tuple(float(v) for v in stage.split(":")) for stage in text.split("/"))
    if any(len(p) != 2 for p in pairs):
        raise ValueError(text)
    return pairs


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "/".join(":".join(map(repr, v)) if isinstance(v, tuple) else repr(v) for v in value)
    return value if isinstance(value, str) else repr(value)


_KINDS: dict[str, tuple[Callable[[str], Any], str]] = {
    "keep_ratio": (float, "number"), "layer": (float, "number"), "dominant": (float, "number"), "seed": (int, "integer"),
    "cutoff": (float, "number"), "merge_depths": (_floats, '"none" or depths joined by "/"'),
    "stages": (_stages, '"none" or depth:keep_ratio stages joined by "/"'),
}
"""Config field a spec key sets -> (parser of its text, what the text must be); other fields take the text as is
(the config validates the word)."""


def get(name: str) -> Method:
    if name not in MODULES:
        raise ConfigError(f"method={shorten(repr(name))} is invalid: expected one of {list(NAMES)}")
    return importlib.import_module(f"{__name__}.{MODULES[name]}").METHOD


def budgeted() -> tuple[str, ...]:
    """Methods with a token budget (the baselines)."""
    return tuple(n for n in NAMES if get(n).budgeted)


def method_config(spec: str, **overrides: Any) -> CompressionConfig:
    """The configuration of a method spec, with optional field overrides.

    A spec is a method name, optionally with the knobs its method declares: "fastv", "tome:keep=0.125",
    "dart:keep=0.25,layer=0.1", "random:keep=0.5,seed=3".
    """
    if len(spec) > MAX_SPEC_CHARS:
        raise ConfigError(f"method={shorten(repr(spec))} is invalid: expected a spec of at most {MAX_SPEC_CHARS} characters")
    name, _, args = spec.strip().partition(":")
    method = get(name)
    knobs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if key not in method.spec_keys or eq != "=":
            keys = f"keys {list(method.spec_keys)}" if method.spec_keys else "no keys"
            raise ConfigError(f"method={shorten(repr(spec))} is invalid: expected name[:key=value,...]; {name} takes {keys}")
        field_name = method.spec_keys[key]
        if field_name in knobs:
            raise ConfigError(f"method={shorten(repr(spec))} is invalid: expected each key at most once ({key} is repeated)")
        parse, kind = _KINDS.get(field_name, (str, "word"))
        try:
            knobs[field_name] = parse(value.strip())
        except ValueError:
            raise ConfigError(f"method={shorten(repr(spec))}: {key}={shorten(repr(value))} is not a {kind}") from None
    return replace(method.config(**knobs), **overrides)


def split_specs(text: str) -> list[str]:
    """Comma-separated method specs, where a spec's own knobs are comma-separated too: a piece whose
    first "=" comes before any ":" is a knob of the spec before it ("none,dart:keep=0.25,layer=0.1,luvc")."""
    specs: list[str] = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        eq, colon = piece.find("="), piece.find(":")
        if specs and eq >= 0 and (colon < 0 or eq < colon):
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def budget_unset(spec: str) -> bool:
    """A budgeted spec without keep=: eval and bench give it the reference method's theoretical FLOPs ratio."""
    name, _, args = spec.strip().partition(":")
    return get(name).budgeted and not any(a.strip().startswith("keep=") for a in args.split(","))


def method_spec(cfg: CompressionConfig) -> str:
    """The spec string that method_config parses back to `cfg`'s method and knobs (those its spec keys reach)."""
    method = get(cfg.method)
    mine, default = method.knobs(cfg), method.knobs(method.config())
    knobs = [f"{key}={_show(mine[name])}" for key, name in method.spec_keys.items()
             if name in mine and mine[name] != default.get(name)]
    return f"{cfg.method}:{','.join(knobs)}" if knobs else cfg.method
