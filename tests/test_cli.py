import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from stages.proc import leaked_shm
from tests.conftest import REPO


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_runs_as_console_script():
    exe = Path(REPO) / ".venv" / "bin" / "alignflow"
    cmd = [str(exe)] if exe.exists() else ["python", "-m", "flows.cli"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "lineage" in out.stdout and "models" in out.stdout


def test_models_and_versions(pipeline_store, capsys):
    store, a = pipeline_store
    code, out, _ = run(capsys, "--store", store.root, "models")
    assert code == 0
    assert [l.split()[0] for l in out.splitlines()] == sorted(
        ["demo-corpus", "demo-tokenizer", "demo-packed", "demo-pretrain", "demo-sft", "demo-rm",
         "demo-ppo"])
    code, out, _ = run(capsys, "--store", store.root, "models", "demo-ppo")
    # a manifest of round 1 (flat metric names) reads under today's names
    assert code == 0 and out.startswith("demo-ppo@1") and "rl/reward=1.2" in out
    code, out, _ = run(capsys, "--store", store.root, "models", "--json")
    assert {r["name"] for r in json.loads(out)} >= {"demo-ppo", "demo-sft"}
    code, _, err = run(capsys, "--store", store.root, "models", "nothing")
    assert code == 1 and "no model named 'nothing'" in err


def test_lineage_formats(pipeline_store, capsys):
    store, a = pipeline_store
    code, out, _ = run(capsys, "--store", store.root, "lineage", "demo-ppo@latest")
    assert code == 0 and "corpus demo-corpus@1" in out
    code, out, _ = run(capsys, "--store", store.root, "lineage", "demo-ppo", "--json")
    assert json.loads(out)["root"] == a["ppo"].digest
    for fmt, head in (("mermaid", "flowchart"), ("dot", "digraph")):
        code, out, _ = run(capsys, "--store", store.root, "lineage", "demo-ppo", "--format", fmt)
        assert out.startswith(head)
    code, out, _ = run(capsys, "--store", store.root, "lineage", "demo-ppo", "--diff", "demo-rm")
    assert code == 0 and "only in" in out


def test_lineage_used_by_lists_descendants(pipeline_store, capsys):
    store, a = pipeline_store
    # which models were trained against the reward model, and what the SFT model fed
    code, out, _ = run(capsys, "--store", store.root, "lineage", "demo-rm@1", "--used-by")
    assert code == 0 and out.splitlines()[0].startswith("model demo-rm@1")
    assert "as reward in: model demo-ppo@1" in out and "demo-sft" not in out
    code, out, _ = run(capsys, "--store", store.root, "lineage", "demo-sft", "--used-by", "--json")
    g = json.loads(out)
    assert g["direction"] == "descendants" and g["root"] == a["sft"].digest
    assert {n["label"] for n in g["nodes"]} == {"demo-sft@1", "demo-rm@1", "demo-ppo@1"}
    assert {(e["child"], e["role"]) for e in g["edges"]} == {
        (a["rm"].digest, "model"), (a["ppo"].digest, "actor"), (a["ppo"].digest, "reward")}
    code, out, _ = run(capsys, "--store", store.root, "lineage", "demo-ppo", "--used-by")
    assert code == 0 and out.count("\n") == 1          # nothing was trained from it yet


def test_damaged_artifact_is_named(pipeline_store, capsys):
    store, a = pipeline_store
    victim = Path(store.base) / "artifacts" / a["sft"].digest / "model.safetensors"
    victim.write_bytes(b"wX")
    code, out, _ = run(capsys, "--store", store.root, "verify")
    assert code == 1 and f"{victim}" in out and "6 ok, 1 damaged" in out
    code, _, err = run(capsys, "--store", store.root, "show", "demo-sft")
    assert code == 2 and str(victim) in err and "does not match its sha256" in err
    code, _, err = run(capsys, "--store", store.root, "lineage", "no-such-model")
    assert code == 2 and "no artifact or model named 'no-such-model'" in err


def test_run_rejects_bad_stage_overrides(tmp_path, capsys):
    code, _, err = run(capsys, "--store", str(tmp_path / "s"), "run", "--preset", "tiny",
                       "--set", "value:kl.coef=0.1")
    assert code == 2 and "use STAGE:KEY=VALUE with a stage of this preset" in err
    code, _, err = run(capsys, "--store", str(tmp_path / "s"), "run", "--preset", "tiny",
                       "--set", "pretrain:optim.lrr=1")
    assert code == 2 and "unknown field 'optim.lrr'" in err
    bad = tmp_path / "mixture.yaml"
    bad.write_text("name: m\nsources: [\n  - {a: 1\n")
    code, _, err = run(capsys, "--store", str(tmp_path / "s"), "run", "--preset", "tiny",
                       "--set", f"pretrain:data.mixture={bad}")
    assert code == 2 and f"{bad}: not valid YAML" in err and "line 3" in err
    bad.write_text("name: m\nsources: []\nmax_epochs: lots\n")
    code, _, err = run(capsys, "--store", str(tmp_path / "s"), "run", "--preset", "tiny",
                       "--set", f"pretrain:data.mixture={bad}")
    assert code == 2 and f"{bad}" in err and "max_epochs" in err


def test_gc_finds_deepspeed_buffers_no_process_uses(tmp_path):
    # What a SIGKILLed CPU job leaves in /dev/shm: a buffer still mapped by a live rank must stay.
    used, leaked = (tmp_path / f"deepspeed_allreduce_buffer_0_127.0.0.1_2950{i}_0" for i in (0, 1))
    for f in (used, leaked):
        f.write_bytes(b"\0" * 4096)
    rank = subprocess.Popen([sys.executable, "-c", "import mmap, sys, time; f = open(sys.argv[1], "
                             "'r+b'); m = mmap.mmap(f.fileno(), 0); f.close(); print(flush=True); "
                             "time.sleep(60)", str(used)], stdout=subprocess.PIPE, text=True)
    try:
        rank.stdout.readline()           # mapped, and its file descriptor closed
        assert leaked_shm(tmp_path, older_than_s=0, min_age_s=0) == [leaked]
    finally:
        rank.kill()
        rank.wait()
    assert leaked_shm(tmp_path, older_than_s=0, min_age_s=0) == [used, leaked]


def test_a_path_that_is_no_store_is_said_so(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for cmd in ("models", "verify", "gc"):
        code, _, err = run(capsys, "--store", str(tmp_path / "file"), cmd)
        assert code == 2 and "is a file, not a store directory" in err, (cmd, err)
        code, _, err = run(capsys, "--store", str(tmp_path / "missing"), cmd)
        assert code == 2 and f"no store at {tmp_path / 'missing'}" in err, (cmd, err)
    code, _, err = run(capsys, "--store", "nosuchproto://bucket/x", "models")
    assert code == 2 and "--store nosuchproto://bucket/x" in err


def test_sample_refuses_a_bad_token_budget(pipeline_store, capsys):
    import pytest
    store, _ = pipeline_store
    with pytest.raises(SystemExit) as e:
        main(["--store", store.root, "sample", "demo-sft", "--prompt", "x",
              "--max-new-tokens", "-1"])
    assert e.value.code == 2 and "'-1' is not a whole number of at least 1" in \
        capsys.readouterr().err


def test_server_refuses_the_network_without_a_login(capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    code, _, err = run(capsys, "server", "--host", "0.0.0.0")
    assert code == 2 and "without a login" in err and "PREFECT_SERVER_API_AUTH_STRING" in err


@pytest.mark.parametrize("config", ["/etc/passwd", "datasets_cfg/demo_sft.yaml",
                                    "configs/../datasets_cfg/demo_sft.yaml"])
def test_the_run_form_takes_only_shipped_configs(config):
    from pydantic import ValidationError
    from flows.params import StageParams
    with pytest.raises(ValidationError, match="must be a YAML file under"):
        StageParams(config=config)
    assert StageParams(config="configs/tiny/sft.yaml").config == "configs/tiny/sft.yaml"
