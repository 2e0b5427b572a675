"""Where does a training checkpoint's answer chain break? On held-out object scenes (validation seed), with and
without distractors, per task: exact match and answer loss; what the checkpoint's own linear probe reads from the
visual tokens entering the LLM (accuracy per label kind on the tokens that kind labels); with --cell-layer, which
third of the image the tokens leaving that layer know they are in; and where head 0 of each LLM layer looks from the
position that predicts the first answer token: its attention mass on the answer's evidence (synthvqa.evidence) and,
with distractors, the evidence's share of its mass on all object tokens. A share near 1 / (objects in the scene)
means the head finds objects but not the one asked about. Last, whether that position knows what was asked: a
linear probe fitted on two thirds of the questions reads the colour and the shape the question names from the
embedding and from each LLM layer's output there, scored on the other third (what --question-weight teaches).

    python tools/probe_chain.py runs/s15/mix/ckpt.pt --rope-theta 100 --aux-balanced --cell-layer 0 --char-slots 4
Takes the training flags that shape the model (sizes, rope, probe options); needs a checkpoint trained with --aux-weight.
"""
import argparse

import torch
import torch.nn.functional as F

import luvc_common.research.train as T
from luvc_common.research.evaluate import VALIDATION_SEED
from luvc_common.research.synthvqa import LABEL_MAPS

TASKS = ("color", "shape", "position", "count")


def held_out_accuracy(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    """A multinomial logistic regression fitted on the first two thirds of (x, y), scored on the last third."""
    cut = 2 * len(y) // 3
    x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-5)
    linear = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(linear.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(linear(x[:cut]), y[:cut]) + 1e-3 * linear.weight.square().sum()).backward()
        opt.step()
    return (linear(x[cut:]).argmax(1) == y[cut:]).float().mean().item()


def main() -> None:
    parser = T.add_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=96, help="held-out examples per setting")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, processor = T._tokenizer(), T.image_processor(args.max_pixels)
    model = T.build_model(args, tokenizer)
    probe = T.VisionProbe(model, args.aux_balanced, args.cell_layer, args.char_slots)
    state = torch.load(args.checkpoint, weights_only=False, map_location="cpu")
    model.load_state_dict(state["model"])
    probe.load_state_dict(state["probe"])
    pointer = T.AttentionPointer(model, tuple(range(model.config.text_config.num_hidden_layers)))
    model.eval()
    image_id = tokenizer.convert_tokens_to_ids(T.FAMILY.chat.image)
    shape_column = list(LABEL_MAPS).index("shape")
    for distractors in (0, 3):
        batch, tasks = T.make_batch(VALIDATION_SEED, range(args.n), tokenizer, processor,
                                    T.Recipe(1, distractors, TASKS, dense=True, pointer=True, char_slots=args.char_slots))
        labels = batch.pop("aux_labels")
        rows, queries, keys = (batch.pop(k) for k in ("pointer_rows", "pointer_queries", "pointer_keys"))
        image = batch["input_ids"] == image_id
        objects = torch.zeros(image.shape)
        objects[image] = (labels[:, shape_column] > 0).float()
        with torch.no_grad():
            hits, losses, _ = T.score(model, batch)
            read = {kind: right / max(total, 1) for kind, (right, total) in probe.hits(labels).items() if total}
            if probe.cell_head is not None:
                cells = probe.cell_head(probe.hidden[image].float()).argmax(-1)
                read["cell"] = (cells == T.grid_thirds(batch["image_grid_thw"])).float().mean().item()
            head0 = {layer: w[rows, 0, queries].float() for layer, w in pointer.weights.items()}
        first = {}  # each example's first supervised query: the position predicting its first answer token
        for i, row in enumerate(rows.tolist()):
            first.setdefault(row, i)
        print(f"up to {distractors} distractors; probe accuracy on the visual tokens: "
              + ", ".join(f"{k} {v:.2f}" for k, v in read.items()))
        for task in TASKS:
            mine = [i for i, t in enumerate(tasks) if t == task]
            asked = [first[i] for i in mine if i in first]
            looks = []
            for layer, w in head0.items():
                evidence = (w[asked] * keys[asked]).sum(-1)
                on_objects = (w[asked] * torch.maximum(objects[rows[asked]], keys[asked])).sum(-1)
                looks.append(f"L{layer} {evidence.mean():.2f}" + (f" ({(evidence / on_objects.clamp_min(1e-9)).mean():.2f})" if distractors else ""))
            print(f"  {task:9s} exact {hits[mine].float().mean():.2f}  answer loss {losses[mine].mean():.3f}  "
                  f"head 0 mass on the evidence (its share of the mass on objects): {' '.join(looks)}")
    states, named = [], []
    for start in range(0, 4 * args.n, 48):
        batch, _ = T.make_batch(VALIDATION_SEED, range(start, start + 48), tokenizer, processor, T.Recipe(1, 3, TASKS, question=True))
        rows, queries, labels = (batch.pop(k) for k in ("question_rows", "question_queries", "question_labels"))
        batch.pop("labels")
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        states.append(torch.stack([h[rows, queries] for h in hidden]))
        named.append(labels)
    states, named = torch.cat(states, 1), torch.cat(named)
    for column, what in enumerate(("colour", "shape")):
        y = named[:, column]
        readable = " ".join(f"{name} {held_out_accuracy(x, y):.2f}" for name, x in zip(["embedding", *(f"L{i}" for i in range(len(states) - 1))], states))
        print(f"the {what} the question names (0: none), read at the answer position: {readable} "
              f"(majority class {y[2 * len(y) // 3:].bincount().max() / (len(y) - 2 * len(y) // 3):.2f})")


if __name__ == "__main__":
    main()
