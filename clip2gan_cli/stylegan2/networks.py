"""StyleGAN2 generator and discriminator (config-f: `skip` G, `resnet` D) as plain nn.Modules.

A clean-room implementation whose state-dict keys, shapes and numerics are those of NVIDIA
stylegan2-ada-pytorch `training/networks.py` (`mapping.fc0.weight`, `synthesis.b8.conv0.affine.bias`,
`b4.fc.weight`, ...), so NVIDIA checkpoints load strictly and render the same images (see
tests/test_stylegan2_parity_nvidia.py). The ops (bias+act, FIR resampling, modulated conv) come from
`stylegan2.ops` through a switchable backend; the state dict is the same for every backend.

Symbols follow the paper: z (latent), w (intermediate latent), ws / W+ ([N, num_ws, w_dim], one w
per layer), styles s = affine(w).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ..device import precision_name, reduced_dtype, reduced_precision_channels_last
from ..errors import CheckpointError, UserInputError
from .ops import get_ops, resolve_backend
from .ops.reference import activation_defaults, setup_filter

DEFAULT_FILTER = (1, 3, 3, 1)  # the FIR taps of every StyleGAN2 checkpoint


# ----------------------------------------------------------------------------------------------
# Configuration (data, not flags)


def _is_power_of_two(value: int) -> bool:
    return isinstance(value, int) and value >= 4 and (value & (value - 1)) == 0


def _channel_table(resolutions, channel_base, channel_max, channels) -> dict[int, int]:
    """resolution -> channels: the explicit table when given, else min(channel_base // res, channel_max)."""
    if channels is not None:
        missing = [res for res in resolutions if res not in channels]
        if missing:
            raise UserInputError(f"the channel table lacks resolution(s) {missing} (it has {sorted(channels)})")
        return {res: int(channels[res]) for res in resolutions}
    return {res: min(channel_base // res, channel_max) for res in resolutions}


def _fp16_resolution(img_resolution: int, num_fp16_res: int) -> int:
    """Blocks at this resolution and above are marked for reduced precision (NVIDIA's rule, never 4x4)."""
    return max(2 ** (int(math.log2(img_resolution)) + 1 - num_fp16_res), 8)


def _check_num_fp16_res(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserInputError(f"num_fp16_res must be an integer >= 0, got {value!r}")


def _int_keys(table):
    """JSON turns int keys into strings; turn them back."""
    return None if table is None else {int(key): int(value) for key, value in table.items()}


class _ConfigMixin:
    """to_dict / from_dict and the fp16 blocks, shared by the two config dataclasses."""

    @property
    def fp16_resolutions(self) -> list[int]:
        """The blocks that run in reduced precision (fp16/bf16) when the precision asks for it."""
        first = _fp16_resolution(self.img_resolution, self.num_fp16_res)
        return [res for res in self.block_resolutions if res >= first]

    def to_dict(self) -> dict:
        """A JSON-ready dict (channel-table keys become strings)."""
        data = asdict(self)
        if data.get("channels") is not None:
            data["channels"] = {str(res): ch for res, ch in data["channels"].items()}
        data["resample_filter"] = list(data["resample_filter"])
        return data

    @classmethod
    def from_dict(cls, data: dict):
        """Rebuild from `to_dict` output; unknown keys are an error (no silent drift)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserInputError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        data = dict(data)
        if data.get("channels") is not None:
            data["channels"] = _int_keys(data["channels"])
        if "resample_filter" in data:
            data["resample_filter"] = tuple(data["resample_filter"])
        return cls(**data)


@dataclass
class GeneratorConfig(_ConfigMixin):
    """Everything that defines a generator's architecture (weights excluded)."""

    img_resolution: int = 1024  # output size R (power of two >= 4)
    z_dim: int = 512  # input latent size
    w_dim: int = 512  # intermediate latent size
    img_channels: int = 3  # output colour channels
    mapping_layers: int = 8  # FC layers of the mapping network
    mapping_lr_mul: float = 0.01  # equalized-lr multiplier of the mapping network
    w_avg_beta: float = 0.995  # EMA decay of the tracked w average
    channel_base: int = 32768  # channels(res) = min(channel_base // res, channel_max) ...
    channel_max: int = 512  # ... unless `channels` gives the table explicitly
    channels: dict[int, int] | None = None  # explicit resolution -> channels table (rosinality, loaders)
    conv_clamp: float | None = None  # clamp synthesis activations to +-conv_clamp (None: off)
    num_fp16_res: int = 0  # the N highest-resolution blocks run in float16 when the precision allows
    architecture: str = "skip"  # only the config-f `skip` generator is implemented
    resample_filter: tuple[int, ...] = DEFAULT_FILTER  # FIR taps for up-sampling
    use_noise: bool = True  # per-layer noise inputs

    def __post_init__(self):
        self.channels = _int_keys(self.channels)
        self.resample_filter = tuple(self.resample_filter)
        if not _is_power_of_two(self.img_resolution):
            raise UserInputError(f"img_resolution must be a power of two >= 4, got {self.img_resolution}")
        if self.architecture != "skip":
            raise UserInputError(f"generator architecture '{self.architecture}' is not supported (only 'skip')")
        if min(self.z_dim, self.w_dim, self.img_channels, self.mapping_layers) < 1:
            raise UserInputError("z_dim, w_dim, img_channels and mapping_layers must be positive")
        _check_num_fp16_res(self.num_fp16_res)
        self.channels_per_resolution()  # validates an explicit table

    @property
    def block_resolutions(self) -> list[int]:
        return [2 ** i for i in range(2, int(math.log2(self.img_resolution)) + 1)]

    @property
    def num_ws(self) -> int:
        """Rows of W+: two per block plus the last ToRGB (18 at 1024)."""
        return 2 * int(math.log2(self.img_resolution)) - 2

    def channels_per_resolution(self) -> dict[int, int]:
        return _channel_table(self.block_resolutions, self.channel_base, self.channel_max, self.channels)


@dataclass
class DiscriminatorConfig(_ConfigMixin):
    """Everything that defines a discriminator's architecture (weights excluded)."""

    img_resolution: int = 1024  # input size R (power of two >= 4)
    img_channels: int = 3  # input colour channels
    channel_base: int = 32768  # channels(res) = min(channel_base // res, channel_max) ...
    channel_max: int = 512  # ... unless `channels` gives the table explicitly
    channels: dict[int, int] | None = None  # explicit resolution -> channels table
    conv_clamp: float | None = None  # clamp conv activations to +-conv_clamp (None: off)
    num_fp16_res: int = 0  # the N highest-resolution blocks run in float16 when the precision allows
    architecture: str = "resnet"  # only the config-f `resnet` discriminator is implemented
    mbstd_group_size: int | None = 4  # minibatch-std group (None: whole batch; min(group, N) is used)
    mbstd_num_channels: int = 1  # minibatch-std feature maps appended (0: no mbstd)
    resample_filter: tuple[int, ...] = DEFAULT_FILTER  # FIR taps for down-sampling

    def __post_init__(self):
        self.channels = _int_keys(self.channels)
        self.resample_filter = tuple(self.resample_filter)
        if not _is_power_of_two(self.img_resolution):
            raise UserInputError(f"img_resolution must be a power of two >= 4, got {self.img_resolution}")
        if self.architecture != "resnet":
            raise UserInputError(f"discriminator architecture '{self.architecture}' is not supported (only 'resnet')")
        if self.mbstd_group_size is not None and self.mbstd_group_size < 1:
            raise UserInputError(f"mbstd_group_size must be positive or None, got {self.mbstd_group_size}")
        _check_num_fp16_res(self.num_fp16_res)
        self.channels_per_resolution()

    @property
    def block_resolutions(self) -> list[int]:
        """Resolutions of the downsampling blocks, largest first (4 is the epilogue)."""
        return [2 ** i for i in range(int(math.log2(self.img_resolution)), 2, -1)]

    def channels_per_resolution(self) -> dict[int, int]:
        return _channel_table(self.block_resolutions + [4], self.channel_base, self.channel_max, self.channels)


# ----------------------------------------------------------------------------------------------
# Backend plumbing


class _OpsUser(nn.Module):
    """A module that calls `stylegan2.ops`; `backend` is a plain string so deepcopy/pickle work."""

    backend: str = "reference"

    @property
    def ops(self):
        return get_ops(self.backend)


def _set_backend(root: nn.Module, backend: str) -> str:
    """Resolve `backend` once (see stylegan2.ops) and give every ops-calling layer the resolved name."""
    resolved = resolve_backend(backend)
    for module in root.modules():
        if isinstance(module, _OpsUser):
            module.backend = resolved
    return resolved


class _SwitchableBackend(nn.Module):
    """A whole network (G or D) whose ops backend can be switched in place; weights are untouched."""

    _backend: str = "reference"

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.set_backend(name)

    def set_backend(self, name: str):
        """Switch every layer to backend `name` ("auto", "reference", "eager" or "triton"); returns self."""
        self._backend = _set_backend(self, name)
        return self


# ----------------------------------------------------------------------------------------------
# Precision and memory format (NVIDIA's mixed precision)

class _BlockPrecision:
    """Per forward call: the dtype and memory format of each block (NVIDIA's use_fp16 / fp16_channels_last).

    A block marked by num_fp16_res runs in the reduced dtype when the precision gives one (NCHW or
    channels_last), every other block in the full dtype (in the backend's own layout). force_fp32 is
    NVIDIA's flag.
    """

    def __init__(self, network: nn.Module, device: torch.device, full: torch.dtype, force_fp32: bool):
        self.full = full
        self.reduced = None if force_fp32 else reduced_dtype(network.precision, device)
        channels_last = network.fp16_channels_last
        if channels_last is None:
            channels_last = reduced_precision_channels_last(device)
        self.channels_last = bool(channels_last)

    def of(self, block: nn.Module) -> dict:
        if block.use_fp16 and self.reduced is not None:
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            return {"dtype": self.reduced, "memory_format": layout}
        # Full precision: NVIDIA makes the maps NCHW; keeping the backend's own layout (the fused ops keep
        # large maps channels_last from layer to layer) gives the same values without a copy per block.
        return {"dtype": self.full, "memory_format": torch.preserve_format}


def _slice_batch(value, start: int, stop: int, batch: int):
    """value[start:stop] along the batch for per-sample tensors (and dicts of them); shared ones as they are."""
    if isinstance(value, dict):
        return {key: _slice_batch(item, start, stop, batch) for key, item in value.items()}
    if isinstance(value, torch.Tensor) and value.ndim >= 3 and value.shape[0] == batch and batch > 1:
        return value[start:stop]
    return value


def _run_block(block: nn.Module, checkpointed: bool, chunk: int | None, x, img, *args, **kwargs):
    """Call a block, or (checkpointed, grads on) recompute it in backward instead of keeping its activations.

    With `chunk`, the block runs (and is recomputed) on at most `chunk` samples at a time, so the
    recompute's peak no longer grows with the batch; blocks are per-sample, so the values are the same.
    torch.utils.checkpoint restores the RNG state before recomputing (random draws repeat exactly).
    """
    if not (checkpointed and torch.is_grad_enabled()):
        return block(x, img, *args, **kwargs)
    batch = (x if x is not None else img if img is not None else args[0]).shape[0]
    step = batch if not chunk or chunk >= batch else chunk
    outputs = []
    for start in range(0, batch, step):
        def part(value, start=start):
            return _slice_batch(value, start, start + step, batch)

        outputs.append(torch.utils.checkpoint.checkpoint(
            block, part(x), part(img), *[part(arg) for arg in args], use_reentrant=False,
            **{key: part(value) for key, value in kwargs.items()}))
    if len(outputs) == 1:
        return outputs[0]
    if isinstance(outputs[0], tuple):
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


# ----------------------------------------------------------------------------------------------
# Layers


class FullyConnectedLayer(_OpsUser):
    """FC layer with equalized learning rate: y = act(x @ (W * lr_mul/sqrt(in)).T + b * lr_mul)."""

    def __init__(self,
                 in_features: int,  # input size
                 out_features: int,  # output size
                 bias: bool = True,  # learn a bias
                 activation: str = "linear",  # "linear" or "lrelu"
                 lr_multiplier: float = 1.0,  # equalized-lr multiplier (0.01 in the mapping network)
                 bias_init: float = 0.0,  # initial bias (1 for the style affines)
                 ):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x):
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return self.ops.bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class Conv2dLayer(_OpsUser):
    """Conv with equalized lr, optional FIR up/down-sampling, bias + activation + clamp (D layers)."""

    def __init__(self,
                 in_channels: int,  # input channels
                 out_channels: int,  # output channels
                 kernel_size: int,  # square kernel width
                 bias: bool = True,  # learn a bias
                 activation: str = "linear",  # "linear" or "lrelu"
                 up: int = 1,  # upsampling factor
                 down: int = 1,  # downsampling factor
                 resample_filter=DEFAULT_FILTER,  # FIR taps for resampling
                 conv_clamp: float | None = None,  # clamp the output to +-conv_clamp (None: off)
                 ):
        super().__init__()
        self.in_channels, self.out_channels, self.activation = in_channels, out_channels, activation
        self.up, self.down, self.conv_clamp = up, down, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = activation_defaults(activation)[1]
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x, gain=1.0):
        w = self.weight * self.weight_gain
        b = self.bias.to(x.dtype) if self.bias is not None else None
        x = self.ops.conv2d_resample(x, w.to(x.dtype), f=self.resample_filter, up=self.up, down=self.down,
                                     padding=self.padding, flip_weight=(self.up == 1))
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return self.ops.bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp)

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, activation={self.activation}, "
                f"up={self.up}, down={self.down}, conv_clamp={self.conv_clamp}")


# ----------------------------------------------------------------------------------------------
# Generator


class MappingNetwork(nn.Module):
    """z -> w: normalize z, `num_layers` FC+lrelu layers (lr x0.01), broadcast to W+, truncate."""

    def __init__(self,
                 z_dim: int,  # input latent size
                 w_dim: int,  # output latent size
                 num_ws: int,  # rows of W+ to broadcast w to
                 num_layers: int = 8,  # FC layers
                 lr_multiplier: float = 0.01,  # equalized-lr multiplier of every layer
                 w_avg_beta: float = 0.995,  # EMA decay of the tracked w average
                 ):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws = z_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        for idx in range(num_layers):
            in_features = z_dim if idx == 0 else w_dim
            layer = FullyConnectedLayer(in_features, w_dim, activation="lrelu", lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z, truncation_psi=1.0, truncation_cutoff=None, update_emas=False):
        """ws [N, num_ws, w_dim]; truncation lerps rows [:cutoff] (all when None) towards w_avg."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise UserInputError(f"z must have shape [N, {self.z_dim}], got {list(z.shape)}")
        x = z.to(self.fc0.weight.dtype)
        x = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()  # normalize_2nd_moment
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if update_emas:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        ws = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            w_avg = self.w_avg.to(ws.dtype)
            if truncation_cutoff is None:
                ws = w_avg.lerp(ws, truncation_psi)
            else:
                head = w_avg.lerp(ws[:, :truncation_cutoff], truncation_psi)
                ws = torch.cat([head, ws[:, truncation_cutoff:]], dim=1)
        return ws

    def extra_repr(self):
        return f"z_dim={self.z_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}, num_layers={self.num_layers}"


class SynthesisLayer(_OpsUser):
    """Modulated 3x3 conv (+ optional 2x upsampling), per-pixel noise, bias, lrelu, clamp."""

    def __init__(self,
                 in_channels: int,  # input channels
                 out_channels: int,  # output channels
                 w_dim: int,  # latent size fed to the style affine
                 resolution: int,  # output resolution (noise map size)
                 kernel_size: int = 3,  # square kernel width
                 up: int = 1,  # 2 for the first conv of a block
                 use_noise: bool = True,  # add per-pixel noise
                 resample_filter=DEFAULT_FILTER,  # FIR taps for upsampling
                 conv_clamp: float | None = None,  # clamp activations to +-conv_clamp (None: off)
                 ):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.up, self.use_noise, self.conv_clamp = up, use_noise, conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = math.sqrt(2)  # lrelu's default gain
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def draw_noise(self, batch: int, device, dtype) -> torch.Tensor:
        """Raw N(0,1) maps [batch, 1, r, r]: what noise_mode 'random' adds (times noise_strength)."""
        return torch.randn([batch, 1, self.resolution, self.resolution], device=device, dtype=dtype)

    def forward(self, x, w, noise_mode="const", noise=None, fused_modconv=True, gain=1.0):
        """`noise` (raw N(0,1), broadcastable to [N,1,r,r]) overrides `noise_mode` when given."""
        styles = self.affine(w)
        scaled_noise = None
        if self.use_noise:
            if noise is not None:
                scaled_noise = noise.to(x.dtype) * self.noise_strength
            elif noise_mode == "random":
                scaled_noise = self.draw_noise(x.shape[0], x.device, x.dtype) * self.noise_strength
            elif noise_mode == "const":
                scaled_noise = self.noise_const * self.noise_strength
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        # conv, then the epilogue (demodulation, noise, bias, lrelu, gain, clamp): one kernel on triton
        return self.ops.modulated_conv2d_bias_act(x, self.weight, styles, bias=self.bias.to(x.dtype),
                                                  noise=scaled_noise, up=self.up, padding=self.padding,
                                                  resample_filter=self.resample_filter,
                                                  flip_weight=(self.up == 1), fused_modconv=fused_modconv,
                                                  act="lrelu", gain=self.act_gain * gain, clamp=clamp)

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, resolution={self.resolution}, "
                f"up={self.up}, use_noise={self.use_noise}, conv_clamp={self.conv_clamp}")


class ToRGBLayer(_OpsUser):
    """1x1 modulated conv without demodulation (styles x 1/sqrt(C_in)), bias, linear output."""

    def __init__(self,
                 in_channels: int,  # feature channels
                 out_channels: int,  # image channels
                 w_dim: int,  # latent size fed to the style affine
                 conv_clamp: float | None = None,  # clamp the output to +-conv_clamp (None: off)
                 ):
        super().__init__()
        self.in_channels, self.out_channels, self.conv_clamp = in_channels, out_channels, conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x, w, fused_modconv=True):
        styles = self.affine(w) * self.weight_gain
        return self.ops.modulated_conv2d_bias_act(x, self.weight, styles, bias=self.bias.to(x.dtype),
                                                  demodulate=False, fused_modconv=fused_modconv,
                                                  clamp=self.conv_clamp)

    def extra_repr(self):
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, conv_clamp={self.conv_clamp}"


class SynthesisBlock(_OpsUser):
    """One resolution of the `skip` generator: [const |conv0 (up 2x)], conv1, ToRGB added to the upsampled image."""

    def __init__(self,
                 in_channels: int,  # channels from the previous block (0 for the 4x4 block)
                 out_channels: int,  # channels of this block
                 w_dim: int,  # latent size
                 resolution: int,  # this block's resolution
                 img_channels: int,  # image channels
                 resample_filter=DEFAULT_FILTER,  # FIR taps for upsampling
                 conv_clamp: float | None = None,  # clamp activations (None: off)
                 use_noise: bool = True,  # per-pixel noise in both convs
                 use_fp16: bool = False,  # marked by num_fp16_res: runs in fp16/bf16 when the precision allows
                 ):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        layer_args = dict(w_dim=w_dim, resolution=resolution, use_noise=use_noise,
                          resample_filter=resample_filter, conv_clamp=conv_clamp)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, **layer_args)
        self.conv1 = SynthesisLayer(out_channels, out_channels, **layer_args)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1
        # Checkpointing pays where a sample's maps outweigh the weights (1024 config-f: blocks >= 128 px).
        self.activation_heavy = out_channels * resolution ** 2 > self.conv1.weight.numel()

    def layer_names(self) -> list[str]:
        return ["conv1"] if self.in_channels == 0 else ["conv0", "conv1"]

    def default_fused_modconv(self, dtype, batch: int) -> bool:
        """NVIDIA's rule: the grouped conv only in eval, in float32 (or with a batch of one)."""
        return (not self.training) and (dtype == torch.float32 or batch == 1)

    def random_noise(self, batch: int, device, dtype) -> dict:
        """The raw N(0,1) maps the layers draw themselves under noise_mode 'random', drawn the same way
        in the same order (so the whole batch can be drawn before the block runs in chunks)."""
        layers = [(name, getattr(self, name)) for name in self.layer_names()]
        return {name: layer.draw_noise(batch, device, dtype) for name, layer in layers if layer.use_noise}

    def forward(self, x, img, ws, noise_mode="const", noise=None, fused_modconv=None, dtype=None,
                memory_format=torch.preserve_format):
        """ws: [N, num_conv + 1, w_dim] (conv rows, then the ToRGB row); noise: {layer name: raw noise}.

        dtype / memory_format: this block's activations (dtype None: ws.dtype); ws, styles and the
        running image stay in ws.dtype. fused_modconv=None: NVIDIA's rule, grouped conv only in eval
        in float32 (or with a batch of one).
        """
        noise = noise or {}
        w_rows = ws.unbind(dim=1)
        dtype = ws.dtype if dtype is None else dtype
        if fused_modconv is None:
            fused_modconv = self.default_fused_modconv(dtype, ws.shape[0])
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).to(dtype=dtype, memory_format=memory_format)
            x = x.repeat([ws.shape[0], 1, 1, 1])
        else:
            x = x.to(dtype=dtype, memory_format=memory_format)
        for name, w in zip(self.layer_names(), w_rows):
            x = getattr(self, name)(x, w, noise_mode=noise_mode, noise=noise.get(name), fused_modconv=fused_modconv)
        if img is not None:  # skip architecture: upsample the running image with the FIR
            img = _upsample2d(self.ops, img, self.resample_filter)
        y = self.torgb(x, w_rows[self.num_conv], fused_modconv=fused_modconv)
        y = y.to(dtype=ws.dtype, memory_format=torch.contiguous_format)  # the image path stays in full precision
        img = img.add_(y) if img is not None else y  # in place: img is the upsampling's fresh output
        return x, img

    def extra_repr(self):
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, resolution={self.resolution}"


def _upsample2d(ops, x, f, up=2):
    """2x FIR upsampling with NVIDIA's padding ((2, 1) for a 4-tap filter) and gain up**2."""
    fw = f.shape[-1]
    pad0, pad1 = (fw + up - 1) // 2, (fw - up) // 2
    return ops.upfirdn2d(x, f, up=up, padding=[pad0, pad1, pad0, pad1], gain=up ** 2)


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, C, R, R] through blocks b4 ... bR (skip architecture).

    `precision` ("auto", "fp32", "fp16", "bf16"; see device.resolve_precision) decides the dtype of
    the blocks marked by the config's num_fp16_res; every other block, the styles and the image run in
    float32. `fp16_channels_last` is NVIDIA's flag of that name (None: channels_last on CUDA only).
    `checkpoint_blocks = True` recomputes each block whose maps outweigh its weights (`activation_heavy`)
    in backward instead of keeping its activations, `checkpoint_chunk` samples at a time (same outputs
    and gradients, a fraction of the memory, about one more forward of those blocks).
    """

    precision: str = "auto"
    fp16_channels_last: bool | None = None  # reduced-precision maps channels_last (None: device.py decides)
    checkpoint_blocks: bool = False
    checkpoint_chunk: int | None = 1  # samples per checkpointed (re)computation (None: the whole batch)

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.w_dim, self.img_resolution = config.w_dim, config.img_resolution
        self.img_channels, self.num_ws = config.img_channels, config.num_ws
        self.block_resolutions = config.block_resolutions
        channels = config.channels_per_resolution()
        fp16_resolutions = config.fp16_resolutions
        for res in self.block_resolutions:
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim=config.w_dim,
                                   resolution=res, img_channels=config.img_channels,
                                   resample_filter=config.resample_filter, conv_clamp=config.conv_clamp,
                                   use_noise=config.use_noise, use_fp16=res in fp16_resolutions)
            setattr(self, f"b{res}", block)

    def set_precision(self, precision: str):
        """"auto" | "fp32" | "fp16" | "bf16" for the marked blocks (checked now; resolved per device at run time)."""
        self.precision = precision_name(precision)
        return self

    def noise_layers(self) -> list[str]:
        """Names of the layers that take noise, in order: b4.conv1, b8.conv0, b8.conv1, ..."""
        names = []
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            names += [f"b{res}.{name}" for name in block.layer_names() if getattr(block, name).use_noise]
        return names

    def make_noise(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> dict:
        """Raw N(0,1) noise {layer: [N,1,r,r]} drawn from `generator` (reproducible 'random' noise)."""
        noise = {}
        for name in self.noise_layers():
            res = int(name.split(".")[0][1:])
            noise[name] = torch.randn([batch_size, 1, res, res], generator=generator).to(device or "cpu")
        return noise

    def _noise_per_block(self, noise) -> dict[int, dict]:
        """Validate explicit noise (dict by layer name or list in layer order) and split it by block."""
        names = self.noise_layers()
        if isinstance(noise, (list, tuple)):
            if len(noise) != len(names):
                raise UserInputError(f"explicit noise needs {len(names)} tensors (one per layer), got {len(noise)}")
            noise = dict(zip(names, noise))
        noise = {key.removeprefix("synthesis."): value for key, value in noise.items()}
        unknown = sorted(set(noise) - set(names))
        if unknown:
            raise UserInputError(f"unknown noise layer(s) {unknown}; the layers are {names}")
        per_block: dict[int, dict] = {}
        for key, value in noise.items():
            block_name, layer_name = key.split(".")
            per_block.setdefault(int(block_name[1:]), {})[layer_name] = value
        return per_block

    def forward(self, ws, noise_mode="const", noise=None, fused_modconv=None, force_fp32=False):
        """Render W+. noise_mode: 'const' (stored maps), 'random' (fresh draws) or 'none'; explicit
        `noise` (raw N(0,1), dict by layer name or list in `noise_layers()` order) overrides it per layer.
        fused_modconv=None picks NVIDIA's rule per block: grouped conv in eval in float32, activation
        scaling in training or reduced precision. force_fp32=True runs every block in float32 (NVIDIA's flag)."""
        if noise_mode not in ("const", "random", "none"):
            raise UserInputError(f"noise_mode must be 'const', 'random' or 'none', got '{noise_mode}'")
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise UserInputError(f"ws must have shape [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        ws = ws.to(self.b4.const.dtype)
        layout = _BlockPrecision(self, ws.device, ws.dtype, force_fp32)
        noise_by_block = self._noise_per_block(noise) if noise is not None else {}
        chunking = bool(self.checkpoint_blocks and self.checkpoint_chunk and torch.is_grad_enabled()
                        and ws.shape[0] > self.checkpoint_chunk)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)  # conv0 reuses the previous ToRGB row
            block_noise, block_layout = noise_by_block.get(res), layout.of(block)
            block_fused = fused_modconv
            if chunking and block.activation_heavy:  # decide for the whole batch what it would do unchunked
                if block_fused is None:
                    block_fused = block.default_fused_modconv(block_layout["dtype"], ws.shape[0])
                if noise_mode == "random":
                    block_noise = {**block.random_noise(ws.shape[0], ws.device, block_layout["dtype"]),
                                   **(block_noise or {})}
            x, img = _run_block(block, self.checkpoint_blocks and block.activation_heavy, self.checkpoint_chunk,
                                x, img, block_ws, noise_mode=noise_mode, noise=block_noise, fused_modconv=block_fused,
                                **block_layout)
            w_idx += block.num_conv
        return img

    def extra_repr(self):
        return f"w_dim={self.w_dim}, num_ws={self.num_ws}, img_resolution={self.img_resolution}"


class Generator(_SwitchableBackend):
    """StyleGAN2 generator: `mapping` (z -> ws) and `synthesis` (ws -> image), NVIDIA state-dict keys."""

    def __init__(self,
                 config: GeneratorConfig,  # architecture
                 backend: str = "auto",  # ops backend: "auto", "reference", "eager" or "triton"
                 ):
        super().__init__()
        self.config = config
        self.z_dim, self.w_dim, self.num_ws = config.z_dim, config.w_dim, config.num_ws
        self.img_resolution, self.img_channels = config.img_resolution, config.img_channels
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, config.num_ws, num_layers=config.mapping_layers,
                                      lr_multiplier=config.mapping_lr_mul, w_avg_beta=config.w_avg_beta)
        self.synthesis = SynthesisNetwork(config)
        self._backend = _set_backend(self, backend)

    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping.w_avg

    @property
    def precision(self) -> str:
        return self.synthesis.precision

    @precision.setter
    def precision(self, name: str) -> None:
        self.set_precision(name)

    def set_precision(self, precision: str):
        """Run the config's num_fp16_res blocks in: "auto" (float16 on CUDA, float32 on CPU/MPS),
        "fp32" (everything float32), "fp16" or "bf16" (on any device). Weights stay float32; returns self."""
        self.synthesis.set_precision(precision)
        return self

    def forward(self, z, truncation_psi=1.0, truncation_cutoff=None, noise_mode="const", noise=None,
                update_emas=False, fused_modconv=None, force_fp32=False):
        """z [N, z_dim] -> image [N, C, R, R] (nominal range [-1, 1], not clamped)."""
        ws = self.mapping(z, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, noise_mode=noise_mode, noise=noise, fused_modconv=fused_modconv,
                              force_fp32=force_fp32)

    def extra_repr(self):
        return (f"z_dim={self.z_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}, img_resolution={self.img_resolution}, "
                f"backend={self._backend}, precision={self.precision}, fp16_res={self.config.fp16_resolutions}")


# ----------------------------------------------------------------------------------------------
# Discriminator


class DiscriminatorBlock(_OpsUser):
    """One resolution of the `resnet` discriminator: [fromrgb], conv0, conv1 (down 2x) + 1x1 skip, over sqrt 2."""

    def __init__(self,
                 in_channels: int,  # channels from the previous block (0 for the first block)
                 tmp_channels: int,  # channels inside the block
                 out_channels: int,  # channels passed on (at half resolution)
                 resolution: int,  # this block's input resolution
                 img_channels: int,  # image channels (for fromrgb)
                 resample_filter=DEFAULT_FILTER,  # FIR taps for downsampling
                 conv_clamp: float | None = None,  # clamp activations (None: off)
                 use_fp16: bool = False,  # marked by num_fp16_res: runs in fp16/bf16 when the precision allows
                 ):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, activation="lrelu",
                                       conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, activation="lrelu", down=2,
                                 resample_filter=resample_filter, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                resample_filter=resample_filter)
        self.activation_heavy = tmp_channels * resolution ** 2 > self.conv0.weight.numel()  # worth checkpointing

    def forward(self, x, img, dtype=None, memory_format=torch.preserve_format):
        """dtype / memory_format: this block's activations (dtype None: the image's)."""
        dtype = img.dtype if dtype is None else dtype
        if self.in_channels == 0:
            x = self.fromrgb(img.to(dtype=dtype, memory_format=memory_format))
        else:
            x = x.to(dtype=dtype, memory_format=memory_format)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return y.add_(x)  # in place: y is the skip conv's fresh output

    def extra_repr(self):
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, resolution={self.resolution}"


class MinibatchStdLayer(nn.Module):
    """Append the std-dev over groups of samples (population variance) as extra feature maps."""

    def __init__(self,
                 group_size: int | None,  # samples per group (None: the whole batch); min(group, N) is used
                 num_channels: int = 1,  # feature maps appended (channels are split into this many groups)
                 ):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x):
        n, c, h, w = x.shape
        group = min(self.group_size, n) if self.group_size is not None else n
        if n % group != 0:
            raise UserInputError(f"minibatch-std needs a batch divisible by its group size {group}, got {n}")
        f = self.num_channels
        y = x.reshape(group, -1, f, c // f, h, w)  # sample i belongs to group i mod (N / group)
        y = (y - y.mean(dim=0)).square().mean(dim=0)  # population variance over the group
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])  # [N/group, F]
        y = y.reshape(-1, f, 1, 1).repeat(group, 1, h, w)
        return torch.cat([x, y], dim=1)

    def extra_repr(self):
        return f"group_size={self.group_size}, num_channels={self.num_channels}"


class DiscriminatorEpilogue(nn.Module):
    """The 4x4 head: minibatch std, conv, FC + lrelu, FC -> one logit."""

    def __init__(self,
                 in_channels: int,  # channels at 4x4
                 resolution: int = 4,  # head resolution
                 mbstd_group_size: int | None = 4,  # minibatch-std group size
                 mbstd_num_channels: int = 1,  # minibatch-std feature maps (0: off)
                 conv_clamp: float | None = None,  # clamp the conv's activations (None: off)
                 ):
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation="lrelu",
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1)

    def forward(self, x):
        x = x.to(dtype=self.fc.weight.dtype, memory_format=torch.contiguous_format)  # the head is always full precision
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        return self.out(self.fc(x.flatten(1)))

    def extra_repr(self):
        return f"in_channels={self.in_channels}, resolution={self.resolution}"


class Discriminator(_SwitchableBackend):
    """StyleGAN2 `resnet` discriminator: images [N, C, R, R] -> logits [N, 1], NVIDIA state-dict keys.

    `precision`, `fp16_channels_last`, `checkpoint_blocks` and `checkpoint_chunk` work as on
    SynthesisNetwork (the epilogue, which mixes samples through minibatch std, is always float32 and
    never checkpointed).
    """

    precision: str = "auto"
    fp16_channels_last: bool | None = None  # reduced-precision maps channels_last (None: device.py decides)
    checkpoint_blocks: bool = False
    checkpoint_chunk: int | None = 1  # samples per checkpointed (re)computation (None: the whole batch)

    def __init__(self,
                 config: DiscriminatorConfig,  # architecture
                 backend: str = "auto",  # ops backend: "auto", "reference", "eager" or "triton"
                 ):
        super().__init__()
        self.config = config
        self.img_resolution, self.img_channels = config.img_resolution, config.img_channels
        self.block_resolutions = config.block_resolutions
        channels = config.channels_per_resolution()
        fp16_resolutions = config.fp16_resolutions
        for res in self.block_resolutions:
            in_channels = channels[res] if res < config.img_resolution else 0
            block = DiscriminatorBlock(in_channels, channels[res], channels[res // 2], resolution=res,
                                       img_channels=config.img_channels, resample_filter=config.resample_filter,
                                       conv_clamp=config.conv_clamp, use_fp16=res in fp16_resolutions)
            setattr(self, f"b{res}", block)
        self.b4 = DiscriminatorEpilogue(channels[4], resolution=4, mbstd_group_size=config.mbstd_group_size,
                                        mbstd_num_channels=config.mbstd_num_channels, conv_clamp=config.conv_clamp)
        self._backend = _set_backend(self, backend)

    def set_precision(self, precision: str):
        """As Generator.set_precision, for the config's num_fp16_res highest-resolution blocks; returns self."""
        self.precision = precision_name(precision)
        return self

    def forward(self, img, force_fp32=False):
        expected = [self.img_channels, self.img_resolution, self.img_resolution]
        if img.ndim != 4 or list(img.shape[1:]) != expected:
            raise UserInputError(f"the discriminator takes images [N, {', '.join(map(str, expected))}], "
                                 f"got {list(img.shape)}")
        img = img.to(self.b4.fc.weight.dtype)
        layout = _BlockPrecision(self, img.device, img.dtype, force_fp32)
        x = None
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")  # only the first block reads the image (fromrgb)
            x = _run_block(block, self.checkpoint_blocks and block.activation_heavy, self.checkpoint_chunk, x, img,
                           **layout.of(block))
        return self.b4(x)

    def extra_repr(self):
        return (f"img_resolution={self.img_resolution}, backend={self._backend}, precision={self.precision}, "
                f"fp16_res={self.config.fp16_resolutions}")


# ----------------------------------------------------------------------------------------------
# Builders and strict loading


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Run a block under a fixed torch seed without disturbing the caller's RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_generator(resolution: int,
                    z_dim: int = 512,  # input latent size
                    w_dim: int = 512,  # intermediate latent size
                    channel_base: int = 32768,  # channels(res) = min(channel_base // res, channel_max)
                    channel_max: int = 512,  # cap on channels
                    mapping_layers: int = 8,  # FC layers in the mapping network
                    mapping_lr_mul: float = 0.01,  # mapping equalized-lr multiplier
                    conv_clamp: float | None = None,  # activation clamp (None: off)
                    img_channels: int = 3,  # output channels
                    channels: dict[int, int] | None = None,  # explicit resolution -> channels table
                    backend: str = "auto",  # ops backend
                    seed: int | None = None,  # fixed init seed (None: the global RNG)
                    num_fp16_res: int = 0,  # highest-resolution blocks marked for float16
                    precision: str = "auto",  # what the marked blocks run in (see Generator.set_precision)
                    ) -> Generator:
    """A randomly initialised generator (NVIDIA init laws) of the given config-f style architecture."""
    config = GeneratorConfig(img_resolution=resolution, z_dim=z_dim, w_dim=w_dim, img_channels=img_channels,
                             mapping_layers=mapping_layers, mapping_lr_mul=mapping_lr_mul, channel_base=channel_base,
                             channel_max=channel_max, channels=channels, conv_clamp=conv_clamp,
                             num_fp16_res=num_fp16_res)
    with _seeded(seed):
        return Generator(config, backend=backend).set_precision(precision)


def build_discriminator(resolution: int,
                        channel_base: int = 32768,  # channels(res) = min(channel_base // res, channel_max)
                        channel_max: int = 512,  # cap on channels
                        mbstd_group_size: int | None = 4,  # minibatch-std group size
                        mbstd_num_channels: int = 1,  # minibatch-std feature maps
                        conv_clamp: float | None = None,  # activation clamp (None: off)
                        img_channels: int = 3,  # input channels
                        channels: dict[int, int] | None = None,  # explicit resolution -> channels table
                        backend: str = "auto",  # ops backend
                        seed: int | None = None,  # fixed init seed (None: the global RNG)
                        num_fp16_res: int = 0,  # highest-resolution blocks marked for float16
                        precision: str = "auto",  # what the marked blocks run in
                        ) -> Discriminator:
    """A randomly initialised `resnet` discriminator."""
    config = DiscriminatorConfig(img_resolution=resolution, img_channels=img_channels, channel_base=channel_base,
                                 channel_max=channel_max, channels=channels, conv_clamp=conv_clamp,
                                 mbstd_group_size=mbstd_group_size, mbstd_num_channels=mbstd_num_channels,
                                 num_fp16_res=num_fp16_res)
    with _seeded(seed):
        return Discriminator(config, backend=backend).set_precision(precision)


def is_filter_key(name: str) -> bool:
    """FIR-filter buffers are constants every network rebuilds itself; checkpoints may omit them."""
    return name.endswith("resample_filter")


def load_state_dict_strict(module: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Load `state_dict` into `module`: every key and shape must match, except that missing FIR-filter
    buffers keep their built values. Raises CheckpointError naming the first differences."""
    own = module.state_dict()
    missing = [key for key in own if key not in state_dict and not is_filter_key(key)]
    unexpected = [key for key in state_dict if key not in own]
    mismatched = [f"{key} {list(state_dict[key].shape)} != {list(own[key].shape)}"
                  for key in state_dict if key in own and tuple(state_dict[key].shape) != tuple(own[key].shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit the network: " + "; ".join(problems))
    merged = {key: state_dict.get(key, own[key]) for key in own}
    module.load_state_dict(merged, strict=True)


__all__ = [
    "GeneratorConfig", "DiscriminatorConfig", "Generator", "Discriminator", "MappingNetwork",
    "SynthesisNetwork", "build_generator", "build_discriminator", "load_state_dict_strict", "is_filter_key",
]
