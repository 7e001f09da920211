"""The batch-size study: the paper's Fig. 1a (loss against batch size, per optimizer), Fig. 3
and 4 (Adam's β2 at small batch), the robustness claim and the gradient-accumulation comparison.

    python -m experiments.batch_size_study     # about 20 min on 2 CPU cores: out/study/

Every (optimizer setting, batch size) cell trains the same token budget at four peak learning
rates a factor 2 apart, centred on its best; then B = 1, the largest B, and the largest B
accumulated from micro-batches of 1 are compared. Writes <out>/study.md, study.json and (with
matplotlib) study.png; Ctrl-C keeps the finished runs. Design and results: experiments/README.md.
"""
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import data
import model
import optim
import train

STUDY_MODEL = model.Config(V=4_096, D=64, L=2, H=1, T=32)   # about 20 min on a 2-core CPU
STUDY_TOKENS = 204_800        # every run's budget: 6,400 steps at B = 1, 100 at B = 64
STUDY_BATCHES = (1, 4, 16, 64)
STUDY_MAX_SHIFTS = 3          # a cell's grid moves at most this often to bracket its best rate
# name: (optimizer, β2, the rates tried at B = 1). β2 "t2" holds the half-life fixed in tokens
# (Fig. 3 and 4) at the one β2 = 0.95 has at the largest batch: the two adam rows start from the
# same large-batch setting and part as the batch shrinks.
STUDY_SETTINGS = {
    "sgd": ("sgd", None, (0.25, 0.5, 1.0, 2.0)),
    "adam, t2 fixed": ("adam", "t2", (1e-3, 2e-3, 4e-3, 8e-3)),
    "adam, b2 = 0.95": ("adam", 0.95, (5e-4, 1e-3, 2e-3, 4e-3)),
    "adafactor": ("adafactor", "t2", (1e-2, 2e-2, 4e-2, 8e-2)),
    "muon": ("muon", "t2", (5e-3, 1e-2, 2e-2, 4e-2)),
}
SINGLE = " (single run)"      # the accumulation comparison's runs: timed alone, not as lanes


def train_lanes(cfg, opt, lrs, batch, n_steps, train_tokens, val_tokens, seed, grad_accum=1):
    """Train one run per peak learning rate in lrs, in lockstep on the same batches from the same
    initialization (jax.vmap over the rates): (final validation losses, seconds, step memory).
    The step and its calls of K steps are train.py's, so a lane is exactly `python train.py` at
    that --lr, unlogged. Seconds: the compiled calls' wall time (no compilation, no evaluation).
    Step memory: XLA's estimate of a call's temporaries (activations and the like)."""
    lanes = lambda tree: jax.tree.map(lambda a: jnp.repeat(a[None], len(lrs), axis=0), tree)
    params = model.init_params(jax.random.fold_in(jax.random.key(seed), 0), cfg)   # train.py's
    params, opt_state, stats = lanes(params), lanes(opt.init(params)), lanes(train.new_stats())
    lrs = jnp.asarray(lrs, jnp.float32)
    program = (cfg, opt, len(lrs), batch, n_steps, grad_accum)   # opt: study_optimizer's, cached
    if program not in COMPILED:      # once per program: the grid's moves reuse it
        step_fn = train.make_train_step(cfg, opt, n_steps, warmup=0.05, grad_accum=grad_accum)
        COMPILED[program] = train.compile_calls(   # lanes: one step, one batch, their own rates
            jax.vmap(step_fn, in_axes=(0, 0, 0, None, None, None, 0)),
            (params, opt_state, stats, np.int32(0), lrs), (batch, cfg.T), n_steps,
            steps_per_call=math.gcd(n_steps, 256))   # it divides the study's steps: 256 to 4
    call, n = COMPILED[program]                   # calls of n steps each
    step_bytes, t0 = call(n).memory_analysis().temp_size_in_bytes, time.time()   # one call's
    for step in range(0, n_steps, n):
        xs = data.get_batch(train_tokens, step, batch, cfg.T, seed, steps=n)
        params, opt_state, stats = call(n)(params, opt_state, stats, np.int32(step), *xs, lrs)
    jax.block_until_ready(params)
    seconds, val_xy = time.time() - t0, map(jnp.asarray, data.val_batches(val_tokens, cfg.T))
    return [float(l) for l in evaluate_lanes(params, *val_xy, cfg)], seconds, step_bytes


COMPILED = {}   # train_lanes' calls of K steps by program; its evaluation compiles once per lanes
evaluate_lanes = jax.jit(jax.vmap(train.evaluate, in_axes=(0, None, None, None)), static_argnums=3)


def study_cell(run, grid):
    """Train a cell's four rates, then move the grid a factor 2 at a time (training the one new
    rate) while its best loss sits at an edge; the four rates around the best are reported.
    run(lrs) -> losses. Returns (grid, {lr: loss} of every rate tried)."""
    tried = dict(zip(grid, run(grid)))
    for _ in range(STUDY_MAX_SHIFTS):
        best = best_of([tried[lr] for lr in grid])
        if 0 < best < len(grid) - 1:
            break
        new = grid[0] / 2 if best == 0 else grid[-1] * 2
        if new not in tried:
            tried[new] = run([new])[0]
        grid = sorted([new, *grid])[:-1] if best == 0 else sorted([*grid, new])[1:]
    return grid, tried


def best_of(losses):
    return int(np.argmin([math.inf if l is None else l for l in losses]))   # None: diverged


def fmt_loss(loss):
    return "diverged" if loss is None else f"{loss:.3f}"


@functools.cache    # the same optimizer object each time: train_lanes' compiled calls are reused
def study_optimizer(setting, batch, cfg, t2):
    """(optimizer, β2) of one study row at one batch size: train.py's at its default flags but for
    β2 (adam's β1 0.9, sgd no momentum; muon's embeddings at adam-lr / lr of the lane's rate)."""
    name, b2, _ = STUDY_SETTINGS[setting]
    b2 = optim.beta_from_halflife(t2, batch * cfg.T) if b2 == "t2" else b2
    flags = train.settings(train.common_flags(), ["--opt", name]
                           + ([] if b2 is None else ["--b2", repr(b2)]))   # repr: exact
    return train.make_optimizer(flags, batch * cfg.T, heads=cfg.H)[0], b2


def main(argv=None):
    p = train.Parser(prog="python -m experiments.batch_size_study",
                     description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(model.PRESETS), help="a model preset instead of the "
                   "study's CPU model (V=4096 D=64 L=2 H=1 T=32, with a compact vocabulary)")
    p.add_argument("--tokens", type=train.count, help=f"tokens per run (default {STUDY_TOKENS:,})")
    p.add_argument("--data", default=os.path.relpath(data.DEFAULT_TEXT), help="text or .bin files")
    p.add_argument("--seed", type=int, default=0, help="seeds initialization and data order")
    p.add_argument("--out", default="out/study", help="output folder (default out/study)")
    args, _ = train.parse_args(p, argv)
    command = " ".join([p.prog] + (sys.argv[1:] if argv is None else argv))
    t_start, out, budget = time.time(), Path(args.out), args.tokens or STUDY_TOKENS
    cfg = model.PRESETS[args.model] if args.model else STUDY_MODEL
    train_tokens, val_tokens = train.load_data(args, cfg.T, max(STUDY_BATCHES))
    if cfg.V <= data.EOT:                       # the study's CPU model: a compact vocabulary
        train_tokens, val_tokens = data.compact_vocab(train_tokens, val_tokens, cfg.V)
    big_step = max(STUDY_BATCHES) * cfg.T       # every batch size divides the largest, so
    if budget < big_step:                       # a multiple of its step is the same for all
        raise train.UsageError(f"--tokens {budget:,} is less than one step at batch "
                               f"{max(STUDY_BATCHES)} ({big_step:,} tokens); the study needs at "
                               "least that.")
    budget -= budget % big_step
    t2 = optim.halflife_from_beta(0.95, max(STUDY_BATCHES) * cfg.T)
    config = {"model": dataclasses.asdict(cfg), "tokens": budget, "batches": STUDY_BATCHES,
              "settings": STUDY_SETTINGS, "t2": t2, "seed": args.seed, "warmup": "int(0.05 N)",
              "data_sha256": data.fingerprint(train_tokens, val_tokens)}
    config = json.loads(json.dumps(config))     # tuples as lists, as they come back from a file
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "study.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
    except OSError as e:
        raise train.UsageError(f"--out {out} cannot be written ({e.strerror}).") from None
    except ValueError:
        raise train.UsageError(f"{out}/study.json is not a study's JSON file; pass another --out "
                               "or remove it.") from None
    if previous.get("runs") and previous.get("config") != config:   # never overwrite a result
        raise train.UsageError(f"{out}/study.json holds a study with other settings (model, "
                               "tokens, data or seed); pass another --out, or remove it to start "
                               "over.")
    # runs of an earlier (interrupted or finished) study with the same settings are reused
    runs = previous.get("runs", [])
    done = {(r["setting"], r["batch"], r["grad_accum"], r["lr"]): r for r in runs}
    result = {"command": command, "config": config, "runs": runs, "reused": len(runs),
              "cells": {}, "accumulation": [],
              "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}, "
                        f"{os.cpu_count()} CPU cores)",
              "versions": {"python": platform.python_version(), "jax": jax.__version__}}
    def save():
        (out / "study.tmp.json").write_text(json.dumps(result, indent=1) + "\n")
        os.replace(out / "study.tmp.json", out / "study.json")   # whole, even on Ctrl-C
    def train_runs(row, batch, lrs, grad_accum=1):
        todo = [lr for lr in lrs if (row, batch, grad_accum, lr) not in done]
        if todo:
            opt, _ = study_optimizer(row.removesuffix(SINGLE), batch, cfg, t2)
            losses, seconds, step_bytes = train_lanes(
                cfg, opt, todo, batch, budget // (batch * cfg.T), train_tokens, val_tokens,
                args.seed, grad_accum)
            for lr, loss in zip(todo, losses):
                done[row, batch, grad_accum, lr] = {
                    "setting": row, "batch": batch, "grad_accum": grad_accum, "lr": lr,
                    "val_loss": loss if math.isfinite(loss) else None,   # None: diverged
                    "seconds": seconds, "lanes": len(todo), "step_temp_bytes": step_bytes}
                runs.append(done[row, batch, grad_accum, lr])
            save()
        return [done[row, batch, grad_accum, lr] for lr in lrs]
    vocab = "compact vocabulary" if cfg.V <= data.EOT else "GPT-2 vocabulary"
    print(f"study      {len(STUDY_SETTINGS)} optimizer settings x B = {STUDY_BATCHES}, 4 learning "
          f"rates each (more where a grid moves), {train.fmt_tokens(budget)} tokens per run")
    print(f"model      {cfg} ({vocab}); t2 = {train.fmt_tokens(t2)} tokens; results in {out}/")
    try:
        study_grid(result, cfg, budget, t2, train_runs, save, t_start)
        result["seconds"] = time.time() - t_start
        save()
        (out / "study.md").write_text(study_markdown(result))
        print(study_markdown(result))
        plot_study(result, out / "study.png")
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; {out}/study.json keeps the {len(runs)} finished "
                                "runs; run the same command again to go on from there") from None
    except OSError as e:
        raise train.UsageError(f"--out {out} cannot be written ({e.strerror}); {out}/study.json "
                               "keeps the finished runs.") from None
    print(f"wrote {out}/study.md and {out}/study.json in {result['seconds'] / 60:.1f} min")


def study_grid(result, cfg, budget, t2, train_runs, save, t_start):
    """Fill result's cells (every setting x batch size, each grid centred on its best rate)
    and its accumulation comparison; train_runs(row, batch, lrs, grad_accum) -> run records."""
    for setting, (_, _, first_grid) in STUDY_SETTINGS.items():
        grid = list(first_grid)
        result["cells"][setting] = cells = {}
        for batch in STUDY_BATCHES:
            t_cell = time.time()
            run = lambda lrs: [r["val_loss"] for r in train_runs(setting, batch, lrs)]
            grid, tried = study_cell(run, grid)
            losses = [tried[lr] for lr in grid]
            finite = [l for l in losses if l is not None]
            best = best_of(losses)
            best_lr = grid[best]
            cells[str(batch)] = {
                "grid": grid, "losses": losses, "best_lr": best_lr, "best_loss": tried[best_lr],
                "at_edge": best in (0, len(grid) - 1),   # after STUDY_MAX_SHIFTS moves
                "spread": max(finite) - min(finite) if finite else None,
                "diverged": len(losses) - len(finite), "b2": study_optimizer(
                    setting, batch, cfg, t2)[1], "tried": {str(lr): l for lr, l in tried.items()}}
            save()
            print(f"{setting:<16} B = {batch:<3} " + "  ".join(
                f"lr {lr:g}: {fmt_loss(l)}" for lr, l in zip(grid, losses)) +
                f"  | best {fmt_loss(tried[best_lr])} | {time.time() - t_cell:.0f} s, "
                f"{(time.time() - t_start) / 60:.1f} min so far")
            grid = [best_lr / 2, best_lr, best_lr * 2, best_lr * 4]   # the next, larger batch

    # Gradient accumulation, the paper's case against it: B = 1 against B = max at the same
    # tokens, with and without accumulation down to micro-batches of 1, each at its own best rate
    # from the grid above.
    setting, big = "adam, t2 fixed", max(STUDY_BATCHES)
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
    buffer = model.nbytes(jax.eval_shape(train.accumulation_buffer, shapes))
    for batch, k in [(1, 1), (big, 1), (big, big)]:
        lr = result["cells"][setting][str(batch)]["best_lr"]
        r = train_runs(setting + SINGLE, batch, [lr], grad_accum=k)[0]
        opt, _ = study_optimizer(setting, batch, cfg, t2)
        result["accumulation"].append({
            "batch": batch, "grad_accum": k, "lr": lr, "val_loss": r["val_loss"],
            "steps": budget // (batch * cfg.T), "seconds": r["seconds"],
            "params_bytes": model.nbytes(shapes),
            "opt_state_bytes": model.nbytes(jax.eval_shape(opt.init, shapes)),
            "buffer_bytes": buffer if k > 1 else 0,
            "step_temp_bytes": r["step_temp_bytes"]})
        print(f"accumulation  B = {batch} in {k} micro-batch{'es' * (k > 1)}: "
              f"loss {fmt_loss(r['val_loss'])}, steps {r['seconds']:.1f} s")


def study_markdown(result):
    """The study's tables, from study.json's dict."""
    c, cells = result["config"], result["cells"]
    settings, batches = list(cells), list(next(iter(cells.values())))
    head = ("| B | " + " | ".join(settings) + " |\n|---|" + "---|" * len(settings) + "\n")
    best = "".join(f"| {b} | " + " | ".join(
        f"{fmt_loss(cells[s][b]['best_loss'])} ({cells[s][b]['best_lr']:g}"
        + (", at the edge)" if cells[s][b]["at_edge"] else ")") for s in settings)
        + " |\n" for b in batches)
    if any(cells[s][b]["at_edge"] for s in settings for b in batches):
        best += (f"\n\"At the edge\": the best rate is still the grid's first or last after "
                 f"{STUDY_MAX_SHIFTS} moves; the cell's optimum may lie beyond it.\n")
    spread = "".join(f"| {b} | " + " | ".join(
        ("-" if cells[s][b]["spread"] is None else f"{cells[s][b]['spread']:.3f}")
        + (f" ({cells[s][b]['diverged']} diverged)" if cells[s][b]["diverged"] else "")
        for s in settings) + " |\n" for b in batches)
    mb = lambda n: f"{n / 1e6:.2f} MB"
    accum = "".join(
        f"| `--batch {a['batch']}" + (f" --grad-accum {a['grad_accum']}`" if a["grad_accum"] > 1
                                      else "`") + f" | {a['steps']:,} | {a['lr']:g} | "
        f"{fmt_loss(a['val_loss'])} | {mb(a['params_bytes'])} | {mb(a['opt_state_bytes'])} | "
        f"{mb(a['buffer_bytes'])} | "
        f"{mb(a['params_bytes'] + a['opt_state_bytes'] + a['buffer_bytes'])} | "
        f"{mb(a['step_temp_bytes'])} | {a['seconds']:.1f} s |\n" for a in result["accumulation"])
    every = "".join(f"| {s} | {b} | " + ", ".join(
        f"{float(lr):g}: {fmt_loss(l)}" for lr, l in sorted(
            cells[s][b]["tried"].items(), key=lambda kv: float(kv[0]))) + " |\n"
        for s in settings for b in batches)
    m = c["model"]
    vocab = (f" (the {m['V'] - 1:,} most frequent training tokens and one id for all others)"
             if m["V"] <= data.EOT else "")
    reused = (f" ({result['reused']} of {len(result['runs'])} runs reused from an earlier "
              f"invocation, not timed again)") if result["reused"] else ""
    return f"""# The batch-size study

`{result['command']}` on {result['device']}, JAX {result['versions']['jax']}: \
{result['seconds'] / 60:.1f} min{reused}. Model V={m['V']}{vocab} D={m['D']} L={m['L']} H={m['H']} \
T={m['T']}; \
every run trains {c['tokens']:,} tokens (warmup {c['warmup']} steps, cosine to 0) and is scored \
by its final validation loss. Adam's β1 = 0.9; "t2 fixed" sets β2 from a half-life of \
{c['t2']:,.0f} tokens, the half-life of β2 = 0.95 at B = {max(c['batches'])}.

Best final validation loss over each cell's learning rates (the best peak lr in brackets):

{head}{best}
Spread: the worst minus the best loss over the four learning rates, a factor 2 apart, around the \
best (a smaller spread: less sensitive to the learning rate):

{head}{spread}
Gradient accumulation: adam with t2 fixed, each run at its batch size's best lr from the grid. \
Held: parameters + optimizer state + accumulation buffer. Step temporaries: XLA's memory analysis \
of the compiled step (activations and other scratch). Time of the steps: the wall time of all the \
run's compiled steps, without compilation and evaluation.

| run | optimizer steps | lr | loss | parameters | optimizer state | accumulation buffer | \
held | step temporaries | time of the steps |
|---|---|---|---|---|---|---|---|---|---|
{accum}
Every run, peak lr: final validation loss:

| setting | B | runs |
|---|---|---|
{every}"""


def plot_study(result, path):
    """Loss against learning rate, one panel per optimizer setting and one line per batch size;
    skipped, with a note, when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (python -m pip install matplotlib)")
        return
    cells = result["cells"]
    finite = [c["best_loss"] for cell in cells.values() for c in cell.values()
              if c["best_loss"] is not None]
    if not finite:
        print("no plot: every run diverged")
        return
    fig, axes = plt.subplots(1, len(cells), figsize=(4 * len(cells), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (setting, cell) in zip(axes, cells.items()):
        for batch, c in cell.items():
            lrs = sorted(c["tried"], key=float)       # a diverged run (None) is drawn as a gap
            ax.plot([float(lr) for lr in lrs], [math.nan if c["tried"][lr] is None
                                                else c["tried"][lr] for lr in lrs],
                    "o-", label=f"B = {batch}")
        tried = sorted({float(lr) for c in cell.values() for lr in c["tried"]})
        ax.set(xscale="log", title=setting, xlabel="peak learning rate",
               ylim=(min(finite) - 0.1, max(finite) + 0.5))  # every best; far-off runs clipped
        ax.minorticks_off()
        ax.set_xticks(tried, [f"{lr:g}" for lr in tried], rotation=45, fontsize=8)
    axes[0].set_ylabel("final validation loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":     # outside the grid, Ctrl-C leaves study.json whole too
    sys.exit(train.run_program(main, interrupted="interrupted; run the same command again to "
                               "go on from there"))
