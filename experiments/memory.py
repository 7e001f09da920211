"""The memory a run holds, for the paper's presets: weights, each optimizer's state and the
gradient-accumulation buffer (the paper's Fig. 7 and its case against accumulation).

    python -m experiments.memory       # a markdown table, about 1 s on any machine

The bytes come from the pytrees the code builds (jax.eval_shape of the real init functions,
which allocates nothing). Optimizer state and the buffer are float32 whatever the weights' dtype
(optim.py keeps its state and arithmetic in float32); the paper's Fig. 7 keeps everything in
16 bits instead. Activations are not here: they depend on the batch (experiments.find_batch).
"""
import sys

import jax

import model
import optim
import train

PRESETS = ("30m", "gpt2", "gpt3xl")


def memory_rows():
    """One dict per (preset, weight dtype): parameters, and the bytes of the weights, of each
    optimizer's state and of the accumulation buffer."""
    rows = []
    for name in PRESETS:
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


def fmt_bytes(n):
    return next(f"{n / scale:.3g} {unit}" for scale, unit in
                [(1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "bytes")] if n >= scale or scale == 1)


def main(argv=None):
    train.Parser(prog="python -m experiments.memory",                    # --help; no flags
                 description=__doc__.split("\n\n")[0]).parse_args(argv)
    rows = memory_rows()
    columns = list(rows[0])[3:]
    print("| model | parameters | weights dtype | " + " | ".join(columns) + " |\n"
          + "|---" * (3 + len(columns)) + "|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:,.1f}M | {r['dtype']} | "
              + " | ".join(fmt_bytes(r[c]) for c in columns) + " |")


if __name__ == "__main__":
    sys.exit(train.run_program(main, interrupted="interrupted"))
