"""Files from elsewhere are data, never code: every checkpoint and ``.bin`` lafs opens goes through here.

Pickle runs whatever callable a file names, so a checkpoint or verification set from a download, a colleague or a
shared drive could run code the moment it is opened. lafs therefore never unpickles freely:

- checkpoints (:func:`load_checkpoint`): ``torch.load(weights_only=True)``, torch's restricted unpickler (tensors,
  dicts, lists, tuples, str, int, float, bool, None, ``OrderedDict``, torch dtypes/devices/sizes) plus
  :data:`CHECKPOINT_GLOBALS`, the only other objects lafs's own checkpoints hold;
- insightface ``.bin`` sets (:func:`load_bin_pickle`): a :class:`pickle.Unpickler` whose ``find_class`` admits
  only numpy arrays of bool / uint8 (older files store images as uint8 buffers) and numpy bools, nothing else;
- arrays: ``np.load(allow_pickle=False)`` (:func:`load_array`);
- shared weights: the safetensors folder (:func:`read_safetensors_folder`, written by ``lafs export
  --safetensors``), raw tensors + YAML, no pickle at all.

A file asking for anything else is an :class:`UnsafeFileError` (a ``ValueError``) naming the file and what it asked
for; nothing in it has run.
"""

from __future__ import annotations

import codecs
import pickle
import re
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

try:  # numpy >= 2 moved the pickling helpers to numpy._core; numpy 1.x files name numpy.core
    from numpy._core.multiarray import _reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.multiarray import scalar as _np_scalar
    from numpy.core.numeric import _frombuffer

SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
CARD_FILE = "MODEL_CARD.md"
SAFETENSORS_FORMAT = "lafs-safetensors-1"


class UnsafeFileError(ValueError):
    """A file that asks to build objects other than weights and data; it was refused before anything in it ran."""


# Checkpoints written before lafs stored numpy's RNG state as a tensor (``lafs.checkpoint.rng_state``) hold it as
# numpy's legacy tuple ('MT19937', uint32 key array, pos, has_gauss, gauss): an ndarray, rebuilt by numpy's
# ``_reconstruct`` from ``numpy.ndarray`` and a ``dtype`` (whose state numpy 2 sets on a ``UInt32DType``). These
# build arrays of plain numbers from bytes and call nothing else (an object array's elements would still pass
# through the same restricted unpickler; a builtin dtype ignores the state it is given). Both module spellings:
# numpy 1.x writes ``numpy.core.multiarray``, numpy 2 ``numpy._core.multiarray``.
CHECKPOINT_GLOBALS: list = [
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (np.ndarray, "numpy.ndarray"),
    (np.dtype, "numpy.dtype"),
    type(np.dtype(np.uint32)),  # numpy 2 builds the key's dtype as numpy.dtypes.UInt32DType (numpy 1.x: np.dtype)
]

_CHECKPOINT_FIX = ("If you trust the file, re-save its weights with lafs (a lafs checkpoint, or `lafs export CKPT "
                   "--safetensors DIR`) or convert them to a plain state dict of tensors or safetensors")
_BIN_FIX = "Rebuild it with `lafs data bin`, or re-save it as (list of encoded images as bytes, list of bools)"


def _refused(path: Path, what: str, globals_: list[str], holds: str = "weights",
             fix: str = _CHECKPOINT_FIX) -> UnsafeFileError:
    shown = ", ".join(globals_[:5]) + (f" (+{len(globals_) - 5} more)" if len(globals_) > 5 else "")
    return UnsafeFileError(f"{path}: refused as {what}: it holds objects other than {holds} (it asks for {shown}), "
                           f"and unpickling them could run code; nothing in it was loaded. {fix}")


def _bin_refused(path: Path, asked: str) -> UnsafeFileError:
    return _refused(path, "a .bin verification file", [asked], "encoded images and pair labels", _BIN_FIX)


# how torch's restricted unpickler words a refusal (a global, a class to build or a function to call), as opposed
# to a file that is not a pickle at all
_REFUSAL = re.compile(r"GLOBAL (\S+) was not an allowed global|unsupported GLOBAL (\S+) whose module"
                      r"|allowlisted,? via `add_safe_globals`,? but got <class '([^']+)'>"
                      r"|reduce for unrecognized function (\S+)")


def _allow_list():
    """``torch.serialization.safe_globals(CHECKPOINT_GLOBALS)`` where torch has it (>= 2.5 for the context, >= 2.6
    for ``(object, name)`` entries); on older torch nothing extra is allowed, so only checkpoints holding plain
    values load (every checkpoint lafs writes now; an older one with numpy's RNG tuple is refused with a message)."""
    import contextlib

    import torch

    try:
        return torch.serialization.safe_globals(CHECKPOINT_GLOBALS)
    except (AttributeError, TypeError):  # torch < 2.6
        return contextlib.nullcontext()


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The globals a refused checkpoint names beyond the allow-list (static scan, nothing executed)."""
    import torch

    found: list[str] = []
    try:
        with _allow_list():
            found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))  # torch >= 2.5
    # not a zip checkpoint (legacy format, garbage): read the unpickler's own message instead
    except Exception:  # noqa: BLE001 - the static scan is a nicety; the unpickler's message below names the global
        found = []
    if not found:
        found = [next(g for g in m.groups() if g) for m in _REFUSAL.finditer(str(err))]
    return sorted(set(found))


def _reason(err: Exception) -> str:
    """The line of torch's message that says what was wrong (not its advice to set weights_only=False)."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.DOTALL)
    lines = (found.group(1) if found else text).strip().splitlines()
    return lines[0] if lines else "unreadable"


def load_checkpoint(path: str | Path, expected: str = "a lafs checkpoint", mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True`` (+ :data:`CHECKPOINT_GLOBALS`), on the CPU: the dict inside.

    A file naming other globals (a pickled class, function or module) is an :class:`UnsafeFileError`; any other
    file that is not a dict checkpoint is a ``ValueError`` naming it and ``expected``; a missing file is a
    ``FileNotFoundError``. ``mmap`` maps the tensors instead of reading them (zip checkpoints only).
    """
    import torch  # here: `.bin` and array readers stay torch-free

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with _allow_list(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")  # refused below
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types; each becomes a message
        if "TorchScript archive" in str(err):  # a program, not a checkpoint: torch.jit.load's business
            raise ValueError(f"{path}: not {expected} (a TorchScript archive)") from None
        unsafe = _unsafe_globals(path, err)
        if unsafe:
            raise _refused(path, expected, unsafe) from None
        raise ValueError(f"{path}: not {expected} ({type(err).__name__}: {_reason(err)})") from None
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise ValueError(f"{path}: not {expected} (a {kind}, not a dict)")  # noqa: TRY004 - a bad file
    return state


# ---- insightface .bin ----

_BIN_DTYPES = (np.dtype(bool), np.dtype(np.uint8))


def _array_dtype(path: Path):
    def make(*args):
        dtype = np.dtype(*args)
        if dtype not in _BIN_DTYPES:
            raise _bin_refused(path, f"numpy.dtype({dtype})")
        return dtype
    return make


class _NdarrayToken:
    """What ``numpy.ndarray`` resolves to in a ``.bin``: a marker ``_reconstruct`` accepts, so the file can never call
    ``numpy.ndarray`` itself."""


def _array_reconstruct(path: Path):
    def make(subtype, *args):
        if subtype is not _NdarrayToken:
            raise _bin_refused(path, f"numpy array subclass {subtype!r}")
        return _reconstruct(np.ndarray, *args)
    return make


def _array_frombuffer(path: Path):
    # numpy 2 pickles arrays with protocol 5 as _frombuffer(bytes, dtype, shape, order)
    def make(buffer, dtype, shape, order):
        if np.dtype(dtype) not in _BIN_DTYPES:
            raise _bin_refused(path, f"numpy array of {dtype}")
        return _frombuffer(buffer, dtype, shape, order)
    return make


def _bool_scalar(path: Path):
    def make(dtype, *args):
        if dtype != np.dtype(bool):
            raise _bin_refused(path, f"numpy scalar of {dtype}")
        return _np_scalar(dtype, *args)
    return make


def _latin1_bytes(path: Path):
    # protocol <= 2 pickles of bytes written by Python 3 go through _codecs.encode(text, "latin1")
    def make(text, encoding="utf-8", *rest):
        if encoding.replace("-", "").lower() != "latin1" or rest:
            raise _bin_refused(path, f"_codecs.encode(..., {encoding!r})")
        return codecs.encode(text, "latin1")
    return make


class _BinUnpickler(pickle.Unpickler):
    """Admits only what insightface ``.bin`` files hold: bytes, lists, tuples, bools (pickle opcodes, no global),
    numpy uint8 / bool arrays and numpy bools; every other global is refused before it is looked up."""

    def __init__(self, fh: IO[bytes], path: Path) -> None:
        super().__init__(fh, encoding="bytes")
        self.path = path
        self.allowed = {
            ("numpy._core.multiarray", "_reconstruct"): _array_reconstruct(path),
            ("numpy.core.multiarray", "_reconstruct"): _array_reconstruct(path),
            ("numpy._core.numeric", "_frombuffer"): _array_frombuffer(path),
            ("numpy.core.numeric", "_frombuffer"): _array_frombuffer(path),
            ("numpy._core.multiarray", "scalar"): _bool_scalar(path),
            ("numpy.core.multiarray", "scalar"): _bool_scalar(path),
            ("numpy", "ndarray"): _NdarrayToken,
            ("numpy", "dtype"): _array_dtype(path),
            ("_codecs", "encode"): _latin1_bytes(path),
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise _bin_refused(self.path, f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _bin_refused(self.path, f"persistent id {pid!r}")


def load_bin_pickle(path: str | Path) -> Any:
    """The object pickled in an insightface ``.bin``, through :class:`_BinUnpickler`."""
    path = Path(path)
    with open(path, "rb") as fh:
        return _BinUnpickler(fh, path).load()


# ---- arrays ----

def load_array(path: str | Path, what: str = "a numpy array", **kwargs) -> Any:
    """``np.load(path, allow_pickle=False)`` (an ``.npz`` as a dict of its arrays): an object array or a pickle is
    refused with the file named."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False, **kwargs)
        if isinstance(data, np.lib.npyio.NpzFile):  # read every array now, so a refusal names this file
            with data:
                return {key: data[key] for key in data.files}
        return data
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise UnsafeFileError(f"{path}: refused as {what}: it holds pickled Python objects, not plain "
                                  f"numbers (loading it could run code); save it with np.save from a numeric "
                                  f"array") from None
        raise ValueError(f"{path}: not {what} ({err})") from None


# ---- the safetensors folder ----

def safetensors_folder(path: str | Path) -> Path | None:
    """The folder of a ``lafs export --safetensors`` model when ``path`` is one (or its ``model.safetensors``)."""
    path = Path(path)
    if path.is_dir() and (path / SAFETENSORS_FILE).is_file():
        return path
    if path.suffix == ".safetensors" and path.is_file():
        return path.parent
    return None


def read_safetensors_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, str], Path]:
    """(backbone state dict, config.yaml text, safetensors metadata, folder) of an exported folder.

    Safetensors is a JSON header and raw tensor bytes: reading it runs nothing. The config is YAML, parsed by the
    caller with :func:`lafs.config.load_config` (safe YAML).
    """
    folder = safetensors_folder(path)
    if folder is None:
        raise FileNotFoundError(f"{path}: not a safetensors model folder (needs {SAFETENSORS_FILE} and "
                                f"{CONFIG_FILE}; written by `lafs export CKPT --safetensors DIR`)")
    weights_file = Path(path) if Path(path).is_file() else folder / SAFETENSORS_FILE
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE} beside {weights_file.name}; the model cannot be rebuilt "
                                "without the run config")
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("safetensors models need the safetensors package: pip install safetensors") from None
    try:
        with safe_open(str(weights_file), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{weights_file}: not a safetensors file ({type(err).__name__}: {err})") from None
    return weights, config.read_text(), meta, folder
