"""Fine-tuning at batch size 1: the paper's Fig. 8 (and the bytes of Fig. 7) at classroom scale.

    python -m experiments.finetune     # 13 to 22 min on 2 CPU cores, pretraining included
    python -m experiments.finetune --epochs 0.1 --rates 1 --out out/finetune-check   # 45 s

It fine-tunes the default pretrained run, `python train.py` (the tiny model, SGD at batch size
1, one pass over the plays; trained first if out/tiny-sgd-b1 holds none), on Shakespeare's
Sonnets, which the plays do not contain, as the paper fine-tunes Gemma 3 on MATH: Adam at batch
16 accumulated from 16 micro-batches of 1 (β2 0.95, the usual recipe); Adam at batch 1 with β2
from the same half-life in tokens; Adafactor at batch 1 with bf16 weights rounded
stochastically; vanilla SGD at batch 1; LoRA at batch 1 (Adam on rank-8 adapters over a frozen
bf16 base), on the block matrices, then on the output layer too. Each method trains its grid of
learning rates at once (jax.vmap over the rates, as batch_size_study), on the same windows in
the same order. The table: each method's best rate, the held-out Sonnets loss before and after,
the bytes it holds. Writes <out>/results.md and <out>/results.json. Results:
experiments/README.md.
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

SONNETS = os.path.relpath(data.DATA_DIR / "sonnets.txt")   # 26,411 GPT-2 tokens
HELD_OUT = 0.10     # the last 10 % of the Sonnets' tokens are never trained on. data.split would
                    # hold out 16,384 of them, its floor for a validation set: too many here
EPOCHS = 3          # passes over the Sonnets' training windows (the paper: 5 over MATH)
WARMUP = 0.05       # a linear ramp over the first 5 % of the steps, then the peak rate to the end
BIG_BATCH = 16      # the accumulated baseline: 16 micro-batches of 1 per optimizer step
LORA_RANK, LORA_ALPHA = 8, 16     # ΔW = (α / r)·A·B; α = 2r is a common choice
# The paper fine-tunes at a constant rate. The short warmup is ours: Adam's first steps divide
# by a second moment of a few gradients, so each moves every weight the batch touches by about
# lr, a shock to a pretrained model. All methods ramp over the same 5 % of the tokens.


def methods(cfg):
    """name: (batch, weights' dtype, optimizer, peak learning rates tried, LoRA's matrices or
    None). β2 at batch 1 keeps the half-life in tokens of β2 = 0.95 at batch 16 (the paper's
    rule): 0.95 halves its memory in 13.5 steps of 16 x 128 tokens, 27.7k tokens, which is
    β2 ≈ 0.9968 at 128 tokens a step."""
    t2 = optim.halflife_from_beta(0.95, BIG_BATCH * cfg.T)
    b2 = optim.beta_from_halflife(t2, cfg.T)
    # Adafactor factors a matrix only if both its sides are >= min_dim_to_factor. Optax's 128
    # would factor none of tiny's (D = 64) and keep a full g² (4 bytes a parameter); every
    # matrix of the paper's models is factored, so here all of tiny's are too (from D on)
    adafactor = optim.adafactor(b2=b2, heads=cfg.H, min_dim_to_factor=min(cfg.D, 128))
    # LoRA adapts every block matrix, as LoRA's paper leaves the embeddings frozen; they hold
    # 97 % of tiny's parameters, so a second row adapts the output layer too
    blocks = [f"blocks.{l}.{name}" for l in range(cfg.L) for name in model.BLOCK]
    lora_lrs = (1e-3, 2e-3, 4e-3, 8e-3)
    return {
        f"adam, {BIG_BATCH} x 1 accumulated": (BIG_BATCH, "float32", optim.adam(0.9, 0.95),
                                               (1e-3, 2e-3, 4e-3, 8e-3), None),
        "adam": (1, "float32", optim.adam(0.9, b2), (5e-4, 1e-3, 2e-3, 4e-3), None),
        "adafactor, bf16 stochastic": (1, "bfloat16", adafactor, (2.5e-3, 5e-3, 1e-2, 2e-2),
                                       None),
        "sgd": (1, "float32", optim.sgd(), (0.1, 0.2, 0.4, 0.8), None),
        f"lora r {LORA_RANK}, blocks": (1, "bfloat16", optim.adam(0.9, b2), lora_lrs, blocks),
        f"lora r {LORA_RANK}, blocks + output": (1, "bfloat16", optim.adam(0.9, b2), lora_lrs,
                                                 blocks + ["unembed"]),
    }, b2, t2


# -- LoRA (Hu et al., 2021) as pure functions over the parameter dict --------------------------

def lora_init(key, params, r, names=None):
    """Rank-r adapters {name: {"A": [rows, r], "B": [r, cols]}} for the matrices in names (by
    default every block matrix): A random, B zero, so that the merged model starts as the base.
    A ~ N(0, 1/rows) keeps x·A at the scale of x's entries."""
    adapters = {}
    for i, name in enumerate(names or [n for n in params if n.startswith("blocks.")]):
        rows, cols = params[name].shape
        a = jax.random.normal(jax.random.fold_in(key, i), (rows, r)) / math.sqrt(rows)
        adapters[name] = {"A": a, "B": jnp.zeros((r, cols), jnp.float32)}
    return adapters


def merge(base, adapters, alpha, r):
    """The parameters model.loss_fn takes: W + (α/r)·A·B in float32 for each adapted matrix W,
    the base's own (in its dtype) for the others."""
    return {name: w if name not in adapters else
            w.astype(jnp.float32) + (alpha / r) * adapters[name]["A"] @ adapters[name]["B"]
            for name, w in base.items()}


def lora_train_step(cfg, opt, base, n_steps, alpha=LORA_ALPHA, r=LORA_RANK):
    """train.make_train_step's step for LoRA, with its signature and arithmetic (no accumulation,
    no rounding: the adapters are float32), but a loss over the adapters: they are the
    "params" the optimizer sees and updates. The frozen base is closed over, a constant."""
    def loss_of(adapters, x, y):
        return model.loss_fn(merge(base, adapters, alpha, r), x, y, cfg)

    def train_step(adapters, opt_state, stats, step, x, y, peak_lr):
        loss, grads = jax.value_and_grad(loss_of)(adapters, x, y)
        lr = optim.lr_at(step, n_steps, peak_lr, WARMUP, "constant")
        updates, opt_state = opt.update(grads, opt_state, adapters, lr)
        adapters = optim.apply_updates(adapters, updates)
        bad = jnp.where((stats["bad_step"] < 0) & ~jnp.isfinite(loss), step, stats["bad_step"])
        return adapters, opt_state, {"loss_sum": stats["loss_sum"] + loss, "bad_step": bad}
    return train_step


# -- one method: its grid of rates as lanes of one compiled program ---------------------------

def setup(method, params, cfg, n_steps, key):
    """(the trained arrays at the start, the step, trained arrays -> model parameters, the compute
    config) of one method. The matmuls take the weights' dtype, as train.py's default."""
    batch, weights, opt, _, lora = method
    cfg = dataclasses.replace(cfg, dtype=weights)
    base = model.cast(params, weights)
    if lora:
        return (lora_init(jax.random.fold_in(key, 1), base, LORA_RANK, lora),
                lora_train_step(cfg, opt, base, n_steps),
                functools.partial(merge, base, alpha=LORA_ALPHA, r=LORA_RANK), cfg)
    rounding = "stochastic" if weights == "bfloat16" else None    # bf16 weights: Fig. 9
    step = train.make_train_step(cfg, opt, n_steps, WARMUP, grad_accum=batch, rounding=rounding,
                                 key=jax.random.fold_in(key, 2), schedule="constant")
    return base, step, lambda p: p, cfg


def lanes(tree, n):
    """n copies of every array, stacked on a new first axis: one per learning rate."""
    return jax.tree.map(lambda a: jnp.repeat(a[None], n, axis=0), tree)


def fine_tune(step_fn, start, opt, lrs, *, batch, n_steps, train_tokens, cfg, seed):
    """One run per peak rate in lrs from `start`, in lockstep on the same batches (jax.vmap over
    the rates, as batch_size_study.train_lanes), in calls of k steps of train.py's loop: (the
    lanes' trained arrays, the seconds of the compiled calls, without compilation)."""
    state = lanes((start, opt.init(start), train.new_stats()), len(lrs))
    lrs = jnp.asarray(lrs, jnp.float32)
    call, k = train.compile_calls(
        jax.vmap(step_fn, in_axes=(0, 0, 0, None, None, None, 0)),   # shared step and batch
        (*state, np.int32(0), lrs), (batch, cfg.T), n_steps, steps_per_call=math.gcd(n_steps, 32))
    call(k)                      # compiled before the clock starts
    t0 = time.time()
    for step in range(0, n_steps, k):   # batches by step number: every method sees the same
        xs, ys = data.get_batch(train_tokens, step, batch, cfg.T, seed, steps=k)
        state = call(k)(*state, np.int32(step), xs, ys, lrs)
    jax.block_until_ready(state)
    return state[0], time.time() - t0


def step_temporaries(step_fn, start, opt, batch, cfg):
    """XLA's temporaries of one run's step (one lane, one step), compiled for this alone:
    activations, gradients, the merged LoRA matrices, the accumulation buffer's scan."""
    like = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    shapes = jax.eval_shape(lambda p: (p, opt.init(p), train.new_stats()), start)
    ids = like((batch, cfg.T), jnp.int32)
    compiled = jax.jit(step_fn).lower(*shapes, like((), jnp.int32), ids, ids,
                                      like((), jnp.float32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def run_method(name, method, params, cfg, *, sonnets, windows, rates, seed):
    """Fine-tune one method's rates and print a line: its result as a dict (a row of the
    table). sonnets: (training tokens, held-out windows); windows: how many each run trains on."""
    batch, weights, opt, lrs, lora = method
    lrs, n_steps, (train_tokens, val_xy) = lrs[:rates], windows // batch, sonnets
    start, step_fn, to_params, cfg = setup(method, params, cfg, n_steps, jax.random.key(seed))
    held_out = jax.jit(jax.vmap(lambda t: train.evaluate(to_params(t), *val_xy, cfg)))
    before = float(held_out(lanes(start, 1))[0])
    trained, seconds = fine_tune(step_fn, start, opt, lrs, batch=batch, n_steps=n_steps,
                                 train_tokens=train_tokens, cfg=cfg, seed=seed)
    after = [float(l) if math.isfinite(l) else None for l in held_out(trained)]   # None: NaN
    best = int(np.argmin([math.inf if l is None else l for l in after]))
    # the bytes kept from step to step, from shapes (jax.eval_shape allocates nothing)
    shapes = jax.eval_shape(lambda: model.cast(params, weights))
    adapters = start if lora else {}
    held = {"weights": model.nbytes(shapes), "adapters": model.nbytes(adapters),
            "opt_state": model.nbytes(jax.eval_shape(opt.init, start)),
            "buffer": model.nbytes(jax.eval_shape(train.accumulation_buffer, shapes))
            if batch > 1 else 0}     # accumulation's float32 sum of the micro-batches' gradients
    row = {"method": name, "batch": batch, "grad_accum": batch, "weights": weights,
           "steps": n_steps, "lrs": list(lrs), "before": before, "after": after,
           "best_lr": lrs[best], "best_loss": after[best], "at_edge": len(lrs) > 1 and best in
           (0, len(lrs) - 1), "bytes": held, "held_bytes": sum(held.values()),
           "n_params": sum(x.size for x in shapes.values()), "seconds": seconds,
           "step_temp_bytes": step_temporaries(step_fn, start, opt, batch, cfg)}
    print(f"{name:<28} B = {batch:<2} before {before:.3f} | " + "  ".join(
        f"lr {lr:g}: {fmt(l)}" for lr, l in zip(lrs, after)) + f" | {seconds:.0f} s")
    return row


def fmt(loss):
    return "diverged" if loss is None else f"{loss:.3f}"


# -- the pretrained model and the Sonnets --------------------------------------------------------

def finished(base):
    """Whether folder `base` holds a finished train.py run: its config.json counts every step."""
    try:
        config = json.loads((base / "config.json").read_text())
        return config["steps_done"] == config["n_steps"]
    except (OSError, ValueError, KeyError):
        return False


def pretrained(base):
    """(model config, float32 parameters, config.json) of the finished train.py run in folder
    `base`; if it has none, python train.py's default run is trained there first (or resumed)."""
    if not finished(base):
        # an interrupted pretraining goes on from its checkpoint
        resume = ["--resume"] if (base / "ckpt.npz").exists() else []
        flags = resume + ["--out", str(base)]
        print(f"pretrain   no finished run in {base}/: python train.py {' '.join(flags)} "
              "(about 3 min on 2 CPU cores)")
        train.main(flags + ["--sample", "0"])    # no sample: it changes no result (train.py)
    try:
        config = json.loads((base / "config.json").read_text())
        cfg = model.Config(**{**config["model"], "dtype": "float32"})
        with np.load(base / "params.npz") as f:
            params = {name: jnp.asarray(a, jnp.float32) for name, a in f.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise train.UsageError(f"--base {base} does not hold a finished train.py run "
                               f"({type(e).__name__}: {e}).") from None
    want = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
    if jax.tree.map(lambda a: a.shape, want) != jax.tree.map(lambda a: a.shape, params):
        raise train.UsageError(f"{base}/params.npz does not hold the parameters of the model its "
                               "config.json names; pass another --base.")
    return cfg, params, config


def load_sonnets(path, T):
    """(training tokens, held-out inputs and targets [N, T]): the last HELD_OUT of the tokens are
    held out, the rest cut into windows of T + 1 as data.get_batch does."""
    try:
        tokens = np.asarray(data.open_tokens(path, data.EOT + 1))
    except data.DataError as e:
        raise train.UsageError(str(e)) from None
    n_val = int(len(tokens) * HELD_OUT)
    if n_val < T + 1 or data.n_windows(tokens[:-n_val], T) < BIG_BATCH:
        raise train.UsageError(f"--data {path} has {len(tokens):,} tokens, too few for "
                               f"{BIG_BATCH} training windows and one held-out of {T + 1}.")
    return tokens[:-n_val], tuple(map(jnp.asarray, data.val_batches(tokens[-n_val:], T)))


# -- main ----------------------------------------------------------------------------------------

def main(argv=None):
    p = train.Parser(prog="python -m experiments.finetune", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--base", default="out/tiny-sgd-b1", help="a finished train.py run to fine-tune (default "
        "%(default)s: python train.py's run, trained first if missing)")
    add("--data", default=SONNETS, help="the text to fine-tune on (default %(default)s)")
    add("--epochs", type=float, default=EPOCHS, help="passes over its training windows "
        "(%(default)s; 0.1 for a quick check)")
    add("--rates", type=int, choices=range(1, 5), default=4, help="the first N rates of each "
        "method's grid (default all 4; 1 for a quick check)")
    add("--seed", type=int, default=0, help="seeds the data order, LoRA's A, the rounding")
    add("--out", default="out/finetune", help="output folder (default %(default)s)")
    args, _ = train.parse_args(p, argv)
    if not 0 < args.epochs < math.inf:
        raise train.UsageError(f"--epochs must be a finite number > 0, got {args.epochs}.")
    t_start, out = time.time(), Path(args.out)
    cfg, params, base_config = pretrained(Path(args.base))
    train_tokens, val_xy = load_sonnets(args.data, cfg.T)
    n_windows = data.n_windows(train_tokens, cfg.T)
    # a multiple of the big batch, so that every method trains on exactly the same windows
    windows = int(args.epochs * n_windows) // BIG_BATCH * BIG_BATCH
    if windows == 0:
        raise train.UsageError(f"--epochs {args.epochs:g} is fewer than the {BIG_BATCH} windows "
                               f"of one step at batch {BIG_BATCH} (one epoch: {n_windows}).")
    table, b2, t2 = methods(cfg)
    print(f"base       {args.base}: {base_config['args']['model']} ({cfg}), "
          f"{sum(a.size for a in params.values()):,} parameters, validation loss on the plays "
          f"{base_config['final_val_loss']:.4f}")
    print(f"data       {args.data}: {len(train_tokens):,} training tokens ({n_windows} windows "
          f"of T + 1), the last {val_xy[0].size:,} held out ({len(val_xy[0])} windows)")
    print(f"schedule   {windows} windows ({windows / n_windows:.2f} epochs, the same for every "
          f"method), constant rate after a {WARMUP:g} warmup; {windows} steps at B = 1, "
          f"{windows // BIG_BATCH} at B = {BIG_BATCH}")
    print(f"β2         0.95 at B = {BIG_BATCH}: half-life {t2:,.0f} tokens -> {b2:.6f} at B = 1 "
          f"(adam, adafactor, lora); β1 0.9; lora r = {LORA_RANK}, α = {LORA_ALPHA}")
    rows = [run_method(name, m, params, cfg, sonnets=(train_tokens, val_xy), windows=windows,
                       rates=args.rates, seed=args.seed) for name, m in table.items()]
    result = {"command": " ".join([p.prog] + (sys.argv[1:] if argv is None else argv)),
              "base": args.base, "data": args.data, "epochs": windows / n_windows,
              "windows": windows, "held_out_tokens": int(val_xy[0].size), "b2": b2, "t2": t2,
              "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA, "warmup": WARMUP,
              "seed": args.seed, "rows": rows, "seconds": time.time() - t_start,
              "device": f"{jax.devices()[0].device_kind} ({os.cpu_count()} CPU cores)",
              "versions": {"python": platform.python_version(), "jax": jax.__version__}}
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "results.md").write_text(markdown(result))
    except OSError as e:
        raise train.UsageError(f"--out {out} cannot be written ({e.strerror}).") from None
    print("\n" + markdown(result) + f"\nwrote {out}/results.md and results.json in "
          f"{result['seconds'] / 60:.1f} min")


def markdown(result):
    """The results table, and every rate's loss, from results.json's dict."""
    mb = lambda n: f"{n / 1e6:.2f}"
    lines = ["| method | B | weights | best lr | held-out loss before | after | weights MB | "
             "adapters MB | optimizer state MB | accumulation MB | held MB | bytes / parameter "
             "| step temporaries MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        b = r["bytes"]
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['weights']} | {r['best_lr']:g}"
            + (" (edge)" if r["at_edge"] else "") + f" | {r['before']:.3f} | "
            f"**{fmt(r['best_loss'])}** | {mb(b['weights'])} | {mb(b['adapters'])} | "
            f"{mb(b['opt_state'])} | {mb(b['buffer'])} | {mb(r['held_bytes'])} | "
            f"{r['held_bytes'] / r['n_params']:.2f} | {mb(r['step_temp_bytes'])} |")
    notes = [f"\n{result['windows']} windows of the Sonnets ({result['epochs']:.2f} epochs) per "
             f"run; held-out: the last {result['held_out_tokens']:,} tokens. Held: kept from step "
             "to step (weights, adapters, optimizer state, accumulation buffer); step "
             "temporaries: XLA's memory analysis of one run's compiled step. Time of the steps: "
             "the compiled calls of all the method's rates together, without compilation."]
    if any(r["at_edge"] for r in result["rows"]):
        notes.append("\n(edge): the best rate is the grid's first or last; the optimum may lie "
                     "beyond it.")
    notes += ["\n| method | held-out loss after, by peak lr | steps | time of the steps |",
              "|---|---|---|---|"]
    notes += [f"| {r['method']} | " + ", ".join(f"{lr:g}: {fmt(l)}" for lr, l in zip(
        r["lrs"], r["after"])) + f" | {r['steps']} | {r['seconds']:.0f} s |"
              for r in result["rows"]]
    return "\n".join(lines + notes) + "\n"


if __name__ == "__main__":
    sys.exit(train.run_program(main))
