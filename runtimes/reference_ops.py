"""The arithmetic of one Llama block in float32 numpy: norms, RoPE, attention, MLP.

Kept apart from the backend's bookkeeping so that the numerics can be read (and compared
with llama.cpp's ggml graph) in one place. Every function maps rows independently except
:func:`attention`, whose keys are passed in explicitly: the caller decides which cached
and tree positions a query sees, which is how tree verification and batch invariance are
expressed.
"""

from __future__ import annotations

import numpy as np

from runtimes.weights import LayerWeights, LlamaConfig


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / rms(x) * weight`` per row (llama.cpp's ``rms_norm`` then ``mul``)."""
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    return (x * scale) * weight


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)``, written with tanh so large negative inputs cannot overflow exp."""
    return x * (np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.5) * x)))


def rope_angles(
    cfg: LlamaConfig, positions: np.ndarray, freq_factors: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[n, 1, rope_dim/2]`` for ``positions``: base, linear scaling, Llama-3 factors.

    Angles are computed in float64 and rounded once, so they do not depend on how many
    positions are evaluated together.
    """
    half = cfg.rope_dim // 2
    inv_freq = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.rope_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    theta = (positions.astype(np.float64) / cfg.rope_linear_scale)[:, None] * inv_freq
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    return cos[:, None, :], sin[:, None, :]


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs ``(2i, 2i+1)`` of the first ``rope_dim`` dims of ``x[n, heads, d]``."""
    rd = 2 * cos.shape[-1]
    even, odd = x[..., 0:rd:2], x[..., 1:rd:2]
    out = x.copy()
    out[..., 0:rd:2] = even * cos - odd * sin
    out[..., 1:rd:2] = even * sin + odd * cos
    return out


def attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, mask: np.ndarray | None
) -> np.ndarray:
    """Grouped-query attention of ``q[n, n_head, d]`` over ``keys/values[n_kv, L, d]``.

    Query head ``h`` reads kv head ``h // (n_head / n_kv)`` (llama.cpp's broadcast and HF's
    ``repeat_kv`` agree). ``mask[n, L]`` says which keys each query row may see; ``None``
    means all of them, which is the single-query path batch invariance relies on.
    """
    n, n_head, d = q.shape
    n_kv = keys.shape[0]
    group = n_head // n_kv
    qg = q.reshape(n, n_kv, group, d).transpose(1, 0, 2, 3).reshape(n_kv, n * group, d)
    scores = (qg @ keys.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(d))
    if mask is not None:
        scores = np.where(np.repeat(mask, group, axis=0)[None], scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = (probs @ values).reshape(n_kv, n, group, d).transpose(1, 0, 2, 3)
    return out.reshape(n, n_head * d)


def project_qkv(
    w: LayerWeights, cfg: LlamaConfig, x: np.ndarray, cos: np.ndarray, sin: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normed input → RoPE'd queries ``[n, n_head, d]``, keys and values ``[n, n_kv, d]``."""
    h = rms_norm(x, w.attn_norm, cfg.rms_eps)
    n = x.shape[0]
    q = (h @ w.wq.T).reshape(n, cfg.n_head, cfg.head_dim)
    k = (h @ w.wk.T).reshape(n, cfg.n_head_kv, cfg.head_dim)
    v = (h @ w.wv.T).reshape(n, cfg.n_head_kv, cfg.head_dim)
    return rope(q, cos, sin), rope(k, cos, sin), v


def finish_block(w: LayerWeights, cfg: LlamaConfig, x: np.ndarray, attn: np.ndarray) -> np.ndarray:
    """Attention output projection + residual, then the SwiGLU MLP + residual."""
    x = x + attn @ w.wo.T
    h = rms_norm(x, w.ffn_norm, cfg.rms_eps)
    return x + (silu(h @ w.w_gate.T) * (h @ w.w_up.T)) @ w.w_down.T
