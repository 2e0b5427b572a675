"""Regenerate luvc_common/proto/*_pb2*.py from protos/luvc/v1/luvc.proto.

Usage: python tools/gen_protos.py [OUT_DIR]   (default: luvc_common/proto)
Module names in the generated code are made package-absolute (luvc_common.proto.luvc_pb2).
"""
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "luvc" / "v1"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", str(PROTO_DIR / "luvc.proto")]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # package-absolute names: the gRPC module's import, and the messages' __module__ (Ray's proxy
    # pickles requests to its replicas, so the classes must be importable by that name)
    for name, old, new in [
        ("luvc_pb2_grpc.py", "import luvc_pb2 as", "from luvc_common.proto import luvc_pb2 as"),
        ("luvc_pb2.py", "(DESCRIPTOR, 'luvc_pb2', _globals)", "(DESCRIPTOR, 'luvc_common.proto.luvc_pb2', _globals)"),
    ]:
        path = out / name
        path.write_text(path.read_text().replace(old, new))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "luvc_common" / "proto")
