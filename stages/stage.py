"""The plumbing every stage shares around its own phases: start, join the ranks, decide reuse,
export. Each stage's `main()` calls these in the same order (setup -> data -> models -> resume
-> train -> evaluate -> export); its data, models and training loop stay in the stage file.

A shape shared by convention, not a base class: torchtune's recipes and OpenRLHF's train_*
scripts do the same.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages import engine as E
from stages import plots
from stages.artifacts import Artifact, ArtifactStore, input_key, try_lock
from stages.configfile import ConfigError, parse_stage_args, resolved
from stages.model import model_summary
from stages.proc import HANDSHAKE


@dataclass
class Run:
    """One launch of a stage: what its phases need, passed as one object."""
    stage: str                      # pretrain | sft | rm | ppo
    cfg: Any                        # the stage's validated config
    cfg_path: Path
    overrides: list[str]
    store: ArtifactStore
    started: float = field(default_factory=time.time)
    d: E.Dist | None = None         # set by join()
    parents: list[dict] = field(default_factory=list)   # [{"role", "digest"}], set by reused()
    key: str = ""                   # input key: config, parents and stage code
    work: Path | None = None        # scratch keyed by the input key: checkpoints, metrics
    lock: int | None = None         # rank 0's open lock on the work directory, held to exit
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cfg.run.name

    def mark(self, phase: str) -> None:
        """Time of the end of a phase; the manifest's timings are the gaps between marks."""
        self.marks[phase] = time.time()


def setup(schema, stage: str, argv: list[str] | None, preflight) -> tuple[Run, Any]:
    """Parse `--config FILE [k=v ...]` into the stage's schema, run `preflight(cfg, store)` (every
    check that fails in a second, before any rank starts work), then join the launcher's
    process group and seed every generator alike. Returns the run and what preflight found."""
    cfg, path, overrides = parse_stage_args(schema, sys.argv[1:] if argv is None else argv)
    run = Run(stage, cfg, path, overrides, ArtifactStore(cfg.run.store))
    run.store.check_writable()
    E.precision(cfg.deepspeed)      # bf16/fp16 without a GPU: refused before preflight
    checked = preflight(cfg, run.store)
    run.d = E.init_distributed()
    if run.d.world != cfg.deepspeed.world_size:
        # Found now, before any artifact is registered; DeepSpeed would fail on the batch
        # arithmetic half a minute later.
        raise ConfigError(
            f"{path}: launched with {run.d.world} rank(s), but deepspeed.num_gpus x num_nodes "
            f"is {cfg.deepspeed.world_size}; launch with `deepspeed --num_gpus "
            f"{cfg.deepspeed.num_gpus}` (what `alignflow run` does) or set deepspeed.num_gpus="
            f"{run.d.world}")
    E.seed_all(cfg.run.seed)
    return run, checked


def example_set(run: Run, path: str) -> Artifact:
    """The example-set artifact of `path`, built (or reused) by rank 0."""
    from stages.examples import get_example_set
    return run.store.get(E.on_rank0(lambda: get_example_set(path, run.store).digest, run.d))


def parent(role: str, digest: str) -> dict:
    return {"role": role, "digest": digest}


def announce(digest: str) -> None:
    print(f"{HANDSHAKE}{digest}", flush=True)


WAIT_S = 5.0   # how often a run waiting for another run's work directory looks again


def reused(run: Run, **parents: str) -> bool:
    """Fix the run's parents (role=digest) and input key. True when an intact artifact with
    exactly these inputs exists: rank 0 registers it under the run's name and announces it,
    and every rank leaves. Otherwise the run gets its work directory, locked by rank 0 for as
    long as it lives: a second identical run waits for the first and then reuses its artifact,
    instead of training into (and later deleting) the same checkpoints."""
    run.parents = [parent(role, digest) for role, digest in parents.items()]
    run.key = input_key(run.stage, resolved(run.cfg), run.parents)
    run.work = E.work_dir(run.name, run.cfg.run.work_dir, run.key)
    d, said = run.d, []

    def find():
        return None if run.cfg.run.force else run.store.find_by_inputs(run.key)

    def claim() -> str:
        hit = find()
        if hit is None:
            # Checkpoints hold pickled optimizer state that resume unpickles: owner only.
            run.work.mkdir(parents=True, exist_ok=True, mode=0o700)
            run.work.chmod(0o700)
            run.lock, holder = try_lock(run.work / ".lock")
            if run.lock is None:
                if not said:
                    E.log(d, f"{run.work} is in use by {holder} (same stage, same inputs); "
                             f"waiting for it, then its artifact is reused")
                    said.append(holder)
                return "wait"
            hit = find()      # it may have finished just before the lock was free
        if hit is None:
            return "train"
        run.store.tag(run.name, hit.digest)
        E.log(d, f"unchanged inputs: reusing {hit.kind} {hit.short} (run.force=true retrains)")
        announce(hit.digest)
        return "reused"
    # Every rank polls with rank 0 in short collectives: one long wait inside a collective
    # would run into the process group's timeout.
    while (state := E.on_rank0(claim, d)) == "wait":
        time.sleep(WAIT_S)
    if state == "reused":
        E.shutdown(d)
        return True
    check_shared(run.work, d)
    return False


def check_shared(work: Path, d: E.Dist) -> None:
    """Every rank must see the work directory rank 0 writes: checkpoints, their completion
    marker and the ranks' ZeRO shards meet there. On node-local disks the other nodes would
    restart at step 0 while node 0 resumes, and the collectives hang (measured)."""
    mark = E.on_rank0(lambda: _write_mark(work), d)
    seen = E.gather_all((socket.gethostname(), str(work), (work / mark).is_file()), d)
    E.on_rank0(lambda: (work / mark).unlink(missing_ok=True), d)
    blind = [f"rank {r} on {host} (looking in {path})"
             for r, (host, path, ok) in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(f"the work directory is not shared: rank 0 on {seen[0][0]} writes to "
                          f"{seen[0][1]}, which {'; '.join(blind)} cannot see. On several nodes "
                          f"give run.work_dir a path every node mounts (`alignflow run` does: "
                          f"$ALIGNFLOW_HOME/runs of the launching machine)")


def _write_mark(work: Path) -> str:
    name = f".shared-{uuid.uuid4().hex[:8]}"
    (work / name).write_text(socket.gethostname())
    return name


def fit(trainer, run: Run) -> None:
    """Train an HF/TRL trainer (sft, rm) from the newest checkpoint it wrote in the run's work
    directory, then evaluate once more so the log ends on the final model."""
    last = E.last_hf_checkpoint(run.work / "checkpoints") if run.cfg.checkpoint.resume else None
    if last:
        E.log(run.d, f"resumed from {last}")
    trainer.train(resume_from_checkpoint=last)
    trainer.evaluate()


def timings(run: Run) -> dict:
    """Seconds per phase from the marks, in the order they were set, and the total."""
    out, last = {}, run.started
    for phase, t in run.marks.items():
        out[f"{phase}_s"] = t - last
        last = t
    out["total_s"] = time.time() - run.started
    return out


def is_clock(key: str) -> bool:
    """Wall-clock facts of a log row: when and how fast, not what was computed."""
    return key == "time" or key.startswith("perf/")


def split_log(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(curve, clock) of a training log. The curve is what the run computed, one row per step
    (a step logged again after a resume replaces the first): it goes into the artifact's files
    and so into its digest. The clock (time, perf/*) goes into the manifest: two runs that
    train the same weights get one digest, however fast each machine was."""
    curve: dict[int, dict] = {}
    clock: dict[int, dict] = {}
    for row in rows:
        step = row.get("step", 0)
        curve.setdefault(step, {}).update({k: v for k, v in row.items() if not is_clock(k)})
        timing = {k: v for k, v in row.items() if is_clock(k)}
        if timing:
            clock.setdefault(step, {"step": step}).update(timing)
    return [curve[s] for s in sorted(curve)], [clock[s] for s in sorted(clock)]


def export(run: Run, out: Path, *, metrics: dict, headline: dict, datasets: dict,
           train_log: list[dict], extra_parents: list[dict] = ()) -> Artifact:
    """Rank 0: the exported directory `out` becomes the stage's model artifact. The training
    curve goes in with it; the manifest carries the metrics, the log's timings and the stage's
    own headline, which every consumer (CLI, Prefect report, lineage) shows without knowing
    the stage."""
    curve, clock = split_log(train_log)
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    plots.curves(out / "train_log.jsonl", out / "curves.png", f"{run.stage} {run.name}")
    art = run.store.put(out, kind="model", stage=run.stage, name=run.name,
                        parents=run.parents + list(extra_parents), config=resolved(run.cfg),
                        input_key=run.key, move=True, datasets=datasets, metrics=metrics,
                        timings=timings(run), extra={"headline": headline, "perf_log": clock,
                                                     "model_facts": model_summary(out)},
                        flow_run_id=run.cfg.run.flow_run_id,
                        command=E.launch_command(run.stage, run.cfg_path, run.overrides,
                                                 run.cfg.deepspeed))
    (run.work / "result.json").write_text(json.dumps({"digest": art.digest}))
    # The artifact is the result now; resumable state would only fill the disk.
    shutil.rmtree(run.work / "checkpoints", ignore_errors=True)
    E.log(run.d, headline["text"])
    E.log(run.d, f"exported {art.kind} {run.name} {art.short} to {run.store.root}")
    announce(art.digest)
    return art
