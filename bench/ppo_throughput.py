"""PPO stage throughput: rollout tokens/s, PPO step time, and the share of a step spent generating.

    .venv/bin/python bench/ppo_throughput.py [--config configs/demo/ppo.yaml] [--steps 12]
                                             [--skip 2] [k=v ...]

Runs the stage under the deepspeed launcher (forced, so it trains even if the inputs are
unchanged) on the actor and reward model its config names; run the demo first
(`bash scripts/demo.sh`) so demo-sft and demo-rm exist. Figures are medians over the steps after
`--skip` warm-up steps. Prints them and writes bench/results/ppo_throughput-<device>.json.
A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo/ppo.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from flows.launch import build_command, run_stage
    from common import machine_info, save
    from stages.config import PPOConfig
    from stages.configfile import load_config

    work = Path(tempfile.mkdtemp(prefix="alignflow-bench-ppo-"))
    home = os.environ.get("ALIGNFLOW_HOME", str(REPO / ".alignflow"))
    overrides = [f"run.store={Path(home) / 'store'}", f"run.work_dir={work}",
                 "run.name=bench-ppo", "run.log_every=1", "run.force=true",
                 f"train.max_steps={args.steps}", "train.eval_every=1000000",
                 "checkpoint.every_steps=1000000", *args.overrides]
    cfg = load_config(PPOConfig, REPO / args.config, overrides)
    t0 = time.time()
    code, digest = run_stage(build_command("ppo", args.config, overrides),
                             env={"ALIGNFLOW_HOME": home},
                             on_line=lambda l: print(l) if "[alignflow]" in l or "rror" in l
                             else None)
    wall = time.time() - t0
    if code != 0:
        sys.exit(f"stage failed with exit code {code} (do demo-sft and demo-rm exist? run "
                 f"bash scripts/demo.sh first)")
    (path,) = work.glob("*/metrics.jsonl")
    rows = [json.loads(l) for l in path.read_text().splitlines()][args.skip:]

    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)
    result = {"benchmark": "ppo_throughput", "config": args.config, "overrides": args.overrides,
              "rollouts_per_step": cfg.train.global_batch_size,
              "max_new_tokens": cfg.rollout.max_new_tokens, "ppo_epochs": cfg.ppo.epochs,
              "measured_steps": len(rows), "step_s_median": med("perf/step_s"),
              "rollout_tokens_per_s_median": med("perf/gen_tokens_per_s"),
              "train_tokens_per_s_median": med("perf/train_tokens_per_s"),
              "generation_share_median": med("perf/generation_share"),
              "response_length_median": med("rollout/response_length"), "wall_s": wall,
              "machine": machine_info(), "artifact": digest,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"\nppo throughput ({args.config}, {len(rows)} steps measured, "
          f"{result['rollouts_per_step']} rollouts/step, {cfg.ppo.epochs} PPO epochs)")
    print(f"  PPO step time (median)          : {result['step_s_median']:.3f} s")
    print(f"  rollout generation (median)     : {result['rollout_tokens_per_s_median']:.0f} "
          f"tokens/s")
    print(f"  PPO update (median)             : {result['train_tokens_per_s_median']:.0f} "
          f"tokens/s")
    print(f"  share of the step generating    : {result['generation_share_median']:.1%}")
    print(f"  response length (median)        : {result['response_length_median']:.1f} tokens")
    save(result, args.out, "ppo_throughput")


if __name__ == "__main__":
    main()
