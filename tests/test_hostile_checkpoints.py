"""Hostile checkpoints: every file below would run code (or allocate absurd memory) if loaded
with `pickle.load` / `torch.load(weights_only=False)` or NVIDIA's own loader. `load_generator`
must refuse each one with UnsafeCheckpointError / CheckpointError, the payload's marker file must
never appear, and nothing may be written to the conversion cache.

One case is deliberately not a refusal: a well-formed NVIDIA pickle whose only hostile part is
its embedded `module_src`. NVIDIA's loader would exec that source; ours never reads it, so the
weights load and the marker still never appears (an unknown class name is refused, though).

Control tests show the payloads are real: the ordinary unpickler does create the markers.
"""
from __future__ import annotations

import builtins
import collections
import importlib
import io
import os
import pickle
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

from _nvidia_pickles import (MARKER_MODULE, build_tree, default_attributes, dumps_snapshot, dumps_with_stand_ins,
                             touch_code)
from clip2gan_cli.errors import CheckpointError, UnsafeCheckpointError
from clip2gan_cli.stylegan2 import build_generator, convert
from clip2gan_cli.stylegan2.safe_pickle import LEGACY_TORCH_MAGIC, LEGACY_TORCH_PROTOCOL

class Call:
    """Pickles as `func(*args)`: the shape of every code-execution payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, Call]:
    """One payload per dangerous global; each creates `marker` when unpickled normally."""
    return {
        "posix.system": Call(os.system, f"touch '{marker}'"),
        "builtins.eval": Call(builtins.eval, touch_code(marker)),
        "builtins.exec": Call(builtins.exec, touch_code(marker)),
        "subprocess.Popen": Call(subprocess.Popen, ["touch", str(marker)]),
        "importlib.import_module": Call(importlib.import_module, MARKER_MODULE),
    }


def _wait_for(path: Path, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


def _written_name(name: str, protocol: int) -> str:
    """The global as the pickle names it: protocol 2 writes Python 2's `__builtin__` for builtins."""
    return name.replace("builtins.", "__builtin__.") if protocol < 3 else name


def _assert_refused(path: Path, marker: Path, clip2gan_home: Path, unsafe: bool, name: str | None = None):
    expected = UnsafeCheckpointError if unsafe else CheckpointError
    with pytest.raises(expected) as caught:
        convert.load_generator(path, device="cpu", backend="reference")
    if name is not None:
        assert name in str(caught.value), f"the error should name {name}: {caught.value}"
    time.sleep(0.05)  # a spawned process would have had time to run
    assert not marker.exists(), "the payload ran"
    converted = clip2gan_home / "converted"
    assert not converted.exists() or not any(converted.iterdir()), "nothing may be written for a refused file"


# ----------------------------------------------------------------------------------------------
# Controls: the payloads work when unpickled the ordinary way


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "importlib.import_module"])
def test_control_payload_runs_under_plain_pickle(marker, name):
    pickle.loads(pickle.dumps(_payloads(marker)[name], protocol=3))
    assert _wait_for(marker), f"{name} payload did not create its marker: the hostile tests would prove nothing"


# ----------------------------------------------------------------------------------------------
# NVIDIA-style pickles


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "importlib.import_module"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_with_forbidden_global_is_refused(tmp_path, tiny_state, marker, clip2gan_home, name, protocol):
    payload = _payloads(marker)[name]
    path = tmp_path / f"evil-{name}.pkl"
    path.write_bytes(dumps_snapshot(tiny_state, None, protocol=protocol, extra={"augment_pipe": payload}))
    _assert_refused(path, marker, clip2gan_home, unsafe=True, name=_written_name(name, protocol))


def test_payload_hidden_inside_a_module_state_is_refused(tmp_path, tiny_state, marker, clip2gan_home):
    attributes = default_attributes(tiny_state, "generator")
    attributes["synthesis.b8.conv0"]["act_gain"] = _payloads(marker)["posix.system"]
    tree = build_tree(tiny_state, "generator", attributes)
    path = tmp_path / "evil-attribute.pkl"
    path.write_bytes(dumps_with_stand_ins({"G_ema": tree, "G": tree, "D": None}, protocol=3))
    _assert_refused(path, marker, clip2gan_home, unsafe=True, name="posix.system")


def test_hand_written_global_opcode_is_refused(tmp_path, marker, clip2gan_home):
    # Protocol-0 style: GLOBAL 'os system', a string argument, REDUCE; no pickler involved.
    data = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(f"touch '{marker}'")) + \
        f"touch '{marker}'".encode() + b"\x85R."
    path = tmp_path / "evil-opcodes.pkl"
    path.write_bytes(data)
    _assert_refused(path, marker, clip2gan_home, unsafe=True, name="os.system")


def test_torch_nn_module_global_is_refused(tmp_path, clip2gan_home, marker):
    # A real torch module class is not data either: the allow-list has no torch.nn names.
    path = tmp_path / "module.pkl"
    path.write_bytes(pickle.dumps({"G_ema": torch.nn.Linear(2, 2)}, protocol=4))
    _assert_refused(path, marker, clip2gan_home, unsafe=True)


def test_module_src_is_never_executed(tmp_path, marker, clip2gan_home):
    # NVIDIA's loader execs `module_src`; here it carries a side effect and a well-formed state.
    hostile_source = touch_code(marker) + "\nclass Generator: pass\n"
    G = build_generator(8, z_dim=4, w_dim=4, channel_base=16, channel_max=4, mapping_layers=1,
                        backend="reference", seed=1)
    state = {name: tensor.clone() for name, tensor in G.state_dict().items()}
    path = tmp_path / "evil-module-src.pkl"
    path.write_bytes(dumps_snapshot(state, None, module_src=hostile_source))
    loaded = convert.load_generator(path, device="cpu", backend="reference")  # the weights are fine...
    assert not marker.exists(), "module_src was executed"  # ...and the source never ran
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), G.eval()(z), rtol=0, atol=0)
    exec(compile(hostile_source, "module_src", "exec"), {})  # control: running it does create the marker
    assert marker.exists()


def test_unknown_persistent_class_with_code_is_refused(tmp_path, tiny_state, marker, clip2gan_home):
    # A persistent object whose class is not one of NVIDIA's StyleGAN2 modules is refused outright.
    tree = build_tree(tiny_state, "generator", default_attributes(tiny_state, "generator"),
                      module_src=touch_code(marker) + "\nclass Exploit: pass\n")
    tree.class_name = "Exploit"
    path = tmp_path / "evil-class.pkl"
    path.write_bytes(dumps_with_stand_ins({"G_ema": tree}, protocol=4))
    _assert_refused(path, marker, clip2gan_home, unsafe=False, name="Exploit")


class _HostileStorage:
    """Pickles as torch.storage._load_from_bytes(blob): the nested-stream slot of every tensor."""

    def __init__(self, blob: bytes):
        self.blob = blob

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.blob,)


class _TensorOver:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())."""

    def __init__(self, storage, size, stride):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, self.stride, False,
                                                 collections.OrderedDict())


def _legacy_blob(main_pickle: bytes, keys: list, raw: bytes) -> bytes:
    head = b"".join(pickle.dumps(part, protocol=2) for part in (
        LEGACY_TORCH_MAGIC, LEGACY_TORCH_PROTOCOL,
        {"protocol_version": LEGACY_TORCH_PROTOCOL, "little_endian": True,
         "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    return head + main_pickle + pickle.dumps(keys, protocol=2) + raw


def _with_tensor(tiny_state: dict, tensor_stand_in) -> bytes:
    attributes = default_attributes(tiny_state, "generator")
    tree = build_tree(tiny_state, "generator", attributes)
    tree.modules["mapping"].buffers["w_avg"] = tensor_stand_in
    return dumps_with_stand_ins({"G_ema": tree}, protocol=3)


def test_nested_pickle_inside_a_tensor_storage_is_refused(tmp_path, tiny_state, marker, clip2gan_home):
    blob = _legacy_blob(pickle.dumps(_payloads(marker)["posix.system"], protocol=2), ["0"], b"")
    path = tmp_path / "evil-storage.pkl"
    path.write_bytes(_with_tensor(tiny_state, _TensorOver(_HostileStorage(blob), (4,), (1,))))
    _assert_refused(path, marker, clip2gan_home, unsafe=True, name="posix.system")


def test_nested_pickle_replacing_the_storage_magic_is_refused(tmp_path, tiny_state, marker, clip2gan_home):
    blob = pickle.dumps(_payloads(marker)["builtins.eval"], protocol=2)  # no torch header at all
    path = tmp_path / "evil-storage-head.pkl"
    path.write_bytes(_with_tensor(tiny_state, _TensorOver(_HostileStorage(blob), (4,), (1,))))
    _assert_refused(path, marker, clip2gan_home, unsafe=True, name=_written_name("builtins.eval", 2))


class _StorageId:
    """Pickles as the persistent id ('storage', torch.FloatStorage, key, 'cpu', numel, None)."""

    def __init__(self, numel: int):
        self.numel = numel


def _storage_main_pickle(numel: int) -> bytes:
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.persistent_id = lambda obj: (("storage", torch.FloatStorage, "0", "cpu", obj.numel, None)
                                         if isinstance(obj, _StorageId) else None)
    pickler.dump(_StorageId(numel))
    return buffer.getvalue()


def test_oversized_storage_element_count_is_refused(tmp_path, tiny_state, marker, clip2gan_home):
    huge = 1 << 40  # 4 TiB of float32 claimed, 8 bytes present
    blob = _legacy_blob(_storage_main_pickle(huge), ["0"], struct.pack("<q", huge) + b"\0" * 8)
    path = tmp_path / "oversized-storage.pkl"
    path.write_bytes(_with_tensor(tiny_state, _TensorOver(_HostileStorage(blob), (4,), (1,))))
    _assert_refused(path, marker, clip2gan_home, unsafe=False)


def test_tensor_reaching_past_its_storage_is_refused(tmp_path, tiny_state, marker, clip2gan_home):
    blob = _legacy_blob(_storage_main_pickle(2), ["0"], struct.pack("<q", 2) + b"\0" * 8)
    path = tmp_path / "out-of-bounds-view.pkl"
    path.write_bytes(_with_tensor(tiny_state, _TensorOver(_HostileStorage(blob), (1 << 20,), (1,))))
    _assert_refused(path, marker, clip2gan_home, unsafe=False)


def _tiny_tree_with(tiny_state: dict, extra: dict) -> bytes:
    tree = build_tree(tiny_state, "generator", default_attributes(tiny_state, "generator"))
    return dumps_with_stand_ins({"G_ema": tree, **extra}, protocol=4)


def test_one_storage_rebuilt_many_times_is_refused(tmp_path, tiny_state, marker, clip2gan_home):
    # Memo references make a 256 KiB storage back 400 tensors: 100 MiB of copies from a tiny file.
    numel = 1 << 16
    blob = _legacy_blob(_storage_main_pickle(numel), ["0"], struct.pack("<q", numel) + b"\0" * (4 * numel))
    storage = _HostileStorage(blob)  # pickled once, then referenced through the memo
    path = tmp_path / "storage-bomb.pkl"
    path.write_bytes(_tiny_tree_with(tiny_state, {"x": [_TensorOver(storage, (numel,), (1,)) for _ in range(400)]}))
    assert path.stat().st_size < 1 << 20
    _assert_refused(path, marker, clip2gan_home, unsafe=False)


def test_one_storage_blob_parsed_many_times_is_refused(tmp_path, tiny_state, marker, clip2gan_home):
    numel = 1 << 16
    blob = _legacy_blob(_storage_main_pickle(numel), ["0"], struct.pack("<q", numel) + b"\0" * (4 * numel))
    path = tmp_path / "blob-bomb.pkl"  # the bytes are memoised; each _HostileStorage re-parses them
    path.write_bytes(_tiny_tree_with(tiny_state, {"x": [_HostileStorage(blob) for _ in range(400)]}))
    assert path.stat().st_size < 1 << 20
    _assert_refused(path, marker, clip2gan_home, unsafe=False)


@pytest.mark.parametrize("opcode, length_format", [
    (pickle.BINBYTES8, "<Q"), (pickle.BINUNICODE8, "<Q"), (pickle.FRAME, "<Q"), (pickle.BINBYTES, "<I"),
    (pickle.LONG4, "<i"),
], ids=["BINBYTES8", "BINUNICODE8", "FRAME", "BINBYTES", "LONG4"])
def test_oversized_length_field_in_the_outer_pickle_is_refused(tmp_path, marker, clip2gan_home, opcode,
                                                               length_format):
    claimed = (1 << 62) if length_format == "<Q" else (1 << 31) - 1  # far beyond the 10-byte payload
    data = b"\x80\x04" + opcode + struct.pack(length_format, claimed) + b"tiny" + b"."
    path = tmp_path / "oversized-bytes.pkl"
    path.write_bytes(data)
    _assert_refused(path, marker, clip2gan_home, unsafe=False, name="length field")


def test_build_on_a_container_is_refused(tmp_path, marker, clip2gan_home):
    # BUILD would set arbitrary attributes on an allowed object: only numpy dtypes may be BUILT.
    data = pickle.dumps(collections.OrderedDict(), protocol=2)[:-1] + b"}b."  # OrderedDict, EMPTY_DICT, BUILD
    path = tmp_path / "build.pkl"
    path.write_bytes(data)
    _assert_refused(path, marker, clip2gan_home, unsafe=True, name="BUILD")


# ----------------------------------------------------------------------------------------------
# torch.save files (rosinality .pt)


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "importlib.import_module"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_file_with_forbidden_global_is_refused(tmp_path, marker, clip2gan_home, name, legacy):
    checkpoint = {"g_ema": {"input.input": torch.zeros(1, 4, 4, 4)}, "args": _payloads(marker)[name]}
    path = tmp_path / f"evil-{name}.pt"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    # torch's weights-only error names builtins by their bare name ("eval"), others in full.
    _assert_refused(path, marker, clip2gan_home, unsafe=True, name=name.removeprefix("builtins."))


def test_torch_zip_with_oversized_entry_size_is_refused(tmp_path, marker, clip2gan_home):
    path = tmp_path / "oversized.pt"
    torch.save({"g_ema": {"input.input": torch.zeros(1, 4, 4, 4)}}, path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    rewritten = tmp_path / "rewritten.pt"
    with zipfile.ZipFile(rewritten, "w", compression=zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    raw = bytearray(rewritten.read_bytes())
    central = raw.rfind(b"PK\x01\x02")  # last central-directory entry: claim a 1 TiB uncompressed size
    raw[central + 24:central + 28] = struct.pack("<I", 0xFFFFFFF0)
    path.write_bytes(bytes(raw))
    _assert_refused(path, marker, clip2gan_home, unsafe=False)


def test_truncated_torch_file_is_a_checkpoint_error(tmp_path, marker, clip2gan_home):
    path = tmp_path / "truncated.pt"
    torch.save({"g_ema": {"input.input": torch.zeros(1, 64, 4, 4)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    _assert_refused(path, marker, clip2gan_home, unsafe=False)


def test_pickle_disguised_as_pt_is_still_read_restrictively(tmp_path, tiny_state, marker, clip2gan_home):
    path = tmp_path / "looks-like-rosinality.pt"  # the suffix is not trusted: the bytes decide
    path.write_bytes(dumps_snapshot(tiny_state, None, extra={"x": _payloads(marker)["builtins.exec"]}))
    _assert_refused(path, marker, clip2gan_home, unsafe=True, name="builtins.exec")
