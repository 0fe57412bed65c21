"""Installing and running without a working r2d2._C: the fallback (in a subprocess whose package
copy has no extension, or a broken one), the build script's checks (setup.py, with nvcc faked),
its shared nvcc flags, package data, and scripts/setup_env.sh's torch choice (pip faked)."""

from __future__ import annotations

import importlib.machinery
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def package_copy(tmp_path: Path, ext: str) -> Path:
    """A copy of the r2d2 package whose r2d2._C is ``absent`` or ``broken`` (a file of the
    extension's name that is not a shared library: what an ABI break looks like to the import)."""
    dst = tmp_path / "pkg"
    shutil.copytree(
        ROOT / "r2d2",
        dst / "r2d2",
        ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "_C*.pyd"),
    )
    if ext == "broken":
        so = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
        (dst / "r2d2" / so).write_bytes(b"not an ELF file: built against another torch\n")
    return dst


# An editable install's finder maps r2d2's submodules back to the checkout (so r2d2._C would be
# found there); drop it so that only the copy on PYTHONPATH is seen.
ONLY_THE_COPY = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def start_python(pkg: Path, code: str) -> subprocess.Popen:
    # R2D2_NO_JIT: the copy has no sources to compile, and this tests the fallback, not the build
    env = {**os.environ, "PYTHONPATH": str(pkg), "TRITON_INTERPRET": "1", "R2D2_NO_JIT": "1"}
    code = ONLY_THE_COPY + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=pkg,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


FALLBACK = """
import warnings
warnings.simplefilter("always")  # count every warning, not just the first per location
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import r2d2, torch
    from r2d2.kernels import BackendUnavailable, distill_kl, dispatch
    assert r2d2.__file__.startswith({pkg!r}), r2d2.__file__
    s, t = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9)
    for _ in range(3):
        distill_kl(s, t).backward()
    print("AUTO", dispatch.auto_backend("distill_kl", "cpu"))
    print("DESCRIBE", dispatch.describe("cpu")["distill_kl"]["cpp"])
    try:
        distill_kl(s, t, backend="cpp")
    except BackendUnavailable as e:
        print("CPP", e)
    ref = distill_kl(s, t, backend="eager")
    assert torch.equal(distill_kl(s, t), ref)
ours = [str(w.message) for w in caught if "r2d2._C" in str(w.message)]
print("WARNINGS", len(ours))
for m in ours:
    print("WARNING", m)
print("DOCTOR")
from r2d2.cli import main
main(["doctor"])
"""


@pytest.fixture(scope="module")
def fallback_runs(tmp_path_factory):
    """One subprocess per variant, run side by side (each pays a torch import)."""
    procs = {}
    for ext in ("absent", "broken"):
        pkg = package_copy(tmp_path_factory.mktemp(ext), ext)
        procs[ext] = (pkg, start_python(pkg, FALLBACK.format(pkg=str(pkg))))
    runs = {}
    for ext, (_pkg, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        runs[ext] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return runs


@pytest.mark.parametrize(
    "ext, why",
    [
        ("absent", "r2d2._C is not built"),
        ("broken", "r2d2._C is built but fails to import: "),
    ],
)
def test_no_extension_falls_back_and_says_why_once(fallback_runs, ext, why):
    run = fallback_runs[ext]
    assert run.returncode == 0, run.stderr
    out = run.stdout.split("DOCTOR")[0]
    assert "AUTO eager" in out
    assert "WARNINGS 1" in out, out
    assert why in out.split("WARNING ", 1)[-1] and "fall back" in out
    cpp = next(line for line in out.splitlines() if line.startswith("CPP "))
    assert f"distill_kl: backend='cpp' needs the compiled extension: {why}" in cpp
    assert "pip install --no-build-isolation -e ." in cpp
    if ext == "broken":  # the loader's own reason is passed on, not replaced
        assert "invalid ELF header" in cpp or "file too short" in cpp, cpp


@pytest.mark.parametrize(
    "ext, state",
    [
        ("absent", "unavailable: r2d2._C is not built"),
        ("broken", "unavailable: r2d2._C is built but fails to import:"),
    ],
)
def test_doctor_shows_why_the_extension_is_unavailable(fallback_runs, ext, state):
    run = fallback_runs[ext]
    assert run.returncode == 0, run.stderr
    doctor = run.stdout.split("DOCTOR", 1)[1]
    line = next(x for x in doctor.splitlines() if x.startswith("r2d2._C"))
    assert state in line, line
    if ext == "broken":  # the import error itself, e.g. after a torch upgrade
        assert "invalid ELF header" in line or "file too short" in line, line
        assert "not built" not in line
    assert "distill_kl: auto -> eager" in doctor


# ---- setup.py: the nvcc check, the env switches, the flags check_nvcc.sh compiles with ----


@pytest.fixture
def setup_py(monkeypatch):
    monkeypatch.chdir(ROOT)  # setup.py globs csrc/ relative to the working directory
    return runpy.run_path(str(ROOT / "setup.py"), run_name="r2d2_setup_under_test")


def fake_cuda_home(tmp_path: Path, nvcc_script: str) -> str:
    (tmp_path / "bin").mkdir(parents=True)
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n" + nvcc_script)
    nvcc.chmod(0o755)
    # A toolkit root has the CUDA headers; setup.py looks elsewhere for one that does otherwise.
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime_api.h").write_text("/* fake */\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    "script, message",
    [
        (
            "echo 'nvcc: NVIDIA (R) Cuda compiler driver'; echo 'Built on a day'\n",
            "cannot read the CUDA version from",
        ),
        ("echo broken >&2; exit 3\n", "cannot run"),
    ],
)
def test_setup_stops_when_nvcc_version_is_unknown(setup_py, monkeypatch, tmp_path, script, message):
    import torch
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA torch, as far as setup.py sees
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", fake_cuda_home(tmp_path, script))
    for var in ("R2D2_SKIP_EXT", "R2D2_FORCE_CPU"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match=message) as e:
        setup_py["_ext_modules"]()
    assert "R2D2_FORCE_CPU=1" in str(e.value)


def test_setup_env_switches(setup_py, monkeypatch, tmp_path):
    import torch
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(
        cpp_extension,
        "CUDA_HOME",
        fake_cuda_home(tmp_path, "echo 'Cuda compilation tools, release 11.8, V11.8.89'\n"),
    )
    monkeypatch.delenv("R2D2_SKIP_EXT", raising=False)
    monkeypatch.delenv("R2D2_FORCE_CPU", raising=False)
    with pytest.raises(
        SystemExit, match=r"nvcc .* is CUDA 11.x but torch was built with CUDA 12.8"
    ):
        setup_py["_ext_modules"]()
    monkeypatch.setenv("R2D2_FORCE_CPU", "1")
    (ext,), _ = setup_py["_ext_modules"]()
    assert not any(s.endswith(".cu") for s in ext.sources)
    monkeypatch.setenv("R2D2_SKIP_EXT", "1")
    ext_modules, cmdclass = setup_py["_ext_modules"]()
    assert ext_modules == [] and "build_ext" not in cmdclass  # sources still ship (build_py)
    monkeypatch.setenv("R2D2_CUDA_ARCHS", "8.6;90")
    monkeypatch.setenv("DEBUG", "1")
    flags = setup_py["nvcc_flags"](True)
    assert "arch=compute_86,code=sm_86" in flags and "-G" in flags


def test_check_nvcc_compiles_with_the_builds_flags(setup_py, monkeypatch, capsys):
    monkeypatch.setenv("R2D2_CUDA_ARCHS", "80;90")
    monkeypatch.delenv("DEBUG", raising=False)
    setup_py["_print_nvcc_flags"]()  # what `python setup.py --print-nvcc-flags` prints
    flags = capsys.readouterr().out.split("\n")
    for f in (
        "--use_fast_math",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "-O3",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "arch=compute_80,code=sm_80",
        "arch=compute_90,code=sm_90",
    ):
        assert f in flags, (f, flags)
    # ...and check_nvcc.sh has no list of its own: its nvcc call takes exactly those.
    script = (ROOT / "csrc" / "check_nvcc.sh").read_text()
    calls = [x.strip() for x in script.splitlines() if x.strip().startswith("nvcc ")]
    assert calls == ['nvcc -c "$f" -I "$ROOT/csrc" "${NVCC_FLAGS[@]}" -o "$OUT/$(basename "$f").o"']
    assert "setup.py --print-nvcc-flags" in script


# ---- scripts/setup_env.sh: which torch it installs (python and pip faked) ----

FAKE_PYTHON = """#!/bin/bash
echo "$*" >> "$CALLS"
case "$*" in
  "-c import torch") exit 1 ;;   # no torch yet
  *"--no-index --no-deps"*) exit "$LOCAL_RC" ;;
  "-") printf 'filelock>=3\nsympy\n' ;;   # the local wheel's dependencies, nvidia-* filtered
esac
exit 0
"""


@pytest.mark.parametrize(
    "case", ["local_wheel", "local_wheel_gpu", "cpu_machine", "gpu_machine", "R2D2_TORCH"]
)
def test_setup_env_torch_choice(tmp_path, case):
    venv, bindir, calls = tmp_path / "venv", tmp_path / "bin", tmp_path / "calls.txt"
    (venv / "bin").mkdir(parents=True)
    bindir.mkdir()
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    # A PATH of only the tools the script needs, so a real nvidia-smi cannot leak in.
    for tool in (
        "bash",
        "cat",
        "find",
        "sort",
        "sha1sum",
        "cut",
        "grep",
        "mktemp",
        "rm",
        "dirname",
    ):
        (bindir / tool).symlink_to(shutil.which(tool))
    if case in ("gpu_machine", "local_wheel_gpu"):
        (bindir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bindir / "nvidia-smi").chmod(0o755)
    env = {
        "PATH": str(bindir),
        "R2D2_VENV": str(venv),
        "CALLS": str(calls),
        "LOCAL_RC": "0" if case.startswith("local_wheel") else "1",
        "HOME": str(tmp_path),
    }
    if case == "R2D2_TORCH":
        env["R2D2_TORCH"] = "torch==2.5.1"
    # A copy of what the script reads (its stamp hashes csrc/), so edits elsewhere cannot race it.
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "csrc", repo / "csrc")
    for f in ("pyproject.toml", "setup.py", "r2d2/_build.py", "scripts/setup_env.sh"):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, repo / f)
    script = str(repo / "scripts" / "setup_env.sh")
    run = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    pip = [
        c for c in calls.read_text().splitlines() if c.startswith("-m pip install") and "torch" in c
    ]
    want = {
        # no GPU: the wheel's small dependencies only (a CUDA wheel's nvidia-* would be GBs)
        "local_wheel": ["-m pip install -q --no-index --no-deps torch==2.13.0"],
        "local_wheel_gpu": [
            "-m pip install -q --no-index --no-deps torch==2.13.0",
            "-m pip install -q torch==2.13.0",
        ],
        "cpu_machine": [
            "-m pip install -q --no-index --no-deps torch==2.13.0",
            "-m pip install -q --index-url https://download.pytorch.org/whl/cpu torch==2.13.0",
        ],
        "gpu_machine": [
            "-m pip install -q --no-index --no-deps torch==2.13.0",
            "-m pip install -q torch==2.13.0",
        ],
        "R2D2_TORCH": ["-m pip install -q torch==2.5.1"],
    }[case]
    assert pip == want, (pip, run.stdout)
    if case == "local_wheel":
        assert "-m pip install -q filelock>=3 sympy" in calls.read_text().splitlines()
    if case == "gpu_machine":
        assert "CUDA build" in run.stdout
    # ...then the package itself, once; a second run with the stamp in place installs nothing.
    assert any("--no-build-isolation -e .[dev]" in c for c in calls.read_text().splitlines())
    calls.write_text("")
    (py).write_text(FAKE_PYTHON.replace('"-c import torch") exit 1', '"-c import torch") exit 0'))
    run = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert not [c for c in calls.read_text().splitlines() if "pip install" in c]
