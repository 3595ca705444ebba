"""PPO math as small pure functions on tensors, each unit-tested on literal values.

Shapes: [batch, response_len] with `mask` 1.0 on real response tokens (through the EOS) and 0.0
on padding after it. Conventions follow "The N Implementation Details of RLHF with PPO"
(Huang et al., 2023) and Ziegler et al. (2019): the reward model's score arrives at the last
response token; every token pays a KL penalty to the reference policy.
"""

from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1).clamp(min=1)   # unbiased, as torch.var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           reduce=None) -> torch.Tensor:
    """Normalize over the real tokens; keep the mean for rewards (shift_mean=False). `reduce`
    sums a tensor over ranks (all_reduce): the statistics are then those of the whole batch,
    not of this rank's share, so every rank's advantages are on one scale."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if reduce is not None:
        stats = reduce(stats)
    s, ss, n = stats
    mean = s / n.clamp(min=1)
    var = ((ss - n * mean ** 2) / (n - 1).clamp(min=1)).clamp(min=0)   # unbiased, as torch.var
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + 1e-8)
    return (out if shift_mean else out + mean.to(x.dtype)) * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   chunk_elements: int = 1 << 22):
    """log pi(token) under logits scaled by the sampling temperature (as they were sampled):
    the token's logit minus the logsumexp, a few rows at a time (at most `chunk_elements`
    logits each, so no [B, R, vocab] float32 log-softmax is ever held, as TRL's
    selective_log_softmax; whole rows at once where they are small, since a loop of tiny
    ops costs more than the arithmetic)."""
    rows = max(1, chunk_elements // max(logits[0].numel(), 1))
    out = []
    for i in range(0, logits.shape[0], rows):
        x = logits[i:i + rows].float() / temperature
        out.append(x.gather(-1, tokens[i:i + rows].unsqueeze(-1)).squeeze(-1)
                   - torch.logsumexp(x, -1))
    return torch.cat(out)


def by_positions(fn, *logits: torch.Tensor, chunk_elements: int = 1 << 18) -> torch.Tensor:
    """fn over [n, vocab] float32 slices of same-shaped [..., vocab] logits, a few positions at
    a time (at most `chunk_elements` logits each): the elementwise passes over a vocabulary
    stay in cache, and bf16 logits are widened a slice at a time, never all at once."""
    flat = [x.flatten(0, -2) for x in logits]
    rows = max(1, chunk_elements // max(flat[0].shape[-1], 1))
    n = flat[0].shape[0]
    out = [fn(*(x[i:i + rows].float() for x in flat)) for i in range(0, max(n, 1), rows)]
    return torch.cat(out).reshape(logits[0].shape[:-1])


def entropy(logits: torch.Tensor, chunk_elements: int = 1 << 18) -> torch.Tensor:
    """Per-position entropy of softmax(logits): lse(x) - sum p x."""
    def h(x):
        lse = torch.logsumexp(x, -1, keepdim=True)
        return (lse - ((x - lse).exp_() * x).sum(-1, keepdim=True)).squeeze(-1)
    return by_positions(h, logits, chunk_elements=chunk_elements)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence").
    k1 = log(pi/ref): unbiased, can be negative. k3 = (r - 1) - log r with r = ref/pi:
    unbiased, never negative, lower variance."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor,
             chunk_elements: int = 1 << 18) -> torch.Tensor:
    """Per-position KL(pi || ref) summed over the vocabulary: exact, never negative, and valid
    for any decoded tokens (greedy evaluation), unlike the sample-based estimators. As
    sum p (x - y) - lse(x) + lse(y) with p = softmax(x): neither side's log-softmax is held."""
    def kl(x, y):
        lse_x, lse_y = torch.logsumexp(x, -1, keepdim=True), torch.logsumexp(y, -1, keepdim=True)
        return (((x - lse_x).exp_() * (x - y)).sum(-1, keepdim=True) - lse_x + lse_y).squeeze(-1)
    return by_positions(kl, logits, ref_logits, chunk_elements=chunk_elements)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """-beta * KL on every response token, plus the sequence score on its last real token."""
    rewards = -beta * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(score)), last] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation backwards over the response; no bootstrap after the
    last real token. Returns (advantages, returns = advantages + values)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < rewards.shape[1]
                                              else 0.0)) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, method: str,
                     scale: bool = True) -> torch.Tensor:
    """Critic-free advantages of responses sampled `group_size` at a time per prompt (rows
    i*k .. i*k+k-1 share a prompt). grpo: score minus the group mean, divided by the group's
    std when `scale` (DeepSeekMath; Dr. GRPO drops the division); rloo: score minus the mean of
    the *other* samples of the prompt (Ahmadian et al., 2024), an unbiased baseline."""
    g = scores.view(-1, group_size)
    if method == "grpo":
        adv = g - g.mean(1, keepdim=True)
        if scale:
            adv = adv / (g.std(1, keepdim=True) + 1e-4)
    elif method == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs group_size >= 2")
        adv = g - (g.sum(1, keepdim=True) - g) / (group_size - 1)
    else:
        raise ValueError(f"unknown advantage estimator {method!r}; use grpo or rloo")
    return adv.reshape(-1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                mask: torch.Tensor, clip: float, agg: str = "token",
                max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate. agg: "token" averages over every real token of the batch;
    "sequence" over each response's tokens, then over responses (GRPO's paper); "constant"
    sums each response's tokens and divides by `max_len` for all (Dr. GRPO: no bias towards
    short correct and long wrong answers)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    per_token = torch.maximum(unclipped, clipped)
    if agg == "token":
        loss = masked_mean(per_token, mask)
    elif agg == "sequence":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif agg == "constant":
        loss = ((per_token * mask).sum(1) / max_len).mean()
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}")
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 # 0.5 E[(log r)^2]: the approximate KL between the old and new policy
                 "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask).item()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: the worse of the clipped and unclipped squared errors, halved."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(a, b), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((b > a).float(), mask).item()}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 a constant one."""
    var = masked_var(returns, mask)
    if var.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var).item()


class KLController:
    """Fixed beta, or Ziegler et al.'s adaptive one: beta moves so the measured KL per sequence
    approaches `target`, by at most 20% of the error per `horizon` sampled sequences."""

    def __init__(self, beta: float, adaptive: bool, target: float, horizon: int):
        self.beta, self.adaptive, self.target, self.horizon = beta, adaptive, target, horizon

    def update(self, kl: float, n_sequences: int) -> None:
        if not self.adaptive or not math.isfinite(kl):
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + error * n_sequences / self.horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]
