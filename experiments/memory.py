"""The memory a run holds, for the paper's presets: weights, each optimizer's state and the
gradient-accumulation buffer (the paper's Fig. 7 and its case against accumulation); with
--measure, also what XLA says the compiled train step needs at its peak.

    python -m experiments.memory                      # counted: a markdown table, about 1 s
    python -m experiments.memory --measure            # and XLA's: 8 min on a 2-core CPU
    python -m experiments.memory --measure --model gpt3xl --remat --attention fused  # Fig. 7's

Counted: the bytes of the pytrees the code builds (jax.eval_shape of the real init functions,
which allocates nothing). Optimizer state and the buffer are float32 whatever the weights' dtype
(optim.py keeps its state and arithmetic in float32); the paper's Fig. 7 keeps everything in
16 bits instead. Activations are not counted: they depend on the batch and on XLA.

Measured (--measure): train.py's own step at batch size 1, jitted with params, state and stats
donated, lowered for jax.ShapeDtypeStructs and compiled, never run, so no model is allocated
even for gpt3xl; then XLA's memory_analysis() of it, for each optimizer, weights in float32 and
in bfloat16 (stochastic rounding), and Adam with batch 16 as 16 accumulated micro-batches of 1
(Fig. 7's "accumulation" bar). On a CPU these are XLA:CPU's numbers: a GPU's compiler fuses and
schedules otherwise (and its fused attention never stores the [T, T] scores), so read them as an
estimate of a GPU's, not its measurement.
"""
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp

import model
import optim
import train

PRESETS = ("30m", "gpt2", "gpt3xl")
ACCUMULATED = 16      # Fig. 7's accumulation bar: batch 16 as this many micro-batches of 1
# (optimizer, weights' dtype, micro-batches) of each measured row, at batch size 1 otherwise
MEASURED = [(opt, dtype, 1) for opt in optim.OPTIMIZERS for dtype in ("float32", "bfloat16")
            ] + [("adam", dtype, ACCUMULATED) for dtype in ("float32", "bfloat16")]
# The devices a row may fit on, and the share of their memory a step may take: the rest is the
# runtime's own (CUDA context, allocator fragmentation). JAX preallocates 75 % by default:
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 lets it use this much.
DEVICES = {"80 GB": 80 * 2 ** 30, "40 GB": 40 * 2 ** 30}
USABLE = 0.9
# XLA:CPU's default schedule favours parallelism over memory: a breadth-first order that keeps
# more buffers live at once and runs --remat's recomputation early, so that it saves nothing
# (gpt3xl's Adam step: 30.7 GB of temporaries with or without --remat). A memory table should
# show the memory-minimizing schedule (16.7 GB; 8.8 GB with --remat). XLA reads XLA_FLAGS once,
# when JAX starts its backend, so __main__ sets it before that; jit's compiler_options cannot
# (XLA:CPU ignores this one there).
SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def memory_rows(presets=PRESETS):
    """One dict per (preset, weight dtype): parameters, and the bytes of the weights, of each
    optimizer's state and of the accumulation buffer."""
    rows = []
    for name in presets:
        cfg = model.PRESETS[name]
        for dtype in ("float32", "bfloat16"):
            shapes = jax.eval_shape(
                lambda: model.cast(model.init_params(jax.random.key(0), cfg), dtype))
            row = {"model": name, "dtype": dtype, "params": sum(x.size for x in shapes.values()),
                   "weights": model.nbytes(shapes)}
            for opt in optim.OPTIMIZERS:    # each at its default flags (no shape depends on them)
                flags = train.settings(train.common_flags(), ["--opt", opt, "--param-dtype", dtype])
                optimizer, _ = train.make_optimizer(flags, cfg.T, cfg.H)
                row[f"{opt} state"] = model.nbytes(jax.eval_shape(optimizer.init, shapes))
            row["accumulation buffer"] = model.nbytes(
                jax.eval_shape(train.accumulation_buffer, shapes))
            rows.append(row)
    return rows


def compile_step(name, opt, dtype, grad_accum=1, remat=False, attention="einsum"):
    """train.py's step for preset `name`, --opt opt and --param-dtype dtype, at batch size
    grad_accum split into micro-batches of 1, compiled for shapes only (nothing is allocated)."""
    s = train.settings(train.common_flags(), ["--model", name, "--opt", opt,
                                              "--param-dtype", dtype])
    cfg = dataclasses.replace(model.PRESETS[name], dtype=s.compute_dtype, remat=remat,
                              attention=attention)
    optimizer, _ = train.make_optimizer(s, grad_accum * cfg.T, cfg.H)
    params = jax.eval_shape(lambda: model.cast(model.init_params(jax.random.key(0), cfg), dtype))
    # n_steps and warmup only shape the learning rate, a scalar: any values give the same bytes
    step = train.make_train_step(cfg, optimizer, n_steps=1_000, warmup=0.05,
                                 grad_accum=grad_accum, rounding=s.rounding,
                                 key=jax.random.key(s.seed))
    ids = jax.ShapeDtypeStruct((grad_accum, cfg.T), jnp.int32)        # x and y: [B, T]
    step_number, peak_lr = (jax.ShapeDtypeStruct((), dtype) for dtype in (jnp.int32, jnp.float32))
    arguments = (params, jax.eval_shape(optimizer.init, params), jax.eval_shape(train.new_stats),
                 step_number, ids, ids, peak_lr)
    # donated as train.py donates them: the new params, state and stats overwrite the old
    return jax.jit(step, donate_argnums=(0, 1, 2)).lower(*arguments).compile()


def measure(name, opt, dtype, grad_accum=1, remat=False, attention="einsum"):
    """XLA's bytes for compile_step's step, and the seconds it took to lower and compile:
    arguments (weights, state, stats, the step, the batch, the peak rate), outputs, aliased (the
    outputs written into donated arguments), temporaries (XLA's scratch, packed into one block
    of this size: activations, gradients, logits, the accumulation buffer), and the peak. The
    numbers depend on XLA's schedule, which this process fixed when it started (SCHEDULER)."""
    t0 = time.time()
    m = compile_step(name, opt, dtype, grad_accum, remat, attention).memory_analysis()
    row = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    # the arguments live through the step; outputs written in place of a donated argument
    # need no memory of their own; the temporaries come on top
    row["peak"] = row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"]
    return {**row, "seconds": time.time() - t0}


def fits(peak):
    """The DEVICES whose usable memory holds `peak` bytes, as words."""
    names = [name for name, size in DEVICES.items() if peak <= USABLE * size]
    return " and ".join(names) or "neither"


def fmt_bytes(n):
    return next(f"{n / scale:.3g} {unit}" for scale, unit in
                [(1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "bytes")] if n >= scale or scale == 1)


def print_counted(rows):
    columns = list(rows[0])[3:]
    print("| model | parameters | weights dtype | " + " | ".join(columns) + " |\n"
          + "|---" * (3 + len(columns)) + "|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:,.1f}M | {r['dtype']} | "
              + " | ".join(fmt_bytes(r[c]) for c in columns) + " |")


HEADER = ("| model | optimizer | weights | counted: weights + state | + buffer | arguments "
          "| arguments − counted | outputs | aliased | temporaries | peak | fits | compile time |")
NOTES = f"""peak = arguments + outputs − aliased + temporaries: the arguments stay live through
  the step; params, state and stats are donated, so the outputs written into them (aliased)
  take no more; temporaries hold the activations, the gradient, the logits and the
  accumulation buffer.
arguments − counted = the batch's token ids x and y (2 × B × T × 4 bytes), the step and the peak
  rate (4 bytes each) and the loss stats (8): the rest of the arguments is the counted weights
  and state, to the byte. The accumulation buffer is among the temporaries.
fits: the peak within {USABLE:.0%} of {" or ".join(DEVICES)} (2^30 bytes a GB), the rest left to
  the runtime; JAX takes 75 % by default (XLA_PYTHON_CLIENT_MEM_FRACTION)."""


def schedule():
    """XLA:CPU's schedule in this process, in words for the title ("" on other backends)."""
    if jax.default_backend() != "cpu":
        return ""
    return (" (memory-minimizing schedule)" if SCHEDULER in os.environ.get("XLA_FLAGS", "")
            else " (XLA's default schedule)")


def measured_row(name, opt, dtype, grad_accum, counted, remat, attention):
    """(a table row, the step's temporaries) of one MEASURED setting, beside its counted bytes."""
    held = counted["weights"] + counted[f"{opt} state"]     # what the step's arguments hold
    buffer = counted["accumulation buffer"] if grad_accum > 1 else 0
    m = measure(name, opt, dtype, grad_accum, remat, attention)
    setting = opt + (f", {grad_accum} × 1 accumulated" if grad_accum > 1 else "")
    weights = dtype + (", stochastic" if dtype == "bfloat16" else "")
    cells = [name, setting, weights, fmt_bytes(held), fmt_bytes(buffer),
             fmt_bytes(m["arguments"]), f"{m['arguments'] - held:,} bytes",
             *(fmt_bytes(m[c]) for c in ("outputs", "aliased", "temporaries", "peak")),
             fits(m["peak"]), f"{m['seconds']:.0f} s"]
    return "| " + " | ".join(cells) + " |", m["temporaries"]


def print_measured(counted, presets, remat, attention):
    """One row per preset and MEASURED setting, printed as it is compiled; then what
    accumulation added against its counted buffer, and what the columns mean."""
    counted = {(r["model"], r["dtype"]): r for r in counted}
    print(f"\nXLA's memory analysis of the compiled train step on {jax.devices()[0].device_kind}"
          f"{schedule()}, batch size 1, remat {'on' if remat else 'off'}, {attention} attention:"
          f"\n\n{HEADER}\n" + "|---" * HEADER.count(" | ") + "|---|")
    t0, accumulation = time.time(), []
    for name in presets:
        temps = {}
        for opt, dtype, k in MEASURED:
            line, temps[opt, dtype, k] = measured_row(name, opt, dtype, k, counted[name, dtype],
                                                      remat, attention)
            print(line, flush=True)                  # gpt3xl takes seconds to a minute a row
        for dtype in ("float32", "bfloat16"):
            if {("adam", dtype, 1), ("adam", dtype, ACCUMULATED)} <= temps.keys():
                added = temps["adam", dtype, ACCUMULATED] - temps["adam", dtype, 1]
                buffer = counted[name, dtype]["accumulation buffer"]
                accumulation.append(f"{name}, {dtype} weights: accumulating adds "
                                    f"{fmt_bytes(added)} of temporaries to Adam's step, "
                                    f"{added / buffer:.0%} of the counted buffer")
    print(f"\ncompiled {len(presets) * len(MEASURED)} steps in {time.time() - t0:.0f} s "
          "(lowered and compiled only; nothing ran)")
    print("\n".join(accumulation + [NOTES]))


def main(argv=None):
    parser = train.Parser(prog="python -m experiments.memory",
                          description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--measure", action="store_true", help="also compile each step and print XLA's bytes "
        "(8 min on a 2-core CPU for the default presets, gpt3xl alone 3.5 to 5)")
    add("--model", nargs="+", choices=list(model.PRESETS), default=list(PRESETS),
        help="presets, one or more (default: " + " ".join(PRESETS) + ")")
    add("--remat", action="store_true", help="--measure: recompute each block in the backward "
        "pass (model.Config.remat), as the paper's Fig. 7")
    add("--attention", choices=["einsum", "fused"], help="--measure: model.Config.attention "
        "(default einsum; fused: jax.nn.dot_product_attention)")
    args = parser.parse_args(argv)
    if not args.measure and (args.remat or args.attention):
        raise train.UsageError("--remat and --attention apply to --measure only: the counted "
                               "table holds no activations.")
    rows = memory_rows(args.model)
    print_counted(rows)
    if args.measure:
        print_measured(rows, args.model, args.remat, args.attention or "einsum")


if __name__ == "__main__":
    # before JAX starts (see SCHEDULER); a schedule named in XLA_FLAGS already is kept
    if SCHEDULER.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SCHEDULER).strip()
    sys.exit(train.run_program(main, interrupted="interrupted"))
