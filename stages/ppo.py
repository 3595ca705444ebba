"""Stage ppo: RL from a reward model or a checker, with PPO's clipped updates: actor,
critic, reference and reward as DeepSpeed engines, or without the critic for GRPO and RLOO.

    deepspeed --num_gpus 2 --module stages.ppo --config configs/tiny/ppo.yaml [k=v ...]
    ... ppo.advantage=grpo ppo.group_size=8 kl.placement=loss     # critic-free, GRPO-style

Our own implementation: TRL removed PPOTrainer in 2026 (huggingface/trl#7020), and one stage
serves all three estimators so checkpoints, resume, metrics, the reward-hacking verdict and
lineage are the same for each. Built like DeepSpeed-Chat's step 3, with the details of "The N
Implementation Details of RLHF with PPO": the actor and the frozen reference start from the SFT
model; the critic starts from the reward model (its score head read per token, in the units of
the normalized rewards) and the frozen reward model scores whole responses.

setup:    validate parents (SFT actor, RM reward, same tokenizer) and the DeepSpeed template.
data:     rank 0 builds or reuses the prompt set; none longer than the context minus the
          response.
models:   actor and reference from SFT (the reference is the SFT ancestor of a PPO actor),
          reward from the RM, and for gae the critic from the RM.
resume:   actor, critic, KL controller, step and RNG; the SFT baseline, measured on the
          held-out prompts before the first step, is kept in the work directory.
train:    sample responses at the temperature (untruncated), cut after EOS, penalize responses with
          no EOS; RM score at the last token, normalized with the RM's statistics and clipped;
          KL to the reference (k1 or k3 per token in the reward, or k3 in the loss), fixed or
          adaptive beta; GAE with advantages whitened over all ranks, or group advantages
          (grpo, rloo) over group_size samples per prompt; several epochs of clipped policy
          (and value) updates.
evaluate: held-out prompts, greedy and sampled (RM reward, gold accuracy, KL) against SFT's;
          the reward-hacking check.
export:   the actor as an HF causal LM whose manifest names both parents.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stages import data as D
from stages import engine as E
from stages import losses as L
from stages import metrics as M
from stages import stage as S
from stages.artifacts import ArtifactStore, write_durable
from stages.config import PPOConfig, TrainConfig
from stages.configfile import ConfigError
from stages.examples import load_example_set, read_jsonl
from stages.model import (FEWEST, chat_prompt, decode_responses, length_groups,
                          load_tokenizer, parent_model, prefix_cache, rm_scores, shared_prefix,
                          worth_sharing)
from stages.tasks import (accuracies, accuracy_change, check, gold_counts, heldout_split,
                          mcnemar_p, paired_change)


# --- setup --------------------------------------------------------------------------------

def preflight(cfg: PPOConfig, store: ArtifactStore):
    actor = parent_model(store, cfg.actor, "actor", causal=True, stages=("sft", "ppo"))
    reward = parent_model(store, cfg.reward, "reward", causal=False, stages=("rm",))
    reference = reference_of(store, actor)
    if reference.digest != actor.digest and cfg.frozen_offload:
        raise ConfigError(f"actor '{cfg.actor}' is a PPO model: its SFT reference "
                          f"{reference.short} generates the baseline, which frozen_offload "
                          f"(ZeRO-3 parameter offload) does not allow; set frozen_offload=false")
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
    if cfg.rollout.engine == "vllm":
        E.need_gpu("rollout.engine=vllm", "vllm", "colocated rollouts")
    zero = E.load_deepspeed_template(cfg.deepspeed.template).get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        raise ConfigError("the actor generates every step: ZeRO-3 would gather parameters per "
                          "token; use a zero0-2 template")
    per_rank = cfg.train.global_batch_size // cfg.deepspeed.world_size
    if cfg.ppo.advantage != "gae" and per_rank % cfg.ppo.group_size:
        raise ConfigError(f"ppo.group_size={cfg.ppo.group_size} does not divide the {per_rank} "
                          f"rollouts per rank (advantage={cfg.ppo.advantage} samples each "
                          f"prompt group_size times on one rank)")
    if per_rank % cfg.ppo.minibatch_size:
        raise ConfigError(f"ppo.minibatch_size={cfg.ppo.minibatch_size} does not divide the "
                          f"{per_rank} rollouts per rank")
    return actor, reward, reference


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
    """The reward model's transformer and a value head read at every token: V(s_t).

    The head starts as the RM's score head mapped into the units of the critic's targets: the
    returns are normalized scores, (score - mean) / std minus the KL penalty, so
    V_0 = (score - mean) / std. A copy of the raw head starts off by the RM's spread (3.2 on
    the demo), and value clipping then slows the correction while the first advantages are
    biased by it."""

    def __init__(self, rm, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.body = rm.model
        w = rm.score.weight.detach()
        self.value = torch.nn.Linear(w.shape[1], 1, bias=True, dtype=w.dtype)
        bias = rm.score.bias.detach() if rm.score.bias is not None else torch.zeros(1)
        with torch.no_grad():
            self.value.weight.copy_(w / std)
            self.value.bias.copy_((bias.to(w.dtype) - mean) / std)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None,
                use_cache=False, logits_to_keep=0):
        """Values at the last logits_to_keep positions (0: all) as `.logits`, so
        response_logits serves the critic as it serves a causal LM, shared prefix included."""
        out = self.body(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids, past_key_values=past_key_values,
                        use_cache=use_cache)
        h = out.last_hidden_state[:, -logits_to_keep:]
        return Values(self.value(h).squeeze(-1).float(), out.past_key_values)


@dataclass
class Values:
    logits: torch.Tensor        # [B, T] V(s_t)
    past_key_values: Any


def engine(model, cfg: PPOConfig, d: E.Dist, lr: float | None, offload: bool = False):
    """A DeepSpeed engine; frozen ones (lr None) get no optimizer and may live on the CPU.
    Trained ones follow optim's warmup and cosine floor over the PPO steps."""
    import deepspeed
    E.no_dropout(model)   # the ratio of new to old log-probs must compare like with like
    E.contiguous_lm_head(model)
    mb = TrainConfig(micro_batch_size=cfg.ppo.minibatch_size,
                     global_batch_size=cfg.ppo.minibatch_size * d.world, max_steps=1)
    ds_cfg = E.deepspeed_config(cfg.deepspeed, mb, cfg.optim, d.world)
    if lr is None:
        model.eval().requires_grad_(False)
        zero = {"stage": 3, "offload_param": {"device": "cpu"}} if offload else {"stage": 0}
        ds_cfg["zero_optimization"] = zero
        return deepspeed.initialize(model=model, config=ds_cfg)[0]
    opt = E.adamw(model, cfg.optim.model_copy(update={"lr": lr}), ds_cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ppo_lr_lambda(cfg, d.world))
    return E.lone_rank(deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                            config=ds_cfg)[0], d.world)


def ppo_lr_lambda(cfg: PPOConfig, world: int):
    """optim's schedule (warmup, cosine to min_lr_ratio over train.max_steps) counted in PPO
    steps; the scheduler itself is stepped once per minibatch update."""
    per_step = cfg.ppo.epochs * (cfg.train.global_batch_size // world // cfg.ppo.minibatch_size)
    base = E.lr_lambda(cfg.optim, cfg.train.max_steps)
    return lambda update: base(update // per_step)


def reference_of(store: ArtifactStore, actor):
    """The SFT model PPO keeps its KL anchor on: the actor itself, or, for an actor that is a
    PPO model, its reference (or actor) parent followed back to an SFT model. Anchoring on the
    previous PPO model would let the KL budget compound over chained runs."""
    art = actor
    while art.stage == "ppo":
        roles = {p["role"]: p["digest"] for p in art.parents}
        art = store.get(roles.get("reference") or roles["actor"], verify=False)
    return art


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token of a left-padded row."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def common_prefix(seq: torch.Tensor, attn: torch.Tensor, P: int) -> int:
    """model.shared_prefix of a batch's left-padded prompts."""
    plen = attn[:, :P].sum(1).tolist()
    return shared_prefix([seq[i, P - n:P].tolist() for i, n in enumerate(plen)])


@dataclass
class Group:
    """Rows of a batch that run in one forward, cut to the columns they need: the group's
    longest prompt (prompts are left-padded) and longest response (right-padded). k > 1: the
    rows come k to a prompt (a grpo/rloo group), each prompt encoded once for its k rows.
    C > 0: every row's prompt starts with the same C tokens, which response_logits may encode
    once for the group."""
    rows: torch.Tensor          # [G] indices into the batch
    seq: torch.Tensor           # [G, P+R]
    attn: torch.Tensor
    pos: torch.Tensor
    P: int
    R: int
    k: int = 1
    C: int = 0


def groups(seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, P: int,
           mask: torch.Tensor, max_rows: int, overhead: float, k: int = 1,
           C: int = 0) -> list[Group]:
    """A batch's forwards: rows of similar length together (model.length_groups), so a few long
    responses do not make every row compute their padding. k > 1: rows j*k .. j*k+k-1 share
    a prompt and stay together; a forward of u prompts then costs u x (prompt + k x response)
    tokens. C: the prefix every row shares (common_prefix)."""
    plen = attn[:, :P].sum(1).tolist()
    rlen = mask.sum(1).long().clamp(min=1).tolist()
    units = [list(range(j, j + k)) for j in range(0, len(plen), k)]
    # Lengths per prompt, scaled by 1/k (prompt/k + response), so the split's cost is the
    # true one divided by k, as is the overhead handed over.
    lengths = [(plen[u[0]] / k, max(rlen[i] for i in u)) for u in units]
    out = []
    for ug in length_groups(lengths, max(1, max_rows // k), overhead / k):
        g = [i for j in ug for i in units[j]]
        p, r = max(plen[i] for i in g), max(rlen[i] for i in g)
        rows, cols = torch.tensor(g, device=seq.device), slice(P - p, P + r)
        out.append(Group(rows, seq[rows, cols], attn[rows, cols], pos[rows, cols], p, r, k, C))
    return out


def behind_prefix(seq: torch.Tensor, attn: torch.Tensor, P: int, C: int):
    """(the shared prefix, the attention mask that puts it before every row): rows keep their
    layout (left-padded prompts, then anything), columns [0, C) stand for the cached prefix,
    and whatever lies in a row before the rest of its own prompt is masked."""
    start = P - attn[:, :P].sum(1)        # each row's first prompt column
    s0 = int(start[0])
    cols = torch.arange(attn.shape[1], device=attn.device)
    attn = attn.masked_fill(cols[None] < (start + C)[:, None], 0)
    attn[:, :C] = 1
    return seq[0, s0:s0 + C], attn


def response_logits(model, g: Group, memo: dict | None = None) -> torch.Tensor:
    """[G, R_g, ...] logits (a critic's values) at the positions that predict each response
    token, the prompt's included only as keys and values. Two kinds of sharing, each exact up
    to rounding, gradients flowing through the shared part to every row:
    - C > 0: the prefix every prompt starts with (a system turn) runs once for the group
      (prefix_cache), not once a row; each row runs only the rest of its prompt;
    - k > 1: each prompt is run once and its keys and values repeated for its k responses,
      so the prompt's tokens are computed once per group, not k times (TRL's GRPO runs every
      completion with its own copy of the prompt).
    With a shared prefix the rows keep their layout (left-padded prompts): columns [0, C)
    stand for the cached prefix, and what lies in a row before its own rest is masked."""
    P, R, k = g.P, g.R, g.k
    # Only where it saves more than a forward costs (a frozen model's kept prefix is free after
    # its first forward, but a prefix of a few rows would only push a common one out of memo).
    C = g.C if worth_sharing(g.C, len(g.rows) // k) else 0
    attn, cache = g.attn, None
    if C:
        prefix, attn = behind_prefix(g.seq, g.attn, P, C)
        cache = prefix_cache(model, prefix, len(g.rows) // k, memo, logits_to_keep=1)
    if k == 1:
        return model(input_ids=g.seq[:, C:], attention_mask=attn, position_ids=g.pos[:, C:],
                     past_key_values=cache, logits_to_keep=R + 1).logits[:, :-1]
    head = model(input_ids=g.seq[::k, C:P], attention_mask=attn[::k, :P],
                 position_ids=g.pos[::k, C:P], past_key_values=cache, use_cache=True,
                 logits_to_keep=1)
    cache = head.past_key_values
    cache.batch_repeat_interleave(k)
    first = head.logits.repeat_interleave(k, 0)       # predicts each response's first token
    if R == 1:
        return first
    cols = slice(P, P + R - 1)
    rest = model(input_ids=g.seq[:, cols], attention_mask=attn[:, :P + R - 1],
                 position_ids=g.pos[:, cols], past_key_values=cache, use_cache=True).logits
    return torch.cat([first, rest], 1)


def ungroup(parts: list[torch.Tensor], gs: list[Group], width: int) -> torch.Tensor:
    """Per-group results ([G] or [G, R_g]) back into one tensor in batch order, [B] or
    [B, width], zero past each group's columns."""
    out = torch.cat([x if x.dim() == 1 else
                     torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in parts])
    return out[torch.argsort(torch.cat([g.rows for g in gs]))]


def lockstep(m: "Models", d: E.Dist) -> bool:
    """Whether every rank must run as many forwards as the others: ZeRO-3 on several ranks
    gathers each layer's weights collectively (trained engines under a zero3 template, frozen
    ones under frozen_offload)."""
    return d.world > 1 and any(e is not None and e.zero_optimization_stage() == 3
                               for e in (m.actor, m.critic, m.ref, m.reward))


def forward_cost(m: "Models", cfg: PPOConfig, d: E.Dist) -> tuple[float, str]:
    """The overhead length_groups weighs padding against, and why. Unless configured, so high
    that it only sorts and trims: the fewest forwards (ceil(rows / micro-batch)), each of rows
    of similar length. Splitting further, at the timed cost of a forward, was slower on the
    workloads measured here (short responses: the demo, SmolLM2 with a median of 4 tokens);
    it pays where responses differ by hundreds of tokens."""
    if lockstep(m, d):
        return FEWEST, "ZeRO-3 on several ranks: every rank runs the same forwards"
    if cfg.ppo.forward_overhead_tokens is not None:
        return cfg.ppo.forward_overhead_tokens, "configured"
    return FEWEST, "default: the fewest forwards"


# --- one PPO step -------------------------------------------------------------------------

@dataclass
class Models:
    """The four engines, the tokenizer and what scoring needs: one object, not ten arguments."""
    actor: Any                  # DeepSpeed engine, trained: the policy
    critic: Any                 # DeepSpeed engine, trained: V(s_t) per token; None: grpo/rloo
    ref: Any                    # frozen reference policy, the KL anchor
    reward: Any                 # frozen reward model
    tok: Any
    stats: dict                 # the RM's reward_mean and reward_std, to normalize with
    kl_ctl: L.KLController
    sampler: Any = None         # rollout.engine=vllm: the VLLMSampler; None: actor.generate()
    overhead: float = FEWEST    # a forward's cost beyond its tokens, in tokens (forward_cost)
    share_prompts: bool = True  # encode shared prompts and prefixes once (not in lockstep)
    # The frozen models' shared prefixes (keys and values), kept for the run: prefix_cache.
    memo: dict = field(default_factory=lambda: {"ref": {}, "reward": {}})


@dataclass
class Rollout:
    """One batch of sampled (or greedy) responses and everything PPO's epochs need. B rows,
    P prompt positions (left-padded), R response positions (padded after the EOS)."""
    seq: torch.Tensor           # [B, P+R] prompt and response token ids
    attn: torch.Tensor          # [B, P+R] 1 on real tokens
    pos: torch.Tensor           # [B, P+R] position ids, 0 at each row's first real token
    resp: torch.Tensor          # [B, R] response ids, pad after the EOS
    mask: torch.Tensor          # [B, R] float, 1.0 through the EOS
    P: int
    logp: torch.Tensor          # [B, R] actor log-probs of resp at the sampling temperature
    ref_logp: torch.Tensor      # [B, R] reference log-probs, likewise
    values: torch.Tensor        # [B, R] critic values, 0 on padding (and without a critic)
    adv: torch.Tensor           # [B, R] GAE advantages (whitened if configured), or the
                                #        response's group advantage on each of its tokens
    returns: torch.Tensor       # [B, R] advantages + values (gae)
    texts: list[str]            # B decoded responses, cut before the EOS
    raw: torch.Tensor           # [B] RM score
    norm: torch.Tensor          # [B] the score PPO maximizes: normalized RM or checker +-1
    kl: torch.Tensor            # [B] estimated KL to the reference, summed over the response
    exact_kl: torch.Tensor      # [B] exact KL over the vocabulary, summed over the response
    ended: torch.Tensor         # [B] float, 1.0 where the response has an EOS
    gold: list[bool]            # checker verdicts of the rows whose prompt has an answer
    gen_s: float                # seconds spent in generate()
    k: int = 1                  # rows j*k .. j*k+k-1 answer one prompt (grpo/rloo groups)
    C: int = 0                  # every prompt starts with the same C tokens (common_prefix)


class InverseCDFSampling:
    """One token per row from softmax(logits / T), returned as scores whose argmax is that
    token: generate()'s sampling step, to run under greedy decoding. torch.multinomial draws an
    exponential variate for every vocabulary entry (the exponential race); one uniform per row
    against the cumulative distribution is the same distribution at a tenth of the cost on a
    CPU (64 x 8192: 0.9 ms against 10.4 ms; 16 x 49152: 1.8 against 15.5), a cost paid at
    every generated token. The sums run in float64 so no rounding hands out a token of
    probability zero."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.double() / self.temperature, -1).cumsum_(-1)
        u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


@torch.no_grad()
def rollout(m: Models, prompts: list[dict], cfg: PPOConfig, d: E.Dist,
            greedy: bool = False, learn: bool = True, k: int = 1) -> Rollout:
    """Sample responses and score them: everything the PPO epochs need, on this rank. With
    learn=False (evaluation) no values or advantages are computed. k > 1: the prompts come k
    at a time (a grpo/rloo group), and each group's prompt is encoded once in scoring."""
    if k > 1 and (not m.share_prompts or len(prompts) % k or any(
            prompts[i]["prompt"] != prompts[i - i % k]["prompt"] for i in range(len(prompts)))):
        k = 1
    tok = m.tok
    tok.padding_side = "left"
    enc = tok([chat_prompt(tok, p["prompt"]) for p in prompts], return_tensors="pt",
              padding=True, add_special_tokens=False).to(d.device)
    t0 = time.time()
    # Sampling is a logits processor on top of greedy decoding, so the model's generation_config
    # cannot truncate it (top_k/top_p): PPO scores the tokens under the full distribution.
    sampling = {} if greedy else {
        "logits_processor": [InverseCDFSampling(cfg.rollout.temperature)]}
    P = enc["input_ids"].shape[1]
    C = common_prefix(enc["input_ids"], enc["attention_mask"], P) if m.share_prompts else 0
    gen_logits = None
    if m.sampler is not None:
        resp = m.sampler.generate(enc, cfg.rollout.max_new_tokens,
                                  None if greedy else cfg.rollout.temperature, tok,
                                  cfg.rollout.min_new_tokens)
    else:
        # The logits generate() computed anyway are the actor's logits at the response
        # positions (unprocessed: before temperature): no second actor forward (as TRL does).
        # They are held for the batch ([B, R, vocab] in the model's dtype), as one forward's
        # would be.
        gen_in = dict(enc)
        if worth_sharing(C, len(prompts)):      # the prefix prefilled once
            prefix, gen_in["attention_mask"] = behind_prefix(enc["input_ids"],
                                                             enc["attention_mask"], P, C)
            gen_in["input_ids"] = torch.cat([prefix.expand(len(prompts), C),
                                             enc["input_ids"][:, C:]], 1)
            gen_in["past_key_values"] = prefix_cache(m.actor.module, prefix, len(prompts),
                                                     None, logits_to_keep=1)
        out = m.actor.module.generate(
            **gen_in, max_new_tokens=cfg.rollout.max_new_tokens, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, min_new_tokens=cfg.rollout.min_new_tokens,
            do_sample=False, num_beams=1,
            output_logits=True, return_dict_in_generate=True, **sampling)
        resp, gen_logits = out.sequences[:, P:], torch.stack(out.logits, 1)
    gen_s = time.time() - t0
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
    # Scoring forwards in micro-batches (a rollout batch may be far larger than what fits in
    # one forward) of rows of similar length, logits at the response positions only.
    mb, R = cfg.train.micro_batch_size, resp.shape[1]
    gs = groups(seq, attn, pos, P, mask, mb, m.overhead, k, C)
    logp, ref_logp, exact_kl, values = [], [], [], []
    for g in gs:
        r, msk = resp[g.rows, :g.R], mask[g.rows, :g.R]
        logits = gen_logits[g.rows, :g.R] if gen_logits is not None else \
            response_logits(m.actor, g)
        ref_logits = response_logits(m.ref, g, m.memo["ref"])
        logp.append(L.token_logprobs(logits, r, temp) * msk)
        ref_logp.append(L.token_logprobs(ref_logits, r, temp) * msk)
        exact_kl.append((L.exact_kl(logits, ref_logits) * msk).sum(1))
        if learn and m.critic is not None:
            values.append(response_logits(m.critic, g) * msk)
    logp, ref_logp, exact_kl = (ungroup(x, gs, R) for x in (logp, ref_logp, exact_kl))
    texts, _ = decode_responses(tok, resp)
    raw = rm_scores(m.reward, tok, [p["prompt"] for p in prompts], texts, batch=mb,
                    device=d.device, overhead=m.overhead,
                    memo=m.memo["reward"], share=m.share_prompts)
    gold = [check(p["answer"], t) for p, t in zip(prompts, texts) if "answer" in p]
    if cfg.ppo.reward_source == "checker":
        norm = torch.tensor(gold, dtype=torch.float32, device=d.device) * 2 - 1
    else:
        norm = ((raw - m.stats["reward_mean"]) / m.stats["reward_std"]).clamp(
            -cfg.ppo.reward_clip, cfg.ppo.reward_clip)
    norm = norm - cfg.rollout.missing_eos_penalty * (~ended).float()
    kl = L.kl_estimate(logp, ref_logp, cfg.kl.estimator) * mask
    values = ungroup(values, gs, R) if values else torch.zeros_like(mask)
    adv = returns = torch.zeros_like(mask)
    beta = m.kl_ctl.beta if cfg.kl.placement == "reward" else 0.0
    if learn and m.critic is not None:     # gae
        rewards = L.token_rewards(norm, kl, mask, beta)
        adv, returns = L.gae(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        if cfg.ppo.whiten_advantages:   # over the whole batch, every rank's share alike
            adv = L.whiten(adv, mask, reduce=all_reduce_sum)
    elif learn:                            # grpo, rloo: one advantage per response
        score = norm - beta * kl.sum(1)
        adv = L.group_advantages(score, cfg.ppo.group_size, cfg.ppo.advantage,
                                 cfg.ppo.scale_rewards)[:, None] * mask
    return Rollout(seq, attn, pos, resp, mask, P, logp, ref_logp, values, adv, returns, texts,
                   raw, norm, kl.sum(1), exact_kl, ended.float(), gold, gen_s, k, C)


def ppo_epochs(m: Models, b: Rollout, cfg: PPOConfig, rng: np.random.Generator) -> dict:
    n, mb, R, temp = b.seq.shape[0], cfg.ppo.minibatch_size, b.resp.shape[1], \
        cfg.rollout.temperature
    # grpo/rloo: minibatches of whole groups, so each prompt is encoded once a forward.
    share = b.k if mb % b.k == 0 else 1
    acc: dict[str, list] = {}
    for _ in range(cfg.ppo.epochs):
        for units in np.split(rng.permutation(n // share), n // mb):
            i = torch.as_tensor((units[:, None] * share + np.arange(share)).reshape(-1))
            mask, resp = b.mask[i], b.resp[i]
            # One minibatch, one optimizer step; its rows may run in several forwards of
            # similar lengths, their losses summed into one backward.
            gs = groups(b.seq[i], b.attn[i], b.pos[i], b.P, mask, mb, m.overhead, share, b.C)
            logp, ent = [], []
            for g in gs:
                logits = response_logits(m.actor, g)
                logp.append(L.token_logprobs(logits, resp[g.rows, :g.R], temp))
                with torch.no_grad():
                    ent.append(L.entropy(logits))
            logp = ungroup(logp, gs, R) * mask
            pg_loss, pg = L.policy_loss(logp, b.logp[i], b.adv[i], mask, cfg.ppo.clip_range,
                                        cfg.ppo.loss_agg, cfg.rollout.max_new_tokens)
            stats = {"loss/policy": pg_loss.item(), "policy/clipfrac": pg["clipfrac"],
                     "policy/approx_kl": pg["approx_kl"],
                     "policy/entropy": L.masked_mean(ungroup(ent, gs, R), mask).item()}
            loss = pg_loss
            if cfg.kl.placement == "loss":     # k3: non-negative, and unbiased as a loss term
                kl = L.masked_mean(L.kl_estimate(logp, b.ref_logp[i], "k3"), mask)
                loss = loss + m.kl_ctl.beta * kl
                stats["loss/kl"] = kl.item()
            m.actor.backward(loss)
            m.actor.step()
            if m.critic is not None:
                values = ungroup([response_logits(m.critic, g) for g in gs], gs, R)
                vf_loss, vf = L.value_loss(values, b.values[i], b.returns[i], mask,
                                           cfg.ppo.value_clip_range)
                m.critic.backward(vf_loss)
                m.critic.step()
                stats.update({"loss/value": vf_loss.item(),
                              "critic/clipfrac": vf["value_clipfrac"]})
            for k, v in stats.items():
                acc.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def train_mode(m: Models, on: bool) -> None:
    """Sampling and scoring in eval mode, updates in train mode (dropout is off either way)."""
    for model in (m.actor, m.critic):
        if model is not None:
            model.train(on)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def sum_all(values: dict[str, float]) -> dict[str, float]:
    """Scalar metrics summed over ranks (every rank passes the same keys)."""
    keys = sorted(values)
    t = all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return {k: t[i].item() for i, k in enumerate(keys)}


def mean_all(values: dict[str, float], d: E.Dist) -> dict[str, float]:
    """Average scalar metrics over ranks."""
    return {k: v / d.world for k, v in sum_all(values).items()}


@torch.no_grad()
def evaluate(m: Models, prompts: list[dict], cfg: PPOConfig, d: E.Dist) -> dict:
    """Held-out prompts, greedy and sampled as in training: RM reward, gold accuracy (overall
    and per family, as tasks.gold_metrics scores SFT), KL to the reference, EOS rate."""
    train_mode(m, False)   # the loop puts them back in train mode for its updates
    mine = prompts[d.rank::d.world]
    mb = cfg.train.micro_batch_size
    greedy = [rollout(m, mine[i:i + mb], cfg, d, greedy=True, learn=False)
              for i in range(0, len(mine), mb)]
    texts = [t for b in greedy for t in b.texts]
    raw = [r for b in greedy for r in b.raw.tolist()]
    out = {"rl/reward": raw, "rl/kl": [k for b in greedy for k in b.exact_kl.tolist()],
           "rl/eos_rate": [e for b in greedy for e in b.ended.tolist()]}
    samples = [{"prompt": p["prompt"], "response": t, "answer": p.get("answer"), "reward": r}
               for p, t, r in zip(mine, texts, raw)][:8]
    if cfg.data.eval_samples:
        # A fixed seed and the training RNG untouched: every evaluation draws alike, and a
        # resumed run continues exactly.
        reps = [p for p in mine for _ in range(cfg.data.eval_samples)]
        with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
            torch.manual_seed(cfg.run.seed * 1000 + d.rank)
            sampled = [rollout(m, reps[i:i + mb], cfg, d, learn=False)
                       for i in range(0, len(reps), mb)]
        out["rl/sampled_reward"] = [r for b in sampled for r in b.raw.tolist()]
        stexts = [t for b in sampled for t in b.texts]
        oks = [check(p["answer"], t) if "answer" in p else None for p, t in zip(reps, stexts)]
    # Sums over every rank, then means: each figure is over all held-out responses.
    fams = tuple(sorted({p.get("task", "?") for p in prompts if "answer" in p}))
    sums = {f"{k}:sum": sum(v) for k, v in out.items()} | {f"{k}:n": len(v) for k, v in out.items()}
    counts = gold_counts(mine, texts, "gold/accuracy", fams)
    if cfg.data.eval_samples:
        counts |= gold_counts(reps, stexts, "gold/sampled_accuracy", fams)
        agree, pairs = rm_agreement(oks, out["rl/sampled_reward"], cfg.data.eval_samples)
        sums |= {"rm_pairs:agree": agree, "rm_pairs:n": pairs}
    total = sum_all({**sums, **counts})
    res = {k: total[f"{k}:sum"] / max(total[f"{k}:n"], 1) for k in out}
    if total.get("rm_pairs:n"):
        res["rl/rm_pairwise_accuracy"] = total["rm_pairs:agree"] / total["rm_pairs:n"]
        res["rl/rm_pairs"] = int(total["rm_pairs:n"])
    res |= accuracies({k: total[k] for k in counts})
    res["gold/n"] = int(total["gold/accuracy:n"])
    if cfg.data.eval_samples:
        res["gold/sampled_n"] = int(total["gold/sampled_accuracy:n"])
    # Per prompt (held-out order), for the paired comparison with the baseline.
    mine_out = {"greedy": [check(p["answer"], t) if "answer" in p else None
                           for p, t in zip(mine, texts)]}
    if cfg.data.eval_samples:
        k = cfg.data.eval_samples
        mine_out["sampled"] = [None if oks[j * k] is None else sum(oks[j * k:(j + 1) * k]) / k
                               for j in range(len(mine))]
    gathered = [None] * d.world
    dist.all_gather_object(gathered, mine_out)
    outcomes = {mode: [gathered[i % d.world][mode][i // d.world] for i in range(len(prompts))]
                for mode in mine_out}
    return {**dict(sorted(res.items())), "samples": samples, "outcomes": outcomes}


def rm_agreement(oks: list[bool | None], scores: list[float], k: int) -> tuple[int, int]:
    """(pairs the RM orders as the checker does, pairs): every right and wrong sampled answer
    to one prompt, from the checker's verdicts (None: no answer to check) and the RM's scores
    of k consecutive samples per prompt. The RM's own held-out accuracy is measured on
    the negatives its data was built with; this is its accuracy on what the policy writes, which
    is what PPO optimizes against and where an RM that cannot tell gets exploited."""
    agree = pairs = 0
    for j in range(0, len(oks), k):
        ok = oks[j:j + k]
        if ok[0] is None:
            continue
        for a in range(k):
            for b in range(k):
                if ok[a] and not ok[b]:
                    pairs += 1
                    agree += scores[j + a] > scores[j + b]
    return agree, pairs


NOT_METRICS = ("samples", "outcomes")   # what evaluate() returns besides figures


def paired(baseline: dict, current: dict) -> dict:
    """The change of gold accuracy from the baseline, tested per prompt: greedy answers by the
    paired standard error and McNemar's test, sampled accuracy (a fraction per prompt) by the
    paired standard error over prompts, never over responses."""
    out = {}
    for mode, key in (("greedy", "gold/delta"), ("sampled", "gold/sampled_delta")):
        b, a = baseline.get("outcomes", {}).get(mode), current.get("outcomes", {}).get(mode)
        if b and a:
            out[key], out[f"{key}_se"], _ = paired_change(b, a)
    if "gold/delta" in out:
        out["gold/mcnemar_p"] = mcnemar_p(baseline["outcomes"]["greedy"],
                                          current["outcomes"]["greedy"])
    return out


def gold_change(m: dict, mode: str) -> tuple[float, bool] | None:
    """(change of gold accuracy from the baseline, whether it is beyond the noise) in final
    metrics `m`: two paired standard errors where the stage measured per prompt, else two
    binomial standard errors of the two figures."""
    _, _, g, n, delta = next(x for x in MODES if x[0] == mode)
    if delta in m:
        return m[delta], abs(m[delta]) > 2 * m[f"{delta}_se"]
    if g in m and M.BASELINE + g in m:
        return accuracy_change(m[M.BASELINE + g], m[g], m.get(n, 0))
    return None


def reward_hacking(m: dict) -> list[tuple[str, float, float]]:
    """(responses, RM reward gain, gold accuracy change) where the RM says better while the
    checker says worse by more than the noise of the measurement: the policy is exploiting the
    reward model. Greedy and sampled responses apart, because a policy can keep its greedy
    answers and hack in the samples, or the reverse."""
    out = []
    for mode, r, *_ in MODES:
        change = gold_change(m, mode)
        if change and r in m and M.BASELINE + r in m:
            gold, real = change
            if m[r] > m[M.BASELINE + r] and gold < 0 and real:
                out.append((mode, m[r] - m[M.BASELINE + r], gold))
    return out


# (responses, RM reward, gold accuracy, checks, paired change) of both evaluation modes
MODES = (("greedy", "rl/reward", "gold/accuracy", "gold/n", "gold/delta"),
         ("sampled", "rl/sampled_reward", "gold/sampled_accuracy", "gold/sampled_n",
          "gold/sampled_delta"))


def headline(m: dict, cfg: PPOConfig) -> dict:
    """PPO against SFT on held-out prompts: responses sampled as in training (what PPO
    optimizes) and greedy ones (their mode); a gold change within the noise is called so."""
    parts = []
    for mode, r, g, *_ in reversed(MODES):
        if g not in m or M.BASELINE + g not in m:
            continue
        delta, real = gold_change(m, mode)
        verdict = ("raised" if delta > 0 else "LOWER") if real else "within noise"
        label = f"sampled at T {cfg.rollout.temperature:g}" if mode == "sampled" else mode
        parts.append(f"{label}: RM reward {m[M.BASELINE + r]:.3f} -> {m[r]:.3f}, gold accuracy "
                     f"{m[M.BASELINE + g]:.3f} -> {m[g]:.3f} ({verdict})")
    rm_acc = m.get(M.BASELINE + "rl/rm_pairwise_accuracy")
    text = ("; ".join(parts) + f"; KL {m['rl/kl']:.3f} (target {cfg.kl.target:.1f})"
            + (f"; the RM orders SFT's right and wrong samples {rm_acc:.2f}"
               if rm_acc is not None and cfg.ppo.reward_source == "rm" else "")
            + ("; REWARD HACKING" if m["rl/reward_hacking"] else "")
            + ("; trained on the checker's reward" if cfg.ppo.reward_source == "checker" else ""))
    metric = "gold/sampled_accuracy" if "gold/sampled_accuracy" in m else "gold/accuracy"
    return M.headline(metric, m.get(metric), baseline=m.get(M.BASELINE + metric),
                      verdict="REWARD HACKING" if m["rl/reward_hacking"] else None,
                      target=cfg.kl.target, text=text)


def families(m: dict) -> str:
    return " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in m.items()
                    if k.startswith("gold/accuracy/"))


# --- the stage ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    # --- setup: config, the checks that fail in a second, the ranks --------------------------
    run, (actor_art, reward_art, ref_art) = S.setup(PPOConfig, "ppo", argv, preflight)
    cfg, d = run.cfg, run.d

    # --- data: rank 0 builds (or reuses) the prompt set; none may be too long ---------------
    data_art = S.example_set(run, cfg.data.prompts)
    tok = load_tokenizer(actor_art.local_path())
    train_prompts = read_jsonl(data_art.local_path() / "train.jsonl")
    eval_prompts = [p for p in read_jsonl(data_art.local_path() / "eval.jsonl")
                    if cfg.data.eval_split in ("all", heldout_split(p["prompt"]))]
    eval_prompts = eval_prompts[: cfg.data.eval_prompts]
    if not eval_prompts:
        raise D.DataError(f"{cfg.data.prompts}: no held-out prompts in data.eval_split="
                          f"{cfg.data.eval_split}")
    check_prompts(train_prompts + eval_prompts, tok, cfg, cfg.data.prompts)
    if S.reused(run, actor=actor_art.digest, reference=ref_art.digest, reward=reward_art.digest,
                prompts=data_art.digest):
        return
    run.mark("data")

    # --- models: actor and reference from SFT, reward (and for gae the critic) from the RM --
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    torch.manual_seed(cfg.run.seed)
    train_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        E.precision(cfg.deepspeed), torch.float32)
    # vLLM first: it reserves its share of the GPU before the training engines take the rest.
    sampler = None
    if cfg.rollout.engine == "vllm":
        from stages.vllm_engine import VLLMSampler
        sampler = VLLMSampler(actor_art.local_path(), train_dtype, cfg.rollout.vllm_gpu_memory,
                              cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                              cfg.run.seed + 7919 * (d.rank + 1))
    load = dict(dtype=torch.float32)
    # Frozen engines load straight in the training precision (half the memory on a GPU);
    # trained ones keep fp32 weights for DeepSpeed's master copy.
    frozen = dict(dtype=train_dtype)
    actor = engine(AutoModelForCausalLM.from_pretrained(actor_art.local_path(), **load),
                   cfg, d, cfg.optim.lr)
    stats = json.loads((reward_art.local_path() / "reward_stats.json").read_text())
    critic = engine(Critic(AutoModelForSequenceClassification.from_pretrained(
        reward_art.local_path(), **load), stats["reward_mean"], stats["reward_std"]), cfg, d,
        cfg.critic_lr) if cfg.ppo.advantage == "gae" else None
    ref = engine(AutoModelForCausalLM.from_pretrained(ref_art.local_path(), **frozen), cfg, d,
                 None, cfg.frozen_offload)
    reward = engine(AutoModelForSequenceClassification.from_pretrained(
        reward_art.local_path(), **frozen), cfg, d, None, cfg.frozen_offload)
    m = Models(actor, critic, ref, reward, tok, stats,
               L.KLController(cfg.kl.coef, cfg.kl.adaptive, cfg.kl.target, cfg.kl.horizon),
               sampler)
    m.overhead, why = forward_cost(m, cfg, d)
    m.share_prompts = not lockstep(m, d)
    cost = f": a forward costs {m.overhead:g} tokens more" if m.overhead < FEWEST else ""
    E.log(d, f"forwards of rows sorted by length, each padded to its own longest ({why}{cost})")
    # Each rank samples its own responses (same seed on every rank gave correlated draws).
    torch.manual_seed(cfg.run.seed + 7919 * (d.rank + 1))

    # --- resume: actor, critic, KL controller, step and RNG; the SFT baseline measured once --
    ckpt = run.work / "checkpoints"
    metrics = E.Metrics(d, run.work)
    engines = {"actor": actor, **({"critic": critic} if critic is not None else {})}
    client = E.load_checkpoint(engines, ckpt, d) if cfg.checkpoint.resume else None
    start = client["step"] if client else 0
    if client:
        m.kl_ctl.load_state_dict(client["kl"])
        E.log(d, f"resumed from {ckpt} at step {start}")
        if sampler is not None:
            sampler.load(actor.module)
    per_rank = cfg.train.global_batch_size // d.world
    if cfg.kl.estimator == "k3" and cfg.kl.placement == "reward":
        E.log(d, "WARNING: kl.estimator=k3 in the reward gives a biased gradient of the KL "
                 "(k3 is unbiased as a value, not as a per-token reward); k1 is the unbiased "
                 "choice there")
    E.log(d, f"ppo {run.name}: {cfg.ppo.advantage} advantages, engines: "
             f"{', '.join(['actor', 'reference', 'reward'] + ['critic'] * (critic is not None))}; "
             f"{len(train_prompts)} prompts, {per_rank} rollouts per rank per step, {d.world} "
             f"rank(s), {cfg.train.max_steps} steps")
    # The baseline is the SFT reference, also when the actor is an earlier PPO model.
    sft = m if ref_art.digest == actor_art.digest else replace(m, actor=m.ref, sampler=None)
    baseline = evaluate(sft, eval_prompts, cfg, d) if start == 0 else None
    if baseline and d.main:
        E.log(d, f"SFT on held-out prompts: reward {baseline['rl/reward']:.3f}, gold accuracy "
                 f"{baseline['gold/accuracy']:.3f} ({families(baseline)})")
        write_durable(run.work / "baseline.json", json.dumps(baseline, indent=2).encode())
    if baseline is None:    # resumed: rank 0's copy, whatever the other nodes' disks hold
        baseline = E.on_rank0(lambda: json.loads((run.work / "baseline.json").read_text()), d)
    last_eval = baseline
    run.mark("models")

    # --- train --------------------------------------------------------------------------------
    for step in range(start, cfg.train.max_steps):
        t0 = time.time()
        rng = np.random.default_rng([cfg.run.seed, step])
        order = rng.permutation(len(train_prompts))
        k = cfg.ppo.group_size if cfg.ppo.advantage != "gae" else 1   # samples per prompt
        n = per_rank // k
        chunk = [train_prompts[i] for i in order[d.rank * n:(d.rank + 1) * n] for _ in range(k)]
        train_mode(m, False)
        batch = rollout(m, chunk, cfg, d, k=k)
        train_mode(m, True)
        t_rollout = time.time() - t0
        upd = ppo_epochs(m, batch, cfg, rng)
        if sampler is not None:
            sampler.load(actor.module)
        mask = batch.mask
        row = mean_all({
            "rollout/reward": batch.raw.mean().item(),
            "rollout/reward_std": batch.raw.std().item() if len(batch.raw) > 1 else 0.0,
            "rollout/score": batch.norm.mean().item(),
            "rollout/gold_accuracy": float(np.mean(batch.gold)) if batch.gold else float("nan"),
            "rollout/kl": batch.kl.mean().item(), "rollout/kl_exact": batch.exact_kl.mean().item(),
            "rollout/response_length": mask.sum(1).mean().item(),
            "rollout/eos_rate": batch.ended.mean().item(),
            **({"critic/explained_variance": L.explained_variance(batch.values, batch.returns,
                                                                   mask)}
               if critic is not None else {}),
            "perf/gen_tokens_per_s": float(mask.sum()) / max(batch.gen_s, 1e-9),
            "perf/shared_prefix_tokens": batch.C, **upd}, d)
        step_s = time.time() - t0
        row.update({"rl/beta": m.kl_ctl.beta, "perf/step_s": step_s,
                    "perf/generation_share": batch.gen_s / step_s,
                    "perf/rollout_share": t_rollout / step_s,   # generate and the scoring
                    "perf/train_tokens_per_s": float(mask.sum()) * cfg.ppo.epochs * d.world
                    / max(step_s - t_rollout, 1e-9)})
        m.kl_ctl.update(row["rollout/kl"], cfg.train.global_batch_size)
        done = step + 1
        if done % cfg.train.eval_every == 0 or done == cfg.train.max_steps:
            last_eval = evaluate(m, eval_prompts, cfg, d)
            row.update({k: v for k, v in last_eval.items() if k not in NOT_METRICS})
            if d.main:
                (run.work / f"samples_step{done:06d}.json").write_text(
                    json.dumps(last_eval["samples"], indent=2))
        if done % cfg.run.log_every == 0 or done == cfg.train.max_steps:
            metrics.log(done, **row)
            E.log(d, f"step {done}/{cfg.train.max_steps}: reward {row['rollout/reward']:.3f} "
                     f"gold {row['rollout/gold_accuracy']:.3f} kl {row['rollout/kl']:.3f} "
                     f"beta {m.kl_ctl.beta:.4f} clipfrac {row['policy/clipfrac']:.3f} "
                     f"gen {row['perf/generation_share']:.0%}")
        if done % cfg.checkpoint.every_steps == 0 and done < cfg.train.max_steps:
            E.save_checkpoint(engines, ckpt, done, cfg.checkpoint.keep_last, d,
                              {"kl": m.kl_ctl.state_dict()})
    run.mark("train")

    # --- evaluate: PPO against SFT, and whether the policy exploits the RM -------------------
    samples = last_eval["samples"]
    current = {k: v for k, v in last_eval.items() if k not in NOT_METRICS}
    counts = ("gold/n", "gold/sampled_n")
    final = {**M.with_baseline({k: v for k, v in current.items() if k not in counts},
                               baseline), **{k: current[k] for k in counts if k in current},
             **paired(baseline, last_eval), "rl/beta": m.kl_ctl.beta}
    # Only when the RM is what PPO maximizes can the policy exploit it.
    hacked = reward_hacking(final) if cfg.ppo.reward_source == "rm" else []
    final["rl/reward_hacking"] = bool(hacked)
    for mode, gained, gold_delta in hacked:
        E.log(d, f"WARNING: reward hacking ({mode} responses): RM reward rose by "
                 f"{gained:.3f} while gold accuracy fell by {-gold_delta:.3f}")

    # --- export -------------------------------------------------------------------------------
    export = run.work / "export"
    E.save_hf(actor, tok, export, d)
    if d.main:
        (export / "samples.json").write_text(json.dumps(samples, indent=2))
        # Per held-out prompt, SFT and PPO: what the paired figures were computed from.
        (export / "heldout.json").write_text(json.dumps([
            {"prompt": p["prompt"], "answer": p.get("answer"),
             **{f"{who}_{mode}": o["outcomes"][mode][i] for who, o in (("sft", baseline),
                                                                       ("ppo", last_eval))
                for mode in o["outcomes"]}} for i, p in enumerate(eval_prompts)], indent=1))
        S.export(run, export, metrics=final, headline=headline(final, cfg),
                 train_log=metrics.rows(),
                 datasets={"prompts": {"digest": data_art.digest, "train": len(train_prompts)}})
    metrics.close()
    E.shutdown(d)


if __name__ == "__main__":
    E.run(main)
