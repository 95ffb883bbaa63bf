"""The triton backend's kernels compute what the reference computes, forward and gradients (second
order where a gradient penalty needs it), run on the CPU by triton's interpreter; and `auto`'s
per-op choice by measurement (ops/autotune.py) follows its rules, tested with a fake timer.

Tolerance, float32: the parity rule of ../shared/parity/README.md, max|diff| <= 1e-5 * max(1, max|ref|).
Tolerance, float16: both sides take float16 inputs; the kernels compute in float32 and round once,
the reference rounds after every step (bias add, activation, gain, the conv's output: each a relative
2**-11). Measured on these cases: max|diff| / max(1, max|ref|) up to 9.8e-4 (bias_act forward with
lrelu and clamp; upfirdn2d's gradient 9.2e-4, the modulated conv's 8.2e-4), i.e. two float16
rounding steps; the bound 2e-3 leaves 2x margin and is far below one wrong tap or a missing gain.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (it ships with the CUDA build of torch)", allow_module_level=True)
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import: its kernels then run on CPU tensors

from clip2gan_cli.errors import DeviceError  # noqa: E402
from clip2gan_cli.stylegan2 import build_discriminator, build_generator, get_ops  # noqa: E402
from clip2gan_cli.stylegan2 import ops as ops_pkg  # noqa: E402
from clip2gan_cli.stylegan2.ops import autotune, reference  # noqa: E402
from clip2gan_cli.stylegan2.ops import triton_kernels as tk  # noqa: E402
from parity_helpers import randomize_network  # noqa: E402

if not (tk.interpreting() or torch.cuda.is_available()):
    pytest.skip("triton was imported before this module could set TRITON_INTERPRET=1, and there is no CUDA device",
                allow_module_level=True)

DEVICE = "cpu" if tk.interpreting() else "cuda"
FIR = reference.setup_filter([1, 3, 3, 1], device=DEVICE)
F16_RTOL = 2e-3  # see the module docstring


@pytest.fixture(autouse=True)
def kernels_really_ran():
    """A kernel that failed would be replaced by the reference silently after its one warning: fail instead.
    On CUDA, full float32 (TF32 convolutions would blur the comparison far beyond the parity rule)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert not tk._broken, f"kernels fell back to the reference: {tk._broken}"


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def assert_close(got, want, what="", rtol=1e-5):
    """The parity rule: max|got - want| <= rtol * max(1, max|want|); None counts as zeros."""
    if got is None or want is None:
        other = want if got is None else got
        assert other is None or not other.abs().max().item(), f"{what}: None vs a non-zero gradient"
        return
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    error = (got.double() - want.double()).abs().max().item()
    bound = rtol * max(1.0, want.double().abs().max().item())
    assert error <= bound, f"{what}: max|diff| {error:.3g} > {bound:.3g}"


def assert_matches_reference(op_name, inputs: dict, rtol=1e-5, **kwargs):
    """Output and gradients (fixed upstream gradient) of the triton op vs the reference op."""
    results = {}
    for module in (reference, tk):
        leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
        out = getattr(module, op_name)(**leaves, **kwargs)
        probe = _randn(*out.shape, seed=99, dtype=out.dtype)
        wrt = [k for k, v in leaves.items() if v.requires_grad]
        grads = torch.autograd.grad((out * probe).float().sum(), [leaves[k] for k in wrt])
        results[module] = out.detach(), dict(zip(wrt, grads))
    (ref_out, ref_grads), (out, grads) = results[reference], results[tk]
    assert_close(out, ref_out, f"{op_name} forward {kwargs}", rtol)
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], f"{op_name} d/d{name} {kwargs}", rtol)


# ----------------------------------------------------------------------------------------------
# Dispatch and imports


def test_triton_backend_has_the_reference_functions_and_signatures():
    ops = get_ops("triton")
    assert ops is tk
    for name in ("bias_act", "upfirdn2d", "conv2d_resample", "modulated_conv2d", "modulated_conv2d_bias_act"):
        assert inspect.signature(getattr(ops, name)) == inspect.signature(getattr(reference, name)), name
        assert inspect.signature(getattr(autotune, name)) == inspect.signature(getattr(reference, name)), name


def test_triton_where_it_cannot_run_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the kernels run on this CUDA device")
    monkeypatch.setattr(tk, "_INTERPRETED", False)  # as without TRITON_INTERPRET=1
    monkeypatch.setattr(ops_pkg, "_loaded", {})
    with pytest.raises(DeviceError, match="--backend triton cannot run here: Triton kernels need a CUDA device"):
        get_ops("triton")


def test_importing_the_ops_and_the_cli_imports_no_triton():
    code = ("import sys, clip2gan_cli.cli, clip2gan_cli.stylegan2.ops; "
            "print(','.join(m for m in ('torch', 'triton') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "triton" not in result.stdout.strip().split(","), result.stdout


# ----------------------------------------------------------------------------------------------
# bias_act


@pytest.mark.parametrize("act", ["linear", "lrelu"])
@pytest.mark.parametrize("clamp", [None, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_act_matches_reference(act, clamp, dtype):
    inputs = {"x": _randn(2, 5, 7, 9, seed=1, dtype=dtype).requires_grad_(),
              "b": _randn(5, seed=2, dtype=dtype).requires_grad_()}
    rtol = 1e-5 if dtype == torch.float32 else F16_RTOL
    assert_matches_reference("bias_act", inputs, rtol=rtol, act=act, clamp=clamp)


def test_bias_act_other_dims_no_bias_negative_gain_and_channels_last():
    assert_matches_reference("bias_act", {"x": _randn(3, 4, 6).requires_grad_(), "b": _randn(6).requires_grad_()},
                             dim=2, act="lrelu", alpha=0.1, clamp=0.5)
    assert_matches_reference("bias_act", {"x": _randn(2, 3, 4, 5).requires_grad_(), "b": _randn(5).requires_grad_()},
                             dim=3, act="lrelu", clamp=0.5)
    assert_matches_reference("bias_act", {"x": _randn(4, 9).requires_grad_()}, act="lrelu", gain=-1.5)
    x = _randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    assert_matches_reference("bias_act", {"x": x.requires_grad_(), "b": _randn(6).requires_grad_()},
                             act="lrelu", clamp=0.3)


def _penalty_grads(module, op_name, x, params, **kwargs):
    """WGAN-GP's pattern: d/d(params) of |d out / dx|^2, params on both sides of the op."""
    w_in, w_out = params
    out = getattr(module, op_name)(x * w_in, **kwargs) * w_out
    probe = _randn(*out.shape, seed=7)
    (grad_x,) = torch.autograd.grad((out * probe).sum(), x, create_graph=True)
    return torch.autograd.grad(grad_x.square().sum(), params, allow_unused=True)


def test_bias_act_second_order_gradients_match_reference():
    x = _randn(2, 4, 5, 5, seed=3).requires_grad_()
    params = [_randn(1, 4, 1, 1, seed=4).requires_grad_(), _randn(1, 4, 1, 1, seed=5).requires_grad_()]
    b = _randn(4, seed=6)
    for act, clamp in (("lrelu", None), ("lrelu", 0.7), ("linear", 0.7)):
        want = _penalty_grads(reference, "bias_act", x, params, b=b, act=act, clamp=clamp)
        got = _penalty_grads(tk, "bias_act", x, params, b=b, act=act, clamp=clamp)
        for name, g, w in zip(("w_in", "w_out"), got, want):
            assert_close(g, w, f"penalty d/d{name} {act} {clamp}")


# ----------------------------------------------------------------------------------------------
# upfirdn2d


@pytest.mark.parametrize("up,down,padding", [
    (2, 1, [2, 1, 2, 1]),  # the generator's 2x upsampling
    (1, 2, [1, 1, 1, 1]),  # the discriminator's 2x downsampling
    (1, 1, [1, 2, 0, 3]), (2, 2, 1), (1, 1, -1), (2, 1, [1, 2, 0, 3]),
])
@pytest.mark.parametrize("flip_filter", [False, True])
def test_upfirdn2d_matches_reference(up, down, padding, flip_filter):
    assert_matches_reference("upfirdn2d", {"x": _randn(2, 3, 7, 9, seed=3).requires_grad_()}, f=FIR, up=up,
                             down=down, padding=padding, flip_filter=flip_filter, gain=3.0)


@pytest.mark.parametrize("f", [reference.setup_filter([1, 3, 3, 1], separable=True), reference.setup_filter([1, 2, 1]),
                               torch.tensor([[1.0, 2.0], [0.5, 3.0]])], ids=["separable", "3tap", "asymmetric"])
def test_upfirdn2d_other_filters(f):
    assert_matches_reference("upfirdn2d", {"x": _randn(1, 2, 6, 5, seed=4).requires_grad_()}, f=f.to(DEVICE), up=2,
                             padding=[2, 1, 1, 2], gain=4)


@pytest.mark.parametrize("up,down,padding", [(2, 1, [2, 1, 2, 1]), (1, 2, [1, 1, 1, 1])])
def test_upfirdn2d_float16_and_channels_last(up, down, padding):
    x = _randn(2, 3, 8, 7, seed=5, dtype=torch.float16).requires_grad_()
    assert_matches_reference("upfirdn2d", {"x": x}, rtol=F16_RTOL, f=FIR, up=up, down=down, padding=padding)
    x = _randn(2, 3, 8, 7, seed=5).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert_matches_reference("upfirdn2d", {"x": x}, f=FIR, up=up, down=down, padding=padding)


def test_upfirdn2d_second_order_gradients_match_reference():
    x = _randn(1, 2, 6, 6, seed=8).requires_grad_()
    params = [_randn(1, 2, 1, 1, seed=9).requires_grad_(), _randn(1, 2, 1, 1, seed=10).requires_grad_()]
    for kwargs in (dict(down=2, padding=1), dict(up=2, padding=[2, 1, 2, 1], gain=4)):
        # square the output so that the penalty depends on the input (the op itself is linear)
        want = _penalty_grads(_Squared(reference), "upfirdn2d", x, params, f=FIR, **kwargs)
        got = _penalty_grads(_Squared(tk), "upfirdn2d", x, params, f=FIR, **kwargs)
        for name, g, w in zip(("w_in", "w_out"), got, want):
            assert_close(g, w, f"penalty d/d{name} {kwargs}")


class _Squared:
    def __init__(self, module):
        self.module = module

    def upfirdn2d(self, x, **kwargs):
        return self.module.upfirdn2d(x, **kwargs).square()


# ----------------------------------------------------------------------------------------------
# modulated_conv2d_bias_act: torch's conv + the epilogue kernel


@pytest.mark.parametrize("batch,up,demodulate,noise_kind,act,clamp", [
    (1, 1, True, "const", "lrelu", None),
    (2, 1, True, "per-sample", "lrelu", 0.6),
    (2, 2, True, "const", "lrelu", 0.6),
    (1, 2, False, None, "linear", None),
    (3, 1, False, "per-sample", "linear", 0.5),
    (2, 2, True, None, "linear", None),
])
def test_modulated_conv2d_bias_act_matches_reference(batch, up, demodulate, noise_kind, act, clamp):
    size = 5
    inputs = {"x": _randn(batch, 6, size, size, seed=6).requires_grad_(),
              "weight": _randn(4, 6, 3, 3, seed=7).requires_grad_(),
              "styles": (_randn(batch, 6, seed=8) + 1).requires_grad_(),
              "bias": _randn(4, seed=10).requires_grad_()}
    out_size = size * up
    if noise_kind == "const":
        inputs["noise"] = _randn(out_size, out_size, seed=9).requires_grad_()
    elif noise_kind == "per-sample":
        inputs["noise"] = _randn(batch, 1, out_size, out_size, seed=9).requires_grad_()
    kwargs = dict(up=up, padding=1, resample_filter=FIR, demodulate=demodulate, flip_weight=(up == 1), act=act,
                  clamp=clamp)
    assert_matches_reference("modulated_conv2d_bias_act", inputs, **kwargs)
    inputs.pop("bias")
    assert_matches_reference("modulated_conv2d", inputs, up=up, padding=1, resample_filter=FIR,
                             demodulate=demodulate, flip_weight=(up == 1))


def test_modulated_conv2d_bias_act_1x1_and_float16():
    inputs = {"x": _randn(2, 8, 6, 6).requires_grad_(), "weight": _randn(3, 8, 1, 1).requires_grad_(),
              "styles": (_randn(2, 8) / 8 ** 0.5).requires_grad_(), "bias": _randn(3).requires_grad_()}
    assert_matches_reference("modulated_conv2d_bias_act", inputs, demodulate=False, clamp=0.4)
    half = {"x": _randn(2, 6, 5, 5, seed=11, dtype=torch.float16).requires_grad_(),
            "weight": _randn(4, 6, 3, 3, seed=12).requires_grad_(), "styles": (_randn(2, 6, seed=13) + 1),
            "bias": _randn(4, seed=14, dtype=torch.float16), "noise": _randn(10, 10, seed=15, dtype=torch.float16)}
    assert_matches_reference("modulated_conv2d_bias_act", half, rtol=F16_RTOL, up=2, padding=1,
                             resample_filter=FIR, flip_weight=False, act="lrelu", clamp=256.0)


# ----------------------------------------------------------------------------------------------
# A kernel that fails


def test_failing_kernel_falls_back_to_reference_with_one_warning(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PTX assembly failed: no ptxas here")
            return launch

    x, b = _randn(2, 3, 4, 4), _randn(3)
    with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        patch.setattr(tk, "_bias_act_kernel", Broken())
        patch.setattr(tk, "_broken", {})
        warnings.simplefilter("always")
        first = tk.bias_act(x, b, act="lrelu", clamp=0.5)
        second = tk.bias_act(x, b, act="lrelu", clamp=0.5)
        assert list(tk._broken) == ["bias_act"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "'bias_act'" in messages[0] and "no ptxas here" in messages[0]
    want = reference.bias_act(x, b, act="lrelu", clamp=0.5)
    assert torch.equal(first, want) and torch.equal(second, want)


# ----------------------------------------------------------------------------------------------
# Whole networks on the triton backend


def test_tiny_generator_on_triton_matches_reference_images_and_gradients():
    G = randomize_network(build_generator(16, z_dim=8, w_dim=8, channel_base=64, channel_max=8, mapping_layers=1,
                                   conv_clamp=0.5, backend="reference", seed=0)).to(DEVICE)
    ws = G.mapping(_randn(2, G.z_dim, seed=1)).detach()
    results = {}
    for backend in ("reference", "triton"):
        G.set_backend(backend)
        leaf = ws.clone().requires_grad_()
        image = G.synthesis(leaf, noise_mode="const")
        params = list(G.synthesis.parameters())
        grads = torch.autograd.grad((image * _randn(*image.shape, seed=2)).sum(), [leaf] + params, allow_unused=True)
        results[backend] = image.detach(), grads
    assert_close(results["triton"][0], results["reference"][0], "image")
    names = ["ws"] + [name for name, _ in G.synthesis.named_parameters()]
    for name, got, want in zip(names, results["triton"][1], results["reference"][1]):
        assert_close(got, want, f"d image / d {name}")


def test_tiny_discriminator_gradient_penalty_on_triton_matches_reference():
    # WGAN-GP differentiates D's input gradient: bias_act and upfirdn2d twice (train/losses.py)
    D = randomize_network(build_discriminator(16, channel_base=64, channel_max=8, mbstd_group_size=2, backend="reference",
                                       seed=1), seed=3).to(DEVICE)
    images = _randn(2, 3, 16, 16, seed=4)
    results = {}
    for backend in ("reference", "triton"):
        D.set_backend(backend)
        x = images.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
        results[backend] = grad_x.detach(), torch.autograd.grad(grad_x.square().sum(), list(D.parameters()),
                                                                 allow_unused=True)
    assert_close(results["triton"][0], results["reference"][0], "d logits / d images")
    for (name, _), got, want in zip(D.named_parameters(), results["triton"][1], results["reference"][1]):
        assert_close(got, want, f"d penalty / d {name}")


# ----------------------------------------------------------------------------------------------
# auto on CUDA: choice by measurement (fake candidates and timer: runs anywhere)


def _fake_backend(name, calls):
    def op(*args, **kwargs):
        calls.append(name)
        return name
    return types.SimpleNamespace(**{op_name: op for op_name in autotune.OPS})


def _fake_timer(seconds: dict, calls: list):
    def timer(fn):
        fn()
        return seconds[calls[-1]]
    return timer


def _chooser(tmp_path, seconds, calls, names=("eager", "triton")):
    candidates = {name: _fake_backend(name, calls) for name in names}
    return autotune.OpChooser(candidates, tmp_path / "autotune" / "ops.json", timer=_fake_timer(seconds, calls),
                              environment={"device": "Fake GPU", "torch": "1.0", "triton": "9.9"})


def test_auto_picks_the_faster_candidate_and_caches_it_on_disk(tmp_path):
    calls = []
    chooser = _chooser(tmp_path, {"eager": 2e-3, "triton": 1e-3}, calls)
    x = torch.zeros(2, 4, 8, 8)
    assert chooser.choose("bias_act", (x,), {"act": "lrelu"}) == "triton"
    assert set(calls) == {"eager", "triton"}
    measured = len(calls)
    assert chooser.choose("bias_act", (x,), {"act": "lrelu"}) == "triton" and len(calls) == measured  # remembered
    data = json.loads((tmp_path / "autotune" / "ops.json").read_text())
    [(key, entry)] = data["choices"].items()
    assert entry["backend"] == "triton" and entry["seconds"] == {"eager": 2e-3, "triton": 1e-3}
    key = json.loads(key)
    assert key["op"] == "bias_act" and key["device"] == "Fake GPU" and key["triton"] == "9.9"
    assert key["args"]["x"] == {"shape": [2, 4, 8, 8], "dtype": "float32", "layout": "strided"}
    assert [p.name for p in (tmp_path / "autotune").iterdir()] == ["ops.json"]  # no temp file left
    # a new process reads the choice instead of measuring; another shape is measured anew
    calls2 = []
    again = _chooser(tmp_path, {"eager": 1e-3, "triton": 5e-3}, calls2)
    assert again.choose("bias_act", (x,), {"act": "lrelu"}) == "triton" and calls2 == []
    assert again.choose("bias_act", (torch.zeros(1, 4, 8, 8),), {"act": "lrelu"}) == "eager"
    assert len(json.loads((tmp_path / "autotune" / "ops.json").read_text())["choices"]) == 2


@pytest.mark.parametrize("triton_seconds", [2e-3, 1e-3 + 1e-9, 1e-3])
def test_auto_never_picks_a_candidate_not_faster_than_eager(tmp_path, triton_seconds):
    chooser = _chooser(tmp_path, {"eager": 1e-3, "triton": triton_seconds}, [])
    assert chooser.choose("upfirdn2d", (torch.zeros(1, 1, 4, 4), None), {}) == "eager"


def test_auto_leaves_out_a_failing_kernel_with_one_warning(tmp_path):
    calls = []
    chooser = _chooser(tmp_path, {"eager": 1e-3, "triton": 1e-4}, calls)

    def broken(*args, **kwargs):
        raise RuntimeError("triton.compiler.errors.CompilationError: at 12:4: unsupported")
    chooser.candidates["triton"] = types.SimpleNamespace(**{op: broken for op in autotune.OPS})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert chooser.choose("bias_act", (torch.zeros(1, 2, 3, 3),), {}) == "eager"
        assert chooser.choose("upfirdn2d", (torch.zeros(1, 2, 3, 3), None), {}) == "eager"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "triton kernels failed on bias_act" in messages[0] and "CompilationError" in messages[0]


def test_auto_leaves_out_a_candidate_whose_output_disagrees_with_eager(tmp_path):
    chooser = _chooser(tmp_path, {"eager": 1e-3, "triton": 1e-4}, [])
    chooser.candidates = {"eager": types.SimpleNamespace(bias_act=lambda x, **kw: x * 2),
                          "triton": types.SimpleNamespace(bias_act=lambda x, **kw: x * 2.1)}  # a wrong gain
    chooser.timer = lambda fn: 1e-4 if fn().max().item() > 2.05 else 1e-3  # triton would be "faster"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert chooser.choose("bias_act", (torch.ones(1, 2, 3, 3),), {}) == "eager"
    assert len(caught) == 1 and "differs from eager's by 0.1 (allowed 0.02)" in str(caught[0].message)


def test_auto_on_cpu_tensors_measures_nothing_and_uses_eager(tmp_path):
    calls = []
    chooser = _chooser(tmp_path, {"eager": 1.0, "triton": 1e-9}, calls)
    assert chooser.call("bias_act", torch.zeros(1, 2, 3, 3)) == "eager"
    assert calls == ["eager"] and not (tmp_path / "autotune").exists()


def test_auto_on_this_cpu_machine_resolves_as_before(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on CUDA, auto measures")
    monkeypatch.setattr(ops_pkg, "_auto_choice", None)
    assert ops_pkg.resolve_backend("auto") == "eager"


def test_auto_on_a_cuda_machine_resolves_to_the_measuring_backend(monkeypatch):
    monkeypatch.setattr(ops_pkg, "_cuda_available", lambda: True)
    monkeypatch.setattr(ops_pkg, "_auto_choice", None)
    monkeypatch.setattr(ops_pkg, "_loaded", {})
    assert ops_pkg.resolve_backend("auto") == "autotune"
    assert get_ops("auto") is autotune
    x, b = _randn(1, 3, 4, 4), _randn(3)  # CPU tensors on a CUDA machine: eager, nothing measured
    assert torch.equal(autotune.bias_act(x, b, act="lrelu"), get_ops("eager").bias_act(x, b, act="lrelu"))


def test_auto_on_a_cuda_machine_without_triton_uses_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops_pkg, "_cuda_available", lambda: True)
    monkeypatch.setattr(ops_pkg, "_import_triton", lambda: (None, "triton cannot be imported: No module named 'triton'"))
    monkeypatch.setattr(ops_pkg, "_auto_choice", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops_pkg.resolve_backend("auto") == "eager"
        assert ops_pkg.resolve_backend("auto") == "eager"
    assert [str(w.message) for w in caught] == [
        "StyleGAN2 backend 'auto' uses the eager ops (no Triton kernels): triton cannot be imported: "
        "No module named 'triton'"]
