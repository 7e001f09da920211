"""Train the paper's GPT at any batch size, down to 1, with hand-written SGD, Adam, Adafactor, Muon.

    python train.py --batch 1 --opt sgd          # the paper's headline: vanilla SGD at batch size 1
    python train.py --batch 1 --opt adam         # Adam, β2 from a 10M-token half-life
    python train.py --resume --out out/tiny-sgd-b1 --sample 200 --prompt "ROMEO:"   # sample it
    python train.py --help                       # every flag, with its meaning and default

main reads in the order it runs; its helpers and the file formats follow it. Writes
<out>/log.jsonl (one JSON object per event), ckpt.npz (all a resume needs), params.npz and
config.json. Exit status: 0 done, 2 a mistake in the flags or files, 3 diverged, 130 interrupted
(Ctrl-C). The paper's other results are programs in experiments/ that import this file.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import shlex
import signal
import sys
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import data
import model
import optim

# The optimizers of --opt. Adding one is a function in optim.py plus a line here: --opt's
# choices, the defaults, the β's and the flag checks all follow from this table.
#   lr     default peak learning rate, tuned at --batch 1 for the default model and corpus
#          (README, "Choosing the defaults"); the paper's at GPT-2 scale: 0.2, 2.4e-3, 5e-3
#   b1     default first-moment decay (momentum); None: the optimizer keeps no first moment
#   t2     default second-moment half-life in tokens; None: it keeps no second moment. The paper
#          holds it fixed in tokens (10M in its sweeps), so β2 follows the batch (Fig. 3, 4)
#   decay  whether --weight-decay applies (the paper uses none at small batch)
OPTIMIZERS = {
    "sgd": dict(make=optim.sgd, lr=0.7, b1=0.0, t2=None, decay=False),    # vanilla: no momentum
    "adam": dict(make=optim.adam, lr=5e-3, b1=0.9, t2=10e6, decay=True),
    "adafactor": dict(make=optim.adafactor, lr=5e-2, b1=None, t2=10e6, decay=False),
    "muon": dict(make=optim.muon, lr=0.04, b1=0.95, t2=10e6, decay=False),  # Adam for embeddings
}
# What each flag accepts beyond its type: the words a user reads, and the test.
POSITIVE = ("a positive integer", lambda v: v >= 1)
FINITE = ("a finite number > 0", lambda v: 0 < v < math.inf)
TOKENS = ("a number of tokens > 0", lambda v: v > 0)
BETA = ("a number in [0, 1)", lambda v: 0 <= v < 1)
ACCEPTS = dict(   # checked in this order
    batch=POSITIVE, grad_accum=POSITIVE, lr=FINITE, adam_lr=FINITE, b1=BETA, b2=BETA, t1=TOKENS,
    t2=TOKENS, weight_decay=("a finite number >= 0", lambda v: 0 <= v < math.inf),
    warmup=("a fraction in [0, 1)", lambda v: 0 <= v < 1), tokens=TOKENS,
    seed=("an integer in [0, 2^63)", lambda v: 0 <= v < 2 ** 63), log_tokens=TOKENS,
    eval_tokens=TOKENS, ckpt_tokens=TOKENS, steps_per_call=POSITIVE, temperature=FINITE,
    sample=("a number of tokens >= 0", lambda v: v >= 0),
    prompt=("a text of at least one character", lambda v: len(v) > 0))
# The flags that change no result, only the sample or the speed: a rerun may change them.
NO_RESULT_FLAGS = ("sample", "prompt", "temperature", "steps_per_call")
# The flags --resume lets change: the budget, where it logs, the data files' paths
# (data.fingerprint checks that both splits' tokens are the same), --grad-accum (the same
# gradient, split otherwise) and NO_RESULT_FLAGS; on a finished run also --seed, which then
# picks the sample. No other flag.
MAY_CHANGE_ON_RESUME = ("tokens", "data", "val_data", "grad_accum", "log_tokens", "eval_tokens",
                        "ckpt_tokens") + NO_RESULT_FLAGS

# Dense bfloat16 peak FLOP/s of common accelerators, by a part of jax's device_kind, for the MFU
# the log shows (against the bf16 peak even for float32 compute, the usual convention). On a
# CPU, or a chip not listed, the log shows FLOP/s only. First match wins: "v5 lite" before "v5".
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L4": 121e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6": 918e12}


# -- flags --------------------------------------------------------------------------------------

def die(message, status=2):
    """A mistake the user can fix: one sentence on stderr, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):   # no prefix matching: --tok 30k is a mistake, not --tokens
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):  # argparse's own messages name the flag and the accepted values
        die(message)


def count(text):
    """A count of tokens: 300000, 3e5, 300k, 10M or 1.5B."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(text[-1:].lower(), 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except (ValueError, OverflowError):  # not a number, or nan / inf
        raise argparse.ArgumentTypeError(f"expected a number of tokens like 300000, 3e5 or 10M, "
                                         f"got {text!r}")


def common_flags():
    """What is trained on what, and how it is updated and stored (experiments/ reuse these)."""
    p = Parser(add_help=False)
    add = p.add_argument
    add("--model", choices=list(model.PRESETS), default="tiny", help="model preset (%(default)s)")
    add("--data", default=os.path.relpath(data.DEFAULT_TEXT), help="a UTF-8 text, or .bin token "
        "files (llm.c shards or nanoGPT's), one or a quoted glob (default: shipped Shakespeare)")
    add("--val-data", help="validation tokens from these files (text, .bin or glob; the first "
        f"{data.MAX_VAL_TOKENS:,}); default: the last 10 %% of --data, at most that many")
    add("--seed", type=int, default=0, help="seeds init, data order and rounding (%(default)s)")
    add("--opt", choices=list(OPTIMIZERS), default="sgd", help="optimizer (%(default)s)")
    add("--lr", type=float, help="peak learning rate (default: " + ", ".join(
        f"{name} {o['lr']:g}" for name, o in OPTIMIZERS.items()) + ")")
    add("--adam-lr", type=float, help="muon only: the peak learning rate of its Adam for the "
        f"embeddings (default adam's, {OPTIMIZERS['adam']['lr']:g})")
    b1, b2 = p.add_mutually_exclusive_group(), p.add_mutually_exclusive_group()
    b1.add_argument("--b1", type=float, help="first-moment decay: β1 (adam 0.9), momentum (sgd 0, "
                    "muon 0.95)")
    b1.add_argument("--t1", type=count, help="first-moment half-life in tokens, instead of --b1")
    b2.add_argument("--b2", type=float, help="second-moment decay β2 (adam, adafactor, muon)")
    b2.add_argument("--t2", type=count, help="second-moment half-life in tokens, instead of --b2 "
                    "(default 10M, the paper's: β2 then follows the batch size)")
    add("--weight-decay", type=float, default=0.0,
        help="decoupled weight decay, adam only (%(default)s, as the paper at small batch)")
    add("--adafactor-decay", choices=["constant", "power"], help="adafactor's β2: constant, from "
        "--t2/--b2 (the paper's; default), or the official code's β2_t = 1 − t^(−β2)")
    add("--param-dtype", choices=["float32", "bfloat16"], default="float32",
        help="the parameters' dtype (%(default)s); optimizer state and math stay float32")
    add("--compute-dtype", choices=["float32", "bfloat16"], help="the dtype the matrix "
        "multiplies take (default the parameters'); activations, norms and the loss stay float32")
    add("--rounding", choices=["nearest", "stochastic"],
        help="how bfloat16 parameters are rounded (default stochastic, Fig. 9)")
    return p


def make_parser():
    p = Parser(description="Train a GPT at small batch sizes (Marek et al., 2025).",
               parents=[common_flags()])
    add = p.add_argument
    add("--batch", type=int, default=1, help="sequences per optimizer step, B (%(default)s)")
    add("--grad-accum", type=int, default=1, help="split each step's batch into K micro-batches "
        "whose gradients are summed in float32 (default 1: none)")
    add("--warmup", type=float, default=0.05, help="fraction of steps in warmup (%(default)s)")
    add("--tokens", type=count, help="training budget in tokens (default: one pass over the data)")
    add("--out", help="output folder (default out/<model>-<opt>-b<batch>, plus -accum<K> with "
        "--grad-accum and -bf16-<rounding> for bf16 weights)")
    add("--log-tokens", type=count, default=16_384, help="log every this many tokens (%(default)s)")
    add("--eval-tokens", type=count, default=100_000, help="evaluate every this many tokens and "
        "at the end (%(default)s)")
    add("--ckpt-tokens", type=count, default=100_000, help="write <out>/ckpt.npz every this many "
        "tokens, at the end and on Ctrl-C (%(default)s; raise it on a GPU)")
    add("--resume", action="store_true", help="continue the run in --out exactly from its "
        "checkpoint; on a finished run, sample from it")
    add("--steps-per-call", type=int, help="training steps per jitted call, a lax.scan (default: "
        "timed at start, a call of up to about a second; 1: a call per step), at most the steps "
        "between two logs, evaluations or checkpoints")
    add("--sample", type=int, default=200, help="tokens to sample at the end (%(default)s)")
    add("--prompt", default="\n", help="the text the sample continues (default: a newline)")
    add("--temperature", type=float, default=1.0, help="sampling temperature (%(default)s)")
    return p


def parse_args(parser, argv=None):
    """(args, given): the flags with their defaults, and the names of those the user typed."""
    args = parser.parse_args(argv)
    parser.set_defaults(**{name: None for name in vars(args)})   # now untyped flags parse to None
    given = {name for name, value in vars(parser.parse_args(argv)).items() if value is not None}
    for name, (accepted, ok) in ACCEPTS.items():
        value = getattr(args, name, None)           # None: not given, or not this parser's
        if value is not None and not ok(value):
            die(f"--{name.replace('_', '-')} must be {accepted}, got {value}.")
    return args, given


def model_config(args):
    """--model's shape, its matrix multiplies in --compute-dtype (default: the parameters')."""
    args.compute_dtype = args.compute_dtype or args.param_dtype
    return dataclasses.replace(model.PRESETS[args.model], dtype=args.compute_dtype)


def load_data(args, T, batch, vocab=data.EOT + 1):
    """data.load of --data (and --val-data, where the program has it): (train, val) tokens, or a
    data file that cannot be used as one sentence and exit 2."""
    try:
        return data.load(args.data, T, batch, val_path=getattr(args, "val_data", None),
                         vocab=vocab)
    except data.DataError as e:
        die(str(e))


def make_optimizer(args, tokens_per_step, heads=None):
    """(optimizer, {"b1": β1, "b2": β2}) of args.opt, with only the β's it keeps: from each flag,
    or from its half-life in tokens at this step size (the paper's rule), or OPTIMIZERS' default.
    A flag it has no use for is one sentence and exit 2. Fills in the defaults that depend on the
    run (--lr, --rounding, --adafactor-decay, --adam-lr). heads: the model's (default --model's),
    which muon orthogonalizes apart."""
    name, o = args.opt, OPTIMIZERS[args.opt]
    for b, t, default, which in [("b1", "t1", o["b1"], "first"), ("b2", "t2", o["t2"], "second")]:
        if default is None and (getattr(args, b) is not None or getattr(args, t) is not None):
            die(f"--{b}/--{t} do not apply to {name}, which keeps no {which} moment.")
    decays = ", ".join(n for n, spec in OPTIMIZERS.items() if spec["decay"])
    for flag, applies, default, to in [   # the flags that apply to some runs only, and defaults
            ("rounding", args.param_dtype == "bfloat16", "stochastic",  # nearest stalls: Fig. 9
             "--param-dtype bfloat16 only; float32 parameters store the float32 sum exactly"),
            ("adafactor_decay", name == "adafactor", "constant", f"adafactor only, not {name}"),
            ("adam_lr", name == "muon", OPTIMIZERS["adam"]["lr"], f"muon only, not {name}"),
            ("weight_decay", o["decay"], 0.0, f"{decays} only; the paper uses none with {name}")]:
        if getattr(args, flag) and not applies:
            die(f"--{flag.replace('_', '-')} applies to {to}.")
        if applies and getattr(args, flag) is None:
            setattr(args, flag, default)
    args.lr = args.lr or o["lr"]
    from_halflife = lambda t: optim.beta_from_halflife(t, tokens_per_step)
    betas = {}
    if o["b1"] is not None:      # a β by default (Adam's 0.9), or from --t1's half-life
        betas["b1"] = from_halflife(args.t1) if args.t1 else o["b1"] if args.b1 is None else args.b1
    if o["t2"] is not None:      # from a half-life by default (10M tokens), or --b2
        betas["b2"] = from_halflife(args.t2 or o["t2"]) if args.b2 is None else args.b2
    for b, beta in betas.items():
        if beta >= 1:            # 0.5 ** (B·T / t) rounds to 1 when t >> B·T
            die(f"--t{b[1]} is so long that {b} rounds to 1 at {tokens_per_step:,} tokens "
                "per step, and the average would never move; give a shorter half-life.")
    extra = {"weight_decay": args.weight_decay} if o["decay"] else {}
    if args.adafactor_decay == "power":    # the official code's β2 is the schedule's exponent
        extra["decay_power"] = betas["b2"]
    if name == "muon":    # its Adam part's own peak rate, on the same schedule; per-head slices
        extra.update(adam_scale=args.adam_lr / args.lr, heads=heads or model.PRESETS[args.model].H)
    return o["make"](**betas, **extra), betas


# -- the train step -----------------------------------------------------------------------------

def accumulation_buffer(params):
    """Gradient accumulation's extra memory: one float32 array per parameter."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def gradients(params, x, y, cfg, grad_accum=1):
    """(mean loss, gradient) of the batch x, y [B, T].

    With grad_accum K > 1 the batch is split into K micro-batches of B/K sequences, run one after
    another; their gradients are summed into accumulation_buffer and divided by K: the full
    batch's gradient in K times less activation memory, for a parameter-sized buffer and no other
    gain (the paper's point).
    """
    if grad_accum == 1:
        return jax.value_and_grad(model.loss_fn)(params, x, y, cfg)
    micro = lambda a: a.reshape(grad_accum, a.shape[0] // grad_accum, *a.shape[1:])  # [K, B/K, T]

    def add_micro_batch(total, xy):
        loss, g = jax.value_and_grad(model.loss_fn)(params, *xy, cfg)
        return jax.tree.map(lambda total, g: total + g.astype(jnp.float32), total, g), loss

    total, losses = jax.lax.scan(add_micro_batch, accumulation_buffer(params), (micro(x), micro(y)))
    return losses.mean(), jax.tree.map(lambda g: g / grad_accum, total)


def make_train_step(cfg, opt, n_steps, warmup, grad_accum=1, rounding=None, key=None):
    """The training step, a pure function to jit:
    (params, opt_state, stats, step, x, y, peak_lr) -> (params, opt_state, stats).

    stats = {"loss_sum": the training loss summed since the last log, "bad_step": the first step
    whose loss was not finite, or -1}; both stay on device until they are read. peak_lr is an
    argument, not a constant, so that the batch-size study can jax.vmap one step over rates.
    """
    def train_step(params, opt_state, stats, step, x, y, peak_lr):
        loss, grads = gradients(params, x, y, cfg, grad_accum)
        lr = optim.lr_at(step, n_steps, peak_lr, warmup)
        # grads come in the parameters' dtype (float32 when accumulated); every optimizer
        # computes in float32 (optim.py)
        updates, opt_state = opt.update(grads, opt_state, params, lr)
        # stochastic rounding (bf16 weights): fresh bits every step, from the run's own key
        params = optim.apply_updates(params, updates, key if key is None else
                                     jax.random.fold_in(key, step), rounding or "nearest")
        # the loss is checked every step; a pass over all parameters costs 15 % of a CPU step
        # here, so main checks them only before they are logged or saved
        bad_step = jnp.where((stats["bad_step"] < 0) & ~jnp.isfinite(loss), step, stats["bad_step"])
        return params, opt_state, {"loss_sum": stats["loss_sum"] + loss, "bad_step": bad_step}
    return train_step


def make_multi_step(train_step):
    """n steps in one call: (params, opt_state, stats, step, xs, ys, peak_lr) with xs, ys
    [n, B, T], a lax.scan of the unchanged train_step over the n batches, the same arithmetic.
    A call per step pays for itself: the dispatch, and on a CPU fresh pages for the big
    temporaries (the [T, V] logits and their gradient) every time; one scan allocates them once."""
    def multi_step(params, opt_state, stats, step, xs, ys, peak_lr):
        def one_step(carry, xy):
            params, opt_state, stats, step = carry
            return (*train_step(params, opt_state, stats, step, *xy, peak_lr), step + 1), None
        return jax.lax.scan(one_step, (params, opt_state, stats, step), (xs, ys))[0][:3]
    return multi_step


def compile_calls(step_fn, arguments, batch_shape, sync_every, K=None):
    """(call, K): call(n) is make_multi_step(step_fn) compiled for calls of n steps, for
    arguments (params, opt_state, stats, step, peak_lr) and batches [B, T] of batch_shape.
    Compiled ahead of time, once per length, when first asked for: fixed shapes and the step
    number as an array mean nothing recompiles; params, state and stats are donated, so they
    are updated in place. K: the given one, at most sync_every, or default_steps_per_call's."""
    ids = lambda n: np.zeros((n, *batch_shape), np.int32)     # a call's batches: their shape
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), arguments)
    call = functools.cache(lambda n: jax.jit(make_multi_step(step_fn), donate_argnums=(0, 1, 2))
                           .lower(*shapes[:4], ids(n), ids(n), shapes[4]).compile())
    K = min(K, max(1, sync_every)) if K else default_steps_per_call(
        call(1), (*arguments[:4], ids(1), ids(1), arguments[4]), sync_every)
    return call, K


def default_steps_per_call(step_fn, arguments, sync_every, seconds=2.0):
    """The largest power of two K that K one-step calls run in `seconds` (in one call of K they
    run up to twice as fast: a call lasts about a second at most) and that is at most the steps
    between two points where the loop must look. Times the compiled one-step call step_fn on
    copies of the state it donates (params, opt_state, stats)."""
    for _ in range(2):     # the first call warms up
        copies = jax.block_until_ready(jax.tree.map(jnp.copy, arguments[:3]))
        t0 = time.time()
        jax.block_until_ready(step_fn(*copies, *arguments[3:]))
    K = max(1, min(sync_every, int(seconds / (time.time() - t0))))
    return 2 ** int(math.log2(K))


def new_stats():
    return {"loss_sum": jnp.float32(0), "bad_step": jnp.int32(-1)}


def evaluate(params, x, y, cfg):
    """Mean loss over all validation windows x, y [N, T], one window at a time (8 at a time
    measured 2x slower on a 2-core CPU: the [8, T, V] logits make logsumexp memory-bound)."""
    return jax.lax.map(lambda xy: model.loss_fn(params, xy[0][None], xy[1][None], cfg),
                       (x, y)).mean()


# -- main ---------------------------------------------------------------------------------------

def main(argv=None):
    args, given = parse_args(make_parser(), argv)
    out, ckpt, meta = open_run(args, given)   # meta: the checkpoint in --out, if there is one
    cfg = model_config(args)
    tokens_per_step = args.batch * cfg.T
    opt, betas = make_optimizer(args, tokens_per_step)
    shapes = jax.eval_shape(lambda: model.cast(model.init_params(jax.random.key(0), cfg),
                                               args.param_dtype))
    if args.resume and meta["step"] >= meta["n_steps"] and "tokens" not in given:  # a result
        print(f"the run in {out} is finished ({meta['step']:,} steps, validation loss "
              f"{meta['val_loss']:.4f}); sampling from it (a larger --tokens trains it further)")
        return print_sample(restore(ckpt, shapes, jax.eval_shape(opt.init, shapes), out)[0],
                            cfg, args)
    if args.batch % args.grad_accum:
        die(f"--batch {args.batch} is not divisible by --grad-accum {args.grad_accum}; each of "
            "the K micro-batches holds B/K whole sequences, so K must divide B.")
    train_tokens, val_tokens = load_data(args, cfg.T, args.batch, cfg.V)
    data_hash = data.fingerprint(train_tokens, val_tokens)    # cheap at any size (data.py)
    if args.resume and data_hash != meta["data_sha256"]:
        die(f"the tokens of --data {args.data} (and --val-data) differ from those the checkpoint "
            "was trained on.")
    budget = args.tokens or data.n_windows(train_tokens, cfg.T) * cfg.T  # default: one pass
    n_steps, start = budget // tokens_per_step, meta["step"] if args.resume else 0
    if n_steps < 1:
        die(f"--tokens {budget:,} is less than one optimizer step of {tokens_per_step:,} tokens "
            f"(--batch {args.batch} x T = {cfg.T}).")
    if start >= n_steps:
        die(f"the run in {out} has already trained {start:,} steps, more than the {n_steps:,} of "
            f"--tokens {budget:,}; pass a larger --tokens to train it further.")
    args.tokens, args.out = n_steps * tokens_per_step, str(out)   # as resolved
    if meta and not args.resume:
        refuse_to_overwrite(out, meta, args)
    log_file = open_log(out, start if args.resume else None)   # the first thing written

    # -- derived settings, printed once ----------------------------------------------------
    print("command    python train.py " + " ".join(   # the run's flags, resolved: rerun to repeat
        f"--{flag.replace('_', '-')}" + ("" if value is True else f" {shlex.quote(str(value))}")
        for flag, value in vars(args).items() if value not in (None, False)
        and flag not in NO_RESULT_FLAGS))
    n_params = sum(x.size for x in shapes.values())    # counted from the dict: tied embeddings
    embeddings = {name: x.size for name, x in shapes.items() if name in ("embed", "unembed")}
    print(f"model      {args.model}: {cfg} -> {n_params:,} parameters "
          f"({n_params - sum(embeddings.values()):,} non-embedding"
          + "".join(f" + {n:,} {name}" for name, n in embeddings.items()) + ")")
    print(f"data       {args.data}: {len(train_tokens):,} training tokens "
          f"({data.n_windows(train_tokens, cfg.T):,} windows of T + 1), "
          f"{len(val_tokens):,} validation tokens")
    halflife = lambda beta: fmt_tokens(optim.halflife_from_beta(beta, tokens_per_step))
    print(f"optimizer  {args.opt}: peak lr {args.lr:g}"
          + (f" (adam-lr {args.adam_lr:g} for the embeddings)" if args.adam_lr else "")
          + "".join(f", {'momentum' if args.opt == 'sgd' else name} {beta:.6g}" + (  # sgd: b1
              f" (half-life {halflife(beta)} tokens)" if beta else "") for name, beta in
                    betas.items())
          + (f", β2_t = 1 − t^(−{betas['b2']:.6g}) (official)" if args.adafactor_decay == "power"
             else "") + f", weight decay {args.weight_decay:g}")
    print(f"schedule   {args.batch} x {cfg.T} = {tokens_per_step:,} tokens/step, "
          f"{n_steps:,} steps, {n_steps * tokens_per_step:,} tokens; warmup {args.warmup:g} "
          f"({math.ceil(args.warmup * n_steps):,} steps), then cosine to 0")
    state_shapes = jax.eval_shape(opt.init, shapes)
    buffer = model.nbytes(jax.eval_shape(accumulation_buffer, shapes))
    print(f"memory     parameters {model.nbytes(shapes):,} bytes ({args.param_dtype}, "
          f"{jnp.dtype(args.param_dtype).itemsize} bytes each"
          + (f", rounded {args.rounding}" if args.rounding else "")
          + f"), optimizer state {model.nbytes(state_shapes):,} bytes (float32)"
          + (f", accumulation buffer {buffer:,} bytes (float32; {args.grad_accum} micro-batches "
             f"of {args.batch // args.grad_accum})" if args.grad_accum > 1 else ""))
    # JAX's default float32 matmul precision favours speed: true float32 on a CPU, TF32 on NVIDIA
    # GPUs since Ampere, bf16 passes on a TPU; JAX_DEFAULT_MATMUL_PRECISION=highest forces float32
    precision = jax.config.jax_default_matmul_precision or "default, " + {
        "cpu": "exact", "gpu": "TF32 on Ampere or later", "tpu": "bf16 passes"}.get(
            jax.default_backend(), "device-dependent")
    print(f"device     {jax.devices()[0].device_kind} ({jax.default_backend()}); matmuls take "
          + ("bfloat16" if args.compute_dtype == "bfloat16" else f"float32 (precision {precision})")
          + f"; output in {out}/")

    # -- parameters, optimizer state, and the one jitted step ------------------------------
    if args.resume:   # the checkpoint's state exactly, so the run goes on as if never stopped
        params, opt_state, stats, key = restore(ckpt, shapes, state_shapes, out)
        print(f"resume     from {out}/ckpt.npz at step {start:,} "
              f"({fmt_tokens(meta['tokens'])} tokens)")
    else:
        key = jax.random.key(args.seed)
        params = model.cast(model.init_params(jax.random.fold_in(key, 0), cfg), args.param_dtype)
        opt_state, stats = opt.init(params), new_stats()
    step_fn = make_train_step(cfg, opt, n_steps, args.warmup, args.grad_accum, args.rounding,
                              key=jax.random.fold_in(key, 2))    # the rounding's random bits
    # batches are addressed by step number, so a resumed run sees the data it would have seen;
    # a call of n steps takes theirs as [n, B, T], gathered in one go and sent to the device once
    batches = lambda step, n: jax.device_put(data.get_batch(train_tokens, step, args.batch, cfg.T,
                                                            args.seed, steps=n))
    t0, peak_lr = time.time(), jnp.float32(args.lr)
    looks = (args.log_tokens, args.eval_tokens, args.ckpt_tokens)   # where the loop must look
    call, K = compile_calls(step_fn, (params, opt_state, stats, np.int32(0), peak_lr),
                            (args.batch, cfg.T), min(looks) // tokens_per_step,
                            args.steps_per_call)
    call(1), call(K)    # both lengths now, so that no compilation falls inside the loop
    print(f"compiled   the train step in {time.time() - t0:.1f} s; {K} steps per call ("
          + ("--steps-per-call" if args.steps_per_call else "timed; --steps-per-call sets it")
          + "), and 1 to end a call where the loop must look")
    val_x, val_y = (jnp.asarray(a) for a in data.val_batches(val_tokens, cfg.T))
    evaluate_fn = jax.jit(evaluate, static_argnames="cfg")
    log = lambda **event: log_file.write(json.dumps(event) + "\n")   # line-buffered: one write
    flops = flops_per_token(cfg)
    peak = next((f for kind, f in PEAK_FLOPS.items() if kind in jax.devices()[0].device_kind), None)

    def run_eval(step):
        val_loss = float(evaluate_fn(params, val_x, val_y, cfg=cfg))   # a host sync
        log(step=step, tokens=step * tokens_per_step, val_loss=val_loss)
        print(f"step {step:>6,}/{n_steps:,} | validation loss {val_loss:.4f}")
        return val_loss

    # Besides the arrays, a checkpoint holds what the loop keeps on the host, so that a resumed
    # run logs as if it had never stopped: the step that opened the current logging window, the
    # last validation loss, and the clocks (the window's time, the time since the start).
    host = meta if args.resume else {"elapsed_s": 0, "window_s": 0, "window_start": 0}
    t_start = time.time() - host["elapsed_s"]
    val_loss = meta["val_loss"] if args.resume else run_eval(0)
    t_window, window_start = time.time() - host["window_s"], host["window_start"]

    def checkpoint(done):
        """Everything needed to go on exactly from step `done`, written atomically."""
        meta = {"version": CKPT_VERSION, "args": vars(args), "step": done, "n_steps": n_steps,
                "tokens": done * tokens_per_step, "window_start": window_start,
                "window_s": time.time() - t_window, "elapsed_s": time.time() - t_start,
                "val_loss": val_loss, "data_sha256": data_hash}
        save_arrays(out / "ckpt.npz", {**flatten({"params": params, "opt_state": opt_state}),
                                       "loss_sum": stats["loss_sum"], "key": jax.random.key_data(
                                           key), "meta": np.array(json.dumps(meta))})
        return done

    # -- the loop --------------------------------------------------------------------------
    # The steps run in calls of K steps (1 for the last few before a point where the loop must
    # look: a log, an evaluation, a checkpoint, the end). Ctrl-C lets the current call finish,
    # then the loop stops and a checkpoint is written; a second Ctrl-C aborts at once (the last
    # checkpoint stays whole: it is written atomically).
    interrupted, previous_handler = [], signal.getsignal(signal.SIGINT)
    def on_sigint(*_):
        interrupted.append(True)
        signal.signal(signal.SIGINT, previous_handler)
    signal.signal(signal.SIGINT, on_sigint)
    saved_step = done = start if args.resume else checkpoint(0)   # a checkpoint from step 0 on
    # the first step count after `done` whose tokens reach a multiple of `every`
    ceil_div = lambda a, b: -(-a // b)
    next_at = lambda done, every: ceil_div((done * tokens_per_step // every + 1) * every,
                                           tokens_per_step)
    # a call's length: K, unless it would run past the next point where the loop must look
    length = lambda done: K if done + K <= min(n_steps, *(next_at(done, e) for e in looks)) else 1
    n = length(done)
    try:
        xs = batches(done, n)
        while done < n_steps:
            params, opt_state, stats = call(n)(params, opt_state, stats, np.int32(done), *xs,
                                               peak_lr)
            done, n = done + n, length(done + n)
            if done < n_steps:            # the next call's batches, while the device runs
                xs = batches(done, n)
            jax.block_until_ready(stats)  # one call in flight at most: Ctrl-C stops in a call
            tokens, last, stop = done * tokens_per_step, done == n_steps, bool(interrupted)
            log_now, eval_now, save_now = (next_at(done - 1, e) == done or last for e in looks)
            save_now = save_now or stop
            # nothing bad is logged or saved: a host sync, so only at these points
            if (log_now or eval_now or save_now) and (bad := diverged(stats, params, done)):
                lr_bad = float(optim.lr_at(bad - 1, n_steps, args.lr, args.warmup))
                log(step=bad, tokens=bad * tokens_per_step, diverged=True, lr=lr_bad)
                die(f"the run diverged: the loss or the parameters were not finite by step "
                    f"{bad:,} ({bad * tokens_per_step:,} tokens seen, learning rate {lr_bad:.3g}); "
                    f"{out}/ckpt.npz keeps the last good state, from step {saved_step:,}. Start "
                    "a new run with a lower --lr (resuming would repeat this).", status=3)
            if log_now:
                train_loss = float(stats["loss_sum"]) / (done - window_start)  # a host sync
                tok_per_s = (done - window_start) * tokens_per_step / (time.time() - t_window)
                lr_now = float(optim.lr_at(done - 1, n_steps, args.lr, args.warmup))
                mfu = {"mfu": tok_per_s * flops / peak} if peak else {}
                log(step=done, tokens=tokens, train_loss=train_loss, lr=lr_now,
                    tok_per_s=tok_per_s, flop_per_s=tok_per_s * flops, **mfu,
                    elapsed_s=time.time() - t_start)
                print(f"step {done:>6,}/{n_steps:,} | tokens {fmt_tokens(tokens):>6} | "
                      f"loss {train_loss:.4f} | lr {lr_now:.2e} | {tok_per_s:,.0f} tok/s | "
                      f"{tok_per_s * flops / 1e9:,.1f} GFLOP/s"
                      + (f" ({mfu['mfu']:.1%} MFU)" if peak else "") + " | "
                      f"eta {(n_steps - done) * tokens_per_step / tok_per_s / 60:.1f} min")
                stats["loss_sum"], window_start, t_window = jnp.float32(0), done, time.time()
            if eval_now or save_now:    # evaluation and checkpoints are not training time
                t_pause = time.time()
                val_loss = run_eval(done) if eval_now else val_loss
                saved_step = checkpoint(done) if save_now else saved_step
                t_window += time.time() - t_pause
            if stop:
                break
    except data.DataError as e:   # an id past the vocabulary in the next batches (load checks
        if not diverged(stats, params, done):     # a sample only): keep the steps done so far
            saved_step = checkpoint(done)
        die(f"{str(e).rstrip('.')}; {out}/ckpt.npz keeps the state of step {saved_step:,}.")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        log_file.close()

    # -- save and sample -------------------------------------------------------------------
    save_arrays(out / "params.npz", params)
    (out / "config.json").write_text(json.dumps({
        "model": dataclasses.asdict(cfg), "args": vars(args), "b1": betas.get("b1"),
        "b2": betas.get("b2"), "tokens_per_step": tokens_per_step, "n_steps": n_steps,
        "steps_done": done, "final_val_loss": val_loss, "elapsed_s": time.time() - t_start,
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "numpy": np.__version__}}, indent=2) + "\n")
    print(f"saved {out}/ckpt.npz, {out}/params.npz and {out}/config.json")
    if stop:                            # interrupted before the last step
        print(f"interrupted at step {done:,} of {n_steps:,}; to go on exactly from there: "
              f"python train.py --resume --out {out}", file=sys.stderr)
        sys.exit(130)
    print(f"final validation loss {val_loss:.4f} after {fmt_tokens(done * tokens_per_step)} tokens")
    print_sample(params, cfg, args)


# -- helpers of main ----------------------------------------------------------------------------

def print_sample(params, cfg, args):
    """--sample tokens after --prompt, drawn with a key from --seed (the run's, by default)."""
    if args.sample:
        ids = model.generate(params, cfg, data.encode(args.prompt), args.sample,
                             jax.random.fold_in(jax.random.key(args.seed), 1), args.temperature)
        print(f"--- sample ({args.sample} tokens, temperature {args.temperature:g}, seed "
              f"{args.seed}) ---\n{args.prompt}{data.decode(ids)}")


def flops_per_token(cfg):
    """The model FLOPs of training on one token (PaLM's count, Appendix B): 6 N + 12 L T D, where
    N = L (4 D² + 2 D F) + D V counts the block matrices and the output layer (the input
    embedding is a lookup, no FLOPs), 6 = 2 forward + 4 backward per weight, and 12 L T D is the
    attention's scores and weighted sum (2 T D each forward, at every position, times 3)."""
    N = cfg.L * (4 * cfg.D ** 2 + 2 * cfg.D * cfg.F) + cfg.D * cfg.V
    return 6 * N + 12 * cfg.L * cfg.T * cfg.D


def fmt_tokens(n):
    """1234567 -> '1.235M': token counts as people say them."""
    return next((f"{n / scale:.4g}{unit}" for scale, unit in [(1e9, "B"), (1e6, "M"), (1e3, "k")]
                 if n >= scale), f"{n:.4g}")


def diverged(stats, params, done):
    """0, or the step by which the loss or the parameters stopped being finite (a host sync). A
    non-finite gradient is caught too: it makes the parameters non-finite, then the loss."""
    bad = int(stats["bad_step"])
    return bad + 1 if bad >= 0 else 0 if all_finite(params) else done


@jax.jit
def all_finite(tree):
    return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def open_run(args, given):
    """(the output folder, the checkpoint's arrays, its meta). With --resume the checkpoint must
    be whole and of this format, and its flags replace the defaults; without, the arrays are None
    and meta (None if there is no readable checkpoint) says whether the folder may be reused."""
    bf16 = f"-bf16-{args.rounding or 'stochastic'}" if args.param_dtype == "bfloat16" else ""
    accum = f"-accum{args.grad_accum}" if args.grad_accum > 1 else ""
    out = Path(args.out or f"out/{args.model}-{args.opt}-b{args.batch}{accum}{bf16}")
    path = out / "ckpt.npz"
    if args.resume and "grad_accum" in given and not args.out:
        die("--resume with --grad-accum needs --out naming the run's folder: the default "
            "folder's name depends on --grad-accum, so it may not be the run you mean.")
    if args.resume and not path.exists():
        die(f"there is no checkpoint {path} to resume from; run without --resume to start, or "
            "pass the --out of the run to continue.")
    try:
        arrays, meta = load_checkpoint(path)
    except CKPT_ERRORS as e:
        if args.resume:
            die(f"checkpoint {path} is truncated or damaged ({type(e).__name__}: {e}); it cannot "
                "be resumed.")
        return out, None, None         # none, or unreadable: nothing that could be resumed
    if not args.resume:
        return out, None, meta
    if meta.get("version") != CKPT_VERSION:
        die(f"checkpoint {path} has format version {meta.get('version')}; this train.py reads "
            f"version {CKPT_VERSION}.")
    sampling = meta["step"] >= meta["n_steps"] and "tokens" not in given   # a finished run
    may_change = MAY_CHANGE_ON_RESUME + ("seed",) * sampling   # --seed then picks the sample
    flags = ", ".join(f"--{n.replace('_', '-')}" for n in may_change)
    for name, value in meta["args"].items():   # a typed flag must agree, unless it may change
        if name in ("out", "resume") or (name in given and name in may_change):
            continue
        if name in given and getattr(args, name) != value:
            die(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's "
                f"{value}; on resume only {flags} may change.")
        setattr(args, name, value)
    return out, arrays, meta


def refuse_to_overwrite(out, meta, args):
    """A new run may replace a finished run of the same flags (a rerun), never one of other
    flags or one that can still be resumed: no result is lost by mistake."""
    if meta.get("step", 0) < meta.get("n_steps", 0):
        die(f"{out} holds an unfinished run (step {meta['step']:,} of {meta['n_steps']:,}); "
            "continue it with --resume, or pass another --out to start a new one.")
    saved = meta.get("args", {})
    for name, value in vars(args).items():
        if name not in NO_RESULT_FLAGS and saved.get(name) != value:
            die(f"{out} holds the results of a run with --{name.replace('_', '-')} "
                f"{saved.get(name)}, not {value}; pass another --out, or delete {out} to replace "
                "them.")


def open_log(out, keep_to_step):
    """Create out/ and open log.jsonl to append to, line-buffered: a fresh log, or on resume the
    log up to the checkpoint's step (a crash may have logged past it, or cut its last line)."""
    path, keep = out / "log.jsonl", 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        # events are in step order, so the kept ones are the lines before the first to drop
        for line in path.open("rb") if keep_to_step is not None and path.exists() else []:
            try:
                if not line.endswith(b"\n") or json.loads(line)["step"] > keep_to_step:
                    break
            except (ValueError, KeyError):   # not an event of ours: drop it and what follows
                break
            keep += len(line)
        log_file = open(path, "a", buffering=1)
        log_file.truncate(keep)
        return log_file
    except OSError as e:
        die(f"--out {out} cannot be written ({e.strerror}).")


# -- the checkpoint's file format ---------------------------------------------------------------
# ckpt.npz holds the parameters and the optimizer state by path name ("params.embed",
# "opt_state.m.embed", ...), the run's key, the loss summed in the current logging window, and
# "meta": a JSON string of the flags, the step, the clocks and a hash of the tokens.
CKPT_VERSION = 2       # the layout of ckpt.npz; bump it when the layout changes
CKPT_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)  # a file unreadable


def save_arrays(path, arrays):
    """Save {name: array} to an .npz atomically: a temporary file, flushed to disk, then renamed.
    numpy has no bfloat16, so bf16 arrays are stored as float32, which holds each value exactly."""
    tmp = path.with_name(path.stem + ".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **{name: np.asarray(a, np.float32) if a.dtype == jnp.bfloat16 else
                       np.asarray(a) for name, a in arrays.items()})
        f.flush()
        os.fsync(f.fileno())          # on disk before the rename makes it the checkpoint
    os.replace(tmp, path)


def load_checkpoint(path):
    """(arrays, meta) of a checkpoint written by main; raises one of CKPT_ERRORS if it cannot."""
    with np.load(path) as f:
        arrays = dict(f)
    return arrays, json.loads(str(arrays.pop("meta")))


def flatten(tree):
    """A pytree's leaves by path name: {"opt_state.m.embed": array, ...}, in leaf order."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(arrays, template):
    """The pytree shaped like template (arrays or shapes), its leaves taken from arrays by path
    name and cast to the template's dtype (exact for bf16); None unless all are there in shape."""
    names = flatten(template)
    if any(n not in arrays or arrays[n].shape != t.shape for n, t in names.items()):
        return None
    return jax.tree.unflatten(jax.tree.structure(template),
                              [jnp.asarray(arrays[n], t.dtype) for n, t in names.items()])


def restore(ckpt, shapes, state_shapes, out):
    """(params, opt_state, stats, key) of the run saved in ckpt, the arrays of out/ckpt.npz."""
    state = unflatten(ckpt, {"params": shapes, "opt_state": state_shapes})
    if state is None or not {"loss_sum", "key"} <= set(ckpt):
        die(f"checkpoint {out}/ckpt.npz does not hold the parameters and state of this model and "
            "optimizer.")
    stats = {**new_stats(), "loss_sum": jnp.asarray(ckpt["loss_sum"])}
    return state["params"], state["opt_state"], stats, jax.random.wrap_key_data(ckpt["key"])


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, or a second one inside it
        print("interrupted; the files written before it (checkpoints, logs) are whole",
              file=sys.stderr)
        sys.exit(130)
