import os
from pathlib import Path

import pytest

from stages.artifacts import ArtifactStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    # No test may touch the developer's .alignflow or a configured team store.
    monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ALIGNFLOW_STORE", raising=False)
    monkeypatch.delenv("ALIGNFLOW_FLOW_RUN_ID", raising=False)


def write_files(d: Path, files: dict[str, bytes | str]) -> Path:
    for rel, data in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return d


def put(store, tmp_path, files, **kw):
    src = write_files(Path(tmp_path) / f"src-{os.urandom(4).hex()}", files)
    return store.put(src, **kw)


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def pipeline_store(store, tmp_path):
    """corpus -> tokenizer -> dataset -> pretrain -> sft -> rm -> ppo, with fake files."""
    corpus = put(store, tmp_path, {"train.jsonl": '{"text": "hello"}\n'}, kind="corpus",
                 stage="data", name="demo-corpus", metrics={"documents": 1},
                 extra={"sources": [{"name": "shakespeare", "version": "0.6", "sha256": "f393",
                                     "domain": "books"}]})
    tok = put(store, tmp_path, {"tokenizer.json": "{}"}, kind="tokenizer", stage="pretrain",
              name="demo-tokenizer", parents=[{"role": "corpus", "digest": corpus.digest}],
              config={"data": {"vocab_size": 512}})
    data = put(store, tmp_path, {"train.parquet": b"rows"}, kind="dataset", stage="pretrain",
               name="demo-packed", parents=[{"role": "corpus", "digest": corpus.digest},
                                            {"role": "tokenizer", "digest": tok.digest}],
               config={"data": {"seq_len": 64}}, metrics={"rows": 10})
    pre = put(store, tmp_path, {"model.safetensors": b"w1"}, kind="model", stage="pretrain",
              name="demo-pretrain", parents=[{"role": "dataset", "digest": data.digest}],
              config={"model": {"preset": "tiny"}, "optim": {"lr": 3e-4}},
              metrics={"val_loss": 3.5}, command=["deepspeed", "--module", "stages.pretrain"])
    sft = put(store, tmp_path, {"model.safetensors": b"w2"}, kind="model", stage="sft",
              name="demo-sft", parents=[{"role": "model", "digest": pre.digest}],
              config={"optim": {"lr": 5e-5}}, metrics={"gold_accuracy": 0.5})
    rm = put(store, tmp_path, {"model.safetensors": b"w3"}, kind="model", stage="rm",
             name="demo-rm", parents=[{"role": "model", "digest": sft.digest}],
             config={"optim": {"lr": 1e-5}}, metrics={"pairwise_accuracy": 0.9})
    ppo = put(store, tmp_path, {"model.safetensors": b"w4"}, kind="model", stage="ppo",
              name="demo-ppo", parents=[{"role": "actor", "digest": sft.digest},
                                        {"role": "reward", "digest": rm.digest}],
              config={"kl": {"coef": 0.05}}, metrics={"reward_mean": 1.2, "kl": 2.0})
    return store, {"corpus": corpus, "tokenizer": tok, "dataset": data, "pretrain": pre,
                   "sft": sft, "rm": rm, "ppo": ppo}


def kill_after_checkpoint(cmd: list[str], work: Path, home: Path,
                          marker: str = "*/checkpoints/complete") -> None:
    """Start `cmd`, wait for its first complete checkpoint under `work` (`marker`: ours, or
    the HF Trainer's trainer_state.json), then SIGKILL the launcher and every rank (the way a
    preempted node dies)."""
    import signal
    import subprocess
    import time
    from flows.launch import release_job_shm
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "ALIGNFLOW_HOME": str(home)})
    deadline = time.time() + 300
    while not list(work.glob(marker)):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    release_job_shm(cmd)


def launch_stage(root: Path, stage: str, *overrides, check: bool = True):
    """Run a tiny stage config through the real deepspeed launcher into root/store."""
    from flows.launch import build_command, run_stage
    cmd = build_command(stage, REPO / "configs" / "tiny" / f"{stage}.yaml",
                        [f"run.store={root / 'store'}", f"run.work_dir={root / 'work'}",
                         *overrides])
    lines: list[str] = []
    code, digest = run_stage(cmd, on_line=lines.append, timeout=600,
                             env={"ALIGNFLOW_HOME": str(root / "home")})
    if check:
        assert code == 0, "\n".join(lines[-60:])
    return digest, "\n".join(lines)


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """tiny pretrain (1 rank) -> sft -> rm (2 ranks each) in one store, shared by the tests."""
    root = tmp_path_factory.mktemp("chain")
    launch_stage(root, "pretrain", "deepspeed.num_gpus=1",
                 "deepspeed.template=infra/deepspeed/zero0.json", "train.global_batch_size=4")
    _, sft_log = launch_stage(root, "sft")
    _, rm_log = launch_stage(root, "rm")
    return root, ArtifactStore(root / "store"), sft_log, rm_log
