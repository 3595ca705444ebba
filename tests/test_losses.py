"""PPO math on literal tensors with hand-computed expectations."""
import math

import pytest
import torch

from stages import losses as L

T = torch.tensor


def test_gae_by_hand():
    # one sequence of 3 real tokens and one padding; gamma=1, lam=0.5
    rewards = T([[0.0, 0.0, 1.0, 9.0]])
    values = T([[0.5, 0.25, 0.5, 7.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = L.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas: t2 = 1 - 0.5 = 0.5 (no bootstrap past the end); t1 = 0 + 0.5 - 0.25 = 0.25;
    # t0 = 0 + 0.25 - 0.5 = -0.25.  A2 = 0.5; A1 = 0.25 + 0.5*0.5 = 0.5; A0 = -0.25 + 0.25 = 0
    assert adv.tolist() == [[0.0, 0.5, 0.5, 0.0]]
    assert ret.tolist() == [[0.5, 0.75, 1.0, 0.0]]


def test_gae_discount():
    adv, _ = L.gae(T([[0.0, 2.0]]), T([[0.0, 0.0]]), T([[1.0, 1.0]]), gamma=0.5, lam=1.0)
    assert adv.tolist() == [[1.0, 2.0]]                 # A0 = 0 + 0.5 * 2


def test_kl_estimators():
    logp, ref = T([math.log(0.5), math.log(0.25)]), T([math.log(0.25), math.log(0.5)])
    assert L.kl_estimate(logp, ref, "k1").tolist() == pytest.approx([math.log(2), -math.log(2)])
    # k3 = (r - 1) - log r with r = ref/pi: r=0.5 -> -0.5 + log 2; r=2 -> 1 - log 2
    assert L.kl_estimate(logp, ref, "k3").tolist() == pytest.approx(
        [-0.5 + math.log(2), 1 - math.log(2)])
    assert (L.kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        L.kl_estimate(logp, ref, "k2")


def test_token_rewards_put_score_on_last_real_token():
    kl = T([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = L.token_rewards(T([1.0, -2.0]), kl, mask, beta=0.5)
    assert torch.allclose(r, T([[-0.05, -0.1, 1.0 - 0.15], [-2.2, 0.0, 0.0]]))


def test_policy_loss_clips():
    old = torch.zeros(1, 2)
    logp = T([[math.log(1.5), math.log(0.5)]])          # ratios 1.5 and 0.5
    adv, mask = T([[1.0, -1.0]]), torch.ones(1, 2)
    loss, stats = L.policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clipfrac"] == 1.0
    assert stats["approx_kl"] == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    loss, stats = L.policy_loss(old, old, adv, mask, clip=0.2)   # ratio 1: -mean(adv)
    assert loss.item() == pytest.approx(0.0) and stats["clipfrac"] == 0.0


def test_value_loss_clips():
    values, old, ret = T([[2.0, 0.0]]), T([[0.0, 0.0]]), T([[1.0, 1.0]])
    loss, stats = L.value_loss(values, old, ret, torch.ones(1, 2), clip=0.5)
    # token 0: unclipped (2-1)^2 = 1, clipped (0.5-1)^2 = 0.25 -> 1; token 1: 1 both -> 1
    assert loss.item() == pytest.approx(0.5 * 1.0) and stats["value_clipfrac"] == 0.0


def test_whiten_and_masked_stats():
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    assert L.masked_mean(x, mask).item() == 2.0
    assert L.masked_var(x, mask).item() == pytest.approx(1.0)      # unbiased over 3 tokens
    w = L.whiten(x, mask)
    assert w.tolist()[0][:3] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6) and w[0, 3] == 0
    assert L.whiten(x, mask, shift_mean=False).tolist()[0][:3] == pytest.approx([1, 2, 3],
                                                                                abs=1e-5)


def test_entropy_and_logprobs():
    logits = torch.log(T([[[0.5, 0.25, 0.25]]]))
    assert L.entropy(logits).item() == pytest.approx(1.5 * math.log(2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, generator=g) * 3
    logp = torch.log_softmax(x, -1)
    for chunk in (9, 27, 1 << 20):     # a few positions at a time or all at once
        assert torch.allclose(L.entropy(x, chunk), -(logp.exp() * logp).sum(-1), atol=1e-5)
    assert L.token_logprobs(logits, T([[0]])).item() == pytest.approx(math.log(0.5))
    # temperature 2 flattens: softmax(log p / 2) ~ sqrt(p)
    p = torch.sqrt(T([0.5, 0.25, 0.25]))
    assert L.token_logprobs(logits, T([[0]]), 2.0).item() == pytest.approx(
        math.log(p[0] / p.sum()))
    # A few rows at a time or all at once: the same log-probs.
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(5, 3, 7, generator=g), torch.randint(0, 7, (5, 3), generator=g)
    whole = L.token_logprobs(logits, tokens, 0.7)
    assert torch.allclose(L.token_logprobs(logits, tokens, 0.7, chunk_elements=42), whole)
    assert torch.allclose(whole, torch.log_softmax(logits / 0.7, -1).gather(
        -1, tokens.unsqueeze(-1)).squeeze(-1))


def test_explained_variance():
    ret, mask = T([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert L.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert L.explained_variance(torch.full_like(ret, 2.0), ret, mask) == pytest.approx(0.0)


def test_adaptive_kl_controller():
    c = L.KLController(0.1, adaptive=True, target=6.0, horizon=100)
    c.update(kl=12.0, n_sequences=10)                   # error clipped to +0.2
    assert c.beta == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    c.update(kl=4.5, n_sequences=100)                   # error -0.25 -> -0.2
    assert c.beta == pytest.approx(0.1 * 1.02 * 0.8)
    fixed = L.KLController(0.1, adaptive=False, target=6.0, horizon=100)
    fixed.update(kl=100.0, n_sequences=100)
    assert fixed.beta == 0.1


def test_exact_kl():
    p, q = torch.log(T([[0.5, 0.5]])), torch.log(T([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert L.exact_kl(p, q).item() == pytest.approx(expected)
    assert L.exact_kl(p, p).item() == pytest.approx(0.0)
    # A few positions at a time or all at once, float32 or bf16 logits: KL's definition.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    logp, logq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    want = (logp.exp() * (logp - logq)).sum(-1)
    x0 = x.clone()
    for chunk in (11, 33, 1 << 20):
        assert torch.allclose(L.exact_kl(x, y, chunk_elements=chunk), want, atol=1e-5)
    assert torch.equal(x, x0)                           # the caller's logits left as they were
    xb, yb = x.bfloat16(), y.bfloat16()
    logp, logq = torch.log_softmax(xb.float(), -1), torch.log_softmax(yb.float(), -1)
    assert torch.allclose(L.exact_kl(xb, yb, chunk_elements=22),
                          (logp.exp() * (logp - logq)).sum(-1), atol=1e-5)
    assert L.exact_kl(x[:, :0], y[:, :0]).shape == (3, 0)    # no positions: no KL, no error
    assert L.entropy(x[:, :0]).shape == (3, 0)


def test_whitening_over_ranks_uses_the_whole_batch():
    # Two ranks' shares of one batch, on different scales: each whitened alone would put them
    # on one scale; whitened with the batch's statistics they keep their difference.
    x = T([[1.0, 2.0, 3.0, 0.0], [10.0, 20.0, 30.0, 40.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    whole = L.whiten(x, mask)
    shares = [(x[:1], mask[:1]), (x[1:], mask[1:])]

    def reduce(stats):   # what all_reduce(SUM) would give on each rank
        return sum(torch.stack([(s * m).sum(), (s * s * m).sum(), m.sum()]).double()
                   for s, m in shares)
    got = torch.cat([L.whiten(s, m, reduce=reduce) for s, m in shares])
    assert got.tolist() == [pytest.approx(r, abs=1e-5) for r in whole.tolist()]
    assert not torch.allclose(torch.cat([L.whiten(s, m) for s, m in shares]), whole)


def test_group_advantages_by_hand():
    # two prompts, three samples each: scores 1, 2, 3 and 0, 0, 3
    s = T([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    grpo = L.group_advantages(s, 3, "grpo", scale=False)      # Dr. GRPO: mean removed only
    assert grpo.tolist() == pytest.approx([-1, 0, 1, -1, -1, 2])
    scaled = L.group_advantages(s, 3, "grpo")                  # divided by each group's std
    assert scaled.tolist() == pytest.approx([-1, 0, 1, -1 / math.sqrt(3), -1 / math.sqrt(3),
                                             2 / math.sqrt(3)], abs=1e-3)
    rloo = L.group_advantages(s, 3, "rloo")                    # minus the mean of the others
    assert rloo.tolist() == pytest.approx([1 - 2.5, 2 - 2, 3 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0])
    assert L.group_advantages(T([5.0, 5.0]), 2, "grpo").tolist() == [0.0, 0.0]   # no signal
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        L.group_advantages(s, 1, "rloo")


def test_policy_loss_aggregations():
    # ratio 1 everywhere, so the loss is -adv aggregated; one short and one long response
    logp = torch.zeros(2, 4)
    adv = T([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    mask = T([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    token, _ = L.policy_loss(logp, logp, adv, mask, 0.2)
    seq, _ = L.policy_loss(logp, logp, adv, mask, 0.2, agg="sequence")
    const, _ = L.policy_loss(logp, logp, adv, mask, 0.2, agg="constant", max_len=4)
    assert token.item() == pytest.approx(-(2 + 8) / 6)
    assert seq.item() == pytest.approx(-(1 + 2) / 2)
    assert const.item() == pytest.approx(-(2 / 4 + 8 / 4) / 2)
