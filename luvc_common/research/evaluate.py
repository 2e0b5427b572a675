"""`luvc eval`: accuracy and LLM cost of visual-token compression methods on a VQA set.

Every example is encoded once per distinct vision-side setting and answered greedily by every method
(methods interleaved per example, so all see the same machine load). Per method: exact-match
accuracy after normalize_answer, overall and per task; mean visual tokens entering the LLM; the
theoretical LLM prefill FLOPs ratio (uncompressed / method, summed over the set, see flops.py);
and the measured prefill speedup (median prefill time of "none" / the method's). "none" always
runs: it is the baseline of the speedup.

Baselines named without a budget ("tome", not "tome:keep=0.25") run at the keep ratio whose theoretical
FLOPs ratio matches the reference method's (luvc by default), measured on the first examples; with
--sweep every method runs at several budgets and the plot draws one curve per method.

    luvc eval --methods none,luvc --limit 60 --json eval.json --plot eval.png
    luvc eval --methods luvc,fastv,tome,visionzip,dart,pool,random --sweep --plot sweep.png
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

from luvc_common.compression.grid import grid_tokens
from luvc_common.config import DEFAULT_MODEL
from luvc_common.compression.config import CompressionConfig, OIMConfig, SPUConfig
from luvc_common.compression.methods import NAMES, budget_unset, get, method_config, method_spec, split_specs
from luvc_common.errors import UserError

VALIDATION_SEED, TEST_SEED, TEST_N = 2000, 3000, 600
"""SynthVQA's held-out splits, never trained on: make_example(seed, i). The bundled test split is
i < 600 of seed 3000 (100 per task); validation (seed 2000) is for choosing defaults."""
SWEEP_KEEP = (0.5, 0.25, 0.125, 0.0625)
"""Keep ratios of each baseline under --sweep."""
SWEEP_SPU = (((0.25, 0.5), (0.5, 0.25), (0.75, 0.0)), SPUConfig().stages, ((0.17, 0.25), (0.4, 0.1), (0.67, 0.0)),
             ((0.17, 0.25), (0.4, 0.0)))
"""luvc's --sweep points without OIM: SPU cascades from gentle to steep (distinct layers on LLMs of 4 or more layers)."""
SWEEP_MERGES = ((0.5,), (0.25, 0.75))
"""luvc's --sweep points with OIM: 1 and 2 merge steps, each with the spec's SPU cascade."""


def synthvqa_split(seed: int = TEST_SEED, n: int = TEST_N) -> list[dict]:
    """A held-out split as records like load_jsonl's, with the Scene as "image" (rendered on use)."""
    from luvc_common.research.synthvqa import make_example

    return [{"image": ex.scene, "question": ex.question, "answer": ex.answer, "task": ex.task}
            for ex in (make_example(seed, i) for i in range(n))]


def anls(prediction: str, answer: str, threshold: float = 0.5) -> float:
    """Normalized Levenshtein similarity, 0 below `threshold` (ANLS, the DocVQA / ST-VQA reading metric): partial
    credit for a nearly right reading, where exact match sees only whole answers."""
    from rapidfuzz.distance import Levenshtein

    similarity = 1.0 - Levenshtein.normalized_distance(prediction, answer)
    return similarity if similarity >= threshold else 0.0


def judge(prediction: str, answer: str) -> tuple[bool, float]:
    """(exact match, ANLS) of one answer, both after normalize_answer."""
    from luvc_common.research.synthvqa import normalize_answer

    prediction, answer = normalize_answer(prediction), normalize_answer(answer)
    return prediction == answer, anls(prediction, answer)


def score(tasks: Sequence[str], predictions: Sequence[str], answers: Sequence[str]) -> dict:
    """Exact match and ANLS (judge): {"accuracy", "anls", "per_task": {task: accuracy},
    "per_task_anls": {task: ANLS}, "per_task_n": {task: examples}, "n"}."""
    hits: dict[str, list[bool]] = defaultdict(list)
    similar: dict[str, list[float]] = defaultdict(list)
    for task, pred, answer in zip(tasks, predictions, answers, strict=True):
        hit, similarity = judge(pred, answer)
        hits[task].append(hit)
        similar[task].append(similarity)
    n = max(len(tasks), 1)
    return {"accuracy": sum(map(sum, hits.values())) / n, "anls": sum(map(sum, similar.values())) / n,
            "per_task": {t: sum(h) / len(h) for t, h in hits.items()},
            "per_task_anls": {t: sum(s) / len(s) for t, s in similar.items()},
            "per_task_n": {t: len(h) for t, h in hits.items()}, "n": len(tasks)}


def config_label(cfg: CompressionConfig) -> str:
    """The config's method spec ("luvc", "tome:keep=0.125", "luvc:merges=none"), or for a config no spec
    reaches (an in-process "none" with SPU on), `method[knob=value, ...]` naming what differs from its default."""
    spec = method_spec(cfg)
    if method_config(spec) == cfg:
        return spec
    default, diffs = method_config(cfg.method), []
    for part in ("oim", "spu"):
        mine, ref = getattr(cfg, part), getattr(default, part)
        if mine == ref:
            continue
        if mine is None:
            diffs.append(f"{part}=off")
            continue
        ref = ref or type(mine)()
        diffs += [f"{part}.{f.name}={getattr(mine, f.name)}" for f in fields(mine) if getattr(mine, f.name) != getattr(ref, f.name)] or [f"{part}=on"]
    return f"{cfg.method}[{', '.join(diffs)}]" if diffs else cfg.method


def _runs(methods: Sequence[CompressionConfig] | Mapping[str, CompressionConfig]) -> dict[str, CompressionConfig]:
    """Label -> config, with the uncompressed baseline first (added as "none" when missing)."""
    runs = dict(methods) if isinstance(methods, Mapping) else {config_label(c): c for c in methods}
    uncompressed = method_config("none")
    base = next((label for label, c in runs.items() if c == uncompressed), None)
    if base is None and "none" in runs:
        raise ValueError('the label "none" is taken by a compressed configuration')
    return {base or "none": uncompressed, **runs}


def _media(image, limits):
    from luvc_common.engine.media import Media, load_image
    from luvc_common.research.synthvqa import Scene, render

    return Media("image", [render(image)]) if isinstance(image, Scene) else load_image(image, limits)


def evaluate(
    model_dir: str | Path,
    examples: Sequence[dict],
    methods: Sequence[CompressionConfig] | Mapping[str, CompressionConfig],
    limit: int | None = None,
    progress: bool = True,
    max_new_tokens: int = 8,
) -> dict:
    """Run every method on examples[:limit] and return {"model", "n", "max_new_tokens", "results": [...]}.

    examples: records with "image" (a file path or a synthvqa.Scene), "question", "answer", "task".
    methods: configs (labelled by config_label) or a {label: config} mapping, e.g. for a budget sweep.
    Results come in run order, "none" first; accuracies are in [0, 1].
    """
    from tqdm import tqdm

    from luvc_common.compression.flops import prefill_flops, uncompressed_tokens_per_layer
    from luvc_common.config import ModelConfig
    from luvc_common.engine.pipeline import Pipeline

    examples = list(examples)[:limit]
    if not examples:
        raise UserError("no examples to evaluate")
    runs = _runs(methods)
    by_vision: dict = defaultdict(list)
    for label, cfg in runs.items():
        by_vision[_vision_key(cfg)].append(label)
    pipe = Pipeline(ModelConfig(str(model_dir)))
    engine = pipe.generator.engine
    text_config = engine.config.text_config
    rows: dict[str, list[tuple[str, int, list[int], float, float]]] = {label: [] for label in runs}
    base_flops, text_counts, visual_counts = 0.0, [], []
    for ex in tqdm(examples, desc="eval", unit="ex", disable=not progress):
        media = [_media(ex["image"], pipe.limits)]
        for labels in by_vision.values():
            encoded = pipe.encoder.encode(media, runs[labels[0]])
            for label in labels:
                r = pipe.generator.generate(ex["question"], encoded, runs[label], max_new_tokens)
                vis = r.visual_tokens
                text_tokens = len(r.prompt_ids) - sum(encoded.grid_counts(engine.unit))
                flops = prefill_flops([text_tokens + k for k in vis["llm_per_layer"]], text_config)
                rows[label].append((r.text, vis["encoder_out"], vis["llm_per_layer"], flops, r.timings_ms["prefill"]))
        text_counts.append(text_tokens)
        visual_counts.append(sum(grid_tokens(g, engine.unit) for g in encoded.source_grids))
        base_flops += prefill_flops(uncompressed_tokens_per_layer(text_tokens, encoded.source_grids, engine.num_layers, engine.unit), text_config)

    results = _summarise(runs, rows, examples, base_flops)
    return {"model": str(model_dir), "n": len(examples), "max_new_tokens": max_new_tokens,
            "text_tokens": statistics.fmean(text_counts), "visual_tokens_uncompressed": statistics.fmean(visual_counts),
            "results": results}


def _summarise(runs: dict[str, CompressionConfig], rows: dict[str, list[tuple]], examples: list[dict], base_flops: float) -> list[dict]:
    """One result per run: accuracy, visual tokens, theoretical FLOPs ratio and measured prefill speedup
    against the first run (the uncompressed one), the examples it gets wrong where that run is right and the
    reverse ("vs_none": {"lost", "gained"}, the paired view of an accuracy difference), and its predictions."""
    right = {label: [judge(row[0], ex["answer"])[0] for row, ex in zip(rows[label], examples)] for label in runs}
    base = next(iter(runs))
    base_ms = statistics.median(row[4] for row in rows[base])
    results = []
    for label, cfg in runs.items():
        preds, vis_in, per_layer, flops, prefill_ms = zip(*rows[label])
        pairs = list(zip(right[base], right[label]))
        results.append({
            "method": label, "config": asdict(cfg),
            **score([ex["task"] for ex in examples], preds, [ex["answer"] for ex in examples]),
            "vs_none": {"lost": pairs.count((True, False)), "gained": pairs.count((False, True))},
            "predictions": list(preds),
            "visual_tokens_llm_in": statistics.fmean(vis_in),
            "visual_tokens_per_layer": [statistics.fmean(layer) for layer in zip(*per_layer)],
            "llm_flops_ratio": base_flops / sum(flops),
            "llm_prefill_speedup": base_ms / statistics.median(prefill_ms),
            "prefill_ms_median": statistics.median(prefill_ms),
        })
    return results


def expand_methods(specs: Sequence[str], sweep: bool) -> list[CompressionConfig]:
    """The configs of method specs, one per spec; with sweep, every budgeted method at SWEEP_KEEP and every
    method with OIM knobs (luvc) at SWEEP_SPU and SWEEP_MERGES, keeping the spec's other knobs."""
    configs = []
    for spec in specs:
        cfg = method_config(spec)
        if sweep and get(cfg.method).budgeted:
            configs += [replace(cfg, baseline=replace(cfg.baseline, keep_ratio=k)) for k in SWEEP_KEEP]
        elif sweep and "merge_depths" in get(cfg.method).spec_keys.values():
            spu, oim = cfg.spu or SPUConfig(), cfg.oim or OIMConfig()
            configs += [replace(cfg, oim=None, spu=replace(spu, stages=s)) for s in SWEEP_SPU]
            configs += [replace(cfg, oim=replace(oim, merge_depths=d), spu=spu) for d in SWEEP_MERGES]
        else:
            configs.append(cfg)
    return configs


def _vision_key(cfg: CompressionConfig) -> tuple:
    """Configs with equal keys get the same encoder output."""
    method = get(cfg.method)
    return (cfg.oim, cfg.method, cfg.baseline) if method.budgeted and method.in_encoder else (cfg.oim,)


def match_budgets(model_dir: str | Path, examples: Sequence[dict], methods: Sequence[CompressionConfig],
                  reference: CompressionConfig, probe: int = 8) -> list[CompressionConfig]:
    """Give each baseline the keep ratio whose theoretical LLM FLOPs ratio equals the reference
    method's, both computed on the first `probe` examples (mean text and visual tokens)."""
    report = evaluate(model_dir, examples[:probe], {"ref": reference}, progress=False, max_new_tokens=1)
    from transformers import AutoConfig

    from luvc_common.compression.flops import with_matched_budget

    ref = next(r for r in report["results"] if r["method"] == "ref")
    text_config, layers = AutoConfig.from_pretrained(model_dir).text_config, len(ref["visual_tokens_per_layer"])
    return [with_matched_budget(cfg, ref["llm_flops_ratio"], report["text_tokens"], report["visual_tokens_uncompressed"], text_config, layers)
            if get(cfg.method).budgeted else cfg for cfg in methods]


def format_table(results: list[dict]) -> str:
    """One line per method: accuracy, examples lost / gained against none, per-task accuracies, read's ANLS (when
    read was asked), visual tokens, FLOPs ratio, prefill speedup."""
    tasks = list(dict.fromkeys(t for r in results for t in r["per_task"]))
    width = max(len("method"), *(len(r["method"]) for r in results))
    read = "read" in tasks
    head = (f"{'method':<{width}}  {'acc':>5}  {'-/+ none':>9}  " + " ".join(f"{t[:8]:>8}" for t in tasks) + ("  read ANLS" if read else "")
            + f"  {'vis tok':>7}  {'FLOPs x':>7}  {'prefill x':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        per_task = " ".join(f"{r['per_task'][t]:8.3f}" if t in r["per_task"] else f"{'-':>8}" for t in tasks)
        if read:
            per_task += f"  {r['per_task_anls']['read']:9.3f}"
        flips = f"-{r['vs_none']['lost']}/+{r['vs_none']['gained']}"
        lines.append(f"{r['method']:<{width}}  {r['accuracy']:5.3f}  {flips:>9}  {per_task}  {r['visual_tokens_llm_in']:7.1f}"
                     f"  {r['llm_flops_ratio']:7.2f}  {r['llm_prefill_speedup']:9.2f}")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """Accuracy vs LLM speedup over "none", one colour per method family: filled markers on a solid line
    for the theoretical FLOPs ratio, hollow markers on a dashed line for the measured prefill speedup;
    several budgets of a family (--sweep) make a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    families: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        families[r["config"]["method"] + (" + OIM" if r["config"]["oim"] else "")].append(r)
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    for i, (family, rs) in enumerate(families.items()):
        color = f"C{i % 10}"
        for key, style, face in (("llm_flops_ratio", "-", color), ("llm_prefill_speedup", "--", "none")):
            rs_sorted = sorted(rs, key=lambda r: r[key])
            ax.plot([r[key] for r in rs_sorted], [r["accuracy"] for r in rs_sorted], style, color=color, lw=1, marker="o",
                    markerfacecolor=face, label=family if key == "llm_flops_ratio" else None)
    acc = [r["accuracy"] for r in results]
    ax.set_xlabel('LLM speedup over "none" (x): solid = theoretical FLOPs ratio, dashed = measured prefill time ratio')
    ax.set_ylabel("accuracy (exact match)")
    ax.set_ylim(max(0.0, min(acc) - 0.1) - 0.02, min(1.0, max(acc) + 0.1) + 0.02)
    ax.set_title(f"{report['model']}, n={report['n']}", fontsize=10)
    ax.xaxis.label.set_size(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low; anything else is a usage error (exit 2) naming the flag."""
    def parse(s: str) -> int:
        if (v := int(s)) < low:
            raise argparse.ArgumentTypeError(f"{s} is below {low}")
        return v
    parse.__name__ = f"integer >= {low}"  # argparse's message for a non-integer names the type
    return parse


positive_int = int_at_least(1)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `eval` subcommand; it calls cmd_eval(args)."""
    p = subparsers.add_parser(
        "eval", help="accuracy and LLM cost of compression methods on a VQA set",
        description='Accuracy (exact match), visual tokens, theoretical LLM FLOPs ratio and measured prefill speedup '
                    'per method. "none" (uncompressed) always runs and is reported: it is the baseline of both ratios.',
    )
    p.add_argument("--data", metavar="FILE.jsonl", help="any JSONL of {image, question, answer, task} records, image paths "
                   "relative to the file (e.g. from `luvc data synth`); default: the bundled SynthVQA test split "
                   f"(make_example({TEST_SEED}, i), i < {TEST_N}, 100 per task), generated in memory")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="local HF checkpoint directory")
    p.add_argument("--methods", default="none,luvc", help=f"comma-separated method specs: names from {list(NAMES)}, "
                   "baselines optionally with a budget (tome:keep=0.25), luvc with its knobs (luvc:merges=none); "
                   "a baseline without a budget gets --match's FLOPs ratio")
    p.add_argument("--match", default="luvc", help="method whose theoretical LLM FLOPs ratio budget-less baselines are given")
    p.add_argument("--sweep", action="store_true", help=f"every baseline at keep ratios {list(SWEEP_KEEP)}, luvc at "
                   f"{len(SWEEP_SPU)} SPU cascades without OIM and with 1 and 2 OIM merge steps: one curve per method "
                   "(luvc with OIM its own) in the plot")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N examples")
    p.add_argument("--max-new-tokens", type=positive_int, default=8)
    p.add_argument("--json", metavar="OUT", help='write {"results": [...], ...} here')
    p.add_argument("--plot", metavar="PNG", help="write an accuracy vs LLM speedup plot here")
    p.add_argument("--predictions", metavar="OUT.jsonl", help="write every method's answer to every example here, one "
                   "JSON line each: {index, method, task, question, answer, prediction, correct, anls}")
    p.set_defaults(func=cmd_eval)
    return p


def write_predictions(path: str | Path, examples: Sequence[dict], results: Sequence[dict]) -> None:
    """One JSON line per method and example: what it answered and whether that is right (as `score` judges)."""
    with open(path, "w") as f:
        for r in results:
            for i, (ex, pred) in enumerate(zip(examples, r["predictions"], strict=True)):
                correct, similarity = judge(pred, ex["answer"])
                f.write(json.dumps({"index": i, "method": r["method"], "task": ex["task"], "question": ex["question"],
                                    "answer": ex["answer"], "prediction": pred, "correct": correct,
                                    "anls": similarity}) + "\n")


def cmd_eval(args: argparse.Namespace) -> int:
    from luvc_common.research.synthvqa import load_jsonl

    for flag, out in (("--json", args.json), ("--plot", args.plot), ("--predictions", args.predictions)):
        if out and not Path(out).resolve().parent.is_dir():  # fail before the evaluation, not after it
            raise UserError(f"{flag} {out}: no such directory {Path(out).parent}")
    try:
        examples = load_jsonl(args.data) if args.data else synthvqa_split()
    except (OSError, ValueError) as e:
        raise UserError(f"--data: {e}") from None
    specs = split_specs(args.methods)
    configs = expand_methods(specs, args.sweep)
    budgetless = [] if args.sweep else [i for i, spec in enumerate(specs) if budget_unset(spec)]
    if budgetless:
        matched = match_budgets(args.model, examples, [configs[i] for i in budgetless], method_config(args.match))
        for i, cfg in zip(budgetless, matched):
            configs[i] = cfg
    runs = {config_label(cfg): cfg for cfg in configs}
    report = evaluate(args.model, examples, runs, args.limit, max_new_tokens=args.max_new_tokens)
    report["data"] = args.data or f"synthvqa test (seed {TEST_SEED})"
    print(format_table(report["results"]))
    if args.predictions:
        write_predictions(args.predictions, examples[:args.limit], report["results"])
    if args.json:
        summary = [{k: v for k, v in r.items() if k != "predictions"} for r in report["results"]]
        Path(args.json).write_text(json.dumps(report | {"results": summary}, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0
