"""Which TensorRT this process has: data-center `tensorrt` or `tensorrt_rtx` (TensorRT for RTX), and what it can
target.

Both share the Python API family. TensorRT-RTX builds ahead of time for chosen compute capabilities (SM75 and
newer consumer/workstation parts, not Hopper SM90) and every network is strongly typed; data-center TensorRT
builds for the GPU it runs on.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from compiler.errors import MoecError

FLAVOURS = ("tensorrt", "tensorrt_rtx")


class TensorRTUnavailableError(MoecError):
    """Neither `tensorrt` nor `tensorrt_rtx` can be imported."""


class TensorRTBuildError(MoecError):
    """TensorRT could not parse or build a graph (names the op and the pass that produced it where known)."""


class TargetError(MoecError):
    """A requested target (compute capability) is not one the installed TensorRT can build for."""


class EngineRunError(MoecError):
    """Engines cannot run on this machine (no GPU, or a TensorRT that does not support its GPU)."""


@lru_cache(maxsize=None)
def import_tensorrt() -> ModuleType:
    """The first importable of `tensorrt_rtx`, `tensorrt` (RTX first: it is the one that installs from PyPI on any
    machine; set MOEC_TENSORRT=tensorrt or tensorrt_rtx to choose)."""
    preferred = os.environ.get("MOEC_TENSORRT")
    order = (preferred,) if preferred else ("tensorrt_rtx", "tensorrt")
    errors = []
    for name in order:
        if name not in FLAVOURS:
            raise TensorRTUnavailableError(f"MOEC_TENSORRT={name!r}; choose one of {', '.join(FLAVOURS)}")
        try:
            return importlib.import_module(name)
        except ImportError as error:
            errors.append(f"{name}: {error}")
    raise TensorRTUnavailableError(
        "no TensorRT is importable (" + "; ".join(errors) + "); install one, e.g. `pip install tensorrt-rtx-cu13`"
    )


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except TensorRTUnavailableError:
        return False
    return True


@dataclass(frozen=True)
class TensorRTInfo:
    flavour: str  # "tensorrt" or "tensorrt_rtx"
    version: str
    targets: tuple[str, ...]  # e.g. ("sm75", "sm80", ...); empty for data-center TensorRT (builds for its own GPU)

    def as_dict(self) -> dict[str, object]:
        return {"flavour": self.flavour, "version": self.version, "targets": list(self.targets)}


def tensorrt_info() -> TensorRTInfo:
    trt = import_tensorrt()
    flavour = trt.__name__
    targets: tuple[str, ...] = ()
    if hasattr(trt, "ComputeCapability"):
        targets = tuple(name.lower() for name in trt.ComputeCapability.__members__ if name.startswith("SM"))
    return TensorRTInfo(flavour, trt.__version__, targets)


def parse_targets(text: str | None) -> tuple[str, ...]:
    """`"sm89,sm120"` → ("sm89", "sm120"), checked against what the installed TensorRT can build for."""
    if not text:
        return ()
    info = tensorrt_info()
    targets = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    for target in targets:
        if not target.startswith("sm") or not target[2:].isdigit():
            raise TargetError(f"target {target!r} is not a compute capability like sm89")
        if not info.targets:
            raise TargetError(
                f"--target {target}: {info.flavour} {info.version} builds only for the GPU it runs on; omit --target"
            )
        if target not in info.targets:
            raise TargetError(
                f"target {target} is not supported by {info.flavour} {info.version} "
                f"(it builds for {', '.join(info.targets)})"
            )
    return targets


_DTYPE_NAMES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32", "BOOL": "bool"
}


def eval_dim(dim: int | str, batch: int, seq: int) -> int:
    """A dim as config.json writes it (an int, or an expression of `batch` and `seq` such as "batch*seq")."""
    if isinstance(dim, int):
        return dim
    if not set(dim) <= set("batchseq*+-/() 0123456789"):
        raise ValueError(f"dim {dim!r} is not an expression of batch and seq")
    return int(eval(dim, {"__builtins__": {}}, {"batch": batch, "seq": seq}))


def dtype_name(data_type: object) -> str:
    """A TensorRT DataType as moec/torch spell it (`float16`, not `HALF`)."""
    name = getattr(data_type, "name", str(data_type).rsplit(".", 1)[-1])
    return _DTYPE_NAMES.get(name, name.lower())


def plugin_library_dir() -> Path | None:
    """A directory holding `libtensorrt_rtx.so` → this interpreter's `libtensorrt_rtx.so.1`, or None when not needed.

    TensorRT-RTX's ONNX parser finds the plugin registry by dlopen-ing the unversioned `libtensorrt_rtx.so`, which the
    wheel does not ship; without it every plugin node fails to parse. The link lives in moec's cache (the wheel's
    directory is left untouched) and must be on LD_LIBRARY_PATH when the building process starts, so builds that
    parse plugins run in a child process (see `build.py`).
    """
    trt = import_tensorrt()
    if trt.__name__ != "tensorrt_rtx":
        return None
    import tensorrt_rtx_libs

    library = (Path(tensorrt_rtx_libs.__file__).parent / "libtensorrt_rtx.so.1").resolve()
    if not library.is_file():
        raise TensorRTUnavailableError(f"tensorrt_rtx {trt.__version__} is installed without its library {library}")
    return link_library(library, f"tensorrt_rtx-{trt.__version__}")


def link_library(library: Path, prefix: str) -> Path:
    """The cache directory whose `libtensorrt_rtx.so` is a symlink to `library` (a resolved path), made or mended.

    The directory is keyed by the library's path, not only by the TensorRT version: two environments with the same
    version have two different library files, and a build process that dlopens another environment's copy beside
    its own holds two TensorRT runtimes and crashes (glibc: "malloc_consolidate(): invalid chunk size"). The link is
    re-read on every use, so a link that names anything else (another file, or nothing: its environment was deleted
    and reinstalled elsewhere) is replaced atomically, never followed.
    """
    digest = hashlib.sha256(str(library).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moec" / f"{prefix}-{digest}"
    link = cache / "libtensorrt_rtx.so"
    try:
        if os.readlink(link) == str(library):
            return cache
    except OSError:  # no link yet, or a regular file in its place
        pass
    cache.mkdir(parents=True, exist_ok=True)
    # A private name per process and thread, then an atomic rename: concurrent builds never see a half-made link.
    temporary = cache / f".libtensorrt_rtx.so.{os.getpid()}.{threading.get_ident()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(library)
    temporary.replace(link)
    return cache


def plugin_environment() -> dict[str, str]:
    """os.environ plus the LD_LIBRARY_PATH entry `plugin_library_dir` needs."""
    environment = dict(os.environ)
    directory = plugin_library_dir()
    if directory is not None:
        existing = environment.get("LD_LIBRARY_PATH", "")
        if str(directory) not in existing.split(os.pathsep):
            environment["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(directory), existing]))
    return environment
