"""Build of the optional extension ``r2d2._C``.

The CPU part (C++ reference kernels + the op schemas) is always built. The CUDA part
(``csrc/**/*.cu`` plain launchers and their ``*_cuda.cpp`` bindings) is built only when the
installed torch has CUDA *and* a matching nvcc is found, because a CPU torch ships no CUDA
runtime to link against.

Environment switches:
  R2D2_SKIP_EXT=1      pure-Python install; every op falls back to Triton/eager
  R2D2_CUDA_ARCHS      semicolon list of SM versions for the CUDA part (default "80;90"); the
                       newest also gets PTX, which newer GPUs JIT-compile
  R2D2_FORCE_CPU=1     build only the CPU part even when torch has CUDA
  MAX_JOBS             parallel compile jobs (read by torch's ninja builder)
  DEBUG=1              -O0 -g builds

The CUDA toolkit is CUDA_HOME / CUDA_PATH when set; otherwise torch's guess when it has the CUDA
headers, else where the nvcc on PATH really lives (it may be a wrapper script that execs the
toolkit's nvcc), else /usr/local/cuda; see find_cuda_home. When none has the headers the build
stops with one line saying so.

``python setup.py --print-nvcc-flags`` prints the nvcc flags of the build (csrc/check_nvcc.sh
compiles with them).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


CUDA_HEADER = "cuda_runtime_api.h"
DEFAULT_CUDA_HOME = "/usr/local/cuda"  # the conventional root, torch's own last guess


def _has_cuda_header(root) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", CUDA_HEADER))


def nvcc_toolkit_roots(nvcc: str, timeout: float = 60.0) -> list:
    """Toolkit roots that the nvcc at path ``nvcc`` belongs to, most direct first: the parent of
    the bin/ that its resolved path (symlinks followed) sits in, then the TOP that nvcc itself
    reports under ``--dryrun`` (nothing is compiled). A wrapper script that execs the toolkit's
    nvcc has no toolkit around it, but the real nvcc's dry run names its own folder."""
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        res = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                             stdin=subprocess.DEVNULL)
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
    fix = ("set CUDA_HOME to the CUDA toolkit's root (the folder with bin/nvcc and include/"
           f"{CUDA_HEADER}), or R2D2_FORCE_CPU=1 (CPU part only) / R2D2_SKIP_EXT=1 (no extension)")
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
    return None, (f"r2d2: torch has CUDA but no CUDA toolkit with include/{CUDA_HEADER} was found "
                  f"(looked in {looked}); {fix}")


def _nvcc_major(cuda_home: str) -> int:
    """CUDA major version of ``cuda_home``'s nvcc; stops the build when it cannot be told, since
    building CUDA code with an nvcc of unknown version is how a mismatched build slips through."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    fix = ("point CUDA_HOME at a working toolkit, or set R2D2_FORCE_CPU=1 (CPU part only) / "
           "R2D2_SKIP_EXT=1 (no extension)")
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True, stderr=subprocess.STDOUT)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"r2d2: cannot run `{nvcc} --version` ({e}); {fix}")
    m = re.search(r"release (\d+)\.", out)
    if m is None:
        sys.exit(f"r2d2: cannot read the CUDA version from `{nvcc} --version` (no 'release X.Y' "
                 f"in its output: {out.strip()[:200]!r}); {fix}")
    return int(m.group(1))


def cuda_archs() -> list[str]:
    """SM versions from R2D2_CUDA_ARCHS ("80;90" by default), dots dropped ("9.0" -> "90")."""
    raw = os.environ.get("R2D2_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.split(";") if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"\d+[a-z]?", a)]
    if bad:
        sys.exit(f"r2d2: R2D2_CUDA_ARCHS={raw!r}: {bad} are not SM versions; expected a "
                 "semicolon list such as \"80;90\" or \"8.0;9.0a\"")
    return archs


def nvcc_flags(debug: bool) -> list[str]:
    """Our nvcc flags for the .cu files (torch's BuildExtension adds COMMON_NVCC_FLAGS, the
    -D__CUDA_NO_HALF_OPERATORS__ family, in front). csrc/check_nvcc.sh compiles with exactly
    these plus those, through ``python setup.py --print-nvcc-flags``."""
    archs = cuda_archs()
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
    return opt + ["-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
                  "-DR2D2_WITH_CUDA=1"] + gencode


def _print_nvcc_flags() -> None:
    """One flag per line: what the real build passes nvcc for a .cu file (bar -I and -fPIC)."""
    from torch.utils import cpp_extension as ce

    for flag in ce.COMMON_NVCC_FLAGS + nvcc_flags(_env_flag("DEBUG")):
        print(flag)


def _ext_modules():
    if _env_flag("R2D2_SKIP_EXT"):
        print("r2d2: R2D2_SKIP_EXT=1, installing without r2d2._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        sys.exit(
            "r2d2: torch must be installed before r2d2-engine (pip install torch, then "
            "pip install --no-build-isolation -e .), or set R2D2_SKIP_EXT=1"
        )

    debug = _env_flag("DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++17"]
    all_cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cpu_sources = [s for s in all_cpp if not s.endswith("_cuda.cpp")]
    cuda_sources = [s for s in all_cpp if s.endswith("_cuda.cpp")]
    cuda_sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))

    want_cuda = torch.version.cuda is not None and not _env_flag("R2D2_FORCE_CPU")
    if want_cuda:
        home, why = find_cuda_home(os.environ, ce.CUDA_HOME, shutil.which("nvcc"))
        if why:
            sys.exit(why)
        if home is None:
            print("r2d2: torch has CUDA but no CUDA toolkit (nvcc) was found; "
                  "building the CPU part only", file=sys.stderr)
            want_cuda = False
        else:
            if home != ce.CUDA_HOME:
                print(f"r2d2: using the CUDA toolkit in {home} (torch guessed {ce.CUDA_HOME}, "
                      f"which has no include/{CUDA_HEADER})", file=sys.stderr)
                # torch's builder reads the module global (nvcc, include and library paths);
                # the environment carries it to ninja's subprocesses.
                ce.CUDA_HOME = home
                os.environ["CUDA_HOME"] = home
            major = _nvcc_major(ce.CUDA_HOME)
            torch_major = int(torch.version.cuda.split(".")[0])
            if major != torch_major:
                sys.exit(
                    f"r2d2: nvcc in {ce.CUDA_HOME} is CUDA {major}.x but torch was built with "
                    f"CUDA {torch.version.cuda}; install a matching toolkit, point CUDA_HOME at "
                    "one, or set R2D2_FORCE_CPU=1 / R2D2_SKIP_EXT=1"
                )

    include_dirs = [os.path.join(HERE, "csrc")]
    if want_cuda:
        nvcc = nvcc_flags(debug)
        ext = ce.CUDAExtension(
            "r2d2._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DR2D2_WITH_CUDA=1"], "nvcc": nvcc},
        )
        print(f"r2d2: building r2d2._C with CUDA for sm {';'.join(cuda_archs())}",
              file=sys.stderr)
    else:
        ext = ce.CppExtension(
            "r2d2._C", cpu_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}
        )
        print("r2d2: building r2d2._C (CPU part only)", file=sys.stderr)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


# setuptools' build backend runs this file as __main__; tests load it under another name to call
# the functions above without building.
if __name__ == "__main__":
    if sys.argv[1:] == ["--print-nvcc-flags"]:
        _print_nvcc_flags()
        sys.exit(0)
    ext_modules, cmdclass = _ext_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
