"""Packaging without a build: the C++ flags per torch version (for versions not installed), the
first-use build's cache key and its messages, the build requirements (no torch), the presets'
resolution and listing, and the bench scripts inside the package. The real installs (sdist,
wheel, into fresh venvs, run from outside the checkout) are scripts/check_packaging.sh, in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from r2d2 import _build

ROOT = Path(__file__).resolve().parents[2]


# ---- flags: a function of the torch version ----


@pytest.mark.parametrize(
    "version, std",
    [
        ("2.4.0", "c++17"),
        ("2.9.1+cu128", "c++17"),
        ("2.13.0+cpu", "c++17"),
        ("2.14.0", "c++20"),
        ("2.14.1+cu130", "c++20"),
        ("2.15.0.dev20260301", "c++20"),
        ("3.0.0", "c++20"),
    ],
)
def test_cxx_standard_follows_torch(version, std):
    flags = _build.cxx_flags(version)
    assert f"-std={std}" in flags and sum(f.startswith("-std=") for f in flags) == 1
    assert "-O3" in flags and "-DR2D2_WITH_CUDA=1" not in flags
    assert "-DR2D2_WITH_CUDA=1" in _build.cxx_flags(version, cuda=True)
    assert _build.cxx_flags(version, debug=True)[:2] == ["-O0", "-g"]


def test_too_old_torch_is_refused_and_pyproject_agrees():
    with pytest.raises(ValueError, match=r"needs torch >= 2\.4"):
        _build.cxx_flags("2.3.1")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch>={'.'.join(map(str, _build.MIN_TORCH))}" in deps


def test_installed_torch_headers_accept_the_chosen_standard():
    """The header check itself (ATen.h's #error) for the installed torch, with our standard."""
    import torch
    from torch.utils import cpp_extension as ce

    aten = Path(ce.include_paths()[0]) / "ATen" / "ATen.h"
    text = aten.read_text()
    need = 202002 if "__cplusplus < 202002L" in text else 201703
    std = _build.cxx_std(torch.__version__)
    assert {"c++17": 201703, "c++20": 202002}[std] >= need


def test_build_system_has_no_torch():
    """An isolated build must not pull a torch of its own (a CUDA build, gigabytes)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = cfg["build-system"]["requires"]
    assert not any(
        r.split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip() == "torch" for r in reqs
    ), reqs
    assert "ninja" in cfg["project"]["dependencies"]  # the first-use build's builder


def test_setup_without_torch_installs_pure_python_and_ships_sources(tmp_path):
    """setup.py in an environment without torch (what build isolation gives it): no extension,
    one line saying so, and build_py still copies csrc/ as r2d2/csrc/."""
    code = f"""
import builtins, runpy, sys
real = builtins.__import__
def no_torch(name, *a, **k):
    if name == "torch" or name.startswith("torch."):
        raise ImportError("no torch here")
    return real(name, *a, **k)
builtins.__import__ = no_torch
ns = runpy.run_path({str(ROOT / "setup.py")!r}, run_name="under_test")
ext, cmd = ns["_ext_modules"]()
print("EXT", ext, sorted(cmd))
"""
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    assert "EXT [] ['build_py']" in r.stdout
    assert "compiled on first use" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- the first-use build ----


def test_cache_key_names_what_the_binary_depends_on(monkeypatch, tmp_path):
    k = _build.cache_key("2.13.0+cpu", None, None, "abc123", "cp311", "x86_64")
    assert k == "torch2.13.0+cpu-cpu-cp311-x86_64-abc123"
    kc = _build.cache_key("2.13.0+cu130", "13.0", ["80", "90"], "abc123", "cp311", "x86_64")
    assert kc == "torch2.13.0+cu130-cu13.0-sm80_90-cp311-x86_64-abc123"
    assert (
        len(
            {
                k,
                kc,
                _build.cache_key("2.14.0", None, None, "abc123", "cp311", "x86_64"),
                _build.cache_key("2.13.0+cpu", None, None, "def456", "cp311", "x86_64"),
            }
        )
        == 4
    )
    monkeypatch.setenv("R2D2_EXT_CACHE", str(tmp_path))
    assert _build.cache_root() == tmp_path
    assert _build.cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/r2d2/ext")


def test_sources_digest_changes_with_a_source(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "module.cpp").write_text("int x;")
    (tmp_path / "a" / "k.h").write_text("#pragma once")
    d0 = _build.sources_digest(tmp_path)
    (tmp_path / "a" / "k.h").write_text("#pragma once\n// changed")
    assert _build.sources_digest(tmp_path) != d0
    cpu, cuda = _build.split_sources(ROOT / "csrc")
    assert cpu and cuda and not any(s.endswith((".cu", "_cuda.cpp")) for s in cpu)


def _in_fresh_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_no_jit_says_so_in_one_line(tmp_path):
    """With no cached build and R2D2_NO_JIT=1: a JitError (an ImportError) naming the switch and
    `r2d2 doctor --build`, nothing compiled."""
    r = _in_fresh_python(
        "from r2d2 import _jit\n"
        "try:\n    _jit.load()\nexcept ImportError as e:\n    print('ERR', e)\n",
        {"R2D2_NO_JIT": "1", "R2D2_EXT_CACHE": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("ERR r2d2._C is not built for torch") and "\n" not in line
    assert "R2D2_NO_JIT=1" in line and "r2d2 doctor --build" in line
    assert not any(tmp_path.iterdir())


def test_missing_compiler_is_one_line_and_not_retried(tmp_path):
    r = _in_fresh_python(
        "from r2d2 import _jit\n"
        "for _ in range(2):\n"
        "    try:\n        _jit.load(build=True)\n    except ImportError as e:\n"
        "        print('ERR', e)\n",
        {"CXX": "no-such-compiler-r2d2", "R2D2_EXT_CACHE": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    assert "no C++ compiler ('no-such-compiler-r2d2' is not on PATH" in lines[0]


def test_a_cached_build_loads_without_compiling(tmp_path):
    """A finished build in the cache folder of this torch's key is imported as r2d2._C, without
    the compiler (CXX unusable) and with the automatic build off."""
    from importlib.machinery import EXTENSION_SUFFIXES

    prebuilt = next((ROOT / "r2d2").glob(f"_C{EXTENSION_SUFFIXES[0]}"), None)
    if prebuilt is None:
        pytest.skip("no ahead-of-time r2d2._C in the checkout to stand in for a cached build")
    env = {"R2D2_EXT_CACHE": str(tmp_path), "R2D2_NO_JIT": "1", "CXX": "no-such-compiler"}
    r = _in_fresh_python("from r2d2 import _jit; print(_jit.plan()['dir'])", env)
    d = Path(r.stdout.strip())
    d.mkdir(parents=True)
    (d / "_C.so").write_bytes(prebuilt.read_bytes())
    (d / "ok").write_text("test\n")
    r = _in_fresh_python(
        "from r2d2 import _jit; m = _jit.load(); print(m.__name__, m.__file__, m.cuda_built())", env
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["r2d2._C", str(d / "_C.so"), "False"]


def test_c_shim_defers_to_a_built_extension():
    """r2d2/_C.py runs only where no r2d2/_C<suffix>.so is: Python prefers the extension."""
    import r2d2._C as c

    if c.__file__.endswith(".py"):
        pytest.fail("the r2d2/_C.py stand-in must replace itself with the extension module")
    from importlib.machinery import EXTENSION_SUFFIXES

    assert c.__file__.endswith(tuple(EXTENSION_SUFFIXES) + ("_C.so",))


# ---- presets ----


def test_presets_ship_in_the_package_and_resolve_by_name(tmp_path, monkeypatch):
    from r2d2.engine.config import (
        PRESETS_DIR,
        ConfigFileNotFound,
        load_config,
        preset_names,
        resolve_config_path,
    )

    assert Path(PRESETS_DIR) == ROOT / "r2d2" / "configs"
    assert {"tiny", "base", "finetune_tiny", "eval_synthetic"} <= set(preset_names())
    monkeypatch.chdir(tmp_path)  # anywhere but the checkout
    tiny = str(ROOT / "r2d2" / "configs" / "tiny.yaml")
    for name in ("tiny", "tiny.yaml", "configs/tiny.yaml", "./configs/tiny.yaml"):
        assert resolve_config_path(name) == tiny, name
    (tmp_path / "tiny.yaml").write_text("train:\n  max_steps: 7\n")
    assert resolve_config_path("tiny.yaml") == "tiny.yaml"  # a file always wins
    assert load_config("tiny.yaml").train.max_steps == 7
    with pytest.raises(ConfigFileNotFound, match=r"no such file or preset tinny .*presets: .*tiny"):
        resolve_config_path("tinny")
    with pytest.raises(ConfigFileNotFound, match=r"^--config: no such file elsewhere/tiny.yaml$"):
        resolve_config_path("elsewhere/tiny.yaml")


def test_base_chain_falls_back_to_a_preset(tmp_path, monkeypatch):
    """A user's own YAML with `base: tiny.yaml` (copied from a preset) inherits the packaged one."""
    from r2d2.engine.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("base: tiny.yaml\ntrain:\n  max_steps: 5\n")
    cfg = load_config("mine.yaml")
    assert (
        cfg.train.max_steps == 5
        and cfg.model.vision.width == load_config("tiny").model.vision.width
    )


def test_relative_paths_in_a_preset_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    """The documented rule: `init_from: runs/demo/model` in a packaged preset means the runs/ of
    the directory the command runs in, not a folder next to the YAML file in site-packages."""
    from r2d2.engine.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config("finetune_tiny")
    assert cfg.train.init_from == "runs/demo/model"
    assert os.path.abspath(cfg.train.init_from) == str(tmp_path / "runs" / "demo" / "model")


def test_presets_command_lists_and_locates(capsys):
    from r2d2.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:1] == ["tiny"] for line in out.splitlines())
    assert main(["presets", "--path", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(ROOT / "r2d2" / "configs" / "tiny.yaml")
    assert main(["presets", "--path", "nope"]) == 2


# ---- benchmarks ----


def test_bench_scripts_are_in_the_package_and_old_paths_still_work():
    from r2d2.bench import harness
    from r2d2.cli import bench as bench_cli

    pkg = Path(harness.__file__).parent
    assert pkg == ROOT / "r2d2" / "bench"
    for script in bench_cli.SUITES["all"] + ("report.py",):
        assert (pkg / script).is_file(), script
        assert (ROOT / "benchmarks" / script).is_file(), script  # the entry point at the old path
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import harness as old
    finally:
        sys.path.pop(0)
    assert old is harness
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "harness.py"), "slug", "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd="/",
        check=False,
    )
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_bench_results_default_outside_a_checkout(monkeypatch, tmp_path):
    from r2d2.bench import harness

    monkeypatch.delenv("R2D2_BENCH_RESULTS", raising=False)
    assert harness.results_dir() == ROOT / "benchmarks" / "results"  # from the checkout
    monkeypatch.setattr(harness, "REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    assert harness.results_dir() == tmp_path / "benchmarks" / "results"
    monkeypatch.setenv("R2D2_BENCH_RESULTS", str(tmp_path / "r"))
    assert harness.results_dir() == tmp_path / "r"
