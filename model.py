"""The paper's GPT (its models section) as pure functions over a plain dict of 2-D arrays.

    import jax, model
    cfg = model.PRESETS["tiny"]
    params = model.init_params(jax.random.key(0), cfg)
    loss = model.loss_fn(params, x, y, cfg)              # x, y: [B, T] token ids

Decoder-only and pre-norm: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)), final RMSNorm.
RMSNorm has no scale, there are no biases and the embeddings are untied, so every parameter
is a 2-D matrix: optim.py treats all leaves alike (Adafactor factors those with both sides >= 128).

Notation, used in names and in the shape comments at line ends:
    B  batch size (sequences)        T  sequence length (tokens)
    V  vocabulary size               D  model width
    L  number of blocks              H  attention heads
    K  head dimension (D / H)        F  MLP width (4 D)
"""
import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Config:
    V: int = 50_257  # GPT-2 BPE vocabulary
    D: int = 64
    L: int = 2
    H: int = 1
    T: int = 128

    @property
    def K(self):
        return self.D // self.H

    @property
    def F(self):
        return 4 * self.D


# A preset is only a shape; nothing is allocated until init_params is called with it.
PRESETS = {
    # default: one pass over the shipped corpus in under 5 minutes on a 2-core CPU (README)
    "tiny": Config(D=64, L=4, H=1, T=128),
    # the paper's models: 30M = 10.6M non-embedding + 2 x 19.3M embedding parameters
    "30m": Config(D=384, L=6, H=3, T=512),
    "gpt2": Config(D=768, L=12, H=6, T=1024),
    "gpt3xl": Config(D=2048, L=24, H=16, T=2048),
}

# The matrices of one block, as (name, rows, cols) in units of the config.
BLOCK = {"wq": ("D", "D"), "wk": ("D", "D"), "wv": ("D", "D"), "wo": ("D", "D"),
         "w_up": ("D", "F"), "w_down": ("F", "D")}


def init_params(key, cfg):
    """Xavier-uniform kernels and N(0, 1/D) embeddings, input and output, as in the paper.

    Returns {name: float32 [rows, cols]}. Xavier is taken over each 2-D matrix; the official code
    applies it to per-head einsum kernels, whose fan-in and fan-out count differently.
    """
    def xavier(key, shape):
        bound = math.sqrt(6 / (shape[0] + shape[1]))
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    keys = iter(jax.random.split(key, 2 + len(BLOCK) * cfg.L))
    params = {"embed": jax.random.normal(next(keys), (cfg.V, cfg.D)) / math.sqrt(cfg.D)}
    for l in range(cfg.L):
        for name, (rows, cols) in BLOCK.items():
            shape = (getattr(cfg, rows), getattr(cfg, cols))
            params[f"blocks.{l}.{name}"] = xavier(next(keys), shape)
    params["unembed"] = jax.random.normal(next(keys), (cfg.D, cfg.V)) / math.sqrt(cfg.D)
    return params


def rms_norm(x):
    """Scale-free RMSNorm: every vector is divided by its root mean square (no learned gain)."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


def rope(x):
    """Rotary position embedding (max wavelength 10,000): rotate channel pairs by t * freq."""
    T, K = x.shape[1], x.shape[3]                                # x: [B, T, H, K]
    freq = 10_000.0 ** (-jnp.arange(K // 2) / (K // 2))          # [K/2]
    angle = jnp.arange(T)[:, None, None] * freq                  # [T, 1, K/2]
    sin, cos = jnp.sin(angle).astype(x.dtype), jnp.cos(angle).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)                            # [B, T, H, K/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(x, w, cfg):
    """Causal self-attention with QK-norm before RoPE, as in the paper."""
    B, T, _ = x.shape                                            # x: [B, T, D]
    q, k, v = ((x @ w[n]).reshape(B, T, cfg.H, cfg.K) for n in ("wq", "wk", "wv"))
    q, k = rope(rms_norm(q)), rope(rms_norm(k))                  # [B, T, H, K]
    s = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(cfg.K)   # [B, H, T, T]
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)  # token t sees only s <= t
    a = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(x.dtype)
    return jnp.einsum("bhts,bshk->bthk", a, v).reshape(B, T, cfg.D) @ w["wo"]


def mlp(x, w):
    return jax.nn.gelu(x @ w["w_up"]) @ w["w_down"]             # [B, T, F] -> [B, T, D]


def forward(params, x, cfg):
    """Token ids [B, T] -> next-token logits [B, T, V], in float32 whatever the weights' dtype."""
    h = params["embed"][x]                                       # [B, T, D]
    for l in range(cfg.L):
        w = {name: params[f"blocks.{l}.{name}"] for name in BLOCK}
        h = h + attention(rms_norm(h), w, cfg)
        h = h + mlp(rms_norm(h), w)
    return jnp.matmul(rms_norm(h), params["unembed"], preferred_element_type=jnp.float32)


def loss_fn(params, x, y, cfg):
    """Mean cross-entropy (nats per token) of predicting targets y [B, T] from inputs x [B, T]."""
    logits = forward(params, x, cfg)                             # [B, T, V]
    target = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]   # [B, T]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)


def generate(params, cfg, prompt, n_new, key, temperature=1.0):
    """Sample n_new token ids after the ids in prompt; returns only the new ids.

    Each token reruns the model on the last T tokens (no KV cache: short and obviously right).
    The window has a fixed shape, right-padded, so the sampler compiles once; causality makes
    the padding invisible to the position that is read.
    """
    ids = list(prompt)
    for i in range(n_new):
        context = ids[-cfg.T:]
        window = jnp.array(context + [0] * (cfg.T - len(context)), jnp.int32)
        ids.append(int(_sample(params, window, len(context), jax.random.fold_in(key, i),
                               temperature, cfg)))
    return ids[len(prompt):]


@jax.jit(static_argnames="cfg")
def _sample(params, window, n, key, temperature, cfg):
    logits = forward(params, window[None], cfg)[0, n - 1]       # [V], at the last real token
    return jax.random.categorical(key, logits / temperature)
