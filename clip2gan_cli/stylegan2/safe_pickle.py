"""Restricted unpickler for NVIDIA StyleGAN2 network pickles (`.pkl`): tensors and containers only.

NVIDIA's files pickle whole `persistent_class` modules whose reconstruction `exec`s the Python
source stored in the file (`module_src`). This loader never does: it replaces every global the
files legitimately reference by an inert stand-in (see `_ALLOWED_GLOBALS` and
../shared/parity/NVIDIA_PICKLE_FORMAT.md, sections 2-6) and refuses everything else with
`UnsafeCheckpointError` before anything is called. Persistent modules become `PersistentObject`
records that hold their `state` (parameters, buffers, submodules, plain attributes); the source
text is dropped unread.

Hardening beyond the allow-list:
- the pure-Python unpickler is used, over an in-memory reader that refuses any length field that
  runs past the end of the data (no allocation is ever sized by an untrusted length);
- opcodes a StyleGAN2 file never needs (persistent ids, extension codes, INST/OBJ, out-of-band
  buffers) are refused; REDUCE / NEWOBJ / BUILD only accept the stand-ins defined here;
- each tensor storage is a nested legacy `torch.save` stream; it is parsed here with its own
  allow-list (storage classes only), and its element count is checked against the bytes present.
"""
from __future__ import annotations

import collections
import pickle
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import CheckpointError, UnsafeCheckpointError

# Magic number and protocol version that open every legacy (pre-zip) torch.save stream.
LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_TORCH_PROTOCOL = 1001

# Persistent classes NVIDIA's StyleGAN2 code (stylegan2-ada-pytorch networks.py, stylegan3
# networks_stylegan2.py, augment.py) writes. Any other class name is refused: it is not StyleGAN2.
KNOWN_PERSISTENT_CLASSES = frozenset({
    "Generator", "MappingNetwork", "FullyConnectedLayer", "SynthesisNetwork", "SynthesisBlock",
    "SynthesisLayer", "ToRGBLayer", "Conv2dLayer", "Discriminator", "DiscriminatorBlock",
    "DiscriminatorEpilogue", "MinibatchStdLayer", "AugmentPipe",
})

# Storage classes allowed inside a nested storage stream: name -> (dtype, bytes per element).
_STORAGE_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "FloatStorage": (torch.float32, 4),
    "DoubleStorage": (torch.float64, 8),
    "HalfStorage": (torch.float16, 2),
    "BFloat16Storage": (torch.bfloat16, 2),
    "LongStorage": (torch.int64, 8),
    "IntStorage": (torch.int32, 4),
    "ShortStorage": (torch.int16, 2),
    "CharStorage": (torch.int8, 1),
    "ByteStorage": (torch.uint8, 1),
    "BoolStorage": (torch.bool, 1),
}

# numpy dtype codes the `numpy.dtype` stand-in accepts (the gains are float64 scalars).
_NUMPY_SCALAR_CODES = frozenset({"f8", "f4", "f2", "i8", "i4", "i2", "i1", "u8", "u4", "u2", "u1", "b1"})


@dataclass
class PersistentObject:
    """Inert record of one pickled NVIDIA `persistent_class` instance (its source is never run)."""

    class_name: str
    state: dict = field(repr=False)

    def child(self, name: str) -> "PersistentObject | None":
        """The submodule `name` (from `state['_modules']`), or None."""
        modules = self.state.get("_modules") or {}
        value = modules.get(name)
        return value if isinstance(value, PersistentObject) else None

    def find(self, dotted: str) -> "PersistentObject | None":
        """The submodule at a dotted path such as 'synthesis.b4.conv1', or None."""
        node: PersistentObject | None = self
        for part in dotted.split(".") if dotted else []:
            node = node.child(part) if node is not None else None
        return node

    def attribute(self, name: str, default: Any = None) -> Any:
        """A plain attribute of the module (int, float, str, None...), or `default`."""
        return self.state.get(name, default)


class EasyDictStandIn(dict):
    """Stand-in for `dnnlib.util.EasyDict`: a plain dict (NEWOBJ creates it, SETITEMS fills it)."""


class _DTypeSpec:
    """Stand-in for `numpy.dtype(code, align, copy)`: records the code; BUILD sets the byte order."""

    def __init__(self, code: Any, align: Any = False, copy: Any = False):
        if not isinstance(code, str) or code not in _NUMPY_SCALAR_CODES:
            raise UnsafeCheckpointError(f"refused numpy dtype {code!r} in the pickle (only numeric scalars are allowed)")
        self.code = code
        self.byteorder = "<"

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state is (version, byteorder, ...); only the byte order matters here.
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "="):
            self.byteorder = "<" if state[1] in ("|", "=") else state[1]


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for `numpy.core.multiarray.scalar`: decode one numeric scalar from its bytes."""
    if not isinstance(dtype, _DTypeSpec) or not isinstance(data, (bytes, bytearray)):
        raise UnsafeCheckpointError("refused numpy scalar: it is not a plain numeric value")
    numpy_dtype = np.dtype(dtype.byteorder + dtype.code if dtype.code not in ("b1", "i1", "u1") else dtype.code)
    if len(data) != numpy_dtype.itemsize:
        raise CheckpointError(f"malformed numpy scalar: {len(data)} bytes for dtype {dtype.code}")
    return np.frombuffer(bytes(data), dtype=numpy_dtype)[0].item()


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use to store bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("refused _codecs.encode call that is not a latin1 bytes literal")
    return text.encode("latin-1")


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`: record, never exec."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise CheckpointError("malformed NVIDIA persistent object (its meta is not a class record)")
    if meta.get("version") != 6:
        raise CheckpointError(f"unsupported NVIDIA persistence version {meta.get('version')!r} (expected 6)")
    class_name = meta.get("class_name")
    if class_name not in KNOWN_PERSISTENT_CLASSES:
        raise CheckpointError(f"the pickle holds a persistent class {class_name!r} that is not part of "
                              "NVIDIA's StyleGAN2 networks")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"malformed NVIDIA persistent object {class_name}: its state is not a dict")
    # module_src is deliberately not kept: it is code, and nothing here needs it.
    return PersistentObject(class_name=class_name, state=state)


@dataclass
class _Storage:
    """A storage rebuilt from a nested legacy stream: a flat tensor and how often it was viewed."""

    flat: torch.Tensor
    uses: int = 0


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> torch.Tensor:
    """Stand-in for `torch._utils._rebuild_parameter`: the tensor itself (snapshots are frozen)."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("malformed parameter in the pickle (its data is not a tensor)")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _MemoryBudget:
    """Bytes a load may allocate for storages and tensor copies. A legitimate file needs at most
    its own size (every storage is stored once, every tensor views its own storage); memo
    references that rebuild one storage or tensor many times would otherwise multiply it."""

    def __init__(self, limit: int, what: str):
        self.limit, self.used, self.what = limit, 0, what

    def spend(self, nbytes: int) -> None:
        self.used += nbytes
        if self.used > self.limit:
            raise CheckpointError(f"{self.what}: its tensors would need more than {self.limit} bytes for a file of "
                                  "this size (storages rebuilt or shared many times)")

    def load_from_bytes(self, blob: Any) -> _Storage:
        """Stand-in for `torch.storage._load_from_bytes` (the nested stream is parsed, not torch.load-ed)."""
        storage = parse_legacy_storage(blob)
        self.spend(storage.flat.numel() * storage.flat.element_size())
        return storage

    def rebuild_tensor_v2(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                          requires_grad: Any = False, backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
        """Stand-in for `torch._utils._rebuild_tensor_v2`: a bounds-checked view over a parsed storage."""
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{self.what}: malformed tensor (its storage is not a storage)")
        if not (_is_int(storage_offset) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and all(_is_int(v) for v in size + stride)):
            raise CheckpointError(f"{self.what}: malformed tensor (bad offset, size or stride)")
        if storage_offset < 0 or any(v < 0 for v in size + stride):
            raise CheckpointError(f"{self.what}: malformed tensor (negative offset, size or stride)")
        if metadata:
            raise CheckpointError(f"{self.what}: unsupported tensor metadata")
        numel = storage.flat.numel()
        if all(v > 0 for v in size):
            last_index = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last_index >= numel:
                raise CheckpointError(f"{self.what}: a tensor of size {list(size)} reaches element {last_index} of "
                                      f"a storage holding {numel} (oversized or corrupt length fields)")
        storage.uses += 1
        view = torch.as_strided(storage.flat, size, stride, storage_offset)
        if storage_offset == 0 and view.is_contiguous() and view.numel() == numel and storage.uses == 1:
            return view
        # Every returned tensor owns its memory (safetensors refuses tensors that share storage).
        self.spend(view.numel() * view.element_size())
        return view.clone(memory_format=torch.contiguous_format)


class _StrictReader:
    """File-like reader over bytes that refuses reads past the end (a length field that lies)."""

    def __init__(self, data: bytes | memoryview, what: str):
        self._view = memoryview(data)
        self._pos = 0
        self._what = what

    def remaining(self) -> int:
        return len(self._view) - self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.remaining()
        if n > self.remaining():
            raise CheckpointError(f"{self._what}: a length field asks for {n} bytes at offset {self._pos} but only "
                                  f"{self.remaining()} remain (truncated file or oversized length field)")
        chunk = bytes(self._view[self._pos:self._pos + n])
        self._pos += n
        return chunk

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readline(self) -> bytes:
        end = bytes(self._view[self._pos:self._pos + 65536]).find(b"\n")
        if end < 0:
            raise CheckpointError(f"{self._what}: unterminated text field at offset {self._pos}")
        return self.read(end + 1)


# Opcodes a StyleGAN2 pickle never needs; refusing them keeps every object construction in view.
_REFUSED_OPCODES = {
    pickle.PERSID[0]: "PERSID", pickle.BINPERSID[0]: "BINPERSID", pickle.EXT1[0]: "EXT1",
    pickle.EXT2[0]: "EXT2", pickle.EXT4[0]: "EXT4", pickle.INST[0]: "INST", pickle.OBJ[0]: "OBJ",
    pickle.NEWOBJ_EX[0]: "NEWOBJ_EX", pickle.BYTEARRAY8[0]: "BYTEARRAY8",
    pickle.NEXT_BUFFER[0]: "NEXT_BUFFER", pickle.READONLY_BUFFER[0]: "READONLY_BUFFER",
}


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode is inspectable
    """Unpickler whose globals come only from `allowed` and whose calls only reach them."""

    dispatch: dict = {}  # filled once below the class: the stock table with the checked opcodes

    def __init__(self, reader: _StrictReader, allowed: dict[tuple[str, str], Any], what: str,
                 persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(reader)
        self._allowed = allowed
        self._allowed_callables = frozenset(id(value) for value in allowed.values())
        self._what = what
        self._persistent_loader = persistent_load

    def _checked_binpersid(self) -> None:
        if self._persistent_loader is None:  # only nested storage streams carry persistent ids
            raise UnsafeCheckpointError(f"{self._what}: refused pickle opcode BINPERSID (unexpected persistent id)")
        pickle._Unpickler.load_binpersid(self)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(f"{self._what}: refused global '{module}.{name}' (not on the allow-list "
                                        "of tensor and container constructors); nothing was executed") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_loader is None:
            raise UnsafeCheckpointError(f"{self._what}: unexpected persistent id")
        return self._persistent_loader(pid)

    def _check_callable(self, func: Any, opcode: str) -> None:
        if id(func) not in self._allowed_callables:
            raise UnsafeCheckpointError(f"{self._what}: refused {opcode} on {type(func).__name__} "
                                        "(only allow-listed constructors may be called)")

    def _checked_reduce(self) -> None:
        args = self.stack[-1]
        self._check_callable(self.stack[-2], "REDUCE")
        if not isinstance(args, tuple):
            raise CheckpointError(f"{self._what}: malformed REDUCE arguments")
        pickle._Unpickler.load_reduce(self)

    def _checked_newobj(self) -> None:
        cls = self.stack[-2]
        if cls not in (EasyDictStandIn, collections.OrderedDict, set, dict):
            raise UnsafeCheckpointError(f"{self._what}: refused NEWOBJ of {getattr(cls, '__name__', type(cls).__name__)}")
        pickle._Unpickler.load_newobj(self)

    def _checked_build(self) -> None:
        if not isinstance(self.stack[-2], _DTypeSpec):  # the one BUILD in these files sets a dtype's state
            raise UnsafeCheckpointError(f"{self._what}: refused BUILD on {type(self.stack[-2]).__name__}")
        pickle._Unpickler.load_build(self)


def _refusing(opcode: int) -> Callable[[Any], None]:
    def refuse(unpickler: _RestrictedUnpickler) -> None:
        raise UnsafeCheckpointError(f"{unpickler._what}: refused pickle opcode {_REFUSED_OPCODES[opcode]} "
                                    "(never used by StyleGAN2 files)")
    return refuse


_RestrictedUnpickler.dispatch = dict(pickle._Unpickler.dispatch)
_RestrictedUnpickler.dispatch.update({opcode: _refusing(opcode) for opcode in _REFUSED_OPCODES})
_RestrictedUnpickler.dispatch.update({
    pickle.BINPERSID[0]: _RestrictedUnpickler._checked_binpersid,
    pickle.REDUCE[0]: _RestrictedUnpickler._checked_reduce,
    pickle.NEWOBJ[0]: _RestrictedUnpickler._checked_newobj,
    pickle.BUILD[0]: _RestrictedUnpickler._checked_build,
})


def _load_one(reader: _StrictReader, allowed: dict[tuple[str, str], Any], what: str,
              persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle one object from `reader`, mapping every failure to a project error."""
    try:
        return _RestrictedUnpickler(reader, allowed, what, persistent_load).load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{what}: nesting too deep") from None
    except Exception as error:  # malformed streams raise all sorts of builtin errors
        raise CheckpointError(f"{what}: corrupt pickle data ({type(error).__name__}: {error})") from None


class _StorageType:
    """Marker returned for `torch.<X>Storage` inside a nested storage stream."""

    def __init__(self, name: str):
        self.name = name
        self.dtype, self.itemsize = _STORAGE_DTYPES[name]


_STORAGE_ALLOWED = {("torch", name): _StorageType(name) for name in _STORAGE_DTYPES}


def parse_legacy_storage(blob: Any) -> _Storage:
    """Parse one nested legacy `torch.save` storage stream (format notes, section 5) without torch.load."""
    what = "nested tensor storage"
    if not isinstance(blob, (bytes, bytearray)):
        raise CheckpointError(f"{what}: expected bytes, got {type(blob).__name__}")
    if sys.byteorder != "little":
        raise CheckpointError("NVIDIA pickles can only be read on little-endian machines")
    reader = _StrictReader(blob, what)
    if _load_one(reader, {}, what) != LEGACY_TORCH_MAGIC:
        raise CheckpointError(f"{what}: not a torch storage stream (bad magic number)")
    if _load_one(reader, {}, what) != LEGACY_TORCH_PROTOCOL:
        raise CheckpointError(f"{what}: unsupported torch serialization protocol")
    sys_info = _load_one(reader, {}, what)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) is not True:
        raise CheckpointError(f"{what}: unsupported system info (big-endian data?)")

    found: list[tuple[str, _StorageType, int]] = []

    def storage_reference(pid: Any) -> tuple[str, _StorageType, int]:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{what}: refused persistent id {type(pid).__name__}")
        _, storage_type, key, location, numel, view_metadata = pid
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and isinstance(location, str)
                and _is_int(numel) and numel >= 0 and view_metadata is None):
            raise CheckpointError(f"{what}: malformed storage reference")
        found.append((key, storage_type, numel))
        return found[-1]

    reference = _load_one(reader, _STORAGE_ALLOWED, what, persistent_load=storage_reference)
    if len(found) != 1 or reference is not found[0]:
        raise CheckpointError(f"{what}: expected exactly one storage")
    key, storage_type, numel = found[0]
    if _load_one(reader, {}, what) != [key]:
        raise CheckpointError(f"{what}: storage key list does not match")
    (count,) = struct.unpack("<q", reader.read(8))
    nbytes = count * storage_type.itemsize
    if count != numel or nbytes != reader.remaining():
        raise CheckpointError(f"{what}: length field says {count} elements of {storage_type.itemsize} bytes, "
                              f"the reference says {numel}, and {reader.remaining()} bytes follow "
                              "(oversized or corrupt length field)")
    flat = torch.frombuffer(bytearray(reader.read(nbytes)), dtype=storage_type.dtype) if nbytes else \
        torch.empty(0, dtype=storage_type.dtype)
    return _Storage(flat=flat)


# The allow-list for the outer stream (format notes, section 6): name -> inert stand-in. The two
# tensor-building entries, `torch._utils._rebuild_tensor_v2` and `torch.storage._load_from_bytes`,
# are added per load, bound to that load's memory budget (see `load_restricted_pickle`).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDictStandIn,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol 2 writes Python 2 module names
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _DTypeSpec,
    ("_codecs", "encode"): _latin1_encode,
}


def load_restricted_pickle(data: bytes, what: str = "NVIDIA pickle") -> Any:
    """Unpickle NVIDIA network pickle bytes with the allow-list; persistent modules become records.

    Raises UnsafeCheckpointError for any global or opcode outside the allow-list (before it is
    used) and CheckpointError for malformed data. Nothing from the file is executed.
    """
    reader = _StrictReader(data, what)
    budget = _MemoryBudget(limit=2 * len(data) + (1 << 20), what=what)
    allowed = {**_ALLOWED_GLOBALS, ("torch._utils", "_rebuild_tensor_v2"): budget.rebuild_tensor_v2,
               ("torch.storage", "_load_from_bytes"): budget.load_from_bytes}
    result = _load_one(reader, allowed, what)
    if reader.remaining():
        raise CheckpointError(f"{what}: {reader.remaining()} unexpected bytes after the end of the pickle")
    return result


def flatten_state_dict(module: PersistentObject) -> dict[str, torch.Tensor]:
    """The `state_dict()` of a recorded module: parameters, persistent buffers, then submodules.

    Follows torch's own order (format notes, section 4), so the keys are NVIDIA's names.
    """
    result: dict[str, torch.Tensor] = {}
    _flatten_into(module, "", result, depth=0)
    return result


def _flatten_into(module: PersistentObject, prefix: str, out: dict[str, torch.Tensor], depth: int) -> None:
    if depth > 64:
        raise CheckpointError("module tree nested too deeply")
    state = module.state
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(non_persistent, (set, frozenset)):
        raise CheckpointError(f"malformed {module.class_name}: _non_persistent_buffers_set is not a set")
    for slot in ("_parameters", "_buffers"):
        entries = state.get(slot) or {}
        if not isinstance(entries, dict):
            raise CheckpointError(f"malformed {module.class_name}: {slot} is not a dict")
        for name, tensor in entries.items():
            _check_member_name(module, name)
            if tensor is None or (slot == "_buffers" and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"malformed {module.class_name}: {prefix}{name} is not a tensor")
            out[prefix + name] = tensor
    modules = state.get("_modules") or {}
    if not isinstance(modules, dict):
        raise CheckpointError(f"malformed {module.class_name}: _modules is not a dict")
    for name, child in modules.items():
        _check_member_name(module, name)
        if child is None:
            continue
        if not isinstance(child, PersistentObject):
            raise CheckpointError(f"malformed {module.class_name}: submodule {prefix}{name} is not a module")
        _flatten_into(child, f"{prefix}{name}.", out, depth + 1)


def _check_member_name(module: PersistentObject, name: Any) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise CheckpointError(f"malformed {module.class_name}: bad member name {name!r}")


def plain_data(value: Any, depth: int = 0) -> Any:
    """A JSON-compatible copy of recorded kwargs (EasyDicts become dicts; anything else is dropped)."""
    if depth > 16:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain_data(v, depth + 1) for k, v in value.items() if isinstance(k, str)}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, depth + 1) for v in value]
    return None


__all__ = [
    "EasyDictStandIn", "KNOWN_PERSISTENT_CLASSES", "PersistentObject", "flatten_state_dict",
    "load_restricted_pickle", "parse_legacy_storage", "plain_data",
]
