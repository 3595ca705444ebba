"""What every stage does around its training loop: ranks, DeepSpeed config, LR schedule,
metrics, resumable checkpoints and export. Small on purpose; each stage reads top to bottom."""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stages import proc
from stages.artifacts import default_home, fsync_tree, write_durable
from stages.config import DeepSpeedConfig, OptimConfig, TrainConfig, load_deepspeed_template


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group the deepspeed launcher set up (gloo on CPU, nccl on GPU)."""
    import deepspeed
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # Share the cores among the ranks of this node: two ranks with two threads each on
            # two cores spend their time fighting over them. Set before accelerate looks.
            per_rank = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", 1)))
            os.environ["OMP_NUM_THREADS"] = str(per_rank)
            torch.set_num_threads(per_rank)
    if "RANK" not in os.environ:  # plain `python -m stages.x`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(proc.free_port()))
    deepspeed.init_distributed(dist_backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def broadcast(obj, d: Dist):
    """Rank 0's value on every rank. An exception on rank 0 is re-raised everywhere, so no
    rank is left waiting at a barrier for a rank that already failed."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], BaseException):
        raise box[0] if d.main else SystemExit(f"rank {d.rank}: rank 0 failed: {box[0]}")
    return box[0]


def gather_all(obj, d: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn, d: Dist):
    """fn() on rank 0 and its result on every rank; if it raises there, every rank raises."""
    try:
        value = fn() if d.main else None
    except Exception as e:  # noqa: BLE001 - delivered to every rank by broadcast
        value = e
    return broadcast(value, d)


def shutdown(d: Dist) -> None:
    """Leave together and tear the process group down: a rank that exits with the group (and
    DeepSpeed's shared-memory communicator) still alive can abort at interpreter exit."""
    dist.barrier()
    dist.destroy_process_group()
    proc.release_shm(os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", ""))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def precision(ds: DeepSpeedConfig) -> str:
    """The precision this run trains in. bf16 asked for on a machine without a GPU runs on a
    CPU that multiplies bf16 natively; elsewhere bf16, and fp16 anywhere but a GPU, is a
    ConfigError naming the setting. auto stays fp32 on a CPU: the reference numbers are."""
    if ds.precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if ds.precision == "bf16" and not torch.cuda.is_available():
        if cpu_bf16():
            return "bf16"
        from stages.configfile import ConfigError
        raise ConfigError("deepspeed.precision=bf16 needs a CUDA GPU or a CPU with AVX512-BF16 "
                          "or AMX, and this machine has neither; leave it at auto")
    if ds.precision != "fp32":
        need_gpu(f"deepspeed.precision={ds.precision}")
    return ds.precision


def cpu_bf16() -> bool:
    """This CPU multiplies bf16 natively (AVX512-BF16 or AMX): on a two-core AVX512-BF16 VM,
    340 GFLOP/s in bf16 against 156 in fp32 for a 1168 x 576 x 1536 matmul."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def need_gpu(option: str, package: str | None = None, what: str = "") -> None:
    """A ConfigError naming `option` unless this machine has a CUDA GPU (and `package`):
    before any model is loaded, not as a crash inside the library that needs them."""
    from stages.configfile import ConfigError
    why = f" ({package} {what})".rstrip() if package else ""
    if not torch.cuda.is_available():
        raise ConfigError(f"{option} needs a CUDA GPU{why}, and this machine has none; leave "
                          f"it at its default on the CPU")
    if package:
        import importlib.util
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{option} needs the {package} package, which is not installed "
                              f"here (pip install {package})")


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, optim: OptimConfig,
                     world: int) -> dict:
    """The template from infra/deepspeed/ with this run's batch, precision and clipping."""
    cfg = load_deepspeed_template(ds.template)
    accum = train.global_batch_size // (train.micro_batch_size * world)
    prec = precision(ds)
    cfg.update(train_micro_batch_size_per_gpu=train.micro_batch_size,
               gradient_accumulation_steps=accum, train_batch_size=train.global_batch_size,
               gradient_clipping=optim.grad_clip, bf16={"enabled": prec == "bf16"},
               fp16={"enabled": prec == "fp16"})
    return cfg


def lone_rank(engine, world: int):
    """With one rank and no ZeRO, DeepSpeed still flattens every gradient after each backward,
    all-reduces it with itself and copies it back (on SmolLM2-135M: 2.11-2.14 s backward
    without it against 2.31-2.39 s with it). Nothing to reduce: skip it. ZeRO's own reduction
    also partitions the gradients and must stay."""
    if world == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
    return engine


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of `model` off, in its modules and its config: RL compares the log-probs
    of one forward pass with another's, and dropout makes the two differ by noise alone."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in list(vars(config)) if config is not None else []:
        if "dropout" in key and isinstance(getattr(config, key), float):
            setattr(config, key, 0.0)
    return model


def contiguous_lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head reads a contiguous copy of its input. With logits_to_keep it gets a slice
    of the hidden states, and torch's CPU linear on a non-contiguous input of a frozen layer
    (no grad) takes a slow path: on SmolLM2's head (576 x 49152, 16 x 33 positions) 0.99 s
    against 0.10 in bf16, 0.36 against 0.22 in fp32. The copy is [B, kept, hidden]."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, torch.nn.Linear):
        head.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(), *args[1:]))
    return model


def adamw(model: torch.nn.Module, optim: OptimConfig, ds_cfg: dict | None = None):
    """AdamW; DeepSpeed's CPU Adam when the template offloads optimizer state (DeepSpeed
    refuses a torch optimizer there: it would step on the CPU one tensor at a time)."""
    # Decay matrices only: decaying norms and biases hurts and buys nothing (GPT-3, nanoGPT).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    kw = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    if "offload_optimizer" in (ds_cfg or {}).get("zero_optimization", {}):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    # The fused kernel runs on the CPU too (torch >= 2.4): one vectorized pass over each tensor
    # instead of a dozen elementwise ops, 0.044 s against 0.245 s a step for 148M parameters on
    # two cores. The HF Trainer (SFT, RM, TRL's peers) already defaults to it.
    return torch.optim.AdamW(groups, fused=True, **kw)


def lr_lambda(optim: OptimConfig, max_steps: int):
    """Linear warmup, then cosine decay to min_lr_ratio at max_steps (Chinchilla's horizon)."""
    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def work_dir(name: str, configured: str | None, input_key: str) -> Path:
    """Scratch for checkpoints and logs. Keyed by the run's inputs, so a changed config starts
    fresh while the same config resumes."""
    base = Path(configured) if configured else default_home() / "runs" / name
    return base / input_key[:12]


def launch_command(stage: str, cfg_path: Path, overrides: list[str], ds: DeepSpeedConfig) -> str:
    """The command that started this run: the flow passes it; by hand it is rebuilt."""
    given = os.environ.get("ALIGNFLOW_LAUNCH_COMMAND")
    if given:
        return given
    return shlex.join(["deepspeed", "--num_gpus", str(ds.num_gpus), "--module",
                       f"stages.{stage}", "--config", str(cfg_path), *overrides])


class Metrics:
    """JSONL (for machines and the flow's progress artifact) and TensorBoard; rank 0 only."""

    def __init__(self, d: Dist, out: Path):
        self.main = d.main
        self.path = out / "metrics.jsonl"
        self.tb = None
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def log(self, step: int, **values) -> None:
        if not self.main:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def rows(self) -> list[dict]:
        """Every row logged so far, across resumes."""
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


COMPLETE = "complete"   # names the newest step every engine of a run has fully written


def save_checkpoint(engines: dict, ckpt: Path, step: int, keep: int, d: Dist,
                    client: dict | None = None) -> None:
    """Each engine's weights, optimizer and scheduler under ckpt/<name>/step<N>, with the step,
    every rank's RNG state and `client` (e.g. the KL controller) in the first engine's. The
    marker ckpt/complete is replaced only after all engines are written, so a run killed
    between two engines' saves resumes from the previous step, never from a mixed one."""
    states = gather_all(rng_state(), d)
    tag = f"step{step:07d}"
    for i, (name, engine) in enumerate(engines.items()):
        state = {"step": step, "rng": states, **(client or {})} if i == 0 else {}
        engine.save_checkpoint(str(ckpt / name), tag=tag, client_state=state)
    # On disk before the marker says so: a power cut must not leave a marker naming a
    # checkpoint whose files were still in the page cache.
    if d.local_rank == 0:       # one rank per node: the page cache is the node's
        for name in engines:
            fsync_tree(ckpt / name / tag)
    dist.barrier()
    if d.main:
        write_durable(ckpt / COMPLETE, tag.encode())
        for name in engines:
            prune_checkpoints(ckpt / name, keep, tag)
    dist.barrier()


def load_checkpoint(engines: dict, ckpt: Path, d: Dist) -> dict | None:
    """The client state of the newest checkpoint all engines completed (RNG restored), or
    None when there is none."""
    # Rank 0's marker decides for every rank: a rank reading its own disk could pick another
    # step (or none) and train out of step with the rest.
    tag = on_rank0(lambda: (ckpt / COMPLETE).read_text().strip()
                   if (ckpt / COMPLETE).exists() else None, d)
    if tag is None:
        return None
    client = None
    for name, engine in engines.items():
        path, state = engine.load_checkpoint(str(ckpt / name), tag=tag)
        if path is None:
            raise RuntimeError(f"checkpoint {ckpt / name / tag} is marked complete but does "
                               f"not load")
        client = client or state
    set_rng_state(client["rng"][d.rank])
    return client


def prune_checkpoints(ckpt_dir: Path, keep: int, newest: str) -> None:
    """Keep the `keep` newest complete checkpoints; anything newer than `newest` was written
    by a killed run and is never trusted."""
    tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir() and p.name <= newest)
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def trainer_args(run, ds_cfg: dict) -> dict:
    """Our train/optim/checkpoint/deepspeed sections as the HF Trainer's arguments, the same
    for every stage that runs a TRL trainer (sft, rm): warmup + cosine to min_lr_ratio as in
    pretrain, AdamW with our betas, checkpoints every N steps in the run's work directory."""
    cfg = run.cfg
    prec = precision(cfg.deepspeed)
    # transformers 5 reads the TensorBoard directory from the environment
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.work / "tensorboard")
    return dict(
        output_dir=str(run.work / "checkpoints"), deepspeed=ds_cfg, seed=cfg.run.seed,
        per_device_train_batch_size=cfg.train.micro_batch_size,
        per_device_eval_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=ds_cfg["gradient_accumulation_steps"],
        max_steps=cfg.train.max_steps, learning_rate=cfg.optim.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.optim.min_lr_ratio},
        warmup_steps=cfg.optim.warmup_steps, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2, adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.grad_clip, bf16=prec == "bf16", fp16=prec == "fp16",
        gradient_checkpointing=False, logging_steps=cfg.run.log_every, eval_strategy="steps",
        eval_steps=cfg.train.eval_every, save_strategy="steps",
        save_steps=cfg.checkpoint.every_steps, save_total_limit=cfg.checkpoint.keep_last,
        report_to=["tensorboard"], max_length=cfg.data.max_length, disable_tqdm=run.d.rank != 0,
        use_cpu=not torch.cuda.is_available())


def last_hf_checkpoint(ckpt: Path) -> str | None:
    """The newest *complete* checkpoint-N directory the HF Trainer wrote under `ckpt`: the
    trainer writes trainer_state.json last, so a save killed half-way has none and is passed
    over for the one before (transformers' get_last_checkpoint takes the newest whatever)."""
    found = sorted((int(p.name.split("-")[1]), p) for p in ckpt.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit()) if ckpt.is_dir() else []
    return next((str(p) for _, p in reversed(found) if (p / "trainer_state.json").is_file()),
                None)


def trainer_args_as_json(out: Path, args) -> None:
    """The HF Trainer saves its arguments as a pickle (training_args.bin), which no model
    artifact may hold: keep them as JSON."""
    (out / "training_args.bin").unlink(missing_ok=True)
    # Relative to the run's work directory: the machine's paths are not what was trained, and
    # would give the same weights another digest on every host.
    fields = {**json.loads(args.to_json_string()), "output_dir": "checkpoints"}
    (out / "training_args.json").write_text(json.dumps(fields, indent=2, sort_keys=True))


def hf_log(history: list[dict]) -> list[dict]:
    """The HF Trainer's log history in alignflow's metric names (stages/metrics.py): loss ->
    train/loss, eval_loss -> eval/loss, learning_rate -> train/lr, runtimes under perf/."""
    rename = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
              "train_loss": "train/mean_loss", "step": "step", "epoch": "epoch"}

    def name(k: str) -> str:
        if k in rename:
            return rename[k]
        if k.endswith(("_runtime", "_per_second", "num_tokens")):
            # Counters and speeds, not quality: a token count on the eval panel's axis
            # flattens every loss to zero.
            return f"perf/{k}"
        return f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
    return [{name(k): v for k, v in row.items()} for row in history]


@contextmanager
def full_parameters(engine):
    """Every parameter whole on every rank (ZeRO-3 shards them), for eval and export."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                               modifier_rank=None):
            yield engine.module
    else:
        yield engine.module


def save_hf(engine, tokenizer, out: Path, d: Dist) -> None:
    """HF directory in safetensors: loads with plain from_pretrained, no DeepSpeed needed."""
    with full_parameters(engine) as module:
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            module.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    dist.barrier()


def run(main) -> None:
    """A stage's entry point: bad input (config, data, artifacts) exits 2 with one clear line,
    a non-finite loss exits 3; anything else is a bug and keeps its traceback."""
    from stages.artifacts import ArtifactError
    from stages.configfile import ConfigError, DataError
    try:
        main()
    except (ConfigError, DataError, ArtifactError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        # Every rank raised (on_rank0 delivers rank 0's error to all); a rank that exits with
        # the process group alive aborts at interpreter exit and hides the exit code.
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(3 if isinstance(e, FloatingPointError) else 2)
    finally:
        # Whatever way a rank leaves (a bug's traceback too), its ~66 MB shared-memory buffer
        # goes with it: nothing else unlinks it when the stage was launched by hand.
        proc.release_shm(os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", ""))


def log(d: Dist, msg: str) -> None:
    if d.main:
        print(f"[alignflow] {msg}", file=sys.stderr, flush=True)
