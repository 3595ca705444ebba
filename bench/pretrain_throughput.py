"""Pretrain stage under the deepspeed launcher vs a bare PyTorch loop: tokens/s and their ratio.

    .venv/bin/python bench/pretrain_throughput.py [--config configs/demo/pretrain.yaml]
                                                  [--steps 60] [--skip 5] [--rounds 3] [k=v ...]

Both run the same model (same seed), the same packed rows in the same order, the same AdamW,
schedule and clipping. The stage runs first (it builds the dataset); the bare loop then reads
the dataset artifact the stage trained on; the pair alternates for `--rounds` rounds, and the
ratio is the median of the rounds' (this machine's speed drifts by tens of percent over
minutes). Throughput is measured over steps after `--skip` warm-up steps; launcher start-up
and data preparation are reported separately. Prints figures and writes
bench/results/pretrain_throughput-<host>.json. A script, not a test.
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

BARE = r'''
import json, sys, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from stages import engine as E, tokens as T
from stages.artifacts import ArtifactStore
from stages.config import PretrainConfig
from stages.configfile import load_config
from stages.model import llama_config
from stages.pretrain import batch_rows

cfg = load_config(PretrainConfig, sys.argv[1], json.loads(sys.argv[2]))
store = ArtifactStore(cfg.run.store)
model_art = store.get(cfg.run.name)
parents = {p["role"]: p["digest"] for p in model_art.parents}
_, rows, _ = T.open_dataset(store.get(parents["dataset"]).local_path())
tok = AutoTokenizer.from_pretrained(store.get(parents["tokenizer"]).local_path())
E.seed_all(cfg.run.seed)
torch.manual_seed(cfg.run.seed)
model = AutoModelForCausalLM.from_config(llama_config(cfg.model.preset, len(tok), tok))
model.train()
opt = E.adamw(model, cfg.optim)
sched = torch.optim.lr_scheduler.LambdaLR(opt, E.lr_lambda(cfg.optim, cfg.train.max_steps))
d = E.Dist(0, 1, 0, torch.device("cpu"))
mb = cfg.train.micro_batch_size
accum = cfg.train.global_batch_size // mb
times, losses = [], []
for step in range(cfg.train.max_steps):
    t0 = time.time()
    total = 0.0
    for micro in range(accum):
        x = torch.as_tensor(rows[batch_rows(step, micro, accum, mb, d, len(rows), cfg.run.seed)],
                            dtype=torch.long)
        loss = model(input_ids=x, labels=x).loss / accum
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.time() - t0)
    losses.append(total)
print(json.dumps({"step_s": times, "loss": losses, "threads": torch.get_num_threads()}))
'''


def main() -> None:
    from common import machine_info, save
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo/pretrain.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the rates")
    ap.add_argument("--rounds", type=int, default=3, help="stage and bare runs, alternating; "
                    "the first stage run builds the dataset when it is new")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from flows.launch import build_command, run_stage
    from stages.config import PretrainConfig
    from stages.configfile import load_config
    from stages.corpus import build_corpus
    from stages.artifacts import ArtifactStore

    home = os.environ.get("ALIGNFLOW_HOME", str(REPO / ".alignflow"))
    store_root = str(Path(home) / "store")
    overrides = [f"run.store={store_root}", "run.name=bench-pretrain",
                 "run.log_every=1", f"train.max_steps={args.steps}", "train.eval_every=1000000",
                 "checkpoint.every_steps=1000000", "checkpoint.resume=false", "run.force=true",
                 *args.overrides]
    cfg = load_config(PretrainConfig, REPO / args.config, overrides)
    if "demo_mixture" in cfg.data.mixture:
        build_corpus(REPO / "datasets_cfg" / "demo_corpus.yaml", ArtifactStore(store_root))

    rounds = []
    for _ in range(args.rounds):   # alternating: this machine's speed drifts over minutes
        work_r = Path(tempfile.mkdtemp(prefix="alignflow-bench-"))
        ov = [*overrides, f"run.work_dir={work_r}"]
        cmd = build_command("pretrain", args.config, ov)
        t0 = time.time()
        code, digest = run_stage(cmd, env={"ALIGNFLOW_HOME": home},
                                 on_line=lambda l: None if "it/s" in l else print(l))
        wall_stage = time.time() - t0
        if code != 0:
            sys.exit(f"stage failed with exit code {code}")
        (metrics_file,) = work_r.glob("*/metrics.jsonl")
        stage_rows = [json.loads(l) for l in metrics_file.read_text().splitlines()]
        stage_steps = [r["perf/step_s"] for r in stage_rows][args.skip:]

        t0 = time.time()
        bare = subprocess.run([sys.executable, "-c", BARE, str(REPO / args.config),
                               json.dumps(ov)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "ALIGNFLOW_HOME": home})
        wall_bare = time.time() - t0
        if bare.returncode != 0:
            sys.exit(f"bare loop failed:\n{bare.stderr[-3000:]}")
        bare_out = json.loads(bare.stdout.strip().splitlines()[-1])
        bare_steps = bare_out["step_s"][args.skip:]
        rounds.append({"stage_step_s_median": statistics.median(stage_steps),
                       "bare_step_s_median": statistics.median(bare_steps),
                       "ratio": sum(bare_steps) / sum(stage_steps),
                       "stage_wall_s": wall_stage, "bare_wall_s": wall_bare})
        print(f"  round {len(rounds)}: stage {rounds[-1]['stage_step_s_median']:.3f} s/step, "
              f"bare {rounds[-1]['bare_step_s_median']:.3f} s/step, ratio "
              f"{rounds[-1]['ratio']:.3f}", flush=True)

    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    stage_step = statistics.median(r["stage_step_s_median"] for r in rounds)
    bare_step = statistics.median(r["bare_step_s_median"] for r in rounds)
    stage_tps, bare_tps = tokens_per_step / stage_step, tokens_per_step / bare_step
    gaps = [abs(a["train/loss"] - b) for a, b in zip(stage_rows, bare_out["loss"])]
    loss_gap = max(gaps)
    result = {
        "benchmark": "pretrain_throughput", "config": args.config, "overrides": args.overrides,
        "steps": args.steps, "measured_steps": len(stage_steps), "tokens_per_step": tokens_per_step,
        "stage_tokens_per_s": stage_tps, "bare_tokens_per_s": bare_tps,
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "rounds": rounds,
        "stage_step_s_median": stage_step, "bare_step_s_median": bare_step,
        "stage_wall_s": wall_stage, "bare_wall_s": wall_bare,
        "max_loss_difference": loss_gap, "loss_difference_first_steps": gaps[:5],
        "bare_threads": bare_out["threads"],
        "machine": machine_info(), "artifact": digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"\npretrain throughput ({args.config}, {len(stage_steps)} steps measured, "
          f"{tokens_per_step} tokens/step)")
    print(f"  stage under deepspeed launcher : {stage_tps:10.0f} tokens/s "
          f"(median step {result['stage_step_s_median']:.3f}s)")
    print(f"  bare PyTorch loop              : {bare_tps:10.0f} tokens/s "
          f"(median step {result['bare_step_s_median']:.3f}s)")
    print(f"  ratio stage / bare             : {result['ratio']:10.3f}   (median of "
          f"{len(rounds)} rounds {sorted(round(r['ratio'], 3) for r in rounds)}; target >= 0.95)")
    print(f"  wall time incl. start-up       : stage {wall_stage:.1f}s, bare {wall_bare:.1f}s")
    print(f"  largest per-step loss gap      : {loss_gap:.2e}")
    save(result, args.out, "pretrain_throughput")


if __name__ == "__main__":
    main()
