"""Where does a training checkpoint's answer chain break? On held-out object scenes (validation seed), with and
without distractors, per task: exact match and answer loss; what a linear probe reads from the visual tokens
entering the LLM (colour and shape on object tokens, the checkpoint's own probe head); with --cell-layer, which
third of the image the tokens leaving that layer know they are in; and how much attention head 0 of each LLM
layer puts on the answer's evidence (synthvqa.evidence) at the positions that predict the answer.

    python tools/probe_chain.py runs/s9/Q/ckpt.pt --rope-theta 100 --aux-balanced --cell-layer 0
Takes the training flags that shape the model (sizes, rope, probe options); needs a checkpoint trained with --aux-weight.
"""
import argparse

import torch

import luvc_common.research.train as T
from luvc_common.research.evaluate import VALIDATION_SEED

TASKS = ("color", "shape", "position", "count")


def main() -> None:
    parser = T.add_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=96, help="held-out examples per setting")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, processor = T._tokenizer(), T.image_processor(args.max_pixels)
    model = T.build_model(args, tokenizer)
    probe = T.VisionProbe(model, args.aux_balanced, args.cell_layer)
    state = torch.load(args.checkpoint, weights_only=False, map_location="cpu")
    model.load_state_dict(state["model"])
    probe.load_state_dict(state["probe"])
    pointer = T.AttentionPointer(model, tuple(range(model.config.text_config.num_hidden_layers)))
    model.eval()
    image_id = tokenizer.convert_tokens_to_ids(T.FAMILY.chat.image)
    for distractors in (0, 3):
        batch, tasks = T.make_batch(VALIDATION_SEED, range(args.n), tokenizer, processor,
                                    T.Recipe(1, distractors, TASKS, dense=True, pointer=True))
        labels = batch.pop("aux_labels")
        rows, queries, keys = (batch.pop(k) for k in ("pointer_rows", "pointer_queries", "pointer_keys"))
        with torch.no_grad():
            hits, losses = T.score(model, batch)
            read = probe.object_accuracy(labels)
            if probe.cell_head is not None:
                cells = probe.cell_head(probe.hidden[batch["input_ids"] == image_id].float()).argmax(-1)
                read["cell"] = (cells == T.grid_thirds(batch["image_grid_thw"])).float().mean().item()
            mass = {layer: (w[rows, 0, queries] * keys).sum(-1) for layer, w in pointer.weights.items()}
        first = {}  # each example's first supervised query: the position predicting its first answer token
        for i, row in enumerate(rows.tolist()):
            first.setdefault(row, i)
        print(f"up to {distractors} distractors; probe accuracy on the visual tokens: "
              + ", ".join(f"{k} {v:.2f}" for k, v in read.items()))
        for task in TASKS:
            mine = [i for i, t in enumerate(tasks) if t == task]
            asked = [first[i] for i in mine if i in first]
            heads = " ".join(f"L{layer} {mass[layer][asked].mean():.2f}" for layer in mass)
            print(f"  {task:9s} exact {hits[mine].float().mean():.2f}  answer loss {losses[mine].mean():.3f}  "
                  f"head-0 attention on the evidence: {heads}")


if __name__ == "__main__":
    main()
