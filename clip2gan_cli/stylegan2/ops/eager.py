"""Eager StyleGAN2 ops: the reference math (ops/reference.py) rearranged to run faster, same signatures.

This backend was called `fused`; that name is still accepted (deprecated, see ops/__init__.py).

Plain eager PyTorch, nothing compiled (no nvcc, no torch.compile, nothing at import time). Each
rearrangement below was measured side by side against the reference on the project's 2-core CPU
(bench/generator.py) and kept because it won there:

* channels_last feature maps wherever the map outweighs the weight: oneDNN convolutions then skip
  their NCHW <-> blocked reorders (~1.8x on a 3x3 conv at 1024 px). Maps stay channels_last from
  layer to layer; small low-resolution maps and 1x1 outputs (images) keep the ordinary layout.
* FIR filtering is one depthwise conv on the channels_last map, with the padding and the 2x
  decimation done by the conv itself (the reference pads into a copy and filters NCHW, ~4x slower).
* FIR upsampling (zero insertion + pad + filter) is one strided transposed conv with the channels
  folded into the batch, when the padding is what that op produces (NVIDIA's (2, 1) is).
* bias + lrelu + gain + clamp: lrelu(x + b) * g == lrelu(x*g + b*g) for g > 0, so one allocation
  (`torch.add(b*g, x, alpha=g)`) then in-place lrelu and clamp on that fresh tensor. The reference
  allocates four full-size tensors; on CPU each fresh 128 MB tensor costs ~75 ms of page faults.
* Modulation picks the cheaper side: scale the weight (one sample with large maps: one ordinary
  conv) or scale the activations around one shared conv (a batch, or small maps with big weights:
  no grouped conv, no per-sample weights). Demodulation coefficients are one small matmul,
  rsqrt((sum_k W^2) @ s^2 + 1e-8), instead of squaring the [N,O,I,k,k] modulated weight.
* Tensors derived from a weight alone (sum of squares, transposed/flipped copies) are cached while
  the weight is unchanged (same object, same version counter) and no autograd graph to it is needed.

Everything stays differentiable with ordinary autograd (in-place steps only touch tensors created
here, and not where autograd needs the overwritten values), so gradients w.r.t. ws/styles,
activations and weights agree with the reference (tests/test_fused_ops.py). Whatever has no fast
path is delegated to the reference implementation.
"""
from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F

from . import reference

_CHANNELS_LAST = torch.channels_last

_availability: tuple[bool, str] | None = None  # (works here, why not): decided once per process


# ----------------------------------------------------------------------------------------------
# Availability


def is_available() -> bool:
    """True when the eager ops run here and match the reference on a tiny self-check (cached)."""
    global _availability
    if _availability is None:
        try:
            _availability = _self_check()
        except Exception as error:  # any failure means: use the reference, and say why
            _availability = (False, f"the eager self-check raised {type(error).__name__}: {error}")
    return _availability[0]


def unavailable_reason() -> str:
    """Why `is_available()` is False ('' when it is True)."""
    is_available()
    return _availability[1]


def _self_check() -> tuple[bool, str]:
    """Run each fast path once on tiny CPU tensors and compare with the reference."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn([2, 4, 8, 8], generator=generator)
    weight = torch.randn([6, 4, 3, 3], generator=generator)
    styles = torch.randn([2, 4], generator=generator) + 1
    f = reference.setup_filter([1, 3, 3, 1])
    cases = {
        "modulated_conv2d up=2": lambda ops: ops.modulated_conv2d(x[:1], weight, styles[:1], up=2, padding=1,
                                                                  resample_filter=f, flip_weight=False),
        "modulated_conv2d batch": lambda ops: ops.modulated_conv2d(x, weight, styles, padding=1),
        "upfirdn2d up=2": lambda ops: ops.upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1], gain=4),
        "conv2d_resample down=2": lambda ops: ops.conv2d_resample(x, weight, f=f, down=2, padding=1),
        "bias_act lrelu": lambda ops: ops.bias_act(x, weight[0, :, 0, 0], act="lrelu", clamp=1.0),
    }
    for name, run in cases.items():
        got, want = run(sys.modules[__name__]), run(reference)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            return False, f"the eager {name} disagrees with the reference on this platform"
    return True, ""


# ----------------------------------------------------------------------------------------------
# Helpers


def _needs_grad(*tensors) -> bool:
    """Whether autograd records an op on these tensors (then in-place steps must be safe for it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fir_taps(f, gain: float = 1.0, flip_filter: bool = False):
    """The 2-D taps a correlation (F.conv2d, the Triton kernel) applies for NVIDIA's FIR `f`."""
    kernel = f if f.ndim == 2 else torch.outer(f, f)  # separable 1-D: the same taps on both axes
    kernel = kernel * float(gain)  # 2-D: f*gain; 1-D: f*gain**0.5 on each axis, the same product
    return kernel if flip_filter else kernel.flip([0, 1])  # a true convolution flips the filter


def _fir(x, f, pad: tuple[int, int, int, int], down: int = 1, gain: float = 1.0, flip_filter: bool = False):
    """Pad (x0, x1, y0, y1; negative crops), FIR-filter every channel with `f`, keep every `down`-th pixel.

    One depthwise convolution on a channels_last map: oneDNN's NHWC depthwise kernel is ~4x faster than
    the NCHW one the reference gets, the padding is the conv's own when symmetric (no padded copy), and
    decimation is the conv's stride (no full-resolution output).
    """
    kernel = fir_taps(f, gain, flip_filter)
    channels = x.shape[1]
    weight = kernel.to(x.dtype)[None, None].expand(channels, 1, *kernel.shape)
    x0, x1, y0, y1 = pad
    x = _in_format(x, True)
    if x0 == x1 and y0 == y1 and x0 >= 0 and y0 >= 0:
        return F.conv2d(x, weight, stride=down, padding=[y0, x0], groups=channels)
    x = F.pad(x, [x0, x1, y0, y1])
    return F.conv2d(x, weight, stride=down, groups=channels)


# ----------------------------------------------------------------------------------------------
# bias_act


def bias_act(x, b=None, dim=1, act="linear", alpha=0.2, gain=None, clamp=None):
    """`clamp(act(x + b) * gain, -clamp, clamp)` (reference.bias_act) in one allocation.

    For gain > 0: act(x + b) * gain == act(x * gain + b * gain) (lrelu is positively homogeneous),
    computed as one `torch.add(b*gain, x, alpha=gain)` then in-place lrelu / clamp on the result.
    """
    def_alpha, def_gain = reference.activation_defaults(act)
    alpha = def_alpha if alpha is None else float(alpha)
    gain = def_gain if gain is None else float(gain)
    if gain <= 0 or (act == "lrelu" and alpha < 0):
        return reference.bias_act(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
    if b is not None:
        b = b.reshape([-1 if i == dim else 1 for i in range(x.ndim)]).to(x.dtype)
        y = torch.add(b * gain, x, alpha=gain) if gain != 1 else x + b
    else:
        y = x * gain if gain != 1 else x
    if act == "lrelu":
        # In place on our own fresh tensor; autograd takes lrelu's gradient from the output (alpha > 0).
        y = F.leaky_relu_(y, alpha) if (y is not x and alpha > 0) else F.leaky_relu(y, alpha)
    if clamp is not None and clamp >= 0:
        in_place = y is not x and not _needs_grad(y)  # clamp's backward needs the unclamped values
        y = y.clamp_(-clamp, clamp) if in_place else y.clamp(-clamp, clamp)
    return y


# ----------------------------------------------------------------------------------------------
# upfirdn2d


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """Upsample, pad, FIR-filter, downsample (reference.upfirdn2d) with fast paths.

    Without upsampling: one channels_last depthwise conv (padding and decimation inside the conv).
    Upsampling: one strided transposed convolution whenever the padding is what that op produces.
    """
    x0, x1, y0, y1 = reference.parse_padding(padding)
    if up == 1 and f is not None and x.shape[2] + y0 + y1 >= f.shape[0] and x.shape[3] + x0 + x1 >= f.shape[-1]:
        return _fir(x, f, (x0, x1, y0, y1), down=down, gain=gain, flip_filter=flip_filter)
    if up > 1 and down == 1 and f is not None:
        y = _upsample_transposed(x, f, up, (x0, x1, y0, y1), flip_filter, gain)
        if y is not None:
            return y
    return reference.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)


def _upsample_transposed(x, f, up, pad, flip_filter, gain):
    """Zero insertion + pad + FIR as conv_transpose2d(stride=up); None when the padding does not fit.

    A transposed conv computes the full convolution of the zero-stuffed input with the filter and
    crops `crop` from each side; the reference's padding (p0, p1) matches when both axes share
    p0 = K-1-crop and p1 = p0+1-up+extra, where `extra` < up becomes output_padding.
    """
    x0, x1, y0, y1 = pad
    kernel = f if f.ndim == 2 else torch.outer(f, f)  # separable 1-D filter: the same taps on both axes
    kh, kw = kernel.shape
    if (x0, x1) != (y0, y1) or kh != kw:
        return None
    crop, extra = kh - 1 - x0, x1 - (x0 + 1 - up)
    if crop < 0 or not 0 <= extra < up:
        return None
    batch, channels, height, width = x.shape
    kernel = kernel * float(gain)  # 2-D: f*gain; 1-D: f*gain**0.5 on each axis, the same product
    if flip_filter:  # the transposed conv already convolves (flips); flip_filter asks for correlation
        kernel = kernel.flip([0, 1])
    # Every channel gets the same filter: fold channels into the batch (one-channel transposed conv,
    # ~4x faster on CPU than the depthwise grouped form).
    y = F.conv_transpose2d(x.reshape(batch * channels, 1, height, width), kernel.to(x.dtype)[None, None],
                           stride=up, padding=crop, output_padding=extra)
    return y.reshape(batch, channels, y.shape[2], y.shape[3])


# ----------------------------------------------------------------------------------------------
# conv2d_resample


def _prefer_channels_last(x, w) -> bool:
    """channels_last when the feature map outweighs the weight (oneDNN then avoids reordering the map);
    at small maps the NCHW weight is used as is, saving a per-call copy of it into channels_last."""
    return x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] > w.numel()


def _in_format(x, channels_last: bool):
    if channels_last:
        return x if x.is_contiguous(memory_format=_CHANNELS_LAST) else x.contiguous(memory_format=_CHANNELS_LAST)
    return x if x.is_contiguous() else x.contiguous()


def conv2d_resample(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True, flip_filter=False):
    """2-D convolution with optional FIR up/downsampling (reference.conv2d_resample), same branch structure.

    Feature maps run channels_last where they outweigh the weight; the FIR steps are `upfirdn2d`'s
    fast paths (depthwise channels_last conv with the padding and decimation inside it).
    """
    return _conv2d_resample(x, w, f, up, down, padding, groups, flip_weight, flip_filter, cache_weight=False)


def _conv2d_resample(x, w, f, up, down, padding, groups, flip_weight, flip_filter, cache_weight):
    """conv2d_resample; cache_weight=True lets weight-derived copies be reused while `w` is unchanged."""
    out_channels, in_per_group, kh, kw = w.shape
    px0, px1, py0, py1 = reference.resample_padding(padding, f, up, down)
    if kh > 1 or kw > 1:  # 1x1 convs take either layout as is (a format copy would cost more)
        x = _in_format(x, _prefer_channels_last(x, w))

    def conv(x, stride=1, padding=0):
        weight = w
        if not flip_weight and (kh > 1 or kw > 1):
            weight = _derived(w, ("flip",), lambda: w.flip([2, 3]), cache_weight)
        return F.conv2d(x, weight, stride=stride, padding=padding, groups=groups)

    if kw == 1 and kh == 1 and down > 1 and up == 1:  # 1x1: downsample first (cheaper)
        return conv(upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter))
    if kw == 1 and kh == 1 and up > 1 and down == 1:  # 1x1: convolve first, then upsample
        return upfirdn2d(conv(x), f, up=up, padding=[px0, px1, py0, py1], gain=up ** 2, flip_filter=flip_filter)
    if down > 1 and up == 1:  # FIR, then strided conv
        return conv(upfirdn2d(x, f, padding=[px0, px1, py0, py1], flip_filter=flip_filter), stride=down)
    if up > 1:  # strided transposed conv (= zero insertion + conv), then FIR
        def transposed_weight():
            if groups == 1:
                wt = w.transpose(0, 1)
            else:  # transpose within each group: [G*O/G, I, k, k] -> [G*I, O/G, k, k]
                wt = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
                wt = wt.reshape(groups * in_per_group, out_channels // groups, kh, kw)
            # the reference runs this conv with flip_weight=(not flip_weight); contiguous: one copy, cached
            return wt.flip([2, 3]) if flip_weight else wt.contiguous()

        wt = _derived(w, ("transposed", groups, flip_weight), transposed_weight, cache_weight)
        conv_padding, fir_padding = reference.transposed_conv_padding([px0, px1, py0, py1], kw, kh, up)
        x = F.conv_transpose2d(x, wt, stride=up, padding=conv_padding, groups=groups)
        x = upfirdn2d(x, f, padding=fir_padding, gain=up ** 2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:  # plain conv with symmetric padding
        return conv(x, padding=[py0, px0])
    return conv(F.pad(x, [px0, px1, py0, py1]))  # asymmetric or negative padding (negative crops)


# ----------------------------------------------------------------------------------------------
# Weight-derived tensors, cached while the weight is unchanged (inference, or a frozen network)

_derived_cache: dict[tuple, tuple] = {}  # (id(weight), tag) -> (weakref to weight, weight._version, tensor)


def _derived(weight, tag: tuple, make, allowed: bool = True):
    """`make()` (a tensor computed from `weight` alone), reused until `weight` changes in place or dies.

    Only when no autograd graph to `weight` is needed; the weakref check makes a reused id() a miss.
    """
    if not allowed or (torch.is_grad_enabled() and weight.requires_grad) or torch.is_inference_mode_enabled():
        return make()  # (inference tensors could not be saved for a later backward pass)
    try:
        version = weight._version
    except RuntimeError:  # inference-mode tensors have no version counter: do not cache them
        return make()
    key = (id(weight),) + tag
    hit = _derived_cache.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == version:
        return hit[2]
    value = make()
    if hit is None or hit[0]() is not weight:
        ref = weakref.ref(weight, lambda _, key=key: _derived_cache.pop(key, None))
    else:
        ref = hit[0]
    _derived_cache[key] = (ref, version, value)
    return value


# ----------------------------------------------------------------------------------------------
# modulated_conv2d


def modulated_conv2d(x, weight, styles, noise=None, up=1, down=1, padding=0, resample_filter=None,
                     demodulate=True, flip_weight=True, fused_modconv=True):
    """StyleGAN2 modulated convolution (reference.modulated_conv2d), same result either way.

    `fused_modconv` is accepted for signature compatibility; both of NVIDIA's formulations compute
    the same function, and this backend picks whichever moves less memory for the given shapes.
    """
    batch = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    weight, styles = reference.modulation_inputs(x, weight, styles, demodulate)
    dcoefs = None
    if demodulate:  # sum_{i,k} (W[o,i,k] s[n,i])^2 = (sum_k W[o,i,k]^2) @ s^2
        weight_sq = _derived(weight, ("square-sum",), lambda: weight.square().sum(dim=[2, 3]))
        dcoefs = (styles.square() @ weight_sq.t() + 1e-8).rsqrt()  # [N,O]
    out_pixels = x.shape[2] * x.shape[3] * (up * up) // (down * down)
    act_elements = in_channels * x.shape[2] * x.shape[3] + out_channels * out_pixels
    if batch == 1 and weight.numel() < act_elements:
        # One sample, large maps: modulate (and demodulate) the small weight, one ordinary conv.
        w = weight * styles.reshape(1, -1, 1, 1)
        if demodulate:
            w = w * dcoefs.reshape(-1, 1, 1, 1)
        y = _conv2d_resample(x, w.to(x.dtype), resample_filter, up, down, padding, 1, flip_weight, False,
                             cache_weight=False)
        if kh == 1 and kw == 1:
            y = y.contiguous()  # few-channel outputs (images) go back to the ordinary layout
        return y.add_(noise.to(y.dtype)) if noise is not None else y
    # A batch, or small maps: scale the activations, one shared conv, scale the output.
    x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
    y = _conv2d_resample(x, weight.to(x.dtype), resample_filter, up, down, padding, 1, flip_weight, False,
                         cache_weight=True)
    if kh == 1 and kw == 1:
        y = y.contiguous()
    if demodulate:
        d = dcoefs.to(y.dtype).reshape(batch, -1, 1, 1)
        if _needs_grad(y, d):  # mul's backward needs y and d as they were
            return torch.addcmul(noise.to(y.dtype), y, d) if noise is not None else y * d
        y = y.mul_(d)
    return y.add_(noise.to(y.dtype)) if noise is not None else y


def modulated_conv2d_bias_act(x, weight, styles, bias=None, noise=None, up=1, down=1, padding=0,
                              resample_filter=None, demodulate=True, flip_weight=True, fused_modconv=True,
                              act="linear", alpha=None, gain=None, clamp=None):
    """reference.modulated_conv2d_bias_act with this backend's two steps (each already allocation-lean)."""
    x = modulated_conv2d(x, weight, styles, noise=noise, up=up, down=down, padding=padding,
                         resample_filter=resample_filter, demodulate=demodulate, flip_weight=flip_weight,
                         fused_modconv=fused_modconv)
    return bias_act(x, bias, act=act, alpha=alpha, gain=gain, clamp=clamp)


__all__ = ["bias_act", "conv2d_resample", "is_available", "modulated_conv2d", "modulated_conv2d_bias_act",
           "unavailable_reason", "upfirdn2d"]
