"""Generations of several models side by side, e.g. the base, SFT and PPO models of one lineage.

    python -m stages.sample demo-pretrain demo-sft demo-ppo --prompt "Sort in ascending order: 3 1 2"
    (or: alignflow sample MODEL [MODEL ...] --prompt ...)

Chat models (with a chat template) get the prompt as a user turn; a pretrained model continues
the raw text. Sampling is seeded, so a rerun prints the same text.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

import torch

from stages.artifacts import ArtifactError, ArtifactStore
from stages.configfile import ConfigError
from stages.model import chat_prompt, load_tokenizer, parent_model


def generate(path, prompts: list[str], args) -> list[str]:
    from transformers import AutoModelForCausalLM
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        torch.manual_seed(args.seed)
        text = chat_prompt(tok, p) if tok.chat_template else p
        enc = tok(text, return_tensors="pt", add_special_tokens=not tok.chat_template)
        sampling = {"do_sample": False} if args.temperature == 0 else {
            "do_sample": True, "temperature": args.temperature, "top_k": args.top_k or None,
            "top_p": args.top_p}
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 **sampling)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="alignflow sample", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="model refs: name, name@N, digest prefix")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    store = ArtifactStore(args.store)
    try:
        arts = [parent_model(store, ref, "model", causal=True) for ref in args.models]
    except (ArtifactError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = [f"{a.manifest.get('name') or a.stage}@{a.short}" for a in arts]
    answers = {label: generate(a.local_path(), args.prompt, args) for label, a in
               zip(labels, arts)}
    if args.json:
        print(json.dumps([{"prompt": q, **{l: answers[l][i] for l in labels}}
                          for i, q in enumerate(args.prompt)], indent=2))
        return 0
    width = max(len(l) for l in labels)
    for i, q in enumerate(args.prompt):
        print(f"\n>>> {q}")
        for label in labels:
            text = answers[label][i].strip().replace("\n", " / ") or "(empty)"
            body = textwrap.wrap(text, 100 - width) or [""]
            print(f"  {label:<{width}}  {body[0]}")
            for line in body[1:]:
                print(f"  {'':<{width}}  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
