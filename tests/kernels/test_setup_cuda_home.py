"""setup.py's CUDA toolkit discovery (find_cuda_home) with fake toolkits in a temporary folder:
torch's guess, CUDA_HOME / CUDA_PATH, the nvcc on PATH as a symlink or as a wrapper script that
execs the toolkit's nvcc (found through the real nvcc's --dryrun), the conventional root, and the
one-line stop when none has the CUDA headers. Nothing is compiled."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEADER = "cuda_runtime_api.h"


@pytest.fixture
def setup_py(monkeypatch):
    monkeypatch.chdir(ROOT)  # setup.py globs csrc/ relative to the working directory
    return runpy.run_path(str(ROOT / "setup.py"), run_name="r2d2_setup_under_test")


def script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def toolkit(root: Path, header: bool = True, release: str = "12.8") -> Path:
    """A fake toolkit: bin/nvcc answering --version and --dryrun as the real one does (the dry
    run's TOP / _HERE_ lines name its own folder), include/cuda_runtime_api.h unless header=False."""
    bin_dir = root / "bin"
    script(
        bin_dir / "nvcc",
        f"""\
case "$*" in
  *--dryrun*) echo '#$ _HERE_={bin_dir}' >&2; echo '#$ TOP={bin_dir}/..' >&2 ;;
  *--version*) echo 'Cuda compilation tools, release {release}, V{release}.1' ;;
esac
""",
    )
    if header:
        (root / "include").mkdir(parents=True, exist_ok=True)
        (root / "include" / HEADER).write_text("/* fake */\n")
    return root


def wrapper(prefix: Path, real_root: Path) -> Path:
    """prefix/bin/nvcc: a two-line script that execs the real nvcc (prefix has no headers)."""
    return script(prefix / "bin" / "nvcc", f'exec "{real_root}/bin/nvcc" "$@"\n')


def test_torch_guess_with_headers_is_kept(setup_py, tmp_path):
    tk = toolkit(tmp_path / "tk")
    find = setup_py["find_cuda_home"]
    assert find({}, str(tk), None, default=str(tmp_path / "none")) == (str(tk), None)


def test_cuda_home_env_is_used_as_given(setup_py, tmp_path):
    tk, other = toolkit(tmp_path / "tk"), toolkit(tmp_path / "other")
    find = setup_py["find_cuda_home"]
    assert find({"CUDA_HOME": str(tk)}, str(other), None) == (str(tk), None)
    assert find({"CUDA_PATH": str(tk)}, None, None) == (str(tk), None)
    # Set but without headers: stop, naming the variable and the header (no search elsewhere).
    bare = toolkit(tmp_path / "bare", header=False)
    home, why = find({"CUDA_HOME": str(bare)}, str(bare), None, default=str(tk))
    assert home is None and f"CUDA_HOME={bare}" in why and HEADER in why and "\n" not in why


def test_wrapper_script_on_path_leads_to_the_real_toolkit(setup_py, tmp_path):
    """The case of issue 14: PATH's nvcc is a script in /usr/local/bin that execs the toolkit's;
    torch guesses /usr/local (the script's grandparent), which has no CUDA headers."""
    real = toolkit(tmp_path / "cuda-13.0")
    nvcc = wrapper(tmp_path / "usr-local", real)
    find = setup_py["find_cuda_home"]
    home, why = find({}, str(tmp_path / "usr-local"), str(nvcc), default=str(tmp_path / "none"))
    assert why is None and Path(home) == real.resolve()
    roots = setup_py["nvcc_toolkit_roots"](str(nvcc))
    assert roots == [str((tmp_path / "usr-local").resolve()), str(real.resolve())]


def test_symlinked_nvcc_is_followed(setup_py, tmp_path):
    real = toolkit(tmp_path / "real")
    link = tmp_path / "links" / "bin" / "nvcc"
    link.parent.mkdir(parents=True)
    link.symlink_to(real / "bin" / "nvcc")
    home, why = setup_py["find_cuda_home"](
        {}, str(tmp_path / "links"), str(link), default=str(tmp_path / "none")
    )
    assert why is None and Path(home) == real.resolve()


def test_nvcc_that_cannot_run_or_says_nothing(setup_py, tmp_path):
    """A broken or silent nvcc adds only its own folder; the conventional root is still tried."""
    broken = script(tmp_path / "b" / "bin" / "nvcc", "exit 7\n")
    dflt = toolkit(tmp_path / "usr-local-cuda")
    home, why = setup_py["find_cuda_home"]({}, str(tmp_path / "b"), str(broken), default=str(dflt))
    assert (home, why) == (str(dflt), None)
    assert setup_py["nvcc_toolkit_roots"](str(broken)) == [str((tmp_path / "b").resolve())]


def test_no_headers_anywhere_stops_with_one_line(setup_py, tmp_path):
    real = toolkit(tmp_path / "cuda", header=False)
    nvcc = wrapper(tmp_path / "usr-local", real)
    dflt = tmp_path / "usr-local-cuda"
    dflt.mkdir()
    home, why = setup_py["find_cuda_home"](
        {}, str(tmp_path / "usr-local"), str(nvcc), default=str(dflt)
    )
    assert home is None
    assert "\n" not in why and why.startswith("r2d2: ")
    assert f"include/{HEADER}" in why and "set CUDA_HOME" in why
    for looked in (tmp_path / "usr-local", real, dflt):
        assert str(looked.resolve()) in why


def test_no_toolkit_at_all_means_cpu_part_only(setup_py, tmp_path):
    assert setup_py["find_cuda_home"]({}, None, None, default=str(tmp_path / "none")) == (
        None,
        None,
    )
    # ...but an nvcc on PATH whose toolkit has no headers is a broken install: stop.
    nvcc = script(tmp_path / "x" / "bin" / "nvcc", "exit 1\n")
    home, why = setup_py["find_cuda_home"]({}, None, str(nvcc), default=str(tmp_path / "none"))
    assert home is None and HEADER in why


def test_ext_modules_builds_cuda_with_the_discovered_toolkit(setup_py, monkeypatch, tmp_path):
    """_ext_modules with a CUDA torch (faked), torch's guess the wrapper's grandparent: the CUDA
    extension is configured against the real toolkit, and torch's builder is told so."""
    import torch
    from torch.utils import cpp_extension

    real = toolkit(tmp_path / "cuda-12.8", release="12.8")
    wrapper(tmp_path / "usr-local", real)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "usr-local"))
    monkeypatch.setenv("PATH", f"{tmp_path / 'usr-local' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for var in ("CUDA_HOME", "CUDA_PATH", "R2D2_SKIP_EXT", "R2D2_FORCE_CPU"):
        monkeypatch.setenv(var, "")  # so that monkeypatch restores the environment afterwards:
        monkeypatch.delenv(var)  # _ext_modules sets CUDA_HOME for torch's builder
    (ext,), cmdclass = setup_py["_ext_modules"]()
    assert Path(cpp_extension.CUDA_HOME) == real.resolve()
    assert Path(os.environ["CUDA_HOME"]) == real.resolve()
    assert any(s.endswith(".cu") for s in ext.sources) and "build_ext" in cmdclass
    assert str(real.resolve() / "include") in [str(Path(p).resolve()) for p in ext.include_dirs]
