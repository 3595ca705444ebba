"""Stages sft and rm through the real deepspeed launcher on this CPU (tiny preset), chained:
tiny pretrain -> sft -> rm, in one store."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, launch_stage

CONFIGS = REPO / "configs" / "tiny"


def launch(root: Path, stage: str, *overrides):
    return launch_stage(root, stage, *overrides)


def test_sft_writes_a_chat_model_whose_parent_is_its_input(chain):
    root, store, log, _ = chain
    art = store.get("tiny-sft")
    roles = {p["role"]: p["digest"] for p in art.parents}
    assert roles["model"] == store.resolve("tiny-pretrain")
    assert store.get(roles["dataset"]).manifest["name"] == "tiny-sft-data"
    m = art.manifest["metrics"]
    assert {"gold/accuracy", "baseline/gold/accuracy", "eval/loss", "gold/eos_rate"} <= set(m)
    assert m["eval/loss"] < m["baseline/eval/loss"]     # same function, same held-out pairs
    fams = {k.split("/")[-1] for k in m if k.startswith("gold/accuracy/")}
    assert {"larger", "sort"} <= fams and all(f"baseline/gold/accuracy/{f}" in m for f in fams)
    assert art.manifest["headline"]["metric"] == "gold/accuracy"
    assert (art.local_path() / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # some real FAQ answers exceed max_length=96: counted, dropped, and said in the log
    assert m["data/dropped_too_long"] > 0 and \
        m["data/train_examples"] + m["data/dropped_too_long"] >= 400
    assert "dropped" in log and m["data/train_examples"] < 400
    assert "--module stages.sft" in art.manifest["command"]
    assert not list(art.local_path().rglob("*.bin")) and \
        (art.local_path() / "training_args.json").exists()             # no pickle
    script = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "p = sys.argv[1]; t = AutoTokenizer.from_pretrained(p)\n"
              "m = AutoModelForCausalLM.from_pretrained(p)\n"
              "x = t.apply_chat_template([{'role': 'user', 'content': 'What is 2 + 3?'}],"
              " add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
              "y = m.generate(**x, max_new_tokens=4, do_sample=False)\n"
              "print('OK', t.eos_token, type(m).__name__, y.shape[1] > x['input_ids'].shape[1])\n")
    out = subprocess.run([sys.executable, "-c", script, str(art.local_path())],
                         capture_output=True, text=True, timeout=300)
    assert "OK <|im_end|> LlamaForCausalLM True" in out.stdout, out.stderr[-2000:]


def test_rm_scores_pairs_and_stores_reward_statistics(chain):
    root, store, _, log = chain
    art = store.get("tiny-rm")
    roles = {p["role"]: p["digest"] for p in art.parents}
    assert roles["model"] == store.resolve("tiny-sft")
    m = art.manifest["metrics"]
    assert 0 <= m["eval/accuracy"] <= 1 and m["rm/reward_std"] > 0
    # one sample of the SFT model per task prompt; the wrong ones became extra pairs
    assert 0 < m["data/policy_pairs"] <= 400 and \
        m["data/train_pairs"] == 400 + m["data/policy_pairs"]
    assert "eval/accuracy/policy_samples" in m
    assert {f"eval/accuracy/{f}" for f in ("larger", "sort", "label")} <= set(m)
    assert "0.85 target" in art.manifest["headline"]["text"]
    pairs = [json.loads(l) for l in (art.local_path() / "policy_pairs.jsonl").read_text()
             .splitlines()]
    assert len(pairs) == m["data/policy_pairs"] and all(p["chosen"] != p["rejected"] for p in pairs)
    assert (art.local_path() / "curves.png").read_bytes()[:4] == b"\x89PNG"
    stats = json.loads((art.local_path() / "reward_stats.json").read_text())
    assert stats["reward_mean"] == pytest.approx(m["rm/reward_mean"])
    assert "held-out pairwise accuracy" in log
    script = ("import sys; from transformers import AutoModelForSequenceClassification as A\n"
              "m = A.from_pretrained(sys.argv[1]); print('OK', m.config.num_labels)\n")
    out = subprocess.run([sys.executable, "-c", script, str(art.local_path())],
                         capture_output=True, text=True, timeout=300)
    assert "OK 1" in out.stdout, out.stderr[-2000:]


def test_rm_scores_in_length_sorted_forwards_are_each_rows_own_and_keep_no_graph(
        chain, monkeypatch):
    # ... and with the prefix every conversation shares encoded once a forward (kept in a memo
    # across calls), each row's score is still its own.
    import torch
    from transformers import AutoModelForSequenceClassification
    import stages.model
    from stages.model import load_tokenizer, rm_scores
    _, store, _, _ = chain
    path = store.get("tiny-rm").local_path()
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = load_tokenizer(path)
    prompts = ["Sort: 3 1 2", "Sort in ascending order: 9 4 7 5 0 2 8 6", "Reverse: 5 0",
               "Sort in ascending order: 1 0"]
    responses = ["1 2 3", "0 2 4 5 6 7 8 9 and then some more words", "", "0 1"]
    alone = torch.cat([rm_scores(model, tok, [p], [r]) for p, r in zip(prompts, responses)])
    for batch, overhead in ((2, 1e12), (4, 1e12), (4, 0)):    # sorted; one forward; split
        scores = rm_scores(model, tok, prompts, responses, batch=batch, overhead=overhead)
        assert not scores.requires_grad
        assert torch.allclose(scores, alone, atol=1e-5), (batch, overhead)
    monkeypatch.setattr(stages.model, "PREFIX_MIN_SAVED", 0)    # share even a short prefix
    memo = {}
    for batch, some in ((4, slice(None)), (2, slice(None)), (4, slice(1, None, 2))):
        scores = rm_scores(model, tok, prompts[some], responses[some], batch=batch, memo=memo)
        assert torch.allclose(scores, alone[some], atol=1e-5), batch
    assert len(memo) == 2       # the template's turn opening; "Sort in ascending order: "
    monkeypatch.setattr(stages.model, "MEMO_PREFIXES", 1)      # kept: the latest only
    for some in (slice(1, None, 2), slice(None)):
        scores = rm_scores(model, tok, prompts[some], responses[some], memo=memo)
        assert torch.allclose(scores, alone[some], atol=1e-5) and len(memo) == 1


def test_sft_with_lora_keeps_the_adapter_as_its_own_artifact(chain):
    root, store, _, _ = chain
    digest, log = launch(root, "sft", "lora.enabled=true", "lora.r=4", "run.name=tiny-sft-lora",
                         "deepspeed.num_gpus=1", "train.global_batch_size=4")
    art = store.get(digest)
    roles = {p["role"]: p["digest"] for p in art.parents}
    adapter = store.get(roles["adapter"])
    assert adapter.kind == "adapter" and (adapter.local_path() / "adapter_config.json").exists()
    assert not list(art.local_path().glob("adapter_*"))               # merged weights exported


def test_too_long_examples_are_counted_and_dropped(chain):
    from stages.sft import chat_tokenizer, conversational, drop_too_long
    store = chain[1]
    tok = chat_tokenizer(store.get("tiny-sft").local_path())
    recs = conversational([{"prompt": "short", "completion": "ok"},
                           {"prompt": "long " * 200, "completion": "ok"}])
    keep, dropped = drop_too_long(recs, tok, max_length=32)
    assert dropped == 1 and keep == recs[:1]
    from stages.rm import conversational as pairs, drop_too_long as drop_pairs
    recs = pairs([{"prompt": "p", "chosen": "a", "rejected": "b"},
                  {"prompt": "p", "chosen": "a", "rejected": "long " * 200}])
    assert drop_pairs(recs, tok, max_length=32) == (recs[:1], 1)


def run_module(root: Path, stage: str, *overrides):
    env = {**os.environ, "ALIGNFLOW_HOME": str(root / "home")}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", "--config",
                           str(CONFIGS / f"{stage}.yaml"), f"run.store={root / 'store'}",
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("stage, override, message", [
    ("rm", "parent=tiny-pretrain", "comes from stage pretrain; needs one of sft"),
    ("sft", "parent=tiny-sft-data", "is a dataset artifact; a model is needed"),
    ("sft", "parent=tiny-rm", "is a LlamaForSequenceClassification; needs a ...ForCausalLM"),
    ("sft", "data.dataset=datasets_cfg/tiny_rm.yaml", "kind is 'preference', stage sft needs 'sft'"),
    ("sft", "optim_8bit=true", "optim_8bit=true needs a CUDA GPU"),
    ("sft", "weights_8bit=true", "only LoRA adapters can train on them; set lora.enabled=true"),
    ("sft", "weights_8bit=true lora.enabled=true", "weights_8bit=true needs a CUDA GPU"),
    ("rm", "deepspeed.precision=fp16", "deepspeed.precision=fp16 needs a CUDA GPU"),
    ("ppo", "rollout.engine=vllm", "rollout.engine=vllm needs a CUDA GPU"),
    ("sft", "data.max_length=4096", "above the parent's 128 positions"),
])
def test_bad_input_fails_before_training(chain, stage, override, message):
    root = chain[0]
    out = run_module(root, stage, *override.split())
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


def test_sample_prints_models_side_by_side(chain):
    root, store, _, _ = chain
    cmd = [str(Path(sys.executable).parent / "alignflow"), "--store", str(root / "store"),
           "sample", "tiny-pretrain", "tiny-sft", "--prompt", "What is 2 + 3?", "--prompt",
           "Sort in ascending order: 3 1 2", "--max-new-tokens", "4", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["prompt"] for r in rows] == ["What is 2 + 3?", "Sort in ascending order: 3 1 2"]
    labels = [k for k in rows[0] if k != "prompt"]
    assert [l.split("@")[0] for l in labels] == ["tiny-pretrain", "tiny-sft"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout) == rows                 # greedy: the same text again
    bad = subprocess.run(cmd[:4] + ["tiny-rm", "--prompt", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "ForCausalLM" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_killed_trainer_stage_resumes_to_the_same_losses(chain, stage):
    # A SIGKILL after the HF Trainer's first complete checkpoint; the relaunch resumes from it
    # (engine.last_hf_checkpoint) and ends where an uninterrupted run ends.
    from flows.launch import build_command
    from stages.artifacts import ArtifactStore
    from tests.conftest import kill_after_checkpoint
    root, store, _, _ = chain
    steps = ["train.max_steps=12", "checkpoint.every_steps=3", "train.eval_every=100",
             "run.force=true", f"run.name=tiny-{stage}-resume"]

    def curve(digest):
        art = ArtifactStore(root / "store").get(digest)
        rows = [json.loads(l) for l in (art.local_path() / "train_log.jsonl").read_text()
                .splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    straight, _ = launch_stage(root, stage, *steps, f"run.work_dir={root / f'{stage}-straight'}")
    killed = root / f"{stage}-killed"
    cmd = build_command(stage, CONFIGS / f"{stage}.yaml",
                        [f"run.store={root / 'store'}", f"run.work_dir={killed}", *steps])
    kill_after_checkpoint(cmd, killed, root / "home",
                          marker="*/checkpoints/checkpoint-*/trainer_state.json")
    done = sorted(int(p.parent.name.split("-")[1])
                  for p in killed.glob("*/checkpoints/checkpoint-*/trainer_state.json"))
    assert done and done[-1] < 12
    resumed, log = launch_stage(root, stage, *steps, f"run.work_dir={killed}")
    assert "resumed from" in log
    want, got = curve(straight), curve(resumed)
    assert sorted(got) == sorted(want) and max(got) == 12
    for step in range(done[-1] + 1, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-4), step


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "ppo"])
def test_every_stage_trains_in_bf16_on_a_cpu_that_multiplies_it(chain, stage):
    from stages.engine import cpu_bf16
    if not cpu_bf16():
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX: bf16 is refused here")
    root = chain[0]
    out = run_module(root, stage, "deepspeed.precision=bf16", "deepspeed.num_gpus=1",
                     "train.max_steps=3", f"run.name=bf16-{stage}",
                     f"run.work_dir={root / 'bf16' / stage}")
    assert out.returncode == 0, out.stderr[-3000:]
