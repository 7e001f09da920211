"""The paper's GPT (its models section) as pure functions over a plain dict of 2-D arrays.

    import jax, model
    cfg = model.PRESETS["tiny"]
    params = model.init_params(jax.random.key(0), cfg)
    loss = model.loss_fn(params, x, y, cfg)              # x, y: [B, T] token ids

Decoder-only and pre-norm: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)), final RMSNorm.
RMSNorm has no scale, there are no biases and the embeddings are untied, so every parameter is
a 2-D matrix (Adafactor factors those with both sides >= 128; Muon takes all but the embeddings).

Notation, used in names and in the shape comments at line ends:
    B  batch size (sequences)        T  sequence length (tokens)
    V  vocabulary size               D  model width
    L  number of blocks              H  attention heads
    K  head dimension (D / H)        F  MLP width (4 D)
"""
import dataclasses
import functools
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
    dtype: str = "float32"  # what the matrix multiplies take (--compute-dtype); see dense
    remat: bool = False     # recompute each block in the backward pass (--remat); see forward
    attention: str = "einsum"   # or "fused": jax.nn.dot_product_attention (--attention)

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
    # the paper's models. Its "30M" counts the non-embedding parameters plus one embedding:
    # 10.6M + 19.3M = 29.9M (the untied output embedding adds another 19.3M)
    "30m": Config(D=384, L=6, H=3, T=512),
    "gpt2": Config(D=768, L=12, H=6, T=1024),
    "gpt3xl": Config(D=2048, L=24, H=16, T=2048),
}

# The matrices of one block, as (name, rows, cols) in units of the config.
BLOCK = {"wq": ("D", "D"), "wk": ("D", "D"), "wv": ("D", "D"), "wo": ("D", "D"),
         "w_up": ("D", "F"), "w_down": ("F", "D")}


# Where each matrix is split over a device mesh of axes "data" and "model" (train.py), per
# dimension: (mesh axis, the size that must divide evenly). On "model", tensor parallelism as in
# Megatron-LM: q, k, v and the MLP's first matrix by columns, the output and the MLP's second by
# rows, so each pair needs one all-reduce; attention by whole heads (H), and the vocabulary (V),
# padded to a multiple of the axis (padded_vocab). On "data", with --fsdp only: each device holds
# a slice of every matrix, which XLA gathers as a layer needs it. A dimension that the axis does
# not divide stays whole. XLA inserts the collectives; nothing else in the model changes.
SHARDING = {"embed": (("model", "V"), ("data", "D")), "unembed": (("data", "D"), ("model", "V")),
            "wq": (("data", "D"), ("model", "H")), "wk": (("data", "D"), ("model", "H")),
            "wv": (("data", "D"), ("model", "H")), "wo": (("model", "H"), ("data", "D")),
            "w_up": (("data", "D"), ("model", "F")), "w_down": (("model", "F"), ("data", "D"))}


def partition(name, cfg, devices):
    """The axes parameter `name` is split on, for jax.sharding.PartitionSpec, given the number of
    devices that split along each mesh axis: {"model": n, "data": n with --fsdp, else 1}."""
    rows_cols = SHARDING[name.rsplit(".", 1)[-1]]          # "blocks.0.wq" -> "wq"
    return tuple(axis if devices[axis] > 1 and (size == "V" or getattr(cfg, size) % devices[axis]
                                                 == 0) else None for axis, size in rows_cols)


def padded_vocab(cfg, devices):
    """V rounded up to a multiple of `devices` (GPT-2's 50,257 = 29 x 1,733 divides by none): the
    rows of embed and columns of unembed the model axis splits; the padding's logits are -inf."""
    return -(-cfg.V // devices) * devices


def fan_sum(name, cfg):
    """fan_in + fan_out of a block matrix as the official code's Xavier counts them. Its attention
    kernels are einsum kernels, q, k, v one [3, H, D, K] and the output [H, K, D], and JAX's
    xavier_uniform multiplies both fans by the leading axes (3·H, or H): so q, k and v get
    3H·(D + K), the output H·(K + D), where a D x D matrix would give D + D."""
    D, H, K, F = cfg.D, cfg.H, cfg.K, cfg.F
    return {"wq": 3 * H * (D + K), "wk": 3 * H * (D + K), "wv": 3 * H * (D + K),
            "wo": H * (K + D), "w_up": D + F, "w_down": F + D}[name]


def init_params(key, cfg):
    """Xavier-uniform kernels, with the official code's fans (fan_sum), and N(0, 1/D) embeddings,
    input and output, as in the paper. Returns {name: float32 [rows, cols]}."""
    keys = iter(jax.random.split(key, 2 + len(BLOCK) * cfg.L))
    params = {"embed": jax.random.normal(next(keys), (cfg.V, cfg.D)) / math.sqrt(cfg.D)}
    for l in range(cfg.L):
        for name, (rows, cols) in BLOCK.items():
            bound = math.sqrt(6 / fan_sum(name, cfg))
            params[f"blocks.{l}.{name}"] = jax.random.uniform(
                next(keys), (getattr(cfg, rows), getattr(cfg, cols)), jnp.float32, -bound, bound)
    params["unembed"] = jax.random.normal(next(keys), (cfg.D, cfg.V)) / math.sqrt(cfg.D)
    return params


def cast(params, dtype):
    """The parameters stored in another dtype (bfloat16 for --param-dtype bfloat16)."""
    return {name: p.astype(dtype) for name, p in params.items()}


def nbytes(tree):
    """Bytes held by a pytree of arrays (or of shapes from jax.eval_shape)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def active_params(cfg):
    """The paper's active parameters, N = L (4 D² + 2 D F) + D V = 12 L D² + D V: the block
    matrices and the output layer; the input embedding is a lookup (29,915,520 for 30m)."""
    return cfg.L * (4 * cfg.D ** 2 + 2 * cfg.D * cfg.F) + cfg.D * cfg.V


def flops_per_token(cfg):
    """The model FLOPs of training on one token (PaLM's count, Appendix B): 6 N + 12 L T D, where
    N is active_params (a lookup costs no FLOPs), 6 = 2 forward + 4 backward per weight, and
    12 L T D is the attention's scores and weighted sum (2 T D each forward, at every position,
    times 3)."""
    return 6 * active_params(cfg) + 12 * cfg.L * cfg.T * cfg.D


def rms_norm(x):
    """Scale-free RMSNorm: every vector is divided by its root mean square (no learned gain)."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


def rope(x):
    """Rotary position embedding (max wavelength 10,000): rotate channel pairs by t * freq."""
    T, K = x.shape[1], x.shape[3]                                # x: [B, T, H, K]
    freq = 10_000.0 ** (-jnp.arange(K // 2) / (K // 2))          # [K/2]
    angle = jnp.arange(T)[:, None, None] * freq                  # [T, 1, K/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x, 2, axis=-1)                            # [B, T, H, K/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def dense(x, w, cfg):
    """x @ w, both cast to cfg.dtype, the result float32. With bfloat16 only the matmuls see bf16
    inputs (the tensor cores' path, as in picodo), whatever the weights' dtype; the activations,
    norms, RoPE, softmax (but --attention fused's) and loss stay float32, as in the official code.
    float32: plain x @ w."""
    dtype = jnp.dtype(cfg.dtype)
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def attention(x, w, cfg):
    """Causal self-attention with QK-norm before RoPE, as in the paper."""
    B, T, _ = x.shape                                            # x: [B, T, D]
    q, k, v = (dense(x, w[n], cfg).reshape(B, T, cfg.H, cfg.K) for n in ("wq", "wk", "wv"))
    q, k = rope(rms_norm(q)), rope(rms_norm(k))                  # [B, T, H, K]
    if cfg.attention == "fused":   # in one call, in cfg.dtype (so with bfloat16 the softmax
        # too): JAX may pick cuDNN's fused kernel on NVIDIA GPUs, never storing the [T, T] scores
        dtype = jnp.dtype(cfg.dtype)
        o = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                         is_causal=True).astype(jnp.float32)
    else:
        s = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(cfg.K)   # [B, H, T, T]
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)  # t sees only s <= t
        o = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, axis=-1), v)   # [B, T, H, K]
    return dense(o.reshape(B, T, cfg.D), w["wo"], cfg)


def mlp(x, w, cfg):
    return dense(jax.nn.gelu(dense(x, w["w_up"], cfg)), w["w_down"], cfg)   # via [B, T, F]


def block(h, w, cfg):
    """One pre-norm block on the residual stream h [B, T, D], with its matrices w by name."""
    h = h + attention(rms_norm(h), w, cfg)
    return h + mlp(rms_norm(h), w, cfg)


def forward(params, x, cfg, at=None):
    """Token ids [B, T] -> float32 logits [B, T, V], or [B, V] at position `at` only (dense).
    With cfg.remat, the backward pass recomputes each block's activations from its input
    (jax.checkpoint): it keeps L inputs [B, T, D] instead of every block's intermediates."""
    h = params["embed"][x].astype(jnp.float32)                   # [B, T, D]
    run_block = jax.checkpoint(block, static_argnums=2) if cfg.remat else block
    for l in range(cfg.L):
        h = run_block(h, {name: params[f"blocks.{l}.{name}"] for name in BLOCK}, cfg)
    logits = dense(rms_norm(h if at is None else h[:, at]), params["unembed"], cfg)
    if logits.shape[-1] > cfg.V:      # a vocabulary padded to split over devices: no padding's
        logits = jnp.where(jnp.arange(logits.shape[-1]) < cfg.V, logits, -jnp.inf)  # probability
    return logits


def loss_fn(params, x, y, cfg):
    """Mean cross-entropy (nats per token) of predicting targets y [B, T] from inputs x [B, T]."""
    logits = forward(params, x, cfg)                             # [B, T, V]
    target = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]   # [B, T]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)


def generate(params, cfg, prompt, n_new, key, temperature=1.0):
    """Sample n_new token ids after the ids in prompt; returns only the new ids.

    One jitted loop: each new token reruns the model on the last T tokens (no KV cache: short
    and obviously right) and reads the logits of the last real one only. The window has a fixed
    shape, right-padded with zeros, so it compiles once; causality hides the padding.
    """
    ids = _generate(params, jnp.asarray(prompt, jnp.int32), key, temperature, cfg, n_new)
    return [int(i) for i in ids]


@functools.partial(jax.jit, static_argnames=("cfg", "n_new"))
def _generate(params, prompt, key, temperature, cfg, n_new):
    P = len(prompt)
    ids = jnp.concatenate([prompt, jnp.zeros(n_new + cfg.T, jnp.int32)])   # room for the window
    def next_token(i, ids):
        start = jnp.maximum(P + i - cfg.T, 0)             # the window: the last T tokens so far
        window = jax.lax.dynamic_slice(ids, (start,), (cfg.T,))
        logits = forward(params, window[None], cfg, at=P + i - 1 - start)[0]   # [V]
        token = jax.random.categorical(jax.random.fold_in(key, i), logits / temperature)
        return ids.at[P + i].set(token)
    return jax.lax.fori_loop(0, n_new, next_token, ids)[P:P + n_new]
