"""Is a model clearly above chance on every task (the shipping bar of the default model, docs/training.md)?

Usage: python tools/ship_check.py EVAL.json [METHOD]
EVAL.json is written by `luvc eval --json` on the SynthVQA test split; METHOD defaults to "none". A task passes when
the lower end of its 95% Clopper-Pearson interval is above the best blind guess (synthvqa.chance). Exit status 0
when every task passes.
"""
import json
import sys

from luvc_common.research.synthvqa import chance, lower_bound


def main(path: str, method: str = "none") -> int:
    result = next(r for r in json.load(open(path))["results"] if r["method"] == method)
    if "per_task_n" not in result:  # written before evaluate.score counted them: the test split's equal shares
        print(f"{path} has no per_task_n: assuming {result['n']} examples split evenly over the tasks")
    passed = True
    for task, accuracy in result["per_task"].items():
        n = result.get("per_task_n", {}).get(task, result["n"] // len(result["per_task"]))
        correct = round(accuracy * n)
        low, guess = lower_bound(correct, n), chance(task)
        passed &= low > guess
        print(f"{task:<9} {correct:>4}/{n:<4} 95% lower {low:7.4f}  chance {guess:7.4f}  {'above' if low > guess else 'NOT above'}")
    print(f"{method}: {'clearly above chance on every task' if passed else 'not above chance on every task'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
