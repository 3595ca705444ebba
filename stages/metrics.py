"""One metric vocabulary for the four stages and every consumer of their manifests.

Names are `group/name[/detail]`, as TRL's trainers log them, so the CLI, the Prefect report,
the lineage labels and the curves group by prefix and never need a stage's metric names:

    train/loss train/lr train/grad_norm           the optimizer's side, per step
    eval/loss eval/loss/<domain> eval/ppl          held-out loss (pretrain: next token; sft: answer)
    eval/accuracy eval/accuracy/<family>           held-out pairwise accuracy (rm)
    gold/accuracy gold/accuracy/<family> gold/n    greedy answers the task checker accepts
    gold/sampled_accuracy gold/sampled_n           answers sampled as in training (ppo)
    gold/eos_rate                                  greedy answers that ended
    rl/reward rl/sampled_reward rl/kl rl/eos_rate  held-out RM reward and KL to the reference (ppo)
    rl/beta rl/reward_hacking
    rl/rm_pairwise_accuracy rl/rm_pairs            the RM's ordering of right and wrong sampled
                                                   answers to one held-out prompt (ppo)
    rollout/*  loss/*  policy/*  critic/*          one PPO step's batch and updates
    rm/reward_mean rm/reward_std rm/margin         the reward model's score distribution
    data/*  model/params  perf/*                   sizes and speed
    baseline/<name>                                the parent's figure by the same function
                                                   (pretrain: the unigram model's)

Each stage also writes a headline (`headline()` below) into its manifest: the figure that says
whether the stage did its job, its baseline, the verdict and the sentence to show.
"""

from __future__ import annotations

BASELINE = "baseline/"

# Manifests written before the vocabulary (alignflow <= 0.1, round 1) stay readable: these
# flat names map to the namespaced ones. Per-family keys are mapped by prefix below.
OLD_NAMES = {
    "val_loss": "eval/loss", "val_ppl": "eval/ppl", "unigram_val_loss": "baseline/eval/loss",
    "train_tokens": "data/train_tokens", "params": "model/params",
    "heldout_loss": "eval/loss", "parent_heldout_loss": "baseline/eval/loss",
    "gold_accuracy": "gold/accuracy", "parent_gold_accuracy": "baseline/gold/accuracy",
    "sft_gold_accuracy": "baseline/gold/accuracy", "eos_rate": "gold/eos_rate",
    "train_examples": "data/train_examples", "dropped_too_long": "data/dropped_too_long",
    "train_loss": "train/loss", "pairwise_accuracy": "eval/accuracy",
    "reward_margin": "rm/margin", "reward_std": "rm/reward_std", "pairs": "data/eval_pairs",
    "train_pairs": "data/train_pairs", "policy_pairs": "data/policy_pairs",
    "sft_reward_mean": "baseline/rl/reward", "kl": "rl/kl", "final_beta": "rl/beta",
    "reward_hacking": "rl/reward_hacking", "sampled_reward": "rl/sampled_reward",
    "sft_sampled_reward": "baseline/rl/sampled_reward",
    "sampled_gold_accuracy": "gold/sampled_accuracy",
    "sft_sampled_gold_accuracy": "baseline/gold/sampled_accuracy",
    "n_gold": "gold/n", "n_sampled_gold": "gold/sampled_n", "rows": "data/rows",
    "tokens": "data/tokens", "documents": "data/documents", "chars": "data/chars",
    "vocab_size": "data/vocab_size",
}


def canonical(metrics: dict, stage: str | None = None) -> dict:
    """Metrics under today's names; namespaced ones pass through unchanged."""
    out = {}
    for k, v in metrics.items():
        if k.startswith("val_loss/"):
            out[f"eval/loss/{k[9:]}"] = v
        elif "/" in k:
            out[k] = v
        elif k == "reward_mean":     # the RM's score mean; PPO's held-out RM reward
            out["rl/reward" if stage == "ppo" else "rm/reward_mean"] = v
        elif k.endswith("_by_task") or k.endswith("_by_family"):
            base = "gold/accuracy" if k.startswith("gold") else "eval/accuracy"
            out.update({f"{base}/{f}": a for f, a in (v or {}).items()})
        elif k.startswith("sft_gold_"):
            out[f"baseline/gold/accuracy/{k[9:]}"] = v
        elif k.startswith("gold_") and k not in OLD_NAMES:
            out[f"gold/accuracy/{k[5:]}"] = v
        else:
            out[OLD_NAMES.get(k, k)] = v
    return out


def with_baseline(current: dict, baseline: dict) -> dict:
    """`current`, and `baseline`'s figures under baseline/ for the keys both have."""
    return {**current, **{BASELINE + k: v for k, v in baseline.items() if k in current}}


def verdict(value: float, baseline: float, better: str) -> str:
    wins = value < baseline if better == "lower" else value > baseline
    return "beats" if wins else "does NOT beat"


def headline(metric: str, value: float | None, text: str, *, baseline: float | None = None,
             verdict: str | None = None, target: float | None = None) -> dict:
    """What a stage says about itself: consumers print `text` and may tabulate the rest."""
    return {"metric": metric, "value": value, "baseline": baseline, "verdict": verdict,
            "target": target, "text": text}


def headline_of(manifest: dict) -> dict:
    """The manifest's headline; for one written before headlines, its first key metric."""
    if manifest.get("headline"):
        return manifest["headline"]
    m = canonical(manifest.get("metrics", {}), manifest.get("stage"))
    for k in KEY_METRICS:
        if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool):
            b = m.get(BASELINE + k)
            return headline(k, m[k], f"{k} {m[k]:.4g}" + (f" (baseline {b:.4g})"
                                                           if isinstance(b, float) else ""),
                            baseline=b)
    return headline(None, None, "")


# What a lineage node or a version list shows first, in this order, where present.
KEY_METRICS = ("eval/loss", "gold/accuracy", "eval/accuracy", "rl/reward", "rl/kl",
               "data/tokens", "data/documents", "data/rows")
