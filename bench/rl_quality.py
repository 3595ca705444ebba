"""RL quality on the demo: does RL raise gold accuracy beyond the paired noise, by estimator
(gae = PPO with a critic, grpo) and reward source (the RM, the task checker), over seeds?

    .venv/bin/python bench/rl_quality.py [--seeds 1 2 3] [--split test] [--steps N] [k=v ...]

Runs the ppo stage under the deepspeed launcher from the demo's SFT model against its reward
model (run `bash scripts/demo.sh` first), one run per (estimator, reward source, seed); runs
already in the store with the same inputs are reused, so a second invocation only reads. The
greedy change per run is PPO's gold accuracy minus SFT's on the same held-out prompts, with
the paired standard error over prompts (the stage's gold/delta, gold/delta_se); over seeds,
means, and the standard error of the mean change (sqrt(sum se^2) / seeds). Writes
bench/results/rl_quality.json. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

RUNS = (("gae", "rm"), ("gae", "checker"), ("grpo", "rm"), ("grpo", "checker"))


def one_run(advantage: str, source: str, seed: int, args, home: str, env: dict) -> dict:
    from flows.launch import build_command, run_stage
    from stages.artifacts import ArtifactStore
    store = Path(home) / "store"
    overrides = [f"run.store={store}", f"run.name=bench-rl-{advantage}-{source}-s{seed}",
                 f"run.seed={seed}", f"ppo.advantage={advantage}",
                 f"ppo.reward_source={source}", f"data.eval_split={args.split}",
                 *([f"train.max_steps={args.steps}", f"train.eval_every={args.steps}"]
                   if args.steps else []),
                 *args.overrides, *[kv.split(":", 1)[1] for kv in args.set
                                    if kv.split(":", 1)[0] == advantage]]
    t0 = time.time()
    code, digest = run_stage(build_command("ppo", args.config, overrides),
                             env={"ALIGNFLOW_HOME": home, **env},
                             on_line=lambda l: print(f"    {l}") if "[alignflow] held" in l
                             or "rror" in l else None)
    if code != 0 or not digest:
        sys.exit(f"ppo failed ({advantage}, {source}, seed {seed}) with exit code {code}; do "
                 f"demo-sft and demo-rm exist? (bash scripts/demo.sh)")
    art = ArtifactStore(store).get(digest, verify=False)
    m = art.manifest["metrics"]
    print(f"  {advantage:<5} {source:<8} seed {seed}: greedy {m['baseline/gold/accuracy']:.3f} "
          f"-> {m['gold/accuracy']:.3f} ({m['gold/delta']:+.3f} +- {m['gold/delta_se']:.3f}), "
          f"KL {m['rl/kl']:.2f}  [{time.time() - t0:.0f} s, {art.short}]", flush=True)
    return {"digest": digest, "config": art.manifest["config"], **m}


def summarize(advantage: str, source: str, runs: list[dict]) -> dict:
    def mean(key):
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        return statistics.fmean(vals) if vals else None
    deltas = [r["gold/delta"] for r in runs]
    return {
        "advantage": advantage, "reward_source": source,
        "seeds": [r["config"]["run"]["seed"] for r in runs],
        "greedy_gold_sft": mean("baseline/gold/accuracy"), "greedy_gold": mean("gold/accuracy"),
        "greedy_delta": statistics.fmean(deltas),
        "greedy_delta_se": math.sqrt(sum(r["gold/delta_se"] ** 2 for r in runs)) / len(runs),
        "greedy_delta_by_seed": deltas,
        "sampled_gold_sft": mean("baseline/gold/sampled_accuracy"),
        "sampled_gold": mean("gold/sampled_accuracy"), "sampled_delta": mean("gold/sampled_delta"),
        "kl": mean("rl/kl"), "kl_target": runs[0]["config"]["kl"]["target"],
        # The RM's ordering of a right and a wrong sampled answer to one prompt, on SFT's
        # samples and on the result's: what the policy can exploit.
        "rm_pairwise_on_sft_samples": mean("baseline/rl/rm_pairwise_accuracy"),
        "rm_pairwise_on_rl_samples": mean("rl/rm_pairwise_accuracy"),
        "reward_hacking": [r.get("rl/reward_hacking") for r in runs],
        "heldout_prompts": runs[0].get("gold/n"),
        "steps": runs[0]["config"]["train"]["max_steps"], "digests": [r["digest"] for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo/ppo.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--split", default="test", choices=["validation", "test", "all"])
    ap.add_argument("--steps", type=int, default=None, help="default: the config's max_steps")
    ap.add_argument("--only", nargs="*", default=None, metavar="ADV:SOURCE",
                    help="a subset of the runs, e.g. grpo:checker")
    ap.add_argument("--set", nargs="*", default=[], metavar="ADV:KEY=VALUE",
                    help="an override for one estimator's runs, e.g. grpo:optim.lr=3e-4")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, the cores split among them (tiny models use many "
                    "threads poorly)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("overrides", nargs="*", help="more stage overrides for every run")
    args = ap.parse_args()
    from common import machine_info

    home = os.environ.get("ALIGNFLOW_HOME", str(REPO / ".alignflow"))
    todo = [r for r in RUNS if args.only is None or f"{r[0]}:{r[1]}" in args.only]
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if args.jobs > 1 else {}
    with ThreadPoolExecutor(args.jobs) as pool:
        done = {(a, s, seed): pool.submit(one_run, a, s, seed, args, home, env)
                for a, s in todo for seed in args.seeds}
        rows = [summarize(a, s, [done[a, s, seed].result() for seed in args.seeds])
                for a, s in todo]
    print(f"\n  {'estimator':<9} {'reward':<8} {'greedy SFT -> RL':<18} {'change +- SE':<16} "
          f"{'sampled SFT -> RL':<18} KL (target)")
    for r in rows:
        beyond = abs(r["greedy_delta"]) > 2 * r["greedy_delta_se"]
        print(f"  {r['advantage']:<9} {r['reward_source']:<8} "
              f"{r['greedy_gold_sft']:.3f} -> {r['greedy_gold']:.3f}    "
              f"{r['greedy_delta']:+.3f} +- {r['greedy_delta_se']:.3f}{'*' if beyond else ' '}  "
              f"{r['sampled_gold_sft']:.3f} -> {r['sampled_gold']:.3f}    "
              f"{r['kl']:.2f} ({r['kl_target']:g})")
    print(f"  * beyond two standard errors; {len(args.seeds)} seeds, split {args.split}, "
          f"{rows[0]['heldout_prompts']} held-out prompts")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"runs": rows, "split": args.split, "steps": rows[0]["steps"], "config": args.config,
              "overrides": args.overrides, "set": args.set, "machine": machine_info(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "rl_quality.json").write_text(json.dumps(result, indent=2))
    print(f"  written to {out / 'rl_quality.json'}")


if __name__ == "__main__":
    main()
