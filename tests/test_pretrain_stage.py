"""Stage pretrain through the real deepspeed launcher on this CPU (tiny preset)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.launch import build_command, run_stage
from stages.artifacts import ArtifactStore
from tests.conftest import REPO, kill_after_checkpoint

TINY = REPO / "configs" / "tiny" / "pretrain.yaml"


def launch(tmp_path, *overrides, work="work", timeout=600):
    store = tmp_path / "store"
    cmd = build_command("pretrain", TINY, [f"run.store={store}",
                                           f"run.work_dir={tmp_path / work}", *overrides])
    lines: list[str] = []
    code, digest = run_stage(cmd, on_line=lines.append, timeout=timeout,
                             env={"ALIGNFLOW_HOME": str(tmp_path / "home")})
    return code, digest, "\n".join(lines), ArtifactStore(store)


def metrics_by_step(work: Path) -> dict[int, dict]:
    (path,) = work.glob("*/metrics.jsonl")
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    return {r["step"]: r for r in rows}     # a step logged twice (before a kill) keeps the last


def test_two_ranks_train_export_and_generate(tmp_path):
    shm = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    code, digest, out, store = launch(tmp_path)
    assert code == 0, out[-3000:]
    # DeepSpeed's CPU allreduce buffers (~66 MB a rank) do not outlive the job
    assert not set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm
    assert "2 rank(s)" in out and "ZeRO 2" in out
    art = store.get("tiny-pretrain")
    assert art.digest == digest and art.kind == "model" and art.stage == "pretrain"
    roles = {p["role"]: p["digest"] for p in art.parents}
    assert set(roles) == {"dataset", "tokenizer"}
    data = store.get(roles["dataset"])
    realized, weights = data.manifest["mixture_stats"]["realized"], \
        data.manifest["mixture_stats"]["weights"]
    assert all(abs(realized[d] - weights[d]) <= 0.02 for d in weights)
    # token shards the ranks memory-map, each one's digest in the manifest
    files, stats = data.manifest["files"], data.manifest["mixture_stats"]
    assert "index.json" in files and not [f for f in files if f.endswith(".parquet")]
    assert stats["shards"] and all(files[s["file"]]["sha256"] == s["sha256"]
                                   for s in stats["shards"])
    assert all("epochs" in v and v["tokens"] > 0 for v in stats["sources"].values())
    m = art.manifest
    assert m["config"]["deepspeed"]["num_gpus"] == 2 and "--module stages.pretrain" in m["command"]
    assert m["metrics"]["eval/loss"] < m["metrics"]["baseline/eval/loss"] + 1.0
    assert m["headline"]["metric"] == "eval/loss" and "unigram baseline" in m["headline"]["text"]
    assert set(k.split("/")[2] for k in m["metrics"] if k.startswith("eval/loss/")) == \
        set(weights)
    log = [json.loads(l) for l in (art.local_path() / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert log[-1]["train/loss"] < log[0]["train/loss"]
    speeds = [r["perf/tokens_per_s"] for r in m["perf_log"] if "perf/tokens_per_s" in r]
    assert len(speeds) == 6 and min(speeds) > 0       # timings in the manifest, not the files

    # plain transformers, no alignflow and no DeepSpeed, loads and generates
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "p = sys.argv[1]; tok = AutoTokenizer.from_pretrained(p)\n"
        "m = AutoModelForCausalLM.from_pretrained(p)\n"
        "x = tok('def main', return_tensors='pt')\n"
        "y = m.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)\n"
        "print('GEN', y.shape[1] - x['input_ids'].shape[1], type(m).__name__)\n")
    gen = subprocess.run([sys.executable, "-c", script, str(art.local_path())],
                         capture_output=True, text=True, timeout=300)
    assert "GEN 8 LlamaForCausalLM" in gen.stdout, gen.stderr[-2000:]
    assert not list(art.local_path().glob("*.bin")) and list(art.local_path().glob("*.safetensors"))


def test_killed_run_resumes_to_the_same_losses(tmp_path):
    steps = ["train.max_steps=24", "checkpoint.every_steps=4", "train.eval_every=100"]
    code, _, out, store = launch(tmp_path, *steps, work="straight")
    assert code == 0, out[-3000:]
    straight = metrics_by_step(tmp_path / "straight")

    # unchanged inputs: the stage reuses the model instead of training again
    code, digest, out, store = launch(tmp_path, *steps, work="again")
    assert code == 0 and "unchanged inputs: reusing" in out
    assert digest == store.resolve("tiny-pretrain") and len(store.versions("tiny-pretrain")) == 1
    assert not list((tmp_path / "again").glob("*/metrics.jsonl"))

    # the same config forced: SIGKILL the launcher and every rank after a checkpoint
    steps.append("run.force=true")
    cmd = build_command("pretrain", TINY, [f"run.store={tmp_path / 'store'}",
                                           f"run.work_dir={tmp_path / 'killed'}", *steps])
    kill_after_checkpoint(cmd, tmp_path / "killed", tmp_path / "home")
    (latest,) = (tmp_path / "killed").glob("*/checkpoints/complete")
    killed_at = int(latest.read_text().strip().removeprefix("step"))
    assert 0 < killed_at < 24

    code, _, out, store = launch(tmp_path, *steps, work="killed")
    assert code == 0, out[-3000:]
    resumed_at = int(out.split("at step ")[1].split()[0])
    assert resumed_at >= killed_at and resumed_at % 4 == 0 and resumed_at < 24
    resumed = metrics_by_step(tmp_path / "killed")
    assert max(resumed) == 24
    for step in range(resumed_at + 1, 25):
        assert resumed[step]["train/loss"] == pytest.approx(straight[step]["train/loss"],
                                                            rel=1e-5), step
        assert resumed[step]["train/lr"] == pytest.approx(straight[step]["train/lr"],
                                                          rel=1e-9), step
    # the tokenizer and packed dataset were built once and reused by the later launches
    assert len(store.versions("tiny-pretrain-data")) == 1
    assert len(store.versions("tiny-pretrain-tokenizer")) == 1


def run_module(tmp_path, *overrides):
    env = {**os.environ, "ALIGNFLOW_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-m", "stages.pretrain", "--config", str(TINY),
                           f"run.store={tmp_path / 'store'}", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override, message", [
    ("data.seq_len=4096", "data.seq_len=4096 is above the model's 128 positions"),
    ("data.mixture=datasets_cfg/none.yaml", "datasets_cfg/none.yaml: mixture file not found"),
    ("train.global_batch_size=6", "does not divide over 2 rank(s)"),
    ("data.vocab_size=100", "data.vocab_size=100 is smaller than the 256 byte tokens"),
    ("model.init_from=no-such-model", "no artifact or model named 'no-such-model'"),
])
def test_bad_input_fails_before_training(tmp_path, override, message):
    out = run_module(tmp_path, override)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "store" / "names").exists()


def test_a_vocabulary_too_large_for_the_token_dtype_fails_before_training(tmp_path):
    out = run_module(tmp_path, "data.vocab_size=70000", "data.token_dtype=uint16")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "data.token_dtype=uint16 cannot hold a vocabulary of 70,000 tokens" in out.stderr
    assert not (tmp_path / "store").exists() or not (tmp_path / "store" / "names").exists()


def test_a_source_short_even_at_max_epochs_fails_before_training(tmp_path):
    out = run_module(tmp_path, "data.total_tokens=20000000", "deepspeed.num_gpus=1")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "needs" in out.stderr and "training tokens but has" in out.stderr
    assert "Raise max_epochs" in out.stderr and "Traceback" not in out.stderr
    names = tmp_path / "store" / "names"
    assert not (names / "tiny-pretrain-data").exists() and not (names / "tiny-pretrain").exists()


def test_a_damaged_shard_is_never_trained_on(tmp_path):
    code, _, out, store = launch(tmp_path, "train.max_steps=3", "train.eval_every=3")
    assert code == 0, out[-3000:]
    data = store.get("tiny-pretrain-data")
    shard = data.local_path() / data.manifest["mixture_stats"]["shards"][0]["file"]
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF                                  # one token changed, size unchanged
    shard.chmod(0o644)
    shard.write_bytes(bytes(blob))
    code, _, out, store = launch(tmp_path, "train.max_steps=3", "train.eval_every=3",
                                 "run.force=true", work="again")
    assert "does not match its sha256" in out and str(shard.name) in out, out[-3000:]
    # the damaged copy is set aside and the dataset built again from its sources
    assert code == 0 and store.get("tiny-pretrain-data").digest == data.digest


def test_nan_loss_stops_with_clear_error(tmp_path):
    from transformers import AutoModelForCausalLM
    from stages.data import train_tokenizer
    from stages.model import llama_config
    tok = train_tokenizer(iter(["some text to learn merges from"] * 20), 300)
    model = AutoModelForCausalLM.from_config(llama_config("tiny", len(tok), tok))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    bad = tmp_path / "nan-model"
    model.save_pretrained(bad)
    tok.save_pretrained(bad)
    from stages.imports import import_model
    import_model(str(bad), "nan-model", ArtifactStore(tmp_path / "store"))
    out = run_module(tmp_path, "model.init_from=nan-model", "deepspeed.num_gpus=1")
    assert out.returncode != 0
    assert "non-finite loss (nan) at step 0" in out.stderr and "Last good checkpoint" in out.stderr
    assert not (tmp_path / "store" / "names" / "tiny-pretrain").exists()


@pytest.mark.slow
def test_zero3_and_optimizer_offload_train_the_same_model(tmp_path):
    """ZeRO-2, ZeRO-3 (parameters partitioned) and ZeRO-2 with the optimizer on DeepSpeed's
    CPU Adam (built on first use) see the same data and reach the same losses."""
    losses = {}
    for template in ("zero2", "zero3", "zero2_offload"):
        code, _, out, store = launch(tmp_path, f"deepspeed.template=infra/deepspeed/{template}.json",
                                     "run.force=true", work=template)
        assert code == 0, out[-3000:]
        assert f"ZeRO {3 if template == 'zero3' else 2}" in out
        losses[template] = [r["train/loss"] for _, r in sorted(metrics_by_step(tmp_path / template)
                                                         .items())]
    for template in ("zero3", "zero2_offload"):
        assert losses[template] == pytest.approx(losses["zero2"], rel=1e-4), template


def test_a_rank_count_that_does_not_match_the_config_fails_before_any_work(tmp_path):
    # Before: DeepSpeed failed on the batch arithmetic ~24 s in, after a tokenizer and a
    # dataset had been registered.
    cmd = build_command("pretrain", TINY, [f"run.store={tmp_path / 'store'}"])
    cmd[cmd.index("--num_gpus") + 1] = "1"          # the config says 2
    lines: list[str] = []
    code, digest = run_stage(cmd, on_line=lines.append, timeout=300,
                             env={"ALIGNFLOW_HOME": str(tmp_path / "home")})
    out = "\n".join(lines)
    assert code == 2 and digest is None, out[-3000:]
    assert "launched with 1 rank(s), but deepspeed.num_gpus x num_nodes is 2" in out
    assert "Traceback" not in out
    assert not (tmp_path / "store" / "names").exists()      # nothing registered
