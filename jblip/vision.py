"""EVA ViT-g/14 vision encoder (BLIP-2 / InstructBLIP image tower).

Pre-LN transformer over [class token, patches] with a learned absolute
position table stored at the checkpoint's image size. Other input sizes
(including non-square ones) resize the patch-grid part of the table with
PyTorch's bicubic interpolation, as HF does with `interpolate_pos_encoding=True`.
Input images are NHWC (JAX layout).

The blocks are one scanned stack (`jblip.scan.stack`): params `layers/<block path>`
with a leading [num_layers] axis, so compile time does not grow with depth.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jblip.config import VisionConfig
from jblip.layers import Dtype, LayerNorm, Linear, activation, attention, init_normal, logical_param
from jblip.quantization import Quantization
from jblip.scan import stack

# --------------------------------------------------------------------------- bicubic (torch semantics)

_CUBIC_A = -0.75  # torch's bicubic kernel constant (PIL uses -0.5)


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    """Weights of the 4 taps at offsets -1, 0, +1, +2 for fractional position t."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):   # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix M with `M @ x` = torch bicubic resize of x along one axis.

    Matches `F.interpolate(mode="bicubic", align_corners=False)` given an output
    size: source coordinate (i + 0.5) * in/out - 0.5 (not clamped at 0), taps at
    floor(src) - 1 .. + 2 with indices clamped to the border.
    """
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        base = min(math.floor(src), in_size - 1)
        t = min(max(src - base, 0.0), 1.0)
        for offset, w in zip(range(-1, 3), _cubic_weights(t)):
            m[i, min(max(base + offset, 0), in_size - 1)] += w
    return m


def resize_position_grid(grid, out_hw: tuple[int, int]):
    """Bicubic resize of a [h, w, D] position grid to [out_h, out_w, D] (separable, float32)."""
    h, w, _ = grid.shape
    if (h, w) == tuple(out_hw):
        return grid
    mh = jnp.asarray(torch_bicubic_matrix(h, out_hw[0]), jnp.float32)
    mw = jnp.asarray(torch_bicubic_matrix(w, out_hw[1]), jnp.float32)
    return jnp.einsum("ih,jw,hwD->ijD", mh, mw, grid.astype(jnp.float32))


# --------------------------------------------------------------------------- modules


class VisionAttention(nn.Module):
    """Bidirectional self-attention with a fused qkv projection.

    The fused bias keeps the (always zero in checkpoints) key part so that the
    parameter layout and counts equal HF's `qkv.bias`.
    """
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        qkv = Linear((d,), (3, n, h), ("vis_embed", "vis_qkv", "vis_heads", "vis_kv"),
                     dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant, name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = attention(q, k, v, scale=h ** -0.5, dtype=self.dtype)
        return Linear((n, h), (d,), ("vis_heads", "vis_kv", "vis_embed"),
                      dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant, name="projection")(out)


class VisionMLP(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = Linear((cfg.hidden_size,), (cfg.intermediate_size,), ("vis_embed", "vis_mlp"),
                   dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant, name="fc1")(x)
        x = activation(cfg.hidden_act)(x)
        return Linear((cfg.intermediate_size,), (cfg.hidden_size,), ("vis_mlp", "vis_embed"),
                      dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant, name="fc2")(x)


class VisionBlock(nn.Module):
    """One pre-LN block; `(x, None)` out, the (carry, per-layer output) pair a scan step returns."""
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(eps=cfg.layer_norm_eps, axis_name="vis_norm", **kw)
        x = x + VisionAttention(cfg, **kw, quant=self.quant, name="self_attn")(LayerNorm(**norm, name="layer_norm1")(x))
        x = x + VisionMLP(cfg, **kw, quant=self.quant, name="mlp")(LayerNorm(**norm, name="layer_norm2")(x))
        # block boundary: batch-split, width replicated (a no-op without jblip.sharding.activation_rules)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), None


class VisionTransformer(nn.Module):
    """pixel_values [B, H, W, C] (NHWC) -> post-layernorm hidden states [B, 1 + P, D].

    P = (H // patch) * (W // patch); trailing pixels that do not fill a whole
    patch are ignored, as by the strided convolution of the PyTorch model.
    `remat` names the recompute policy of the blocks (see `jblip.scan`).
    """
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: Quantization | None = None  # weight-only kernels (jblip.quantization)
    remat: str = "none"

    @nn.compact
    def __call__(self, pixel_values, return_pre_norm: bool = False):
        """With `return_pre_norm=True` returns (post_layernorm, last_block_output)."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = self._embed(pixel_values)
        blocks = stack(VisionBlock, cfg.num_layers, remat=self.remat)
        x, _ = blocks(cfg, **kw, quant=self.quant, name="layers")(x)
        out = LayerNorm(eps=cfg.post_layernorm_eps, axis_name="vis_norm", **kw, name="post_layernorm")(x)
        return (out, x) if return_pre_norm else out

    def _embed(self, pixel_values):
        cfg = self.config
        p, d, c = cfg.patch_size, cfg.hidden_size, cfg.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != c:
            raise ValueError(f"pixel_values must be NHWC [batch, height, width, {c}]; got shape "
                             f"{tuple(pixel_values.shape)} (channels-first NCHW input must be transposed)")
        b, height, width, _ = pixel_values.shape
        gh, gw = height // p, width // p
        if gh == 0 or gw == 0:
            raise ValueError(f"image {height}x{width} is smaller than one {p}x{p} patch")

        # Non-overlapping patches as a dense layer over (p, p, C): the kernel has
        # the Flax conv layout, so a torch Conv2d weight converts with CONV.
        x = pixel_values[:, :gh * p, :gw * p, :].reshape(b, gh, p, gw, p, c)
        x = x.transpose(0, 1, 3, 2, 4, 5)                       # [B, gh, gw, p, p, C]
        patches = Linear((p, p, c), (d,), ("vis_patch_h", "vis_patch_w", "vis_channel", "vis_embed"),
                         dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(x)
        patches = patches.reshape(b, gh * gw, d)                 # row-major (h, then w) like torch

        cls = logical_param(self, "class_embedding", init_normal(), (d,), ("vis_embed",), self.param_dtype)
        pos = logical_param(self, "position_embedding", init_normal(), (cfg.num_positions, d),
                            ("vis_pos", "vis_embed"), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self._positions(pos, gh, gw).astype(self.dtype)[None]

    def _positions(self, pos, gh: int, gw: int):
        """Position table for a gh x gw patch grid: class position + (resized) grid."""
        cfg = self.config
        side = cfg.image_size // cfg.patch_size
        if (gh, gw) == (side, side):
            return pos
        grid = resize_position_grid(pos[1:].reshape(side, side, -1), (gh, gw))
        return jnp.concatenate([pos[:1].astype(jnp.float32), grid.reshape(gh * gw, -1)], axis=0)
