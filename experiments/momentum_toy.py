"""The momentum toy problem of the paper's Appendix B (Fig. 10): large batches need momentum,
small batches do not.

    python -m experiments.momentum_toy                          # both tables, 10 to 20 s
    python -m experiments.momentum_toy --plot momentum_toy.png  # and the figure (matplotlib)

Loss f(x, y) = x² + 10·y² from (−1, 1). A batch of size b, in units of the critical batch size,
gives the gradient g + σ·|g|·ε with σ = 1/√b and ε ~ N(0, 1), |g| taken per coordinate, as in
the paper's notebook utils/toy.ipynb: each coordinate is g_i·(1 + σ·ε_i), so below b = 1 the
noise is larger than the gradient, in each direction alike. The toy steps with the trainer's own
optim.sgd, whose momentum is the paper's EMA form, so the paper's learning rates carry over
unchanged (heavy-ball momentum, m ← β·m + g, would need each lr times 1 − β: see sgd's
docstring). 1,000 noise seeds per setting, vectorised with jax.vmap, stepped with jax.lax.scan
(jax.lax.fori_loop for the sweep). experiments/README.md shows its output; the tests read it.
"""
import argparse
import math
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import optim
import train

f32 = jnp.float32
TOY_START = (-1.0, 1.0)
TOY_PANELS = {  # Fig. 10's four panels: 25 × 10 = 250 and 0.09 × 100 = 9 gradient samples
    "large batch, SGD": dict(b=25.0, steps=10, lr=0.09, beta=0.0),
    "large batch, SGD + momentum": dict(b=25.0, steps=10, lr=0.12, beta=0.4),
    "small batch, SGD": dict(b=0.09, steps=100, lr=0.012, beta=0.0),
    "small batch, SGD + momentum": dict(b=0.09, steps=100, lr=0.012, beta=0.4),
}
TOY_THRESHOLD = 1e-2  # loss for "steps to reach": 96-97 % of large-batch momentum's seeds get
                      # there, 0.3-0.4 % of SGD's (seeds 0, 1, 2)
SWEEP_SAMPLES = 32    # b × steps per sweep run. Not more: the loss falls exponentially at every
                      # b, and faster the smaller b is at a fixed budget. At 32 the median final
                      # loss at b = 1/32 is ~1e-28 and up to 2 % of seeds reach float32's
                      # floor (1e-38, where the loss reads 0); at 64 the medians do by b = 1/16.
SWEEP_STEPS = [2 ** k for k in range(11)]               # 1 ... 1,024 steps, so b = 32 ... 1/32
SWEEP_BETAS = (0.0, 0.4, 0.9)
SWEEP_LRS = [2 ** (k / 2) for k in range(-20, 3)]      # 2^-10 ≈ 0.001 ... 2, a factor √2 apart;
                                                       # the best lr's lie in 0.0055 ... 0.5


def toy_loss(w):
    return w[..., 0] ** 2 + 10 * w[..., 1] ** 2          # [...] from w [..., 2]; numpy or jax


def toy_step(opt, key, b, lr):
    """One step of opt on the toy, with one seed's noise, in lax.scan's form: carry, t -> w_t+1."""
    def step(carry, t):
        params, state = carry
        g = jax.grad(lambda p: toy_loss(p["w"]))(params)["w"]
        eps = jax.random.normal(jax.random.fold_in(key, t), (2,))
        noisy = {"w": g + jnp.abs(g) * eps / jnp.sqrt(b)}   # per coordinate; b = inf: exact g
        updates, state = opt.update(noisy, state, params, lr)
        params = optim.apply_updates(params, updates)
        return (params, state), params["w"]
    return step


def _toy_start(opt):
    params = {"w": jnp.array(TOY_START, f32)}
    return params, opt.init(params)


@partial(jax.jit, static_argnames=("steps", "beta", "seeds"))
def toy_paths(b, lr, steps, beta, seeds, seed=0):
    """The points w_0 ... w_steps [seeds, steps + 1, 2] of optim.sgd(b1=beta), a path per seed."""
    opt = optim.sgd(b1=beta)

    def path(key):
        _, ws = jax.lax.scan(toy_step(opt, key, b, lr), _toy_start(opt), jnp.arange(steps))
        return jnp.concatenate([jnp.array([TOY_START], f32), ws])

    return jax.vmap(path)(jax.random.split(jax.random.key(seed), seeds))


@partial(jax.jit, static_argnames=("beta", "seeds"))
def toy_final_losses(b, lrs, steps, beta, seeds, seed=0):
    """The loss after `steps` steps [lrs, seeds]. b, the lrs and steps are traced, so the whole
    sweep compiles once per β; every lr (and every β) sees the same seeds' noise."""
    opt = optim.sgd(b1=beta)

    def final_loss(key, lr):
        step = toy_step(opt, key, b, lr)
        params, _ = jax.lax.fori_loop(0, steps, lambda t, c: step(c, t)[0], _toy_start(opt))
        loss = toy_loss(params["w"])
        return jnp.where(jnp.isnan(loss), jnp.inf, loss)             # diverged: inf, not nan

    keys = jax.random.split(jax.random.key(seed), seeds)
    return jax.vmap(jax.vmap(final_loss, in_axes=(0, None)), in_axes=(None, 0))(keys, lrs)


def steps_to_reach(losses, threshold):
    """The first step at which each path's loss [seeds, steps + 1] is <= threshold; inf if none."""
    hit = losses <= threshold
    return np.where(hit.any(axis=1), hit.argmax(axis=1), np.inf)


def toy_panels(seeds=1000, seed=0):
    """Fig. 10's four runs: {name: paths [seeds, steps + 1, 2]} as float64 numpy arrays."""
    return {name: np.asarray(toy_paths(**s, seeds=seeds, seed=seed), np.float64)
            for name, s in TOY_PANELS.items()}


def toy_sweep(seeds=1000, seed=0):
    """b = SWEEP_SAMPLES / steps for each of SWEEP_STEPS: [(b, steps, {β: (median final loss,
    lr)})], at each β's best lr of SWEEP_LRS by median final loss."""
    lrs, rows = jnp.array(SWEEP_LRS, f32), []
    for steps in SWEEP_STEPS:
        b, best = SWEEP_SAMPLES / steps, {}
        for beta in SWEEP_BETAS:
            losses = np.asarray(toy_final_losses(b, lrs, steps, beta, seeds, seed), np.float64)
            median = np.median(losses, axis=1)                          # [lrs]
            best[beta] = (float(median.min()), SWEEP_LRS[int(median.argmin())])
        rows.append((b, steps, best))
    return rows


def print_panels(paths):
    print(f"{'setting':<28} {'b':>5} {'steps':>5} {'lr':>6} {'β':>4}   "
          f"{'final loss: median [25%, 75%]':<32} steps to loss <= {TOY_THRESHOLD:g}: median")
    for name, w in paths.items():
        s, losses = TOY_PANELS[name], toy_loss(w)                       # [seeds, steps + 1]
        q25, q50, q75 = np.percentile(losses[:, -1], [25, 50, 75])
        n = np.median(steps_to_reach(losses, TOY_THRESHOLD))          # inf if most never do
        reach = f"{n:g}" if np.isfinite(n) else f"more than {s['steps']}"
        print(f"{name:<28} {s['b']:>5g} {s['steps']:>5} {s['lr']:>6g} {s['beta']:>4g}   "
              f"{f'{q50:.3g} [{q25:.3g}, {q75:.3g}]':<32} {reach}")


def _best_momentum(best):
    """The lowest median final loss of any β > 0, from one sweep row's {β: (loss, lr)}."""
    return min(loss for beta, (loss, _) in best.items() if beta > 0)


def _momentum_gain(best):
    """SGD's median final loss over the best momentum's."""
    momentum = _best_momentum(best)
    return best[0.0][0] / momentum if momentum > 0 else math.inf   # 0: underflowed (few seeds)


def _momentum_speedup(best):
    """How much faster the best momentum's loss fell, on a log scale: ln(its loss) / ln(SGD's).
    The loss falls about geometrically, so this is the ratio of the two convergence rates; it
    means nothing (None) until SGD's loss is below 1."""
    sgd_loss, momentum = best[0.0][0], _best_momentum(best)
    if not 0 < sgd_loss < 1 or momentum <= 0:
        return None
    return math.log(momentum) / math.log(sgd_loss)


def print_sweep(rows):
    heads = "".join(f"   {f'β = {beta:g} (best lr)':<19}" for beta in SWEEP_BETAS)
    print(f"{'b':>8} {'steps':>5}{heads}   loss ratio   speed-up")
    for b, steps, best in rows:
        cells = "".join(f"   {f'{loss:.2e} ({lr:.2g})':<19}" for loss, lr in best.values())
        speedup = _momentum_speedup(best)
        print(f"{b:>8.4g} {steps:>5}{cells}   {_momentum_gain(best):>10.3g}   "
              + ("       -" if speedup is None else f"{speedup:>8.3g}"))


def plot_toy(paths, rows, file):
    """Fig. 10's four panels (median path with interquartile bars over the loss's contours), and
    the sweep against b: each β's best median final loss, and SGD's over the best momentum's."""
    import matplotlib                                # optional: only --plot needs it
    matplotlib.use("Agg")                            # draw to a file, no window
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 7), layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 1.2])
    x, y = np.meshgrid(np.linspace(-2, 1, 301), np.linspace(-1.3, 1.3, 261))
    for i, (name, w) in enumerate(paths.items()):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        ax.contour(x, y, toy_loss(np.stack([x, y], -1)), levels=np.geomspace(0.03, 20, 8),
                   colors="0.75", linewidths=0.8)
        q25, med, q75 = np.percentile(w, [25, 50, 75], axis=0)        # each [steps + 1, 2]
        ax.errorbar(med[:, 0], med[:, 1], xerr=[med[:, 0] - q25[:, 0], q75[:, 0] - med[:, 0]],
                    yerr=[med[:, 1] - q25[:, 1], q75[:, 1] - med[:, 1]], color="#B85C5C",
                    lw=1.5, elinewidth=0.8, capsize=2)
        s = TOY_PANELS[name]
        ax.set_title(f"{name}\nb = {s['b']:g}, {s['steps']} steps, lr = {s['lr']:g}", fontsize=10)
        ax.set(xlim=(-2, 1), ylim=(-1.3, 1.3), xlabel="x", ylabel="y")
    b = [row[0] for row in rows]
    ax = fig.add_subplot(grid[0, 2])
    for beta in SWEEP_BETAS:
        ax.loglog(b, [row[2][beta][0] for row in rows], "o-", ms=3, label=f"β = {beta:g}")
    ax.set_title(f"the sweep, b × steps = {SWEEP_SAMPLES}: median final loss at the best lr",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, 2], sharex=ax)
    speedups = [_momentum_speedup(row[2]) for row in rows]
    ax.semilogx(*zip(*[(bi, s) for bi, s in zip(b, speedups) if s is not None]), "o-", ms=3,
                color="k")
    ax.axhline(1, color="0.6", lw=0.8)
    ax.set_title("momentum's speed-up: ln(its loss) / ln(SGD's) (above 1: it helps)", fontsize=9)
    ax.set_xlabel("batch size b, in units of the critical batch size")
    fig.savefig(file, dpi=100)


def int_from(low):
    def parse(text):
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return int(text)
    return parse


def main(argv=None):
    p = train.Parser(prog="python -m experiments.momentum_toy",
                     description="The momentum toy problem of Marek et al. (2025), Appendix B, "
                     "Fig. 10.")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the figure (needs matplotlib)")
    p.add_argument("--seeds", type=int_from(1), default=1000, help="noise seeds per run")
    p.add_argument("--seed", type=int_from(0), default=0, help="the random key they come from")
    args = p.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before the work, not after it)
        except ImportError:
            raise train.UsageError("--plot needs matplotlib: python -m pip install matplotlib")
    print("The momentum toy problem (the paper's Appendix B): f(x, y) = x² + 10·y² from (-1, 1),")
    print("and a batch of size b gives the gradient g + σ·|g|·ε with σ = 1/√b and |g| per")
    print("coordinate (as in the paper's notebook utils/toy.ipynb). Each run is optim.sgd(b1=β):")
    print(f"m = β·m + (1 − β)·g, w ← w − lr·m, for {args.seeds:,} noise seeds drawn from key "
          f"{args.seed},\nthe same seeds in every run.\n")
    paths = toy_panels(args.seeds, args.seed)
    print_panels(paths)
    print(f"\nThe sweep: b × steps = {SWEEP_SAMPLES} gradient samples per run. Each cell is the "
          f"median final loss at\nthe best of {len(SWEEP_LRS)} lr's from {SWEEP_LRS[0]:.2g} to "
          f"{SWEEP_LRS[-1]:g}, a factor √2 apart (that lr in brackets). Loss ratio: SGD's\n"
          "over the best momentum's. Speed-up: ln(momentum's) / ln(SGD's), the ratio of their\n"
          "convergence rates.\n")
    rows = toy_sweep(args.seeds, args.seed)
    print_sweep(rows)
    if args.plot:
        try:
            plot_toy(paths, rows, args.plot)
        except (OSError, ValueError) as e:                 # a missing folder, an unknown type
            raise train.UsageError(f"--plot {args.plot} cannot be written "
                                   f"({getattr(e, 'strerror', None) or e}).") from None
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    sys.exit(train.run_program(main, interrupted="interrupted"))
