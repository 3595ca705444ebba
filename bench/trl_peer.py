"""One timed run of a TRL trainer on alignflow's models: the peer side of
`bench/ppo_throughput.py --peer`. Not run by hand; ppo_throughput.py starts it in the peer's
Python (trl-ppo: a venv with TRL 1.12, the last release with PPOTrainer; trl-grpo: the
project's own TRL).

    python bench/trl_peer.py --spec spec.json --out result.json

The spec holds what both sides share: actor and reward model directories, prompts, rollouts
per step, new tokens (and whether every response runs to them), PPO epochs, minibatch, group
size, learning rates, KL coefficient, temperature, precision, steps. A "step" is what
alignflow calls one: sampling `batch` responses and every update made on them, so the times
compare directly (TRL's GRPO counts one optimizer update as its step: a generation feeds
`batch / minibatch` of them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def step_clock():
    """A TrainerCallback that keeps the wall time at the end of each TRL step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
    return Clock()


def prompt_texts(spec: dict, tok) -> list[str]:
    from stages.model import chat_prompt
    recs = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines() if line]
    return [chat_prompt(tok, r["prompt"]) for r in recs]


def common_args(spec: dict, out_dir: str) -> dict:
    import torch
    return dict(output_dir=out_dir, per_device_train_batch_size=spec["minibatch"],
                learning_rate=spec["lr"], lr_scheduler_type="constant",
                weight_decay=0.0, temperature=spec["temperature"], seed=spec["seed"],
                report_to=[], save_strategy="no", logging_steps=1,
                bf16=spec["precision"] == "bf16", use_cpu=not torch.cuda.is_available(),
                disable_tqdm=True)


def load(cls, path: str, spec: dict):
    """A model with its weights in spec["peer_weights"] (fp32 unless a bf16 run asked for
    bf16). bf16 weights under bf16=True's autocast (TRL's documented model_init_kwargs
    dtype=bfloat16 with bf16=True) are the fastest way TRL trains in bf16, with no fp32 master
    weights: AdamW updates bf16 weights, and an update below half a bf16 ulp is lost. fp32
    weights in a bf16 run: bf16 autocast over them (Accelerate's mixed precision), fp32 master
    weights as ours keep. min_new_tokens: no EOS before it, as ours with
    rollout.min_new_tokens (set on the model's generation config, which both trainers'
    generation configs inherit)."""
    model = cls.from_pretrained(path, dtype="bfloat16" if spec["peer_weights"] == "bf16"
                                else "float32")
    if spec["min_new_tokens"] and getattr(model, "generation_config", None) is not None:
        model.generation_config.min_new_tokens = spec["min_new_tokens"]
    return model


class Moved:
    """What share of a model's weights (elements) training changed: a copy of the weights
    as loaded, compared with the model after the run."""

    def __init__(self, model):
        self.model = model
        self.before = [p.detach().clone() for p in model.parameters()]

    def share(self) -> float:
        changed = sum((p.detach() != b).sum().item()
                      for p, b in zip(self.model.parameters(), self.before))
        return changed / sum(b.numel() for b in self.before)


def run_ppo(spec: dict, tok, texts: list[str], out_dir: str):
    """TRL 1.12's PPOTrainer (trl.experimental.ppo): policy, reference, reward and a value
    model started from the reward model, as alignflow's gae does."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    tok.padding_side = "left"
    ds = Dataset.from_dict({"input_ids": [tok(t, add_special_tokens=False)["input_ids"]
                                          for t in texts]})
    # TRL's rollout batch is per_device x accumulation steps, cut into num_mini_batches; the
    # same minibatches of `minibatch` rollouts as ours (its accumulation counter spans them, so
    # it makes one optimizer update per batch where we make one per minibatch: the same
    # forward and backward work, and an Adam step is small next to it).
    per_batch = spec["batch"] // spec["minibatch"]
    cfg = PPOConfig(**common_args(spec, out_dir), gradient_accumulation_steps=per_batch,
                    num_mini_batches=per_batch,
                    total_episodes=spec["batch"] * spec["steps"],
                    local_rollout_forward_batch_size=spec["batch"],
                    response_length=spec["new_tokens"], stop_token="eos",
                    num_ppo_epochs=spec["epochs"], kl_coef=spec["kl_coef"],
                    missing_eos_penalty=1.0, num_sample_generations=0)
    clock = step_clock()
    policy = load(AutoModelForCausalLM, spec["actor"], spec)
    moved = Moved(policy)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy,
                         ref_model=load(AutoModelForCausalLM, spec["actor"], spec),
                         reward_model=load(AutoModelForSequenceClassification, spec["reward"],
                                           spec),
                         value_model=load(AutoModelForSequenceClassification, spec["reward"],
                                          spec),
                         train_dataset=ds, callbacks=[clock])
    trainer.train()
    return clock, 1, moved.share()


def run_grpo(spec: dict, tok, texts: list[str], out_dir: str):
    """TRL's GRPOTrainer with the reward model as its reward function; one generation of
    `batch` completions (batch / group_size prompts) feeds batch / minibatch updates."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import GRPOConfig, GRPOTrainer
    per_gen = spec["batch"] // spec["minibatch"]
    cfg = GRPOConfig(**common_args(spec, out_dir), gradient_accumulation_steps=1,
                     steps_per_generation=per_gen,
                     num_generations=spec["group_size"],
                     max_completion_length=spec["new_tokens"], num_iterations=spec["epochs"],
                     beta=spec["kl_coef"], max_steps=spec["steps"] * per_gen * spec["epochs"],
                     top_k=None, top_p=1.0, generation_kwargs={"min_new_tokens": spec[
                         "min_new_tokens"]} if spec["min_new_tokens"] else None)
    rm = load(AutoModelForSequenceClassification, spec["reward"], spec)
    clock = step_clock()
    policy = load(AutoModelForCausalLM, spec["actor"], spec)
    moved = Moved(policy)
    trainer = GRPOTrainer(model=policy,
                          reward_funcs=[rm], reward_processing_classes=[tok], args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": texts}),
                          processing_class=tok, callbacks=[clock])
    trainer.train()
    return clock, per_gen * spec["epochs"], moved.share()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    import torch
    import trl
    from stages.model import load_tokenizer
    torch.manual_seed(spec["seed"])
    tok = load_tokenizer(spec["actor"])
    texts = prompt_texts(spec, tok)
    with tempfile.TemporaryDirectory(prefix="alignflow-peer-") as tmp:
        run = run_ppo if spec["peer"] == "trl-ppo" else run_grpo
        clock, per_step, weights_changed = run(spec, tok, texts, tmp)
    # One alignflow step = per_step TRL steps; the first step's time counts from train begin.
    ends = [clock.begin] + clock.ends[per_step - 1::per_step]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    Path(args.out).write_text(json.dumps({"peer": spec["peer"], "trl": trl.__version__,
                                          "threads": torch.get_num_threads(),
                                          "step_s": steps,
                                          "weights_changed": weights_changed}))


if __name__ == "__main__":
    main()
