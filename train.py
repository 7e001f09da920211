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
MAY_CHANGE_ON_RESUME = {"tokens", "log_tokens", "eval_tokens", "ckpt_tokens", "sample", "data"}


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
    add("--out", help="output folder (default out/<model>-<opt>-b<batch>, plus -bf16-<rounding> "
        "for bf16 weights)")
    add("--log-tokens", type=count, default=16_384,
        help="log every this many tokens (default 16384)")
    add("--eval-tokens", type=count, default=100_000,
        help="evaluate on the validation split every this many tokens and at the end "
        "(default 100000)")
    add("--ckpt-tokens", type=count, default=100_000,
        help="write <out>/ckpt.npz every this many tokens, at the end and on Ctrl-C (default "
        "100000; raise it on a GPU, where a checkpoint can take longer than 100k tokens)")
    add("--resume", action="store_true",
        help="continue the run in --out from its checkpoint, exactly; only --tokens, --data and "
        "the logging, checkpoint and sample flags may change")
    add("--sample", type=int, default=200, help="tokens to sample at the end (default 200)")
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
                f"{value}; on resume only --tokens, --data, --log-tokens, --eval-tokens, "
                "--ckpt-tokens and --sample may change.")
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


def main(argv=None):
    args, given = parse_args(argv)
    bf16 = f"-bf16-{args.rounding or 'stochastic'}" if args.param_dtype == "bfloat16" else ""
    out = Path(args.out or f"out/{args.model}-{args.opt}-b{args.batch}{bf16}")
    ckpt_path = out / "ckpt.npz"
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
    b1 = b2 = None                         # adafactor keeps no first moment, sgd no second
    if args.opt != "adafactor":
        b1 = args.b1 if args.b1 is not None else DEFAULT_B1[args.opt]
        if args.t1:
            b1 = optim.beta_from_halflife(args.t1, tokens_per_step)
    if args.opt != "sgd":                  # β2 from its half-life in tokens unless given (§2)
        b2 = args.b2 if args.b2 is not None else optim.beta_from_halflife(
            args.t2 or DEFAULT_T2, tokens_per_step)
    for flag, name, beta in [("--t1", "b1", b1), ("--t2", "b2", b2)]:
        if beta is not None and beta >= 1:   # 0.5 ** (B·T / t) rounds to 1 when t >> B·T
            die(f"{flag} is so long that {name} rounds to 1 at {tokens_per_step:,} tokens per "
                "step, and the average would never move; give a shorter half-life.")
    opt = {"sgd": lambda: optim.sgd(momentum=b1),
           "adam": lambda: optim.adam(b1=b1, b2=b2, weight_decay=args.weight_decay),
           "adafactor": lambda: optim.adafactor(b2=b2)}[args.opt]()
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
          f"bytes each{rounded}), optimizer state {state_bytes:,} bytes (float32)")
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
    round_key = jax.random.fold_in(key, 2)   # stochastic rounding: fold in the step, then the leaf

    def train_step(params, opt_state, stats, step, x, y):
        loss, grads = jax.value_and_grad(model.loss_fn)(params, x, y, cfg)
        lr_now = optim.lr_at(step, n_steps, lr, args.warmup)
        # grads come in the parameters' dtype; every optimizer computes in float32 (optim.py)
        updates, opt_state = opt.update(grads, opt_state, params, lr_now)
        params = optim.apply_updates(params, updates, jax.random.fold_in(round_key, step),
                                     args.rounding or "nearest")
        # the loss is checked every step; a pass over all parameters costs 15 % of a CPU step
        # here, so check_finite below checks them only before they are logged or saved
        bad_step = jnp.where((stats["bad_step"] < 0) & ~jnp.isfinite(loss), step, stats["bad_step"])
        return params, opt_state, {"loss_sum": stats["loss_sum"] + loss, "bad_step": bad_step}

    @jax.jit
    def evaluate(params, x, y):
        # mean loss over all validation windows, one window at a time (8 at a time measured
        # 2x slower on a 2-core CPU: the [8, T, V] logits make logsumexp memory-bound)
        return jax.lax.map(lambda xy: model.loss_fn(params, xy[0][None], xy[1][None], cfg),
                           (x, y)).mean()

    val_x, val_y = (jnp.asarray(a) for a in data.val_batches(val_tokens, cfg.T))
    # batches are addressed by step number, so a resumed run sees the data it would have seen
    batch = lambda step: data.get_batch(train_tokens, step, args.batch, cfg.T, args.seed)
    t0 = time.time()
    # compiled ahead of time, once: fixed shapes and the step number as an array mean the step
    # never recompiles; params, state and stats are donated, so they are updated in place
    step_fn = jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(
        params, opt_state, stats, np.int32(0), *batch(0)).compile()
    print(f"compiled the train step in {time.time() - t0:.1f} s")

    log_file = open(out / "log.jsonl", "a")
    def log(**event):
        log_file.write(json.dumps(event) + "\n")
        log_file.flush()

    def run_eval(step):
        val_loss = float(evaluate(params, val_x, val_y))
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
                                               *batch(step))
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


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before the loop started, or a second one inside it
        print("interrupted before a new checkpoint was written; an earlier one, if any, is whole",
              file=sys.stderr)
        sys.exit(130)
