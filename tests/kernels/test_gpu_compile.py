"""The Triton kernels compiled for real GPUs (sm_80, sm_90) on this CPU machine, with
scripts/check_gpu_compile.py: each configuration compiles, fits the arch's shared memory, does not
spill registers, and uses tensor cores where it calls tl.dot with 16-bit inputs; configurations
the attention autotuner prunes are shown to be pruned on that arch.

The suite runs with TRITON_INTERPRET=1, which must not reach a real compile: every compile runs
in a subprocess whose environment lacks it. The quick set is a representative subset; the full
sweep (what CI runs as a script) is marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_gpu_compile.py"


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _py(code: str, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _backend_missing() -> str | None:
    r = _py("import triton.backends.nvidia.compiler as c; print(c.get_ptxas(90).path)", 120)
    if r.returncode != 0:
        return f"triton's NVIDIA backend is unavailable: {r.stderr.strip().splitlines()[-1:]}"
    if not Path(r.stdout.strip()).exists():
        return "triton's ptxas is missing"
    return None


@pytest.fixture(scope="module")
def backend():
    why = _backend_missing()
    if why:
        pytest.skip(why)


def _run(args, tmp_path, timeout=900):
    out = tmp_path / "rows.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(out), "--summary-only"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    rows = json.loads(out.read_text()) if out.exists() else []
    return r, rows


def _assert_rows_ok(rows):
    assert rows
    bad = [r for r in rows if r["chosen"] and r["verdict"] != "ok"]
    assert not bad, "\n".join(
        f"sm_{r['arch']} {r['kernel']} {r['dtype']} {r['config']}: {r['problems']} {r['error']}"
        for r in bad
    )
    for r in rows:
        if not r["chosen"]:
            continue
        limit = {80: 166912, 90: 232448}[r["arch"]]
        assert r["compiled"], r
        assert r["shared"] <= limit, r
        assert r["spills"] == 0, r
        assert r["regs"] == r["cuobjdump_regs"], r
        if r["uses_dot"] and r["dtype"] in ("fp16", "bf16"):
            assert r["tensor_cores"] is True, r


def test_quick_subset_compiles_for_sm80_sm90(backend, tmp_path):
    r, rows = _run(["--quick", "--arch", "80", "90"], tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    _assert_rows_ok(rows)
    kernels = {x["kernel"] for x in rows}
    for k in (
        "_attn_fwd_kernel",
        "_attn_bwd_dkdv_kernel",
        "_attn_bwd_dq_kernel",
        "_fwd_kernel",
        "_bwd_rows_kernel",
        "_bwd_cols_kernel",
        "_merge_kernel",
        "_distill_kl_fwd_kernel",
    ):
        assert k in kernels
    assert {x["arch"] for x in rows} == {80, 90}


@pytest.mark.slow
def test_full_sweep_compiles_for_sm80_sm90(backend, tmp_path):
    r, rows = _run(["--arch", "80", "90"], tmp_path, timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    _assert_rows_ok(rows)


def test_oversized_config_is_reported_failing(backend, tmp_path):
    """The checker can fail: a contrastive forward pipelining 4 stages of 64 x 256 fp16 operand
    tiles needs ~256 KB of shared memory, more than sm_80 gives a block."""
    code = f"""
import sys, dataclasses, json
sys.path.insert(0, {str(ROOT / "scripts")!r})
import check_gpu_compile as g
c = [c for c in g.all_cases([80], ['_fwd_kernel'])
     if c.dtype == 'fp16' and 'd768' in c.config and 'teacher' not in c.config
     and 'neg' not in c.config][0]
ce = dict(c.constexprs, BLOCK_R=64, BLOCK_C=64, BLOCK_K=256)
r = g.compile_case(dataclasses.replace(c, constexprs=ce, num_warps=4, num_stages=4))
print(json.dumps(r))
"""
    p = _py(code)
    assert p.returncode == 0, p.stderr[-4000:]
    row = json.loads(p.stdout.strip().splitlines()[-1])
    assert row["verdict"] == "FAIL", row
    assert row["compiled"] and row["shared"] > 166912, row
    assert "shared" in row["problems"], row


def test_attention_pruning_is_what_the_autotuner_uses():
    """The autotuner's own pruning step (``Autotuner.prune_configs``, run before it benchmarks)
    calls early_config_prune with the launch's named arguments and constexprs, and that is the
    pure ``prune_configs`` of the call's class (kind, BLOCK_D, element size, mask, dropout) on the
    GPU's arch; on CPU tensors (the interpreter) it keeps every config."""
    code = """
import torch
from r2d2.kernels.attention import triton as at

class FakeCuda:  # what the hook reads of q: a CUDA tensor of this element size
    is_cuda = True
    device = 'cuda:0'
    def __init__(self, size): self.size = size
    def element_size(self): return self.size

arch = [80]
torch.cuda.get_device_capability = lambda device=None: divmod(arch[0], 10)
checked = 0
for name, kind in (('_attn_fwd_kernel', 'fwd'), ('_attn_bwd_dkdv_kernel', 'dkdv'),
                   ('_attn_bwd_dq_kernel', 'dq')):
    tuner = getattr(at, name)
    assert tuner.early_config_prune is not None, name
    tuner.nargs = {'q_ptr': torch.empty(1, 1, 1, 256)}
    assert tuner.prune_configs(dict(BLOCK_D=256, HAS_MASK=True, DROPOUT=True)) == tuner.configs
    for arch[0] in (80, 90):
        for bd in at.block_d_choices():
            for size in (2, 4):
                for mask in (False, True):
                    for drop in (False, True):
                      for causal in (False, True):
                        tuner.nargs = {'q_ptr': FakeCuda(size)}
                        got = tuner.prune_configs(dict(
                            # the tile counter varies along with the mask
                            BLOCK_D=bd, HAS_MASK=mask, DROPOUT=drop, COUNT_TILES=mask,
                            CAUSAL=causal, PRECISION='ieee' if size == 4 else 'tf32'))
                        want = at.prune_configs(tuner.configs, kind, bd, size, arch[0], mask,
                                                drop, mask, causal)
                        assert want and got == want, (name, arch, bd, size, mask, drop, causal)
                        checked += 1
    tuner.nargs = None
print('ok', checked)
"""
    p = _py(code, 300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok 480"), p.stdout + p.stderr


def test_attention_every_class_keeps_a_config():
    """Every class the launchers can produce (kind, BLOCK_D, element size, mask, dropout, tile
    counter) keeps at least one config on sm_80 and sm_90 (the autotuner would otherwise fall back
    to all of them), fp32 keeps only its own 32 x 32 or narrower candidates, and the
    measured exceptions (``_SPILLS``) name real candidates."""
    code = """
import itertools
from r2d2.kernels.attention import triton as at
for key, by_arch in at._SPILLS.items():
    kind, bits, bd, shape = key
    assert shape in at._SHAPES[(kind, bits)] and bd in at.block_d_choices(), key
    assert by_arch and set(by_arch) <= {'80', '90'}, key
    for when in by_arch.values():
        assert when and set(when) <= {'any', 'mask', 'mask-only', 'dropout', 'count', 'causal'}, key
for kind, name in (('fwd', '_attn_fwd_kernel'), ('dkdv', '_attn_bwd_dkdv_kernel'),
                   ('dq', '_attn_bwd_dq_kernel')):
    configs = getattr(at, name).configs
    for arch in (80, 90):  # measured; 99 KB archs (sm_86/89/120) lack an fp32 D = 256 backward
        for bd in at.block_d_choices():
            for size in (2, 4):
                for mask, drop, count, causal in itertools.product((False, True), repeat=4):
                    kept = at.prune_configs(
                        configs, kind, bd, size, arch, mask, drop, count, causal)
                    assert kept, (kind, arch, bd, size, mask, drop, count, causal)
                    if size == 4:  # 32 x 32, or a narrower fallback (16 queries or keys)
                        assert all(max(at._shape(c)[:2]) <= 32 for c in kept), kept
print('ok')
"""
    p = _py(code, 300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr


def test_causal_rows_are_the_decoders():
    """The default sweep compiles the causal attention kernels the captioning decoder launches:
    forward, dK/dV and dQ at D = 64 in fp16 and bf16 on both arches, with the padding mask (with
    and without dropout) and the forward unmasked (KV-cache decoding); nothing else causal."""
    code = """
import sys
sys.path.insert(0, 'scripts')
import check_gpu_compile as g
rows = g.all_cases([80, 90], ['_attn_'], extended=False, config_filter=['causal'])
assert rows and all(' causal' in c.config for c in rows)
assert all(c.constexprs['CAUSAL'] and c.constexprs['BLOCK_D'] == 64 for c in rows)
assert {c.dtype for c in rows} == {'fp16', 'bf16'} and {c.arch for c in rows} == {80, 90}
classes = {(c.kernel, c.arch, c.dtype, c.constexprs['HAS_MASK'], c.constexprs['DROPOUT'])
           for c in rows if c.chosen}
for arch in (80, 90):
    for dt in ('fp16', 'bf16'):
        for k in ('_attn_fwd_kernel', '_attn_bwd_dkdv_kernel', '_attn_bwd_dq_kernel'):
            assert (k, arch, dt, True, False) in classes and (k, arch, dt, True, True) in classes
        assert ('_attn_fwd_kernel', arch, dt, False, False) in classes
plain = g.all_cases([80], ['_attn_fwd_kernel'], extended=False)
assert all(c.constexprs['CAUSAL'] is (' causal' in c.config) for c in plain)
print('ok', len(rows))
"""
    p = _py(code, 300)
    assert p.returncode == 0 and p.stdout.strip().startswith("ok"), p.stdout + p.stderr


@pytest.mark.slow
def test_pruned_attention_configs_fail_and_kept_ones_pass(backend, tmp_path):
    """Every attention config that fails on an arch is one prune_configs drops there (so the
    autotuner never picks it): every head dim, dtype and switch (--all), pruned ones compiled
    too. About 1,500 compiles: hours on 2 cores."""
    r, rows = _run(
        ["--arch", "80", "90", "--kernel", "_attn_", "--all", "--with-pruned"],
        tmp_path,
        timeout=4 * 3600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert any(x["verdict"] == "pruned" for x in rows)
    _assert_rows_ok(rows)
