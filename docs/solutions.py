"""Solutions to the code exercises of docs/exercises.md; test_all.py imports them from here.

Read them after trying the exercise. Each is written as the change a student makes to the core:
exercise 1 adds a function and a line to optim.py, exercise 2 edits model.py (here it replaces
model.init_params and model.forward, so the shipped files stay as they are), exercise 5 swaps
the toy problem's optimizer.
"""
import jax
import jax.numpy as jnp

import model
import optim


def lion(b1=0.9, b2=0.99):
    """Exercise 1, Lion (Chen et al., 2023): θ ← θ − lr·sign(β1·m + (1 − β1)·g), then
    m ← β2·m + (1 − β2)·g. One sign per coordinate: every step moves each weight by exactly lr."""
    def init(params):
        return {"m": jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)}

    def update(grads, state, params, lr):
        g = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates = jax.tree.map(lambda m, g: -lr * jnp.sign(b1 * m + (1 - b1) * g), state["m"], g)
        m = jax.tree.map(lambda m, g: b2 * m + (1 - b2) * g, state["m"], g)
        return updates, {"m": m}

    return optim.Optimizer(init, update)


# Exercise 1's line in optim.OPTIMIZERS: one moment (b1), no second moment (t2=None), no decay.
LION = dict(make=lion, lr=2e-3, b1=0.9, t2=None, decay=False)

_init_params, _forward = model.init_params, model.forward     # the untied model's


def tied_init_params(key, cfg):
    """Exercise 2, model.init_params with the embeddings tied: no "unembed" in the dict."""
    return {name: p for name, p in _init_params(key, cfg).items() if name != "unembed"}


def tied_forward(params, x, cfg, at=None):
    """Exercise 2, model.forward with the embeddings tied: the output layer is embed.T."""
    return _forward({**params, "unembed": params["embed"].T}, x, cfg, at)


def heavy_ball(b1):
    """Exercise 5, PyTorch's momentum: m ← β·m + g, θ ← θ − lr·m (optim.sgd is the EMA form)."""
    def init(params):
        return {"m": jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)}

    def update(grads, state, params, lr):
        m = jax.tree.map(lambda m, g: b1 * m + g, state["m"], grads)
        return jax.tree.map(lambda m: -lr * m, m), {"m": m}

    return optim.Optimizer(init, update)
