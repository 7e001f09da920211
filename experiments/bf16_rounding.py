"""bf16 weights with and without stochastic rounding: the paper's Fig. 9 at this project's scale.

    python -m experiments.bf16_rounding                 # 9 runs, about an hour on 2 CPU cores
    python -m experiments.bf16_rounding --opt adam      # one optimizer's 3 runs

For each optimizer it trains `python train.py --batch 1` (the default model, corpus and budget,
each optimizer at its default learning rate) three times: float32 weights, bf16 weights rounded
to nearest, and bf16 weights rounded stochastically; then writes <out>/bf16.md, a table of the
bytes held and the final validation losses. Each run is a train.py run in <out>/<opt>-<weights>/,
so Ctrl-C keeps what is done and the same command goes on from there: a finished run with the
same settings is reused, an interrupted one resumed.
"""
import json
import os
import sys
from pathlib import Path

import jax

import data
import model
import train

WEIGHTS = {  # the name in the table: (folder suffix, train.py flags)
    "float32": ("float32", ["--param-dtype", "float32"]),
    "bf16, nearest": ("bf16-nearest", ["--param-dtype", "bfloat16", "--rounding", "nearest"]),
    "bf16, stochastic": ("bf16-stochastic", ["--param-dtype", "bfloat16", "--rounding",
                                             "stochastic"]),
}


def run(opt, weights, args):
    """Train (or reuse, or resume) one run; its config.json as a dict."""
    suffix, flags = WEIGHTS[weights]
    out = Path(args.out) / f"{opt}-{suffix}"
    flags = ["--batch", "1", "--opt", opt, *flags, "--data", args.data, "--seed", str(args.seed),
             "--sample", "0", "--out", str(out)] + (["--tokens", str(args.tokens)] if args.tokens
                                                    else [])
    want, _ = train.parse_args(train.make_parser(), flags)   # the settings this run must have
    same = lambda saved: all(saved[k] == getattr(want, k) for k in
                             ("opt", "param_dtype", "rounding", "data", "seed", "batch"))
    try:
        config = json.loads((out / "config.json").read_text())
        tokens = args.tokens and args.tokens // model.PRESETS["tiny"].T * model.PRESETS["tiny"].T
        if config["steps_done"] == config["n_steps"] and same(config["args"]) and (
                not tokens or config["args"]["tokens"] == tokens):       # tokens as resolved
            print(f"reused     {out}: a finished run with these settings")
            return config
    except (OSError, ValueError, KeyError):
        pass                                  # no finished run there: train one
    try:
        meta = train.load_checkpoint(out / "ckpt.npz")[1]
        resume = meta["step"] < meta["n_steps"] and same(meta["args"])
    except train.CKPT_ERRORS:
        resume = False
    train.main(["--resume", "--out", str(out)] if resume else flags)
    return json.loads((out / "config.json").read_text())


def table(rows):
    lines = ["| optimizer | weights | parameters + state, bytes | final validation loss | "
             "time |", "|---|---|---|---|---|"]
    for opt, weights, config, held in rows:
        lines.append(f"| {opt} | {weights} | {held[0]:,} + {held[1]:,} | "
                     f"{config['final_val_loss']:.3f} | {config['elapsed_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = train.Parser(prog="python -m experiments.bf16_rounding",
                     description=__doc__.split("\n\n")[0])
    p.add_argument("--opt", nargs="+", choices=list(train.OPTIMIZERS),
                   default=["sgd", "adafactor", "adam"], help="optimizers (default: all three)")
    p.add_argument("--tokens", type=train.count, help="tokens per run (default: one pass)")
    p.add_argument("--data", default=os.path.relpath(data.DEFAULT_TEXT),
                   help="any UTF-8 text file (default: the shipped Shakespeare)")
    p.add_argument("--seed", type=int, default=0, help="seeds every run (default 0)")
    p.add_argument("--out", default="out/bf16", help="output folder (default out/bf16)")
    args, _ = train.parse_args(p, argv)
    cfg, rows = model.PRESETS["tiny"], []
    try:
        for opt in args.opt:
            for weights, (_, flags) in WEIGHTS.items():
                config = run(opt, weights, args)
                optimizer_args = train.common_flags().parse_args(["--opt", opt, *flags])
                optimizer, _ = train.make_optimizer(optimizer_args, cfg.T)
                shapes = jax.eval_shape(lambda: train.cast(model.init_params(
                    jax.random.key(0), cfg), optimizer_args.param_dtype))
                held = train.nbytes(shapes), train.nbytes(jax.eval_shape(optimizer.init, shapes))
                rows.append((opt, weights, config, held))
    except SystemExit as e:
        if e.code == 130:                     # Ctrl-C inside a run: its checkpoint is written
            print("interrupted; run the same command again to go on from there", file=sys.stderr)
        raise
    (Path(args.out) / "bf16.md").write_text(table(rows))
    print(f"\n{table(rows)}\nwrote {args.out}/bf16.md (time: each run's training and evaluation, "
          "without compilation)")


if __name__ == "__main__":
    main()
