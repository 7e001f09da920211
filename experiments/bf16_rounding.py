"""bf16 weights with and without stochastic rounding: the paper's Fig. 9 at this project's scale.

    python -m experiments.bf16_rounding                 # 9 runs, about an hour on 2 CPU cores
    python -m experiments.bf16_rounding --opt adam      # one optimizer's 3 runs

For each optimizer it trains `python train.py --batch 1` (the default model, corpus and budget,
each optimizer at its default learning rate) three times: float32 weights, bf16 weights rounded
to nearest, and bf16 weights rounded stochastically; then writes <out>/bf16.md, a table of the
bytes held and the final validation losses. Each run is a train.py run in <out>/<opt>-<weights>/,
so Ctrl-C keeps what is done and the same command goes on from there: a finished run with the
same settings and tokens is reused, an interrupted one resumed.
"""
import json
import os
import sys
from pathlib import Path

import jax

import data
import model
import optim
import train

WEIGHTS = {  # the name in the table: (folder suffix, train.py flags)
    "float32": ("float32", ["--param-dtype", "float32"]),
    "bf16, nearest": ("bf16-nearest", ["--param-dtype", "bfloat16", "--rounding", "nearest"]),
    "bf16, stochastic": ("bf16-stochastic", ["--param-dtype", "bfloat16", "--rounding",
                                             "stochastic"]),
}
# The flags that decide a run's result: a saved run is reused or resumed only if they all match.
SETTINGS = ("model", "opt", "lr", "b1", "t1", "b2", "t2", "weight_decay", "param_dtype",
            "rounding", "batch", "grad_accum", "warmup", "tokens", "seed")


def same_run(meta, want, data_hash):
    """Whether a checkpoint's meta is of the run `want` (resolved flags) on these tokens."""
    return meta.get("data_sha256") == data_hash and all(
        meta.get("args", {}).get(k) == want[k] for k in SETTINGS)


def run(opt, weights, args, tokens, data_hash):
    """Train (or reuse, or resume) one run: (its config.json as a dict, or None if it diverged,
    and the bytes of its parameters and optimizer state)."""
    suffix, flags = WEIGHTS[weights]
    out = Path(args.out) / f"{opt}-{suffix}"
    flags = ["--batch", "1", "--opt", opt, *flags, "--data", args.data, "--seed", str(args.seed),
             "--tokens", str(tokens), "--sample", "0", "--out", str(out)]
    want = train.settings(train.make_parser(), flags)    # with --lr and --rounding filled in
    cfg = model.PRESETS[want.model]
    optimizer, _ = train.make_optimizer(want, cfg.T, cfg.H)
    want = {**vars(want), "tokens": tokens // cfg.T * cfg.T}    # as train.py resolves it
    shapes = jax.eval_shape(lambda: model.cast(model.init_params(jax.random.key(0), cfg),
                                               want["param_dtype"]))
    held = model.nbytes(shapes), model.nbytes(jax.eval_shape(optimizer.init, shapes))
    try:
        meta = train.load_checkpoint(out / "ckpt.npz")[1]
    except train.CKPT_ERRORS:
        meta = {}
    if same_run(meta, want, data_hash) and meta["step"] == meta["n_steps"] and (
            out / "config.json").exists():
        print(f"reused     {out}: a finished run with these settings")
    else:
        if meta and not same_run(meta, want, data_hash):   # this experiment's own folder
            print(f"replacing  {out}: a run of other settings")
            (out / "ckpt.npz").unlink()
        try:   # Ctrl-C inside it checkpoints the run, then reaches main's caller
            train.main(["--resume", "--out", str(out)] if same_run(meta, want, data_hash)
                       else flags)
        except train.Diverged as e:           # a result too: the table says so, and why here
            print(f"error: {e}", file=sys.stderr)
            return None, held
    return json.loads((out / "config.json").read_text()), held


def table(rows):
    lines = ["| optimizer | weights | parameters + state, bytes | final validation loss | "
             "time |", "|---|---|---|---|---|"]
    for opt, weights, config, held in rows:
        loss, time = ("diverged", "-") if config is None else (
            f"{config['final_val_loss']:.3f}", f"{config['elapsed_s'] / 60:.1f} min")
        lines.append(f"| {opt} | {weights} | {held[0]:,} + {held[1]:,} | {loss} | {time} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = train.Parser(prog="python -m experiments.bf16_rounding",
                     description=__doc__.split("\n\n")[0])
    p.add_argument("--opt", nargs="+", choices=list(optim.OPTIMIZERS),
                   default=["sgd", "adafactor", "adam"],
                   help="optimizers (default: sgd adafactor adam)")
    p.add_argument("--tokens", type=train.count, help="tokens per run (default: one pass)")
    p.add_argument("--data", default=os.path.relpath(data.DEFAULT_TEXT),
                   help="a text or token files, as train.py's (default: shipped Shakespeare)")
    p.add_argument("--seed", type=int, default=0, help="seeds every run (default 0)")
    p.add_argument("--out", default="out/bf16", help="output folder (default out/bf16)")
    args, _ = train.parse_args(p, argv)
    T = model.PRESETS["tiny"].T
    train_tokens, val_tokens = train.load_data(args, T, 1)
    data_hash = data.fingerprint(train_tokens, val_tokens)
    tokens = args.tokens or data.n_windows(train_tokens, T) * T     # train.py's default budget
    try:
        rows = [(opt, weights, *run(opt, weights, args, tokens, data_hash))
                for opt in args.opt for weights in WEIGHTS]
    except KeyboardInterrupt as e:            # in a run: its checkpoint is written, and resumed
        raise KeyboardInterrupt("\n".join(filter(None, [str(e), "interrupted; run the same "
                                "command again to go on from there"]))) from None
    try:
        (Path(args.out) / "bf16.md").write_text(table(rows))
    except OSError as e:
        raise train.UsageError(f"--out {args.out} cannot be written ({e.strerror}).") from None
    print(f"\n{table(rows)}\nwrote {args.out}/bf16.md (time: each run's training and evaluation, "
          "without compilation)")


if __name__ == "__main__":     # Ctrl-C in a run or between runs: every checkpoint is whole
    sys.exit(train.run_program(main, interrupted="interrupted; run the same command again to "
                               "go on from there"))
