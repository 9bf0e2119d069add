"""paw.py: PaW, Policy and World Modeling Co-Training for Language Agents (arXiv 2606.02388), in one file.

An LLM agent is trained with RL (GRPO / GiGPO / RLOO + PPO-clip) on a multi-turn text environment and, from the
same rollouts and forward pass, with an auxiliary world-modeling (WM) loss that predicts the next observation. The
comments name the sections of the method notes, docs/method.md (§1 idea ... §6 risks); paw's own additions (the WM
gradient cap, the action mask, the language prior) are marked "paw's addition" and have their own headings there.

    python paw.py --env textworld-tiny            # trains PaW, evaluates, saves to runs/<name>/
    python paw.py --env textworld-tiny --wm off   # the plain GRPO baseline

Parts 1-8 are the method in the paper's order; the appendix A1-A7 is engineering to skip on a first read.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # §6 risks: under load, spinning OpenMP threads cost 10x
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import random
import re
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import envs as paw_envs

# ==== 1. Config. Every field has a one-line doc, which is also its --help text. The method's fields come first.
def arg(default, doc, **kw):
    """A Config field: default, one-line doc (the --help text), optional --help `group`, `choices`, `check`."""
    return field(default=default, metadata=dict(help=doc, **kw))

class ConfigError(ValueError):
    """A bad flag or input: one line for the user (the command line exits with code 2)."""

class RunError(Exception):
    """The run cannot go on: one line for the user, and the exit code the command line ends with (2 bad input,
    1 a failure during the run, 130 Ctrl-C). Raised, not exited: a function copied into a notebook keeps it alive."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code

CHECKS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= -1": lambda v: v >= -1, "in (0, 1]": lambda v: 0 < v <= 1,
          "in (0, 1)": lambda v: 0 < v < 1, "in [0, 1)": lambda v: 0 <= v < 1}  # a field's `check` -> the test

@dataclass
class Config:
    groups: int = arg(16, "tasks per iteration, each a group of G rollouts from one state", group="rollouts", check="> 0")
    group_size: int = arg(4, "G, rollouts per task", check="> 0")
    history: int = arg(-1, "K, past steps in the prompt (-1 = 1 in the full layout, 2 in compact/minimal)", check=">= -1")
    prompt_layout: str = arg("auto", "h_t layout (build_prompt); auto = the env's own for the tiny model, full for "
                             "--model", choices=["auto", "full", "compact", "minimal"])
    goal_names: str = arg("auto", "abstract: the task's names become OBJ, REC in all the agent reads; auto = abstract "
                          "for the tiny model (envs with goal_names())", choices=["auto", "abstract", "named"])
    temperature: float = arg(1.0, "sampling temperature; log-probs are computed at the same temperature", check="> 0")
    action_mask: str = arg("auto", "decode only admissible actions; auto = on for the plain prompt, off for think",
                           choices=["auto", "on", "off"])
    max_action_tokens: int = arg(0, "longest response in tokens, EOS included (0 = 8 plain, 256 think)", check=">= 0")
    algo: str = arg("grpo", "advantage estimator (§3)", choices=["grpo", "gigpo", "rloo"], group="RL (§3)")
    adv_norm: str = arg("mean_std", "episode-level normalisation of GRPO/GiGPO", choices=["mean_std", "mean"])
    gamma: float = arg(0.95, "GiGPO step level: discount of the return-to-go", check="in (0, 1]")
    gigpo_omega: float = arg(1.0, "GiGPO: weight omega of the step-level advantage")
    invalid_penalty: float = arg(0.0, "RL-return penalty per inadmissible action (lambda_g ignores it)", check=">= 0")
    lr: float = arg(0.0, "AdamW learning rate (0 = 1e-3 for the tiny model, 1e-6 for a --model)", check=">= 0")
    anneal_lr: bool = arg(True, "decay the learning rate linearly to 0 by the end of --iters / --time-budget")
    clip_low: float = arg(0.2, "PPO-clip eps_low", check="in [0, 1)")
    clip_high: float = arg(0.28, "PPO-clip eps_high", check=">= 0")
    kl_coef: float = arg(0.0, "k3 KL to the reference (pre-RL) policy; 0 = no reference model", check=">= 0")
    ppo_epochs: int = arg(1, "passes over each iteration's rollouts", check="> 0")
    minibatches: int = arg(16, "optimizer steps per pass", check="> 0")
    max_grad_norm: float = arg(1.0, "gradient clipping", check=">= 0")
    wm: str = arg("cmae", "WM loss: cmae (§2.2), ce (ablation) or off (plain RL baseline)",
                  choices=["cmae", "ce", "off"], group="world modeling (§2.1-§2.4, WM gradient cap)")
    wm_alpha: float = arg(0.75, "§2.1: share of highest-H(a|h) transitions that are WM targets", check="in (0, 1]")
    wm_rho: float = arg(0.2, "§2.2: tokens predicted with p > rho get no CMAE loss", check="in (0, 1)")
    wm_lambda: str = arg("adaptive", "§2.3: 'adaptive' (1 - mean_return/R_max per group) or a constant")
    wm_coef: float = arg(1.0, "§2.3: global coefficient multiplying lambda", check=">= 0")
    wm_max_tokens: int = arg(48, "§2: the next observation o_{t+1} is truncated to this many tokens", check="> 0")
    wm_grad_cap: float = arg(1.0, "paw's cap: WM grad norm <= cap x RL grad norm (0 = the literal §2.4)", check=">= 0")
    env: str = arg("textworld-tiny", "built-in environment, or module:Class of your own (see envs.py)", group="run")
    model: str = arg("", "Hugging Face causal LM (hub id or local folder); empty = the tiny model, built here")
    seed: int = arg(1, "random seed (python, numpy, torch, task sampling)")
    iters: int = arg(1000, "RL iterations; 0 = only the language prior, saved for reuse with --model", check=">= 0")
    time_budget: float = arg(10.0, "minutes of training, language prior included (0 = no limit)", check=">= 0")
    out: str = arg("runs", "parent folder of the run folder <out>/<name>/")
    name: str = arg("", "run name; empty = <env>-<algo>-<wm>-s<seed>-<time>")
    device: str = arg("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = arg("auto", "compute dtype: bfloat16 = bf16 autocast over float32 weights and optimizer; auto = "
                     "bfloat16 for --model on CUDA, else float32", choices=["auto", "float32", "bfloat16"])
    threads: int = arg(0, "torch CPU threads (0 = 1 for the tiny model on CPU, else torch's default)", check=">= 0")
    grad_checkpointing: bool = arg(False, "recompute activations in backward (less memory for a big --model)")
    save_every: int = arg(0, "checkpoint every N iterations, the last two kept (0 = final model only)", check=">= 0")
    resume: str = arg("", "continue the run in this folder (runs/<name>) from its latest checkpoint")
    prompt_format: str = arg("auto", "plain (bare action) or think (<think>..</think><action>..</action>); auto = "
                             "think for a chat --model", choices=["auto", "plain", "think"])
    d_model: int = arg(96, "tiny model: hidden size", group="tiny model", check="> 0")
    n_layers: int = arg(3, "tiny model: decoder layers", check="> 0")
    n_heads: int = arg(4, "tiny model: attention heads", check="> 0")
    prior_steps: int = arg(150, "language prior: next-token steps on observation text alone (0 = none)", check=">= 0")
    prior_batch: int = arg(32, "observations per language-prior step", check="> 0")
    prior_lr: float = arg(2e-3, "language-prior learning rate", check="> 0")
    fused_loss: bool = arg(True, "the head on the loss positions only, chunked (no full logits)", group="loss path")
    compile: str = arg("auto", "torch.compile backend of the loss kernels; auto = inductor from a 32k vocabulary",
                       choices=["auto", "inductor", "aot_eager", "off"])
    loss_chunk: int = arg(0, "tokens per fused-loss chunk (0 = a logits tile of ~2^26 values)", check=">= 0")
    forward_batch: int = arg(64, "sequences per no-grad scoring forward", check="> 0")
    rescore: str = arg("auto", "behaviour log-probs from a no-grad pass (on) or from generation (off); auto = off "
                       "in float32", choices=["auto", "on", "off"])
    micro_batch: int = arg(-1, "sequences per forward/backward, gradients accumulated (0 = the whole minibatch; "
                           "-1 = 0 for the tiny model on a GPU, else 16)", check=">= -1")
    eval_episodes: int = arg(100, "held-out evaluation episodes at the end (greedy)", group="evaluation", check=">= 0")
    eval_sampled: bool = arg(True, "also evaluate with temperature sampling (--no-eval-sampled: greedy only)")
    eval_every: int = arg(0, "evaluate on held-out seeds every N iterations (0 = only at the end)", check=">= 0")
    eval_every_episodes: int = arg(50, "episodes of the periodic evaluation", check="> 0")

    def __post_init__(self):
        """Nonsense values get one clear line (the command line turns it into exit code 2)."""
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)
        for f in dataclasses.fields(self):
            v, flag, check = getattr(self, f.name), "--" + f.name.replace("_", "-"), f.metadata.get("check")
            need(not isinstance(v, float) or math.isfinite(v), f"{flag} must be a finite number (got {v})")
            need(not check or CHECKS[check](v), f"{flag} must be {check} (got {v})")
        need(self.wm_lambda == "adaptive" or re.fullmatch(r"(\d+\.?\d*|\.\d+)(e-?\d+)?", self.wm_lambda) is not None,
             f"--wm-lambda must be 'adaptive' or a number >= 0 (got {self.wm_lambda!r})")
        need(0 <= self.seed < 2**32, f"--seed must be in [0, 2^32) (got {self.seed})")
        need(not self.d_model % self.n_heads and not (self.d_model // self.n_heads) % 2,
             f"--d-model ({self.d_model}) must be --n-heads ({self.n_heads}) x an even head size (rotary pairs)")
        need(not self.name or (os.path.basename(self.name) == self.name and self.name not in (".", "..")),
             f"--name {self.name!r} must be a plain folder name (no '/' or '..'): runs go under --out")
        need(self.prompt_format != "think" or bool(self.model) or bool(self.resume), "--prompt-format think needs an "
             "instruction-following --model; the tiny model is trained from scratch and uses the plain format")

# ==== 2. Rollouts (§2): prompts, generation restricted to admissible actions, the lock-step rollout loop
def build_prompt(task: str, history: list[tuple[str, str]], obs: str, admissible: list[str], k: int,
                 layout: str = "full") -> str:
    """h_t, built afresh at every step (verl-agent style), its length bounded. full: the task, the last K (observation,
    action) pairs, the observation, the admissible actions. compact: the step number and the last K actions instead
    of past observations (greedy decoding can tell a step from the one two back, so need not loop). minimal: compact
    without the observation. think (an instruct model): full's content by step, then the response format."""
    lines, recent = [f"Task: {task}."], history[-k:] if k > 0 else []
    if layout == "think":
        lines += [f"Step {len(history) - len(recent) + i + 1}: {o} Action: {a}" for i, (o, a) in enumerate(recent)]
        lines += [f"Step {len(history) + 1} (now): {obs}", "Admissible actions: " + "; ".join(admissible),
                  "Reason inside <think> </think>, then give one admissible action inside <action> </action>."]
        return "\n".join(lines)
    if layout == "full":
        lines += [f"Before: {o} Action: {a}" for o, a in recent]
    else:  # newest first: the last action always sits right after "Last:"
        lines.append(f"Step {len(history) + 1}. Last: " + (" ; ".join(a for _, a in recent[::-1]) or "nothing"))
    lines += [f"Now: {obs}"] * (layout != "minimal") + ["Actions: " + " ; ".join(admissible), "Your action:"]
    return "\n".join(lines)

@dataclass
class PromptFormat:
    """How h_t is rendered and a_t decoded and sampled: decided once per run (make_prompt_format, appendix A3)."""
    think: bool             # <think>/<action> responses, turned into actions by project_action
    chat: bool              # the tokenizer's chat template wraps the prompt
    prefilled_think: bool   # the template ends the generation prompt with "<think>" (e.g. some reasoning models)
    stop_ids: list          # generation ends at any of these ids (EOS, end-of-turn)
    max_new_tokens: int
    mask: bool = False      # decode only admissible actions (AdmissiblePrefixMask)
    layout: str = "full"    # build_prompt's layout of the plain prompt
    history: int = 1        # K, past steps in the prompt
    temperature: float = 1.0  # sampling temperature T (log-probs are taken at the same T)
    score_limit: float = 0.0  # keep generation's own log-probs up to this many scores (behaviour_score_limit)
    dtype: str = "float32"  # compute dtype of generation: bfloat16 = autocast over the float32 weights (bf16_autocast)

def project_action(response: str, think: bool, prefilled_think: bool = False) -> tuple[str, bool]:
    """Response -> (action, format_ok). Plain: the stripped text. Think (verl-agent's projection, strict): exactly
    `<think> .. </think>` then one non-empty `<action> .. </action>` (a pre-filled "<think>" counts). Malformed:
    the env gets the raw text, and the step is penalised like an inadmissible one."""
    if not think:
        return " ".join(response.split()), True
    text = ("<think>" + response) if prefilled_think and "<think>" not in response[:20] else response
    once = all(text.count(tag) == 1 for tag in ("<think>", "</think>", "<action>", "</action>"))
    m = re.match(r"\s*<think>.*</think>.*<action>(.*)</action>", text, re.S) if once else None  # in this order
    if not m:
        return " ".join(response.split()), False
    return " ".join(m.group(1).split()), bool(m.group(1).strip())

def render_prompts(tok, fmt: PromptFormat, states: list[tuple], k: int, cache: dict | None = None) -> list[list[int]]:
    """Prompt texts -> token ids, one tokenizer call for all live episodes (tokenize_cached). states: (task, history,
    observation, admissible actions) per episode; the plain prompt, or the think prompt (in the chat template)."""
    texts = [build_prompt(*st, k, "think" if fmt.think else fmt.layout) for st in states]
    if fmt.think:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                 for t in texts] if fmt.chat else [t + "\n" for t in texts]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and not fmt.chat else []  # a template has its own
    return [bos + x for x in tokenize_cached(tok, texts, cache if cache is not None else {})]

def tokenize_cached(tok, texts: list[str], cache: dict) -> list[list[int]]:
    """Token ids of each text (no special tokens), from `cache` or from one tokenizer call for the texts not in it:
    the G rollouts of a group start from the same prompt, and observations and actions repeat."""
    new = [t for t in dict.fromkeys(texts) if t not in cache]
    cache.update(zip(new, tok(new, add_special_tokens=False)["input_ids"] if new else []))
    return [cache[t] for t in texts]

@dataclass
class Step:
    """One transition (h_t, a_t, r_t, o_{t+1}) of §2, as token ids kept exactly as sampled."""
    prompt_ids: list
    action_ids: list      # generated ids (for think: all of think + action), up to and including the stop id
    obs_ids: list         # o_{t+1}, tokenized and truncated to --wm-max-tokens (§2 Decision)
    reward: float         # task reward of this step
    valid: bool           # the response was well-formed AND the action admissible (penalised if not)
    anchor: str           # the raw current observation o_t, GiGPO's anchor state (§3)
    format_ok: bool = True  # the response had a well-formed action (always True in the plain format)
    allowed: list | None = None  # with the action mask: per action token, the token ids the mask allowed there
    decisions: dict = field(default_factory=dict)  # decision name -> got it right (envs with decision_points())
    gen_logp: torch.Tensor | None = None   # per action token: log-prob under the sampling distribution
    gen_entropy: torch.Tensor | None = None  # per action token: entropy of the sampling distribution

@dataclass
class Episode:
    group: int
    seed: int
    steps: list = field(default_factory=list)
    won: bool = False
    task_type: str = ""   # info["task_type"] when the environment reports one (per-type evaluation)

    @property
    def task_return(self) -> float:
        return sum(s.reward for s in self.steps)

def admissible_ids(tok, admissible_lists: list[list[str]], cache: dict) -> list[list[list[int]]]:
    """Per episode, its admissible actions as token ids, each ending in EOS: what the action mask lets decoding emit
    (the strings not seen before are tokenized in one call)."""
    ids = iter(tokenize_cached(tok, [a for adm in admissible_lists for a in adm], cache))
    return [[next(ids) + [tok.eos_token_id] for _ in adm] for adm in admissible_lists]

def allowed_along(actions: list[list[int]], ids: list[int]) -> list[list[int]]:
    """For each token of a decoded action, the ids the mask allowed there: the next token of every action (token ids,
    EOS included) that starts with the tokens decoded so far."""
    return [sorted({a[j] for a in actions if len(a) > j and a[:j] == ids[:j]}) for j in range(len(ids))]

class AdmissiblePrefixMask:
    """A transformers logits processor, the action mask (paw's addition): row r may only continue a prefix of one
    of its admissible actions (scores of every other token -> -inf, so sampling and argmax renormalise over the
    allowed ones). A row off its actions (finished, or with none) is left alone. All rows at once, as tensor work
    on a [rows, actions, tokens] table of the actions' ids (-1 past an action's end)."""

    def __init__(self, actions: list[list[list[int]]], prompt_len: int):
        M, T = max(map(len, actions), default=0) or 1, max((len(a) for acts in actions for a in acts), default=1)
        flat = [a + [-1] * (T - len(a)) for acts in actions for a in acts + [[]] * (M - len(acts))]
        self.table, self.prompt_len = torch.tensor(flat, dtype=torch.long).view(len(actions), M, T), prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        j, V = input_ids.shape[1] - self.prompt_len, scores.shape[1]
        if j >= self.table.shape[2]:  # past the longest action: nothing left to mask
            return scores
        table = self.table = self.table.to(scores.device)  # to the GPU once, not at every token
        alive = (table[:, :, :j] == input_ids[:, None, self.prompt_len:]).all(-1) & (table[:, :, j] >= 0)
        allow = torch.zeros(len(table), V + 1, dtype=torch.bool, device=scores.device)
        allow = allow.scatter(1, torch.where(alive, table[:, :, j], V), True)[:, :V]  # column V: not alive
        return scores.masked_fill(~allow & allow.any(1, keepdim=True), float("-inf"))

def bf16_autocast(dev: torch.device, dtype: str):
    """Mixed precision (--dtype bfloat16): bf16 matrix products over float32 master weights, around one generation
    or one forward (also as a decorator); never around an optimizer step (its cache of cast weights would go stale)."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

@torch.no_grad()
def generate_actions(model, tok, prompts: list[list[int]], fmt: PromptFormat, greedy: bool = False,
                     actions: list[list[list[int]]] | None = None) -> list[tuple]:
    """Batched, KV-cached generation -> per prompt: the ids as sampled, up to the first stop id, with the log-prob and
    entropy of the distribution each was drawn from (temperature T, after the action mask to `actions`, if any), or None
    for both when there are more than fmt.score_limit scores to keep (the scoring pass then gives them)."""
    dev = next(model.parameters()).device
    rows = [torch.tensor(p, dtype=torch.long) for p in prompts]  # left padding: all prompts end where generation starts
    ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tok.pad_token_id, padding_side="left")
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
    gen_kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=fmt.temperature, top_k=0, top_p=1.0)
    budget = fmt.max_new_tokens
    if actions is not None:  # per prompt: its admissible actions' ids (admissible_ids)
        gen_kw["logits_processor"] = transformers.LogitsProcessorList([AdmissiblePrefixMask(actions, ids.shape[1])])
        budget = max((len(a) for acts in actions for a in acts), default=1)  # the longest admissible action + EOS
    keep = len(prompts) * budget * model.get_output_embeddings().weight.shape[0] <= fmt.score_limit
    with bf16_autocast(dev, fmt.dtype):
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=budget,
                             eos_token_id=fmt.stop_ids, pad_token_id=tok.pad_token_id, repetition_penalty=1.0,
                             output_scores=keep, return_dict_in_generate=True, **gen_kw)
    new = out.sequences[:, ids.shape[1]:]
    if keep:  # the scores generate sampled from (logits / T, masked): their log-softmax is the behaviour policy
        logp_all = torch.log_softmax(torch.stack(out.scores, 1).float(), dim=-1)  # [B, new tokens, V]
        tok_logp = logp_all.gather(2, new[:, :, None]).squeeze(2).cpu()
        tok_ent = -(logp_all.exp() * logp_all.clamp(min=torch.finfo(logp_all.dtype).min)).sum(-1).cpu()
    stop, out = set(fmt.stop_ids), []
    for r, row in enumerate(new.tolist()):
        n = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
        out.append((row[:n], tok_logp[r, :n] if keep else None, tok_ent[r, :n] if keep else None))
    return out

def decode_action(tok, ids: list[int], stop_ids=()) -> str:
    stop = set(stop_ids) | {tok.eos_token_id}
    return tok.decode([t for t in ids if t not in stop], skip_special_tokens=True).strip()

@dataclass
class Slot:
    """One live episode of the lock-step rollout loop."""
    env: object
    obs: str
    info: dict
    history: list = field(default_factory=list)  # (observation, action) pairs played so far
    done: bool = False

def collect_rollouts(model, tok, env_cls, seeds: list[int], group_size: int, fmt: PromptFormat, greedy: bool = False,
                     max_obs_tokens: int = 48, progress=lambda text: None) -> list[Episode]:
    """§2: len(seeds) x group_size episodes in lock-step (the G rollouts of a group share the seed: the same start),
    one batched generate call per environment step (told to `progress`); o_{t+1} as ids, cut to `max_obs_tokens`."""
    was_training = model.training
    model.eval()
    episodes, slots, ids_of = [], [], {}  # ids_of: text -> its token ids (prompts, actions, observations)
    for g, seed in enumerate(seeds):
        for _ in range(group_size):
            env = env_cls()
            slots.append(Slot(env, *env.reset(seed)))
            episodes.append(Episode(group=g, seed=seed, task_type=str(slots[-1].info.get("task_type", ""))))
    for t in range(env_cls.max_steps):
        active = [i for i, slot in enumerate(slots) if not slot.done]
        if not active:
            break
        progress(f"rollout step {t + 1}, {len(active)} episodes")
        prompts = render_prompts(tok, fmt, [(slots[i].info["task"], slots[i].history, slots[i].obs,
                                             slots[i].info["admissible_actions"]) for i in active], fmt.history, ids_of)
        masked = admissible_ids(tok, [slots[i].info["admissible_actions"] for i in active], ids_of) if fmt.mask else None
        generated, played = generate_actions(model, tok, prompts, fmt, greedy, masked), []
        for n, (i, (ids, _, _)) in enumerate(zip(active, generated)):
            slot = slots[i]
            # masked: the ids spell one admissible action; play its own string, since decoding may not give it
            # back ("non-euclidean" is three word-level tokens, joined by spaces)
            acts = zip(slot.info["admissible_actions"], masked[n]) if masked else []
            text = next((x for x, a in acts if a == ids), None)
            text, format_ok = (text, True) if text is not None else project_action(
                decode_action(tok, ids, fmt.stop_ids), fmt.think, fmt.prefilled_think)
            points = slot.env.decision_points() if hasattr(slot.env, "decision_points") else {}
            played.append((text, format_ok, points, *slot.env.step(text)))  # checked: a violation is EnvFailure
        obs_ids = tokenize_cached(tok, [p[3] for p in played], ids_of)  # o_{t+1}
        for n, (i, prompt, (ids, logp, entropy)) in enumerate(zip(active, prompts, generated)):
            slot, ep = slots[i], episodes[i]
            text, format_ok, points, obs, reward, done, info = played[n]
            ep.steps.append(Step(
                prompt_ids=prompt, action_ids=ids, obs_ids=obs_ids[n][:max_obs_tokens], reward=float(reward),
                anchor=slot.obs, valid=bool(info.get("valid", True)) and format_ok, format_ok=format_ok,
                allowed=allowed_along(masked[n], ids) if masked is not None else None,
                decisions={k: text in right for k, right in points.items()}, gen_logp=logp, gen_entropy=entropy))
            slot.history.append((slot.obs, text if format_ok else text[:200]))  # a rambling violation stays short
            slot.obs, slot.info = obs, info
            ep.won, slot.done = bool(info.get("won", False)), bool(done) or len(ep.steps) >= env_cls.max_steps
    model.train(was_training)
    return episodes

# ==== 3. The one forward pass (§2): [h_t ; a_t ; o_{t+1}] -> per-token log-prob and entropy of a_t and o_{t+1}
@dataclass
class Packed:
    """A right-padded batch of [h_t ; a_t ; o_{t+1}] sequences and where their loss tokens are."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    act_pos: torch.Tensor   # flat positions (row * T + col) of the hidden states that predict action tokens
    act_tgt: torch.Tensor
    act_row: torch.Tensor   # which sequence of the batch each action token belongs to
    obs_pos: torch.Tensor
    obs_tgt: torch.Tensor
    obs_row: torch.Tensor
    act_allowed: tuple | None = None  # action mask: (action-token index, allowed id) pairs, or None (no mask)

def pack_steps(steps: list[Step], with_obs: bool | list[bool] = True, pad_id: int = 0) -> Packed:
    """§2: one right-padded sequence per step, [h_t ; a_t ; o_{t+1}]; policy tokens a_t (EOS included), WM tokens
    o_{t+1}; position j predicts token j+1, hence the -1. `with_obs` per step: without it only [h_t ; a_t] (causal
    attention: the action log-probs are the same). No real token attends a pad, so the pad id is arbitrary."""
    obs_on = list(with_obs) if isinstance(with_obs, (list, tuple)) else [bool(with_obs)] * len(steps)
    seqs = [torch.tensor(s.prompt_ids + s.action_ids + (s.obs_ids if w else []), dtype=torch.long)
            for s, w in zip(steps, obs_on)]
    ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in seqs], batch_first=True)
    T = ids.shape[1]
    ap, at, ar, op, ot, orow = [], [], [], [], [], []
    for r, (s, with_o) in enumerate(zip(steps, obs_on)):
        a0, o0 = len(s.prompt_ids), len(s.prompt_ids) + len(s.action_ids)
        ap += [r * T + j - 1 for j in range(a0, o0)]
        at += s.action_ids
        ar += [r] * len(s.action_ids)
        if with_o:
            op += [r * T + j - 1 for j in range(o0, o0 + len(s.obs_ids))]
            ot += s.obs_ids
            orow += [r] * len(s.obs_ids)
    long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    allowed = None
    if steps and all(s.allowed is not None for s in steps):
        flat = [ids_j for s in steps for ids_j in s.allowed]
        allowed = (long([k for k, a in enumerate(flat) for _ in a]), long([t for a in flat for t in a]))
    return Packed(ids, mask, long(ap), long(at), long(ar), long(op), long(ot), long(orow), allowed)

class TokenStats(NamedTuple):
    """Per token: log-prob of the target token, entropy of the distribution, whether the target is its argmax."""
    logp: torch.Tensor
    entropy: torch.Tensor
    is_argmax: torch.Tensor

class ForwardOut(NamedTuple):
    """What the one forward pass over packed [h_t ; a_t ; o_{t+1}] sequences gives."""
    action: TokenStats   # a_t's tokens, at the sampling temperature (and renormalised under the action mask)
    obs: TokenStats      # o_{t+1}'s tokens, at temperature 1: the model's own prediction of the next observation
    head_input: torch.Tensor | None = None  # the last hidden state (the WM gradient cap measures gradients there)

def naive_logp_entropy(logits, targets, allowed: torch.Tensor | None = None) -> TokenStats:
    """The reference: full log_softmax over the vocabulary, gather, entropy, autograd. With `allowed`
    ([N, V] bool, the action mask) the distribution is renormalised over the allowed tokens."""
    z = logits.float()
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    logp, plogp = logp_all.gather(1, targets[:, None]).squeeze(1), logp_all.exp() * logp_all
    ent = -(plogp if allowed is None else plogp.masked_fill(~allowed, 0.0)).sum(-1)
    is_argmax = z.gather(1, targets[:, None]).squeeze(1) >= z.max(-1).values
    return TokenStats(logp, ent, is_argmax)

def linear_head_logp(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """The linear head W on the hidden states of the loss positions only: their logits h W^T [N, V], then the
    reference math. The fused kernel of appendix A1 gives the same per token without the [N, V] logits."""
    return naive_logp_entropy(h @ W.t(), targets)

def action_and_obs_logprobs(model, packed: Packed, temperature: float = 1.0, logp_fn=None,
                            with_head_input: bool = False) -> ForwardOut:
    """One forward pass over packed sequences -> per-token (log-prob, entropy, is-argmax) of the action tokens (at
    temperature T, renormalised under the action mask) and the observation tokens (temperature 1), and with
    `with_head_input` the last hidden state. logp_fn(h, W, targets) -> TokenStats: the head on the loss positions only
    (linear_head_logp, or fused_logp_entropy of appendix A1); None: the model's own logits. `model`: the LM, or DDP.
    --dtype bfloat16: the run calls it under bf16_autocast (backward then follows the forward's dtypes)."""
    ddp, model = (model, model.module.lm) if isinstance(model, nn.parallel.DistributedDataParallel) else (None, model)
    dev = next(model.parameters()).device
    # Right padding + causal attention: no real token ever attends to a pad, so no mask is needed and
    # attention takes its fast causal path. Positions 0..T-1 match generation's (left pad + mask).
    ids, act_pos, obs_pos, act_tgt, obs_tgt = (x.to(dev) for x in (packed.input_ids, packed.act_pos, packed.obs_pos,
                                                                    packed.act_tgt, packed.obs_tgt))
    W, allowed = model.get_output_embeddings().weight, None
    if packed.act_allowed is not None:  # the action mask as a dense [action tokens, vocab] bool matrix
        allowed = torch.zeros(len(act_tgt), W.shape[0], dtype=torch.bool, device=dev)
        allowed[packed.act_allowed[0].to(dev), packed.act_allowed[1].to(dev)] = True
        allowed[~allowed.any(1)] = True  # no admissible action there: generation was not masked either
    if logp_fn is None:
        out = ddp(ids, False, with_head_input) if ddp else model(input_ids=ids, output_hidden_states=with_head_input)
        hidden, z = out.hidden_states[-1] if with_head_input else None, out.logits.reshape(-1, out.logits.shape[-1])
        act = naive_logp_entropy(z[act_pos].float() / temperature, act_tgt, allowed)
        obs = naive_logp_entropy(z[obs_pos].float(), obs_tgt)
    else:
        hidden = ddp(ids, True, False) if ddp else model.get_decoder()(input_ids=ids).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1])
        if allowed is None:  # one call of the head for both: logits / T == (h / T) W^T
            both = logp_fn(torch.cat([h[act_pos] / temperature, h[obs_pos]]), W, torch.cat([act_tgt, obs_tgt]))
            n = len(act_tgt)
            act, obs = (TokenStats(*(x[part] for x in both)) for part in (slice(0, n), slice(n, None)))
        else:  # masked actions are few tokens: their logits in full
            act = naive_logp_entropy((h[act_pos] @ W.t()) / temperature, act_tgt, allowed)
            obs = logp_fn(h[obs_pos], W, obs_tgt)
    return ForwardOut(act, obs, hidden if with_head_input else None)

def behaviour_score_limit(rescore: str, dtype: str) -> float:
    """How many scores (batch x new tokens x vocab) generation may keep so that its own log-probs and H(a_t|h_t)
    serve as the behaviour policy's, saving the scoring pass: --rescore off = always, on = never, auto = up to 2^26
    (256 MB) in float32, where both agree (tested), and never in bf16, where they do not."""
    return dict(off=math.inf, on=0.0).get(rescore, 2.0**26 if dtype in ("float32", "auto") else 0.0)

@torch.no_grad()
def score_steps(logprobs, model, steps: list[Step], batch_size: int = 64, ref_model=None, policy: bool = True):
    """The no-grad scoring pass (§2.1) over [h_t ; a_t] with the weights that generated the rollouts. logprobs(model,
    packed) -> ForwardOut (the run's action_and_obs_logprobs). -> (behaviour log-probs per step, H(a_t|h_t), log-probs
    of `ref_model` per step (policy=False: only those))."""
    was_training = model.training
    model.eval()
    old, ent_mean, ref = [], [], []
    for i in range(0, len(steps), batch_size):
        chunk = steps[i:i + batch_size]
        packed = pack_steps(chunk, with_obs=False)
        counts = torch.bincount(packed.act_row, minlength=len(chunk)).tolist()
        if policy:
            fwd = logprobs(model, packed)
            old += list(torch.split(fwd.action.logp.float().cpu(), counts))
            ent_mean += [x.mean().item() if x.numel() else 0.0  # H(a_t|h_t), the mean over a_t's tokens (§2.1)
                         for x in torch.split(fwd.action.entropy.float().cpu(), counts)]
        if ref_model is not None:
            ref += list(torch.split(logprobs(ref_model, packed).action.logp.float().cpu(), counts))
    model.train(was_training)
    return old, torch.tensor(ent_mean), ref

# ==== 4. Advantages (§3). Statistics are over the trajectories of a group, never over pooled step rows.
def normalized_in_group(r: torch.Tensor, norm: str = "mean_std", eps: float = 1e-6) -> torch.Tensor:
    """(r - mean r) / (std r + eps) (unbiased std, as verl and TRL), or r - mean r for norm='mean'. Fewer than
    two members or zero std: exactly 0, no RL signal (§2.3), not (r - mean)/eps noise."""
    if r.numel() < 2 or r.std() < eps:
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std() + eps) if norm == "mean_std" else r - r.mean()

def grpo_advantages(returns: torch.Tensor, group: torch.Tensor, norm: str = "mean_std",
                    eps: float = 1e-6) -> torch.Tensor:
    """§3 GRPO: A_i = (R_i - mean_j R_j) / (std_j R_j + eps) over the G trajectories of each group."""
    adv = torch.zeros_like(returns, dtype=torch.float64)
    for g in group.unique():
        adv[group == g] = normalized_in_group(returns[group == g].double(), norm, eps)
    return adv.to(returns.dtype)

def rloo_advantages(returns: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """§3 RLOO: A_i = R_i - mean_{j != i} R_j within each group (0 for a group of size 1)."""
    adv = torch.zeros_like(returns, dtype=torch.float64)
    for g in group.unique():
        r = returns[group == g].double()
        if r.numel() > 1:
            adv[group == g] = r - (r.sum() - r) / (r.numel() - 1)
    return adv.to(returns.dtype)

def discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    """R_t = sum_{k >= t} gamma^(k-t) r_k."""
    out, acc = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        out[t] = acc
    return out

def gigpo_step_advantages(step_returns: list[float], anchors: list[str], group: list[int],
                          norm: str = "mean_std", eps: float = 1e-6):
    """§3 GiGPO step level: within each group, steps whose anchor state (the raw current observation,
    whitespace-normalised) is identical form a cluster; the discounted return-to-go is normalised within
    the cluster; a singleton cluster gets 0. Returns (advantages, cluster sizes per step)."""
    clusters: dict = {}
    for i, (a, g) in enumerate(zip(anchors, group)):
        clusters.setdefault((g, " ".join(a.split())), []).append(i)
    adv = torch.zeros(len(step_returns), dtype=torch.float64)
    size = torch.zeros(len(step_returns), dtype=torch.long)
    R = torch.tensor(step_returns, dtype=torch.float64)
    for idx in clusters.values():
        size[idx], adv[idx] = len(idx), normalized_in_group(R[idx], norm, eps)
    return adv, size

def rl_returns(ep: Episode, invalid_penalty: float) -> float:
    """The return the advantage estimator sees: task return minus the invalid-action penalty."""
    return ep.task_return - invalid_penalty * sum(not s.valid for s in ep.steps)

def compute_advantages(episodes: list[Episode], cfg: Config):
    """Per-step advantage (broadcast to every action token of the step) for --algo, plus log stats."""
    R = torch.tensor([rl_returns(e, cfg.invalid_penalty) for e in episodes], dtype=torch.float64)
    grp, stats = torch.tensor([e.group for e in episodes]), {}
    ep_adv = rloo_advantages(R, grp) if cfg.algo == "rloo" else grpo_advantages(R, grp, cfg.adv_norm)
    step_adv = torch.cat([ep_adv[i].repeat(len(e.steps)) for i, e in enumerate(episodes)])
    if cfg.algo == "gigpo":
        rets, anchors, sgrp = [], [], []
        for e in episodes:  # step rewards include the invalid penalty on the step that was invalid
            rets += discounted_returns([s.reward - cfg.invalid_penalty * (not s.valid) for s in e.steps], cfg.gamma)
            anchors += [s.anchor for s in e.steps]
            sgrp += [e.group] * len(e.steps)
        a_step, size = gigpo_step_advantages(rets, anchors, sgrp, cfg.adv_norm)
        step_adv = step_adv + cfg.gigpo_omega * a_step
        stats.update(anchor_cluster_size=size.double().mean().item(),
                     singleton_cluster_frac=(size == 1).double().mean().item())
    zero_std = [bool(normalized_in_group(R[grp == g]).eq(0).all()) for g in grp.unique()]  # no RL signal
    stats["zero_std_group_frac"] = float(np.mean(zero_std))
    return step_adv.float(), stats


# ==== 5. World-model targets (§2.1 action-entropy selection) and weights (§2.3 reward-adaptive balancing)
def select_wm_targets(action_entropy: torch.Tensor, alpha: float) -> torch.Tensor:
    """§2.1 action-entropy selection: S = the top ceil(alpha * M) of the M transitions, ranked by H(a_t|h_t)
    (mean token entropy of the action). Ties go to the earlier transition (stable sort). alpha = 1 keeps everything."""
    M = action_entropy.numel()
    k, order = math.ceil(alpha * M - 1e-9), torch.sort(-action_entropy.double(), stable=True).indices
    mask = torch.zeros(M, dtype=torch.bool)
    mask[order[:k]] = True
    return mask

def adaptive_wm_weight(group_mean_return: torch.Tensor, r_max: float, coef: float = 1.0) -> torch.Tensor:
    """§2.3 reward-adaptive balancing: lambda_g = clamp(1 - mean_return(g) / R_max, 0, 1) x a global coefficient.
    mean_return is the task return (no penalties): all-fail groups (zero GRPO advantage) get lambda = 1."""
    return coef * (1.0 - group_mean_return / r_max).clamp(0.0, 1.0)

def wm_weights(episodes: list[Episode], r_max: float, lam: str = "adaptive", coef: float = 1.0) -> torch.Tensor:
    """lambda_{g(t)} for every step: adaptive (§2.3) or the constant `lam` (--wm-lambda, an ablation), x `coef`."""
    n_groups = max(e.group for e in episodes) + 1
    if lam == "adaptive":
        R = torch.tensor([e.task_return for e in episodes], dtype=torch.float64)
        mean_R = R.new_zeros(n_groups).scatter_reduce(0, torch.tensor([e.group for e in episodes]), R, "mean",
                                                      include_self=False)  # mean task return per group
        lam_g = adaptive_wm_weight(mean_R, r_max, coef)
    else:
        lam_g = torch.full((n_groups,), float(lam) * coef, dtype=torch.float64)
    return torch.cat([lam_g[e.group].repeat(len(e.steps)) for e in episodes]).float()

# ==== 6. Losses (§2.2 noise-tolerant WM loss, §3 PPO-clip), §2.4 combined objective, WM gradient cap (paw's)
@dataclass
class Batch:
    """The objective's per-step input: one entry per step (transition) t of the iteration's rollouts."""
    steps: list                # Step
    old_logp: list             # per step: the behaviour log-prob of each action token (at the sampling temperature)
    entropy: torch.Tensor      # H(a_t|h_t), the mean token entropy of the action (§2.1)
    adv: torch.Tensor          # A_t (§3)
    selected: torch.Tensor     # bool: t is a WM target, t in S (§2.1)
    lam: torch.Tensor          # lambda_{g(t)} (§2.3)
    ref_logp: list = field(default_factory=list)  # per step: the reference policy's log-probs (--kl-coef), else []

    def rows(self, idx: list[int]) -> Batch:
        return Batch([self.steps[i] for i in idx], [self.old_logp[i] for i in idx], self.entropy[idx], self.adv[idx],
                     self.selected[idx], self.lam[idx], [self.ref_logp[i] for i in idx] if self.ref_logp else [])

def cmae_loss(logp: torch.Tensor, rho: float) -> torch.Tensor:
    """§2.2 noise-tolerant WM loss, per-token clipped MAE (CMAE): l = 1[p <= rho] * (1 - p), the indicator on detached
    p. For a one-hot target MAE = 1 - p; its gradient w.r.t. the target logit: -p(1-p) in the band, 0 outside."""
    p = logp.exp()
    return (p.detach() <= rho).to(p.dtype) * (1.0 - p)

def ce_wm_loss(logp: torch.Tensor) -> torch.Tensor:
    """§2.2 ablation: plain per-token negative log-likelihood of the next observation."""
    return -logp

def per_transition_mean(token_values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(1/|o_{t+1}|) sum_i l_{t,i} for every transition t (0 for a transition with no tokens)."""
    return token_values.new_zeros(n_rows).scatter_reduce(0, rows, token_values, "mean", include_self=False)

def ppo_clip_loss(logp, old_logp, adv, clip_low: float, clip_high: float):
    """§3: per-token PPO-clip with asymmetric clipping (eps_low, eps_high), token-mean aggregation.
    logp/old_logp/adv are per action token. Returns (loss, clip fraction, approx KL k3 to old policy)."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(pg1, pg2).mean()
    with torch.no_grad():
        clipfrac = (pg2 > pg1).float().mean()
        approx_kl = ((ratio - 1) - log_ratio).mean()  # k3 estimator of KL(old || new)
    return loss, clipfrac, approx_kl

def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """§3 optional k3 KL to a reference policy on sampled tokens: exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return (d.exp() - d - 1).mean()

def wm_term(obs_logp, obs_rows, n_rows, selected, lam, loss: str = "cmae", rho: float = 0.2) -> torch.Tensor:
    """§2.4 second term: (1/|S|) sum_{t in S} lambda_{g(t)} L_WM(t), with L_WM from §2.2 (`loss` cmae, or ce)."""
    tok_loss = cmae_loss(obs_logp, rho) if loss == "cmae" else ce_wm_loss(obs_logp)
    per_t = per_transition_mean(tok_loss, obs_rows, n_rows)
    in_s = selected & (torch.bincount(obs_rows, minlength=n_rows) > 0)  # t in S with at least one o_{t+1} token
    if not in_s.any():
        return obs_logp.sum() * 0.0
    return (lam[in_s] * per_t[in_s]).sum() / in_s.sum()

def combined_objective(fwd: ForwardOut, packed: Packed, part: Batch, cfg: Config):
    """§2.4 combined objective: L(theta) = L_RL(theta) + (1/|S|) sum_{t in S} lambda_{g(t)} L_WM(t), on the steps of
    `part` packed as `packed` and scored as `fwd`, each loss averaged over its own tokens. -> (L_RL, WM term, stats)."""
    dev = fwd.action.logp.device
    old_logp = torch.cat(part.old_logp).to(dev)
    adv = part.adv.to(dev)[packed.act_row.to(dev)]  # the step's advantage on every one of its action tokens
    l_rl, clipfrac, approx_kl = ppo_clip_loss(fwd.action.logp, old_logp, adv, cfg.clip_low, cfg.clip_high)
    if part.ref_logp and cfg.kl_coef > 0:
        l_rl = l_rl + cfg.kl_coef * k3_kl(fwd.action.logp, torch.cat(part.ref_logp).to(dev))
    l_wm = (wm_term(fwd.obs.logp, packed.obs_row.to(dev), len(part.steps), part.selected.to(dev), part.lam.to(dev),
                    cfg.wm, cfg.wm_rho) if cfg.wm != "off" else fwd.action.logp.sum() * 0.0)
    return l_rl, l_wm, dict(clipfrac=clipfrac.item(), approx_kl=approx_kl.item())

def backward_with_wm_cap(l_rl, l_wm, head_input: torch.Tensor, cap: float, reduce=None) -> dict:
    """The WM gradient cap (paw's addition, docs/method.md; against §6's collapse): backward of L_RL + s * WM with
    s = min(1, cap ||dL_RL/dh|| / ||dWM/dh||), h = `head_input` (the last hidden state): the WM gradient into the
    trunk is at most `cap` x the RL one, and 0 without RL signal (all groups failed, L_RL = 0, lambda_g = 1: WM alone
    would collapse the policy). cap = 0: the literal §2.4. reduce: sums numbers over processes (None: one process)."""
    if cap <= 0:
        (l_rl + l_wm).backward()
        return dict(wm_scale=1.0)
    g_rl, g_wm = (torch.autograd.grad(l, head_input, retain_graph=True, allow_unused=True)[0] if l.requires_grad
                  else None for l in (l_rl, l_wm))
    sq = [g.float().square().sum().item() if g is not None else 0.0 for g in (g_rl, g_wm)]
    n_rl, n_wm = (math.sqrt(v) for v in (reduce(sq) if reduce else sq))  # torchrun: over every process's slice
    scale = min(1.0, cap * n_rl / (n_wm + 1e-12)) if n_wm > 0 else 1.0
    (l_rl + scale * l_wm).backward()
    return dict(wm_scale=scale, grad_norm_rl_top=n_rl, grad_norm_wm_top=n_wm)

# ==== 7. The update and one training iteration
class Processes:
    """The processes an iteration is split over: one here (each method the identity); under torchrun see A5."""
    rank, n = 0, 1

    def reduce(self, values: list, op: str = "sum") -> list:  # each value summed (or max, min) over the processes
        return list(values)

    def gather(self, obj) -> list:  # every process's `obj`, in rank order
        return [obj]

    def mean(self, d: dict) -> dict:  # each value of `d` averaged over the processes
        return {k: v / self.n for k, v in zip(sorted(d), self.reduce([d[k] for k in sorted(d)]))}

    def episodes(self, episodes: list) -> list:  # every process's episodes (what episode_stats reads)
        return episodes

    def share(self, it: int, batch: Batch) -> Batch:  # re-dealt: every process holds an equal share of all steps
        return batch

    def say(self, msg: str):  # one line for the user (from process 0 only), above the progress bar
        if self.rank == 0:
            tqdm.write(msg)

def ppo_update(model, opt, batch: Batch, cfg: Config, rng: random.Random, logprobs,
               procs: Processes = Processes(), progress=lambda text: None) -> dict:
    """PPO-clip epochs over minibatches of steps, one optimizer step per minibatch (§2.4, §3), in --micro-batch
    slices whose gradients add up exactly to the minibatch's (slice_backward; the WM gradient cap is per slice).
    logprobs(model, packed, with_head_input) -> ForwardOut (the run's action_and_obs_logprobs)."""
    params = [p for p in model.parameters() if p.requires_grad]
    steps, logs, counts = batch.steps, [], dict(tokens=0, padded=0, obs_hits=0, obs_tokens=0)
    wm_on = cfg.wm != "off"
    # §2.4: a transition outside S, or with lambda = 0, adds nothing to the WM term: its o_{t+1} is not packed
    wm_rows = [wm_on and bool(batch.selected[i]) and float(batch.lam[i]) != 0.0 and len(s.obs_ids) > 0
               for i, s in enumerate(steps)]
    seq_len = [len(s.prompt_ids) + len(s.action_ids) + (len(s.obs_ids) if w else 0) for s, w in zip(steps, wm_rows)]
    # a step with A_t = 0 that is no WM row (and has no KL term) adds exactly 0 to the gradient: it is not packed
    # (its action tokens still count in the token mean's n_act). Late in a run, most all-success groups.
    kl_on = bool(batch.ref_logp) and cfg.kl_coef > 0
    needed = [w or kl_on or float(a) != 0.0 for w, a in zip(wm_rows, batch.adv.tolist())]
    n_mb = int(procs.reduce([min(cfg.minibatches, len(steps))], "min")[0])  # torchrun: a share of each minibatch
    model.train()
    for epoch in range(cfg.ppo_epochs):
        order = list(range(len(steps)))
        rng.shuffle(order)
        for k, mb in enumerate(np.array_split(np.array(order), n_mb)):
            progress(f"update {epoch * n_mb + k + 1}/{cfg.ppo_epochs * n_mb}")
            # membership is random; within the minibatch, slices of similar length waste little on padding
            mb = sorted(mb.tolist(), key=lambda i: seq_len[i])
            in_s = [wm_on and bool(batch.selected[i]) and len(steps[i].obs_ids) > 0 for i in mb]
            n_act, n_sel = procs.reduce([sum(len(steps[i].action_ids) for i in mb), sum(in_s)])  # global counts
            mb = [i for i in mb if needed[i]] or mb[:1]  # one row keeps torchrun's processes in step
            size = cfg.micro_batch if cfg.micro_batch > 0 else len(mb)
            if procs.n > 1:  # every process runs the same number of slices (DDP syncs on the last one)
                n_parts = int(min(procs.reduce([-(-len(mb) // size)], "max")[0], procs.reduce([len(mb)], "min")[0]))
                parts = [p.tolist() for p in np.array_split(np.array(mb), n_parts)]
            else:
                parts = [mb[j:j + size] for j in range(0, len(mb), size)]
            opt.zero_grad(set_to_none=True)
            log = dict(policy_loss=0.0, wm_loss=0.0, clipfrac=0.0, approx_kl=0.0)
            for j, part in enumerate(parts):
                if procs.n == 1 and not slice_has_signal(batch, part, wm_rows, cfg, kl_on):
                    continue  # its gradient is exactly 0: no forward, no backward
                sync = procs.n == 1 or j == len(parts) - 1
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    out = slice_backward(model, batch.rows(part), cfg, [wm_rows[i] for i in part], n_act / procs.n,
                                         max(1.0, n_sel) / procs.n, logprobs, procs)
                for k in counts:  # WM token accuracy: of the policy that generated the rollouts (first pass)
                    v = out.pop(k)
                    counts[k] += v if epoch == 0 or k in ("tokens", "padded") else 0
                for k, v in out.items():  # losses: already weighted; the cap's scale and norms: mean over slices
                    log[k] = log.get(k, 0.0) + (v if k in ("policy_loss", "wm_loss", "clipfrac", "approx_kl")
                                                else v * len(part) / len(mb))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
            if grad_norm > 0:  # the cap: no RL signal (every advantage 0, so WM scaled to 0): no optimizer step
                opt.step()
            logs.append(dict(log, grad_norm=grad_norm, stepped=float(grad_norm > 0)))
    out = procs.mean({k: float(np.mean([d[k] for d in logs if k in d])) for k in logs[0]})
    tokens, padded, hits, n_obs = procs.reduce([counts[k] for k in ("tokens", "padded", "obs_hits", "obs_tokens")])
    out.update(update_tokens=tokens, update_pad_frac=1 - tokens / max(1, padded))
    if n_obs:
        out["wm_token_acc"] = hits / n_obs
    return out

def slice_has_signal(batch: Batch, part: list[int], wm_rows: list[bool], cfg: Config, kl_on: bool) -> bool:
    """False (skipping it is exact) if all its advantages are 0, no KL: L_RL's gradient is 0, the cap scales WM's by 0."""
    return kl_on or any(float(batch.adv[i]) != 0.0 for i in part) or (
        cfg.wm_grad_cap <= 0 and any(wm_rows[i] for i in part))

def slice_backward(model, part: Batch, cfg: Config, wm_rows: list[bool], n_act: float, n_sel: float, logprobs,
                   procs: Processes = Processes()) -> dict:
    """One slice of a minibatch, forward and backward: L_RL weighted by its share of the n_act action tokens, the WM
    term by its packed rows (`wm_rows`) over the n_sel selected transitions, so the slices add up to §2.4 exactly."""
    packed = pack_steps(part.steps, with_obs=wm_rows)
    fwd = logprobs(model, packed, with_head_input=True)
    l_rl, l_wm, log = combined_objective(fwd, packed, part, cfg)
    w_rl, w_wm = packed.act_tgt.numel() / n_act, sum(wm_rows) / n_sel
    # under torchrun every process takes the capped path (its norms are all-reduced), WM rows in its slice or not
    cap = cfg.wm_grad_cap if cfg.wm != "off" and (any(wm_rows) or procs.n > 1) else 0.0
    log.update(backward_with_wm_cap(w_rl * l_rl, w_wm * l_wm, fwd.head_input, cap, procs.reduce))
    log.update(policy_loss=w_rl * l_rl.item(), wm_loss=w_wm * l_wm.item(), clipfrac=w_rl * log["clipfrac"],
               approx_kl=w_rl * log["approx_kl"], obs_hits=int(fwd.obs.is_argmax.sum()),
               obs_tokens=fwd.obs.is_argmax.numel(), tokens=int(packed.attention_mask.sum()),
               padded=packed.attention_mask.numel())
    return log

@dataclass
class Run:
    """One training run: what an iteration uses and what a checkpoint keeps."""
    cfg: Config
    env_cls: type
    tok: object
    model: nn.Module
    opt: torch.optim.Optimizer
    rng: random.Random                  # task sampling and minibatch order
    fmt: PromptFormat
    run_dir: str = ""
    ref_model: nn.Module | None = None  # the frozen pre-RL policy, with --kl-coef > 0
    trainer: nn.Module | None = None    # under torchrun: DistributedDataParallel around the model
    summary: dict = field(default_factory=dict)
    train_s: float = 0.0                # wall-clock of training so far (the clock of --time-budget)
    started_at: float = 0.0             # when this process started building the run (time.time())
    logprobs: object = action_and_obs_logprobs  # (model, packed, with_head_input) -> ForwardOut, the run's head
    procs: Processes = field(default_factory=Processes)
    progress: object = lambda text: None  # progress(text): where the iteration is (train's bar shows it)

def train_iteration(run: Run, it: int) -> dict:
    """One PaW iteration: rollouts -> behaviour log-probs -> advantages -> WM targets -> PPO + WM update."""
    cfg, model, procs, t0 = run.cfg, run.model, run.procs, time.time()
    seeds = [run.rng.randrange(paw_envs.EVAL_SEED_START) for _ in range(cfg.groups // procs.n)]  # this process's
    episodes = collect_rollouts(model, run.tok, run.env_cls, seeds, cfg.group_size, run.fmt, False, cfg.wm_max_tokens,
                                run.progress)
    steps, t1 = [s for e in episodes for s in e.steps], time.time()
    adv, adv_stats = compute_advantages(episodes, cfg)
    # every advantage 0, no KL, and the cap scales WM by 0 x the RL norm (or --wm off): no update can move the
    # weights (slice_has_signal), so neither the scoring pass nor the update is run. Often so while all groups fail.
    idle = procs.n == 1 and run.ref_model is None and not adv.any() and (cfg.wm == "off" or cfg.wm_grad_cap > 0)
    if idle or all(s.gen_logp is not None for s in steps):  # the sampler's own log-probs: no second pass
        old_logp = [s.gen_logp for s in steps]
        entropy = torch.tensor([s.gen_entropy.mean().item() if s.gen_entropy is not None and len(s.action_ids)
                                else math.nan for s in steps])  # unknown when idle and not kept by generation
        ref_logp = [] if run.ref_model is None else score_steps(run.logprobs, model, steps, cfg.forward_batch,
                                                                run.ref_model, policy=False)[2]
    else:
        old_logp, entropy, ref_logp = score_steps(run.logprobs, model, steps, cfg.forward_batch, run.ref_model)
    every_entropy = procs.gather(entropy)  # §2.1 ranks the whole batch (under torchrun: every process's transitions)
    selected = (select_wm_targets(torch.cat(every_entropy), cfg.wm_alpha) if cfg.wm != "off"
                else torch.zeros(sum(map(len, every_entropy)), dtype=torch.bool))
    first = sum(map(len, every_entropy[:procs.rank]))
    batch = Batch(steps, old_logp, entropy, adv, selected[first:first + len(steps)],
                  wm_weights(episodes, run.env_cls.R_max, cfg.wm_lambda, cfg.wm_coef), ref_logp)
    local = dict(adv_stats, wm_lambda_mean=batch.lam.mean().item(), wm_selected_frac=batch.selected.float().mean().item(),
                 **({} if entropy.isnan().any() else dict(action_entropy=entropy.mean().item())))
    batch = procs.share(it, batch)  # the advantages are final: under torchrun, equal shares of all the steps
    upd = ppo_update(run.trainer or model, run.opt, batch, cfg, run.rng, run.logprobs, procs, run.progress)
    t2 = time.time()
    return dict(iter=it, **episode_stats(procs.episodes(episodes)), **procs.mean(local),
                **{k: v for k, v in upd.items() if k not in ("update_tokens", "wm_token_acc")},
                wm_token_acc=upd.get("wm_token_acc"),  # the update's first pass; None: --wm off, or no WM target
                rollout_s=t1 - t0, update_s=t2 - t1, tokens_per_s=upd["update_tokens"] / max(1e-9, t2 - t1))

def ends_in_loop(ep: Episode) -> bool:
    """It ends in a cycle of period <= 2 (A A, or A B A B of (state, action)): a deterministic policy's waste."""
    seq = [(s.anchor, tuple(s.action_ids)) for s in ep.steps]
    return any(len(seq) >= 2 * p and seq[-2 * p:-p] == seq[-p:] for p in (1, 2))

def episode_stats(episodes: list[Episode], prefix: str = "") -> dict:
    """Success, return, length, valid ratios, failures ending in a loop; per task type and decision if reported."""
    steps, failed = [s for e in episodes for s in e.steps], [e for e in episodes if not e.won]
    out = {prefix + "success": float(np.mean([e.won for e in episodes])),
           prefix + "return": float(np.mean([e.task_return for e in episodes])),
           prefix + "episode_len": float(np.mean([len(e.steps) for e in episodes])),
           prefix + "valid_ratio": float(np.mean([s.valid for s in steps])) if steps else 0.0,
           prefix + "format_valid_ratio": float(np.mean([s.format_ok for s in steps])) if steps else 0.0,
           prefix + "loop_share": float(np.mean([ends_in_loop(e) for e in failed])) if failed else 0.0}
    for t in sorted({e.task_type for e in episodes if e.task_type}):
        out[f"{prefix}success/{t}"] = float(np.mean([e.won for e in episodes if e.task_type == t]))
    for d in sorted({k for s in steps for k in s.decisions}):  # how often each key decision is right
        out[f"{prefix}decision/{d}"] = float(np.mean([s.decisions[d] for s in steps if d in s.decisions]))
    return out

# ==== 8. The training loop and evaluation on held-out seeds
def train(run: Run, start: int, checkpoint=None) -> tuple[int, bool]:
    """RL iterations after `start`: evaluation, metrics, budget, checkpoint(run, it). -> (last iteration, Ctrl-C?)"""
    cfg, procs, it, warned, train_s0 = run.cfg, run.procs, start, False, run.train_s
    bar = tqdm(range(start + 1, cfg.iters + 1), desc="PaW", dynamic_ncols=True, initial=start, total=cfg.iters,
               disable=procs.rank != 0)
    # a real LM's iteration takes minutes: the bar says where it is (redrawn at most once a second)
    run.progress = lambda text: bar.set_description_str(f"PaW [{text}]", refresh=time.time() - getattr(
        bar, "last_print_t", 0) > 1)
    with open(os.path.join(run.run_dir, "metrics.jsonl"), "a") if procs.rank == 0 else contextlib.nullcontext() as \
            metrics_file:
        for it in bar:
            t_it = time.time()
            for g in run.opt.param_groups if cfg.anneal_lr else []:
                g["lr"] = cfg.lr * remaining_fraction(it, cfg.iters, run.train_s, cfg.time_budget)
            try:
                m = train_iteration(run, it)
                run.train_s += time.time() - t_it
                m.update(train_s=run.train_s, lr=run.opt.param_groups[0]["lr"])
                if cfg.eval_every and it % cfg.eval_every == 0:
                    m.update({"eval_" + k: v for k, v in evaluate(run.model, run.tok, run.env_cls, run.fmt,
                                                                    cfg.eval_every_episodes, procs=procs).items()})
            except KeyboardInterrupt:  # keep what was learned: evaluate and save after the loop
                if procs.n > 1:  # the other processes cannot be told: the last checkpoint is what is kept
                    raise RunError(f"interrupted at iteration {it}; under torchrun the last checkpoint is kept", 130)
                print(f"\ninterrupted at iteration {it}; evaluating and saving the model (Ctrl-C again: save only)")
                return it - 1, True
            warned = report_iteration(run, m, metrics_file, bar, warned)
            per_it = (run.train_s - train_s0) / (it - start)
            if cfg.time_budget:  # the bar's total and ETA follow whichever of --iters / --time-budget ends first
                bar.total = min(cfg.iters, it + math.ceil(max(0.0, 60 * cfg.time_budget - run.train_s) / per_it))
                bar.refresh()
            if it == start + 1:  # the first iteration gives the estimate of the whole run
                procs.say(f"paw: an iteration took {per_it:.0f} s, {(bar.total - it) * per_it / 60:.0f} min of RL left")
            if checkpoint and cfg.save_every and it % cfg.save_every == 0:
                checkpoint(run, it)
            # every process stops at the same iteration (the slowest one's clock decides)
            if cfg.time_budget and procs.reduce([run.train_s], "max")[0] > 60 * cfg.time_budget:
                procs.say(f"time budget of {cfg.time_budget} min reached after {it} iterations")
                break
    return it, False

def remaining_fraction(it: int, iters: int, train_s: float, budget_min: float) -> float:
    """--anneal-lr's factor: the share of the run ahead at iteration `it` (1-based), by iterations or by the clock."""
    return max(0.0, 1.0 - max((it - 1) / iters, train_s / (60 * budget_min) if budget_min else 0.0))

def strict_json(m: dict) -> tuple[dict, list]:
    """NaN/inf -> null (metrics.jsonl stays strict JSON) and the names of the metrics that were not finite."""
    bad = [k for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)]
    return {k: (None if k in bad else v) for k, v in m.items()}, bad

def report_iteration(run: Run, m: dict, metrics_file, bar, warned: bool) -> bool:
    """A metrics.jsonl line (non-finite: null, then stop), the bar, a collapse warning once. -> warned yet?"""
    m, bad = strict_json(m)
    bar.set_description_str("PaW")
    if metrics_file:
        print(json.dumps(m), file=metrics_file, flush=True)
    if bad:
        raise RunError(f"non-finite {', '.join(bad)} at iteration {m['iter']} (written as null in metrics.jsonl)", 1)
    bar.set_postfix(succ=f"{m['success']:.2f}", **({} if run.fmt.mask else dict(valid=f"{m['valid_ratio']:.2f}")),
                    **({} if m["wm_token_acc"] is None else dict(wm_acc=f"{m['wm_token_acc']:.2f}")),
                    **({} if "action_entropy" not in m else dict(ent=f"{m['action_entropy']:.2f}")))
    if not warned and (m["approx_kl"] > 1.0 or (not run.fmt.mask and m["iter"] > 1 and m["valid_ratio"] < 0.05)):
        run.procs.say(f"paw: warning: collapse? approx KL {m['approx_kl']:.3g}, valid {m['valid_ratio']:.2f}; lower --lr")
        return True
    return warned

def evaluate(model, tok, env_cls, fmt: PromptFormat, n: int, greedy: bool = True, procs: Processes = Processes(),
             batch: int = 64) -> dict:
    """episode_stats on held-out seeds (EVAL_SEED_START on; under torchrun each process plays its share)."""
    seeds = [paw_envs.EVAL_SEED_START + i for i in range(n)][procs.rank::procs.n]
    episodes = [e for i in range(0, len(seeds), batch)
                for e in collect_rollouts(model, tok, env_cls, seeds[i:i + batch], 1, fmt, greedy)]
    return episode_stats(procs.episodes(episodes))

def print_eval_table(rows: dict):
    """Policies x metrics, then success per task type (environments that report info["task_type"])."""
    cell = lambda r, k: f"{r[k]:>13.3f}" if k in r else f"{'-':>13}"  # noqa: E731
    cols = ["success", "return", "episode_len", "valid_ratio", "format_valid_ratio", "loop_share"]
    print(f"\n{'policy':<26}" + "".join(f"{c.replace('_ratio', '').replace('_share', 's'):>13}" for c in cols))
    for name, r in rows.items():
        print(f"{name:<26}" + "".join(cell(r, c) for c in cols))
    types = sorted({k for r in rows.values() for k in r if k.startswith("success/")})
    if types:
        print(f"\n{'success per task type':<26}" + "".join(f"{n[:12]:>13}" for n in rows))
    for t in types:
        print(f"{t[len('success/'):]:<26}" + "".join(cell(r, t) for r in rows.values()))

# Appendix: engineering (skip on a first read). Nothing below changes the method. ##################################

# ==== A1. The fused loss path: chunked lm_head -> per-token log-prob and entropy, never the full logits.
#     Select first (only positions that enter a loss), project second (the model's own output embedding,
#     so tied embeddings keep working). The kernels are plain PyTorch; torch.compile fuses them.
def _upcast(x):
    """Reductions run in at least fp32 (bf16/fp16 logits are upcast; fp32/fp64 stay as they are)."""
    return x.float() if x.element_size() < 4 else x

def _chunk_forward(h, W, t):
    """One chunk: logits = h W^T -> log-sum-exp -> target gather -> entropy (at least fp32)."""
    z = _upcast(h @ W.t())
    lse, zt = torch.logsumexp(z, dim=-1), z.gather(1, t[:, None]).squeeze(1)
    logp_all = z - lse[:, None]
    ent = -(torch.exp(logp_all) * logp_all).sum(-1)  # not lse - sum(p z): that cancels badly in fp32
    is_argmax = zt >= z.max(dim=-1).values
    return zt - lse, ent, lse, is_argmax

def _chunk_backward(h, W, t, lse, ent, g_logp, g_ent, with_entropy: bool):
    """Recompute the chunk's logits; dZ = g_logp (onehot - p) - g_H p (z - lse + H); return (dh, dW)."""
    z = _upcast(h @ W.t())
    p = torch.exp(z - lse[:, None])
    dz = (-g_logp[:, None] * p).scatter_add(1, t[:, None], g_logp[:, None])
    if with_entropy:
        dz = dz - g_ent[:, None] * p * (z - lse[:, None] + ent[:, None])
    dz = dz.to(h.dtype)
    return dz @ W, dz.t() @ h

@functools.cache
def _kernel(name: str, backend: str):
    """The chunk kernels, compiled once per backend with static shapes (the last chunk is padded)."""
    fn = {"fwd": _chunk_forward, "bwd": _chunk_backward}[name]
    return fn if backend == "off" else torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)

# Below this vocabulary (and without compile) the fused path takes the full logits of the gathered loss
# positions only (at most ~8k x the positions of a slice: tens of MB) instead of running the chunked kernel.
GATHERED_LOGITS_MAX_VOCAB = 8192

def default_chunk(vocab: int) -> int:
    """A power of two so one chunk's logits tile holds about 2^26 values (256 MB in fp32), in [16, 4096]."""
    return int(min(4096, max(16, 2 ** int(math.log2(max(1, (1 << 26) // vocab))))))

class FusedLinearLogpEntropy(torch.autograd.Function):
    """logp_i = log softmax(h_i W^T)[t_i] and H_i = entropy(softmax(h_i W^T)), chunk by chunk.
    Saved for backward: h, W, targets and O(N) floats (lse, H); nothing of size N x V."""

    @staticmethod
    def forward(ctx, h, W, targets, chunk: int, backend: str):
        ctx.dtypes, amp = (h.dtype, W.dtype), torch.is_autocast_enabled(h.device.type)
        if amp:  # autocast's choice for a matrix product, made explicit: backward runs outside autocast
            h, W = (x.to(torch.get_autocast_dtype(h.device.type)) for x in (h, W))
        N, n_pad = h.shape[0], (-h.shape[0]) % chunk  # the last chunk padded: static shapes for torch.compile
        hp, tp = F.pad(h, (0, 0, 0, n_pad)), F.pad(targets, (0, n_pad))
        outs = [_kernel("fwd", backend)(hp[i:i + chunk], W, tp[i:i + chunk]) for i in range(0, N + n_pad, chunk)]
        logp, ent, lse, is_argmax = (torch.cat(x)[:N] for x in zip(*outs))
        ctx.save_for_backward(h, W, targets, lse, ent)
        ctx.chunk, ctx.backend = chunk, backend
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(is_argmax)
        return logp, ent, is_argmax

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_hit):
        h, W, targets, lse, ent = ctx.saved_tensors
        N, chunk, n_pad = h.shape[0], ctx.chunk, (-h.shape[0]) % ctx.chunk
        with_entropy = g_ent is not None  # the entropy term only when entropy needs a gradient
        g_logp, g_ent = (torch.zeros_like(lse) if g is None else g.to(lse.dtype) for g in (g_logp, g_ent))
        hp, tp = F.pad(h, (0, 0, 0, n_pad)), F.pad(targets, (0, n_pad))
        lp, ep, gl, ge = (F.pad(x, (0, n_pad)) for x in (lse, ent, g_logp, g_ent))
        dh = torch.empty_like(hp)
        dW = torch.zeros(W.shape, dtype=_upcast(W[:1]).dtype, device=W.device)  # accumulate in >= fp32
        for i in range(0, N + n_pad, chunk):
            c = slice(i, i + chunk)
            dh[c], dW_c = _kernel("bwd", ctx.backend)(hp[c], W, tp[c], lp[c], ep[c], gl[c], ge[c], with_entropy)
            dW += dW_c
        return dh[:N].to(ctx.dtypes[0]), dW.to(ctx.dtypes[1]), None, None, None

def fused_logp_entropy(h, W, targets, chunk: int = 0, backend: str = "off"):
    """Per-token (logp, entropy, target-is-argmax) of the linear head W on hidden states h [N, d]."""
    if h.shape[0] == 0:
        return TokenStats(*(h.new_zeros(0, dtype=dt) for dt in (torch.float32, torch.float32, torch.bool)))
    return TokenStats(*FusedLinearLogpEntropy.apply(h, W, targets, chunk or default_chunk(W.shape[0]), backend))

def head_logp_fn(fused_loss: bool, vocab: int, compile: str = "auto", chunk: int = 0):
    """action_and_obs_logprobs' logp_fn: None (no --fused-loss), linear_head_logp (small vocabulary), or the kernel."""
    backend = compile if compile != "auto" else ("inductor" if vocab >= 32768 else "off")
    if not fused_loss:
        return None
    if backend == "off" and vocab < GATHERED_LOGITS_MAX_VOCAB:
        return linear_head_logp  # small vocabulary: plain autograd over these logits beats the chunk loop
    return functools.partial(fused_logp_entropy, chunk=chunk, backend=backend)

def plain_linear_head(model) -> tuple[bool, str]:
    """Are the logits exactly hidden @ W^T (no bias, soft-capping or scaling)? By config and numerically."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return False, f"the output head ({type(head).__name__}) is not an nn.Linear without bias"
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        v = getattr(model.config, attr, None)
        if v not in (None, 0, 1, 0.0, 1.0):
            return False, f"config.{attr} = {v} changes the logits"
    ids = torch.arange(min(8, model.config.vocab_size), device=head.weight.device)[None]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    ref, mine = out.logits[0].float(), (out.hidden_states[-1][0] @ head.weight.t()).float()
    if not torch.allclose(ref, mine, atol=1e-3 * (1 + ref.abs().max().item()), rtol=1e-3):
        return False, "the logits differ from last_hidden_state @ W^T (a scaled or wrapped head)"
    return True, ""

# ==== A2. The tiny model, its tokenizer, and Hugging Face models
SPECIALS = dict(pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")

def gather_env_text(env_cls, n_episodes: int = 0, seed: int = 0):
    """-> (texts, actions) for the tokenizer: envs.env_text (random play, vocabulary), the prompts' own words."""
    texts, actions = paw_envs.env_text(env_cls, n_episodes, seed)
    texts += [build_prompt("task", [("obs", "act")] * n, "obs", ["a", "b"], 1, layout)
              for layout in ("full", "compact") for n in range(env_cls.max_steps + 1)]
    return texts + actions, actions

def build_tiny_tokenizer(texts: list[str], actions: list[str] = ()):
    """A word-level tokenizer of the environment's text (actions are words + EOS), loadable with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS.values()), show_progress=False)
    tk.train_from_iterator(list(texts) + list(actions), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, padding_side="left", **SPECIALS)

def build_tiny_model(tok, d_model: int = 96, n_layers: int = 3, n_heads: int = 4):
    """A randomly initialised Llama decoder, small enough for a laptop CPU (not Qwen2: transformers 5 reloads
    a qwen2 checkpoint's tokenizer as the byte-level Qwen2Tokenizer, mis-tokenizing our word-level one)."""
    mcfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads // 2 if n_heads % 2 == 0 else n_heads,
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True, attention_bias=True)
    return transformers.LlamaForCausalLM(mcfg)

def load_hf_model(name: str, with_tokenizer: bool = True):
    """Any Hugging Face causal LM (hub id, local folder, or a .gguf file, dequantized) and its tokenizer, the weights
    in float32: they are the master weights (--dtype bfloat16 computes in bf16 under autocast, bf16_autocast)."""
    path, gguf = os.path.expanduser(name), name.endswith(".gguf")
    if not (os.path.isfile(path) if gguf else os.path.isdir(path) or not name.startswith((os.sep, ".", "~"))):
        raise ConfigError(f"--model {name}: no such {'file' if gguf else 'folder'}")
    if gguf and (missing := [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]):
        raise ConfigError(f"--model {name}: loading a .gguf file needs `pip install {' '.join(missing)}`")
    where, kw = (os.path.dirname(os.path.abspath(path)), dict(gguf_file=os.path.basename(path))) if gguf else (path, {})
    try:
        tok = transformers.AutoTokenizer.from_pretrained(where, **kw) if with_tokenizer else None
        model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
        if gguf:  # dequantized but still marked quantized (save_pretrained refuses it): its weights in a plain model
            del model.config.quantization_config
            plain = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
            plain.load_state_dict(model.state_dict())
            plain.generation_config, model = model.generation_config, plain
    except Exception as e:  # noqa: BLE001 - report any loading failure as one line
        what = " ".join(str(e).split())[:300]
        raise ConfigError(f"cannot load --model {name!r} (causal LM + tokenizer): {type(e).__name__}: {what}") from None
    if tok is not None:
        tok.pad_token, tok.padding_side = tok.pad_token or tok.eos_token, "left"
    return tok, model

def disable_dropout(model):
    """Dropout off for good, as TRL does: with it, the update's log-probs (train mode) differ from the rollout's."""
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if (k == "p" and isinstance(m, nn.Dropout)) or ("dropout" in k and isinstance(v, float)):
                setattr(m, k, 0.0)
    return model

# ==== A3. The think format for chat models: prompt, chat template, response -> action
def make_prompt_format(tok, model, cfg: Config) -> PromptFormat:
    """think (forced, or auto for a --model with a chat template); stop at every EOS of tokenizer and model."""
    chat = getattr(tok, "chat_template", None) is not None
    think = cfg.prompt_format == "think" or (cfg.prompt_format == "auto" and bool(cfg.model) and chat)
    prefilled = think and chat and tok.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False).rstrip().endswith("<think>")
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])} - {None}
    budget = cfg.max_action_tokens or (256 if think else 8)
    mask = cfg.action_mask == "on" or (cfg.action_mask == "auto" and not think)
    if mask and think:
        raise ConfigError("--action-mask on needs --prompt-format plain (a think response is free text)")
    return PromptFormat(think, chat and think, prefilled, sorted(stop), budget, mask, *agent_interface(cfg)[:2],
                        cfg.temperature, behaviour_score_limit(cfg.rescore, cfg.dtype), cfg.dtype)

def agent_interface(cfg: Config, env_cls=None) -> tuple[str, int, str]:
    """-> (prompt layout, K, goal names), 'auto' decided: the tiny model gets what it learns fastest (docs/method.md,
    "Agent interface"), the env's layout and abstract names; a --model reads the full, named text, as in the paper."""
    env_cls = env_cls or paw_envs.ENVS.get(cfg.env)
    layout = cfg.prompt_layout if cfg.prompt_layout != "auto" else (
        "full" if cfg.model else getattr(env_cls, "prompt_layout", "compact"))
    names = cfg.goal_names if cfg.goal_names != "auto" else (
        "abstract" if not cfg.model and callable(getattr(env_cls, "goal_names", None)) else "named")
    return layout, cfg.history if cfg.history >= 0 else (1 if layout == "full" else 2), names

# ==== A4. The language prior (paw's addition, tiny model only; docs/method.md, "Language prior")
def language_prior(model, tok, env_cls, cfg: Config, rng: random.Random, logprobs=action_and_obs_logprobs) -> dict:
    """Next-token training on observations alone (BOS o EOS, no action anywhere): the language of the environment,
    not its dynamics, as a real LLM knows it, so CMAE's gradient p(1-p) (§2.2) is not ~0 at the start."""
    if cfg.prior_steps == 0:
        return {}
    t0, texts = time.time(), paw_envs.random_observations(env_cls, cfg.prior_steps * cfg.prior_batch, rng)
    rng.shuffle(texts)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.prior_lr, weight_decay=0.0)
    model.train()
    log = []  # (loss, token accuracy) per step
    for step in tqdm(range(cfg.prior_steps), desc="language prior", leave=False, dynamic_ncols=True,
                     disable=world()[0] != 0):
        batch = ids[step * cfg.prior_batch:(step + 1) * cfg.prior_batch]
        steps = [Step(prompt_ids=bos, action_ids=[], obs_ids=x[:4 * cfg.wm_max_tokens] + [tok.eos_token_id],
                      reward=0.0, valid=True, anchor="") for x in batch]
        for g in opt.param_groups:  # a short linear ramp avoids an early blow-up
            g["lr"] = cfg.prior_lr * min(1.0, (step + 1) / 20)
        obs = logprobs(model, pack_steps(steps)).obs
        loss = -obs.logp.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append((loss.item(), obs.is_argmax.float().mean().item()))
    loss, acc = (float(np.mean(x)) for x in zip(*log[-20:]))
    return dict(prior_loss=loss, prior_token_acc=acc, prior_s=time.time() - t0)

# ==== A5. Several processes (torchrun, DistributedDataParallel)
class DistributedTrunk(nn.Module):
    """What DDP wraps: the LM, with the forward action_and_obs_logprobs needs (the fused head is applied outside)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, fused: bool, with_head_input: bool):
        return self.lm.get_decoder()(input_ids=ids).last_hidden_state if fused else self.lm(
            input_ids=ids, output_hidden_states=with_head_input)

def world() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) unless started by torchrun."""
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)

def distributed_backend(device: str, procs_per_node: int, n_gpus: int) -> str:
    """NCCL with one GPU per process, else Gloo on CPU (more processes than GPUs: an error for an explicit cuda)."""
    if device in ("cpu", "mps") or n_gpus == 0 or (procs_per_node > n_gpus and device == "auto"):
        return "gloo"
    if procs_per_node > n_gpus:
        raise ConfigError(f"--device {device}: torchrun starts {procs_per_node} processes per node but {n_gpus} GPU(s) "
                          f"are visible (use --nproc_per_node {n_gpus}, or --device cpu)")
    return "nccl"

def init_distributed(cfg: Config) -> tuple[int, int]:
    """Under torchrun: NCCL with one GPU per process, or Gloo on CPU; whole groups per process (--groups divides)."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n == 1:
        return 0, 1
    if cfg.groups % n:
        raise ConfigError(f"--groups {cfg.groups} must be a multiple of the {n} processes (a group never spans two)")
    n_gpus, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", "0"))  # 0 GPUs without CUDA
    backend = distributed_backend(cfg.device, int(os.environ.get("LOCAL_WORLD_SIZE", n)), n_gpus)
    if backend == "nccl":
        torch.cuda.set_device(local)
    elif cfg.device == "auto":
        if n_gpus and local == 0:
            print(f"paw: {n} processes, {n_gpus} GPU(s) visible: every process runs on CPU (Gloo)", file=sys.stderr)
        cfg.device = "cpu"
    torch.distributed.init_process_group(backend)
    return world()

class TorchrunProcesses(Processes):
    """Processes (part 7) under torchrun: the collectives of torch.distributed."""

    def __init__(self):
        self.rank, self.n = world()

    def reduce(self, values: list, op: str = "sum") -> list:
        d = torch.distributed
        dev = torch.device("cuda", torch.cuda.current_device()) if d.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)  # NCCL reduces on the GPU
        d.all_reduce(t, op=dict(sum=d.ReduceOp.SUM, max=d.ReduceOp.MAX, min=d.ReduceOp.MIN)[op])
        return t.tolist()

    def gather(self, obj) -> list:
        out = [obj] * self.n
        if self.n > 1:
            torch.distributed.all_gather_object(out, obj)
        return out

    def episodes(self, episodes: list) -> list:
        """Without prompts, observations or tensors (what episode_stats reads), cheap to send between processes."""
        strip = dict(prompt_ids=[], obs_ids=[], allowed=None, gen_logp=None, gen_entropy=None)
        slim = [dataclasses.replace(e, steps=[dataclasses.replace(s, **strip) for s in e.steps]) for e in episodes]
        return [e for part in self.gather(slim) for e in part]

    def share(self, it: int, batch: Batch) -> Batch:
        """Every process's rows, shuffled the same way everywhere, dealt round-robin (episode lengths differ)."""
        cols = zip(*[[getattr(b, f.name) for f in dataclasses.fields(Batch)] for b in self.gather(batch)])
        every = Batch(*[torch.cat(c) if torch.is_tensor(c[0]) else [x for part in c for x in part] for c in cols])
        order = list(range(len(every.steps)))
        random.Random(it).shuffle(order)  # the same order in every process
        return every.rows(order[self.rank::self.n])

# ==== A6. Checkpoints (atomic, the last two kept) and exact resume
CKPT_NAME = re.compile(r"iter-\d{6}")

def publish(tmp: str, final: str):
    """Atomic save: `tmp` was written in full; one os.rename makes it `final` (a kill never leaves half a folder)."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)

def save_checkpoint(run: Run, it: int, keep: int = 2) -> str:
    """checkpoints/iter-N (model, tokenizer, optimizer, every process's RNGs), published atomically; `keep` kept."""
    ranks = run.procs.gather(dict(rng=run.rng.getstate(), py_random=random.getstate(), numpy=np.random.get_state(),
                                  torch=torch.get_rng_state(),
                                  cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    if run.procs.rank != 0:
        return ""
    root = os.path.join(run.run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    for d in os.listdir(root):  # leftovers of a save that was killed
        if d.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    tmp, final = os.path.join(root, f".tmp-iter-{it:06d}"), os.path.join(root, f"iter-{it:06d}")
    for part in (run.model, run.tok):
        part.save_pretrained(os.path.join(tmp, "model"))
    if run.ref_model is not None:
        run.ref_model.save_pretrained(os.path.join(tmp, "ref_model"))
    torch.save(dict(iteration=it, optimizer=run.opt.state_dict(), ranks=ranks, summary=run.summary,
                    train_s=run.train_s), os.path.join(tmp, "trainer.pt"))
    publish(tmp, final)
    for d in sorted(d for d in os.listdir(root) if CKPT_NAME.fullmatch(d))[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final

def save_or_warn(run: Run, it: int):
    """A checkpoint that cannot be written (disk full, ...) costs one line, not the run (older ones stay intact)."""
    try:
        save_checkpoint(run, it)
    except (OSError, RuntimeError) as e:
        tqdm.write(f"paw: warning: checkpoint of iteration {it} not written: {' '.join(str(e).split())[:150]}")
        shutil.rmtree(os.path.join(run.run_dir, "checkpoints", f".tmp-iter-{it:06d}"), ignore_errors=True)

def find_checkpoint(path: str) -> str | None:
    """--resume's folder -> a checkpoint: itself, or a run folder's newest (None: none yet, start from its config)."""
    if os.path.isfile(os.path.join(path, "trainer.pt")):
        return path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"--resume {path}: not a paw run folder (no config.json)")
    root = os.path.join(path, "checkpoints")
    done = sorted(d for d in os.listdir(root) if CKPT_NAME.fullmatch(d)) if os.path.isdir(root) else []
    return os.path.join(root, done[-1]) if done else None

def load_checkpoint(ckpt: str):
    """-> (tokenizer, model, reference model or None, trainer state). A damaged folder is one clear error."""
    try:
        state = torch.load(os.path.join(ckpt, "trainer.pt"), map_location="cpu", weights_only=False)
        missing = {"iteration", "optimizer", "ranks", "summary", "train_s"} - set(state)
        if missing:
            raise ValueError(f"trainer.pt lacks {', '.join(sorted(missing))}")
        tok, model = load_hf_model(os.path.join(ckpt, "model"))
        has_ref = os.path.isdir(os.path.join(ckpt, "ref_model"))  # weights only: the tokenizer is model/'s
        ref = load_hf_model(os.path.join(ckpt, "ref_model"), with_tokenizer=False)[1] if has_ref else None
    except Exception as e:  # noqa: BLE001 - any damage (missing/truncated file) is reported in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"cannot resume from {ckpt}: damaged or incomplete ({type(e).__name__}: {msg[:200]})") from None
    return tok, model, ref, state

def resume_run(run: Run, state: dict, ckpt: str) -> int:
    """Continue exactly: optimizer, RNG streams, summary, clock, metrics.jsonl cut back. -> the checkpoint's iteration."""
    run.opt.load_state_dict(state["optimizer"])
    rngs = state["ranks"][run.procs.rank]
    run.rng.setstate(rngs["rng"])
    random.setstate(rngs["py_random"])
    np.random.set_state(rngs["numpy"])
    torch.set_rng_state(rngs["torch"])
    if rngs.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rngs["cuda"])
    run.summary, run.train_s, start = state["summary"], state["train_s"], state["iteration"]
    metrics_path, root = os.path.join(run.run_dir, "metrics.jsonl"), os.path.dirname(ckpt)
    for d in os.listdir(root) if run.procs.rank == 0 else []:  # the history this resume replaces: set aside
        if CKPT_NAME.fullmatch(d) and int(d[5:]) > start:
            os.rename(os.path.join(root, d), os.path.join(root, f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{d}"))
    if run.procs.rank == 0 and os.path.exists(metrics_path):
        kept = []
        for line in open(metrics_path):
            try:
                if json.loads(line).get("iter", 0) <= start:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except ValueError:
                print(f"paw: dropped a torn line of {metrics_path}")
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    run.procs.say(f"resuming from {ckpt} (iteration {start})")
    return start

# ==== A7. Command line and main
# flags a --resume may change: budget, evaluation, logging, and how (not what) is computed
RESUME_SAFE = {"iters", "time_budget", "eval_episodes", "eval_sampled", "eval_every", "eval_every_episodes",
               "save_every", "threads", "device", "resume", "compile", "micro_batch", "forward_batch",
               "loss_chunk", "fused_loss", "grad_checkpointing", "out", "name"}

class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):  # one line and a pointer to --help instead of a 30-line usage block
        print(f"paw.py: error: {message} (see python paw.py --help)", file=sys.stderr)
        sys.exit(2)

def parse_config(argv=None) -> Config:
    """argparse from the Config fields; with --resume the run's config.json gives the defaults (then e.g. --iters)."""
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           epilog="built-in environments: " + ", ".join(sorted(paw_envs.ENVS)) + ", or module:Class")
    target = None
    for f in dataclasses.fields(Config):  # a field with a `group` starts a --help section
        target = p.add_argument_group(f.metadata["group"]) if "group" in f.metadata or not target else target
        kw = (dict(action=argparse.BooleanOptionalAction) if f.type == "bool" else  # annotations are strings here
              dict(type={"int": int, "float": float, "str": str}[f.type], choices=f.metadata.get("choices")))
        target.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"], **kw)
    args = p.parse_args(argv)
    if args.resume:
        path = os.path.join(run_folder(args.resume), "config.json")
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--resume {args.resume}: cannot read {path} ({type(e).__name__})")
        known = {f.name for f in dataclasses.fields(Config)}
        saved = {**dict(prompt_layout="full", goal_names="named"), **saved}  # runs saved before these flags existed
        p.set_defaults(**{k: v for k, v in saved.items() if k in known and k != "resume"})
        args = p.parse_args(argv)
        # a resumed run keeps its environment, model, tokenizer and method; only these may change
        changed = [k for k in known - RESUME_SAFE if k in saved and vars(args)[k] != saved[k]]
        flags = lambda names: ", ".join("--" + k.replace("_", "-") for k in sorted(names))  # noqa: E731
        if changed:
            p.error(f"--resume {args.resume}: cannot change {flags(changed)} of a run "
                    f"(allowed: {flags(RESUME_SAFE - {'resume'})})")
    try:
        return Config(**vars(args))
    except ConfigError as e:
        p.error(str(e))

def pick_device(name: str) -> torch.device:
    try:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (try cpu, cuda, cuda:0)") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name!r}: paw trains on cpu, cuda or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:  # torchrun: process r on GPU LOCAL_RANK (DDP's device_ids need it)
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev

def run_folder(resume: str) -> str:
    """--resume's run folder: the folder itself, or the run of a checkpoint folder (<run>/checkpoints/iter-N)."""
    is_ckpt = os.path.isfile(os.path.join(resume, "trainer.pt"))
    return os.path.dirname(os.path.dirname(os.path.abspath(resume))) if is_ckpt else resume.rstrip("/")

def make_run_dir(cfg: Config, procs: Processes) -> str:
    """The run folder, checked writable, never an old run's (under torchrun process 0 makes it)."""
    run_dir, error = run_folder(cfg.resume), None
    if procs.rank == 0:
        if not cfg.resume:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = cfg.name or f"{paw_envs.env_slug(cfg.env)}-{cfg.algo}-{cfg.wm}-s{cfg.seed}-{stamp}"
            run_dir = os.path.join(cfg.out, name)
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                error = f"{run_dir} already holds a run; pick another --name or --resume it"
            elif os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
                error = f"--out {cfg.out} is a file, not a folder"
        try:
            if not error:
                os.makedirs(run_dir, exist_ok=True)
                open(os.path.join(run_dir, ".write-test"), "w").close()
                os.remove(os.path.join(run_dir, ".write-test"))
        except OSError as e:
            error = f"cannot write the run folder {run_dir}: {e.strerror}"
    run_dir, error = procs.gather((run_dir, error))[0]
    if error:
        raise ConfigError(error)
    return run_dir

def decide_defaults(cfg: Config, env_cls, dev: torch.device):
    """Every 'auto' decided, in cfg (config.json records what ran). -> the env class the agent plays."""
    cfg.prompt_layout, cfg.history, cfg.goal_names = agent_interface(cfg, env_cls)
    cfg.lr = cfg.lr or (1e-6 if cfg.model else 1e-3)
    if not cfg.threads and dev.type == "cpu" and not cfg.model:  # its tiny matrix products lose to thread wake-ups
        cfg.threads = 1
    if cfg.micro_batch < 0:  # a GPU holds a tiny model's whole minibatch; a CPU is faster in cache-sized slices
        cfg.micro_batch = 0 if dev.type == "cuda" and not cfg.model else 16
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if cfg.model and dev.type == "cuda" else "float32"
    if cfg.goal_names != "abstract":
        return env_cls
    if not callable(getattr(env_cls, "goal_names", None)):
        raise ConfigError(f"--goal-names abstract: {cfg.env} has no goal_names() (see envs.py)")
    return paw_envs.abstract_goal_names(env_cls)  # the task's names as placeholders, mapped back for the game

def print_plan(run: Run, dev, resuming: bool):
    cfg, fmt, say = run.cfg, run.fmt, run.procs.say
    n_params, n = sum(p.numel() for p in run.model.parameters()), torch.get_num_threads()
    threads = f" ({n} thread{'s' if n > 1 else ''})" if dev.type == "cpu" else ""
    say(f"paw: {cfg.env} | model {cfg.model or 'tiny Llama'} ({n_params / 1e6:.2f}M params, vocab {len(run.tok)}) "
        f"| {cfg.algo} + WM {cfg.wm} | prompt {'think' if fmt.think else f'plain {fmt.layout}, K={fmt.history}'}"
        f"{', goal names abstracted (OBJ, REC; --goal-names named for the names)' if cfg.goal_names == 'abstract' else ''}"
        f"{' (chat template)' if fmt.chat else ''}{', action mask' if fmt.mask else ''} | {cfg.groups} groups x "
        f"{cfg.group_size}, lr {cfg.lr:g}{' -> 0 (linear)' if cfg.anneal_lr else ''}, {cfg.dtype} | device {dev}{threads}"
        f"{f' x {run.procs.n} processes' if run.procs.n > 1 else ''} | run dir {run.run_dir}")
    pre = ["random-policy baseline"] + ([f"language prior ({cfg.prior_steps} steps)"]
                                        if not cfg.model and cfg.prior_steps else [])
    say(f"paw: plan: {' -> '.join(['resume'] if resuming else pre)} -> RL, {cfg.iters} iterations"
        f"{f' or {cfg.time_budget:g} min' if cfg.time_budget else ''} -> final evaluation ({cfg.eval_episodes} "
        f"held-out episodes). Ctrl-C stops early and keeps what was trained.")

def before_rl(run: Run) -> int:
    """A fresh run: random baseline, language prior, saved as iteration 0; per-process random streams. -> 0."""
    cfg = run.cfg
    if run.procs.rank == 0:
        open(os.path.join(run.run_dir, "metrics.jsonl"), "w").close()
    try:
        run.summary["random"] = paw_envs.random_policy_success(run.env_cls, cfg.eval_episodes)
        if not cfg.model and cfg.prior_steps:  # the language prior (appendix A4)
            run.summary["prior"] = language_prior(run.model, run.tok, run.env_cls, cfg, run.rng, run.logprobs)
    except KeyboardInterrupt:
        raise RunError(f"interrupted before RL; the run folder keeps config.json (rerun: --resume {run.run_dir})", 130)
    run.ref_model = copy.deepcopy(run.model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    run.train_s = time.time() - run.started_at
    if not cfg.model and cfg.prior_steps:  # keep the pre-RL work: --resume starts here
        save_or_warn(run, 0)
    if run.procs.rank:
        run.rng.seed(f"{cfg.seed}-{run.procs.rank}")
        torch.manual_seed(cfg.seed + 1000003 * run.procs.rank)
    return 0

def finish(run: Run, dev, interrupted: bool) -> dict:
    """The final held-out evaluation next to the random policy; <run>/model (published atomically), summary.json."""
    cfg, summary = run.cfg, run.summary
    try:
        for key, greedy in (("final_greedy", True), ("final_sampled", False))[:1 + cfg.eval_sampled]:
            summary[key] = evaluate(run.model, run.tok, run.env_cls, run.fmt, cfg.eval_episodes, greedy, run.procs)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted during the final evaluation: saving the model and summary without it", file=sys.stderr)
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin"
                                                                                 else 1024)  # MiB
    if dev.type == "cuda":
        summary["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if run.procs.rank != 0:
        return summary
    print_eval_table({"random (admissible)": summary["random"], **{name: summary[k] for k, name in (
        ("final_greedy", "trained (greedy)"), ("final_sampled", "trained (sampled)")) if k in summary}})
    try:
        tmp = os.path.join(run.run_dir, ".tmp-model")  # the final model + tokenizer, for AutoModelForCausalLM
        shutil.rmtree(tmp, ignore_errors=True)
        for part in (run.model, run.tok):
            part.save_pretrained(tmp)
        publish(tmp, os.path.join(run.run_dir, "model"))
        with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
            json.dump(strict_json(summary)[0], f, indent=1)
    except (OSError, RuntimeError) as e:
        raise RunError(f"could not save the final model to {run.run_dir}: {' '.join(str(e).split())[:200]}", 1)
    print(f"\nsaved: {run.run_dir}/ (config.json, metrics.jsonl, summary.json, model/"
          f"{', checkpoints/' if os.path.isdir(os.path.join(run.run_dir, 'checkpoints')) else ''})")
    summary["interrupted"] = interrupted  # main's caller exits 130, the convention for Ctrl-C; all above is saved
    return summary

def start_run(cfg: Config):
    """Everything before training, fastest failures first. -> (run, device, checkpoint, trainer state or None)."""
    procs = TorchrunProcesses() if init_distributed(cfg)[1] > 1 else Processes()
    env_cls, dev = paw_envs.load_env_class(cfg.env), pick_device(cfg.device)
    env_cls, ckpt = decide_defaults(cfg, env_cls, dev), find_checkpoint(cfg.resume) if cfg.resume else None
    run_dir = make_run_dir(cfg, procs)
    if cfg.resume and ckpt is None:
        procs.say(f"paw: {run_dir} has no complete checkpoint yet: starting it again from its saved config")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    transformers.utils.logging.disable_progress_bar()  # its loading/saving bars would break the training bar's line
    transformers.set_seed(cfg.seed)  # python, numpy and torch
    started_at, ref_model, state = time.time(), None, None
    try:
        if ckpt:
            tok, model, ref_model, state = load_checkpoint(ckpt)
            if len(state["ranks"]) != procs.n:
                raise ConfigError(f"trained with {len(state['ranks'])} process(es): resume with as many, not {procs.n}")
        elif cfg.model:
            tok, model = load_hf_model(cfg.model)
        else:
            tok = build_tiny_tokenizer(*gather_env_text(env_cls, seed=cfg.seed))
            model = build_tiny_model(tok, cfg.d_model, cfg.n_layers, cfg.n_heads)
        fmt = make_prompt_format(tok, model, cfg)
    except KeyboardInterrupt:
        raise RunError("interrupted while building the model; nothing to save", 130)
    disable_dropout(model).to(dev)
    if ref_model is not None:
        ref_model.to(dev).eval().requires_grad_(False)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    if cfg.fused_loss and (why := plain_linear_head(model)[1]):  # decided once, recorded in config.json
        warnings.warn(f"fused loss path disabled: {why}; using the naive full-logits path")
        cfg.fused_loss = False
    if procs.rank == 0:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    logp_fn = head_logp_fn(cfg.fused_loss, model.get_output_embeddings().weight.shape[0], cfg.compile, cfg.loss_chunk)
    run = Run(cfg, env_cls, tok, model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0),
              random.Random(cfg.seed), fmt, run_dir, ref_model, started_at=started_at, procs=procs,
              logprobs=bf16_autocast(dev, cfg.dtype)(functools.partial(action_and_obs_logprobs,
                                                                       temperature=cfg.temperature, logp_fn=logp_fn)))
    print_plan(run, dev, state is not None)
    return run, dev, ckpt, state

def main(argv=None):
    run, dev, ckpt, state = start_run(parse_config(argv))
    # a fresh run: random baseline and language prior; exact resume: optimizer, every RNG, metrics up to the checkpoint
    start = before_rl(run) if state is None else resume_run(run, state, ckpt)
    if run.procs.n > 1:  # DDP starts from process 0's weights and all-reduces the gradients of every update
        run.trainer = nn.parallel.DistributedDataParallel(
            DistributedTrunk(run.model), device_ids=[dev.index] if dev.type == "cuda" else None)
    it, interrupted = train(run, start, checkpoint=save_or_warn)
    run.summary.update(iters_done=it, train_s=run.train_s)
    summary = finish(run, dev, interrupted)
    if run.procs.n > 1:  # DDP's reducer holds the process group: free both while Python is whole, then leave together
        run.trainer = None
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary

if __name__ == "__main__":  # the only place that exits: every error below is one line and an exit code
    try:
        sys.exit(130 if main().get("interrupted") else 0)
    except (RunError, ConfigError, paw_envs.EnvError, paw_envs.EnvFailure) as e:  # config and metrics stay on disk
        code = getattr(e, "code", 1 if isinstance(e, paw_envs.EnvFailure) else 2)  # 1: a bug in the environment
        print(f"\npaw: {e}" if code == 130 else f"paw.py: error: {e}", file=sys.stderr)
        sys.exit(code)
