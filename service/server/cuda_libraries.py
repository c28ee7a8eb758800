"""The shared libraries ONNX Runtime's CUDA provider needs, where they are, and loading them.

``onnxruntime-gpu`` 1.31 links its CUDA provider against ``libcudart.so.13``, ``libcublas.so.13``,
``libcublasLt.so.13``, ``libcurand.so.10`` and the driver's ``libcuda.so.1``, and opens cuDNN 9
(``libcudnn.so.9``) lazily; it has no search path of its own. When one is missing it logs a
multi-line error and creates a CPU session without raising. This module finds each library the
way the dynamic loader will (the NVIDIA pip wheels' ``site-packages/nvidia/*/lib`` directories,
then the loader's own path), loads what it finds, and names what it cannot, so the reason for a
CPU fallback is one line that says which file to install.

Loading a library here is the same as ``onnxruntime.preload_dlls()`` does: once a library with a
given soname is in the process, the loader resolves the provider's dependency on it by that
name. Unlike ``preload_dlls`` it searches every ``site-packages`` on ``sys.path``, so wheels in a
base environment seen through a ``--system-site-packages`` venv count too.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import site
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

#: The CUDA major version onnxruntime-gpu 1.31 is built for; read from the installed build when
#: it says (``onnxruntime.capi.build_and_package_info.cuda_version``).
DEFAULT_CUDA_MAJOR = "13"
DRIVER_LIBRARY = "libcuda.so.1"
GPU_EXTRA_HINT = "pip install 'seqserve[gpu]'"


@dataclass(frozen=True)
class CudaLibrary:
    soname: str
    purpose: str
    source: str  # where it comes from: a pip wheel, or the NVIDIA driver
    required: bool = True


@dataclass(frozen=True)
class LibraryStatus:
    library: CudaLibrary
    path: str = ""  # the file that was loaded; "" when not loaded
    found_in: str = ""  # "pip wheel", "loader path"
    error: str = ""  # why a file that exists did not load

    @property
    def loaded(self) -> bool:
        return bool(self.path)

    def describe(self) -> str:
        if self.loaded:
            return f"{self.library.soname}: {self.path} ({self.found_in})"
        if self.error:
            return f"{self.library.soname}: found but did not load ({self.error})"
        return f"{self.library.soname}: not found (from {self.library.source})"


@dataclass(frozen=True)
class DriverStatus:
    """What the driver API says, when ``libcuda.so.1`` loaded."""

    version: int = 0  # cuDriverGetVersion: 13000 for CUDA 13.0; 0 when unknown
    devices: int = 0
    error: str = ""  # cuInit/cuDeviceGetCount failure, e.g. "CUDA_ERROR_NO_DEVICE (100)"

    @property
    def cuda_version(self) -> str:
        return f"{self.version // 1000}.{self.version % 1000 // 10}" if self.version else ""


@dataclass(frozen=True)
class CudaLibraryReport:
    cuda_major: str
    statuses: list[LibraryStatus]
    driver: DriverStatus = field(default_factory=DriverStatus)
    search_dirs: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[LibraryStatus]:
        return [s for s in self.statuses if s.library.required and not s.loaded]

    @property
    def driver_missing(self) -> bool:
        return any(s.library.soname == DRIVER_LIBRARY for s in self.missing)

    @property
    def usable(self) -> bool:
        """Every required library loaded and the driver sees a GPU it can run CUDA on."""
        return not self.missing and not self.driver_problem()

    def driver_problem(self) -> str:
        """One line when the driver loaded but cannot run this build's CUDA; else ""."""
        if self.driver_missing:
            return ""
        if self.driver.error:
            return f"the NVIDIA driver reports {self.driver.error}"
        if self.driver.version and self.driver.version // 1000 < int(self.cuda_major):
            return (f"the NVIDIA driver supports CUDA {self.driver.cuda_version}, but this "
                    f"onnxruntime-gpu needs CUDA {self.cuda_major}: upgrade the driver")
        return ""

    def reason(self) -> str:
        """Why CUDA cannot start, in one line naming the missing files; "" when nothing is."""
        missing = self.missing
        if self.driver_missing:
            others = ", ".join(s.library.soname for s in missing
                               if s.library.soname != DRIVER_LIBRARY)
            return (f"no NVIDIA driver: {DRIVER_LIBRARY} not found (no GPU on this machine, or "
                    "the container was started without the NVIDIA runtime)"
                    + (f"; also missing: {others}" if others else ""))
        if missing:
            names = ", ".join(s.library.soname for s in missing)
            sources = sorted({s.library.source for s in missing})
            return (f"missing CUDA libraries: {names} (from {'; '.join(sources)}; "
                    f"{GPU_EXTRA_HINT} brings them)")
        return self.driver_problem()


def build_cuda_major() -> str:
    """The CUDA major version the installed onnxruntime was built for (CPU builds: the default)."""
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version  # type: ignore
    except ImportError:
        return DEFAULT_CUDA_MAJOR
    return str(cuda_version).split(".")[0] if cuda_version else DEFAULT_CUDA_MAJOR


def required_libraries(cuda_major: str) -> list[CudaLibrary]:
    """In load order: cuBLAS needs cuBLASLt loaded first."""
    wheel = "" if int(cuda_major) >= 13 else f"-cu{cuda_major}"  # CUDA 13 dropped the suffix
    return [
        CudaLibrary(DRIVER_LIBRARY, "NVIDIA driver (CUDA driver API)",
                    "the NVIDIA driver, not pip"),
        CudaLibrary(f"libcudart.so.{cuda_major}", "CUDA runtime",
                    f"pip nvidia-cuda-runtime{wheel}"),
        CudaLibrary(f"libcublasLt.so.{cuda_major}", "cuBLASLt (MatMul/Gemm)",
                    f"pip nvidia-cublas{wheel}"),
        CudaLibrary(f"libcublas.so.{cuda_major}", "cuBLAS (MatMul/Gemm)",
                    f"pip nvidia-cublas{wheel}"),
        CudaLibrary("libcurand.so.10", "cuRAND", f"pip nvidia-curand{wheel}"),
        CudaLibrary("libcudnn.so.9", "cuDNN 9 (LSTM, reductions; opened lazily)",
                    f"pip nvidia-cudnn-cu{cuda_major}"),
        CudaLibrary(f"libnvrtc.so.{cuda_major}", "NVRTC (cuDNN's runtime-compiled engines)",
                    f"pip nvidia-cuda-nvrtc{wheel}", required=False),
    ]


def nvidia_wheel_dirs(paths: Iterable[str] | None = None) -> list[Path]:
    """``nvidia/*/lib`` under every site-packages directory (and every ``sys.path`` entry)."""
    if paths is None:
        paths = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    found: list[Path] = []
    for entry in paths:
        root = Path(entry) / "nvidia"
        if not root.is_dir():
            continue
        for lib in sorted(root.glob("*/lib")):
            if lib.is_dir() and lib not in found:
                found.append(lib)
    return found


Loader = Callable[[str], object]


def _loaded_path(soname: str) -> str:
    """The file the loader mapped for ``soname`` (read from /proc/self/maps); "" if unknown."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
            if path.startswith("/") and Path(path).name.startswith(soname):
                return path
    return ""


def locate(library: CudaLibrary, dirs: list[Path], load: Loader = ctypes.CDLL) -> LibraryStatus:
    """Load ``library`` from the first wheel directory holding it, else by soname."""
    error = ""
    for directory in dirs:
        candidate = directory / library.soname
        if candidate.is_file():
            try:
                load(str(candidate))
            except OSError as exc:
                error = str(exc).splitlines()[0]
                continue
            return LibraryStatus(library, str(candidate), "pip wheel")
    try:
        load(library.soname)
    except OSError as exc:
        message = str(exc).splitlines()[0]
        # "cannot open shared object file" is plain absence; anything else is worth showing.
        if not error and "cannot open shared object file" not in message:
            error = message
        return LibraryStatus(library, error=error)
    return LibraryStatus(library, _loaded_path(library.soname) or library.soname, "loader path")


_CUDA_ERROR_NAMES = {100: "CUDA_ERROR_NO_DEVICE", 35: "CUDA_ERROR_INSUFFICIENT_DRIVER",
                     3: "CUDA_ERROR_NOT_INITIALIZED", 999: "CUDA_ERROR_UNKNOWN",
                     304: "CUDA_ERROR_OPERATING_SYSTEM", 803: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
                     804: "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE"}


def query_driver(load: Loader = ctypes.CDLL) -> DriverStatus:
    """cuInit, cuDriverGetVersion, cuDeviceGetCount through the driver API (no CUDA runtime)."""
    try:
        driver = load(DRIVER_LIBRARY)
    except OSError:
        return DriverStatus(error=f"{DRIVER_LIBRARY} not found")
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    try:
        driver.cuDriverGetVersion(ctypes.byref(version))  # type: ignore[attr-defined]
        status = driver.cuInit(0)  # type: ignore[attr-defined]
        if status == 0:
            status = driver.cuDeviceGetCount(ctypes.byref(count))  # type: ignore[attr-defined]
    except AttributeError as exc:  # not a real driver library
        return DriverStatus(error=f"{DRIVER_LIBRARY} has no driver API ({exc})")
    if status != 0:
        name = _CUDA_ERROR_NAMES.get(int(status), "CUresult")
        return DriverStatus(version.value, 0, f"{name} ({int(status)}) from cuInit")
    if count.value == 0:
        return DriverStatus(version.value, 0, "no CUDA device visible")
    return DriverStatus(version.value, count.value)


def probe(cuda_major: str | None = None, dirs: list[Path] | None = None,
          load: Loader = ctypes.CDLL) -> CudaLibraryReport:
    """Find and load every library CUDA needs, and ask the driver what it sees."""
    major = cuda_major or build_cuda_major()
    search = nvidia_wheel_dirs() if dirs is None else dirs
    statuses = [locate(library, search, load) for library in required_libraries(major)]
    driver_loaded = any(s.loaded for s in statuses if s.library.soname == DRIVER_LIBRARY)
    driver = query_driver(load) if driver_loaded else DriverStatus()
    return CudaLibraryReport(major, statuses, driver, [str(d) for d in search])


_preload_lock = threading.Lock()
_preloaded = False


def preload_onnxruntime_libraries() -> str:
    """``onnxruntime.preload_dlls()`` once per process (absent on CPU builds and before 1.21).

    It prints its failures on stdout, which would corrupt ``--json`` output and the server's
    ready line: capture them and return them (also logged at debug).
    """
    global _preloaded
    with _preload_lock:
        preload = getattr(ort, "preload_dlls", None)
        if _preloaded or preload is None:
            return ""
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                preload()
        except Exception as exc:  # a bad install must not stop a CPU fallback
            captured.write(f"preload_dlls failed: {type(exc).__name__}: {exc}\n")
        _preloaded = True
    text = captured.getvalue().strip()
    if text:
        log.debug("onnxruntime.preload_dlls: %s", text.replace("\n", " | "))
    return text
