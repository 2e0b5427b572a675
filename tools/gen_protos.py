"""Regenerate luvc_common/proto/*_pb2*.py from protos/luvc/v1/luvc.proto.

Usage: python tools/gen_protos.py [OUT_DIR]   (default: luvc_common/proto)
The generated gRPC module's import is made package-absolute so it works from any working dir.
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
    grpc_file = out / "luvc_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace("import luvc_pb2 as", "from luvc_common.proto import luvc_pb2 as"))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "luvc_common" / "proto")
