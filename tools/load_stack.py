"""Start both services of a model on loopback (with /metrics) and run `luvc load` against them, end to
end and with precomputed visual tokens (the LLM stage alone), methods luvc and none, --ignore-eos,
scraping both services' /metrics during every level. JSON and logs go to OUT.

    python tools/load_stack.py models/luvc-tiny-qwen2vl OUT --concurrency 1,4,16 --requests 96 --max-new-tokens 16
    python tools/load_stack.py runs/bench/small OUT --llm-only --concurrency 1,16 --requests 16 --max-new-tokens 8
"""
import argparse
import subprocess
import sys
from pathlib import Path

from luvc_common.serving.launch import Service, free_port

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model")
parser.add_argument("out", type=Path)
parser.add_argument("--llm-only", action="store_true", help="skip the end-to-end run")
args, load_args = parser.parse_known_args()
args.out.mkdir(parents=True, exist_ok=True)
ports = [str(free_port()), str(free_port())]
encoder = Service(["encoder", "--model", args.model, "--max-queue", "256", "--metrics-port", ports[0]], args.out / "encoder.log").start()
llm = Service(["llm", "--model", args.model, "--encoder", encoder.target, "--max-queue", "256", "--metrics-port", ports[1]],
              args.out / "llm.log").start()
try:
    load = [sys.executable, "-m", "luvc_common.cli", "load", "--target", llm.target, "--method", "luvc", "--method", "none",
            "--ignore-eos", *(f"--metrics=http://127.0.0.1:{p}/metrics" for p in ports), *load_args]
    if not args.llm_only:
        subprocess.run([*load, "--json", str(args.out / "e2e.json")], check=True)
    subprocess.run([*load, "--precomputed", "--encoder", encoder.target, "--json", str(args.out / "llm.json")], check=True)
finally:
    llm.stop()
    encoder.stop()
