"""Stage rm: a reward model (one score per sequence) from an SFT model, with TRL.

    deepspeed --num_gpus 2 --module stages.rm --config configs/tiny/rm.yaml [k=v ...]

setup:  validate config, SFT parent and preference set; rank 0 builds or reuses the set; drop
        (and count) pairs longer than max_length; the SFT model gets a fresh scalar score head.
train:  TRL RewardTrainer, pairwise loss -logsigmoid(chosen - rejected [- margin]) plus a small
        centering term so rewards stay near zero; checkpoints every N steps, resumed after a kill.
save:   HF safetensors (AutoModelForSequenceClassification) with the tokenizer; held-out pairwise
        accuracy; mean and std of rewards over the held-out set, which PPO uses to normalize.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from stages import data as D
from stages import engine as E
from stages import plots
from stages.artifacts import ArtifactStore, input_key
from stages.config import ConfigError, RMConfig, parse_stage_args, resolved
from stages.examples import get_example_set, load_example_set, read_jsonl
from stages.model import chat_length, load_tokenizer, parent_model


def preflight(cfg: RMConfig, store: ArtifactStore):
    """Every check that can fail before the first expensive step."""
    parent = parent_model(store, cfg.parent, "parent", causal=True, stages=("sft",))
    ds = load_example_set(cfg.data.dataset)
    if ds.kind != "preference":
        raise ConfigError(f"{cfg.data.dataset}: kind is '{ds.kind}', stage rm needs 'preference'")
    tok = load_tokenizer(parent.local_path())
    if tok.pad_token is None:
        raise D.DataError(f"parent {cfg.parent}: tokenizer has no pad token")
    if not tok.chat_template:
        raise D.DataError(f"parent {cfg.parent}: tokenizer has no chat template (not an SFT model)")
    return parent


def conversational(recs: list[dict]) -> list[dict]:
    """TRL's conversational preference rows; `family` (task family or source) is popped off
    before training and used to break held-out accuracy down."""
    out = []
    for r in recs:
        ex = {"family": r.get("task") or r.get("source", ""),
              "prompt": [{"role": "user", "content": r["prompt"]}],
              "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        if "margin" in r:
            ex["margin"] = r["margin"]
        out.append(ex)
    return out


def drop_too_long(recs: list[dict], tok, max_length: int) -> tuple[list[dict], int]:
    keep = [r for r in recs if max(chat_length(tok, r["prompt"] + r[k])
                                   for k in ("chosen", "rejected")) <= max_length]
    return keep, len(recs) - len(keep)


def policy_pairs(parent, tok, recs: list[dict], cfg: RMConfig, seed: int) -> list[dict]:
    """(prompt, known answer, the parent's wrong sample) for task records with an answer."""
    from transformers import AutoModelForCausalLM
    from stages.model import sample_answers
    from stages.tasks import check
    tasks = list({r["prompt"]: r for r in recs if "answer" in r}.values())
    if not tasks:
        return []
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(parent.local_path(), dtype=torch.float32)
    samples = sample_answers(model, tok, [r["prompt"] for r in tasks], cfg.data.policy_samples,
                             cfg.data.policy_temperature, cfg.data.policy_max_new_tokens)
    out = []
    for r, answers in zip(tasks, samples):
        for a in dict.fromkeys(answers):
            if not check(r["answer"], a) and a.strip() != r["answer"].strip():
                out.append({"task": r.get("task"), "source": "policy", "prompt": r["prompt"],
                            "chosen": r["answer"], "rejected": a})
    return out


@torch.no_grad()
def score(model, tok, recs: list[dict], batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected for each pair, as PPO will compute them."""
    model.eval()
    tok.padding_side = "right"
    out = {"chosen": [], "rejected": []}
    for k in out:
        for i in range(0, len(recs), batch):
            texts = [tok.apply_chat_template(r["prompt"] + r[k], tokenize=False)
                     for r in recs[i:i + batch]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out[k].append(model(**enc).logits[:, 0].float())
    return torch.cat(out["chosen"]), torch.cat(out["rejected"])


def main(argv: list[str] | None = None) -> None:
    cfg, cfg_path, overrides = parse_stage_args(RMConfig, sys.argv[1:] if argv is None else argv)
    t_start = time.time()
    store = ArtifactStore(cfg.run.store)
    parent = preflight(cfg, store)
    d = E.init_distributed()
    E.seed_all(cfg.run.seed)
    data_digest = E.on_rank0(lambda: get_example_set(cfg.data.dataset, store).digest, d)
    data_art = store.get(data_digest)
    parents = [{"role": "model", "digest": parent.digest},
               {"role": "dataset", "digest": data_art.digest}]
    key = input_key("rm", resolved(cfg), parents)
    if E.reuse_unchanged(store, cfg.run.name, key, cfg.run.force, d):
        E.shutdown(d)
        return

    tok = load_tokenizer(parent.local_path())
    train_raw = read_jsonl(data_art.local_path() / "train.jsonl")
    eval_raw = read_jsonl(data_art.local_path() / "eval.jsonl")[: cfg.data.eval_examples]
    work = E.work_dir(cfg.run.name, cfg.run.work_dir, key)
    policy = {"train": [], "eval": []}
    if cfg.data.policy_samples:
        # Rank 0 samples once; every rank trains on the same pairs.
        policy = E.on_rank0(lambda: {"train": policy_pairs(parent, tok, train_raw, cfg, 1),
                                     "eval": policy_pairs(parent, tok, eval_raw, cfg, 2)}, d)
        E.log(d, f"policy samples: {len(policy['train'])} train / {len(policy['eval'])} eval "
                 f"wrong answers of the parent become rejected answers")
    train, dropped = drop_too_long(conversational(train_raw + policy["train"]), tok,
                                   cfg.data.max_length)
    evalset, dropped_eval = drop_too_long(conversational(eval_raw), tok, cfg.data.max_length)
    policy_eval, _ = drop_too_long(conversational(policy["eval"]), tok, cfg.data.max_length)
    families = [r.pop("family") for r in evalset]
    for r in train + policy_eval:
        r.pop("family")
    E.log(d, f"rm {cfg.run.name}: {len(train)} train / {len(evalset)} eval pairs; dropped "
             f"{dropped} + {dropped_eval} longer than data.max_length={cfg.data.max_length}")
    if not train or not evalset:
        raise D.DataError(f"{cfg.data.dataset}: no pairs left within data.max_length")

    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from transformers.trainer_utils import get_last_checkpoint
    from trl import RewardConfig, RewardTrainer

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(work / "tensorboard")
    model = AutoModelForSequenceClassification.from_pretrained(
        parent.local_path(), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    ds_cfg = E.deepspeed_config(cfg.deepspeed, cfg.train, cfg.optim, d.world)
    prec = E.precision(cfg.deepspeed)
    args = RewardConfig(
        output_dir=str(work / "checkpoints"), deepspeed=ds_cfg, seed=cfg.run.seed,
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
        report_to=["tensorboard"], max_length=cfg.data.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient or None,
        disable_tqdm=not d.main, use_cpu=not torch.cuda.is_available())
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                            eval_dataset=Dataset.from_list(evalset), processing_class=tok)
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
    trainer.save_model(str(export))
    dist.barrier()
    if d.main:
        tok.save_pretrained(export)
        result = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32)
        chosen, rejected = score(result, tok, evalset)
        both = torch.cat([chosen, rejected])
        stats = {"reward_mean": both.mean().item(), "reward_std": both.std().item(),
                 "pairs": len(evalset)}
        (export / "reward_stats.json").write_text(json.dumps(stats, indent=2))
        (export / "train_log.jsonl").write_text("".join(
            json.dumps(r) + "\n" for r in trainer.state.log_history))
        right = (chosen > rejected).tolist()
        by_family = {f: sum(ok for ok, g in zip(right, families) if g == f) / families.count(f)
                     for f in sorted(set(families))}
        if policy_eval:  # held-out wrong answers the SFT model actually gives
            pc, pr = score(result, tok, policy_eval)
            by_family["policy_samples"] = (pc > pr).float().mean().item()
            with open(export / "policy_pairs.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in policy["train"])
        metrics = {"pairwise_accuracy": (chosen > rejected).float().mean().item(),
                   "pairwise_accuracy_by_family": by_family,
                   "reward_margin": (chosen - rejected).mean().item(), **stats,
                   "eval_loss": eval_metrics.get("eval_loss"), "train_pairs": len(train),
                   "policy_pairs": len(policy["train"]),
                   "dropped_too_long": dropped + dropped_eval}
        plots.curves(export / "train_log.jsonl", export / "curves.png", f"rm {cfg.run.name}")
        art = store.put(export, kind="model", stage="rm", name=cfg.run.name, parents=parents,
                        config=resolved(cfg), input_key=key, metrics=metrics, move=True,
                        datasets={"train": {"digest": data_art.digest, "pairs": len(train)}},
                        timings={"train_s": t_end_train - t_train,
                                 "total_s": time.time() - t_start},
                        command=E.launch_command("rm", cfg_path, overrides, cfg.deepspeed))
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        E.log(d, f"held-out pairwise accuracy {metrics['pairwise_accuracy']:.3f} (" + " ".join(
            f"{f} {a:.2f}" for f, a in by_family.items()) + f"); rewards "
            f"{stats['reward_mean']:.3f} +- {stats['reward_std']:.3f}")
        E.log(d, f"exported {art.kind} {cfg.run.name} {art.short} to {store.root}")
        print(f"ALIGNFLOW_ARTIFACT={art.digest}", flush=True)
    E.shutdown(d)


if __name__ == "__main__":
    E.run(main)
