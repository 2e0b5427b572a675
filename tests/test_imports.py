"""Light paths stay light: an application using the client, and the CLI's parser, must not pull in
torch, transformers or ray (vLLM keeps the same rule for optional heavy dependencies)."""
import subprocess
import sys

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "ray", "accelerate")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_client_does_not_import_heavy_dependencies():
    assert _loaded_after("import luvc_common.client") == set()


def test_cli_parser_and_client_command_are_light():
    assert _loaded_after("from luvc_common.cli import build_parser; build_parser().parse_args(['client', '--target', 'x:1', '--prompt', 'p'])") == set()


def test_generated_protos_are_current(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), str(tmp_path)], check=True)
    for name in ("luvc_pb2.py", "luvc_pb2.pyi", "luvc_pb2_grpc.py"):
        committed = (ROOT / "luvc_common" / "proto" / name).read_text()
        assert (tmp_path / name).read_text() == committed, f"{name} is stale: run python tools/gen_protos.py"
