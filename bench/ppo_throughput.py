"""PPO stage throughput: rollout tokens/s, PPO step time, the share of a step spent generating,
and, with --peer, the step time of TRL's trainer on the same models and batch, side by side.

    .venv/bin/python bench/ppo_throughput.py [--config configs/demo/ppo.yaml] [--steps 12]
                                             [--skip 2] [k=v ...]
    .venv/bin/python bench/ppo_throughput.py --peer trl-ppo  [--rounds 3] [k=v ...]
    .venv/bin/python bench/ppo_throughput.py --peer trl-grpo [--rounds 3] [k=v ...]
    ... --peer trl-ppo --peer-weights fp32 deepspeed.precision=bf16     # like for like in bf16

Runs the stage under the deepspeed launcher (forced, so it trains even if the inputs are
unchanged) on the actor and reward model its config names; run the demo first
(`bash scripts/demo.sh`) so demo-sft and demo-rm exist. Figures are medians over the steps after
`--skip` warm-up steps. Prints them and writes bench/results/ppo_throughput-<device>.json.

--peer: `trl-ppo` is TRL 1.12's PPOTrainer (trl.experimental.ppo, the last release that had
it), installed by this script into its own venv (bench/.venvs/trl-1.12, which reads every other
package from the project's venv); `trl-grpo` is the project's TRL GRPOTrainer. Our side runs the
matching estimator (gae, or grpo with the KL in the loss as TRL puts it) with --epochs PPO
epochs; both get the same actor, reward model, training prompts, rollouts per step, new tokens,
minibatch, group size, learning rate, KL coefficient, temperature and precision (our
deepspeed.precision; bf16 runs on a CPU with AVX512-BF16 or AMX), and the same thread count. With
rollout.min_new_tokens=N no response on either side ends before N tokens (the peer by
min_new_tokens too), so a "32 new tokens" run with N = 32 generates and trains on 32 tokens a
response on both sides, not until an early EOS.
In bf16, --peer-weights says how the peer keeps its weights: "bf16" (TRL's fastest: the model
loaded in bf16, no fp32 master weights, so AdamW's updates below half a bf16 ulp are lost) or
"fp32" (bf16 autocast over fp32 weights, fp32 master weights as ours). The peer reports the
share of its policy's weights the run changed (`peer_weights_changed` in each round).
The two alternate, --rounds times (the order flips each round, so a machine that drifts is
shared out), and the figures are medians over rounds of each round's median step. Writes
bench/results/ppo_vs_<peer>[-<label>]-<device>.json. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PEER_TRL = {"trl-ppo": "1.12.0", "trl-grpo": None}   # None: the project's own TRL


def run_ours(args, overrides: list[str], home: str, env: dict):
    """One forced stage run; (the metrics rows after --skip, the artifact's manifest)."""
    from flows.launch import build_command, run_stage
    from stages.artifacts import ArtifactStore
    work = Path(tempfile.mkdtemp(prefix="alignflow-bench-ppo-"))
    overrides = [f"run.store={Path(home) / 'store'}", f"run.work_dir={work}",
                 "run.name=bench-ppo", "run.log_every=1", "run.force=true",
                 f"train.max_steps={args.steps}", "train.eval_every=1000000",
                 "data.eval_prompts=8", "data.eval_samples=0",
                 "checkpoint.every_steps=1000000", *overrides]
    code, digest = run_stage(build_command("ppo", args.config, overrides),
                             env={"ALIGNFLOW_HOME": home, **env},
                             on_line=lambda l: print(l) if "[alignflow]" in l or "rror" in l
                             else None)
    if code != 0:
        sys.exit(f"stage failed with exit code {code} (do the actor and reward model exist? "
                 f"for the demo: bash scripts/demo.sh first)")
    (path,) = work.glob("*/metrics.jsonl")
    rows = [json.loads(l) for l in path.read_text().splitlines()][args.skip:]
    return rows, ArtifactStore(Path(home) / "store").get(digest, verify=False)


def peer_python(peer: str) -> str:
    """The interpreter that runs the peer: the project's, or a venv with the old TRL on top of
    the project's packages (a .pth file), so only TRL differs."""
    version = PEER_TRL[peer]
    if version is None:
        return sys.executable
    venv = REPO / "bench" / ".venvs" / f"trl-{version.rsplit('.', 1)[0]}"
    py = venv / "bin" / "python"
    probe = [str(py), "-c", f"import trl; assert trl.__version__ == '{version}'"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(py)
    print(f"  installing trl=={version} into {venv.relative_to(REPO)}", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    import site
    (site_dir,) = venv.glob("lib/python*/site-packages")
    (site_dir / "zz-alignflow.pth").write_text(site.getsitepackages()[0] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", f"trl=={version}"],
                   check=True)
    subprocess.run(probe, check=True)
    return str(py)


def run_peer(peer: str, spec: dict, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="alignflow-peer-") as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([peer_python(peer), str(REPO / "bench" / "trl_peer.py"),
                               "--spec", str(spec_path), "--out", str(out)], cwd=REPO,
                              env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{peer} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def peer_spec(args, cfg, art, home: str, weights: str) -> dict:
    """What the peer gets: the models and prompts our run resolved, and the shared settings."""
    from stages.engine import precision
    roles = {p["role"]: p["digest"] for p in art.parents}
    store = Path(home) / "store" / "artifacts"
    return {"peer": args.peer, "actor": str(store / roles["actor"]),
            "reward": str(store / roles["reward"]),
            "prompts": str(store / roles["prompts"] / "train.jsonl"),
            "batch": cfg.train.global_batch_size, "minibatch": cfg.ppo.minibatch_size,
            "new_tokens": cfg.rollout.max_new_tokens, "epochs": cfg.ppo.epochs,
            "group_size": cfg.ppo.group_size, "lr": cfg.optim.lr, "kl_coef": cfg.kl.coef,
            "temperature": cfg.rollout.temperature, "steps": args.steps,
            "seed": cfg.run.seed, "precision": precision(cfg.deepspeed),
            "min_new_tokens": cfg.rollout.min_new_tokens, "peer_weights": weights}


def throughput(args) -> None:
    """Our stage alone: step time, generation share, tokens/s."""
    from common import save
    from stages.config import PPOConfig
    from stages.configfile import load_config
    home = os.environ.get("ALIGNFLOW_HOME", str(REPO / ".alignflow"))
    cfg = load_config(PPOConfig, REPO / args.config, args.overrides)
    t0 = time.time()
    rows, art = run_ours(args, args.overrides, home, {})
    wall = time.time() - t0

    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)
    result = {"benchmark": "ppo_throughput", "config": args.config, "overrides": args.overrides,
              "rollouts_per_step": cfg.train.global_batch_size,
              "max_new_tokens": cfg.rollout.max_new_tokens, "ppo_epochs": cfg.ppo.epochs,
              "advantage": cfg.ppo.advantage,
              "measured_steps": len(rows), "step_s_median": med("perf/step_s"),
              "rollout_tokens_per_s_median": med("perf/gen_tokens_per_s"),
              "train_tokens_per_s_median": med("perf/train_tokens_per_s"),
              "generation_share_median": med("perf/generation_share"),
              "rollout_share_median": med("perf/rollout_share"),
              "response_length_median": med("rollout/response_length"), "wall_s": wall,
              "artifact": art.digest}
    print(f"\nppo throughput ({args.config}, {len(rows)} steps measured, "
          f"{result['rollouts_per_step']} rollouts/step, {cfg.ppo.epochs} PPO epochs)")
    print(f"  PPO step time (median)          : {result['step_s_median']:.3f} s")
    print(f"  rollout generation (median)     : {result['rollout_tokens_per_s_median']:.0f} "
          f"tokens/s")
    print(f"  PPO update (median)             : {result['train_tokens_per_s_median']:.0f} "
          f"tokens/s")
    print(f"  share of the step generating    : {result['generation_share_median']:.1%}")
    print(f"  ... and scoring (the rollout)   : {result['rollout_share_median']:.1%}")
    print(f"  response length (median)        : {result['response_length_median']:.1f} tokens")
    save(result, args.out, "ppo_throughput")


def side_by_side(args) -> None:
    from common import save
    from stages.config import PPOConfig
    from stages.configfile import load_config
    from stages.engine import precision
    home = os.environ.get("ALIGNFLOW_HOME", str(REPO / ".alignflow"))
    grpo = args.peer == "trl-grpo"
    ours_over = [f"ppo.epochs={args.epochs}",
                 *(["ppo.advantage=grpo", "kl.placement=loss", "kl.adaptive=false"] if grpo
                   else ["ppo.advantage=gae", "kl.placement=reward", "kl.adaptive=false"]),
                 *args.overrides]
    cfg = load_config(PPOConfig, REPO / args.config, ours_over)
    threads = str(args.threads or os.cpu_count())
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    config = {"config": args.config, "overrides": ours_over,
              "rollouts_per_step": cfg.train.global_batch_size,
              "max_new_tokens": cfg.rollout.max_new_tokens, "ppo_epochs": cfg.ppo.epochs,
              "minibatch": cfg.ppo.minibatch_size, "group_size": cfg.ppo.group_size if grpo
              else None, "lr": cfg.optim.lr, "kl_coef": cfg.kl.coef,
              "temperature": cfg.rollout.temperature, "threads": int(threads),
              "precision": precision(cfg.deepspeed),
              "min_new_tokens": cfg.rollout.min_new_tokens,
              "peer_weights": args.peer_weights if precision(cfg.deepspeed) == "bf16"
              else "fp32",   # the peer's weights: only bf16 runs have a choice
              "steps_per_run": args.steps, "skipped_steps": args.skip}
    rounds = []
    spec = None
    for r in range(args.rounds):
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")   # round 1 runs ours first
        got = {}
        for who in order:
            if who == "ours":
                got["ours"] = run_ours(args, ours_over, home, env)
                spec = spec or peer_spec(args, cfg, got["ours"][1], home,
                                          config["peer_weights"])
            else:
                got["peer"] = run_peer(args.peer, spec, env)
        ours_s = statistics.median(row["perf/step_s"] for row in got["ours"][0])
        peer_s = statistics.median(got["peer"]["step_s"][args.skip:])
        rounds.append({"order": list(order), "ours_step_s": ours_s, "peer_step_s": peer_s,
                       "ratio": peer_s / ours_s, "peer_threads": got["peer"]["threads"],
                       "peer_weights_changed": got["peer"]["weights_changed"],
                       "ours_response_length": statistics.median(
                           row["rollout/response_length"] for row in got["ours"][0])})
        print(f"  round {r + 1}: ours {ours_s:.3f} s/step, {args.peer} "
              f"(trl {got['peer']['trl']}) {peer_s:.3f} s/step, ratio {peer_s / ours_s:.2f}",
              flush=True)
    ours_s = statistics.median(x["ours_step_s"] for x in rounds)
    peer_s = statistics.median(x["peer_step_s"] for x in rounds)
    result = {"benchmark": "ppo_vs_peer", "peer": args.peer,
              "peer_trl": got["peer"]["trl"], "ours_step_s": ours_s, "peer_step_s": peer_s,
              "ratio": peer_s / ours_s, "config": config, "rounds": rounds}
    print(f"\n{args.peer} vs alignflow ({config['rollouts_per_step']} rollouts, "
          f"{config['max_new_tokens']} new tokens, {config['ppo_epochs']} epoch(s), minibatch "
          f"{config['minibatch']}, {args.rounds} alternating rounds)")
    print(f"  alignflow step (median of rounds): {ours_s:.3f} s")
    print(f"  {args.peer} step (median of rounds): {peer_s:.3f} s")
    print(f"  ratio (peer / ours)              : {peer_s / ours_s:.2f}x")
    save(result, args.out, f"ppo_vs_{args.peer}" + (f"-{args.label}" if args.label else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo/ppo.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--peer", choices=sorted(PEER_TRL), default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1, help="--peer: PPO epochs on both sides")
    ap.add_argument("--threads", type=int, default=0, help="--peer: 0 = one per core")
    ap.add_argument("--label", default="", help="--peer: names the result file's config")
    ap.add_argument("--peer-weights", choices=["bf16", "fp32"], default="bf16",
                    help="--peer in bf16: the peer's weights in bf16 (no fp32 master weights, "
                         "TRL's fastest) or fp32 under bf16 autocast (master weights, as ours)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    side_by_side(args) if args.peer else throughput(args)


if __name__ == "__main__":
    main()
