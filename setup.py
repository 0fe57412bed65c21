"""Build of the optional extension ``r2d2._C``.

The CPU part (C++ reference kernels + the op schemas) is always built. The CUDA part
(``csrc/**/*.cu`` plain launchers and their ``*_cuda.cpp`` bindings) is built only when the
installed torch has CUDA *and* a matching nvcc is found, because a CPU torch ships no CUDA
runtime to link against.

Environment switches:
  R2D2_SKIP_EXT=1      pure-Python install; every op falls back to Triton/eager
  R2D2_CUDA_ARCHS      semicolon list of SM versions for the CUDA part (default "80;90")
  R2D2_FORCE_CPU=1     build only the CPU part even when torch has CUDA
  MAX_JOBS             parallel compile jobs (read by torch's ninja builder)
  DEBUG=1              -O0 -g builds
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvcc_major(cuda_home: str) -> int | None:
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


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
        if ce.CUDA_HOME is None:
            print("r2d2: torch has CUDA but no CUDA toolkit (nvcc) was found; "
                  "building the CPU part only", file=sys.stderr)
            want_cuda = False
        else:
            major = _nvcc_major(ce.CUDA_HOME)
            torch_major = int(torch.version.cuda.split(".")[0])
            if major is not None and major != torch_major:
                sys.exit(
                    f"r2d2: nvcc in {ce.CUDA_HOME} is CUDA {major}.x but torch was built with "
                    f"CUDA {torch.version.cuda}; install a matching toolkit, point CUDA_HOME at "
                    "one, or set R2D2_FORCE_CPU=1 / R2D2_SKIP_EXT=1"
                )

    include_dirs = [os.path.join(HERE, "csrc")]
    if want_cuda:
        archs = os.environ.get("R2D2_CUDA_ARCHS", "80;90")
        gencode = []
        for a in filter(None, (x.strip() for x in archs.split(";"))):
            a = a.replace(".", "")
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        nvcc = (["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]) + [
            "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"] + gencode
        ext = ce.CUDAExtension(
            "r2d2._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("R2D2_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + ["-DR2D2_WITH_CUDA=1"], "nvcc": nvcc},
        )
        print(f"r2d2: building r2d2._C with CUDA for sm {archs}", file=sys.stderr)
    else:
        ext = ce.CppExtension(
            "r2d2._C", cpu_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}
        )
        print("r2d2: building r2d2._C (CPU part only)", file=sys.stderr)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
