"""Train the paper's GPT at any batch size, down to 1, with hand-written SGD, Adam or Adafactor.

    python train.py --batch 1 --opt sgd          # the paper's headline: vanilla SGD at batch size 1
    python train.py --batch 1 --opt adam         # Adam, β2 from a 10M-token half-life (PAPER.md §2)
    python train.py --help                       # every flag, with its meaning and default

The file reads in the order it runs: flags -> derived settings, printed -> data -> parameters and
optimizer state -> one jitted train step -> the loop (log, evaluate, checkpoint) -> save and
sample. Writes <out>/log.jsonl (one JSON object per event), <out>/ckpt.npz (everything needed to
resume, rewritten as the run goes), <out>/params.npz and <out>/config.json.
Exit status: 0 done, 2 a mistake in the flags or the files, 3 diverged, 130 interrupted (Ctrl-C).
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
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

# Peak learning rate per optimizer, tuned at --batch 1 for the default model and corpus
# (README, "Choosing the defaults"). The paper's values at GPT-2 scale are 0.2, 2.4e-3, 5e-3.
DEFAULT_LR = {"sgd": 0.7, "adam": 5e-3, "adafactor": 5e-2}
DEFAULT_T2 = 10e6      # tokens: the second-moment half-life of the paper's sweeps (§2)
DEFAULT_B1 = {"sgd": 0.0, "adam": 0.9}   # vanilla SGD has no momentum; Adam keeps β1 = 0.9 (§2)
CKPT_VERSION = 1       # the layout of ckpt.npz; bump it when the layout changes
# Flags that may change when resuming (the budget, where to log and save, the data file's path:
# its tokens must be the same). Every other flag is taken from the checkpoint and must match it.
# --grad-accum may change too: it splits the same gradient differently (equal up to rounding).
MAY_CHANGE_ON_RESUME = {"tokens", "log_tokens", "eval_tokens", "ckpt_tokens", "sample", "data",
                        "grad_accum"}


def die(message):
    """A mistake the user can fix: one sentence on stderr, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
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


def make_parser():
    p = Parser(description="Train a GPT at small batch sizes (Marek et al., 2025).")
    add = p.add_argument
    add("--batch", type=int, default=1, help="sequences per optimizer step, B (default 1)")
    add("--grad-accum", type=int, default=1, help="compute each step's gradient as this many "
        "micro-batches of B/K sequences, averaged in a float32 buffer (default 1: none; the "
        "paper's point is that one device never needs it, §9)")
    add("--opt", choices=["sgd", "adam", "adafactor"], default="sgd",
        help="optimizer (default sgd, which without momentum keeps no state at all)")
    add("--lr", type=float, help="peak learning rate (default per optimizer: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    b1 = p.add_mutually_exclusive_group()
    b1.add_argument("--b1", type=float, help="first-moment decay: Adam's β1 (default 0.9) or "
                    "SGD's momentum (default 0); adafactor has no first moment")
    b1.add_argument("--t1", type=count, help="first-moment half-life in tokens, instead of --b1")
    b2 = p.add_mutually_exclusive_group()
    b2.add_argument("--b2", type=float, help="second-moment decay β2 of adam and adafactor")
    b2.add_argument("--t2", type=count, help="second-moment half-life in tokens, instead of --b2 "
                    f"(default {DEFAULT_T2:,.0f}, the paper's: β2 then follows the batch size)")
    add("--param-dtype", choices=["float32", "bfloat16"], default="float32",
        help="dtype the parameters are stored in; optimizer state and math stay float32 (§7)")
    add("--rounding", choices=["nearest", "stochastic"],
        help="how bfloat16 parameters are rounded after each update (default stochastic, §7)")
    add("--weight-decay", type=float, default=0.0,
        help="decoupled weight decay, adam only (default 0, as the paper at small batch)")
    add("--warmup", type=float, default=0.05,
        help="fraction of the steps spent in linear warmup (default 0.05)")
    add("--tokens", type=count, help="training budget in tokens (default: one pass over the "
        "training split)")
    add("--model", choices=list(model.PRESETS), default="tiny", help="model preset (default tiny)")
    add("--data", default=os.path.relpath(data.DEFAULT_TEXT),
        help="any UTF-8 text file (default: the shipped Shakespeare)")
    add("--seed", type=int, default=0,
        help="seeds the initialization, the data order and the rounding (default 0)")
    add("--out", help="output folder (default out/<model>-<opt>-b<batch>, plus -accum<K> with "
        "--grad-accum and -bf16-<rounding> for bf16 weights)")
    add("--log-tokens", type=count, default=16_384,
        help="log every this many tokens (default 16384)")
    add("--eval-tokens", type=count, default=100_000,
        help="evaluate on the validation split every this many tokens and at the end "
        "(default 100000)")
    add("--ckpt-tokens", type=count, default=100_000,
        help="write <out>/ckpt.npz every this many tokens, at the end and on Ctrl-C (default "
        "100000; raise it on a GPU, where a checkpoint can take longer than 100k tokens)")
    add("--resume", action="store_true",
        help="continue the run in --out from its checkpoint, exactly; only --tokens, --data, "
        "--grad-accum and the logging, checkpoint and sample flags may change")
    add("--sample", type=int, default=200, help="tokens to sample at the end (default 200)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--study", action="store_true", help="instead of one run, the batch-size "
                      "study: a grid of batch sizes x optimizers x learning rates at an equal "
                      "token budget (README; reads --model, --tokens, --data, --seed, --out)")
    mode.add_argument("--find-batch", action="store_true", help="instead of training, time the "
                      "step at B = 1, 2, 4, ... and recommend the smallest B within 10 %% of the "
                      "best throughput (reads the model, optimizer and data flags)")
    mode.add_argument("--memory", action="store_true", help="instead of training, print the "
                      "bytes of weights, optimizer state and accumulation buffer of the large "
                      "presets")
    return p


def parse_args(argv=None):
    """(args, given): the flags with their defaults, and the names of those typed by the user."""
    p = make_parser()
    args = p.parse_args(argv)
    p.set_defaults(**{name: None for name in vars(args)})      # now untyped flags parse to None
    given = {name for name, value in vars(p.parse_args(argv)).items() if value is not None}

    # Ranges argparse cannot check: one sentence each, naming the flag and what is accepted.
    for flag, value, ok, accepted in [
        ("--batch", args.batch, args.batch >= 1, "a positive integer"),
        ("--grad-accum", args.grad_accum, args.grad_accum >= 1, "a positive integer"),
        ("--lr", args.lr, args.lr is None or 0 < args.lr < math.inf, "a finite number > 0"),
        ("--b1", args.b1, args.b1 is None or 0 <= args.b1 < 1, "a number in [0, 1)"),
        ("--b2", args.b2, args.b2 is None or 0 <= args.b2 < 1, "a number in [0, 1)"),
        ("--t1", args.t1, args.t1 is None or args.t1 > 0, "a number of tokens > 0"),
        ("--t2", args.t2, args.t2 is None or args.t2 > 0, "a number of tokens > 0"),
        ("--weight-decay", args.weight_decay, 0 <= args.weight_decay < math.inf,
         "a finite number >= 0"),
        ("--warmup", args.warmup, 0 <= args.warmup < 1, "a fraction in [0, 1)"),
        ("--tokens", args.tokens, args.tokens is None or args.tokens > 0, "a number of tokens > 0"),
        ("--seed", args.seed, 0 <= args.seed < 2 ** 63, "an integer in [0, 2^63)"),
        ("--log-tokens", args.log_tokens, args.log_tokens > 0, "a number of tokens > 0"),
        ("--eval-tokens", args.eval_tokens, args.eval_tokens > 0, "a number of tokens > 0"),
        ("--ckpt-tokens", args.ckpt_tokens, args.ckpt_tokens > 0, "a number of tokens > 0"),
        ("--sample", args.sample, args.sample >= 0, "a number of tokens >= 0"),
    ]:
        if not ok:
            die(f"{flag} must be {accepted}, got {value}.")
    return args, given


def check_combinations(args):
    """Flags that contradict each other (checked after --resume has filled in the rest)."""
    if args.opt == "adafactor" and (args.b1 is not None or args.t1 is not None):
        die("--b1/--t1 do not apply to adafactor, which keeps no first moment (§3).")
    if args.opt == "sgd" and (args.b2 is not None or args.t2 is not None):
        die("--b2/--t2 do not apply to sgd, which keeps no second moment.")
    if args.param_dtype == "float32" and args.rounding:
        die("--rounding applies to --param-dtype bfloat16 only; float32 parameters store the "
            "float32 sum exactly.")
    if args.param_dtype == "bfloat16" and not args.rounding:
        args.rounding = "stochastic"       # the paper's recipe: nearest rounding stalls (§7)
    if args.batch % args.grad_accum:
        die(f"--batch {args.batch} is not divisible by --grad-accum {args.grad_accum}; each of "
            "the K micro-batches holds B/K whole sequences, so K must divide B.")
    if args.opt != "adam" and args.weight_decay:
        die(f"--weight-decay applies to adam only; the paper uses none with {args.opt}.")


def nbytes(tree):
    """Bytes held by a pytree of arrays (or of shapes from jax.eval_shape)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def fmt_tokens(n):
    """1234567 -> '1.235M': token counts as people say them."""
    for scale, unit in [(1e9, "B"), (1e6, "M"), (1e3, "k")]:
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:.4g}"


def cast(params, dtype):
    """The parameters stored in another dtype (bfloat16 for --param-dtype bfloat16)."""
    return {name: p.astype(dtype) for name, p in params.items()}


# np.savez writes a bfloat16 array (numpy knows it only through ml_dtypes) as opaque 2-byte
# "void" items that load back unusable, so bf16 arrays are stored as their uint16 bit patterns
# under "<name>:bfloat16" and viewed back on loading: the round trip is exact.
BF16_SUFFIX = ":bfloat16"


def save_arrays(path, arrays):
    """Save a dict of arrays to an .npz atomically (temporary file, then rename)."""
    stored = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype == jnp.bfloat16:
            name, a = name + BF16_SUFFIX, a.view(np.uint16)
        stored[name] = a
    tmp = path.with_name(path.stem + ".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **stored)
        f.flush()
        os.fsync(f.fileno())          # on disk before the rename makes it the checkpoint
    os.replace(tmp, path)


def load_arrays(path):
    """The dict that save_arrays saved, every array in its original dtype."""
    with np.load(path) as f:
        return {name.removesuffix(BF16_SUFFIX): f[name].view(jnp.bfloat16)
                if name.endswith(BF16_SUFFIX) else f[name] for name in f.files}


def flatten(prefix, tree):
    """A pytree's leaves by path name: {"opt_state.m.embed": array, ...}, in leaf order."""
    return {f"{prefix}.{jax.tree_util.keystr(path, simple=True, separator='.')}": leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(prefix, arrays, template):
    """The pytree shaped like template (arrays or shapes) with its leaves taken from arrays by
    path name; None unless every leaf is there with the template's shape and dtype."""
    names = flatten(prefix, template)
    if {n for n in arrays if n.startswith(prefix + ".")} != set(names) or any(
            arrays[n].shape != t.shape or arrays[n].dtype != t.dtype for n, t in names.items()):
        return None
    return jax.tree.unflatten(jax.tree.structure(template), [jnp.asarray(arrays[n]) for n in names])


CKPT_META = {"version", "args", "step", "n_steps", "tokens", "window_start", "window_s",
             "train_time", "elapsed_s", "val_loss", "data_sha256"}


# What a truncated, damaged or foreign checkpoint file raises when it is read.
CKPT_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def load_checkpoint(path):
    """(arrays, meta) of a checkpoint written by main; raises one of CKPT_ERRORS if it cannot."""
    arrays = load_arrays(path)
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("version") == CKPT_VERSION and not (
            CKPT_META <= set(meta) and {"key", "loss_sum"} <= set(arrays)):
        raise KeyError("a field of the format is missing")
    return arrays, meta


def read_checkpoint(path):
    """load_checkpoint for --resume: any problem is one sentence and exit status 2."""
    if not path.exists():
        die(f"there is no checkpoint {path} to resume from; run without --resume to start, or "
            "pass the --out of the run to continue.")
    try:
        arrays, meta = load_checkpoint(path)
    except CKPT_ERRORS as e:
        die(f"checkpoint {path} is truncated or damaged ({type(e).__name__}: {e}); it cannot be "
            "resumed.")
    if meta.get("version") != CKPT_VERSION:
        die(f"checkpoint {path} has format version {meta.get('version')}; this train.py reads "
            f"version {CKPT_VERSION}.")
    return arrays, meta


def take_flags_from_checkpoint(args, given, saved):
    """--resume: every flag comes from the checkpoint's; a typed one must agree with it, unless
    it is one of MAY_CHANGE_ON_RESUME."""
    for name, value in saved.items():
        if name in ("out", "resume") or (name in given and name in MAY_CHANGE_ON_RESUME):
            continue
        if name in given and getattr(args, name) != value:
            die(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's "
                f"{value}; on resume only --tokens, --data, --grad-accum, --log-tokens, "
                "--eval-tokens, --ckpt-tokens and --sample may change.")
        setattr(args, name, value)


def refuse_to_overwrite(out, ckpt_path):
    """A new run may reuse a finished run's folder, never one that can still be resumed."""
    try:
        meta = load_checkpoint(ckpt_path)[1]
    except CKPT_ERRORS:                # none, or unreadable: nothing that could be resumed
        return
    if meta.get("step", 0) < meta.get("n_steps", 0):
        die(f"{out} holds an unfinished run (step {meta['step']:,} of {meta['n_steps']:,}); "
            "continue it with --resume, or pass another --out to start a new one.")


def betas_for(args, tokens_per_step):
    """(b1, b2) of a run: from the flags, or from half-lives in tokens at this step size (§2).
    None where the optimizer keeps no such moment (adafactor: no first, sgd: no second)."""
    b1 = b2 = None
    if args.opt != "adafactor":
        b1 = args.b1 if args.b1 is not None else DEFAULT_B1[args.opt]
        if args.t1:
            b1 = optim.beta_from_halflife(args.t1, tokens_per_step)
    if args.opt != "sgd":                  # β2 from its half-life in tokens unless given (§2)
        b2 = args.b2 if args.b2 is not None else optim.beta_from_halflife(
            args.t2 or DEFAULT_T2, tokens_per_step)
    return b1, b2


def make_optimizer(name, b1, b2, weight_decay=0.0):
    return {"sgd": lambda: optim.sgd(momentum=b1),
            "adam": lambda: optim.adam(b1=b1, b2=b2, weight_decay=weight_decay),
            "adafactor": lambda: optim.adafactor(b2=b2)}[name]()


def accumulation_buffer(params):
    """Gradient accumulation's extra memory: one float32 array per parameter (§9)."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def gradients(params, x, y, cfg, grad_accum=1):
    """(mean loss, gradient) of the batch x, y [B, T].

    With grad_accum K > 1 the batch is split into K micro-batches of B/K sequences, run one after
    another; their gradients are summed into accumulation_buffer and divided by K. The result is
    the full batch's gradient (the loss is a mean over equal-sized parts), computed in K times
    less activation memory, for a parameter-sized buffer and no other gain: the paper's §9 point.
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
    argument, not a constant, so that the study can jax.vmap one step over several rates.
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


def evaluate(params, x, y, cfg):
    """Mean loss over all validation windows x, y [N, T], one window at a time (8 at a time
    measured 2x slower on a 2-core CPU: the [8, T, V] logits make logsumexp memory-bound)."""
    return jax.lax.map(lambda xy: model.loss_fn(params, xy[0][None], xy[1][None], cfg),
                       (x, y)).mean()


def main(argv=None):
    args, given = parse_args(argv)
    modes = [("study", STUDY_FLAGS), ("find_batch", FIND_BATCH_FLAGS), ("memory", set())]
    for mode, reads in modes:
        if getattr(args, mode):
            unread = sorted(given - reads - {mode})
            if unread:
                die(f"--{unread[0].replace('_', '-')} does not apply to --{mode.replace('_', '-')}"
                    ", which reads " + (", ".join(f"--{f.replace('_', '-')}" for f in sorted(
                        reads)) or "no other flag") + ".")
            if mode == "study":
                return study(args, given, "python train.py " + " ".join(
                    sys.argv[1:] if argv is None else argv))
            if mode == "find_batch":
                check_combinations(args)
                return find_batch(args)
            return memory_table()
    bf16 = f"-bf16-{args.rounding or 'stochastic'}" if args.param_dtype == "bfloat16" else ""
    accum = f"-accum{args.grad_accum}" if args.grad_accum > 1 else ""
    out = Path(args.out or f"out/{args.model}-{args.opt}-b{args.batch}{accum}{bf16}")
    ckpt_path = out / "ckpt.npz"
    if args.resume and "grad_accum" in given and not args.out:
        die("--resume with --grad-accum needs --out naming the run's folder: the default folder's "
            "name depends on --grad-accum, so it may not be the run you mean.")
    if args.resume:
        ckpt, meta = read_checkpoint(ckpt_path)
        take_flags_from_checkpoint(args, given, meta["args"])
    check_combinations(args)
    if not args.resume:
        refuse_to_overwrite(out, ckpt_path)
    cfg = model.PRESETS[args.model]
    tokens_per_step = args.batch * cfg.T
    dtype = jnp.dtype(args.param_dtype)
    try:
        train_tokens, val_tokens = data.load(args.data, T=cfg.T, batch=args.batch)
    except data.DataError as e:
        die(str(e))
    data_hash = hashlib.sha256(train_tokens.tobytes() + val_tokens.tobytes()).hexdigest()[:16]
    if args.resume and data_hash != meta["data_sha256"]:
        die(f"the tokens of --data {args.data} differ from those the checkpoint was trained on.")
    budget = args.tokens or data.n_windows(train_tokens, cfg.T) * cfg.T  # default: one pass
    n_steps = budget // tokens_per_step
    if n_steps < 1:
        die(f"--tokens {budget:,} is less than one optimizer step of {tokens_per_step:,} tokens "
            f"(--batch {args.batch} x T = {cfg.T}).")
    start = meta["step"] if args.resume else 0
    if start >= n_steps:
        die(f"the run in {out} has already trained {start:,} of its {n_steps:,} steps; pass a "
            "larger --tokens to train it further.")

    # -- derived settings, printed once ------------------------------------------------------
    lr = args.lr or DEFAULT_LR[args.opt]
    b1, b2 = betas_for(args, tokens_per_step)
    for flag, name, beta in [("--t1", "b1", b1), ("--t2", "b2", b2)]:
        if beta is not None and beta >= 1:   # 0.5 ** (B·T / t) rounds to 1 when t >> B·T
            die(f"{flag} is so long that {name} rounds to 1 at {tokens_per_step:,} tokens per "
                "step, and the average would never move; give a shorter half-life.")
    opt = make_optimizer(args.opt, b1, b2, args.weight_decay)
    betas = "".join(  # each β with its half-life in tokens, e.g. ", b2 0.999991 (half-life 10M)"
        f", {name} {beta:.6g} (half-life "
        f"{fmt_tokens(optim.halflife_from_beta(beta, tokens_per_step))} tokens)"
        for name, beta in [("momentum" if args.opt == "sgd" else "b1", b1), ("b2", b2)]
        if beta) or (", no momentum" if args.opt == "sgd" else "")   # β = 0: no EMA at all
    shapes = jax.eval_shape(lambda: cast(model.init_params(jax.random.key(0), cfg), dtype))
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    n_embed = shapes["embed"].size + shapes["unembed"].size
    state_shapes = jax.eval_shape(opt.init, shapes)
    state_bytes = nbytes(state_shapes)
    accum_bytes = nbytes(jax.eval_shape(accumulation_buffer, shapes)) if args.grad_accum > 1 else 0

    # The output folder comes last: nothing is written before every check above has passed.
    def logged_by_checkpoint(line):    # a crash may have logged past the checkpoint, or cut
        try:                           # the last line short: keep only whole events up to it
            return json.loads(line)["step"] <= start
        except (ValueError, KeyError):
            return False
    try:   # a fresh log, or on resume the log up to the checkpoint
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / "log.jsonl"
        events = (log_path.read_text(errors="replace").splitlines()
                  if args.resume and log_path.exists() else [])
        (out / "log.tmp.jsonl").write_text("".join(
            line + "\n" for line in events if logged_by_checkpoint(line)))
        os.replace(out / "log.tmp.jsonl", log_path)
    except OSError as e:
        die(f"--out {out} cannot be written ({e.strerror}).")
    args.lr, args.tokens, args.out = lr, n_steps * tokens_per_step, str(out)   # as resolved
    print("command    python train.py " + " ".join(   # every flag, as resolved: rerun it to repeat
        f"--{flag.replace('_', '-')}" + ("" if value is True else f" {value}")
        for flag, value in vars(args).items() if value is not None and value is not False))
    print(f"model      {args.model}: {cfg} -> {n_params:,} parameters "
          f"({n_params - n_embed:,} non-embedding + 2 x {n_embed // 2:,} embedding)")
    print(f"data       {args.data}: {len(train_tokens):,} training tokens "
          f"({data.n_windows(train_tokens, cfg.T):,} windows of T + 1), "
          f"{len(val_tokens):,} validation tokens")
    print(f"optimizer  {args.opt}: peak lr {lr:g}{betas}, weight decay {args.weight_decay:g}")
    print(f"schedule   {args.batch} x {cfg.T} = {tokens_per_step:,} tokens/step, "
          f"{n_steps:,} steps, {n_steps * tokens_per_step:,} tokens; warmup {args.warmup:g} "
          f"({math.ceil(args.warmup * n_steps):,} steps), then cosine to 0")
    rounded = f", rounded {args.rounding}" if args.rounding else ""
    print(f"memory     parameters {nbytes(shapes):,} bytes ({args.param_dtype}, {dtype.itemsize} "
          f"bytes each{rounded}), optimizer state {state_bytes:,} bytes (float32)"
          + (f", accumulation buffer {accum_bytes:,} bytes (float32; {args.grad_accum} "
             f"micro-batches of {args.batch // args.grad_accum})" if accum_bytes else ""))
    print(f"device     {jax.devices()[0].device_kind} ({jax.default_backend()}); output in {out}/")

    # -- parameters, optimizer state, and the one jitted step --------------------------------
    if args.resume:   # the checkpoint's state exactly, so the run goes on as if never stopped
        key = jax.random.wrap_key_data(jnp.asarray(ckpt["key"]))
        params = unflatten("params", ckpt, shapes)
        opt_state = unflatten("opt_state", ckpt, state_shapes)
        if params is None or opt_state is None:
            die(f"checkpoint {ckpt_path} does not hold the parameters and state of this model "
                "and optimizer.")
        stats = {"loss_sum": jnp.asarray(ckpt["loss_sum"]), "bad_step": jnp.int32(-1)}
        print(f"resume     from {ckpt_path} at step {start:,} ({fmt_tokens(meta['tokens'])} "
              "tokens)")
    else:
        key = jax.random.key(args.seed)
        params = cast(model.init_params(jax.random.fold_in(key, 0), cfg), dtype)
        opt_state = opt.init(params)
        # the training loss summed over the logging window, and the first step whose loss was
        # not finite (-1: none); both stay on device until they are read
        stats = {"loss_sum": jnp.float32(0), "bad_step": jnp.int32(-1)}
    step_fn = make_train_step(cfg, opt, n_steps, args.warmup, args.grad_accum, args.rounding,
                              key=jax.random.fold_in(key, 2))    # the rounding's random bits
    evaluate_fn = jax.jit(evaluate, static_argnames="cfg")

    val_x, val_y = (jnp.asarray(a) for a in data.val_batches(val_tokens, cfg.T))
    # batches are addressed by step number, so a resumed run sees the data it would have seen
    batch = lambda step: data.get_batch(train_tokens, step, args.batch, cfg.T, args.seed)
    t0 = time.time()
    # compiled ahead of time, once: fixed shapes and the step number as an array mean the step
    # never recompiles; params, state and stats are donated, so they are updated in place
    peak_lr = jnp.float32(lr)
    step_fn = jax.jit(step_fn, donate_argnums=(0, 1, 2)).lower(
        params, opt_state, stats, np.int32(0), *batch(0), peak_lr).compile()
    print(f"compiled the train step in {time.time() - t0:.1f} s")

    log_file = open(out / "log.jsonl", "a")
    def log(**event):
        log_file.write(json.dumps(event) + "\n")
        log_file.flush()

    def run_eval(step):
        val_loss = float(evaluate_fn(params, val_x, val_y, cfg=cfg))
        log(step=step, tokens=step * tokens_per_step, val_loss=val_loss)
        print(f"step {step:>6,}/{n_steps:,} | validation loss {val_loss:.4f}")
        return val_loss

    all_finite = jax.jit(lambda tree: jnp.all(jnp.array(
        [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)])))

    def check_finite(done):
        """Stop, keeping the last good checkpoint, if a loss or the parameters are not finite.
        A non-finite gradient is caught too: it makes the parameters non-finite, then the loss."""
        bad = int(stats["bad_step"])                      # a host sync: once per log or save
        if bad < 0 and not all_finite(params):
            bad = done - 1                                # went bad at this step at the latest
        if bad >= 0:
            lr_bad = float(optim.lr_at(bad, n_steps, lr, args.warmup))
            log(step=bad + 1, tokens=(bad + 1) * tokens_per_step, diverged=True, lr=lr_bad)
            print(f"error: the run diverged: the loss or the parameters were not finite by "
                  f"step {bad + 1:,} ({(bad + 1) * tokens_per_step:,} tokens seen, "
                  f"learning rate {lr_bad:.3g}); {ckpt_path} keeps the last good state, from "
                  f"step {saved_step:,}. Start a new run with a lower --lr (resuming would "
                  "repeat this).", file=sys.stderr)
            sys.exit(3)

    def save_checkpoint(done):
        """Everything needed to go on exactly from step `done`, written atomically."""
        meta = {"version": CKPT_VERSION, "args": vars(args), "step": done, "n_steps": n_steps,
                "tokens": done * tokens_per_step, "window_start": window_start,
                "window_s": time.time() - t_window, "train_time": train_time,
                "elapsed_s": time.time() - t_start,
                "val_loss": val_loss, "data_sha256": data_hash}
        save_arrays(ckpt_path, {**flatten("params", params), **flatten("opt_state", opt_state),
                                "loss_sum": stats["loss_sum"], "key": jax.random.key_data(key),
                                "meta": np.array(json.dumps(meta))})

    # Ctrl-C lets the current step finish, then the loop stops and a checkpoint is written;
    # a second Ctrl-C aborts at once (the last checkpoint stays whole: it is written atomically).
    interrupted = []
    def on_sigint(*_):
        interrupted.append(True)
        signal.signal(signal.SIGINT, previous_handler)
    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    # -- the loop ----------------------------------------------------------------------------
    # true on the step whose tokens pass a multiple of `every`, whatever the tokens per step
    crossed = lambda tokens, every: tokens // every > (tokens - tokens_per_step) // every
    if args.resume:    # the logging window and the clocks carry on from the checkpoint
        window_start, train_time = meta["window_start"], meta["train_time"]
        val_loss = meta["val_loss"]
        t_start, t_window = time.time() - meta["elapsed_s"], time.time() - meta["window_s"]
    else:
        window_start, train_time, t_start = 0, 0.0, time.time()
        val_loss = run_eval(0)
        t_window = time.time()
        save_checkpoint(0)                 # so that a checkpoint exists from the first step on
    saved_step = done = start
    try:
        for step in range(start, n_steps):
            params, opt_state, stats = step_fn(params, opt_state, stats, np.int32(step),
                                               *batch(step), peak_lr)
            done, tokens = step + 1, (step + 1) * tokens_per_step
            last, stop = done == n_steps, bool(interrupted)   # a later Ctrl-C: next step
            log_now = crossed(tokens, args.log_tokens) or last
            eval_now = crossed(tokens, args.eval_tokens) or last
            save_now = crossed(tokens, args.ckpt_tokens) or last or stop
            if log_now or eval_now or save_now:
                check_finite(done)       # nothing bad is logged or saved; waits for the steps
            if log_now:
                train_loss = float(stats["loss_sum"]) / (done - window_start)  # host sync
                dt = time.time() - t_window
                train_time += dt
                tok_per_s = (done - window_start) * tokens_per_step / dt
                lr_now = float(optim.lr_at(step, n_steps, lr, args.warmup))
                log(step=done, tokens=tokens, train_loss=train_loss, lr=lr_now,
                    tok_per_s=tok_per_s, elapsed_s=time.time() - t_start)
                print(f"step {done:>6,}/{n_steps:,} | tokens {fmt_tokens(tokens):>6} | "
                      f"loss {train_loss:.4f} | lr {lr_now:.2e} | {tok_per_s:,.0f} tok/s | "
                      f"eta {(n_steps - done) * train_time / done / 60:.1f} min")
                stats["loss_sum"], window_start = jnp.float32(0), done
                t_window = time.time()
            if eval_now:
                t_eval = time.time()
                val_loss = run_eval(done)
                t_window += time.time() - t_eval
            if save_now:
                t_save = time.time()
                save_checkpoint(done)
                saved_step = done
                t_window += time.time() - t_save
            if stop:
                break
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        log_file.close()

    # -- save and sample ---------------------------------------------------------------------
    save_arrays(out / "params.npz", params)
    config = {"model": dataclasses.asdict(cfg), "args": vars(args), "b1": b1, "b2": b2,
              "tokens_per_step": tokens_per_step, "n_steps": n_steps, "steps_done": done,
              "final_val_loss": val_loss, "elapsed_s": time.time() - t_start,
              "versions": {"python": platform.python_version(), "jax": jax.__version__,
                           "numpy": np.__version__}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"saved {ckpt_path}, {out}/params.npz and {out}/config.json")
    if stop:                            # interrupted before the last step
        print(f"interrupted at step {done:,} of {n_steps:,}; to go on exactly from there: "
              f"python train.py --resume --out {out}", file=sys.stderr)
        sys.exit(130)
    print(f"final validation loss {val_loss:.4f} after {fmt_tokens(done * tokens_per_step)} tokens")
    if args.sample:
        prompt = data.encode("\n")
        ids = model.generate(params, cfg, prompt, args.sample, jax.random.fold_in(key, 1))
        print(f"--- sample ({args.sample} tokens) ---\n{data.decode(ids)}")


# -- the batch-size study: the paper's Fig. 1, 3 and 4 at classroom scale ----------------------
# python train.py --study trains every (batch size, optimizer setting) cell of the grid below on
# the same token budget, each at four peak learning rates a factor 2 apart, and writes
# <out>/study.md, study.json and (with matplotlib) study.png. README, "The batch-size study".
STUDY_MODEL = model.Config(V=4_096, D=64, L=2, H=1, T=32)   # about 20 min on a 2-core CPU
STUDY_TOKENS = 204_800        # every run's budget: 6,400 steps at B = 1, 100 at B = 64
STUDY_BATCHES = (1, 4, 16, 64)
STUDY_MAX_SHIFTS = 3          # a cell's grid moves at most this often to bracket its best rate
# name: (optimizer, β2, the learning rates tried at B = 1). β2 "t2" holds the second moment's
# half-life fixed in tokens (§2): the half-life β2 = 0.95 has at the largest batch, so that the
# two adam rows start from the same large-batch setting and part as the batch shrinks.
STUDY_SETTINGS = {
    "sgd": ("sgd", None, (0.25, 0.5, 1.0, 2.0)),
    "adam, t2 fixed": ("adam", "t2", (1e-3, 2e-3, 4e-3, 8e-3)),
    "adam, b2 = 0.95": ("adam", 0.95, (5e-4, 1e-3, 2e-3, 4e-3)),
    "adafactor": ("adafactor", "t2", (1e-2, 2e-2, 4e-2, 8e-2)),
}
SINGLE = " (single run)"      # the row name of the accumulation comparison's runs
STUDY_FLAGS = {"model", "tokens", "data", "seed", "out"}   # the flags --study reads


def train_lanes(cfg, opt, lrs, batch, n_steps, train, val, seed, grad_accum=1):
    """Train one run per peak learning rate in lrs, in lockstep on the same batches from the same
    initialization (jax.vmap over the rates); (final validation losses, seconds, step memory).

    The step is main's, so a lane is exactly `python train.py` at that --lr, without logging.
    Seconds: the wall time of the compiled steps (no compilation, no evaluation). Step memory is
    XLA's estimate of the compiled step's temporaries (activations and the like).
    """
    key = jax.random.key(seed)
    lanes = lambda tree: jax.tree.map(lambda a: jnp.repeat(a[None], len(lrs), axis=0), tree)
    params = model.init_params(jax.random.fold_in(key, 0), cfg)     # main's initialization
    params, opt_state = lanes(params), lanes(opt.init(params))
    stats = lanes({"loss_sum": jnp.float32(0), "bad_step": jnp.int32(-1)})
    batch_at = lambda step: data.get_batch(train, step, batch, cfg.T, seed)
    step_fn = jax.vmap(make_train_step(cfg, opt, n_steps, warmup=0.05, grad_accum=grad_accum),
                       in_axes=(0, 0, 0, None, None, None, 0))      # lanes share step and batch
    lrs = jnp.asarray(lrs, jnp.float32)
    step_fn = jax.jit(step_fn, donate_argnums=(0, 1, 2)).lower(
        params, opt_state, stats, np.int32(0), *batch_at(0), lrs).compile()
    step_bytes = step_fn.memory_analysis().temp_size_in_bytes
    t0 = time.time()
    for step in range(n_steps):
        params, opt_state, stats = step_fn(params, opt_state, stats, np.int32(step),
                                           *batch_at(step), lrs)
    jax.block_until_ready(params)
    seconds = time.time() - t0
    val_xy = [jnp.asarray(a) for a in data.val_batches(val, cfg.T)]
    losses = jax.jit(jax.vmap(evaluate, in_axes=(0, None, None, None)), static_argnums=3)(
        params, *val_xy, cfg)
    return [float(l) for l in losses], seconds, step_bytes


def study_cell(run, grid):
    """Train a cell's four rates, then move the grid a factor 2 at a time (training the one new
    rate) while its best loss sits at an edge; the four rates around the best are reported.
    run(lrs) -> losses. Returns (grid, {lr: loss} of every rate tried)."""
    tried = dict(zip(grid, run(grid)))
    for _ in range(STUDY_MAX_SHIFTS):
        best = int(np.argmin([_loss_or_inf(tried[lr]) for lr in grid]))
        if 0 < best < len(grid) - 1:
            break
        new = grid[0] / 2 if best == 0 else grid[-1] * 2
        if new not in tried:
            tried[new] = run([new])[0]
        grid = sorted([new, *grid])[:-1] if best == 0 else sorted([*grid, new])[1:]
    return grid, tried


def _loss_or_inf(loss):
    return math.inf if loss is None else loss      # None: diverged, never the best


def fmt_loss(loss):
    return "diverged" if loss is None else f"{loss:.3f}"


def study_optimizer(setting, batch, cfg, t2):
    """The optimizer of one study row at one batch size: β1 = 0.9 for adam (§2), none for sgd."""
    name, b2, _ = STUDY_SETTINGS[setting]
    if b2 == "t2":
        b2 = optim.beta_from_halflife(t2, batch * cfg.T)
    return make_optimizer(name, DEFAULT_B1.get(name), b2), b2


def study(args, given, command):
    """python train.py --study: the grid of STUDY_SETTINGS x STUDY_BATCHES at an equal budget."""
    t_start = time.time()
    cfg = model.PRESETS[args.model] if "model" in given else STUDY_MODEL
    budget = args.tokens or STUDY_TOKENS
    out = Path(args.out or "out/study")
    try:
        train_tokens, val_tokens = data.load(args.data, T=cfg.T, batch=max(STUDY_BATCHES))
    except data.DataError as e:
        die(str(e))
    if cfg.V <= data.EOT:                       # the study's CPU model: a compact vocabulary
        train_tokens, val_tokens = data.compact_vocab(train_tokens, val_tokens, cfg.V)
    big_step = max(STUDY_BATCHES) * cfg.T       # every batch size divides the largest, so
    if budget < big_step:                       # a multiple of its step is the same for all
        die(f"--tokens {budget:,} is less than one step at batch {max(STUDY_BATCHES)} "
            f"({big_step:,} tokens); the study needs at least that.")
    budget -= budget % big_step
    t2 = optim.halflife_from_beta(0.95, max(STUDY_BATCHES) * cfg.T)
    config = {"model": dataclasses.asdict(cfg), "tokens": budget, "batches": STUDY_BATCHES,
              "settings": STUDY_SETTINGS, "t2": t2, "seed": args.seed, "warmup": 0.05,
              "data_sha256": hashlib.sha256(
                  train_tokens.tobytes() + val_tokens.tobytes()).hexdigest()[:16]}
    config = json.loads(json.dumps(config))     # tuples as lists, as they come back from a file
    try:
        out.mkdir(parents=True, exist_ok=True)
        previous = json.loads((out / "study.json").read_text())
    except OSError as e:
        if not isinstance(e, FileNotFoundError):
            die(f"--out {out} cannot be written ({e.strerror}).")
        previous = {}
    except ValueError:
        die(f"{out}/study.json is not a study's JSON file; pass another --out or remove it.")
    if previous.get("runs") and previous.get("config") != config:   # never overwrite a result
        die(f"{out}/study.json holds a study with other settings (model, tokens, data or seed); "
            "pass another --out, or remove it to start over.")
    # runs of an earlier (interrupted or finished) study with the same settings are reused
    runs = previous.get("runs", [])
    done = {(r["setting"], r["batch"], r["grad_accum"], r["lr"]): r for r in runs}
    # (a run's key: its row, batch, micro-batches and lr; the comparison's single runs have
    # their own row name, as their wall time is one run's, not a share of a cell's lanes)
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
    print(f"study      {len(STUDY_SETTINGS)} optimizer settings x batch sizes "
          f"{', '.join(map(str, STUDY_BATCHES))}, 4 learning rates each (more where a grid "
          f"moves), {fmt_tokens(budget)} tokens per run")
    print(f"model      {cfg} ({vocab}); t2 = {fmt_tokens(t2)} tokens; results in {out}/")
    try:
        study_grid(result, cfg, budget, t2, train_runs, save, t_start)
        result["seconds"] = time.time() - t_start
        save()
        (out / "study.md").write_text(study_markdown(result))
        print(study_markdown(result))
        plot_study(result, out / "study.png")
    except KeyboardInterrupt:
        print(f"interrupted; {out}/study.json keeps the {len(runs)} finished runs; run the same "
              "command again to go on from there", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        die(f"--out {out} cannot be written ({e.strerror}); {out}/study.json keeps the "
            f"finished runs.")
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
            best = int(np.argmin([_loss_or_inf(l) for l in losses]))
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

    # Gradient accumulation (§9): B = 1 against B = max at the same tokens, with and without
    # accumulation down to micro-batches of 1, each at its own best rate from the grid above.
    setting, big = "adam, t2 fixed", max(STUDY_BATCHES)
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
    for batch, k in [(1, 1), (big, 1), (big, big)]:
        lr = result["cells"][setting][str(batch)]["best_lr"]
        r = train_runs(setting + SINGLE, batch, [lr], grad_accum=k)[0]
        opt, _ = study_optimizer(setting, batch, cfg, t2)
        result["accumulation"].append({
            "batch": batch, "grad_accum": k, "lr": lr, "val_loss": r["val_loss"],
            "steps": budget // (batch * cfg.T), "seconds": r["seconds"],
            "params_bytes": nbytes(shapes),
            "opt_state_bytes": nbytes(jax.eval_shape(opt.init, shapes)),
            "buffer_bytes": nbytes(jax.eval_shape(accumulation_buffer, shapes)) if k > 1 else 0,
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
every run trains {c['tokens']:,} tokens (warmup {c['warmup']:g}, then cosine to 0) and is scored \
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
    for ax, (setting, cell) in zip(np.atleast_1d(axes), cells.items()):
        for batch, c in cell.items():
            lrs = sorted(c["tried"], key=float)
            ax.plot([float(lr) for lr in lrs], [math.nan if c["tried"][lr] is None
                                                else c["tried"][lr] for lr in lrs],
                    "o-", label=f"B = {batch}")
        tried = sorted({float(lr) for c in cell.values() for lr in c["tried"]})
        ax.set(xscale="log", title=setting, xlabel="peak learning rate",
               ylim=(min(finite) - 0.1, max(finite) + 0.5))  # every best; far-off runs clipped
        ax.minorticks_off()
        ax.set_xticks(tried, [f"{lr:g}" for lr in tried], rotation=45, fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("final validation loss")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# -- memory and the right batch size (§9, §10) --------------------------------------------------
MEMORY_PRESETS = ("30m", "gpt2", "gpt3xl")
FIND_BATCH_FLAGS = {"model", "opt", "lr", "b1", "t1", "b2", "t2", "param_dtype", "rounding",
                    "weight_decay", "data", "seed"}


def memory_rows():
    """Bytes held by the weights, each optimizer's state and the accumulation buffer of the large
    presets, from the pytrees the code builds (jax.eval_shape allocates nothing): one dict per
    (preset, weight dtype). Optimizer state and the buffer are float32 whatever the weights."""
    rows = []
    for name in MEMORY_PRESETS:
        cfg = model.PRESETS[name]
        for dtype in ("float32", "bfloat16"):
            shapes = jax.eval_shape(lambda: cast(model.init_params(jax.random.key(0), cfg), dtype))
            rows.append({"model": name, "dtype": dtype, "params": sum(
                x.size for x in jax.tree.leaves(shapes)), "weights": nbytes(shapes), **{
                f"{opt} state": nbytes(jax.eval_shape(make_optimizer(
                    opt, DEFAULT_B1.get(opt), 0.999).init, shapes))
                for opt in ("sgd", "adam", "adafactor")},
                "accumulation buffer": nbytes(jax.eval_shape(accumulation_buffer, shapes))})
    return rows


def fmt_bytes(n):
    return next(f"{n / scale:.3g} {unit}" for scale, unit in
                [(1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "bytes")] if n >= scale or scale == 1)


def memory_table():
    """python train.py --memory: memory_rows as a markdown table."""
    rows = memory_rows()
    columns = list(rows[0])[3:]
    print("| model | parameters | weights dtype | " + " | ".join(columns) + " |\n"
          + "|---" * (3 + len(columns)) + "|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:,.1f}M | {r['dtype']} | "
              + " | ".join(fmt_bytes(r[c]) for c in columns) + " |")


def throughput_stopped_rising(tok_s):
    """True once two doublings of B in a row gained less than 5 % over the best before them."""
    return len(tok_s) >= 3 and max(tok_s[-2:]) < 1.05 * max(tok_s[:-2])


def pick_batch(rows):
    """The smallest B whose tokens/s is within 10 % of the best: the paper's rule (§10, §11)."""
    best = max(tok_s for _, tok_s in rows)
    return min(b for b, tok_s in rows if tok_s >= 0.9 * best)


def find_batch(args):
    """python train.py --find-batch: time the train step at B = 1, 2, 4, ... on this device until
    throughput stops rising, and recommend the smallest B within 10 % of the best (§10, §11)."""
    cfg, dtype = model.PRESETS[args.model], jnp.dtype(args.param_dtype)
    try:
        train_tokens, _ = data.load(args.data, T=cfg.T, batch=1)
    except data.DataError as e:
        die(str(e))
    key = jax.random.key(args.seed)
    device = jax.devices()[0]
    print(f"find-batch {args.model} ({cfg}), {args.opt}, {args.param_dtype} weights, on "
          f"{device.device_kind} ({jax.default_backend()}); each B: compile, two untimed steps, "
          "then 2 s or more of steps")
    print(f"{'B':>6} {'tokens/step':>12} {'ms/step':>9} {'tokens/s':>10}  memory")
    rows, batch = [], 1
    while batch <= data.n_windows(train_tokens, cfg.T):
        b1, b2 = betas_for(args, batch * cfg.T)
        opt = make_optimizer(args.opt, b1, b2, args.weight_decay)
        params = cast(model.init_params(jax.random.fold_in(key, 0), cfg), dtype)
        state = opt.init(params)
        stats = {"loss_sum": jnp.float32(0), "bad_step": jnp.int32(-1)}
        lr = jnp.float32(args.lr or DEFAULT_LR[args.opt])
        x, y = data.get_batch(train_tokens, 0, batch, cfg.T, args.seed)
        step_fn = make_train_step(cfg, opt, n_steps=1_000, warmup=0.05,
                                  rounding=args.rounding, key=jax.random.fold_in(key, 2))
        try:
            step_fn = jax.jit(step_fn, donate_argnums=(0, 1, 2)).lower(
                params, state, stats, np.int32(0), x, y, lr).compile()
            params, state, stats = jax.block_until_ready(step_fn(params, state, stats,
                                                                 np.int32(0), x, y, lr))
            t0 = time.time()       # a step with a host sync, to size the timed run
            params, state, stats = jax.block_until_ready(step_fn(params, state, stats,
                                                                 np.int32(1), x, y, lr))
            n = max(3, math.ceil(2.0 / (time.time() - t0)))
            t0 = time.time()
            for step in range(2, n + 2):   # the same batch: timing only, no host sync inside
                params, state, stats = step_fn(params, state, stats, np.int32(step), x, y, lr)
            jax.block_until_ready(params)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"{batch:>6} out of device memory")
            break
        seconds = (time.time() - t0) / n
        used = device.memory_stats()       # None on CPU: then XLA's estimate for the step
        memory = (f"{used['peak_bytes_in_use'] / 1e9:.2f} GB peak on the device so far"
                  if used and "peak_bytes_in_use" in used else
                  f"{step_fn.memory_analysis().temp_size_in_bytes / 1e9:.3f} GB of step "
                  "temporaries (XLA's estimate)")
        rows.append((batch, batch * cfg.T / seconds))
        print(f"{batch:>6} {batch * cfg.T:>12,} {seconds * 1e3:>9.1f} {rows[-1][1]:>10,.0f}  "
              + memory)
        if throughput_stopped_rising([tok_s for _, tok_s in rows]):
            break
        batch *= 2
    if not rows:
        die(f"batch 1 of --model {args.model} does not fit in {device.device_kind}'s memory; "
            "try a smaller --model or --param-dtype bfloat16.")
    pick = pick_batch(rows)
    print(f"recommended: --batch {pick}, the smallest batch within 10 % of the best throughput "
          f"({max(tok_s for _, tok_s in rows):,.0f} tokens/s): the paper's rule, §10")
    return pick


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a training loop, or a second one inside it
        print("interrupted; the files written before it (checkpoints, study.json) are whole",
              file=sys.stderr)
        sys.exit(130)
