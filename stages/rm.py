"""Stage rm: a reward model (one score per sequence) from an SFT model, with TRL.

    deepspeed --num_gpus 2 --module stages.rm --config configs/tiny/rm.yaml [k=v ...]

setup:    validate config, SFT parent and preference set.
data:     rank 0 builds or reuses the set, and samples the parent's own wrong answers as extra
          negatives; pairs longer than max_length are dropped and counted.
models:   the SFT model with a fresh scalar score head; TRL's RewardTrainer, pairwise loss
          -logsigmoid(chosen - rejected [- margin]) plus a small centering term.
resume:   the newest checkpoint the trainer wrote.
train:    trainer.train, checkpoints every N steps.
evaluate: held-out pairwise accuracy (by family), and the mean and std of rewards over the
          held-out set, which PPO normalizes with.
export:   HF safetensors (AutoModelForSequenceClassification) with the tokenizer.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from stages import data as D
from stages import engine as E
from stages import metrics as M
from stages import stage as S
from stages.artifacts import ArtifactStore
from stages.config import RMConfig
from stages.configfile import ConfigError
from stages.examples import load_example_set, read_jsonl
from stages.model import chat_length, load_tokenizer, parent_model, rm_scores


def preflight(cfg: RMConfig, store: ArtifactStore):
    """Every check that can fail before the first expensive step."""
    parent = parent_model(store, cfg.parent, "parent", causal=True, stages=("sft",))
    ds = load_example_set(cfg.data.dataset)
    if ds.kind != "preference":
        raise ConfigError(f"{cfg.data.dataset}: kind is '{ds.kind}', stage rm needs 'preference'")
    tok = load_tokenizer(parent.local_path())
    if tok.pad_token is None:
        raise D.DataError(f"parent {cfg.parent}: tokenizer has no pad token")
    if not tok.chat_template:
        raise D.DataError(f"parent {cfg.parent}: tokenizer has no chat template (not an SFT model)")
    return parent


def conversational(recs: list[dict]) -> list[dict]:
    """TRL's conversational preference rows; `family` (task family or source) is popped off
    before training and used to break held-out accuracy down."""
    out = []
    for r in recs:
        ex = {"family": r.get("task") or r.get("source", ""),
              "prompt": [{"role": "user", "content": r["prompt"]}],
              "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        if "margin" in r:
            ex["margin"] = r["margin"]
        out.append(ex)
    return out


def drop_too_long(recs: list[dict], tok, max_length: int) -> tuple[list[dict], int]:
    keep = [r for r in recs if max(chat_length(tok, r["prompt"] + r[k])
                                   for k in ("chosen", "rejected")) <= max_length]
    return keep, len(recs) - len(keep)


def policy_pairs(parent, tok, recs: list[dict], cfg: RMConfig, seed: int) -> list[dict]:
    """(prompt, known answer, the parent's wrong sample) for task records with an answer."""
    from transformers import AutoModelForCausalLM
    from stages.model import sample_answers
    from stages.tasks import check
    tasks = list({r["prompt"]: r for r in recs if "answer" in r}.values())
    if not tasks:
        return []
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(parent.local_path(), dtype=torch.float32)
    samples = sample_answers(model, tok, [r["prompt"] for r in tasks], cfg.data.policy_samples,
                             cfg.data.policy_temperature, cfg.data.policy_max_new_tokens)
    out = []
    for r, answers in zip(tasks, samples):
        for a in dict.fromkeys(answers):
            if not check(r["answer"], a) and a.strip() != r["answer"].strip():
                out.append({"task": r.get("task"), "source": "policy", "prompt": r["prompt"],
                            "chosen": r["answer"], "rejected": a})
    return out


def main(argv: list[str] | None = None) -> None:
    # --- setup: config, the checks that fail in a second, the ranks --------------------------
    run, parent = S.setup(RMConfig, "rm", argv, preflight)
    cfg, d = run.cfg, run.d

    # --- data: rank 0 builds (or reuses) the preference set and samples the parent's mistakes
    data_art = S.example_set(run, cfg.data.dataset)
    if S.reused(run, model=parent.digest, dataset=data_art.digest):
        return
    tok = load_tokenizer(parent.local_path())
    train_raw = read_jsonl(data_art.local_path() / "train.jsonl")
    eval_raw = read_jsonl(data_art.local_path() / "eval.jsonl")[: cfg.data.eval_examples]
    policy = {"train": [], "eval": []}
    if cfg.data.policy_samples:
        # Rank 0 samples once; every rank trains on the same pairs.
        policy = E.on_rank0(lambda: {"train": policy_pairs(parent, tok, train_raw, cfg, 1),
                                     "eval": policy_pairs(parent, tok, eval_raw, cfg, 2)}, d)
        E.log(d, f"policy samples: {len(policy['train'])} train / {len(policy['eval'])} eval "
                 f"wrong answers of the parent become rejected answers")
    train, dropped = drop_too_long(conversational(train_raw + policy["train"]), tok,
                                   cfg.data.max_length)
    evalset, dropped_eval = drop_too_long(conversational(eval_raw), tok, cfg.data.max_length)
    policy_eval, _ = drop_too_long(conversational(policy["eval"]), tok, cfg.data.max_length)
    families = [r.pop("family") for r in evalset]
    for r in train + policy_eval:
        r.pop("family")
    E.log(d, f"rm {run.name}: {len(train)} train / {len(evalset)} eval pairs; dropped "
             f"{dropped} + {dropped_eval} longer than data.max_length={cfg.data.max_length}")
    if not train or not evalset:
        raise D.DataError(f"{cfg.data.dataset}: no pairs left within data.max_length")
    run.mark("data")

    # --- models: the SFT model with a fresh scalar head; TRL's trainer -----------------------
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(
        parent.local_path(), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    ds_cfg = E.deepspeed_config(cfg.deepspeed, cfg.train, cfg.optim, d.world)
    args = RewardConfig(**E.trainer_args(run, ds_cfg),
                        center_rewards_coefficient=cfg.center_rewards_coefficient or None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                            eval_dataset=Dataset.from_list(evalset), processing_class=tok)

    run.mark("models")

    # --- resume and train: TRL's trainer, from the newest checkpoint it wrote ----------------
    S.fit(trainer, run)
    run.mark("train")

    # --- evaluate and export: held-out pairs, and the reward statistics PPO normalizes with --
    export = run.work / "export"
    trainer.save_model(str(export))
    dist.barrier()
    if d.main:
        E.trainer_args_as_json(export, args)
        tok.save_pretrained(export)
        result = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32)
        chosen, rejected = pair_scores(result, tok, evalset)
        both = torch.cat([chosen, rejected])
        stats = {"reward_mean": both.mean().item(), "reward_std": both.std().item(),
                 "pairs": len(evalset)}
        (export / "reward_stats.json").write_text(json.dumps(stats, indent=2))
        right = (chosen > rejected).tolist()
        final = {"eval/accuracy": (chosen > rejected).float().mean().item(),
                 **{f"eval/accuracy/{f}": sum(ok for ok, g in zip(right, families) if g == f)
                    / families.count(f) for f in sorted(set(families))}}
        if policy_eval:  # held-out wrong answers the SFT model actually gives
            pc, pr = pair_scores(result, tok, policy_eval)
            final["eval/accuracy/policy_samples"] = (pc > pr).float().mean().item()
            with open(export / "policy_pairs.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in policy["train"])
        final.update({"rm/margin": (chosen - rejected).mean().item(),
                      "rm/reward_mean": stats["reward_mean"], "rm/reward_std": stats["reward_std"],
                      "data/eval_pairs": len(evalset), "data/train_pairs": len(train),
                      "data/policy_pairs": len(policy["train"]),
                      "data/dropped_too_long": dropped + dropped_eval})
        run.mark("evaluate")
        S.export(run, export, metrics=final, headline=headline(final, cfg.target_accuracy),
                 datasets={"train": {"digest": data_art.digest, "pairs": len(train)}},
                 train_log=E.hf_log(trainer.state.log_history))
    E.shutdown(d)


def pair_scores(model, tok, recs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected for each conversational pair, as PPO will score them."""
    model.eval()
    prompts = [r["prompt"][0]["content"] for r in recs]
    return tuple(rm_scores(model, tok, prompts, [r[k][0]["content"] for r in recs])
                 for k in ("chosen", "rejected"))


def headline(m: dict, target: float) -> dict:
    acc = m["eval/accuracy"]
    verdict = "meets" if acc >= target else "is below"
    families = " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in m.items()
                        if k.startswith("eval/accuracy/"))
    return M.headline("eval/accuracy", acc, verdict=verdict, target=target, text=(
        f"held-out pairwise accuracy {acc:.3f} ({verdict} the {target:.2f} target; {families}); "
        f"rewards {m['rm/reward_mean']:.2f} +- {m['rm/reward_std']:.2f}"))


if __name__ == "__main__":
    E.run(main)
