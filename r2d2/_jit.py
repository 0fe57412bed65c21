"""``r2d2._C`` compiled on first use, against the torch this process runs, and cached.

An install without a prebuilt extension (``pip install .`` or ``pip wheel .`` with pip's build
isolation, which has no torch to build with; an extension left broken by a torch upgrade) still
gets one: the first import of ``r2d2._C`` compiles the shipped sources (``r2d2/csrc/``, or the
checkout's ``csrc/``) with ``torch.utils.cpp_extension.load`` into

    $R2D2_EXT_CACHE/<key>/_C.so      (default ~/.cache/r2d2/ext, or $XDG_CACHE_HOME/r2d2/ext)

where ``<key>`` names everything the binary depends on (torch version and build, CUDA version and
SM list, Python ABI, CPU architecture, a hash of the sources; :func:`r2d2._build.cache_key`). A
later process, or another torch, finds its own build there without compiling.

Automatic, with a message: the build prints one line when it starts (where, for which torch,
about how long: ~3 minutes for the CPU part on 2 cores) and one when it is done, on stderr.
``R2D2_NO_JIT=1`` turns it off (a test suite or a job that must not compile: ops fall back to
Triton/eager, and ``r2d2 doctor --build`` builds it ahead). Processes that start together (the
ranks of a ``torchrun`` job) share one build: a file lock per key, the others wait and say so.
When it cannot build (no C++ compiler, no ninja, no sources, a compile error) it says so in one
line, the ops fall back, and a failed compile is not retried by every later process: the folder
keeps ``failed`` with the log until ``r2d2 doctor --build`` retries it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from r2d2 import _build

_LOCK = threading.Lock()
_FAILED: dict[str, str] = {}  # key -> why, once per process
_OFF: list[str] = []  # why the automatic build is off in this process (see suspend)


def suspend(why: str) -> None:
    """Turn the automatic build off in this process (``r2d2 doctor`` reports, it does not compile);
    a cached build still loads."""
    _OFF.append(why)


def auto_off() -> str | None:
    """Why the first-use build will not run by itself, or None when it will."""
    if _build.env_flag("R2D2_NO_JIT"):
        return "R2D2_NO_JIT=1"
    return _OFF[-1] if _OFF else None


class JitError(ImportError):
    """The first-use build is off or failed; the message is one line saying why and what to do."""


def _say(msg: str) -> None:
    print(f"r2d2: {msg}", file=sys.stderr, flush=True)


def plan() -> dict:
    """What a build for this process's torch would be: sources, flags, whether CUDA, the cache
    folder. JitError when there is nothing to build from."""
    import torch
    from torch.utils import cpp_extension as ce

    csrc = _build.csrc_dir()
    if csrc is None:
        raise JitError(
            "r2d2._C: the C++ sources are not in this install (no r2d2/csrc/); "
            "reinstall r2d2-engine from its sdist or a checkout"
        )
    debug = _build.env_flag("DEBUG")
    cpu_sources, cuda_sources = _build.split_sources(csrc)
    cuda, note = False, None
    if torch.version.cuda is not None and not _build.env_flag("R2D2_FORCE_CPU"):
        home, why = _build.find_cuda_home(os.environ, ce.CUDA_HOME, shutil.which("nvcc"))
        if home is None:
            note = why or "no CUDA toolkit (nvcc) found"
        else:
            try:
                major = _build.nvcc_major(home)
            except ValueError as e:
                major, note = None, str(e)
            if major is not None and str(major) != torch.version.cuda.split(".")[0]:
                note = f"nvcc in {home} is CUDA {major}.x, torch has CUDA {torch.version.cuda}"
            elif major is not None:
                cuda = True
                ce.CUDA_HOME = home  # torch's builder reads the module global
                os.environ.setdefault("CUDA_HOME", home)
    archs = _build.cuda_archs() if cuda else None
    key = _build.cache_key(
        torch.__version__, torch.version.cuda if cuda else None, archs, _build.sources_digest(csrc)
    ) + ("-debug" if debug else "")
    return {
        "key": key,
        "dir": _build.cache_root() / key,
        "csrc": csrc,
        "sources": cpu_sources + (cuda_sources if cuda else []),
        "cuda": cuda,
        "cuda_note": note,  # why a CUDA torch gets the CPU part only
        "cxx": _build.cxx_flags(torch.__version__, debug, cuda=cuda),
        "nvcc": _build.nvcc_flags(debug, archs) if cuda else [],
        "what": f"torch {torch.__version__}, "
        + (f"CPU+CUDA sm {';'.join(archs)}" if cuda else "CPU part"),
    }


def _import(path: Path):
    spec = importlib.util.spec_from_file_location("r2d2._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cached(p: dict) -> Path | None:
    so = p["dir"] / "_C.so"
    return so if (p["dir"] / "ok").is_file() and so.is_file() else None


def _preflight() -> None:
    from torch.utils import cpp_extension as ce

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise JitError(
            f"cannot compile r2d2._C: no C++ compiler ({cxx!r} is not on PATH; "
            "install g++ or set CXX)"
        )
    if not ce.is_ninja_available():
        raise JitError("cannot compile r2d2._C: ninja is not installed (pip install ninja)")


def load(build: bool | None = None, force: bool = False):
    """The ``r2d2._C`` module for this torch: the cached build, else compiled now (when ``build``,
    default: unless ``R2D2_NO_JIT=1``). ``force`` retries a build that failed before. Raises
    :class:`JitError` (an ImportError) with one line when there is none."""
    off = auto_off() if build is None else None
    build = off is None if build is None else build
    with _LOCK:
        p = plan()
        so = cached(p)
        if so is not None:
            return _import(so)
        if not build:
            raise JitError(
                f"r2d2._C is not built for {p['what']} and the first-use build is "
                f"off ({off or 'build=False'}); `r2d2 doctor --build` builds it"
            )
        if p["key"] in _FAILED and not force:
            raise JitError(_FAILED[p["key"]])
        try:
            return _build_locked(p, force)
        except JitError as e:
            _FAILED[p["key"]] = str(e)
            raise


def _build_locked(p: dict, force: bool):
    from filelock import FileLock, Timeout

    d: Path = p["dir"]
    log, failed = d / "build.log", d / "failed"
    if failed.is_file() and not force:
        raise JitError(
            f"an earlier build of r2d2._C for {p['what']} failed (log: {log}); "
            "`r2d2 doctor --build` retries it"
        )
    _preflight()
    d.mkdir(parents=True, exist_ok=True)
    # Not d/"lock": torch's builder keeps its own lock file of that name in the build folder.
    lock = FileLock(str(d.parent / f"{d.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"waiting for another process that is compiling r2d2._C in {d}")
        lock.acquire()
    try:
        so = cached(p)
        if so is not None:  # the other process finished it
            return _import(so)
        from torch.utils import cpp_extension as ce

        _say(
            f"compiling r2d2._C for {p['what']} into {d} (once per torch version; ~3 min for "
            "the CPU part on 2 cores; R2D2_NO_JIT=1 skips it and ops fall back to Triton/eager)"
        )
        if p["cuda_note"]:
            _say(f"CPU part only: {p['cuda_note']}")
        failed.unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            # is_python_module=False: torch loads the library (its op registrations); the module
            # object is made below under its real name, r2d2._C, as a cached build is
            ce.load(
                name="_C",
                sources=p["sources"],
                extra_cflags=p["cxx"],
                extra_cuda_cflags=p["nvcc"] or None,
                extra_include_paths=[str(p["csrc"])],
                build_directory=str(d),
                with_cuda=p["cuda"],
                is_python_module=False,
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - compile or link error: ninja's output is in the message
            log.write_text(f"{type(e).__name__}: {e}\n")
            failed.write_text(str(log) + "\n")
            raise JitError(
                f"compiling r2d2._C for {p['what']} failed (log: {log}); ops fall "
                "back to Triton/eager; `r2d2 doctor --build` retries"
            ) from None
        (d / "ok").write_text(
            f"{p['what']}\ncxx: {' '.join(p['cxx'])}\nnvcc: {' '.join(p['nvcc'])}\n"
        )
        _say(f"r2d2._C built in {time.perf_counter() - t0:.0f} s: {d / '_C.so'}")
        return _import(d / "_C.so")
    finally:
        lock.release()


def prebuilt_extension() -> Path | None:
    """The ahead-of-time build next to this file (``r2d2/_C<suffix>``), if there is one."""
    from importlib.machinery import EXTENSION_SUFFIXES

    here = Path(__file__).resolve().parent
    for suffix in EXTENSION_SUFFIXES:
        if (here / f"_C{suffix}").is_file():
            return here / f"_C{suffix}"
    return None
