"""Seconds per training step (forward and backward of the answer loss) in fp32 and under --cpu-bf16's CPU autocast,
interleaved on the same batches, and their ratio. Takes `luvc train`'s flags, which shape the model and its batches:

    python tools/bench_train_step.py --init models/luvc-tiny-qwen2vl --text-layers 6 --rope-theta 100 --batch-size 32 \
        --max-pixels 200704 --low-pixels 50176 --questions 8 --augment --read-digits 3,5 --read-height 56 --strip-share 0.5 \
        --tasks read,read,read,read,read,read,read,color,shape,count,count,count,count,position,chart --threads 2
"""
import argparse
import statistics
import time

import torch

import luvc_common.research.train as T


def main() -> None:
    parser = T.add_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--repeats", type=int, default=3, help="passes over the batches per precision (the first is warm-up)")
    parser.add_argument("--batches", default="5,6", help="training steps whose batches are timed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = T.build_model(args, T._tokenizer())
    if args.init:
        model.load_state_dict(T.start_weights(args, model))
    model.train()
    heads_only = ("aux_", "pointer_", "question_")  # the training heads' targets, not model inputs
    batches = [{k: v for k, v in T.StepBatches(args)[int(s)].items() if not k.startswith(heads_only)}
               for s in args.batches.split(",")]
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for repeat in range(args.repeats):
        for name in seconds:
            for batch in batches:
                start = time.perf_counter()
                with T.cpu_autocast(name == "bf16", torch.device("cpu")):
                    loss = model(**batch).loss
                loss.backward()
                model.zero_grad(set_to_none=True)
                if repeat:
                    seconds[name].append(time.perf_counter() - start)
                print(f"pass {repeat} {name}: {time.perf_counter() - start:.2f} s, loss {loss.item():.4f}", flush=True)
    fp32, bf16 = (statistics.median(seconds[name]) for name in ("fp32", "bf16"))
    print(f"median s/step: fp32 {fp32:.2f}, bf16 {bf16:.2f}; bf16 is {fp32 / bf16:.2f}x faster")


if __name__ == "__main__":
    main()
