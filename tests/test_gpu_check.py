"""bench/gpu_check.py: the GPU validation script, checked here on the CPU in its dry-run mode."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def test_a_refusal_is_the_stages_own_line_naming_the_option():
    lines = ["[alignflow] loading", "error: rollout.engine=vllm needs a CUDA GPU (vllm ...)"]
    assert gpu_check.refused(2, lines, "rollout.engine=vllm")["message"].startswith("error:")
    # Another failure, or another option's message, is not a refusal: the step fails.
    assert gpu_check.refused(1, lines, "rollout.engine=vllm") is None
    assert gpu_check.refused(2, ["error: data.max_length=9 is above ..."], "8bit=true") is None


def test_the_bundle_carries_what_the_image_lacks_and_not_torch():
    lock = "\n".join(["torch==2.13.0", "nvidia-nccl-cu12==2.27.3", "deepspeed==0.19.8",
                      "transformers==5.23.0", "accelerate==1.15.0", "pyarrow==22.0.0",
                      "numpy==2.4.6",
                      "# a comment==1", "Typing_Extensions==4.15.0 ; python_version < '4'"])
    # Missing from the image: carried; the Hugging Face stack at another version than the
    # image's: carried; torch, CUDA libraries, numpy and the like: the image's own.
    assert gpu_check.wanted_wheels(lock) == {"deepspeed": "0.19.8", "transformers": "5.23.0"}
    real = gpu_check.wanted_wheels((REPO / "requirements.lock").read_text())
    assert {"deepspeed", "trl", "prefect", "datasets", "gguf", "pydantic"} <= set(real)
    assert "torch" not in real and not any(n.startswith("nvidia") for n in real)


@pytest.mark.slow
def test_the_dry_run_runs_every_step_and_the_gpu_options_refuse(tmp_path):
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--home",
                          str(tmp_path / "home"), "--out", str(tmp_path / "results")], cwd=REPO,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    (path,) = (tmp_path / "results").glob("gpu_check-dryrun-*.json")
    r = json.loads(path.read_text())
    assert [k for k, s in r["steps"].items() if s["status"] == "ok"] == \
        ["pipeline", "base", "pretrain", "sft", "rm", "ppo"]
    assert all(run["tokens_per_s"] > 0 for run in r["steps"]["pretrain"]["runs"].values())
    assert r["steps"]["sft"]["int8_lora_adam8bit"]["status"] == "refused"
    assert r["steps"]["ppo"]["vllm"]["status"] == "refused"
    assert 0 < r["generation_share"] < 1 and r["ppo_step_s"] > 0
    assert "ppo hf" in out.stdout and "MFU" in out.stdout
