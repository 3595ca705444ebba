"""Stage sft: supervised fine-tuning of a causal LM on prompt/completion pairs, with TRL.

    deepspeed --num_gpus 2 --module stages.sft --config configs/tiny/sft.yaml [k=v ...]

setup:  validate config, parent artifact and dataset config; rank 0 builds or reuses the example
        set; set the ChatML template and make <|im_end|> the EOS, so every completion ends with
        it and PPO rollouts stop; drop (and count) examples longer than max_length.
train:  TRL SFTTrainer on the stage's DeepSpeed config; loss on completion tokens only; packing
        and LoRA as options; checkpoints every N steps, resumed after a kill.
save:   HF safetensors with the tokenizer and chat template; held-out loss, and gold accuracy
        by generation for the parent and the result.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from stages import data as D
from stages import engine as E
from stages import plots
from stages.artifacts import ArtifactStore, input_key
from stages.config import ConfigError, SFTConfig, parse_stage_args, resolved
from stages.examples import get_example_set, load_example_set, read_jsonl
from stages.model import chat_length, completion_loss, gold_accuracy, load_tokenizer, parent_model


def preflight(cfg: SFTConfig, store: ArtifactStore):
    """Every check that can fail before the first expensive step."""
    parent = parent_model(store, cfg.parent, "parent", causal=True)  # any causal LM stage
    ds = load_example_set(cfg.data.dataset)
    if ds.kind != "sft":
        raise ConfigError(f"{cfg.data.dataset}: kind is '{ds.kind}', stage sft needs 'sft'")
    if cfg.optim_8bit and not torch.cuda.is_available():
        raise ConfigError("optim_8bit=true needs a CUDA GPU (bitsandbytes 8-bit AdamW); set it "
                          "to false on the CPU")
    if cfg.lora.enabled and E.deepspeed_config(cfg.deepspeed, cfg.train, cfg.optim, 1) \
            .get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError("lora.enabled with ZeRO-3 is not supported here: use a zero0-2 template")
    positions = json.loads((parent.local_path() / "config.json").read_text()) \
        .get("max_position_embeddings", 1 << 30)
    if cfg.data.max_length > positions:
        raise ConfigError(f"data.max_length={cfg.data.max_length} is above the parent's "
                          f"{positions} positions")
    return parent


def chat_tokenizer(path: Path):
    tok = load_tokenizer(path)
    if tok.pad_token is None:
        raise D.DataError(f"{path}: tokenizer has no pad token; batches cannot be padded")
    if D.CHAT_EOS not in tok.get_vocab():
        raise D.DataError(f"{path}: tokenizer lacks {D.CHAT_EOS}; the chat template needs it")
    tok.chat_template = D.CHAT_TEMPLATE
    tok.eos_token = D.CHAT_EOS
    return tok


def conversational(recs: list[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}]} for r in recs]


def drop_too_long(recs: list[dict], tok, max_length: int) -> tuple[list[dict], int]:
    """Examples whose prompt+completion exceed max_length would lose their EOS to truncation."""
    keep = []
    for r in recs:
        msgs = r["prompt"] + r["completion"]
        if chat_length(tok, msgs) <= max_length:
            keep.append(r)
    return keep, len(recs) - len(keep)


def main(argv: list[str] | None = None) -> None:
    cfg, cfg_path, overrides = parse_stage_args(SFTConfig, sys.argv[1:] if argv is None else argv)
    t_start = time.time()
    store = ArtifactStore(cfg.run.store)
    parent = preflight(cfg, store)
    d = E.init_distributed()
    E.seed_all(cfg.run.seed)
    data_digest = E.on_rank0(lambda: get_example_set(cfg.data.dataset, store).digest, d)
    data_art = store.get(data_digest)
    parents = [{"role": "model", "digest": parent.digest},
               {"role": "dataset", "digest": data_art.digest}]
    key = input_key("sft", resolved(cfg), parents)
    if E.reuse_unchanged(store, cfg.run.name, key, cfg.run.force, d):
        E.shutdown(d)
        return

    tok = chat_tokenizer(parent.local_path())
    train_raw = read_jsonl(data_art.local_path() / "train.jsonl")
    eval_raw = read_jsonl(data_art.local_path() / "eval.jsonl")
    train, dropped = drop_too_long(conversational(train_raw), tok, cfg.data.max_length)
    evalset, dropped_eval = drop_too_long(conversational(eval_raw), tok, cfg.data.max_length)
    E.log(d, f"sft {cfg.run.name}: {len(train)} train / {len(evalset)} eval examples; dropped "
             f"{dropped} + {dropped_eval} longer than data.max_length={cfg.data.max_length}")
    if not train:
        raise D.DataError(f"{cfg.data.dataset}: every example is longer than data.max_length")
    task_eval = [r for r in eval_raw if "answer" in r][: cfg.data.eval_examples]

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    work = E.work_dir(cfg.run.name, cfg.run.work_dir, key)
    model = AutoModelForCausalLM.from_pretrained(parent.local_path(), dtype=torch.float32)
    # The parent's numbers on the same held-out data, before any step changes the weights.
    kept_eval = [r for r, c in zip(eval_raw, conversational(eval_raw))
                 if chat_length(tok, c["prompt"] + c["completion"]) <= cfg.data.max_length]
    parent_acc = gold_accuracy(model, tok, task_eval, cfg.data.eval_max_new_tokens) \
        if d.main and task_eval else None
    parent_loss = completion_loss(model, tok, kept_eval) if d.main else None
    ds_cfg = E.deepspeed_config(cfg.deepspeed, cfg.train, cfg.optim, d.world)
    prec = E.precision(cfg.deepspeed)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(work / "tensorboard")  # transformers 5 reads it
    args = TRLConfig(
        output_dir=str(work / "checkpoints"), deepspeed=ds_cfg, seed=cfg.run.seed,
        per_device_train_batch_size=cfg.train.micro_batch_size,
        per_device_eval_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=ds_cfg["gradient_accumulation_steps"],
        max_steps=cfg.train.max_steps, learning_rate=cfg.optim.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.optim.min_lr_ratio},
        warmup_steps=cfg.optim.warmup_steps, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2, adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.grad_clip, optim="adamw_bnb_8bit" if cfg.optim_8bit else "adamw_torch",
        bf16=prec == "bf16", fp16=prec == "fp16", gradient_checkpointing=False,
        logging_steps=cfg.run.log_every, eval_strategy="steps", eval_steps=cfg.train.eval_every,
        save_strategy="steps", save_steps=cfg.checkpoint.every_steps,
        save_total_limit=cfg.checkpoint.keep_last, report_to=["tensorboard"],
        max_length=cfg.data.max_length,
        packing=cfg.data.packing, completion_only_loss=cfg.data.completion_only,
        eos_token=D.CHAT_EOS, dataset_num_proc=None, disable_tqdm=not d.main,
        use_cpu=not torch.cuda.is_available())
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                 lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                         eval_dataset=Dataset.from_list(evalset), processing_class=tok,
                         peft_config=peft_config)
    from transformers.trainer_utils import get_last_checkpoint
    last = get_last_checkpoint(str(work / "checkpoints")) if cfg.checkpoint.resume and \
        (work / "checkpoints").is_dir() else None
    if last:
        E.log(d, f"resumed from {last}")
    t_train = time.time()
    trainer.train(resume_from_checkpoint=last)
    eval_metrics = trainer.evaluate()
    t_end_train = time.time()

    # --- save -----------------------------------------------------------------------------
    export = work / "export"
    adapter = work / "adapter"
    if cfg.lora.enabled:
        trainer.model.save_pretrained(adapter)   # the adapter weights alone
        merged = trainer.model.merge_and_unload()
        if d.main:
            merged.save_pretrained(export, safe_serialization=True)
    else:
        trainer.save_model(str(export))          # gathers ZeRO-3 shards
    dist.barrier()
    if d.main:
        tok.save_pretrained(export)
        result = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
        acc = gold_accuracy(result, tok, task_eval, cfg.data.eval_max_new_tokens) \
            if task_eval else None
        loss = completion_loss(result, tok, kept_eval)
        (export / "train_log.jsonl").write_text("".join(
            json.dumps(r) + "\n" for r in trainer.state.log_history))
        # Gold metrics only where the held-out set has checkable task prompts.
        gold = {"gold_accuracy": acc["accuracy"], "parent_gold_accuracy": parent_acc["accuracy"],
                "gold_accuracy_by_task": acc["by_task"], "eos_rate": acc["eos_rate"]} if acc \
            else {}
        metrics = {"eval_loss": eval_metrics.get("eval_loss"), "heldout_loss": loss,
                   "parent_heldout_loss": parent_loss, **gold,
                   "train_examples": len(train), "dropped_too_long": dropped + dropped_eval,
                   "train_loss": next((r["train_loss"] for r in reversed(trainer.state.log_history)
                                       if "train_loss" in r), None)}
        if acc:
            (export / "samples.json").write_text(json.dumps(acc["samples"], indent=2))
        plots.curves(export / "train_log.jsonl", export / "curves.png", f"sft {cfg.run.name}")
        extra_parents = []
        if cfg.lora.enabled:
            ad = store.put(adapter, kind="adapter", stage="sft", name=f"{cfg.run.name}-lora",
                           parents=parents, config=resolved(cfg))
            extra_parents = [{"role": "adapter", "digest": ad.digest}]
        art = store.put(export, kind="model", stage="sft", name=cfg.run.name,
                        parents=parents + extra_parents, config=resolved(cfg), input_key=key,
                        datasets={"train": {"digest": data_art.digest, "examples": len(train)}},
                        metrics=metrics, move=True,
                        timings={"train_s": t_end_train - t_train,
                                 "total_s": time.time() - t_start},
                        command=E.launch_command("sft", cfg_path, overrides, cfg.deepspeed))
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        E.log(d, f"held-out answer loss {parent_loss:.4f} (parent) -> {loss:.4f}" + (
            f"; gold accuracy {parent_acc['accuracy']:.3f} (parent) -> {acc['accuracy']:.3f}"
            if acc else ""))
        E.log(d, f"exported {art.kind} {cfg.run.name} {art.short} to {store.root}")
        print(f"ALIGNFLOW_ARTIFACT={art.digest}", flush=True)
    E.shutdown(d)


if __name__ == "__main__":
    E.run(main)
