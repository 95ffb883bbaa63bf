"""Reference StyleGAN2 ops in plain PyTorch: readable, differentiable, and the spec.

Semantics follow NVIDIA stylegan2-ada-pytorch (`torch_utils/ops/*`, pure-PyTorch paths):
`bias_act`, `upfirdn2d`, `conv2d_resample`, `modulated_conv2d`, plus `modulated_conv2d_bias_act`
(a synthesis layer's conv and its epilogue, composed here from the two). The other backends
(`ops/eager.py`, `ops/triton_kernels.py`) define the same functions with the same signatures and
are tested against these.

Conventions: tensors are NCHW; padding is `[x0, x1, y0, y1]` (an int means the same on all
sides); FIR filters come from `setup_filter` (2-D, or 1-D for a separable filter).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# act name -> (function, default alpha, default gain): the one table both backends read.
ACTIVATIONS = {
    "linear": (lambda x, alpha: x, 0.0, 1.0),
    "lrelu": (lambda x, alpha: F.leaky_relu(x, alpha), 0.2, math.sqrt(2)),
}


def activation_defaults(act: str) -> tuple[float, float]:
    """(default alpha, default gain) of an activation; ValueError for an unknown name."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{act}' (expected one of {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[act][1], ACTIVATIONS[act][2]


def bias_act(x, b=None, dim=1, act="linear", alpha=0.2, gain=None, clamp=None):
    """`clamp(act(x + b) * gain, -clamp, clamp)`; `b` is broadcast along `dim`.

    gain defaults to 1 for linear and sqrt(2) for lrelu; alpha is the lrelu slope (None: 0.2).
    """
    def_alpha, def_gain = activation_defaults(act)
    alpha = def_alpha if alpha is None else float(alpha)
    gain = def_gain if gain is None else float(gain)
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = ACTIVATIONS[act][0](x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def setup_filter(f=(1, 3, 3, 1), device=None, normalize=True, flip_filter=False, gain=1, separable=None):
    """Build an FIR filter tensor: a 1-D tap list becomes its outer product (2-D) unless separable.

    With `normalize` the filter sums to 1 (`[1,3,3,1]` -> `outer/64`); `gain` scales its DC gain.
    """
    f = torch.as_tensor(1 if f is None else f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if f.ndim not in (1, 2) or f.numel() == 0:
        raise ValueError(f"an FIR filter must have 1 or 2 dimensions and some taps, got shape {tuple(f.shape)}")
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8  # NVIDIA's rule: long 1-D filters stay separable
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device) if device is not None else f


def parse_padding(padding) -> tuple[int, int, int, int]:
    """int, [x, y] or [x0, x1, y0, y1] -> (x0, x1, y0, y1)."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    if len(padding) == 4:
        return tuple(padding)
    raise ValueError(f"padding must be an int or have 2 or 4 entries, got {padding}")


def filter_size(f) -> tuple[int, int]:
    """(width, height) of a filter; (1, 1) for None."""
    if f is None:
        return 1, 1
    return (f.shape[-1], f.shape[0]) if f.ndim == 2 else (f.shape[0], f.shape[0])


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """Upsample (zero insertion), pad, convolve with FIR `f`, downsample (keep every `down`-th pixel).

    Negative padding crops. `gain` multiplies the filter's DC response (use up**2 when upsampling).
    """
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    batch, channels, height, width = x.shape
    x0, x1, y0, y1 = parse_padding(padding)
    if up > 1:  # insert up-1 zeros after every pixel along both axes
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]
    f = (f * (gain ** (f.ndim / 2))).to(x.dtype)
    if not flip_filter:  # F.conv2d correlates; a true convolution flips the filter
        f = f.flip(list(range(f.ndim)))
    f = f[None, None].repeat([channels, 1] + [1] * f.ndim)  # one depthwise filter per channel
    if f.ndim == 4:
        x = F.conv2d(x, f, groups=channels)
    else:  # separable: rows, then columns
        x = F.conv2d(x, f.unsqueeze(2), groups=channels)
        x = F.conv2d(x, f.unsqueeze(3), groups=channels)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def _conv(x, w, stride=1, padding=0, groups=1, transpose=False, flip_weight=True):
    """conv2d / conv_transpose2d; flip_weight=False makes it a true (flipped) convolution."""
    if not flip_weight:
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def resample_padding(padding, f, up: int = 1, down: int = 1) -> tuple[int, int, int, int]:
    """The conv's own padding widened to leave room for the FIR after zero insertion / before decimation."""
    fw, fh = filter_size(f)
    px0, px1, py0, py1 = parse_padding(padding)
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    return px0, px1, py0, py1


def conv2d_resample(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True, flip_filter=False):
    """2-D convolution with optional FIR up/downsampling, NVIDIA's `conv2d_resample`.

    up: zero-insert, conv, FIR (done as one strided transposed conv + FIR); down: FIR, strided conv.
    `padding` is the conv's own padding before the resampling adjustments.
    """
    return conv2d_resample_with(upfirdn2d, x, w, f, up, down, padding, groups, flip_weight, flip_filter)


def transposed_conv_padding(padding, kw: int, kh: int, up: int) -> tuple[list[int], list[int]]:
    """(padding of the strided transposed conv, [x0, x1, y0, y1] padding of the FIR after it) for the
    upsampling path of conv2d_resample: the conv takes what both sides share, the FIR the rest."""
    px0, px1, py0, py1 = padding
    px0, px1, py0, py1 = px0 - (kw - 1), px1 - (kw - up), py0 - (kh - 1), py1 - (kh - up)
    pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
    return [pyt, pxt], [px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt]


def conv2d_resample_with(upfirdn2d, x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True,
                         flip_filter=False):
    """`conv2d_resample` with the FIR steps done by the given `upfirdn2d` (a backend's own); the
    convolutions are torch's. Written once here so every backend shares the branch structure."""
    out_channels, in_per_group, kh, kw = w.shape
    px0, px1, py0, py1 = resample_padding(padding, f, up, down)

    if kw == 1 and kh == 1 and down > 1 and up == 1:  # 1x1: downsample first (cheaper)
        x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:  # 1x1: convolve first, then upsample
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up ** 2, flip_filter=flip_filter)
    if down > 1 and up == 1:  # FIR, then strided conv
        x = upfirdn2d(x, f, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)
    if up > 1:  # strided transposed conv (= zero insertion + conv), then FIR
        if groups == 1:
            w = w.transpose(0, 1)
        else:  # transpose within each group: [G*O/G, I, k, k] -> [G*I, O/G, k, k]
            w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
            w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
        conv_padding, fir_padding = transposed_conv_padding([px0, px1, py0, py1], kw, kh, up)
        x = _conv(x, w, stride=up, padding=conv_padding, groups=groups, transpose=True, flip_weight=not flip_weight)
        x = upfirdn2d(x, f, padding=fir_padding, gain=up ** 2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:  # plain conv with symmetric padding
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)
    x = upfirdn2d(x, None, padding=[px0, px1, py0, py1])  # generic: asymmetric or negative padding
    return _conv(x, w, groups=groups, flip_weight=flip_weight)


def prenormalize_for_fp16(weight, styles):
    """NVIDIA's scaling before a demodulated float16 conv: keeps activations in float16's range.

    Both factors cancel in demodulation, so the result is the same function; only the rounding moves.
    """
    _, in_channels, kh, kw = weight.shape
    weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
    return weight, styles / styles.norm(float("inf"), dim=1, keepdim=True)


def modulation_inputs(x, weight, styles, demodulate: bool):
    """(weight, styles in the weight's dtype) as a demodulated conv of `x` uses them: float16 maps
    get NVIDIA's pre-normalisation first (the fast backends' shared preamble)."""
    if x.dtype == torch.float16 and demodulate:
        weight, styles = prenormalize_for_fp16(weight, styles)
    return weight, styles.to(weight.dtype)


def modulated_conv2d(x, weight, styles, noise=None, up=1, down=1, padding=0, resample_filter=None,
                     demodulate=True, flip_weight=True, fused_modconv=True):
    """StyleGAN2 modulated convolution: W'[n,o,i] = W[o,i]*s[n,i], demodulated per (n, o), plus noise.

    x [N,I,H,W], weight [O,I,k,k], styles [N,I]; noise broadcastable to the output, added after
    demodulation. fused_modconv=True runs one grouped conv (NVIDIA's eval path); False scales the
    activations before and after a shared conv (NVIDIA's training path).
    """
    batch = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:
        weight, styles = prenormalize_for_fp16(weight, styles)
    w = dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)  # [N,O,I,k,k]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [N,O]
    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight)
        if demodulate and noise is not None:
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch, -1, 1, 1))
        if demodulate:
            return x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
        return x.add_(noise.to(x.dtype)) if noise is not None else x
    if demodulate:
        w = w * dcoefs.reshape(batch, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])  # the batch becomes groups of one grouped conv
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                        groups=batch, flip_weight=flip_weight)
    x = x.reshape(batch, -1, *x.shape[2:])
    if noise is not None:  # in place: x is the conv's fresh output; the sum is rounded once (as NVIDIA's)
        x = x.add_(noise)
    return x


def modulated_conv2d_bias_act(x, weight, styles, bias=None, noise=None, up=1, down=1, padding=0,
                              resample_filter=None, demodulate=True, flip_weight=True, fused_modconv=True,
                              act="linear", alpha=None, gain=None, clamp=None):
    """A synthesis layer's conv and epilogue: `bias_act(modulated_conv2d(...), bias, ...)`.

    One op so that a backend can fuse everything after the convolution (demodulation, noise, bias,
    activation, gain, clamp) into one pass; here it is the two steps, which is the spec.
    """
    x = modulated_conv2d(x, weight, styles, noise=noise, up=up, down=down, padding=padding,
                         resample_filter=resample_filter, demodulate=demodulate, flip_weight=flip_weight,
                         fused_modconv=fused_modconv)
    return bias_act(x, bias, act=act, alpha=alpha, gain=gain, clamp=clamp)
