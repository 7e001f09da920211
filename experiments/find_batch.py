"""The smallest batch size that maximizes throughput on this device: the paper's advice for
choosing B (use the smallest batch that keeps the hardware busy, not the largest that fits).

    python -m experiments.find_batch                   # the default model and optimizer
    python -m experiments.find_batch --model 30m       # on a GPU: the paper's 30M model
    python -m experiments.find_batch --steps-per-call 1     # a call per step, for comparison

For B = 1, 2, 4, ... it compiles train.py's own calls of K steps (K timed as train.py times it,
or --steps-per-call), runs two untimed calls, then times calls for at least 2 s with no host
sync between them. It stops after two doublings in a row that gain less than 5 % over the best
before them, or when a batch no longer fits in memory, and recommends the smallest B within 10 %
of the best tokens/s. Memory: the device's peak bytes in use on a GPU; on a CPU, which does not
report it, XLA's estimate of the call's temporaries. Last, it prints each B's share of the best
throughput: the utilization B = 1 loses here, against the paper's 30-70 % (TPU v4).
"""
import dataclasses
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import data
import model
import train

TIMED_SECONDS = 2.0      # each batch size's calls are timed for at least this long


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
    parser.add_argument("--steps-per-call", type=int, help="steps per jitted call, K (default: "
                        "timed, as train.py does; 1: a call per step)")
    args = train.settings(parser, argv)
    cfg = dataclasses.replace(model.PRESETS[args.model], dtype=args.compute_dtype)
    if args.val_data:
        raise train.UsageError("--val-data does not apply to find_batch, which times training "
                               "steps only.")
    train.make_optimizer(args, cfg.T, cfg.H)             # the β's checks, before any work
    train_tokens, _ = train.load_data(args, cfg.T, 1, cfg.V)
    key = jax.random.key(args.seed)
    device = jax.devices()[0]
    print(f"find-batch {args.model} ({cfg}), {args.opt}, {args.param_dtype} weights, on "
          f"{device.device_kind} ({jax.default_backend()}); each B: compile, two untimed calls, "
          "then 2 s or more of calls")
    print(f"{'B':>6} {'tokens/step':>12} {'K':>5} {'ms/step':>9} {'tokens/s':>10} "
          f"{'GFLOP/s':>9}  memory")
    rows, batch = [], 1
    while batch <= data.n_windows(train_tokens, cfg.T):
        opt, _ = train.make_optimizer(args, batch * cfg.T, cfg.H)
        params = model.cast(model.init_params(jax.random.fold_in(key, 0), cfg), args.param_dtype)
        state, stats = opt.init(params), train.new_stats()
        lr = jnp.float32(args.lr)
        step_fn = train.make_train_step(cfg, opt, n_steps=1_000, warmup=0.05,
                                        rounding=args.rounding, key=jax.random.fold_in(key, 2))
        try:                       # train.py's calls of K steps, K timed as train.py times it
            call, K = train.compile_calls(step_fn, (params, state, stats, np.int32(0), lr),
                                          (batch, cfg.T), 1_024, args.steps_per_call)
            call = call(K)
            xs = data.get_batch(train_tokens, 0, batch, cfg.T, args.seed, steps=K)
            params, state, stats = jax.block_until_ready(call(params, state, stats,
                                                              np.int32(0), *xs, lr))
            t0 = time.time()       # a call with a host sync, to size the timed run
            params, state, stats = jax.block_until_ready(call(params, state, stats,
                                                              np.int32(K), *xs, lr))
            n = max(3, math.ceil(TIMED_SECONDS / (time.time() - t0)))
            t0 = time.time()
            for i in range(2, n + 2):   # the same batches: timing only, no host sync inside
                params, state, stats = call(params, state, stats, np.int32(i * K), *xs, lr)
            jax.block_until_ready(params)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"{batch:>6} out of device memory")
            break
        seconds = (time.time() - t0) / (n * K)
        used = device.memory_stats()       # None on CPU: then XLA's estimate for the step
        memory = (f"{used['peak_bytes_in_use'] / 1e9:.2f} GB peak on the device so far"
                  if used and "peak_bytes_in_use" in used else
                  f"{call.memory_analysis().temp_size_in_bytes / 1e9:.3f} GB of the call's "
                  "temporaries (XLA's estimate)")
        rows.append((batch, batch * cfg.T / seconds))
        print(f"{batch:>6} {batch * cfg.T:>12,} {K:>5} {seconds * 1e3:>9.2f} {rows[-1][1]:>10,.0f} "
              f"{rows[-1][1] * model.flops_per_token(cfg) / 1e9:>9,.1f}  " + memory)
        if throughput_stopped_rising([tok_s for _, tok_s in rows]):
            break
        batch *= 2
    if not rows:
        raise train.UsageError(f"batch 1 of --model {args.model} does not fit in "
                               f"{device.device_kind}'s memory; try a smaller --model or "
                               "--param-dtype bfloat16.")
    best = max(tok_s for _, tok_s in rows)
    print("share of the best throughput: " + ", ".join(f"B = {b} {tok_s / best:.0%}"
                                                       for b, tok_s in rows))
    print(f"B = 1 loses {1 - rows[0][1] / best:.0%} of the best utilization here; the paper: "
          "B = 1-2 lost 30-70 % of MFU on TPU v4")
    pick = pick_batch(rows)
    print(f"recommended: --batch {pick}, the smallest batch within 10 % of the best throughput "
          f"({max(tok_s for _, tok_s in rows):,.0f} tokens/s): the paper's rule")
    return pick


if __name__ == "__main__":
    sys.exit(train.run_program(main, interrupted="interrupted"))
