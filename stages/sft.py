"""Stage sft: supervised fine-tuning of a causal LM on prompt/completion pairs, with TRL.

    deepspeed --num_gpus 2 --module stages.sft --config configs/tiny/sft.yaml [k=v ...]

setup:    validate config, parent artifact and dataset config.
data:     rank 0 builds or reuses the example set; the ChatML template with <|im_end|> as the
          EOS, so every completion ends with it and PPO rollouts stop; examples longer than
          max_length are dropped and counted.
models:   the parent, measured first (held-out answer loss, gold accuracy); TRL's SFTTrainer on
          the stage's DeepSpeed config, loss on completion tokens only, packing and LoRA.
resume:   the newest checkpoint the trainer wrote.
train:    trainer.train, checkpoints every N steps.
evaluate: the result, by the same function as the parent.
export:   HF safetensors with the tokenizer and chat template (LoRA merged; the adapter is its
          own artifact).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from stages import data as D
from stages import engine as E
from stages import metrics as M
from stages import stage as S
from stages.artifacts import ArtifactStore
from stages.config import SFTConfig
from stages.configfile import ConfigError, resolved
from stages.examples import load_example_set, read_jsonl
from stages.model import chat_length, completion_loss, gold_accuracy, load_tokenizer, parent_model


def preflight(cfg: SFTConfig, store: ArtifactStore):
    """Every check that can fail before the first expensive step."""
    parent = parent_model(store, cfg.parent, "parent", causal=True)  # any causal LM stage
    ds = load_example_set(cfg.data.dataset)
    if ds.kind != "sft":
        raise ConfigError(f"{cfg.data.dataset}: kind is '{ds.kind}', stage sft needs 'sft'")
    if cfg.optim_8bit:
        E.need_gpu("optim_8bit=true", "bitsandbytes", "8-bit AdamW")
    if cfg.weights_8bit:
        E.need_gpu("weights_8bit=true", "bitsandbytes", "LLM.int8 base weights")
    if cfg.lora.enabled and E.deepspeed_config(cfg.deepspeed, cfg.train, cfg.optim, 1) \
            .get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError("lora.enabled with ZeRO-3 is not supported here: use a zero0-2 template")
    positions = json.loads((parent.local_path() / "config.json").read_text()) \
        .get("max_position_embeddings", 1 << 30)
    if cfg.data.max_length > positions:
        raise ConfigError(f"data.max_length={cfg.data.max_length} is above the parent's "
                          f"{positions} positions")
    return parent


def int8_base(path: Path, d: E.Dist):
    """The parent with its linear layers in bitsandbytes LLM.int8 (frozen), ready for LoRA."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map={"": d.device.index or 0}, dtype=torch.bfloat16)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def merged_on_full_precision(path: Path, adapter: Path):
    """The adapter merged into the parent's full-precision weights: merging into int8 ones
    would round every weight the adapter touches a second time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def chat_tokenizer(path: Path):
    """The parent's tokenizer with a chat template whose turns end with the EOS: its own where
    it has one (an imported model keeps its template; `alignflow import` gave ChatML to one
    without), else ChatML on the <|im_end|> our own tokenizers reserve."""
    tok = load_tokenizer(path)
    if tok.pad_token is None:
        raise D.DataError(f"{path}: tokenizer has no pad token; batches cannot be padded")
    if tok.chat_template:
        if tok.eos_token is None:
            raise D.DataError(f"{path}: tokenizer has a chat template but no EOS token")
        return tok
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
    # --- setup: config, the checks that fail in a second, the ranks --------------------------
    run, parent = S.setup(SFTConfig, "sft", argv, preflight)
    cfg, store, d = run.cfg, run.store, run.d

    # --- data: rank 0 builds (or reuses) the example set; pairs too long are dropped ---------
    data_art = S.example_set(run, cfg.data.dataset)
    if S.reused(run, model=parent.digest, dataset=data_art.digest):
        return
    train_raw = read_jsonl(data_art.local_path() / "train.jsonl")
    eval_raw = read_jsonl(data_art.local_path() / "eval.jsonl")
    tok = chat_tokenizer(parent.local_path())
    train, dropped = drop_too_long(conversational(train_raw), tok, cfg.data.max_length)
    evalset, dropped_eval = drop_too_long(conversational(eval_raw), tok, cfg.data.max_length)
    E.log(d, f"sft {run.name}: {len(train)} train / {len(evalset)} eval examples; dropped "
             f"{dropped} + {dropped_eval} longer than data.max_length={cfg.data.max_length}")
    if not train:
        raise D.DataError(f"{cfg.data.dataset}: every example is longer than data.max_length")
    task_eval = [r for r in eval_raw if "answer" in r][: cfg.data.eval_examples]
    kept_eval = [r for r, c in zip(eval_raw, conversational(eval_raw))
                 if chat_length(tok, c["prompt"] + c["completion"]) <= cfg.data.max_length]
    run.mark("data")

    # --- models: the parent, measured before any step changes it; TRL's trainer -------------
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(parent.local_path(), dtype=torch.float32)
    baseline = evaluate(model, tok, task_eval, kept_eval, cfg) if d.main else None
    ds_cfg = E.deepspeed_config(cfg.deepspeed, cfg.train, cfg.optim, d.world)
    hf_args = E.trainer_args(run, ds_cfg)
    if cfg.weights_8bit:
        model = int8_base(parent.local_path(), d)
        # DeepSpeed casts and partitions every parameter it is given, int8 ones included; the
        # HF Trainer's own (DDP) path leaves a quantized base alone, as QLoRA recipes run.
        hf_args["deepspeed"] = None
    args = TRLConfig(**hf_args,
                     optim="adamw_bnb_8bit" if cfg.optim_8bit else "adamw_torch",
                     packing=cfg.data.packing, completion_only_loss=cfg.data.completion_only,
                     eos_token=tok.eos_token, dataset_num_proc=None)
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                 lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                         eval_dataset=Dataset.from_list(evalset), processing_class=tok,
                         peft_config=peft_config)

    run.mark("models")

    # --- resume and train: TRL's trainer, from the newest checkpoint it wrote ----------------
    S.fit(trainer, run)
    run.mark("train")

    # --- evaluate and export: the merged model, measured as its parent was -------------------
    adapter = run.work / "adapter"
    export = run.work / "export"
    if cfg.lora.enabled:
        trainer.model.save_pretrained(adapter)   # the adapter weights alone
        merged = (merged_on_full_precision(parent.local_path(), adapter) if cfg.weights_8bit
                  else trainer.model.merge_and_unload())
        if d.main:
            merged.save_pretrained(export, safe_serialization=True)
    else:
        trainer.save_model(str(export))          # gathers ZeRO-3 shards
    dist.barrier()
    if d.main:
        E.trainer_args_as_json(export, args)
        tok.save_pretrained(export)
        result = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
        current = evaluate(result, tok, task_eval, kept_eval, cfg)
        samples = current.pop("samples", None)
        baseline.pop("samples", None)
        if samples:
            (export / "samples.json").write_text(json.dumps(samples, indent=2))
        final = {**M.with_baseline(current, baseline), "data/train_examples": len(train),
                 "data/dropped_too_long": dropped + dropped_eval,
                 "train/loss": next((r["train_loss"] for r in reversed(trainer.state.log_history)
                                     if "train_loss" in r), None)}
        run.mark("evaluate")
        extra_parents = []
        if cfg.lora.enabled:
            ad = store.put(adapter, kind="adapter", stage="sft", name=f"{run.name}-lora",
                           parents=run.parents, config=resolved(cfg))
            extra_parents = [S.parent("adapter", ad.digest)]
        S.export(run, export, metrics=final, headline=headline(final), extra_parents=extra_parents,
                 datasets={"train": {"digest": data_art.digest, "examples": len(train)}},
                 train_log=E.hf_log(trainer.state.log_history))
    E.shutdown(d)


def evaluate(model, tok, task_eval: list[dict], kept_eval: list[dict], cfg: SFTConfig) -> dict:
    """Held-out answer loss, and gold accuracy by generation where the set has task prompts:
    one function for the parent and the result, so the two compare."""
    out = {"eval/loss": completion_loss(model, tok, kept_eval)}
    if task_eval:
        out.update(gold_accuracy(model, tok, task_eval, cfg.data.eval_max_new_tokens))
    return out


def headline(m: dict) -> dict:
    """Gold accuracy against the parent's where the held-out set is checkable, else the
    held-out answer loss against the parent's."""
    if "gold/accuracy" in m:
        acc, base = m["gold/accuracy"], m["baseline/gold/accuracy"]
        verdict = M.verdict(acc, base, "higher")
        return M.headline("gold/accuracy", acc, baseline=base, verdict=verdict, text=(
            f"held-out gold accuracy {acc:.3f} {verdict} the parent's {base:.3f} (answer loss "
            f"{m['baseline/eval/loss']:.3f} -> {m['eval/loss']:.3f})"))
    loss, base = m["eval/loss"], m["baseline/eval/loss"]
    verdict = M.verdict(loss, base, "lower")
    return M.headline("eval/loss", loss, baseline=base, verdict=verdict, text=(
        f"held-out answer loss {loss:.3f} {verdict} the parent's {base:.3f}"))


if __name__ == "__main__":
    E.run(main)
