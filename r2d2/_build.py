"""How ``r2d2._C`` is compiled: the flags, the CUDA toolkit, the sources. One place for both builds:

  ahead of time  ``setup.py`` (``pip install --no-build-isolation``, ``pip install -e``), which
                 loads this file by path, without importing the package (no torch needed there)
  on first use   :mod:`r2d2._jit` with ``torch.utils.cpp_extension.load``, against the torch
                 the user runs (``pip install .`` with build isolation has no torch to build with)

Everything here is a function of its arguments (the torch version, the environment) so that the
choices can be tested for torch versions that are not installed. No torch import at module level.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

# The oldest torch whose headers and op-registration API (TORCH_LIBRARY_FRAGMENT, register_fake in
# the Python layer) the sources use; pyproject's `torch>=` says the same.
MIN_TORCH = (2, 4)
# torch's headers refuse older standards from this version on (ATen.h: "#error C++20 or later
# compatible compiler is required to use ATen"); 2.13's ATen.h checks for C++17 only.
CXX20_FROM = (2, 14)

CUDA_HEADER = "cuda_runtime_api.h"
DEFAULT_CUDA_HOME = "/usr/local/cuda"  # the conventional root, torch's own last guess


def env_flag(name: str, env=None) -> bool:
    return (env if env is not None else os.environ).get(name, "0").lower() in (
        "1",
        "true",
        "yes",
        "on",
    )


def torch_version_tuple(version: str) -> tuple[int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13)``; ``"2.14.0.dev20260101"`` -> ``(2, 14)``."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(m.group(1)), int(m.group(2))


def cxx_std(torch_version: str) -> str:
    """The C++ standard to compile the torch-including sources with: C++20 where torch's headers
    require it (>= 2.14), else C++17, the standard these sources are tested with (2.13's headers
    accept both; older ones were built and tested by torch with 17)."""
    return "c++20" if torch_version_tuple(torch_version) >= CXX20_FROM else "c++17"


def cxx_flags(torch_version: str, debug: bool = False, cuda: bool = False) -> list[str]:
    """Host-compiler flags of the ``.cpp`` files for ``torch_version``. ValueError for a torch
    older than :data:`MIN_TORCH`, whose headers lack what the sources use."""
    if torch_version_tuple(torch_version) < MIN_TORCH:
        raise ValueError(
            f"r2d2._C needs torch >= {'.'.join(map(str, MIN_TORCH))}; this is torch {torch_version}"
        )
    flags = ["-O0", "-g"] if debug else ["-O3"]
    flags.append(f"-std={cxx_std(torch_version)}")
    if cuda:
        flags.append("-DR2D2_WITH_CUDA=1")
    return flags


def cuda_archs(raw: str | None = None) -> list[str]:
    """SM versions from R2D2_CUDA_ARCHS ("80;90" by default), dots dropped ("9.0" -> "90");
    ValueError for anything else."""
    raw = os.environ.get("R2D2_CUDA_ARCHS", "80;90") if raw is None else raw
    archs = [a.strip().replace(".", "") for a in raw.split(";") if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"\d+[a-z]?", a)]
    if bad:
        raise ValueError(
            f"r2d2: R2D2_CUDA_ARCHS={raw!r}: {bad} are not SM versions; expected a "
            'semicolon list such as "80;90" or "8.0;9.0a"'
        )
    return archs


def nvcc_flags(debug: bool, archs: list[str] | None = None) -> list[str]:
    """Our nvcc flags for the .cu files (torch's builder adds COMMON_NVCC_FLAGS, the
    -D__CUDA_NO_HALF_OPERATORS__ family, in front). csrc/check_nvcc.sh compiles with exactly
    these plus those, through ``python setup.py --print-nvcc-flags``. The .cu files include no
    torch header, so their standard does not follow torch's (C++17 works with every nvcc >= 11)."""
    archs = cuda_archs() if archs is None else archs
    gencode = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    if archs:
        # PTX of the newest arch too: SASS runs only on its own major version (sm_90 code does not
        # run on sm_100/sm_120), and without PTX to JIT every launch there fails with "no kernel
        # image is available". Arch-specific suffixes (90a) are dropped: their PTX does not JIT
        # forward.
        top = str(max(int(re.match(r"\d+", a).group()) for a in archs))
        gencode += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    opt = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]
    return (
        opt
        + ["-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-DR2D2_WITH_CUDA=1"]
        + gencode
    )


# ---- the CUDA toolkit ----


def _has_cuda_header(root) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", CUDA_HEADER))


def nvcc_toolkit_roots(nvcc: str, timeout: float = 60.0) -> list:
    """Toolkit roots that the nvcc at path ``nvcc`` belongs to, most direct first: the parent of
    the bin/ that its resolved path (symlinks followed) sits in, then the TOP that nvcc itself
    reports under ``--dryrun`` (nothing is compiled). A wrapper script that execs the toolkit's
    nvcc has no toolkit around it, but the real nvcc's dry run names its own folder."""
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        res = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        out = res.stdout or ""
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        m = re.match(r"#\$ (TOP|_HERE_)=(.+)$", line.strip())
        if m:
            path = m.group(2).strip().strip('"')
            roots.append(os.path.dirname(path) if m.group(1) == "_HERE_" else path)
    seen, uniq = set(), []
    for r in (os.path.realpath(os.path.normpath(r)) for r in roots if r):
        if r not in seen:
            seen.add(r)
            uniq.append(r)
    return uniq


def find_cuda_home(env, torch_guess, nvcc_on_path, default=DEFAULT_CUDA_HOME):
    """Where the CUDA toolkit to build with is: ``(root, None)``; ``(None, None)`` when there is
    no sign of a toolkit at all (no guess, no nvcc on PATH, no ``default``: build the CPU part);
    ``(None, message)``, a one-line reason to stop, when a toolkit is expected but none of the
    candidates has ``include/cuda_runtime_api.h``.

    env: the environment (CUDA_HOME / CUDA_PATH, used as given when set); torch_guess: torch's
    ``cpp_extension.CUDA_HOME``; nvcc_on_path: ``shutil.which("nvcc")`` or None."""
    fix = (
        "set CUDA_HOME to the CUDA toolkit's root (the folder with bin/nvcc and include/"
        f"{CUDA_HEADER}), or R2D2_FORCE_CPU=1 (CPU part only) / R2D2_SKIP_EXT=1 (no extension)"
    )
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            if _has_cuda_header(env[var]):
                return env[var], None
            return None, f"r2d2: {var}={env[var]} has no include/{CUDA_HEADER}; {fix}"
    candidates = [torch_guess] if torch_guess else []
    if nvcc_on_path:
        candidates += nvcc_toolkit_roots(nvcc_on_path)
    candidates.append(default)
    for root in candidates:
        if _has_cuda_header(root):
            return root, None
    if not torch_guess and not nvcc_on_path and not os.path.exists(default):
        return None, None
    looked = ", ".join(dict.fromkeys(os.path.normpath(c) for c in candidates))
    return None, (
        f"r2d2: torch has CUDA but no CUDA toolkit with include/{CUDA_HEADER} was found "
        f"(looked in {looked}); {fix}"
    )


def nvcc_major(cuda_home: str) -> int:
    """CUDA major version of ``cuda_home``'s nvcc; ValueError (one line) when it cannot be told,
    since building CUDA code with an nvcc of unknown version is how a mismatched build slips
    through."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    fix = (
        "point CUDA_HOME at a working toolkit, or set R2D2_FORCE_CPU=1 (CPU part only) / "
        "R2D2_SKIP_EXT=1 (no extension)"
    )
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True, stderr=subprocess.STDOUT)
    except (OSError, subprocess.CalledProcessError) as e:
        raise ValueError(f"r2d2: cannot run `{nvcc} --version` ({e}); {fix}") from None
    m = re.search(r"release (\d+)\.", out)
    if m is None:
        raise ValueError(
            f"r2d2: cannot read the CUDA version from `{nvcc} --version` (no "
            f"'release X.Y' in its output: {out.strip()[:200]!r}); {fix}"
        )
    return int(m.group(1))


# ---- the sources ----


def csrc_dir() -> Path | None:
    """The C++/CUDA sources: ``r2d2/csrc`` in an installed wheel (setup.py's build_py copies them
    there), else the checkout's ``csrc/`` next to the package (editable install, source tree)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "module.cpp").is_file():
            return cand
    return None


def split_sources(csrc: Path | str) -> tuple[list[str], list[str]]:
    """(CPU sources, CUDA-only sources): ``*_cuda.cpp`` and ``*.cu`` are the CUDA part."""
    csrc = Path(csrc)
    cpp = sorted(str(p) for p in csrc.rglob("*.cpp"))
    cpu = [s for s in cpp if not s.endswith("_cuda.cpp")]
    cuda = [s for s in cpp if s.endswith("_cuda.cpp")] + sorted(str(p) for p in csrc.rglob("*.cu"))
    return cpu, cuda


def sources_digest(csrc: Path | str) -> str:
    """Hash of every source and header (name and bytes): a changed source is a new cache key."""
    csrc = Path(csrc)
    h = hashlib.sha1()
    for p in sorted(csrc.rglob("*")):
        if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh"):
            h.update(str(p.relative_to(csrc)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def cache_key(
    torch_version: str,
    cuda_version: str | None,
    archs: list[str] | None,
    digest: str,
    python_tag: str | None = None,
    machine: str | None = None,
) -> str:
    """Folder name of one JIT build: everything the binary depends on. ``torch2.13.0+cpu`` and
    ``torch2.13.0+cu128`` differ, as do the CUDA version, the SM list, the Python ABI, the CPU
    architecture and the sources."""
    python_tag = python_tag or f"cp{sys.version_info[0]}{sys.version_info[1]}"
    machine = machine or platform.machine()
    dev = f"cu{cuda_version}-sm{'_'.join(archs or [])}" if cuda_version else "cpu"
    raw = f"torch{torch_version}-{dev}-{python_tag}-{machine}-{digest}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", raw)


def cache_root(env=None) -> Path:
    """``$R2D2_EXT_CACHE``, else ``$XDG_CACHE_HOME/r2d2/ext``, else ``~/.cache/r2d2/ext``."""
    env = os.environ if env is None else env
    if env.get("R2D2_EXT_CACHE"):
        return Path(env["R2D2_EXT_CACHE"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "r2d2" / "ext"
