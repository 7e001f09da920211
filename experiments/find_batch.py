"""The smallest batch size that maximizes throughput on this device: the paper's advice for
choosing B (use the smallest batch that keeps the hardware busy, not the largest that fits).

    python -m experiments.find_batch                   # the default model and optimizer
    python -m experiments.find_batch --model 30m       # on a GPU: the paper's 30M model

For B = 1, 2, 4, ... it compiles train.py's own step, runs two untimed steps, then times steps
for at least 2 s with no host sync between them. It stops after two doublings in a row that gain
less than 5 % over the best before them, or when a batch no longer fits in memory, and
recommends the smallest B within 10 % of the best tokens/s. Memory: the device's peak bytes in
use on a GPU; on a CPU, which does not report it, XLA's estimate of the step's temporaries.
"""
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import data
import model
import train


def throughput_stopped_rising(tok_s):
    """True once two doublings of B in a row gained less than 5 % over the best before them."""
    return len(tok_s) >= 3 and max(tok_s[-2:]) < 1.05 * max(tok_s[:-2])


def pick_batch(rows):
    """The smallest B whose tokens/s is within 10 % of the best: the paper's rule."""
    best = max(tok_s for _, tok_s in rows)
    return min(b for b, tok_s in rows if tok_s >= 0.9 * best)


def main(argv=None):
    parser = train.Parser(prog="python -m experiments.find_batch",
                          description=__doc__.split("\n\n")[0], parents=[train.common_flags()])
    args, _ = train.parse_args(parser, argv)
    cfg = model.PRESETS[args.model]
    train.make_optimizer(args, cfg.T)                    # the flags' checks, before any work
    try:
        train_tokens, _ = data.load(args.data, T=cfg.T, batch=1)
    except data.DataError as e:
        train.die(str(e))
    key = jax.random.key(args.seed)
    device = jax.devices()[0]
    print(f"find-batch {args.model} ({cfg}), {args.opt}, {args.param_dtype} weights, on "
          f"{device.device_kind} ({jax.default_backend()}); each B: compile, two untimed steps, "
          "then 2 s or more of steps")
    print(f"{'B':>6} {'tokens/step':>12} {'ms/step':>9} {'tokens/s':>10}  memory")
    rows, batch = [], 1
    while batch <= data.n_windows(train_tokens, cfg.T):
        opt, _ = train.make_optimizer(args, batch * cfg.T)
        params = model.cast(model.init_params(jax.random.fold_in(key, 0), cfg), args.param_dtype)
        state, stats = opt.init(params), train.new_stats()
        lr = jnp.float32(args.lr or train.OPTIMIZERS[args.opt]["lr"])
        x, y = data.get_batch(train_tokens, 0, batch, cfg.T, args.seed)
        step_fn = train.make_train_step(cfg, opt, n_steps=1_000, warmup=0.05,
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
        train.die(f"batch 1 of --model {args.model} does not fit in {device.device_kind}'s "
                  "memory; try a smaller --model or --param-dtype bfloat16.")
    pick = pick_batch(rows)
    print(f"recommended: --batch {pick}, the smallest batch within 10 % of the best throughput "
          f"({max(tok_s for _, tok_s in rows):,.0f} tokens/s): the paper's rule")
    return pick


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                 # Ctrl-C: one line, not a traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
