"""Build of ``r2d2-engine`` and, when torch is importable here, of its extension ``r2d2._C``.

torch is not a build requirement (pyproject.toml): pip's isolated build environment would get a
torch of its own (the newest, a CUDA build: gigabytes) and link ``_C`` against it instead of the
torch the user runs. So:

  torch importable (``pip install --no-build-isolation .``, ``pip install -e .`` with
  ``--no-build-isolation``, ``python setup.py build_ext --inplace``): ``_C`` is built now, as
  the rest of this docstring says;
  no torch (``pip install .``, ``pip wheel .``, an sdist with build isolation): the package is
  pure Python plus its sources (``csrc/`` shipped as ``r2d2/csrc/``), and ``r2d2/_jit.py``
  compiles ``_C`` on first use against the torch it runs with.

The CPU part (C++ reference kernels + the op schemas) is always built. The CUDA part
(``csrc/**/*.cu`` plain launchers and their ``*_cuda.cpp`` bindings) is built only when the
installed torch has CUDA *and* a matching nvcc is found, because a CPU torch ships no CUDA
runtime to link against. The C++ standard follows the torch built against (r2d2/_build.py's
``cxx_flags``: C++20 from torch 2.14 on, whose headers require it).

Environment switches:
  R2D2_SKIP_EXT=1      no ahead-of-time build (the first-use build still can; R2D2_NO_JIT=1
                       stops that too, and every op falls back to Triton/eager)
  R2D2_CUDA_ARCHS      semicolon list of SM versions for the CUDA part (default "80;90"); the
                       newest also gets PTX, which newer GPUs JIT-compile
  R2D2_FORCE_CPU=1     build only the CPU part even when torch has CUDA
  MAX_JOBS             parallel compile jobs (read by torch's ninja builder)
  DEBUG=1              -O0 -g builds

The CUDA toolkit is CUDA_HOME / CUDA_PATH when set; otherwise torch's guess when it has the CUDA
headers, else where the nvcc on PATH really lives (it may be a wrapper script that execs the
toolkit's nvcc), else /usr/local/cuda; see find_cuda_home (r2d2/_build.py). When none has the
headers the build stops with one line saying so.

``python setup.py --print-nvcc-flags`` prints the nvcc flags of the build (csrc/check_nvcc.sh
compiles with them).
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """r2d2/_build.py by path: the flag and toolkit logic shared with the first-use build
    (r2d2/_jit.py), loaded without importing the package, whose __init__ imports torch."""
    spec = importlib.util.spec_from_file_location(
        "r2d2_build", os.path.join(HERE, "r2d2", "_build.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_build = _load_build_module()
_env_flag = _build.env_flag
CUDA_HEADER = _build.CUDA_HEADER
DEFAULT_CUDA_HOME = _build.DEFAULT_CUDA_HOME
cxx_flags = _build.cxx_flags
find_cuda_home = _build.find_cuda_home
nvcc_toolkit_roots = _build.nvcc_toolkit_roots


def _nvcc_major(cuda_home: str) -> int:
    try:
        return _build.nvcc_major(cuda_home)
    except ValueError as e:
        sys.exit(str(e))


def cuda_archs() -> list[str]:
    try:
        return _build.cuda_archs()
    except ValueError as e:
        sys.exit(str(e))


def nvcc_flags(debug: bool) -> list[str]:
    return _build.nvcc_flags(debug, cuda_archs())


class BuildPyWithSources(build_py):
    """build_py that also ships csrc/ as r2d2/csrc/ (package data of the wheel): an install
    without a prebuilt r2d2._C compiles it from there on first use (r2d2/_jit.py)."""

    def run(self):
        super().run()
        if not self.distribution.ext_modules:
            # a build/ folder kept from an earlier ahead-of-time build must not put its _C, linked
            # against whatever torch was there then, into a pure-Python wheel
            for stale in glob.glob(os.path.join(self.build_lib, "r2d2", "_C*.so")):
                os.remove(stale)
        src = os.path.join(HERE, "csrc")
        if os.path.isdir(src):
            dst = os.path.join(self.build_lib, "r2d2", "csrc")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.sh", "*.o", "__pycache__"))


def _print_nvcc_flags() -> None:
    """One flag per line: what the real build passes nvcc for a .cu file (bar -I and -fPIC)."""
    from torch.utils import cpp_extension as ce

    for flag in ce.COMMON_NVCC_FLAGS + nvcc_flags(_env_flag("DEBUG")):
        print(flag)


def _ext_modules():
    """(ext_modules, cmdclass) for setup(): r2d2._C when torch is importable here, else none."""
    cmdclass = {"build_py": BuildPyWithSources}
    if _env_flag("R2D2_SKIP_EXT"):
        print("r2d2: R2D2_SKIP_EXT=1, installing without r2d2._C", file=sys.stderr)
        return [], cmdclass
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        # An isolated build (plain `pip install .`, `pip wheel .`) has no torch, and installing
        # one here would build against a torch other than the user's: ship the sources instead.
        print(
            "r2d2: no torch in the build environment (pip's build isolation): installing "
            "without r2d2._C; it is compiled on first use against the torch you run "
            "(`r2d2 doctor --build` does it now). `pip install --no-build-isolation .` builds "
            "it here instead.",
            file=sys.stderr,
        )
        return [], cmdclass

    debug = _env_flag("DEBUG")
    try:
        cxx = cxx_flags(torch.__version__, debug)
    except ValueError as e:
        sys.exit(str(e))
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
            print(
                "r2d2: torch has CUDA but no CUDA toolkit (nvcc) was found; "
                "building the CPU part only",
                file=sys.stderr,
            )
            want_cuda = False
        else:
            if home != ce.CUDA_HOME:
                print(
                    f"r2d2: using the CUDA toolkit in {home} (torch guessed {ce.CUDA_HOME}, "
                    f"which has no include/{CUDA_HEADER})",
                    file=sys.stderr,
                )
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
            extra_compile_args={
                "cxx": cxx_flags(torch.__version__, debug, cuda=True),
                "nvcc": nvcc,
            },
        )
        print(f"r2d2: building r2d2._C with CUDA for sm {';'.join(cuda_archs())}", file=sys.stderr)
    else:
        ext = ce.CppExtension(
            "r2d2._C", cpu_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}
        )
        print("r2d2: building r2d2._C (CPU part only)", file=sys.stderr)
    cmdclass["build_ext"] = ce.BuildExtension.with_options(use_ninja=True)
    return [ext], cmdclass


# setuptools' build backend runs this file as __main__; tests load it under another name to call
# the functions above without building.
if __name__ == "__main__":
    if sys.argv[1:] == ["--print-nvcc-flags"]:
        _print_nvcc_flags()
        sys.exit(0)
    ext_modules, cmdclass = _ext_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
