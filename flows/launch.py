"""Build and run `deepspeed --module stages.<name>` commands. No torch here: flows import this."""

from __future__ import annotations

import glob
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from stages.artifacts import (ArtifactError, ArtifactStore, code_hashes, default_home,
                              default_store_root, inputs_of, json_digest)
from stages.config import load_stage_config
from stages.configfile import REPO_ROOT as REPO
from stages.configfile import find_file, read_yaml, resolved, shell_safe
from stages.lineage import flatten
from stages.proc import (GRACE_S, HANDSHAKE, extensions_dir, free_port, release_job_shm,
                         stale_build_locks)


def deepspeed_exe() -> str:
    beside = Path(sys.executable).parent / "deepspeed"   # the venv's launcher
    return str(beside) if beside.exists() else "deepspeed"


def build_command(stage: str, config: str | Path, overrides: list[str] = ()) -> list[str]:
    """The launch command for a stage, validated first: a bad config fails here, in a second,
    not after the launcher has started ranks."""
    cfg = load_stage_config(stage, config, overrides)
    ds = cfg.deepspeed
    overrides = list(overrides)
    cmd = [deepspeed_exe()]
    if ds.hostfile:
        cmd += ["--hostfile", str(find_file(ds.hostfile)), "--num_nodes", str(ds.num_nodes)]
        overrides = [shell_safe(o) for o in overrides + remote_needs(cfg)]
    cmd += ["--num_gpus", str(ds.num_gpus), "--master_port", str(ds.master_port or free_port()),
            "--module", f"stages.{stage}", "--config", str(config), *overrides]
    return cmd


def remote_needs(cfg) -> list[str]:
    """What ranks on other nodes must be told on the command line: the runner forwards only
    PYTHON*/NCCL*-style variables, so ALIGNFLOW_STORE and ALIGNFLOW_HOME never arrive there.
    The work directory is named explicitly too; the stage checks that every node sees it."""
    out = []
    if cfg.run.store is None:
        root = default_store_root()
        out.append(f"run.store={root if '://' in root else Path(root).absolute()}")
    if cfg.run.work_dir is None:
        out.append(f"run.work_dir={default_home() / 'runs' / cfg.run.name}")
    return out


def run_stage(cmd: list[str], env: dict | None = None, on_line: Callable[[str], None] = print,
              timeout: float | None = None, cwd: Path = REPO) -> tuple[int, str | None]:
    """Run a launch command in its own process group, streaming its output line by line.

    Returns (exit code, artifact digest printed by the stage). The deepspeed CLI does not
    forward signals to its ranks, so a timeout or interrupt signals the whole group. The group
    is led by a guard (`stages.proc.guard`) that stops it when this process dies, however it
    dies. The timeout is a timer: a stage that hangs without printing is stopped too.
    """
    full_env = {"TORCH_EXTENSIONS_DIR": str(extensions_dir()), **os.environ, **(env or {}),
                "PYTHONUNBUFFERED": "1", "ALIGNFLOW_LAUNCH_COMMAND": shlex.join(cmd)}
    for lock in stale_build_locks(Path(full_env["TORCH_EXTENSIONS_DIR"])):
        on_line(f"[alignflow] removing {lock}: a build lock left by a killed launch (older "
                f"than any build); the op is rebuilt")
        lock.unlink(missing_ok=True)
    guarded = [sys.executable, "-m", "stages.proc", "guard", str(os.getpid()), "--", *cmd]
    proc = subprocess.Popen(guarded, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            errors="replace")
    timed_out = threading.Event()
    timer = threading.Timer(timeout, lambda: (timed_out.set(), stop_group(proc))) \
        if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    digest = None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(HANDSHAKE):
                digest = line.split("=", 1)[1].strip()
            on_line(line)
        code = proc.wait()
        if timed_out.is_set():
            raise TimeoutError(f"{shlex.join(cmd)} ran past {timeout}s and was stopped")
        return code, digest
    except BaseException:
        stop_group(proc)
        raise
    finally:
        if timer:
            timer.cancel()
        release_job_shm(cmd)


def stop_group(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM the launcher and every rank, then SIGKILL whatever is left after `grace`. A
    second Ctrl-C meanwhile is held until the group is gone: it must not cut the SIGKILL."""
    with _interrupts_held():
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@contextmanager
def _interrupts_held():
    if threading.current_thread() is not threading.main_thread():
        yield           # only the main thread receives signals
        return
    held: list = []
    previous = signal.signal(signal.SIGINT, lambda *a: held.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


# Config keys whose values name artifacts; they are resolved to digests in the launch key.
REF_KEYS = {"parent", "actor", "reward", "artifact", "tokenizer", "init_from"}


def launch_inputs(stage: str, config: str | Path, overrides: list[str],
                  store: ArtifactStore) -> dict | None:
    """What decides a launch's result, computed here without torch or data preparation: the
    resolved config, every dataset YAML it names (recursively) and the files they list, the
    digests its artifact references resolve to, and the code the stage runs (per module).
    None when a reference does not resolve yet (the stage must run and decide). The stage
    keeps its own, finer check: this one only saves the launcher start when nothing changed."""
    cfg = inputs_of(resolved(load_stage_config(stage, config, overrides)))
    parts: list = []
    try:
        _walk(cfg, None, store, parts, set())
    except ArtifactError:
        return None
    return {"stage": stage, "config": cfg, "inputs": parts,
            "code": code_hashes(stage)}


def launch_key(stage: str, config: str | Path, overrides: list[str],
               store: ArtifactStore) -> str | None:
    inputs = launch_inputs(stage, config, overrides, store)
    return json_digest(inputs) if inputs else None


def changes(before: dict, now: dict) -> list[str]:
    """What differs between two launches' inputs, in words: config keys, input files and
    references, code modules."""
    out = []
    flat_a, flat_b = flatten(before.get("config", {})), flatten(now["config"])
    out += [f"{k}: {flat_a.get(k)!r} -> {flat_b.get(k)!r}" for k in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(k) != flat_b.get(k)]
    was = {tuple(p[:-1]): p[-1] for p in map(tuple, before.get("inputs", []))}
    now_in = {tuple(p[:-1]): p[-1] for p in map(tuple, now["inputs"])}
    out += [f"{' '.join(k)} changed" for k in sorted(set(was) | set(now_in))
            if was.get(k) != now_in.get(k)]
    code_a, code_b = before.get("code", {}), now["code"]
    out += [f"stages/{m}.py changed" for m in sorted(set(code_a) | set(code_b))
            if code_a.get(m) != code_b.get(m)]
    return out


def _walk(node, key, store: ArtifactStore, parts: list, seen: set) -> None:
    if isinstance(node, dict):
        for k, v in sorted(node.items()):
            _walk(v, k, store, parts, seen)
    elif isinstance(node, list):
        for v in node:
            _walk(v, key, store, parts, seen)
    elif isinstance(node, str):
        if key in REF_KEYS and key != "tokenizer" or (key == "tokenizer" and node and
                                                     not Path(node).is_dir()):
            parts.append((key, node, store.resolve(node)))
        elif node.endswith((".yaml", ".yml")) and find_file(node).is_file() and node not in seen:
            seen.add(node)
            text = find_file(node).read_text(errors="replace")
            parts.append((node, hashlib.sha256(text.encode()).hexdigest()))
            _walk(read_yaml(find_file(node)), None, store, parts, seen)
        elif key == "paths" or (key == "path" and not node.startswith(("s3:", "gs:"))):
            for f in sorted(glob.glob(str(find_file(node)))):
                parts.append((f, hashlib.sha256(Path(f).read_bytes()).hexdigest()))


# Which config field of a stage takes which earlier stage's artifact, as the pipeline pins it.
PINS = {"sft": {"parent": "pretrain"}, "rm": {"parent": "sft"},
        "ppo": {"actor": "sft", "reward": "rm"}}


def explain(stages: list[tuple[str, str, list[str], bool]], store: ArtifactStore) -> list[str]:
    """Per stage (name, config, overrides, force) of a pipeline, in order: whether it will
    reuse an artifact or train, and why (what changed since that stage's last launch)."""
    lines, got = [], {}
    for stage, config, overrides, force in stages:
        pins = [f"{field}={got[up]}" for field, up in PINS.get(stage, {}).items() if up in got]
        if any(up in [s for s, *_ in stages] and up not in got
               for up in PINS.get(stage, {}).values()):
            lines.append(f"{stage:<9} train: an earlier stage trains, so its parent is new")
            continue
        overrides = [f"run.store={store.root}", *pins, *overrides]
        inputs = launch_inputs(stage, config, overrides, store)
        hit = store.find_by_inputs(f"launch-{json_digest(inputs)}") if inputs else None
        name = load_stage_config(stage, config, overrides).run.name
        if hit is not None and not force:
            got[stage] = hit.digest
            lines.append(f"{stage:<9} reuse {name} {hit.short}: inputs unchanged")
            continue
        if force:
            why = ["forced"]
        elif inputs is None:
            why = ["a parent it names is not in the store yet"]
        elif (last := store.last_launch(stage, name)) is None:
            why = [f"no earlier launch of {name} in this store"]
        else:
            why = changes(last.get("inputs", {}), inputs) or ["inputs differ (no detail)"]
        lines.append(f"{stage:<9} train {name}: " + "; ".join(why[:6]) +
                     (f"; and {len(why) - 6} more" if len(why) > 6 else ""))
    return lines
