"""Orchestration overhead and cached rerun time of the pipeline flow.

    .venv/bin/python bench/pipeline_overhead.py [--preset tiny|demo]

In one run: (1) the four stage commands launched directly, one after another, into a fresh
store; (2) the `alignment-pipeline` flow (embedded Prefect) on the same configs into another
fresh store; (3) the same flow again, unchanged, which should skip every stage. Overhead is
(flow - direct) / direct wall time (target <= 3%); the embedded Prefect server's start is
timed apart (once per process). The corpus is not part of either timing (both
read the same corpus artifact; the demo preset builds it first if needed). Prints the figures
and writes bench/results/pipeline_overhead-<preset>-<device>.json. A script, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=["tiny", "demo"], default="tiny")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    from flows.cli import prefect_env
    from flows.launch import build_command, run_stage
    from flows.params import PRESETS
    from stages.artifacts import ArtifactStore

    root = Path(tempfile.mkdtemp(prefix="alignflow-bench-pipeline-"))
    os.environ["ALIGNFLOW_HOME"] = str(root / "home")
    prefect_env()
    params = PRESETS[args.preset].model_copy(deep=True)
    corpus_store = None
    if params.corpus:   # both timed runs read one corpus artifact, built here untimed
        from stages.corpus import build_corpus
        corpus_store = ArtifactStore(str(root / "corpus"))
        build_corpus(params.corpus, corpus_store)

    def fresh_store(name: str) -> str:
        path = root / name
        if corpus_store:   # same corpus artifact in both stores (a copy, not a rebuild)
            import shutil
            shutil.copytree(root / "corpus", path)
        return str(path)

    # Prefect's embedded server starts once per process: timed on its own, not as overhead
    # of every run (a served deployment or `alignflow server` has it running already).
    from prefect import flow
    t0 = time.time()
    flow(name="warm-up")(lambda: None)()
    server_start_s = time.time() - t0

    # (1) direct: the stage commands one after another, parents pinned as the flow pins them
    direct_store = fresh_store("direct")
    t0 = time.time()
    got: dict[str, str] = {}
    for stage in ("pretrain", "sft", "rm", "ppo"):
        p = getattr(params, stage)
        pins = {"sft": {"parent": got.get("pretrain")}, "rm": {"parent": got.get("sft")},
                "ppo": {"actor": got.get("sft"), "reward": got.get("rm")}}.get(stage, {})
        overrides = [f"run.store={direct_store}", *(f"{k}={v}" for k, v in pins.items()),
                     *p.overrides]
        code, got[stage] = run_stage(build_command(stage, p.config, overrides),
                                     on_line=lambda l: None)
        if code != 0:
            sys.exit(f"direct launch of {stage} failed ({code})")
    direct_s = time.time() - t0

    # (2) the flow on the same configs, (3) the flow again with nothing changed
    from flows.pipeline import alignment_pipeline
    params.store = fresh_store("flow")
    t0 = time.time()
    alignment_pipeline(params)
    flow_s = time.time() - t0
    t0 = time.time()
    alignment_pipeline(params)
    rerun_s = time.time() - t0
    overhead = (flow_s - direct_s) / direct_s

    from common import machine_info, save
    result = {"benchmark": "pipeline_overhead", "preset": args.preset, "direct_s": direct_s,
              "flow_s": flow_s, "overhead": overhead, "cached_rerun_s": rerun_s,
              "embedded_server_start_s": server_start_s,
              "machine": machine_info(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"\npipeline overhead ({args.preset} preset, four stages)")
    print(f"  stage commands launched directly : {direct_s:8.1f} s")
    print(f"  alignment-pipeline flow          : {flow_s:8.1f} s")
    print(f"  orchestration overhead           : {overhead:8.1%}   (target <= 3%)")
    print(f"  cached rerun, nothing changed    : {rerun_s:8.1f} s")
    print(f"  embedded Prefect server start    : {server_start_s:8.1f} s   (once per process, "
          f"not counted above)")
    save(result, args.out, f"pipeline_overhead-{args.preset}")


if __name__ == "__main__":
    main()
