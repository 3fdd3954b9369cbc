"""Building the native CPU kernels: g++ (any version with C++17), torch's headers and libraries, one
object per instruction-set variant (each compiled with only its own -m flags, so the portable one
runs on any x86-64 CPU), linked into one shared library that registers torch.ops.moeinfer_native.

`python -m moeinfer.kernels.native build` (run by `make install`) writes the library under
BUILD_DIR (gitignored) through a temporary file and a rename, so a failed build leaves nothing
half-written. The OPTIONAL variants (avx512, amx) are left out, with a warning, where the compiler
rejects their flags; the library then reports them not built (`native.why_not`). No Python headers
are needed (the ops register with TORCH_LIBRARY).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SRC_DIR = Path(__file__).resolve().parent / "csrc"
# the checkout's build/ (gitignored) for the editable install `make install` makes; overridable
BUILD_DIR = Path(os.environ.get("MOEINFER_NATIVE_BUILD_DIR", Path(__file__).resolve().parents[3] / "build" / "native"))
LIBRARY = "libmoeinfer_native.so"

# variant -> its source and the compiler flags it needs (the ops file is portable)
VARIANT_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "generic": ("kern_generic.cpp", ()),
    "avx2": ("kern_avx2.cpp", ("-mavx2", "-mfma", "-mf16c")),
    "avx512": ("kern_avx512.cpp", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma",
                                   "-mf16c")),
    "amx": ("kern_amx.cpp", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c",
                             "-mamx-tile", "-mamx-int8")),
}


# variants the library may leave out, each with the variants it needs: a compiler that rejects their
# flags (AMX needs GCC >= 11) must not cost the others (kern.h declares their tables weak)
OPTIONAL: dict[str, tuple[str, ...]] = {"avx512": (), "amx": ("avx512",)}


def library_path() -> Path:
    """Where the library is loaded from: $MOEINFER_NATIVE_LIB, else BUILD_DIR."""
    return Path(os.environ.get("MOEINFER_NATIVE_LIB", BUILD_DIR / LIBRARY))


def _digest(words: list[str], files: list[Path]) -> str:
    h = hashlib.sha256(torch.__version__.encode())
    for w in words:
        h.update(w.encode() + b"\0")
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _stamp() -> str:
    """What the library was built from: the sources' contents and torch's version."""
    return _digest([], sorted(SRC_DIR.iterdir()))


def is_current() -> bool:
    stamp = library_path().with_suffix(".stamp")
    return library_path().exists() and stamp.exists() and stamp.read_text().strip() == _stamp()


def build(*, verbose: bool = False, compiler: str | None = None) -> Path:
    """Compile and link the library into BUILD_DIR; returns its path. Raises RuntimeError with the
    compiler's message when a step fails."""
    from torch.utils.cpp_extension import include_paths

    cxx = compiler or os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set CXX)")
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    # -ffp-contract=off: scalar arithmetic rounds as written (no multiply-add fused at the compiler's
    # choice), so two instantiations of one kernel (fp32 or fp16 scales) give the same bits
    common = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-DNDEBUG", "-ffp-contract=off",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
              *[f"-isystem{p}" for p in include_paths()]]
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    objdir = BUILD_DIR / "obj"
    objdir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
        objects, left_out = [], []
        sources = [("ops.cpp", (), None), ("dense.cpp", (), None), ("moe_rows.cpp", (), None),
                   *((src, flags, v) for v, (src, flags) in VARIANT_SOURCES.items())]
        for src, flags, v in sources:
            if v in OPTIONAL and any(need in left_out for need in OPTIONAL[v]):
                warnings.warn(f"native variant {v!r} left out of the build: it needs {', '.join(OPTIONAL[v])}",
                              RuntimeWarning, stacklevel=2)
                left_out.append(v)
                continue
            # objects are cached by what they are built from (sources, flags, torch), so a rebuild
            # after editing one variant recompiles only that one
            key = _digest([*common, *flags, cxx], [SRC_DIR / src, *sorted(SRC_DIR.glob("*.h"))])
            obj = objdir / f"{Path(src).stem}-{key}.o"
            if not obj.exists():
                part = Path(tmp) / obj.name
                try:
                    _run([cxx, *common, *flags, "-c", str(SRC_DIR / src), "-o", str(part)], verbose)
                except RuntimeError as err:
                    if v not in OPTIONAL:
                        raise
                    warnings.warn(f"native variant {v!r} left out of the build (the others are built): {err}",
                                  RuntimeWarning, stacklevel=2)
                    left_out.append(v)
                    continue
                os.replace(part, obj)
            objects.append(str(obj))
        out = Path(tmp) / LIBRARY
        # libgomp from torch's own lib dir: the same OpenMP runtime (and thread pool) as torch's
        _run([cxx, "-shared", "-fopenmp", *objects, f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-ltorch_cpu",
              "-lc10", "-o", str(out)], verbose)
        target = BUILD_DIR / LIBRARY
        os.replace(out, target)
        stamp = Path(tmp) / "stamp"
        stamp.write_text(_stamp() + "\n")
        os.replace(stamp, target.with_suffix(".stamp"))
    return target


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"native kernel build failed ({' '.join(cmd[:2])} ... exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
