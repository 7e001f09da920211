"""Train the paper's GPT at any batch size, down to 1, with hand-written SGD, Adam, Adafactor, Muon.

    python train.py --batch 1 --opt sgd          # the paper's headline: vanilla SGD at batch size 1
    python train.py --batch 1 --opt adam         # Adam, β2 from a 10M-token half-life
    python train.py --resume --out out/tiny-sgd-b1 --sample 200 --prompt "ROMEO:"   # sample it
    python train.py --help                       # every flag, with its meaning and default

Read it top to bottom: the settings a student tunes (the flags), the train step, main and its
loop; then, one fenced section each, the plumbing. Writes <out>/log.jsonl (one JSON object per
event), ckpt.npz (all a resume needs), params.npz and config.json. Exit status: 0 done, 2 a
mistake in the flags or files, 3 diverged, 130 interrupted (Ctrl-C).
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
import threading
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

import data
import model
import optim


# -- the settings a student tunes: every flag, its meaning and its default ----------------------
# (Parser and count, which check them, are plumbing: they follow main, as does PAPER_SETTINGS,
# the official code's tuned values that replace these defaults at the paper's presets.)

def common_flags():
    """What is trained on what, and how it is updated and stored (experiments/ reuse these)."""
    p = Parser(add_help=False)
    add, table = p.add_argument, optim.OPTIMIZERS
    add("--model", choices=list(model.PRESETS), default="tiny", help="model preset (%(default)s)")
    add("--data", default=os.path.relpath(data.DEFAULT_TEXT), help="a UTF-8 text, or .bin token "
        "files (llm.c's or nanoGPT's), one or a quoted glob (default: shipped Shakespeare)")
    add("--val-data", help="validation tokens, from a text or .bin token files (default: the last "
        f"10 %% of --data); the first {data.MAX_VAL_TOKENS:,} at most")
    add("--seed", type=int, default=0, help="seeds init, data order and rounding (%(default)s)")
    add("--opt", choices=list(table), default="sgd", help="optimizer (%(default)s)")
    add("--lr", type=float, help="peak learning rate (default: the paper's at its presets, "
        "train.PAPER_SETTINGS; else " + ", ".join(f"{name} {o['lr']:g}" for name, o in
                                                  table.items()) + ")")
    add("--adam-lr", type=float, help="muon only: the peak learning rate of its Adam for the "
        f"embeddings (default adam's, {table['adam']['lr']:g}, or the paper's at its presets)")
    b1, b2 = p.add_mutually_exclusive_group(), p.add_mutually_exclusive_group()
    b1.add_argument("--b1", type=float, help="first-moment decay: β1 (adam 0.9), momentum (sgd 0, "
                    "muon 0.95)")
    b1.add_argument("--t1", type=count, help="first-moment half-life in tokens, instead of --b1 "
                    "(default: the paper's at its presets, for adam)")
    b2.add_argument("--b2", type=float, help="second-moment decay β2 (adam, adafactor, muon)")
    b2.add_argument("--t2", type=count, help="second-moment half-life in tokens, instead of --b2 "
                    "(default 10M, the paper's: β2 then follows the batch size; at gpt2 and "
                    "gpt3xl their β2 0.9999 at B = 1)")
    add("--weight-decay", type=float, default=0.0,
        help="decoupled weight decay, adam only (%(default)s, as the paper at small batch)")
    add("--adafactor-decay", choices=["constant", "power"], help="adafactor's β2: constant, from "
        "--t2/--b2 (the paper's; default), or the official code's β2_t = 1 − t^(−β2)")
    add("--param-dtype", choices=["float32", "bfloat16"], default="float32",
        help="the parameters' dtype (%(default)s); optimizer state and math stay float32")
    add("--compute-dtype", choices=["float32", "bfloat16"], help="the dtype the matrix "
        "multiplies take (default the parameters'); activations, norms and the loss stay float32")
    add("--rounding", choices=["nearest", "stochastic"], help="how bfloat16 parameters are rounded "
        "(default stochastic, Fig. 9)")
    return p


def make_parser():
    p = Parser(description="Train a GPT at small batch sizes (Marek et al., 2025).",
               parents=[common_flags()])
    add = p.add_argument
    add("--batch", type=int, default=1, help="sequences per optimizer step, B (%(default)s)")
    add("--grad-accum", type=int, default=1, help="split each step's batch into this many "
        "micro-batches whose gradients are summed in float32 (default 1: none)")
    add("--warmup", type=float, default=0.05, help="fraction of steps in warmup, rounded down to "
        "whole steps as the official code (%(default)s)")
    add("--schedule", choices=["cosine", "constant"], default="cosine", help="after warmup, cosine "
        "to 0 (the paper's pretraining; default) or the peak to the end (its fine-tuning)")
    add("--init-from", metavar="RUN", help="fine-tune: start from the parameters of the finished "
        "run in folder RUN (its params.npz, on its --model), not its optimizer state or step")
    add("--remat", action="store_true", help="recompute blocks in the backward pass (less memory)")
    add("--attention", choices=["einsum", "fused"], default="einsum", help="written out (default), "
        "or jax.nn.dot_product_attention (cuDNN's fused kernel on NVIDIA GPUs)")
    add("--tokens", type=count, help="training budget in tokens (default: one pass over the data; "
        "at the paper's presets its budget, 20 tokens per active parameter, if the data hold it)")
    add("--out", help="output folder (default out/<model>-<opt>-b<batch>, plus -accum<N> with "
        "--grad-accum N, -bf16-<rounding> for bf16 weights, -from-<folder> with --init-from)")
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
    return device_flags(p)                # and where it runs: devices and hosts (after main)


# -- the train step: gradient, accumulation, optimizer, rounding --------------------------------

def betas_of(s, tokens_per_step):
    """{"b1": β1, "b2": β2} of the settings' --opt, only the β's it keeps: from --b1/--b2, or
    from a half-life in tokens at this step size (the paper's rule, Fig. 3, 4), or the table's."""
    o = optim.OPTIMIZERS[s.opt]
    betas = {}
    if o["b1"] is not None:      # a β by default (Adam's 0.9), or from --t1's half-life
        betas["b1"] = (optim.beta_from_halflife(s.t1, tokens_per_step) if s.t1 else
                       o["b1"] if s.b1 is None else s.b1)
    if o["t2"] is not None:      # from a half-life by default (10M tokens), or --b2
        betas["b2"] = (optim.beta_from_halflife(s.t2 or o["t2"], tokens_per_step)
                       if s.b2 is None else s.b2)
    for b, beta in betas.items():
        if beta >= 1:            # 0.5 ** (B·T / t) rounds to 1 when t >> B·T
            raise UsageError(f"--t{b[1]} is so long that {b} rounds to 1 at {tokens_per_step:,} "
                             "tokens per step, and the average would never move; give a shorter "
                             "half-life.")
    return betas


def make_optimizer(s, tokens_per_step, heads):
    """(optimizer, its β's) of the settings' --opt, from its line in optim.OPTIMIZERS. heads: the
    model's, which muon orthogonalizes apart."""
    o, betas = optim.OPTIMIZERS[s.opt], betas_of(s, tokens_per_step)
    extra = {"weight_decay": s.weight_decay} if o["decay"] else {}
    if s.adafactor_decay == "power":    # the official code's β2 is the schedule's exponent
        extra["decay_power"] = betas["b2"]
    if s.opt in ("adafactor", "muon"):   # both cut q, k, v and the output per head (optim.py)
        extra["heads"] = heads
    if s.opt == "muon":    # its Adam part's own peak rate, on the same schedule
        extra["adam_scale"] = s.adam_lr / s.lr
    return o["make"](**betas, **extra), betas


def accumulation_buffer(params):
    """Gradient accumulation's extra memory: one float32 array per parameter."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def gradients(params, x, y, cfg, grad_accum=1, sharding=None):
    """(mean loss, gradient) of the batch x, y [B, T]. With grad_accum > 1: that many micro-batches
    run one after another, their gradients summed into accumulation_buffer: the same gradient in
    less activation memory, for a parameter-sized buffer and no other gain (the paper's point).
    Each micro-batch keeps the batches' sharding over devices (else XLA gathers it everywhere)."""
    if grad_accum == 1:
        return jax.value_and_grad(model.loss_fn)(params, x, y, cfg)

    def micro_batches(a):                              # [grad_accum, B / grad_accum, T]
        a = a.reshape(grad_accum, a.shape[0] // grad_accum, *a.shape[1:])
        return a if sharding is None else jax.lax.with_sharding_constraint(a, sharding)

    def add_micro_batch(total, xy):
        loss, g = jax.value_and_grad(model.loss_fn)(params, *xy, cfg)
        return jax.tree.map(lambda total, g: total + g.astype(jnp.float32), total, g), loss

    total, losses = jax.lax.scan(add_micro_batch, accumulation_buffer(params),
                                 (micro_batches(x), micro_batches(y)))
    return losses.mean(), jax.tree.map(lambda g: g / grad_accum, total)


def make_train_step(cfg, opt, n_steps, warmup, grad_accum=1, rounding=None, key=None,
                    schedule="cosine", sharding=None):
    """The step to jit: (params, opt_state, stats, step, x, y, peak_lr) -> (params, opt_state,
    stats), at optim.lr_at's rate. stats: the loss summed since the last log, and the first step
    whose loss was not finite (or -1), on device until read. peak_lr is an array: the study vmaps
    over rates. key: the run's, for stochastic rounding; sharding: the batches' (gradients)."""
    def train_step(params, opt_state, stats, step, x, y, peak_lr):
        loss, grads = gradients(params, x, y, cfg, grad_accum, sharding)
        lr = optim.lr_at(step, n_steps, peak_lr, warmup, schedule)
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


@functools.partial(jax.jit, static_argnames="cfg")
def evaluate(params, x, y, cfg):
    """Mean loss over all validation windows x, y [N, T], one window at a time (8 at a time
    measured 2x slower on a 2-core CPU: the [8, T, V] logits make logsumexp memory-bound)."""
    return jax.lax.map(lambda xy: model.loss_fn(params, xy[0][None], xy[1][None], cfg),
                       (x, y)).mean()


# -- main: set up, then the training loop -------------------------------------------------------

def main(argv=None):
    s, cfg, ckpt, meta, splits = resolve(argv)   # the flags, the checkpoint's, then the defaults
    out, tokens_per_step = Path(s.out), s.batch * cfg.T
    shapes = jax.eval_shape(lambda: model.cast(model.init_params(jax.random.key(0), cfg),
                                               s.param_dtype))
    if splits is None:                # --resume of a finished run: a sample, and no optimizer
        return sample_finished_run(ckpt, meta, shapes, cfg, s)
    train_tokens, val_tokens, data_hash = splits
    n_steps, start = s.tokens // tokens_per_step, meta["step"] if s.resume else 0
    opt, betas = make_optimizer(s, tokens_per_step, heads=cfg.H)
    state_shapes = check_optimizer(opt, shapes, s.opt)    # before anything is compiled
    if s.resume:   # the checkpoint's state exactly (if it is this model's and optimizer's)
        params, opt_state, key, stats = restore(ckpt, {"params": shapes, "opt_state":
                                                       state_shapes}, out / "ckpt.npz")
    elif s.init_from:   # fine-tuning: that run's parameters, not its state, step or schedule
        params = restore(ckpt, {"params": shapes}, Path(s.init_from) / "params.npz")
    log_file = open_log(out, start if s.resume else None)   # the first thing written
    print_settings(s, cfg, shapes, state_shapes, betas, train_tokens, val_tokens, start)

    # -- parameters, optimizer state, and the one jitted step ------------------------------
    if not s.resume:   # a resumed run goes on from the checkpoint's, as if never stopped
        key = jax.random.key(s.seed)
        if not s.init_from:
            params = model.cast(model.init_params(jax.random.fold_in(key, 0), cfg), s.param_dtype)
        opt_state, stats = None, new_stats()         # None: opt.init's, made on the devices
    mesh = make_mesh(s.tensor_parallel)   # every device (of every process): one, or many
    params, opt_state, stats = place_state(mesh, cfg, s.fsdp, opt, params, opt_state, stats)
    step_fn = make_train_step(cfg, opt, n_steps, s.warmup, s.grad_accum, s.rounding,
                              jax.random.fold_in(key, 2), s.schedule, batch_sharding(mesh))
    intervals = (s.log_tokens, s.eval_tokens, s.ckpt_tokens)  # tokens between looks, for each
    peak_lr, t0 = np.float32(s.lr), time.time()
    call, per_call = compile_calls(step_fn, (params, opt_state, stats, np.int32(0), peak_lr),
                                   (s.batch, cfg.T), min(intervals) // tokens_per_step,
                                   s.steps_per_call, batch_sharding(mesh))
    call(1), call(per_call)    # both lengths now, so that no compilation falls inside the loop
    print(f"compiled   the train step in {time.time() - t0:.1f} s; {per_call} steps per call ("
          f"{'--steps-per-call' if s.steps_per_call else 'timed'}), 1 where the loop must look")
    val_x, val_y = (place(a, whole(mesh)) for a in data.val_batches(val_tokens, cfg.T))

    batches = batch_reader(train_tokens, s, cfg.T, mesh)   # by step number, as a resume needs

    def run_eval(step):
        loss = float(evaluate(params, val_x, val_y, cfg=cfg))   # a host sync
        log_event(log_file, step=step, tokens=step * tokens_per_step, val_loss=loss)
        print(f"step {step:>6,}/{n_steps:,} | validation loss {loss:.4f}")
        return loss

    # What the loop keeps on the host is checkpointed too, so that a resumed run logs as if it
    # had never stopped: the step that opened the logging window, the last validation loss, and
    # the clocks (the window's time, the time since the start).
    host = meta if s.resume else {"window_start": 0, "window_s": 0, "elapsed_s": 0}
    t_start = time.time() - host["elapsed_s"]
    val_loss = meta["val_loss"] if s.resume else run_eval(0)     # not in the first window's time
    t_window, window_start = time.time() - host["window_s"], host["window_start"]

    def checkpoint(done):
        """Everything needed to go on exactly from step `done`, written atomically."""
        nonlocal saved_step
        info = {"version": CKPT_VERSION, "args": vars(s), "step": done, "n_steps": n_steps,
                "tokens": done * tokens_per_step, "window_start": window_start,
                "window_s": time.time() - t_window, "elapsed_s": time.time() - t_start,
                "val_loss": val_loss, "data_sha256": data_hash}
        arrays = {**flatten(gathered({"params": params, "opt_state": opt_state}, cfg, mesh)),
                  "loss_sum": stats["loss_sum"], "key": jax.random.key_data(key)}
        save_arrays(out / "ckpt.npz", {**arrays, "meta": np.array(json.dumps(info))})
        saved_step = done

    # -- the loop: calls of per_call steps, and of 1 for the last few before a point where it
    # must look (a log, an evaluation, a checkpoint, the end). Ctrl-C lets the current call
    # finish, then the loop stops and a checkpoint is written; a second Ctrl-C aborts at once.
    stop_requested, previous_handler = catch_ctrl_c()
    if not s.resume:
        checkpoint(0)                      # a checkpoint from step 0 on
    done = saved_step = start
    n = call_length(done, per_call, n_steps, intervals, tokens_per_step)
    try:
        xs = batches(done, n)
        while done < n_steps:
            params, opt_state, stats = call(n)(params, opt_state, stats, np.int32(done), *xs,
                                               peak_lr)
            done, n = done + n, call_length(done + n, per_call, n_steps, intervals,
                                            tokens_per_step)
            if done < n_steps:            # the next call's batches, while the device runs
                xs = batches(done, n)
            jax.block_until_ready(stats)  # one call in flight at most: Ctrl-C stops in a call
            stop = any_process(stop_requested.is_set())   # Ctrl-C on one host stops all
            log_now, eval_now, save_now = (is_due(done, every, n_steps, tokens_per_step)
                                           for every in intervals)
            # nothing bad is logged or saved: a host sync, so only at these points
            if (log_now or eval_now or save_now or stop) and (bad := diverged(stats, params, done)):
                raise Diverged(log_divergence(log_file, s, cfg, bad, n_steps, out, saved_step))
            if log_now:                   # the loss summed on the device: a host sync
                log_progress(log_file, s, cfg, done, n_steps, float(stats["loss_sum"]),
                             done - window_start, time.time() - t_window, time.time() - t_start)
                stats["loss_sum"], window_start, t_window = jnp.float32(0), done, time.time()
            t_pause = time.time()       # evaluation and checkpoints are not training time
            val_loss = run_eval(done) if eval_now else val_loss
            if save_now or stop:
                checkpoint(done)
            t_window += time.time() - t_pause
            if stop:
                break
    except data.DataError as e:   # an id past the vocabulary in the next batches (load checks
        if not diverged(stats, params, done):     # a sample only): keep the steps done so far
            checkpoint(done)
        raise UsageError(f"{str(e).rstrip('.')}; {out}/ckpt.npz keeps the state of step "
                         f"{saved_step:,}.") from None
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        log_file.close()

    params = gathered(params, cfg, mesh)   # whole, on every process's host, as saved
    save_results(out, params, s, cfg, betas, n_steps, done, val_loss, time.time() - t_start)
    if stop:                            # interrupted before the last step
        raise KeyboardInterrupt(f"interrupted at step {done:,} of {n_steps:,}; to go on exactly "
                                f"from there: python train.py --resume --out {out}")
    print(f"final validation loss {val_loss:.4f} after {fmt_tokens(done * tokens_per_step)} tokens")
    print_sample(params, cfg, s)


def sample_finished_run(ckpt, meta, shapes, cfg, s):
    """What --resume of a finished run does: say so, and sample from its parameters."""
    print(f"the run in {s.out} is finished ({meta['step']:,} steps, validation loss "
          f"{meta['val_loss']:.4f}); sampling from it (a larger --tokens trains it further)")
    print_sample(restore(ckpt, {"params": shapes}, Path(s.out) / "ckpt.npz"), cfg, s)


def print_sample(params, cfg, s):
    """--sample tokens after --prompt, drawn with a key from --seed (the run's, by default)."""
    if s.sample and jax.process_index() == 0:     # on one host: it prints
        ids = model.generate(params, cfg, data.encode(s.prompt), s.sample,
                             jax.random.fold_in(jax.random.key(s.seed), 1), s.temperature)
        print(f"--- sample ({s.sample} tokens, temperature {s.temperature:g}, seed "
              f"{s.seed}) ---\n{s.prompt}{data.decode(ids)}")


def save_results(out, params, s, cfg, betas, n_steps, done, val_loss, elapsed_s):
    """params.npz, by name for np.load, and config.json: the settings, β's, steps, final loss."""
    save_arrays(out / "params.npz", params)
    if jax.process_index() > 0:       # only process 0 writes
        return
    (out / "config.json").write_text(json.dumps({
        "model": dataclasses.asdict(cfg), "args": vars(s), "b1": betas.get("b1"),
        "b2": betas.get("b2"), "tokens_per_step": s.batch * cfg.T, "n_steps": n_steps,
        "steps_done": done, "final_val_loss": val_loss, "elapsed_s": elapsed_s,
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "numpy": np.__version__}}, indent=2) + "\n")
    print(f"saved {out}/ckpt.npz, {out}/params.npz and {out}/config.json")


# -- the loop's control: where it must look, how long a call is, Ctrl-C, divergence -------------

def new_stats():
    """The train step's stats at the start of a run: no loss summed, no step not finite."""
    return {"loss_sum": jnp.float32(0), "bad_step": jnp.int32(-1)}


def crosses(first, last, every, tokens_per_step):
    """Whether the tokens trained reach a multiple of `every` after step `first`, by step `last`."""
    return last * tokens_per_step // every > first * tokens_per_step // every


def is_due(done, every, n_steps, tokens_per_step):
    """Whether the loop looks after step `done`: the tokens reached a multiple of `every`, or the
    run its end."""
    return done == n_steps or crosses(done - 1, done, every, tokens_per_step)


def call_length(done, per_call, n_steps, intervals, tokens_per_step):
    """per_call steps, or 1 where those would pass a point where the loop must look."""
    last = done + per_call                                # the call's last step
    passes = last > n_steps or any(crosses(done, last - 1, every, tokens_per_step)
                                   for every in intervals)
    return 1 if passes else per_call


def catch_ctrl_c():
    """(an Event that Ctrl-C sets, the previous handler, which a second Ctrl-C then reaches)."""
    requested, previous = threading.Event(), signal.getsignal(signal.SIGINT)

    def on_sigint(*_):
        requested.set()
        signal.signal(signal.SIGINT, previous)
    signal.signal(signal.SIGINT, on_sigint)
    return requested, previous


def diverged(stats, params, done):
    """0, or the step by which the loss or the parameters stopped being finite (a host sync); a
    non-finite gradient is caught too: it makes the parameters non-finite, then the loss."""
    bad = int(stats["bad_step"])
    return bad + 1 if bad >= 0 else 0 if all_finite(params) else done


@jax.jit
def all_finite(tree):
    return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


# -- checking and resolving the flags, once -----------------------------------------------------

class UsageError(Exception):
    """A mistake the user can fix, its message one sentence; the programs exit 2 with it."""
    status = 2


class Diverged(UsageError):
    """The loss or the parameters stopped being finite: a lower --lr fixes it; exit status 3."""
    status = 3


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):   # no prefix matching: --tok 30k is a mistake, not --tokens
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):  # argparse's own messages name the flag and the accepted values
        raise UsageError(message)


def count(text):
    """A count of tokens: 300000, 3e5, 300k, 10M or 1.5B."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(text[-1:].lower(), 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except (ValueError, OverflowError):  # not a number, or nan / inf
        raise argparse.ArgumentTypeError(f"expected a number of tokens like 300000, 3e5 or 10M, "
                                         f"got {text!r}")


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
    tensor_parallel=POSITIVE, num_processes=POSITIVE,
    process_id=("an integer >= 0", lambda v: v >= 0),
    sample=("a number of tokens >= 0", lambda v: v >= 0),
    prompt=("a text of at least one character", lambda v: len(v) > 0))
# Where a run runs (device_flags): a resumed run takes them anew, not from its checkpoint.
DEVICE_FLAGS = ("tensor_parallel", "fsdp", "num_processes", "process_id")
# The flags that change no result, only the sample, the speed or the memory (--remat recomputes
# the same arithmetic): a rerun may change them.
NO_RESULT_FLAGS = ("sample", "prompt", "temperature", "steps_per_call", "remat") + DEVICE_FLAGS
# What --resume lets change: the budget, where it logs, the data's paths (data.fingerprint checks
# the tokens), --grad-accum (the same gradient, split otherwise); on a finished run also --seed.
MAY_CHANGE_ON_RESUME = ("tokens", "data", "val_data", "grad_accum", "log_tokens", "eval_tokens",
                        "ckpt_tokens") + NO_RESULT_FLAGS


def parse_args(parser, argv=None):
    """(args, given): the flags with their defaults, and the names of those the user typed."""
    args = parser.parse_args(argv)
    parser.set_defaults(**{name: None for name in vars(args)})   # now untyped flags parse to None
    given = {name for name, value in vars(parser.parse_args(argv)).items() if value is not None}
    for name, (accepted, ok) in ACCEPTS.items():
        value = getattr(args, name, None)           # None: not given, or not this parser's
        if value is not None and not ok(value):
            raise UsageError(f"--{name.replace('_', '-')} must be {accepted}, got {value}.")
    return args, given


# The official code's tuned settings for the paper's presets (docs/official-code.md), the
# defaults of the flags not given: (preset, optimizer) -> {batch size: {flag: value}}. The β's
# are half-lives in tokens, so that they carry over to other batch sizes by the paper's rule; β2
# 0.9999 at B = 1 is t2 7.1M tokens at gpt2's T, 14.2M at gpt3xl's, as is 0.95 at B = 512 (the
# AdamW baselines, whose weight decay 0.1 is not a default here). paper_defaults fills the gaps:
# another batch size, a preset without a row, muon.
PAPER_SETTINGS = {
    ("30m", "adam"): {1: dict(lr=1.7e-3, t1=40_000), 4: dict(lr=2e-3, t1=40_000),
                      16: dict(lr=2e-3, t1=60_000), 64: dict(lr=3e-3, t1=200_000),
                      256: dict(lr=5e-3, t1=1_000_000), 1024: dict(lr=5e-3, t1=3_000_000),
                      4096: dict(lr=2.5e-3, t1=6_000_000)},
    ("gpt2", "sgd"): {1: dict(lr=0.2)},
    ("gpt2", "adam"): {1: dict(lr=2.4e-3, t2=7_100_000), 512: dict(lr=4.8e-3, t2=7_100_000)},
    ("gpt2", "adafactor"): {1: dict(lr=5e-3, t2=7_100_000)},
    ("gpt3xl", "sgd"): {1: dict(lr=0.15)},
    ("gpt3xl", "adam"): {1: dict(lr=6.7e-5, t2=14_200_000),   # untuned: B = 512's 2e-4 / 3
                         512: dict(lr=2e-4, t2=14_200_000)},
    ("gpt3xl", "adafactor"): {1: dict(lr=3.2e-3, t2=14_200_000)},
}


def paper_defaults(name, opt, batch):
    """{flag: (value, where it comes from)} from PAPER_SETTINGS for a run of preset `name` (none
    for tiny). A batch size without a row takes the nearest one's (in log scale); 30m, which has
    only Adam's, takes gpt2's for the others; muon's rate is unpublished, and its embeddings' Adam
    takes the adam row's rate and t2 (its t1 would be muon's momentum too)."""
    if opt == "muon":
        return {("adam_lr" if flag == "lr" else flag): v for flag, v in
                paper_defaults(name, "adam", batch).items() if flag != "t1"}
    m = name if (name, opt) in PAPER_SETTINGS else {"30m": "gpt2"}.get(name)
    if (m, opt) not in PAPER_SETTINGS:
        return {}
    b = min(PAPER_SETTINGS[m, opt], key=lambda b: (abs(math.log(b / batch)), b))
    where = f"paper, {m} {opt}, B = {b}" + (", the nearest published" if (m, b) != (name, batch)
                                            else "")
    return {flag: (value, where) for flag, value in PAPER_SETTINGS[m, opt][b].items()}


def paper_tokens(name, cfg):
    """(the paper's budget in tokens, its rule) for preset `name`, or None (tiny): 20 tokens per
    active parameter (Chinchilla's rule; 598,310,400 for 30m), but a fixed 10B for GPT-3 XL."""
    if name == "gpt3xl":
        return 10 ** 10, "a fixed 10B"
    if name in ("30m", "gpt2"):
        return 20 * model.active_params(cfg), "20 tokens per active parameter"
    return None


def conditional_flags(args):
    """The flags that apply to some runs only, one table for the defaults and the checks below:
    (flag, whether it applies to this run, its default there, the runs it applies to)."""
    name, o = args.opt, optim.OPTIMIZERS[args.opt]
    decays = ", ".join(n for n, spec in optim.OPTIMIZERS.items() if spec["decay"])
    return [("rounding", args.param_dtype == "bfloat16", "stochastic",   # nearest stalls: Fig. 9
             "--param-dtype bfloat16 only; float32 parameters store the float32 sum exactly"),
            ("adafactor_decay", name == "adafactor", "constant", f"adafactor only, not {name}"),
            ("adam_lr", name == "muon", optim.OPTIMIZERS["adam"]["lr"], f"muon only, not {name}"),
            ("weight_decay", o["decay"], 0.0, f"{decays} only; the paper uses none with {name}")]


def fill_run_defaults(args):
    """The defaults that depend on the run, for the flags not given: the paper's settings at its
    presets (a half-life only where its β is not given either), --lr from the optimizer's table,
    the matmuls in the parameters' dtype, and the conditional flags where they apply."""
    table = paper_defaults(args.model, args.opt, getattr(args, "batch", 1))   # experiments/: B 1
    paper = [(flag, value) for flag, (value, _) in table.items()
             if flag not in ("t1", "t2") or getattr(args, "b" + flag[1]) is None]
    for name, value in paper + [("lr", optim.OPTIMIZERS[args.opt]["lr"]),
                        ("compute_dtype", args.param_dtype)] + [
            (flag, default) for flag, applies, default, _ in conditional_flags(args) if applies]:
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_flags(args):
    """A flag given to a run it does not apply to is one sentence."""
    o = optim.OPTIMIZERS[args.opt]
    for b, t, default, which in [("b1", "t1", o["b1"], "first"), ("b2", "t2", o["t2"], "second")]:
        if default is None and (getattr(args, b) is not None or getattr(args, t) is not None):
            raise UsageError(f"--{b}/--{t} do not apply to {args.opt}, which keeps no {which} "
                             "moment.")
    for flag, applies, _, to in conditional_flags(args):
        if getattr(args, flag) and not applies:
            raise UsageError(f"--{flag.replace('_', '-')} applies to {to}.")


class Settings(argparse.Namespace):
    """Every flag of a run, resolved once, and read-only afterwards."""
    def __init__(self, **flags):
        vars(self).update(flags)

    def __setattr__(self, name, value):
        raise AttributeError(f"the settings are resolved once; --{name.replace('_', '-')} cannot "
                             "change now")

    def __delattr__(self, name):
        self.__setattr__(name, None)


def settings(parser, argv=None):
    """The checked flags, with the defaults that depend on the run, of experiments/' programs."""
    args, _ = parse_args(parser, argv)
    fill_run_defaults(args)
    check_flags(args)
    return Settings(**vars(args))


def resolve(argv):
    """(settings, config, the checkpoint's arrays and meta, and the splits (train tokens,
    validation tokens, their fingerprint), or None to sample a finished run): the flags, then the
    checkpoint's, then the defaults that depend on the run. Every mistake in the flags and the
    data is found here, on every process of a run on several hosts."""
    args, given = parse_args(make_parser(), argv)
    start_processes(args)                      # before JAX touches a device
    return agreed(UsageError, resolve_run, args, given)


def resolve_run(args, given):
    """resolve's work, once the processes (if several) have joined."""
    init = init_from(args, given) if args.init_from and not args.resume else None   # its --model
    fill_run_defaults(args)                    # before the folder is named after them
    accum = f"-accum{args.grad_accum}" if args.grad_accum > 1 else ""
    bf16 = f"-bf16-{args.rounding}" if args.param_dtype == "bfloat16" else ""
    ft = f"-from-{Path(args.init_from).resolve().name}" if args.init_from else ""
    out = Path(args.out or f"out/{args.model}-{args.opt}-b{args.batch}{accum}{bf16}{ft}")
    ckpt, meta = open_run(out, args, given)    # with --resume, the checkpoint's flags replace
    check_flags(args)
    cfg = dataclasses.replace(model.PRESETS[args.model], dtype=args.compute_dtype,
                              remat=args.remat, attention=args.attention)
    betas_of(args, args.batch * cfg.T)         # a half-life too long for this step is a mistake
    if args.resume and meta["step"] >= meta["n_steps"] and "tokens" not in given:
        return Settings(**{**vars(args), "out": str(out)}), cfg, ckpt, meta, None   # a sample
    check_mesh(args.tensor_parallel, args.batch)
    if args.batch % args.grad_accum:
        raise UsageError(f"--batch {args.batch} is not divisible by --grad-accum "
                         f"{args.grad_accum}; each of the K micro-batches holds B/K whole "
                         "sequences, so K must divide B.")
    train_tokens, val_tokens = load_data(args, cfg.T, args.batch, cfg.V)
    data_hash = data.fingerprint(train_tokens, val_tokens)    # cheap at any size (data.py)
    if args.resume and data_hash != meta["data_sha256"]:
        raise UsageError(f"the tokens of --data {args.data} (and --val-data) differ from those "
                         "the checkpoint was trained on.")
    tokens_per_step = args.batch * cfg.T
    one_pass, paper = data.n_windows(train_tokens, cfg.T) * cfg.T, paper_tokens(args.model, cfg)
    budget = args.tokens or min(one_pass, paper[0] if paper else one_pass)   # the paper's, or less
    n_steps, start = budget // tokens_per_step, meta["step"] if args.resume else 0
    if n_steps < 1:
        raise UsageError(f"--tokens {budget:,} is less than one optimizer step of "
                         f"{tokens_per_step:,} tokens (--batch {args.batch} x T = {cfg.T}).")
    if start >= n_steps:
        raise UsageError(f"the run in {out} has already trained {start:,} steps, more than the "
                         f"{n_steps:,} of --tokens {budget:,}; pass a larger --tokens to train "
                         "it further.")
    s = Settings(**{**vars(args), "tokens": n_steps * tokens_per_step, "out": str(out)})
    if meta and not s.resume:
        refuse_to_overwrite(out, meta, s)
    return s, cfg, ckpt if s.resume else init, meta, (train_tokens, val_tokens, data_hash)


def load_data(args, T, batch, vocab=data.EOT + 1):
    """data.load of --data and --val-data (where the program has it); a bad file: UsageError."""
    try:
        return data.load(args.data, T, batch, val_path=getattr(args, "val_data", None),
                         vocab=vocab)
    except data.DataError as e:
        raise UsageError(str(e)) from None


def check_optimizer(opt, shapes, name):
    """The optimizer's state shapes, once optim.check has seen that its update returns the arrays
    its init makes: a mistake in a new optimizer, named before anything is compiled."""
    try:
        return optim.check(opt, shapes)
    except optim.StateError as e:
        make = getattr(optim.OPTIMIZERS[name]["make"], "__name__", name)
        raise UsageError(f"--opt {name} ({make} in optim.py): {e}; the two must hold the same "
                         "arrays.") from None


# -- printing: the settings once, then the log ---------------------------------------------------

def print_settings(s, cfg, shapes, state_shapes, betas, train_tokens, val_tokens, start):
    """Every derived quantity, once: the command that repeats the run, the model, the data, the
    optimizer's β's with their half-lives, the schedule, the memory, the device, the resume."""
    tokens_per_step, n_steps = s.batch * cfg.T, s.tokens // (s.batch * cfg.T)
    print("command    python train.py " + " ".join(   # the run's flags, resolved: rerun to repeat
        f"--{flag.replace('_', '-')}" + ("" if value is True else f" {shlex.quote(str(value))}")
        for flag, value in vars(s).items() if value not in (None, False)
        and flag not in NO_RESULT_FLAGS))
    n_params = sum(x.size for x in shapes.values())    # counted from the dict: tied embeddings
    embeddings = {name: x.size for name, x in shapes.items() if name in ("embed", "unembed")}
    print(f"model      {s.model}: {cfg} -> {n_params:,} parameters "
          f"({n_params - sum(embeddings.values()):,} non-embedding"
          + "".join(f" + {n:,} {name}" for name, n in embeddings.items()) + ")")
    print(f"data       {s.data}: {len(train_tokens):,} training tokens "
          f"({data.n_windows(train_tokens, cfg.T):,} windows of T + 1), "
          f"{len(val_tokens):,} validation tokens")
    paper = paper_defaults(s.model, s.opt, s.batch)    # where the defaults came from
    where = {flag: w for flag, (value, w) in paper.items() if getattr(s, flag) == value}
    if "lr" not in paper and s.lr == optim.OPTIMIZERS[s.opt]["lr"]:
        where["lr"] = "tiny default" + ("" if s.model == "tiny" else ", none published")

    def note(flag, half_life=0):      # " (half-life ... tokens; where the value came from)"
        parts = ([f"half-life {fmt_tokens(half_life)} tokens"] if half_life else []) + (
            [where[flag]] if flag in where else [])
        return f" ({'; '.join(parts)})" if parts else ""
    print(f"optimizer  {s.opt}: peak lr {s.lr:g}{note('lr')}"
          + (f", adam-lr {s.adam_lr:g} for the embeddings{note('adam_lr')}" if s.adam_lr else "")
          + "".join(f", {'momentum' if s.opt == 'sgd' else name} {beta:.6g}"    # sgd: b1
                    + note("t" + name[1], optim.halflife_from_beta(beta, tokens_per_step))
                    for name, beta in betas.items())
          + (f", β2_t = 1 − t^(−{betas['b2']:.6g}) (official)" if s.adafactor_decay == "power"
             else "") + f", weight decay {s.weight_decay:g}")
    budget, (paper_budget, rule) = "", paper_tokens(s.model, cfg) or (0, "")
    if paper_budget:          # the paper's budget to a whole step, or shorter, or longer
        budget = (f" ({rule}, as the paper)" if 0 <= paper_budget - s.tokens < tokens_per_step
                  else f" ({'shorter' if s.tokens < paper_budget else 'longer'} than the "
                  f"paper's {paper_budget:,}, {rule})")
    print(f"schedule   {s.batch} x {cfg.T} = {tokens_per_step:,} tokens/step, "
          f"{n_steps:,} steps, {n_steps * tokens_per_step:,} tokens{budget}; warmup {s.warmup:g} "
          f"({int(s.warmup * n_steps):,} steps), then "
          + ("cosine to 0" if s.schedule == "cosine" else "constant"))
    buffer = model.nbytes(jax.eval_shape(accumulation_buffer, shapes))
    print(f"memory     parameters {model.nbytes(shapes):,} bytes ({s.param_dtype}, "
          f"{jnp.dtype(s.param_dtype).itemsize} bytes each"
          + (f", rounded {s.rounding}" if s.rounding else "")
          + f"), optimizer state {model.nbytes(state_shapes):,} bytes (float32)"
          + (f", accumulation buffer {buffer:,} bytes (float32; {s.grad_accum} micro-batches "
             f"of {s.batch // s.grad_accum})" if s.grad_accum > 1 else ""))
    # JAX's default float32 matmul precision favours speed: true float32 on a CPU, TF32 on NVIDIA
    # GPUs since Ampere, bf16 passes on a TPU; JAX_DEFAULT_MATMUL_PRECISION=highest forces float32
    precision = jax.config.jax_default_matmul_precision or "default, " + {
        "cpu": "exact", "gpu": "TF32 on Ampere or later", "tpu": "bf16 passes"}.get(
            jax.default_backend(), "device-dependent")
    n, hosts = jax.device_count(), jax.process_count()
    print(f"mesh       data={n // s.tensor_parallel} model={s.tensor_parallel}"
          + (" (--fsdp)" if s.fsdp else "") + f", {n} {jax.default_backend()} device"
          + "s" * (n > 1) + f" in {hosts} process" + "es" * (hosts > 1))
    print(f"device     {jax.devices()[0].device_kind} ({jax.default_backend()}); matmuls take "
          + ("bfloat16" if s.compute_dtype == "bfloat16" else f"float32 (precision {precision})")
          + f"; output in {s.out}/")
    if s.init_from and not s.resume:
        print(f"init       from {s.init_from}/params.npz (fine-tuning: its parameters only; not "
              "its optimizer state, step or schedule)")
    if s.resume:
        print(f"resume     from {s.out}/ckpt.npz at step {start:,} "
              f"({fmt_tokens(start * tokens_per_step)} tokens)")


def log_progress(log_file, s, cfg, done, n_steps, loss_sum, window_steps, window_s, elapsed_s):
    """A logging window's event and line: its mean training loss, the last step's learning rate,
    tokens/s, model FLOP/s and MFU (on a device in PEAK_FLOPS), the time left."""
    tokens_per_step, flops = s.batch * cfg.T, model.flops_per_token(cfg)
    peak = next((f for kind, f in PEAK_FLOPS.items() if kind in jax.devices()[0].device_kind), None)
    train_loss, tok_per_s = loss_sum / window_steps, window_steps * tokens_per_step / window_s
    lr = float(optim.lr_at(done - 1, n_steps, s.lr, s.warmup, s.schedule))
    mfu = {"mfu": tok_per_s * flops / peak} if peak else {}
    log_event(log_file, step=done, tokens=done * tokens_per_step, train_loss=train_loss, lr=lr,
              tok_per_s=tok_per_s, flop_per_s=tok_per_s * flops, **mfu, elapsed_s=elapsed_s)
    print(f"step {done:>6,}/{n_steps:,} | tokens {fmt_tokens(done * tokens_per_step):>6} | "
          f"loss {train_loss:.4f} | lr {lr:.2e} | {tok_per_s:,.0f} tok/s | "
          f"{tok_per_s * flops / 1e9:,.1f} GFLOP/s" + (f" ({mfu['mfu']:.1%} MFU)" if peak else "")
          + f" | eta {(n_steps - done) * tokens_per_step / tok_per_s / 60:.1f} min")


# Dense bf16 peak FLOP/s by a part of jax's device_kind, for the MFU in the log (against the bf16
# peak even for float32 compute, as usual); elsewhere FLOP/s only. "v5 lite" before "v5".
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L4": 121e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6": 918e12}


def log_divergence(log_file, s, cfg, bad, n_steps, out, saved_step):
    """Log that the run diverged by step `bad`; returns the sentence that says so."""
    tokens = bad * s.batch * cfg.T
    lr = float(optim.lr_at(bad - 1, n_steps, s.lr, s.warmup, s.schedule))   # its last step's
    log_event(log_file, step=bad, tokens=tokens, diverged=True, lr=lr)
    return (f"the run diverged: the loss or the parameters were not finite by step {bad:,} "
            f"({tokens:,} tokens seen, learning rate {lr:.3g}); {out}/ckpt.npz keeps the last "
            f"good state, from step {saved_step:,}. Start a new run with a lower --lr (resuming "
            "would repeat this).")


def log_event(log_file, **event):
    log_file.write(json.dumps(event) + "\n")      # line-buffered: one write, one whole line


def fmt_tokens(n):
    """1234567 -> '1.235M': token counts as people say them."""
    return next((f"{n / scale:.4g}{unit}" for scale, unit in [(1e9, "B"), (1e6, "M"), (1e3, "k")]
                 if n >= scale), f"{n:.4g}")


# -- calls of many steps: compiled ahead of time, their length timed at start -------------------

def compile_calls(step_fn, arguments, batch_shape, sync_every, steps_per_call=None,
                  batch_sharding=None):
    """(call, steps_per_call): call(n) is make_multi_step(step_fn) for n steps, compiled ahead of
    time once per n, for arguments (params, opt_state, stats, step, peak_lr) and batches [B, T]
    of batch_shape: nothing recompiles (fixed shapes, the step an array); params, state and stats
    are donated, updated in place, and keep their shardings, as do batches of batch_sharding.
    steps_per_call: the given one (at most sync_every), or timed (by process 0, for all)."""
    def ids(n):                                       # ids in the shape of a call's batches
        zeros = np.zeros((n, *batch_shape), np.int32)
        return zeros if batch_sharding is None else place(zeros, batch_sharding)

    def spec(a):                   # the compiled call's argument: a shape, its dtype and sharding
        return jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=getattr(a, "sharding", None))

    @functools.cache
    def call(n):
        return (jax.jit(make_multi_step(step_fn), donate_argnums=(0, 1, 2),
                        out_shardings=jax.tree.map(lambda a: a.sharding, arguments[:3]))
                .lower(*jax.tree.map(spec, (*arguments[:4], ids(n), ids(n), arguments[4])))
                .compile())
    if steps_per_call:
        return call, min(steps_per_call, max(1, sync_every))
    return call, from_process_0(default_steps_per_call(
        call(1), (*arguments[:4], ids(1), ids(1), arguments[4]), sync_every))


def default_steps_per_call(call_1, arguments, sync_every, seconds=2.0):
    """The largest power of two n, at most sync_every, such that n one-step calls (call_1, timed
    on copies of the state it donates) run in `seconds`: in one call of n steps they run up to
    twice as fast, so a call lasts about a second at most."""
    for _ in range(2):     # the first call warms up
        copies = jax.block_until_ready(jax.tree.map(jnp.copy, arguments[:3]))
        t0 = time.time()
        jax.block_until_ready(call_1(*copies, *arguments[3:]))
    n = max(1, min(sync_every, int(seconds / (time.time() - t0))))
    return 2 ** int(math.log2(n))


# -- several devices and hosts: the mesh, the state on it, what the processes agree on ----------

def device_flags(parser):
    """parser, with the flags of where a run runs: they change no result, and a resumed run takes
    them anew."""
    g = parser.add_argument_group("several devices and hosts (docs/speed.md)")
    g.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="devices on the "
                   "mesh's model axis, which split each matrix (model.SHARDING); the rest split "
                   "the batch (%(default)s)")
    g.add_argument("--fsdp", action="store_true", help="also split the parameters and optimizer "
                   "state over the data axis (fully sharded data parallel): less memory per device")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes, one per host, "
                   "joined at JAX_COORDINATOR_ADDRESS (default: 1, or what JAX finds on a cluster)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N - 1 "
                   "(default: what JAX finds on a cluster)")
    return parser


def start_processes(args):
    """Join the other processes of a run on several hosts through JAX's distributed runtime:
    when JAX_COORDINATOR_ADDRESS is set or --num-processes given (on a Cloud TPU pod JAX finds
    the address and the ids), or under srun or mpirun with several tasks. Only process 0 prints."""
    tasks = max(int(os.environ.get(n, 1)) for n in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    if jax.distributed.is_initialized() or not (
            os.environ.get("JAX_COORDINATOR_ADDRESS") or (args.num_processes or 1) > 1
            or tasks > 1):
        return
    if args.process_id is not None and args.process_id >= (args.num_processes or 1):
        raise UsageError(f"--process-id {args.process_id} must be below --num-processes "
                         f"{args.num_processes or 1}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPUs: collectives by gloo
    try:
        jax.distributed.initialize(num_processes=args.num_processes, process_id=args.process_id)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"the processes could not join (jax.distributed.initialize: "
                         f"{str(e).splitlines()[0]}); set "
                         "JAX_COORDINATOR_ADDRESS to process 0's host:port, with "
                         "--num-processes and --process-id.") from None
    if jax.process_index() > 0:
        sys.stdout = open(os.devnull, "w")


def agreed(kind, fn, *args):
    """fn(*args) on every process, where a mistake (an exception of `kind`) found by one is
    raised by all: the others would otherwise wait for it in their next collective. In one
    process, just fn(*args)."""
    try:
        result, error = fn(*args), None
    except kind as e:
        result, error = None, e
    if any_process(error is not None):          # every process asks, failed or not
        raise error or kind("another process stopped on a mistake; its sentence is on its stderr.")
    return result


def any_process(flag):
    """Whether flag is true on any process (a collective of all: every process must ask)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.bool_(flag)).any())


def from_process_0(value):
    """Process 0's value, on every process (a collective): one choice where each could differ."""
    return value if jax.process_count() == 1 else int(multihost_utils.broadcast_one_to_all(
        np.int64(value)))


def check_mesh(tensor_parallel, batch):
    """The mesh the flags ask for must fit the devices, and each batch split evenly over them."""
    n = jax.device_count()
    if n % tensor_parallel:
        raise UsageError(f"--tensor-parallel {tensor_parallel} does not divide the {n} devices; "
                         f"give a divisor of {n}.")
    if batch % (n // tensor_parallel):
        raise UsageError(f"--batch {batch} does not split evenly over the mesh's "
                         f"{n // tensor_parallel} data devices; give a multiple of "
                         f"{n // tensor_parallel}, or put devices on the model axis: "
                         f"--tensor-parallel {n} runs batch size 1 on all {n}.")


def make_mesh(tensor_parallel):
    """All devices as a mesh ("data", "model"): tensor_parallel on "model", the rest on "data".
    Auto axes: jit propagates the shardings (this JAX's Explicit default cannot split the
    embedding lookup)."""
    n = jax.device_count()
    return jax.make_mesh((n // tensor_parallel, tensor_parallel), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def whole(mesh):
    """An array whole on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh):
    """Batches [n, B, T] with their rows split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(None, "data"))


def batch_reader(train_tokens, s, T, mesh):
    """batches(step, n): the inputs and targets [n, B, T] of n steps from step on, on the devices,
    their rows split over the data axis; addressed by step number, so a resumed run sees the data
    it would have seen. Each process reads only the rows its devices hold (all, in one process)."""
    sharding, B = batch_sharding(mesh), s.batch
    rows = np.unique(np.concatenate([np.arange(B)[index[1]] for index in   # sorted, packed
                                     sharding.addressable_devices_indices_map((1, B, 1)).values()]))

    def read(step, n):
        return [jax.make_array_from_process_local_data(sharding, a, (n, B, T)) for a in
                data.get_batch(train_tokens, step, B, T, s.seed, steps=n, rows=rows)]
    return lambda step, n: agreed(data.DataError, read, step, n)   # a bad id stops every process


def place(a, sharding):
    """A host array (or one on a device) laid out on the devices as sharding says; each process
    supplies its own devices' slices."""
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def pad_vocab(a, cfg, V):
    """a with every axis of cfg.V entries padded with zeros to V (model.padded_vocab)."""
    widths = [(0, V - n if n == cfg.V else 0) for n in np.shape(a)]
    return np.pad(a, widths) if any(w for _, w in widths) else np.asarray(a)


def place_state(mesh, cfg, fsdp, opt, params, opt_state, stats):
    """params, opt_state and stats on the mesh: each parameter split as model.SHARDING says (its
    vocabulary padded where the model axis needs it), each optimizer state array of its
    parameter's shape split as it is, everything else whole. opt_state None: opt.init's."""
    V, devices = model.padded_vocab(cfg, mesh.shape["model"]), dict(mesh.shape)
    devices["data"] = devices["data"] if fsdp else 1
    where = {name: NamedSharding(mesh, PartitionSpec(*model.partition(name, cfg, devices)))
             for name in params}
    params = {name: place(pad_vocab(p, cfg, V), where[name]) for name, p in params.items()}

    def follow(path, leaf):        # "m.blocks.0.wq" follows "blocks.0.wq"
        path = "." + jax.tree_util.keystr(path, simple=True, separator=".") + "."
        name = next((n for n in params if f".{n}." in path), None)
        return where[name] if name and leaf.shape == params[name].shape else whole(mesh)
    state_where = jax.tree_util.tree_map_with_path(follow, jax.eval_shape(opt.init, params))
    opt_state = (jax.jit(opt.init, out_shardings=state_where)(params) if opt_state is None else
                 jax.tree.map(lambda a, w: place(pad_vocab(a, cfg, V), w), opt_state, state_where))
    return params, opt_state, jax.tree.map(lambda a: place(a, whole(mesh)), stats)


def gathered(tree, cfg, mesh):
    """tree's arrays whole on the host of every process, their vocabulary unpadded: what files
    hold, whatever the mesh. Across processes a collective: every process must call it."""
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    V = model.padded_vocab(cfg, mesh.shape["model"])
    return jax.tree.map(lambda a: np.asarray(a)[tuple(slice(cfg.V) if n == V else slice(None)
                                                      for n in np.shape(a))], tree)


# -- the run folder: resume, the overwrite guard, the log ---------------------------------------

def open_run(out, args, given):
    """(the checkpoint's arrays, its meta) in out. With --resume the checkpoint must be whole and
    of this format, and its flags replace args' (a flag given must agree, or be one that may
    change); without, the arrays are None and meta (if readable) guards the folder."""
    path = out / "ckpt.npz"
    named_by = sorted({"grad_accum", "init_from"} & given) if args.resume and not args.out else []
    if named_by:                  # flags the default folder's name depends on
        flag = "--" + named_by[0].replace("_", "-")
        raise UsageError(f"--resume with {flag} needs --out naming the run's folder: the default "
                         f"folder's name depends on {flag}, so it may not be the run you mean.")
    if args.resume and not path.exists():
        raise UsageError(f"there is no checkpoint {path} to resume from; run without --resume to "
                         "start, or pass the --out of the run to continue.")
    try:
        arrays, meta = load_checkpoint(path)
    except CKPT_ERRORS as e:
        if args.resume:
            raise UsageError(f"checkpoint {path} is truncated or damaged ({type(e).__name__}: "
                             f"{e}); it cannot be resumed.") from None
        return None, None              # none, or unreadable: nothing that could be resumed
    if not args.resume:
        return None, meta
    if meta.get("version") != CKPT_VERSION:
        raise UsageError(f"checkpoint {path} has format version {meta.get('version')}; this "
                         f"train.py reads version {CKPT_VERSION}.")
    sampling = meta["step"] >= meta["n_steps"] and "tokens" not in given   # a finished run
    may_change = MAY_CHANGE_ON_RESUME + ("seed",) * sampling   # --seed then picks the sample
    flags = ", ".join(f"--{n.replace('_', '-')}" for n in may_change)
    for name, value in saved_flags(meta).items():   # a flag typed must agree, unless it may change
        if name in ("out", "resume") + DEVICE_FLAGS or (name in given and name in may_change):
            continue
        if name in given and getattr(args, name) != value:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the "
                             f"checkpoint's {value}; on resume only {flags} may change.")
        setattr(args, name, value)
    return arrays, meta


def saved_flags(meta):
    """A saved run's flags, with the parser's defaults for those newer than the run."""
    return {**vars(make_parser().parse_args([])), **meta.get("args", {})}


def init_from(args, given):
    """The arrays of --init-from's params.npz, by name ("params.embed", ...), once its config.json
    has set --model: fine-tuning starts from a finished run's parameters, on its model."""
    folder = Path(args.init_from)
    try:
        config = json.loads((folder / "config.json").read_text())
        saved, done, n_steps = config["args"]["model"], config["steps_done"], config["n_steps"]
        with np.load(folder / "params.npz") as f:
            arrays = {f"params.{name}": a for name, a in f.items()}
    except CKPT_ERRORS as e:
        raise UsageError(f"--init-from {folder} holds no finished run's params.npz and "
                         f"config.json ({type(e).__name__}: {e}); pass the --out of a run that "
                         "has ended.") from None
    if done < n_steps:
        raise UsageError(f"--init-from {folder} holds an unfinished run (step {done:,} of "
                         f"{n_steps:,}); finish it with --resume --out {folder} first.")
    if "model" in given and args.model != saved:
        raise UsageError(f"--model {args.model} differs from the model of --init-from {folder}, "
                         f"{saved}; fine-tuning keeps the model, so leave --model out.")
    args.model, args.init_from = saved, str(folder)   # out/run/ and out/run: one run
    return arrays


def refuse_to_overwrite(out, meta, s):
    """A new run may replace a finished run of the same flags (a rerun), never one of other
    flags or one that can still be resumed: no result is lost by mistake."""
    if meta.get("step", 0) < meta.get("n_steps", 0):
        raise UsageError(f"{out} holds an unfinished run (step {meta['step']:,} of "
                         f"{meta['n_steps']:,}); continue it with --resume, or pass another --out "
                         "to start a new one.")
    saved = saved_flags(meta)
    for name, value in vars(s).items():
        if name not in NO_RESULT_FLAGS and saved.get(name) != value:
            raise UsageError(f"{out} holds the results of a run with --{name.replace('_', '-')} "
                             f"{saved.get(name)}, not {value}; pass another --out, or delete "
                             f"{out} to replace them.")


def open_log(out, keep_to_step):
    """Create out/ and open log.jsonl to append to, line-buffered: a fresh log, or on resume the
    log up to the checkpoint's step (a crash may have logged past it, or cut its last line)."""
    path, keep = out / "log.jsonl", 0
    if jax.process_index() > 0:       # only process 0 writes
        return open(os.devnull, "w")
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
        raise UsageError(f"--out {out} cannot be written ({e.strerror}).") from None


# -- the checkpoint's file format ---------------------------------------------------------------
# ckpt.npz holds the parameters and the optimizer state by path name ("params.embed",
# "opt_state.m.embed", ...), the run's key, the loss summed in the current logging window, and
# "meta": a JSON string of the flags, the step, the clocks and a hash of the tokens.
CKPT_VERSION = 2       # the layout of ckpt.npz; bump it when the layout changes
CKPT_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)  # a file unreadable


def save_arrays(path, arrays):
    """Save {name: array} to an .npz atomically: a temporary file, flushed to disk, then renamed.
    numpy has no bfloat16, so bf16 arrays are stored as float32, which holds each value exactly.
    Of several processes, only process 0 writes."""
    if jax.process_index() > 0:
        return
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


def restore(ckpt, template, path):
    """The template ({"params": shapes}, and "opt_state" to resume) filled from the arrays by
    name of a checkpoint (or --init-from's params.npz) at path, in its dtypes (exact for bf16):
    params, or to resume (params, opt_state, key, stats). Arrays not exactly the template's
    (missing, extra, other shapes) are refused."""
    names = flatten(template)
    stored = {n: a for n, a in ckpt.items() if n.split(".")[0] in template}
    want, have = ({n: list(a.shape) for n, a in x.items()} for x in (names, stored))
    differ = [f"{n} is {have.get(n, 'missing')} there, {want.get(n, 'not used')} here"
              for n in sorted(want | have) if want.get(n) != have.get(n)]
    differ += [f"{n} is missing there" for n in ("loss_sum", "key")
               if "opt_state" in template and n not in ckpt]
    if differ:
        more = f"; and {len(differ) - 3} more" if len(differ) > 3 else ""
        what = " and state" if "opt_state" in template else ""
        raise UsageError(f"{path} does not hold the parameters{what} of this model"
                         f"{' and optimizer' if what else ''} ({'; '.join(differ[:3])}{more}).")
    state = jax.tree.unflatten(jax.tree.structure(template),
                               [jnp.asarray(stored[n], t.dtype) for n, t in names.items()])
    if "opt_state" not in template:
        return state["params"]
    return (state["params"], state["opt_state"], jax.random.wrap_key_data(ckpt["key"]),
            {**new_stats(), "loss_sum": jnp.asarray(ckpt["loss_sum"])})


# -- the entry point: a mistake is one sentence and an exit status, never a traceback -----------

def run_program(main, argv=None, interrupted="interrupted; the files written before it "
                "(checkpoints, logs) are whole"):
    """main(argv) as a program (experiments/ too), returning its exit status: 0; a UsageError's
    sentence on stderr and its status, 2 or 3; Ctrl-C's message (main's, or `interrupted`), 130."""
    try:
        main(argv)
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt as e:   # main's own after a checkpoint, or a second Ctrl-C
        print(str(e) or interrupted, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run_program(main))
