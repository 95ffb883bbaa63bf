"""Triton StyleGAN2 ops: the reference's functions (ops/reference.py) with three real kernels.

* `bias_act`: bias + activation + gain + clamp in one pass; its backward is the same kernel in
  gradient mode (recomputing `x + b` instead of storing it), itself differentiable, so a gradient
  penalty (WGAN-GP, R1) can differentiate through it twice, as NVIDIA's `_BiasActCudaGrad` allows.
* `upfirdn2d`: zero insertion, padding (negative crops), FIR filter and decimation in one pass, any
  up/down/padding/filter; its backward is `upfirdn2d` with the flipped filter and up/down swapped
  (NVIDIA's identity), so it is differentiable to any order.
* `modulated_conv2d_bias_act`: torch's convolution on style-scaled activations, then ONE epilogue
  kernel: demodulation coefficients, noise, bias, activation, gain and clamp; its backward is one
  kernel too (plus torch's reductions for the per-channel and noise gradients).

The convolutions themselves are torch's (cuDNN beats a hand-written kernel for these shapes), so
`conv2d_resample` is the reference's composite with this backend's `upfirdn2d`.

Kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was first
imported (exact and slow: how the tests run them). Triton compiles each specialisation on first use
and caches it by source hash. A kernel that fails to compile or launch is replaced, from then on, by
the reference computation, with one warning naming the kernel and the error.
"""
from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl

from . import eager, reference

_ACT_CODES = {"linear": 0, "lrelu": 1}  # the reference's activation table, as kernel constants
_BLOCK = 1024  # elements per program of the elementwise kernels
_FIR_BLOCK = 256  # output pixels per program of the FIR kernel
_MAX_TAPS = 64  # larger filters (unrolled loops) go to the eager path
_broken: dict[str, str] = {}  # kernel name -> why it failed (then never launched again)


# ----------------------------------------------------------------------------------------------
# Availability


def interpreting() -> bool:
    """True when the kernels run in triton's interpreter, on CPU tensors: TRITON_INTERPRET=1 was set
    before triton was first imported (triton decides it when a kernel is defined)."""
    return _INTERPRETED


def is_available() -> bool:
    return unavailable_reason() == ""


def unavailable_reason() -> str:
    """Why the kernels cannot run here ('' when they can)."""
    if torch.cuda.is_available() or interpreting():
        return ""
    return ("Triton kernels need a CUDA device (or TRITON_INTERPRET=1, set before triton is first imported, "
            "to run them on CPU tensors, slowly)")


def _runs_here(*tensors) -> bool:
    """Whether these tensors can go to a kernel (device and dtype); otherwise the eager path runs."""
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False
        if not (t.is_cuda or (interpreting() and t.device.type == "cpu")):
            return False
    return True


def _launch(name: str, run, fallback):
    """`run()` (a kernel launch); on failure warn once, mark the kernel broken, and use `fallback()`."""
    if name not in _broken:
        try:
            return run()
        except torch.cuda.OutOfMemoryError:  # not the kernel's fault: the caller must see it
            raise
        except Exception as error:  # a compile or launch failure: fall back, announced once
            _broken[name] = f"{type(error).__name__}: {error}".splitlines()[0]
            warnings.warn(f"Triton kernel '{name}' failed ({_broken[name]}); using the reference computation "
                          f"for it from now on", RuntimeWarning, stacklevel=3)
    return fallback()


# ----------------------------------------------------------------------------------------------
# Kernels (fp32 arithmetic inside, results stored in the tensors' dtype)


@triton.jit
def _act_gain(v, alpha, gain, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.where(v > 0, v, v * alpha)
    return v * gain


@triton.jit
def _act_gain_clamp_grad(v, gy, alpha, gain, clamp, ACT: tl.constexpr, CLAMP: tl.constexpr, DTYPE: tl.constexpr):
    """d/dv of clamp(act(v) * gain) times gy. Clamp passes the gradient strictly inside (-c, c), with y
    and c (by the caller, `_clamp_arg`) rounded to the tensors' dtype: what torch's clamp (the reference)
    does, also in float16."""
    g = gy * gain
    if ACT == 1:
        g = tl.where(v > 0, g, g * alpha)
    if CLAMP:
        y = _act_gain(v, alpha, gain, ACT).to(DTYPE).to(tl.float32)
        g = tl.where((y > -clamp) & (y < clamp), g, 0.0)
    return g


@triton.jit
def _bias_act_kernel(x_ptr, b_ptr, gy_ptr, out_ptr, n, channels, inner, alpha, gain, clamp,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr, GRAD: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Forward: out = clamp(act(x + b) * gain). GRAD: out = d forward / dx * gy. b runs along `channels`
    with `inner` elements per channel step (inner = 1: channels innermost, e.g. channels_last)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(b_ptr + (offs // inner) % channels, mask=mask, other=0.0).to(tl.float32)
    if GRAD:
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _act_gain_clamp_grad(v, gy, alpha, gain, clamp, ACT, CLAMP, out_ptr.dtype.element_ty)
    else:
        y = _act_gain(v, alpha, gain, ACT)
        if CLAMP:
            y = tl.minimum(tl.maximum(y, -clamp), clamp)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upfirdn2d_kernel(x_ptr, k_ptr, y_ptr, channels, in_h, in_w, out_h, out_w, px0, py0,
                      sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
                      UP: tl.constexpr, DOWN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                      BLOCK: tl.constexpr):
    """y[n,c,oy,ox] = sum_{j,i} u[oy*DOWN + j - py0, ox*DOWN + i - px0] * k[j,i], where u is x with
    UP-1 zeros inserted after every pixel (k is the correlation kernel, gain and flip applied)."""
    plane = tl.program_id(0)  # one (sample, channel) plane per program row
    n_idx, c_idx = plane // channels, plane % channels
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < out_h * out_w
    oy, ox = offs // out_w, offs % out_w
    x_base = x_ptr + n_idx.to(tl.int64) * sx_n + c_idx.to(tl.int64) * sx_c
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(KH):
        ty = oy * DOWN + j - py0  # row in the zero-inserted image
        ok_y = (ty >= 0) & (ty % UP == 0) & (ty < in_h * UP)
        iy = tl.where(ok_y, ty // UP, 0)
        for i in tl.static_range(KW):
            tx = ox * DOWN + i - px0
            ok = mask & ok_y & (tx >= 0) & (tx % UP == 0) & (tx < in_w * UP)
            ix = tl.where(ok, tx // UP, 0)
            v = tl.load(x_base + iy * sx_h + ix * sx_w, mask=ok, other=0.0).to(tl.float32)
            acc += v * tl.load(k_ptr + j * KW + i)
    y_base = y_ptr + n_idx.to(tl.int64) * sy_n + c_idx.to(tl.int64) * sy_c
    tl.store(y_base + oy * sy_h + ox * sy_w, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_kernel(c_ptr, d_ptr, noise_ptr, b_ptr, gy_ptr, out_ptr, out2_ptr, n, channels, height, width,
                     sn_n, sn_c, sn_h, sn_w, alpha, gain, clamp,
                     HAS_D: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                     CLAMP: tl.constexpr, GRAD: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Forward: out = clamp(act(c * d[n,o] + noise + b[o]) * gain) over a conv output c [N,O,H,W].
    GRAD: out = g = d out / d(pre-activation) * gy and out2 = g * d (the gradient to c)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if CHANNELS_LAST:  # memory order N, H, W, C
        o = offs % channels
        w = (offs // channels) % width
        h = (offs // (channels * width)) % height
        s = offs // (channels * width * height)
    else:  # N, C, H, W
        w = offs % width
        h = (offs // width) % height
        o = (offs // (width * height)) % channels
        s = offs // (width * height * channels)
    v = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = 1.0
    if HAS_D:
        d = tl.load(d_ptr + s * channels + o, mask=mask, other=0.0).to(tl.float32)
        v = v * d
    if HAS_NOISE:
        v += tl.load(noise_ptr + s * sn_n + o * sn_c + h * sn_h + w * sn_w, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(b_ptr + o, mask=mask, other=0.0).to(tl.float32)
    if GRAD:
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _act_gain_clamp_grad(v, gy, alpha, gain, clamp, ACT, CLAMP, out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)
        if HAS_D:
            tl.store(out2_ptr + offs, (g * d).to(out2_ptr.dtype.element_ty), mask=mask)
    else:
        y = _act_gain(v, alpha, gain, ACT)
        if CLAMP:
            y = tl.minimum(tl.maximum(y, -clamp), clamp)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# Interpreted only if triton itself was imported under TRITON_INTERPRET=1 (its own library functions,
# e.g. tl.cdiv, are then interpreted too; set later, the kernels would fail to run).
_INTERPRETED = all(type(fn).__name__ == "InterpretedFunction" for fn in (_bias_act_kernel, tl.standard.cdiv))


# ----------------------------------------------------------------------------------------------
# bias_act


def _clamp_arg(clamp, dtype) -> float:
    """The clamp bound as the kernels take it: rounded to the tensors' dtype, as torch's clamp uses it."""
    return 0.0 if clamp is None else torch.tensor(float(clamp), dtype=dtype).item()


def _act_params(act, alpha, gain):
    def_alpha, def_gain = reference.activation_defaults(act)
    return (def_alpha if alpha is None else float(alpha)), (def_gain if gain is None else float(gain))


def _channel_layout(x, dim):
    """(x in a layout the kernel indexes, channels, inner, memory format): channels_last maps keep it."""
    if x.ndim == 4 and dim == 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x, x.shape[1], 1, torch.channels_last
    x = x.contiguous()
    return x, x.shape[dim], math.prod(x.shape[dim + 1:]), torch.contiguous_format


def _bias_act_launch(x, b, gy, dim, act, alpha, gain, clamp):
    """One kernel pass: the forward (gy None) or the gradient w.r.t. x (gy given); keeps x's layout."""
    x, channels, inner, memory_format = _channel_layout(x, dim)
    if gy is not None:
        gy = gy.contiguous(memory_format=memory_format)
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _bias_act_kernel[(triton.cdiv(n, _BLOCK),)](
            x, b if b is not None else x, gy if gy is not None else x, out, n, channels, inner, alpha, gain,
            _clamp_arg(clamp, x.dtype), HAS_BIAS=b is not None, ACT=_ACT_CODES[act],
            CLAMP=clamp is not None, GRAD=gy is not None, BLOCK=_BLOCK)
    return out


def _bias_act_grad_reference(gy, x, b, dim, act, alpha, gain, clamp):
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        y = reference.bias_act(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
        return torch.autograd.grad(y, x, gy)[0]


class _BiasActGrad(torch.autograd.Function):
    """dx = bias_act'(x + b) * gy. Linear in gy; its own derivative w.r.t. x and b is zero almost
    everywhere (linear, lrelu and clamp are piecewise linear), so double backward is this op again."""

    @staticmethod
    def forward(ctx, gy, x, b, dim, act, alpha, gain, clamp):
        ctx.save_for_backward(x, b)
        ctx.params = dim, act, alpha, gain, clamp
        return _launch("bias_act_grad", lambda: _bias_act_launch(x, b, gy, dim, act, alpha, gain, clamp),
                       lambda: _bias_act_grad_reference(gy, x, b, dim, act, alpha, gain, clamp))

    @staticmethod
    def backward(ctx, ggx):
        x, b = ctx.saved_tensors
        return (_BiasActGrad.apply(ggx, x, b, *ctx.params),) + (None,) * 7


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, dim, act, alpha, gain, clamp):
        ctx.save_for_backward(x, b)
        ctx.params = dim, act, alpha, gain, clamp
        return _launch("bias_act", lambda: _bias_act_launch(x, b, None, dim, act, alpha, gain, clamp),
                       lambda: reference.bias_act(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp))

    @staticmethod
    def backward(ctx, gy):
        x, b = ctx.saved_tensors
        dim = ctx.params[0]
        gx = _BiasActGrad.apply(gy, x, b, *ctx.params) if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None
        gb = None
        if b is not None and ctx.needs_input_grad[1]:
            gb = gx.sum([i for i in range(gx.ndim) if i != dim]).to(b.dtype)
        return (gx if ctx.needs_input_grad[0] else None), gb, None, None, None, None, None


def bias_act(x, b=None, dim=1, act="linear", alpha=0.2, gain=None, clamp=None):
    """`clamp(act(x + b) * gain, -clamp, clamp)` (reference.bias_act) in one kernel pass."""
    alpha, gain = _act_params(act, alpha, gain)
    clamp = float(clamp) if clamp is not None and clamp >= 0 else None
    if not _runs_here(x, b):
        return eager.bias_act(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
    if b is not None:
        b = b.to(x.dtype).contiguous()
    return _BiasAct.apply(x, b, dim % x.ndim, act, alpha, gain, clamp)


# ----------------------------------------------------------------------------------------------
# upfirdn2d


def _correlation_kernel(f, gain, flip_filter, device):
    """The 2-D taps the kernel correlates with (eager.fir_taps), float32 and contiguous on `device`."""
    return eager.fir_taps(f.to(device=device, dtype=torch.float32), gain, flip_filter).contiguous()


def _upfirdn2d_launch(x, kernel, up, down, pad):
    x0, x1, y0, y1 = pad
    batch, channels, in_h, in_w = x.shape
    kh, kw = kernel.shape
    out_h = (in_h * up + y0 + y1 - kh) // down + 1
    out_w = (in_w * up + x0 + x1 - kw) // down + 1
    channels_last = x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    y = torch.empty([batch, channels, max(out_h, 0), max(out_w, 0)], dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if y.numel():
        grid = (batch * channels, triton.cdiv(out_h * out_w, _FIR_BLOCK))
        _upfirdn2d_kernel[grid](x, kernel, y, channels, in_h, in_w, out_h, out_w, x0, y0, *x.stride(), *y.stride(),
                                UP=up, DOWN=down, KH=kh, KW=kw, BLOCK=_FIR_BLOCK)
    return y


def _upfirdn2d_reference(x, kernel, up, down, pad):
    # `kernel` is already flipped and scaled: flip_filter=True makes the reference correlate with it as is
    return reference.upfirdn2d(x, kernel, up=up, down=down, padding=list(pad), flip_filter=True)


class _Upfirdn2d(torch.autograd.Function):
    """Its gradient is upfirdn2d of the gradient with the filter flipped, up and down swapped, and the
    padding that maps the output grid back onto the input grid (NVIDIA's upfirdn2d backward)."""

    @staticmethod
    def forward(ctx, x, kernel, up, down, pad):
        ctx.save_for_backward(kernel)
        ctx.params = up, down, pad, x.shape
        return _launch("upfirdn2d", lambda: _upfirdn2d_launch(x, kernel, up, down, pad),
                       lambda: _upfirdn2d_reference(x, kernel, up, down, pad))

    @staticmethod
    def backward(ctx, gy):
        (kernel,) = ctx.saved_tensors
        up, down, (x0, x1, y0, y1), in_shape = ctx.params
        kh, kw = kernel.shape
        grad_pad = (kw - x0 - 1, in_shape[3] * up - gy.shape[3] * down + x0 - up + 1,
                    kh - y0 - 1, in_shape[2] * up - gy.shape[2] * down + y0 - up + 1)
        gx = _Upfirdn2d.apply(gy, kernel.flip([0, 1]).contiguous(), down, up, grad_pad)
        return gx, None, None, None, None


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """Upsample, pad, FIR-filter, downsample (reference.upfirdn2d) in one kernel pass."""
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    if not _runs_here(x) or f.numel() ** (2 / f.ndim) > _MAX_TAPS or x.ndim != 4:
        return eager.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
    pad = reference.parse_padding(padding)
    return _Upfirdn2d.apply(x, _correlation_kernel(f, gain, flip_filter, x.device), int(up), int(down), pad)


# ----------------------------------------------------------------------------------------------
# conv2d_resample and the modulated convolution with its fused epilogue


def conv2d_resample(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True, flip_filter=False):
    """reference.conv2d_resample: torch's convolutions, this backend's FIR kernel."""
    return reference.conv2d_resample_with(upfirdn2d, x, w, f, up, down, padding, groups, flip_weight, flip_filter)


def _broadcast_noise(c, noise):
    """(noise as c's dtype viewed at c's shape, its 4 strides: 0 along broadcast axes); no copy of the map."""
    if noise is None:
        return None, (0, 0, 0, 0)
    noise4 = noise.to(c.dtype).expand(c.shape)
    return noise4, noise4.stride()


def _epilogue_launch(c, dcoefs, noise, bias, gy, act, alpha, gain, clamp):
    channels_last = not c.is_contiguous() and c.is_contiguous(memory_format=torch.channels_last)
    c = c if channels_last else c.contiguous()
    noise4, strides = _broadcast_noise(c, noise)
    out = torch.empty_like(c)
    out2 = torch.empty_like(c) if gy is not None and dcoefs is not None else None
    if gy is not None:
        gy = gy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    n = c.numel()
    if n:
        _epilogue_kernel[(triton.cdiv(n, _BLOCK),)](
            c, dcoefs if dcoefs is not None else c, noise4 if noise4 is not None else c,
            bias if bias is not None else c, gy if gy is not None else c, out, out2 if out2 is not None else out,
            n, c.shape[1], c.shape[2], c.shape[3], *strides, alpha, gain, _clamp_arg(clamp, c.dtype),
            HAS_D=dcoefs is not None, HAS_NOISE=noise is not None, HAS_BIAS=bias is not None, ACT=_ACT_CODES[act],
            CLAMP=clamp is not None, GRAD=gy is not None, CHANNELS_LAST=channels_last, BLOCK=_BLOCK)
    return out if gy is None else (out, out2 if out2 is not None else out)


def _epilogue_reference(c, dcoefs, noise, bias, act, alpha, gain, clamp):
    x = c * dcoefs.to(c.dtype).reshape(*dcoefs.shape, 1, 1) if dcoefs is not None else c
    if noise is not None:
        x = x + noise.to(x.dtype)
    return reference.bias_act(x, bias, act=act, alpha=alpha, gain=gain, clamp=clamp)


def _epilogue_grad_reference(gy, c, dcoefs, noise, bias, act, alpha, gain, clamp):
    with torch.enable_grad():
        pre = c.detach().float().requires_grad_()  # the gradient w.r.t. the pre-activation sum
        x = pre * dcoefs.float().reshape(*dcoefs.shape, 1, 1) if dcoefs is not None else pre
        x = x + noise.float() if noise is not None else x
        y = reference.bias_act(x, None if bias is None else bias.float(), act=act, alpha=alpha, gain=gain,
                               clamp=clamp)
        (x_grad,) = torch.autograd.grad(y, x, gy.float())
    g = x_grad.to(c.dtype)
    return g, (g * dcoefs.to(c.dtype).reshape(*dcoefs.shape, 1, 1) if dcoefs is not None else g)


class _Epilogue(torch.autograd.Function):
    """y = clamp(act(c * d[n,o] + noise + b[o]) * gain) over a convolution's output c, in one pass.

    Backward: one kernel pass gives g (the gradient at the pre-activation sum) and g * d (the gradient
    to c); the gradients to d, noise and b are torch reductions of g."""

    @staticmethod
    def forward(ctx, c, dcoefs, noise, bias, act, alpha, gain, clamp):
        ctx.save_for_backward(c, dcoefs, noise, bias)
        ctx.params = act, alpha, gain, clamp
        return _launch("modulated_conv2d_epilogue",
                       lambda: _epilogue_launch(c, dcoefs, noise, bias, None, act, alpha, gain, clamp),
                       lambda: _epilogue_reference(c, dcoefs, noise, bias, act, alpha, gain, clamp))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        c, dcoefs, noise, bias = ctx.saved_tensors
        g, gc = _launch("modulated_conv2d_epilogue_grad",
                        lambda: _epilogue_launch(c, dcoefs, noise, bias, gy, *ctx.params),
                        lambda: _epilogue_grad_reference(gy, c, dcoefs, noise, bias, *ctx.params))
        grads = [gc, None, None, None]
        if dcoefs is not None and ctx.needs_input_grad[1]:
            grads[1] = (g.float() * c.float()).sum([2, 3]).to(dcoefs.dtype)
        if noise is not None and ctx.needs_input_grad[2]:
            grads[2] = g.float().sum_to_size(noise.shape).to(noise.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            grads[3] = g.float().sum([0, 2, 3]).to(bias.dtype)
        return (*grads, None, None, None, None)


def modulated_conv2d_bias_act(x, weight, styles, bias=None, noise=None, up=1, down=1, padding=0,
                              resample_filter=None, demodulate=True, flip_weight=True, fused_modconv=True,
                              act="linear", alpha=None, gain=None, clamp=None):
    """reference.modulated_conv2d_bias_act: styles scale the activations, torch convolves with the
    shared weight, one kernel applies demodulation, noise, bias, activation, gain and clamp.

    `fused_modconv` is accepted for signature compatibility: both of NVIDIA's formulations compute
    the same function, and this one needs no per-sample weights.
    """
    alpha, gain = _act_params(act, alpha, gain)
    clamp = float(clamp) if clamp is not None and clamp >= 0 else None
    if not _runs_here(x, weight, styles, noise, bias):
        return eager.modulated_conv2d_bias_act(x, weight, styles, bias=bias, noise=noise, up=up, down=down,
                                               padding=padding, resample_filter=resample_filter,
                                               demodulate=demodulate, flip_weight=flip_weight,
                                               fused_modconv=fused_modconv, act=act, alpha=alpha, gain=gain,
                                               clamp=clamp)
    batch = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    weight, styles = reference.modulation_inputs(x, weight, styles, demodulate)
    dcoefs = None
    if demodulate:  # sum_{i,k} (W[o,i,k] s[n,i])^2 = (sum_k W[o,i,k]^2) @ s^2
        weight_sq = eager._derived(weight, ("square-sum",), lambda: weight.square().sum(dim=[2, 3]))  # cached
        dcoefs = (styles.square() @ weight_sq.t() + 1e-8).rsqrt().contiguous()  # [N,O]
    x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
    c = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                        flip_weight=flip_weight)
    if bias is not None:
        bias = bias.to(c.dtype).contiguous()
    return _Epilogue.apply(c, dcoefs, noise, bias, act, alpha, gain, clamp)


def modulated_conv2d(x, weight, styles, noise=None, up=1, down=1, padding=0, resample_filter=None,
                     demodulate=True, flip_weight=True, fused_modconv=True):
    """reference.modulated_conv2d: the fused epilogue with no bias, linear activation, no clamp."""
    return modulated_conv2d_bias_act(x, weight, styles, noise=noise, up=up, down=down, padding=padding,
                                     resample_filter=resample_filter, demodulate=demodulate,
                                     flip_weight=flip_weight, fused_modconv=fused_modconv)


__all__ = ["bias_act", "conv2d_resample", "interpreting", "is_available", "modulated_conv2d",
           "modulated_conv2d_bias_act", "unavailable_reason", "upfirdn2d"]
