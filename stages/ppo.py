"""Stage ppo: RLHF with PPO on four DeepSpeed engines: actor, critic, reference, reward.

    deepspeed --num_gpus 2 --module stages.ppo --config configs/tiny/ppo.yaml [k=v ...]

Our own implementation: TRL removed PPOTrainer in 2026 (huggingface/trl#7020). Built like
DeepSpeed-Chat's step 3, with the details of "The N Implementation Details of RLHF with PPO":
the actor and the frozen reference start from the SFT model; the critic starts from the reward
model (its score head read per token) and the frozen reward model scores whole responses.

setup:  validate parents (SFT actor, RM reward, same tokenizer), prompts (none longer than the
        context minus the response); rank 0 builds or reuses the prompt set; four engines.
step:   sample responses (temperature, top-k, top-p), cut after EOS, penalize responses with no
        EOS; RM score at the last token, normalized with the RM's statistics and clipped;
        per-token KL penalty against the reference (k1 or k3), fixed or adaptive beta; GAE and
        whitened advantages; several epochs of clipped policy and value updates.
save:   held-out evaluation of SFT and PPO, greedy and sampled (RM reward, gold accuracy, KL),
        reward-hacking check, the actor as an HF causal LM whose manifest names both parents.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from stages import data as D
from stages import engine as E
from stages import plots
from stages import losses as L
from stages.artifacts import ArtifactStore, input_key
from stages.config import ConfigError, PPOConfig, TrainConfig, parse_stage_args, resolved
from stages.examples import get_example_set, load_example_set, read_jsonl
from stages.model import chat_prompt, load_tokenizer, parent_model
from stages.tasks import accuracy_change, check


# --- setup --------------------------------------------------------------------------------

def preflight(cfg: PPOConfig, store: ArtifactStore):
    actor = parent_model(store, cfg.actor, "actor", causal=True, stages=("sft", "ppo"))
    reward = parent_model(store, cfg.reward, "reward", causal=False, stages=("rm",))
    tok, rtok = load_tokenizer(actor.local_path()), load_tokenizer(reward.local_path())
    if tok.get_vocab() != rtok.get_vocab():
        raise ConfigError(f"actor '{cfg.actor}' and reward '{cfg.reward}' have different "
                          f"tokenizers; the reward model must read the actor's tokens")
    if not (reward.local_path() / "reward_stats.json").exists():
        raise ConfigError(f"reward '{cfg.reward}' has no reward_stats.json to normalize with")
    ds = load_example_set(cfg.data.prompts)
    if ds.kind != "prompts":
        raise ConfigError(f"{cfg.data.prompts}: kind is '{ds.kind}', stage ppo needs 'prompts'")
    positions = json.loads((actor.local_path() / "config.json").read_text())[
        "max_position_embeddings"]
    room = positions - cfg.rollout.max_new_tokens
    if cfg.data.max_prompt_length > room:
        raise ConfigError(f"data.max_prompt_length={cfg.data.max_prompt_length} leaves no room "
                          f"for rollout.max_new_tokens={cfg.rollout.max_new_tokens} in "
                          f"{positions} positions (at most {room})")
    zero = E.load_deepspeed_template(cfg.deepspeed.template).get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        raise ConfigError("the actor generates every step: ZeRO-3 would gather parameters per "
                          "token; use a zero0-2 template")
    per_rank = cfg.train.global_batch_size // cfg.deepspeed.world_size
    if per_rank % cfg.ppo.minibatch_size:
        raise ConfigError(f"ppo.minibatch_size={cfg.ppo.minibatch_size} does not divide the "
                          f"{per_rank} rollouts per rank")
    return actor, reward


def check_prompts(recs: list[dict], tok, cfg: PPOConfig, where: str) -> None:
    if not recs:
        raise D.DataError(f"{where}: the prompt set is empty")
    too_long = sum(len(tok(chat_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"])
                   > cfg.data.max_prompt_length for r in recs)
    if too_long:
        raise D.DataError(f"{where}: {too_long} of {len(recs)} prompts are longer than "
                          f"data.max_prompt_length={cfg.data.max_prompt_length} tokens")
    unanswered = sum("answer" not in r for r in recs)
    if cfg.ppo.reward_source == "checker" and unanswered:
        raise D.DataError(f"{where}: ppo.reward_source=checker needs an answer for every prompt; "
                          f"{unanswered} of {len(recs)} have none (use task sources, or "
                          f"reward_source=rm)")


class Critic(torch.nn.Module):
    """The reward model's transformer and score head, read at every token: V(s_t)."""

    def __init__(self, rm):
        super().__init__()
        self.body, self.score = rm.model, rm.score

    def forward(self, input_ids, attention_mask, position_ids):
        h = self.body(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids).last_hidden_state
        return self.score(h).squeeze(-1).float()


def engine(model, cfg: PPOConfig, d: E.Dist, lr: float | None, offload: bool = False):
    """A DeepSpeed engine; frozen ones (lr None) get no optimizer and may live on the CPU."""
    import deepspeed
    mb = TrainConfig(micro_batch_size=cfg.ppo.minibatch_size,
                     global_batch_size=cfg.ppo.minibatch_size * d.world, max_steps=1)
    ds_cfg = E.deepspeed_config(cfg.deepspeed, mb, cfg.optim, d.world)
    if lr is None:
        model.eval().requires_grad_(False)
        zero = {"stage": 3, "offload_param": {"device": "cpu"}} if offload else {"stage": 0}
        ds_cfg["zero_optimization"] = zero
        return deepspeed.initialize(model=model, config=ds_cfg)[0]
    opt = E.adamw(model, cfg.optim.model_copy(update={"lr": lr}), ds_cfg)
    return deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)[0]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token of a left-padded row."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# --- one PPO step -------------------------------------------------------------------------

@torch.no_grad()
def rollout(actor, ref, critic, reward, tok, prompts: list[dict], cfg: PPOConfig,
            kl_ctl: L.KLController, stats: dict, d: E.Dist, greedy: bool = False) -> dict:
    """Sample responses and score them: everything the PPO epochs need, on this rank."""
    tok.padding_side = "left"
    enc = tok([chat_prompt(tok, p["prompt"]) for p in prompts], return_tensors="pt",
              padding=True, add_special_tokens=False).to(d.device)
    t0 = time.time()
    sampling = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": cfg.rollout.temperature,
        "top_k": cfg.rollout.top_k or None, "top_p": cfg.rollout.top_p}
    out = actor.module.generate(**enc, max_new_tokens=cfg.rollout.max_new_tokens,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                **sampling)
    gen_s = time.time() - t0
    P = enc["input_ids"].shape[1]
    resp = out[:, P:]
    # Everything after the first EOS is padding; the EOS itself is part of the response.
    is_eos = resp == tok.eos_token_id
    ended = is_eos.any(1)
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = (~after).float()
    resp = resp.masked_fill(after, tok.pad_token_id)
    seq = torch.cat([enc["input_ids"], resp], 1)
    attn = torch.cat([enc["attention_mask"], mask.long()], 1)
    pos = positions(attn)
    temp = 1.0 if greedy else cfg.rollout.temperature
    logits = actor(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1]
    logp = L.token_logprobs(logits, resp, temp)
    ref_logits = ref(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1]
    ref_logp = L.token_logprobs(ref_logits, resp, temp)
    values = critic(seq, attn, pos)[:, P - 1:-1] * mask
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(resp, mask)]
    raw = score(reward, tok, prompts, texts, d)
    gold = [check(p["answer"], t) for p, t in zip(prompts, texts) if "answer" in p]
    if cfg.ppo.reward_source == "checker":
        norm = torch.tensor(gold, dtype=torch.float32, device=d.device) * 2 - 1
    else:
        norm = ((raw - stats["reward_mean"]) / stats["reward_std"]).clamp(-cfg.ppo.reward_clip,
                                                                          cfg.ppo.reward_clip)
    norm = norm - cfg.rollout.missing_eos_penalty * (~ended).float()
    kl = L.kl_estimate(logp, ref_logp, cfg.kl.estimator) * mask
    exact_kl = (L.exact_kl(logits, ref_logits) * mask).sum(1)
    rewards = L.token_rewards(norm, kl, mask, kl_ctl.beta)
    adv, returns = L.gae(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        adv = L.whiten(adv, mask)
    return {"seq": seq, "attn": attn, "pos": pos, "resp": resp, "mask": mask, "P": P,
            "logp": logp, "values": values, "adv": adv, "returns": returns, "texts": texts,
            "raw": raw, "norm": norm, "kl": kl.sum(1), "exact_kl": exact_kl,
            "ended": ended.float(), "gold": gold,
            "gen_s": gen_s, "gen_tokens": float(mask.sum())}


def score(reward, tok, prompts: list[dict], texts: list[str], d: E.Dist) -> torch.Tensor:
    """RM score of each conversation, formatted exactly as the RM was trained on."""
    tok.padding_side = "right"
    convs = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]},
                                      {"role": "assistant", "content": t}], tokenize=False)
             for p, t in zip(prompts, texts)]
    enc = tok(convs, return_tensors="pt", padding=True, add_special_tokens=False).to(d.device)
    return reward(**enc).logits[:, 0].float()


def ppo_epochs(actor, critic, b: dict, cfg: PPOConfig, rng: np.random.Generator) -> dict:
    n, mb, P = b["seq"].shape[0], cfg.ppo.minibatch_size, b["P"]
    acc: dict[str, list] = {}
    for _ in range(cfg.ppo.epochs):
        for idx in np.split(rng.permutation(n), n // mb):
            i = torch.as_tensor(idx)
            seq, attn, pos, mask = b["seq"][i], b["attn"][i], b["pos"][i], b["mask"][i]
            logits = actor(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1]
            logp = L.token_logprobs(logits, b["resp"][i], cfg.rollout.temperature)
            pg_loss, pg = L.policy_loss(logp, b["logp"][i], b["adv"][i], mask, cfg.ppo.clip_range)
            actor.backward(pg_loss)
            actor.step()
            values = critic(seq, attn, pos)[:, P - 1:-1]
            vf_loss, vf = L.value_loss(values, b["values"][i], b["returns"][i], mask,
                                       cfg.ppo.value_clip_range)
            critic.backward(cfg.ppo.vf_coef * vf_loss)
            critic.step()
            with torch.no_grad():
                ent = L.masked_mean(L.entropy(logits), mask).item()
            for k, v in {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
                         "entropy": ent, **pg, **vf}.items():
                acc.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def mean_all(values: dict[str, float], d: E.Dist) -> dict[str, float]:
    """Average scalar metrics over ranks."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: (t[i] / d.world).item() for i, k in enumerate(keys)}


@torch.no_grad()
def evaluate(actor, ref, critic, reward, tok, prompts, cfg, kl_ctl, stats, d) -> dict:
    """Greedy responses to held-out prompts: RM reward, gold accuracy, KL to the reference."""
    mine = prompts[d.rank::d.world]
    raw, gold, kl, ended, samples, by_task = [], [], [], [], [], {}
    for i in range(0, len(mine), cfg.train.micro_batch_size):
        chunk = mine[i:i + cfg.train.micro_batch_size]
        b = rollout(actor, ref, critic, reward, tok, chunk, cfg, kl_ctl, stats, d, greedy=True)
        raw += b["raw"].tolist()
        gold += b["gold"]
        kl += b["exact_kl"].tolist()
        ended += b["ended"].tolist()
        samples += [{"prompt": p["prompt"], "response": t, "answer": p.get("answer"),
                     "reward": r} for p, t, r in zip(chunk, b["texts"], b["raw"].tolist())]
        for p, t in zip(chunk, b["texts"]):
            if "task" in p:
                by_task.setdefault(f"gold_{p['task']}", []).append(check(p["answer"], t))
    # Per family, because a policy may gain on one family while exploiting the RM on another.
    m = mean_all({"reward": float(np.mean(raw)), "gold_accuracy": float(np.mean(gold)) if gold
                  else float("nan"), "kl": float(np.mean(kl)), "eos_rate": float(np.mean(ended)),
                  **{k: float(np.mean(v)) for k, v in by_task.items()}, "n_gold": len(gold),
                  **sampled_eval(actor, ref, critic, reward, tok, mine, cfg, kl_ctl, stats, d)}, d)
    for k in ("n_gold", "n_sampled_gold"):      # counts over all ranks, not means
        if k in m:
            m[k] = round(m[k] * d.world)
    m["samples"] = samples[:8]
    return m


def sampled_eval(actor, ref, critic, reward, tok, mine, cfg, kl_ctl, stats, d) -> dict:
    """RM reward and gold accuracy of responses sampled as in rollouts, on held-out prompts. The
    seed is fixed and the training RNG left untouched, so every evaluation draws alike and a
    resumed run continues exactly."""
    if not cfg.data.eval_samples:
        return {}
    reps = [p for p in mine for _ in range(cfg.data.eval_samples)]
    raw, gold = [], []
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed * 1000 + d.rank)
        for i in range(0, len(reps), cfg.train.micro_batch_size):
            b = rollout(actor, ref, critic, reward, tok, reps[i:i + cfg.train.micro_batch_size],
                        cfg, kl_ctl, stats, d)
            raw += b["raw"].tolist()
            gold += b["gold"]
    return {"sampled_reward": float(np.mean(raw)),
            **({"sampled_gold_accuracy": float(np.mean(gold)),
                "n_sampled_gold": len(gold)} if gold else {})}


def reward_hacking(before: dict, after: dict) -> list[tuple[str, float, float]]:
    """(responses, RM reward gain, gold accuracy change) where the RM says better while the
    checker says worse by more than the noise of the measurement: the policy is exploiting the
    reward model. Greedy and sampled responses apart, because a policy can keep its greedy
    answers and hack in the samples, or the reverse."""
    out = []
    for mode, r, g, n in (("greedy", "reward", "gold_accuracy", "n_gold"),
                          ("sampled", "sampled_reward", "sampled_gold_accuracy",
                           "n_sampled_gold")):
        if not all(k in m for k in (r, g) for m in (before, after)):
            continue
        gold, real = accuracy_change(before[g], after[g], after.get(n, 0))
        if after[r] > before[r] and gold < 0 and real:
            out.append((mode, after[r] - before[r], gold))
    return out


def by_family(m: dict) -> str:
    return " ".join(f"{k[5:]} {v:.2f}" for k, v in sorted(m.items()) if k.startswith("gold_")
                    and k != "gold_accuracy")


def sampled(m: dict, before: dict | None = None) -> str:
    if "sampled_reward" not in m:
        return ""
    pairs = [(k, m[k], before[k] if before else None) for k in ("sampled_reward",
             "sampled_gold_accuracy") if k in m]
    return "; sampled: " + ", ".join(
        f"{k[8:].replace('_', ' ')} " + (f"{b:.3f} -> " if b is not None else "") + f"{v:.3f}"
        for k, v, b in pairs)


# --- the stage ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    cfg, cfg_path, overrides = parse_stage_args(PPOConfig, sys.argv[1:] if argv is None else argv)
    t_start = time.time()
    store = ArtifactStore(cfg.run.store)
    actor_art, reward_art = preflight(cfg, store)
    d = E.init_distributed()
    E.seed_all(cfg.run.seed)
    data_digest = E.on_rank0(lambda: get_example_set(cfg.data.prompts, store).digest, d)
    data_art = store.get(data_digest)
    tok = load_tokenizer(actor_art.local_path())
    train_prompts = read_jsonl(data_art.local_path() / "train.jsonl")
    eval_prompts = read_jsonl(data_art.local_path() / "eval.jsonl")[: cfg.data.eval_prompts]
    check_prompts(train_prompts + eval_prompts, tok, cfg, cfg.data.prompts)
    parents = [{"role": "actor", "digest": actor_art.digest},
               {"role": "reward", "digest": reward_art.digest},
               {"role": "prompts", "digest": data_art.digest}]
    key = input_key("ppo", resolved(cfg), parents)
    if E.reuse_unchanged(store, cfg.run.name, key, cfg.run.force, d):
        E.shutdown(d)
        return

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    stats = json.loads((reward_art.local_path() / "reward_stats.json").read_text())
    torch.manual_seed(cfg.run.seed)
    load = dict(dtype=torch.float32)
    actor = engine(AutoModelForCausalLM.from_pretrained(actor_art.local_path(), **load),
                   cfg, d, cfg.optim.lr)
    critic = engine(Critic(AutoModelForSequenceClassification.from_pretrained(
        reward_art.local_path(), **load)), cfg, d, cfg.critic_lr)
    ref = engine(AutoModelForCausalLM.from_pretrained(actor_art.local_path(), **load), cfg, d,
                 None, cfg.frozen_offload)
    reward = engine(AutoModelForSequenceClassification.from_pretrained(
        reward_art.local_path(), **load), cfg, d, None, cfg.frozen_offload)
    kl_ctl = L.KLController(cfg.kl.coef, cfg.kl.adaptive, cfg.kl.target, cfg.kl.horizon)

    work = E.work_dir(cfg.run.name, cfg.run.work_dir, key)
    ckpt = work / "checkpoints"
    metrics = E.Metrics(d, work)
    engines = {"actor": actor, "critic": critic}
    client = E.load_checkpoint(engines, ckpt, d) if cfg.checkpoint.resume else None
    start = client["step"] if client else 0
    if client:
        kl_ctl.load_state_dict(client["kl"])
        E.log(d, f"resumed from {ckpt} at step {start}")
    per_rank = cfg.train.global_batch_size // d.world
    E.log(d, f"ppo {cfg.run.name}: {len(train_prompts)} prompts, {per_rank} rollouts per rank "
             f"per step, {d.world} rank(s), {cfg.train.max_steps} steps")

    baseline = evaluate(actor, ref, critic, reward, tok, eval_prompts, cfg, kl_ctl, stats, d) \
        if start == 0 else None
    if baseline and d.main:
        E.log(d, f"SFT on held-out prompts: reward {baseline['reward']:.3f}, gold accuracy "
                 f"{baseline['gold_accuracy']:.3f} ({by_family(baseline)}){sampled(baseline)}")
        (work / "baseline.json").write_text(json.dumps(baseline, indent=2))
    if baseline is None:
        baseline = json.loads((work / "baseline.json").read_text())
    last_eval = baseline
    t_train = time.time()
    for step in range(start, cfg.train.max_steps):
        t0 = time.time()
        rng = np.random.default_rng([cfg.run.seed, step])
        order = rng.permutation(len(train_prompts))
        chunk = [train_prompts[i] for i in order[d.rank * per_rank:(d.rank + 1) * per_rank]]
        actor.eval()
        critic.eval()
        batch = rollout(actor, ref, critic, reward, tok, chunk, cfg, kl_ctl, stats, d)
        actor.train()
        critic.train()
        t_gen = time.time() - t0
        upd = ppo_epochs(actor, critic, batch, cfg, rng)
        mask = batch["mask"]
        row = mean_all({
            "reward": batch["raw"].mean().item(), "reward_std": batch["raw"].std().item()
            if len(batch["raw"]) > 1 else 0.0, "score_normalized": batch["norm"].mean().item(),
            "gold_accuracy": float(np.mean(batch["gold"])) if batch["gold"] else float("nan"),
            "kl": batch["kl"].mean().item(), "kl_exact": batch["exact_kl"].mean().item(),
            "response_length": mask.sum(1).mean().item(),
            "eos_rate": batch["ended"].mean().item(),
            "explained_variance": L.explained_variance(batch["values"], batch["returns"], mask),
            "gen_tokens_per_s": batch["gen_tokens"] / max(batch["gen_s"], 1e-9), **upd}, d)
        step_s = time.time() - t0
        row.update(beta=kl_ctl.beta, step_s=step_s, generation_share=t_gen / step_s,
                   train_tokens_per_s=float(mask.sum()) * cfg.ppo.epochs * d.world
                   / max(step_s - t_gen, 1e-9))
        kl_ctl.update(row["kl"], cfg.train.global_batch_size)
        done = step + 1
        if done % cfg.train.eval_every == 0 or done == cfg.train.max_steps:
            last_eval = evaluate(actor, ref, critic, reward, tok, eval_prompts, cfg, kl_ctl,
                                 stats, d)
            row.update({f"eval_{k}": v for k, v in last_eval.items() if k != "samples"})
            if d.main:
                (work / f"samples_step{done:06d}.json").write_text(
                    json.dumps(last_eval["samples"], indent=2))
        if done % cfg.run.log_every == 0 or done == cfg.train.max_steps:
            metrics.log(done, **row)
            E.log(d, f"step {done}/{cfg.train.max_steps}: reward {row['reward']:.3f} gold "
                     f"{row['gold_accuracy']:.3f} kl {row['kl']:.3f} beta {kl_ctl.beta:.4f} "
                     f"clipfrac {row['clipfrac']:.3f} gen {row['generation_share']:.0%}")
        if done % cfg.checkpoint.every_steps == 0 and done < cfg.train.max_steps:
            E.save_checkpoint(engines, ckpt, done, cfg.checkpoint.keep_last, d,
                              {"kl": kl_ctl.state_dict()})
    t_end_train = time.time()

    # --- save -----------------------------------------------------------------------------
    export = work / "export"
    E.save_hf(actor, tok, export, d)
    if d.main:
        # Only when the RM is what PPO maximizes can the policy exploit it.
        hacked = reward_hacking(baseline, last_eval) if cfg.ppo.reward_source == "rm" else []
        hacking = bool(hacked)
        final = {"reward_mean": last_eval["reward"], "sft_reward_mean": baseline["reward"],
                 "reward_source": cfg.ppo.reward_source,
                 "gold_accuracy": last_eval["gold_accuracy"],
                 "sft_gold_accuracy": baseline["gold_accuracy"], "kl": last_eval["kl"],
                 "kl_target": cfg.kl.target, "eos_rate": last_eval["eos_rate"],
                 "reward_hacking": hacking, "final_beta": kl_ctl.beta,
                 **{k: last_eval[k] for k in ("sampled_reward", "sampled_gold_accuracy",
                                              "n_gold", "n_sampled_gold") if k in last_eval},
                 "sampling_temperature": cfg.rollout.temperature,
                 **{f"sft_{k}": baseline[k] for k in ("sampled_reward", "sampled_gold_accuracy")
                    if k in baseline},
                 **{k: v for k, v in last_eval.items() if k.startswith("gold_") and k != "gold_accuracy"},
                 **{f"sft_{k}": v for k, v in baseline.items() if k.startswith("gold_")
                    and k != "gold_accuracy"}}
        for mode, gained, gold_delta in hacked:
            E.log(d, f"WARNING: reward hacking ({mode} responses): RM reward rose by "
                     f"{gained:.3f} while gold accuracy fell by {-gold_delta:.3f}")
        (export / "train_log.jsonl").write_bytes(metrics.path.read_bytes())
        (export / "samples.json").write_text(json.dumps(last_eval["samples"], indent=2))
        plots.curves(export / "train_log.jsonl", export / "curves.png", f"ppo {cfg.run.name}")
        art = store.put(export, kind="model", stage="ppo", name=cfg.run.name, parents=parents,
                        config=resolved(cfg), input_key=key, metrics=final, move=True,
                        datasets={"prompts": {"digest": data_art.digest,
                                              "train": len(train_prompts)}},
                        timings={"train_s": t_end_train - t_train,
                                 "total_s": time.time() - t_start},
                        command=E.launch_command("ppo", cfg_path, overrides, cfg.deepspeed))
        shutil.rmtree(ckpt, ignore_errors=True)
        E.log(d, f"held-out: reward {baseline['reward']:.3f} (SFT) -> {last_eval['reward']:.3f}, "
                 f"gold accuracy {baseline['gold_accuracy']:.3f} -> "
                 f"{last_eval['gold_accuracy']:.3f} ({by_family(last_eval)}), KL {last_eval['kl']:.3f}"
                 f"{sampled(last_eval, baseline)}")
        E.log(d, f"exported {art.kind} {cfg.run.name} {art.short} to {store.root}")
        print(f"ALIGNFLOW_ARTIFACT={art.digest}", flush=True)
    metrics.close()
    E.shutdown(d)


if __name__ == "__main__":
    E.run(main)
