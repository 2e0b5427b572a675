"""Dependencies point one way: a module imports only its own layer or the layers below it, lazy
imports included. The layers, bottom to top, are listed in README's code map."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("base", ["luvc_common.errors", "luvc_common.config", "luvc_common.proto"]),
    ("compression", ["luvc_common.compression"]),
    ("client", ["luvc_common.client"]),
    ("models", ["luvc_common.models"]),
    ("engine", ["luvc_common.engine"]),
    ("serving", ["luvc_common.serving"]),
    ("services", ["encoder_service", "llm_service"]),
    ("research", ["luvc_common.research"]),
    ("app", ["luvc_common.cli"]),
]
ALLOWED_BELOW = {"client": {"base"}}
"""Layers that may import only some of the layers below them: the client stays free of torch."""


def _layer(module: str) -> str | None:
    if module.endswith(".__main__"):
        return "app"  # `python -m encoder_service` runs the command line
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def _violations() -> list[str]:
    rank = {name: i for i, (name, _) in enumerate(LAYERS)}
    bad = []
    for package in ("luvc_common", "encoder_service", "llm_service"):
        for path in (ROOT / package).rglob("*.py"):
            module = _module_name(path)
            if module == "luvc_common" or module.startswith("luvc_common.proto"):
                continue  # the empty top package; generated code
            mine = _layer(module)
            assert mine is not None, f"{module} is in no layer: add it to LAYERS and the README code map"
            allowed = ALLOWED_BELOW.get(mine, {name for name, _ in LAYERS[: rank[mine]]}) | {mine}
            for imported in _imports(path):
                theirs = _layer(imported)
                if theirs is not None and theirs not in allowed:
                    bad.append(f"{module} ({mine}) imports {imported} ({theirs})")
    return sorted(set(bad))


def test_every_module_imports_only_its_layer_or_below():
    assert _violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself: an engine module that imported the serving layer would be reported."""
    fake = ROOT / "luvc_common" / "engine" / "_layer_probe.py"
    fake.write_text("def f():\n    from luvc_common.serving.runtime import Gate\n")
    try:
        assert _violations() == ["luvc_common.engine._layer_probe (engine) imports luvc_common.serving.runtime (serving)",
                                 "luvc_common.engine._layer_probe (engine) imports luvc_common.serving.runtime.Gate (serving)"]
    finally:
        fake.unlink()
