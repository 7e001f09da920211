"""Hand-written optimizers, the half-life rule for β and the learning-rate schedule of the paper.

    opt = optim.adam(b1=0.9, b2=optim.beta_from_halflife(10e6, tokens_per_step=1024))
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, lr)   # updates already hold the -lr
    params = optim.apply_updates(params, updates)   # or, for bf16 weights (Fig. 9):
    params = optim.apply_updates(params, updates, jax.random.fold_in(key, step), "stochastic")

Each optimizer is an (init, update) pair of pure functions over the dict of parameters, and
each update rule is written one line per equation, in the paper's symbols. The arithmetic and
the state are float32 whatever the parameters' dtype. To add one, write its function here and
give it a line in the OPTIMIZERS table at the end of this file: train.py's --opt, defaults, β's
and flag checks all follow from that table.
"""
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

f32 = jnp.float32


class Optimizer(NamedTuple):
    init: Callable    # params -> state
    update: Callable  # (grads, state, params, lr) -> (updates, state)


def _zeros(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, f32), params)


def _to_f32(tree):
    return jax.tree.map(lambda x: x.astype(f32), tree)


def sgd(b1=0.0):
    """SGD: θ ← θ − lr·g. Momentum b1 = 0 (the paper's batch-1 recipe) keeps no state at all.

    With momentum b1 = β it is the EMA form of the paper's toy problem (Appendix B):
    m ← β·m + (1 − β)·g, θ ← θ − lr·m. Heavy-ball momentum (m ← β·m + g, as in PyTorch) is the
    same optimizer with its lr scaled by 1/(1 − β); the EMA form keeps lr comparable across β.
    """
    def init(params):
        return {} if b1 == 0 else {"m": _zeros(params)}

    def update(grads, state, params, lr):
        g = _to_f32(grads)
        if b1 == 0:
            return jax.tree.map(lambda g: -lr * g, g), state
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], g)
        return jax.tree.map(lambda m: -lr * m, m), {"m": m}

    return Optimizer(init, update)


def adam(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0):
    """Adam with bias correction and decoupled weight decay (AdamW: −lr·wd·θ)."""
    def init(params):
        return {"m": _zeros(params), "v": _zeros(params), "t": jnp.zeros([], jnp.int32)}

    def update(grads, state, params, lr):
        g = _to_f32(grads)
        t = state["t"] + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], g)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], g)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t                      # bias correction of m and v
        updates = jax.tree.map(
            lambda m, v, p: -lr * ((m / c1) / (jnp.sqrt(v / c2) + eps) + weight_decay * p),
            m, v, _to_f32(params))
        return updates, {"m": m, "v": v, "t": t}

    return Optimizer(init, update)


QKV = ("wq", "wk", "wv")   # [D, H·K]: head h owns columns h·K to (h + 1)·K; wo [H·K, D] owns rows


def _heads(name, x, heads):
    """[rows, cols] -> [slices, r, c]: q, k, v [H, D, K], wo [H, K, D], as the official kernels."""
    if name.split(".")[-1] in QKV:
        return x.reshape(x.shape[0], heads, -1).swapaxes(0, 1)                # [H, D, K]
    return x.reshape(heads, -1, x.shape[1]) if name.split(".")[-1] == "wo" else x[None]


def _unheads(name, x, shape):                        # _heads undone: [slices, r, c] -> shape
    return (x.swapaxes(0, 1) if name.split(".")[-1] in QKV else x).reshape(shape)


def _kernel_rms(tree):
    """{name: RMS} per official kernel: q, k and v of a block are one [3, H, D, K] kernel there,
    so they share one RMS (the mean of their three mean squares: they have equal sizes)."""
    kernel = lambda name: name[:-2] + "qkv" if name.split(".")[-1] in QKV else name
    squares = {}
    for name, x in tree.items():
        squares.setdefault(kernel(name), []).append(jnp.mean(jnp.square(x)))
    return {name: jnp.sqrt(sum(squares[kernel(name)]) / len(squares[kernel(name)]))
            for name in tree}


def adafactor(b2=0.999, clip=1.0, eps=1e-30, min_dim_to_factor=128, decay_power=None, heads=1):
    """Adafactor as the paper uses it (Shazeer & Stern 2018): no first moment, a factored
    second moment, update RMS clipped to `clip`, step scaled by max(RMS(θ), 1e-3).

    Matrices are cut as the official code's kernels are: q, k, v and the output per head (_heads),
    the others whole. A slice whose two sides are both >= min_dim_to_factor keeps only the row and
    column means of g² (rows + cols numbers) for their outer product over their mean; others keep
    all g². The clipping RMS and RMS(θ) are per official kernel: q, k and v of a block together.

    β2 is a constant (set it from a half-life in tokens, like Adam's) with Adafactor's bias
    correction β̂2_t = β2·(1 − β2^(t−1)) / (1 − β2^t), which equals Adam's correction of v.
    The official code instead feeds its "β2" to the schedule β̂2_t = 1 − t^(−β2), which for
    β2 ≈ 0.9999 is close to a running mean of all past g²: pass decay_power=β2 to get that.
    """
    def init(params):
        def leaf(name, p):
            shape = _heads(name, p, heads).shape                              # [S, r, c]
            if p.ndim == 2 and min(shape[1:]) >= min_dim_to_factor:
                return {"v_row": jnp.zeros(shape[:2], f32), "v_col": jnp.zeros(shape[::2], f32)}
            return {"v": jnp.zeros(p.shape, f32)}
        return {"v": {name: leaf(name, p) for name, p in params.items()}, "t": jnp.int32(0)}

    def update(grads, state, params, lr):
        t = state["t"] + 1
        if decay_power is None:
            b2_t = b2 * (1 - b2 ** (t - 1)) / (1 - b2 ** t)
        else:
            b2_t = 1 - t.astype(f32) ** -decay_power

        def precondition(name, g, v):                                 # (g / sqrt(v̂), new v)
            g2 = g * g + eps
            if "v" in v:
                v = b2_t * v["v"] + (1 - b2_t) * g2
                return g / jnp.sqrt(v), {"v": v}
            gs, g2 = _heads(name, g, heads), _heads(name, g2, heads)    # [S, r, c]
            v_row = b2_t * v["v_row"] + (1 - b2_t) * g2.mean(axis=2)   # [S, r]
            v_col = b2_t * v["v_col"] + (1 - b2_t) * g2.mean(axis=1)   # [S, c]
            # g² ≈ outer(v_row, v_col) / mean(v_row), applied as a row factor times a column
            # factor and never multiplied out: a row with no gradient has v_row ≈ eps, and the
            # product would underflow to 0 and make u = 0/0 (as optax and the official code)
            row = jax.lax.rsqrt(v_row / v_row.mean(axis=1, keepdims=True))
            u = gs * row[:, :, None] * jax.lax.rsqrt(v_col)[:, None, :]
            return _unheads(name, u, g.shape), {"v_row": v_row, "v_col": v_col}

        g, p = _to_f32(grads), _to_f32(params)
        out = {name: precondition(name, g[name], state["v"][name]) for name in g}
        u = {name: u for name, (u, _) in out.items()}
        u_rms, p_rms = _kernel_rms(u), _kernel_rms(p)
        clipped = {name: u[name] / jnp.maximum(1.0, u_rms[name] / clip) for name in u}
        updates = {name: -lr * jnp.maximum(p_rms[name], 1e-3) * clipped[name]   # relative step
                   for name in u}
        return updates, {"v": {name: v for name, (_, v) in out.items()}, "t": t}

    return Optimizer(init, update)


def newton_schulz(g, steps=5, eps=1e-8):
    """The orthogonal polar factor U·Vᵀ of each matrix g = U·S·Vᵀ in [..., rows, cols], roughly.

    From X = g / ‖g‖_F, each step X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ maps every singular value
    s to a·s + b·s³ + c·s⁵; Muon's (a, b, c) push small ones up fast and leave all in about
    [0.7, 1.2] after five steps, not at 1. A tall matrix is transposed first: A is the smaller side.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.shape[-2] > g.shape[-1]
    x = jnp.swapaxes(g, -1, -2) if tall else g
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
    for _ in range(steps):
        A = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * A + c * A @ A) @ x
    return jnp.swapaxes(x, -1, -2) if tall else x


def muon(b1=0.95, b2=0.999, eps=1e-8, adam_scale=1.0, heads=1, adam_leaves=("embed", "unembed")):
    """Muon (Jordan et al., 2024) as the paper's official code runs it, on every matrix but the
    embeddings: m ← b1·m + (1 − b1)·g, m̂ = m / (1 − b1^t), θ ← θ − lr·s·NS(m̂), where NS is
    newton_schulz of each slice and s = sqrt(max(1, cols / rows)) (fan-out over fan-in of x @ w);
    no Nesterov, no weight decay. The embeddings (adam_leaves) take Adam with the same b1 and b2
    at lr·adam_scale: the official code tunes the two peak rates apart, on one schedule.
    """
    inner = adam(b1, b2, eps)
    split = lambda tree: ({n: x for n, x in tree.items() if n in adam_leaves},      # embeddings
                          {n: x for n, x in tree.items() if n not in adam_leaves})  # matrices

    def init(params):
        embeddings, matrices = split(params)
        return {"adam": inner.init(embeddings), "m": _zeros(matrices), "t": jnp.int32(0)}

    def update(grads, state, params, lr):
        (g_emb, g), p_emb = split(_to_f32(grads)), split(params)[0]
        t = state["t"] + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], g)

        def step(name, m):
            x = _heads(name, m / (1 - b1 ** t), heads)                      # [slices, r, c]
            u = newton_schulz(x) * math.sqrt(max(1, x.shape[2] / x.shape[1]))
            return -lr * _unheads(name, u, m.shape)

        u_emb, adam_state = inner.update(g_emb, state["adam"], p_emb, lr * adam_scale)
        updates = {**u_emb, **{name: step(name, m) for name, m in m.items()}}
        return updates, {"adam": adam_state, "m": m, "t": t}

    return Optimizer(init, update)


def stochastic_round_bf16(key, x):
    """float32 -> bfloat16, rounded up or down at random so that the mean is x (the paper's Fig. 9).

    bf16 is float32 with the low 16 bits dropped. Adding a uniform random integer in [0, 2^16)
    to the bits carries into bit 16 with probability (low bits) / 2^16, which is how far x lies
    from the bf16 value below it (in magnitude): so E[round(x)] = x. Done on the bits, the
    compiler cannot fold it into a plain round-to-nearest as it can `x.astype(bf16)` arithmetic.
    """
    bits = jax.lax.bitcast_convert_type(x.astype(f32), jnp.uint32)
    # Uniform integers in [0, 2^16): the two halves of each random 32-bit word. Drawing half as
    # many words made rounding the tiny model's parameters 3x faster on a 2-core CPU.
    words = jax.random.bits(key, ((x.size + 1) // 2,), jnp.uint32)
    noise = jnp.concatenate([words >> 16, words & 0xFFFF])[:x.size].reshape(x.shape)
    bits = (bits + noise) & jnp.uint32(0xFFFF_0000)                       # carry, then truncate
    return jax.lax.bitcast_convert_type(bits, f32).astype(jnp.bfloat16)  # exact: low bits are 0


def apply_updates(params, updates, key=None, rounding="nearest"):
    """θ ← θ + Δθ, added in float32 and stored back in each parameter's own dtype.

    rounding="nearest" rounds to the nearest value of that dtype; "stochastic" rounds bf16
    parameters with stochastic_round_bf16 and fresh random bits per leaf from `key` (fold the
    step into it: a new key every step). float32 parameters keep the float32 sum either way.
    """
    if rounding not in ("nearest", "stochastic") or (rounding == "stochastic" and key is None):
        raise ValueError(f"rounding is 'nearest' or 'stochastic' with a key, not {rounding!r}")
    leaves, treedef = jax.tree.flatten(params)
    sums = [p.astype(f32) + u for p, u in zip(leaves, treedef.flatten_up_to(updates))]
    return jax.tree.unflatten(treedef, [
        stochastic_round_bf16(jax.random.fold_in(key, i), x)   # leaf i: its own random bits
        if rounding == "stochastic" and p.dtype == jnp.bfloat16 else x.astype(p.dtype)
        for i, (p, x) in enumerate(zip(leaves, sums))])


# -- β as a half-life in tokens: the paper's scaling rule (Fig. 3, 4) -------------------------
# One step consumes tokens_per_step = B·T tokens. An EMA with decay β forgets half of its memory
# in t_half tokens when β ** (t_half / tokens_per_step) = 1/2. Holding t_half fixed while B
# changes is the paper's scaling rule: β2 = 0.95 at B = 512 is β2 ≈ 0.9999 at B = 1.

def beta_from_halflife(t_tokens, tokens_per_step):
    return 0.5 ** (tokens_per_step / t_tokens)


def halflife_from_beta(beta, tokens_per_step):
    return 0.0 if beta == 0 else tokens_per_step * math.log(0.5) / math.log(beta)


def lr_at(step, n_steps, peak_lr, warmup_frac, schedule="cosine"):
    """Linear warmup from 0 over the first int(warmup_frac · n_steps) steps (whole steps, as the
    official code counts them), then cosine decay to 0 at every batch size (the paper's
    pretraining schedule), or, with schedule="constant", the peak to the end (its fine-tuning).
    n_steps is a number; step may be a traced array, so the train step computes it on device."""
    warmup = int(warmup_frac * n_steps)
    ramp = jnp.clip(step / warmup, 0.0, 1.0) if warmup > 0 else 1.0
    progress = jnp.clip((step - warmup) / (n_steps - warmup), 0.0, 1.0)
    decay = {"constant": 1.0, "cosine": 0.5 * (1 + jnp.cos(jnp.pi * progress))}[schedule]
    return peak_lr * ramp * decay


class StateError(Exception):
    """An optimizer whose update returns other arrays than its init makes."""


def check(opt, params):
    """The shapes of opt's state for params (arrays or shapes; nothing is allocated), after
    checking that its update returns the same arrays as its init: a new optimizer's mistake is
    one sentence here (a StateError), not a failure deep inside train.py's compiled scan."""
    def arrays(tree):                                  # {"m.embed": "float32[50257, 64]", ...}
        return {jax.tree_util.keystr(path, simple=True, separator="."): f"{x.dtype}{list(x.shape)}"
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    state = jax.eval_shape(opt.init, params)
    new = jax.eval_shape(opt.update, params, state, params, jax.ShapeDtypeStruct((), f32))[1]
    made, returned = arrays(state), arrays(new)
    differ = [f"state.{n} is {returned.get(n, 'missing')} after update, {made.get(n, 'missing')}"
              " from init" for n in sorted(made | returned) if made.get(n) != returned.get(n)]
    if differ or jax.tree.structure(state) != jax.tree.structure(new):
        raise StateError("its update returns a state its init does not make ("
                         + ("; ".join(differ[:3]) or "other containers") + ")")
    return state


# -- the optimizers of train.py's --opt ---------------------------------------------------------
#   lr     default peak learning rate, tuned at --batch 1 for tiny on the shipped corpus
#          (docs/defaults.md); the paper's presets start from train.PAPER_SETTINGS instead
#   b1     default first-moment decay (momentum); None: the optimizer keeps no first moment
#   t2     default second-moment half-life in tokens; None: it keeps no second moment. The paper
#          holds it fixed in tokens (10M in its sweeps), so β2 follows the batch (Fig. 3, 4)
#   decay  whether --weight-decay applies (the paper uses none at small batch)
OPTIMIZERS = {
    "sgd": dict(make=sgd, lr=0.7, b1=0.0, t2=None, decay=False),    # vanilla: no momentum
    "adam": dict(make=adam, lr=5e-3, b1=0.9, t2=10e6, decay=True),
    "adafactor": dict(make=adafactor, lr=5e-2, b1=None, t2=10e6, decay=False),
    "muon": dict(make=muon, lr=0.04, b1=0.95, t2=10e6, decay=False),  # Adam for the embeddings
}
