#!/usr/bin/env python
"""Compile every Triton kernel of r2d2/kernels/ for sm_80 and sm_90 without a GPU, in every
configuration its launcher or autotuner can choose, and report what the real compiler says.

For each (kernel, configuration, dtype, arch) it records: compiled yes/no (the error otherwise),
shared memory per block (the kernel's ``shared`` metadata), registers, stack and spill bytes (the
``ptxas -v`` log of the kernel's PTX, with triton's own ptxas and flags; registers and stack are
cross-checked against ``cuobjdump --dump-resource-usage`` of the cubin) and, for kernels that use
``tl.dot``, whether the SASS has tensor-core instructions (HMMA on sm_80, HGMMA or HMMA on sm_90);
they are required of 16-bit inputs (fp32 inputs use IEEE fp32 dots by design, on the FMA units).

A configuration fails if it does not compile, needs more shared memory than the arch gives a block
(sm_80 166912 bytes, sm_90 232448), spills registers, or has no tensor-core instruction where
``tl.dot`` is used on fp16 / bf16. Configurations the launcher provably never picks on an arch (the attention
autotuner's ``prune_configs_by``) are listed as ``pruned`` and compiled only with
``--with-pruned``; they do not fail.

The configurations come from the kernels' modules (autotune config lists, ``Tiles`` defaults,
``_blocks``), never from copies here. Usage::

    python scripts/check_gpu_compile.py --arch 80 90          # CI's table, exit 1 on a failure
    python scripts/check_gpu_compile.py --arch 80 90 --all    # every head dim and dtype too
    python scripts/check_gpu_compile.py --quick --kernel attn  # a representative subset
    python scripts/check_gpu_compile.py --arch 80 90 --write-docs --json /tmp/rows.json

Runs on CPU: TRITON_INTERPRET is removed from the environment before triton is imported. Compiles
run in worker processes (``--jobs``, default the CPU count); triton's on-disk cache and a small
results cache next to it make reruns fast.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # must precede the first triton import
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default; silences its warning

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMEM_LIMIT = {80: 166912, 90: 232448}
"""Shared memory a block may use (opt-in maximum): sm_80 163 KB, sm_90 227 KB."""
DOCS = ROOT / "docs" / "gpu.md"
BEGIN = "<!-- BEGIN triton-table"
END = "<!-- END triton-table -->"
_TORCH_TO_TT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


@dataclasses.dataclass
class Case:
    kernel: str  # function name in its module
    module: str  # r2d2.kernels.<module>
    config: str  # human-readable configuration
    dtype: str  # input dtype: fp16 / bf16 / fp32 / fp64 / "-" (fp32 state only)
    arch: int
    args: dict  # runtime argument -> "*<ty>" (pointer) or an example Python scalar
    constexprs: dict  # constexpr argument -> value ("tl.<dtype>" strings become tl dtypes)
    num_warps: int
    num_stages: int
    uses_dot: bool
    chosen: bool = True  # False: the launcher never picks it on this arch (pruned)
    quick: bool = False  # part of the --quick subset
    extended: bool = False  # only with --all (see _EXTENDED)


# ---------------------------------------------------------------------------------- the cases
ATTN_DEFAULT_D = 64
"""The attention head dim of every GPU preset (r2d2/engine/model/config.py: ViT-B/16 and RoBERTa
base 768 / 12 heads, ViT-L/14 and RoBERTa large 1024 / 16): the default sweep compiles attention at
BLOCK_D 64 only; ``--all`` adds 16, 32, 128 and 256 (the tiny CPU presets run D = 16)."""


# (HAS_MASK, DROPOUT, COUNT_TILES): every mask / dropout switch; the tests' tile counter without
# them (one representative; its cases are sorted next to the plain ones).
_ATTN_SWITCHES = (
    (False, False, False),
    (False, False, True),
    (True, False, False),
    (False, True, False),
    (True, True, False),
)
# (kind, HAS_MASK, DROPOUT) compiled with CAUSAL: what the captioning decoder launches, causal
# self-attention at D = 64 in fp16 / bf16 (the default sweep's head dim): training with padded
# captions, with and without attention dropout (forward and both backward kernels), and KV-cache
# decoding without a mask (forward only, under no_grad). Nothing else is causal in R2D2, so the
# other head dims, fp32 and the tile counter are not compiled causal (the CPU tests run the
# causal kernels in the interpreter); this adds about 140 compiles to the default sweep.
_ATTN_CAUSAL_SWITCHES = (
    ("fwd", True, False),
    ("fwd", True, True),
    ("fwd", False, False),
    ("dkdv", True, False),
    ("dkdv", True, True),
    ("dq", True, False),
    ("dq", True, True),
)


def _attention_case(
    at,
    kind,
    fn_name,
    jit,
    cfg,
    dt,
    ty,
    arch,
    bd,
    has_mask,
    dropout,
    count,
    chosen,
    first,
    causal=False,
):
    import torch

    Lq = Lk = 197  # any length that is not a multiple of 16: no extra alignment assumed
    H = 12
    D = bd

    def strides(L, D):  # contiguous [B, H, L, D] (unit stride in D becomes a constexpr 1)
        return (H * L * D, L * D, D, 1)

    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    args = dict(
        q_ptr="*" + ty,
        k_ptr="*" + ty,
        v_ptr="*" + ty,
        mask_ptr="*u8",
        lse_ptr="*fp32",
        cnt_ptr="*i32",
    )
    if kind == "fwd":
        args.update(o_ptr="*" + ty)
        names = [
            "sqb",
            "sqh",
            "sqm",
            "sqd",
            "skb",
            "skh",
            "skn",
            "skd",
            "svb",
            "svh",
            "svn",
            "svd",
            "sob",
            "soh",
            "som",
            "sod",
        ]
    else:
        args.update(do_ptr="*" + ty, delta_ptr="*fp32")
        if kind == "dkdv":
            args.update(dk_ptr="*" + ty, dv_ptr="*" + ty)
        else:
            args.update(dq_ptr="*" + ty)
        names = [
            "sqb",
            "sqh",
            "sqm",
            "sqd",
            "skb",
            "skh",
            "skn",
            "skd",
            "svb",
            "svh",
            "svn",
            "svd",
            "sdb",
            "sdh",
            "sdm",
            "sdd",
        ]
        args.update(scale=0.125)
    vals = strides(Lq, D) + strides(Lk, D) * 2 + strides(Lq, D)
    args.update(dict(zip(names, vals)))
    args.update(
        stride_mb=Lk,
        stride_mk=1,
        H=H,
        Lq=Lq,
        Lk=Lk,
        D=D,
        qk_scale=0.18,
        dropout_p=0.1,
        seed=1234,
        offset=5678,
    )
    ce = dict(
        HAS_MASK=has_mask,
        DROPOUT=dropout,
        CAUSAL=causal,
        BLOCK_D=bd,
        PRECISION=at._precision(dt),
        COUNT_TILES=count,
        BLOCK_M=bm,
        BLOCK_N=bn,
    )
    conf = (
        f"M{bm} N{bn} D{bd} w{cfg.num_warps} s{cfg.num_stages}"
        + (" mask" if has_mask else "")
        + (" dropout" if dropout else "")
        + (" causal" if causal else "")
        + (" count" if count else "")
    )
    quick = (
        first
        and not count
        and (
            (bd == 64 and dt == torch.float16 and not has_mask and not dropout and not causal)
            or (bd == 256 and dt == torch.float32 and has_mask and dropout)
            or (bd == 64 and dt == torch.bfloat16 and has_mask and not dropout and causal)
        )
    )
    # The tile counter is a test-only switch: fp16 and fp32 in the default run, bf16 with --all.
    ext = bd != ATTN_DEFAULT_D or (count and dt == torch.bfloat16)
    return Case(
        fn_name,
        "attention.triton",
        conf,
        ty,
        arch,
        _order(jit, args),
        ce,
        cfg.num_warps,
        cfg.num_stages,
        True,
        chosen=chosen,
        quick=quick,
        extended=ext,
    )


def _attention_cases(archs):
    import torch

    from r2d2.kernels.attention import triton as at

    cases = []
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    block_ds = at.block_d_choices()
    Lq = Lk = 197  # any length that is not a multiple of 16: no extra alignment assumed
    H = 12

    def strides(L, D):  # contiguous [B, H, L, D] (unit stride in D becomes a constexpr 1)
        return (H * L * D, L * D, D, 1)

    for kind, fn_name in (
        ("fwd", "_attn_fwd_kernel"),
        ("dkdv", "_attn_bwd_dkdv_kernel"),
        ("dq", "_attn_bwd_dq_kernel"),
    ):
        tuner = getattr(at, fn_name)
        jit = tuner.fn
        for arch in archs:
            for dt in dtypes:
                ty = _TORCH_TO_TT[str(dt).split(".")[1]]
                cands = set(at._SHAPES[(kind, 32 if dt.itemsize >= 4 else 16)])
                switches = [(m, d, c, False) for m, d, c in _ATTN_SWITCHES]
                if dt != torch.float32:
                    switches += [
                        (m, d, False, True) for k, m, d in _ATTN_CAUSAL_SWITCHES if k == kind
                    ]
                for bd in block_ds:
                    for has_mask, dropout, count, causal in switches:
                        if (count or causal) and bd != ATTN_DEFAULT_D:
                            continue  # test-only switch / decoder only: one head dim
                        kept_list = at.prune_configs(
                            tuner.configs,
                            kind,
                            bd,
                            dt.itemsize,
                            arch,
                            has_mask,
                            dropout,
                            count,
                            causal,
                        )
                        kept = {id(c) for c in kept_list}
                        first_kept = kept_list[0] if kept_list else None
                        for cfg in tuner.configs:
                            if at._shape(cfg) not in cands:
                                continue  # the other element size's candidate
                            cases.append(
                                _attention_case(
                                    at,
                                    kind,
                                    fn_name,
                                    jit,
                                    cfg,
                                    dt,
                                    ty,
                                    arch,
                                    bd,
                                    has_mask,
                                    dropout,
                                    count,
                                    id(cfg) in kept,
                                    cfg is first_kept,
                                    causal,
                                )
                            )
    # Preprocess (fixed BLOCK_M) and the test-only keep-mask kernel.
    for arch in archs:
        for dt in dtypes:
            ty = _TORCH_TO_TT[str(dt).split(".")[1]]
            for bd in block_ds:
                bm = at.DELTA_BLOCK_M
                args = dict(o_ptr="*" + ty, do_ptr="*" + ty, delta_ptr="*fp32")
                args.update(
                    dict(
                        zip(
                            ["sob", "soh", "som", "sod", "sdb", "sdh", "sdm", "sdd"],
                            strides(Lq, bd) * 2,
                        )
                    )
                )
                args.update(H=H, Lq=Lq, D=bd)
                cases.append(
                    Case(
                        "_attn_bwd_delta_kernel",
                        "attention.triton",
                        f"M{bm} D{bd} w4",
                        ty,
                        arch,
                        _order(at._attn_bwd_delta_kernel, args),
                        dict(BLOCK_M=bm, BLOCK_D=bd),
                        4,
                        3,
                        False,
                        quick=bd == 64 and dt == torch.float16,
                        extended=bd != ATTN_DEFAULT_D,
                    )
                )
        cases.append(
            Case(
                "_keep_mask_kernel",
                "attention.triton",
                "M16 N16 w4",
                "-",
                arch,
                _order(
                    at._keep_mask_kernel,
                    dict(out_ptr="*u8", Lq=Lq, Lk=Lk, dropout_p=0.1, seed=1, offset=2),
                ),
                dict(BLOCK_M=16, BLOCK_N=16),
                4,
                3,
                False,
                quick=True,
            )
        )
    return cases


CONTRASTIVE_DEFAULT_D = 768
"""The embedding dim of R2D2's GPU presets (``embed_dim``; the tiny CPU presets' 64 is in the same
d > 32 tile class): the default sweep compiles the contrastive kernels at d = 768 only; ``--all``
adds the d <= 16 and d <= 32 classes."""


def _contrastive_cases(archs):
    import torch

    from r2d2.kernels.contrastive import triton as ct

    cases = []
    b = n = 1000  # not a multiple of 16: no extra alignment assumed
    for arch in archs:
        for d in ct.GPU_D_CLASSES:
            t = ct.gpu_tiles(d)
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                ty = _TORCH_TO_TT[str(dt).split(".")[1]]
                x = dict(
                    q_ptr="*" + ty,
                    k_ptr="*" + ty,
                    tq_ptr="*" + ty,
                    tk_ptr="*" + ty,
                    rid_ptr="*i64",
                    cid_ptr="*i64",
                    s_ptr="*fp32",
                )
                prec = "ieee" if dt == torch.float32 else "tf32"
                tile = f"R{t.block_r} C{t.block_c} K{t.block_k}"
                quick_d = d == 768 and dt != torch.bfloat16
                ext = d != CONTRASTIVE_DEFAULT_D
                for teacher in (False, True):
                    for neg in (False, True):
                        args = dict(
                            x,
                            rp_ptr="*fp32",
                            rgi_ptr="*i32",
                            cp_ptr="*fp32",
                            cgi_ptr="*i32",
                            b=b,
                            n=n,
                            D=d,
                            TPC=3,
                            row_off=1000,
                            col_off=2000,
                            key_r=12345,
                            key_c=678,
                        )
                        ce = dict(
                            HAS_TEACHER=teacher,
                            NEG=neg,
                            PREC=prec,
                            BLOCK_R=t.block_r,
                            BLOCK_C=t.block_c,
                            BLOCK_K=t.block_k,
                        )
                        w = ct.gpu_warps("fwd", d, arch, teacher, neg)
                        conf = (
                            f"d{d} {tile} w{w}"
                            + (" teacher" if teacher else "")
                            + (" neg" if neg else "")
                        )
                        cases.append(
                            Case(
                                "_fwd_kernel",
                                "contrastive.triton",
                                conf,
                                ty,
                                arch,
                                _order(ct._fwd_kernel, args),
                                ce,
                                w,
                                ct.NUM_STAGES,
                                True,
                                quick=quick_d and teacher == neg,
                                extended=ext,
                            )
                        )
                    for grad in (False, True):
                        for fn_name, gname, oname in (
                            ("_bwd_rows_kernel", "HAS_DQ", "dq_ptr"),
                            ("_bwd_cols_kernel", "HAS_DK", "dk_ptr"),
                        ):
                            fn = getattr(ct, fn_name)
                            args = dict(
                                x,
                                rst_ptr="*fp32",
                                cst_ptr="*fp32",
                                coef_ptr="*fp32",
                                bco_ptr="*fp32",
                            )
                            args[oname] = "*fp32"
                            args["ds_ptr" if oname == "dq_ptr" else "dsc_ptr"] = "*fp32"
                            args.update(b=b, n=n, D=d, TPS=3, alpha=0.5)
                            ce = dict(
                                HAS_TEACHER=teacher,
                                PREC=prec,
                                SINGLE=d <= t.block_d,
                                LP=ct._LP_SCALE_FP16 if dt == torch.float16 else 1.0,
                                BLOCK_R=t.block_r,
                                BLOCK_C=t.block_c,
                                BLOCK_K=t.block_k,
                                BLOCK_D=t.block_d,
                            )
                            ce[gname] = grad
                            w = ct.gpu_warps(
                                "rows" if gname == "HAS_DQ" else "cols", d, arch, teacher, False
                            )
                            conf = (
                                f"d{d} {tile} D{t.block_d} w{w}"
                                + (" teacher" if teacher else "")
                                + ("" if grad else " no-grad")
                            )
                            cases.append(
                                Case(
                                    fn_name,
                                    "contrastive.triton",
                                    conf,
                                    ty,
                                    arch,
                                    _order(fn, args),
                                    ce,
                                    w,
                                    ct.NUM_STAGES,
                                    True,
                                    quick=quick_d and grad,
                                    extended=ext,
                                )
                            )
        for n_cols in ct.MERGE_N_CLASSES:
            block = ct.merge_block(n_cols)
            for init in (False, True):
                for teacher in (False, True):
                    for neg in (False, True):
                        args = dict(
                            st_ptr="*fp32", sgi_ptr="*i32", p_ptr="*fp32", pgi_ptr="*i32", n=n, P=3
                        )
                        conf = (
                            f"BLOCK{block} w4"
                            + (" init" if init else "")
                            + (" teacher" if teacher else "")
                            + (" neg" if neg else "")
                        )
                        cases.append(
                            Case(
                                "_merge_kernel",
                                "contrastive.triton",
                                conf,
                                "-",
                                arch,
                                _order(ct._merge_kernel, args),
                                dict(INIT=init, HAS_TEACHER=teacher, NEG=neg, BLOCK=block),
                                4,
                                3,
                                False,
                                quick=block == 128 and teacher and neg and not init,
                            )
                        )
    return cases


def _distill_cases(archs):
    import torch

    from r2d2.kernels.distill_kl import saved_grad_dtype
    from r2d2.kernels.distill_kl import triton as dk

    cases = []
    for arch in archs:
        seen = set()
        for cols in dk.GPU_WIDTH_CLASSES:
            for dt in dk._DTYPES:
                block_r, block_c, warps, one_tile = dk._blocks(cols, dt.itemsize)
                if (dt, block_r, block_c, warps, one_tile) in seen:
                    continue  # float64 rows above MAX_ONE_TILE_FP64 stream: one case for them
                seen.add((dt, block_r, block_c, warps, one_tile))
                ty = _TORCH_TO_TT[str(dt).split(".")[1]]
                acc = "fp64" if dt == torch.float64 else "fp32"
                gty = _TORCH_TO_TT[str(saved_grad_dtype(dt)).split(".")[1]]
                for grad in (False, True):
                    args = dict(
                        s_ptr="*" + ty,
                        t_ptr="*" + ty,
                        loss_ptr="*" + acc,
                        grad_ptr="*" + gty,
                        R=1000,
                        C=cols,
                        inv_t=0.5,
                        t_sq=4.0,
                        coef=2.0,
                        inv_t_lo=1e-9,
                        t_sq_lo=0.0,
                        coef_lo=0.0,
                    )
                    ce = dict(
                        NEED_GRAD=grad,
                        ONE_TILE=one_tile,
                        BLOCK_R=block_r,
                        BLOCK_C=block_c,
                        ACC="tl.float64" if acc == "fp64" else "tl.float32",
                    )
                    conf = (
                        f"C<={block_c if one_tile else 'inf'} R{block_r} C{block_c} w{warps}"
                        + (" one-tile" if one_tile else " streaming")
                        + (" grad" if grad else "")
                    )
                    cases.append(
                        Case(
                            "_distill_kl_fwd_kernel",
                            "distill_kl.triton",
                            conf,
                            ty,
                            arch,
                            _order(dk._distill_kl_fwd_kernel, args),
                            ce,
                            warps,
                            dk.NUM_STAGES,
                            False,
                            quick=grad
                            and dt == torch.float32
                            and cols in (768, dk.MAX_ONE_TILE, 2 * dk.MAX_ONE_TILE),
                            extended=dt == torch.float64,
                        )
                    )
    return cases


_EXTENDED = """The default run (what CI runs: about 1,250 CPU seconds cold, so 11 minutes on 2 idle
cores; ``--cold`` times it) compiles, for both arches, every kernel with every switch and every
configuration its launcher or autotuner keeps, at the shapes and dtypes R2D2 launches on a GPU:
attention at head dim 64 (every GPU preset) in fp16, bf16 and fp32, with and without each of its
mask and dropout switches (the test-only tile counter in fp16 and fp32); contrastive at d = 768
(embed_dim); distill_kl at every width class in fp16, bf16 and fp32; the merge kernel at every
width class. ``--all`` adds the other attention head dims (16, 32, 128, 256: every BLOCK_D the
launcher pads D <= 256 to; the tiny CPU presets run 16), the tile counter in bf16, contrastive at
d <= 16 and d <= 32, and distill_kl in fp64 (not a training dtype): 1,767 compiles, hours on 2
cores."""


def _order(fn, args):
    """``args`` (runtime arguments only) in the kernel's parameter order; a missing or unknown
    name is a bug of this script, caught here rather than as a confusing compile error."""
    jit = _jit(fn)
    names = [p.name for p in jit.params if not p.is_constexpr]
    missing = [a for a in names if a not in args]
    extra = [a for a in args if a not in names]
    if missing or extra:
        raise SystemExit(f"check_gpu_compile: {jit.__name__}: missing {missing}, unknown {extra}")
    return {a: args[a] for a in names}


def _jit(fn):
    """The JITFunction of a kernel (an Autotuner wraps it)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def all_cases(archs, kernel_filter=None, quick=False, extended=True, config_filter=None):
    cases = _attention_cases(archs) + _contrastive_cases(archs) + _distill_cases(archs)
    if quick:  # its own subset, whether or not extended
        cases = [c for c in cases if c.quick]
    elif not extended:
        cases = [c for c in cases if not c.extended]
    if kernel_filter:  # a full kernel name matches itself only, anything else as a substring
        names = {c.kernel for c in cases}
        cases = [
            c
            for c in cases
            if any(c.kernel == k if k in names else k in c.kernel for k in kernel_filter)
        ]
    if config_filter:  # e.g. "causal": only the configurations whose description has it
        cases = [c for c in cases if any(f in c.config.split() for f in config_filter)]
    return cases


# ------------------------------------------------------------------------------- compiling
def _tools():
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

    def find(name):
        p = bin_dir / name
        if p.exists():
            return str(p)
        import shutil

        return shutil.which(name)

    return find("cuobjdump"), get_ptxas


_RES_CACHE = None


def _res_cache() -> Path:
    global _RES_CACHE
    if _RES_CACHE is None:
        from triton import knobs

        _RES_CACHE = Path(knobs.cache.dir) / "r2d2_check_gpu_compile"
        _RES_CACHE.mkdir(parents=True, exist_ok=True)
    return _RES_CACHE


def _signature(jit, case: Case):
    """(signature, constexprs, attrs) as triton's launcher would build them for these arguments:
    pointers 16-byte aligned (torch allocations are), integers specialised like triton does (a 1
    becomes a constexpr, a multiple of 16 gets the divisibility attribute)."""
    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig, ce, attrs = {}, {}, {}
    for i, p in enumerate(jit.params):
        name = p.name
        if p.is_constexpr:
            v = case.constexprs[name]
            if isinstance(v, str) and v.startswith("tl."):
                v = getattr(tl, v[3:])
            sig[name] = "constexpr"
            ce[name] = v
            continue
        v = case.args[name]
        if isinstance(v, str) and v.startswith("*"):
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            ce[name] = spec
        elif spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return sig, ce, attrs


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def compile_case(case: Case) -> dict:
    """Compile one case and measure it; returns a table row (dict)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource

    row = dict(
        kernel=case.kernel,
        config=case.config,
        dtype=case.dtype,
        arch=case.arch,
        num_warps=case.num_warps,
        num_stages=case.num_stages,
        uses_dot=case.uses_dot,
        chosen=case.chosen,
        compiled=False,
        error="",
        shared=None,
        regs=None,
        stack=None,
        spill_stores=None,
        spill_loads=None,
        spills=None,
        tensor_cores=None,
        cuobjdump_regs=None,
        cuobjdump_stack=None,
    )
    mod = importlib.import_module(f"r2d2.kernels.{case.module}")
    fn = getattr(mod, case.kernel)
    jit = _jit(fn)
    sig, ce, attrs = _signature(jit, case)
    import contextlib
    import io

    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # a fresh compile prints ptxas -v's log: keep it
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(
                ASTSource(fn=jit, signature=sig, constexprs=ce, attrs=attrs),
                target=GPUTarget("cuda", case.arch, 32),
                options=dict(num_warps=case.num_warps, num_stages=case.num_stages),
            )
    except Exception as e:  # noqa: BLE001 - any compiler error is a result
        msg = str(e).strip().splitlines()
        row["error"] = (type(e).__name__ + ": " + (msg[0] if msg else ""))[:300]
        return _verdict(row)
    row["compiled"] = True
    row["shared"] = int(k.metadata.shared)
    cache = _res_cache() / f"{k.hash}.json"
    if cache.exists():
        try:
            row.update(json.loads(cache.read_text()))
            return _verdict(row)
        except (OSError, ValueError):
            pass
    cuobjdump, get_ptxas = _tools()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        log = log.getvalue()
        if "Used" not in log:  # triton's cache had the cubin: run its ptxas again for the log
            # The flags of triton's make_cubin (nvidia backend), -v for the resource log.
            cmd = [
                get_ptxas(case.arch).path,
                "-lineinfo",
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(case.arch)}",
                str(ptx),
                "-o",
                str(Path(tmp) / "v.o"),
            ]
            log = subprocess.run(cmd, capture_output=True, text=True).stderr
        for key, rx in _PTXAS_RE.items():
            m = rx.search(log)
            res[key] = int(m.group(1)) if m else None
        res["spill_stores"], res["spill_loads"] = res.pop("spill_st"), res.pop("spill_ld")
        if cuobjdump:
            usage = subprocess.run(
                [cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True
            ).stdout
            m = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage)
            if m:
                res["cuobjdump_regs"], res["cuobjdump_stack"] = int(m.group(1)), int(m.group(2))
            if case.uses_dot:
                sass = subprocess.run(
                    [cuobjdump, "-sass", str(cubin)], capture_output=True, text=True
                ).stdout
                ops = ("HMMA",) if case.arch < 90 else ("HGMMA", "HMMA")
                res["tensor_cores"] = any(re.search(rf"\b{op}\b", sass) for op in ops)
    res["spills"] = (
        None if res["spill_stores"] is None else res["spill_stores"] + res["spill_loads"]
    )
    cache.write_text(json.dumps(res))
    row.update(res)
    return _verdict(row)


def _needs_tc(row: dict) -> bool:
    """Tensor cores are required of the tl.dot kernels on 16-bit inputs; fp32 inputs use IEEE
    fp32 dots by design (no TF32), which run on the FMA units."""
    return row["uses_dot"] and row["dtype"] in ("fp16", "bf16")


def _tc(row: dict) -> str:
    if not row["uses_dot"]:
        return "n/a"
    if row["tensor_cores"] is None:
        return "-"
    return _fmt(row["tensor_cores"]) + ("" if _needs_tc(row) else " (ieee fp32)")


def _verdict(row: dict) -> dict:
    why = []
    if not row["compiled"]:
        why.append("does not compile")
    else:
        if row["shared"] > SMEM_LIMIT[row["arch"]]:
            why.append(f"shared {row['shared']} > {SMEM_LIMIT[row['arch']]}")
        if row["spills"] is None:
            why.append("no ptxas resource log")
        elif row["spills"]:
            why.append(f"spills {row['spill_stores']}+{row['spill_loads']} bytes")
        if row["cuobjdump_regs"] is not None and row["cuobjdump_regs"] != row["regs"]:
            why.append(f"ptxas {row['regs']} vs cuobjdump {row['cuobjdump_regs']} registers")
        if _needs_tc(row) and row["tensor_cores"] is False:
            why.append("no tensor-core instruction")
    row["problems"] = "; ".join(why)
    if not why:
        row["verdict"] = "ok"
    elif row["chosen"]:
        row["verdict"] = "FAIL"
    else:
        row["verdict"] = "pruned"
    return row


def _skipped(case: Case) -> dict:
    """The row of a pruned configuration that is not compiled (the default: some of them take
    ptxas minutes, and the autotuner never runs them)."""
    return dict(
        kernel=case.kernel,
        config=case.config,
        dtype=case.dtype,
        arch=case.arch,
        num_warps=case.num_warps,
        num_stages=case.num_stages,
        uses_dot=case.uses_dot,
        chosen=False,
        compiled=None,
        error="",
        shared=None,
        regs=None,
        stack=None,
        spill_stores=None,
        spill_loads=None,
        spills=None,
        tensor_cores=None,
        cuobjdump_regs=None,
        cuobjdump_stack=None,
        verdict="pruned",
        problems="not compiled (--with-pruned compiles it)",
    )


def run_cases(cases, jobs, progress=True, with_pruned=False):
    t0 = time.time()
    skipped = {i: _skipped(c) for i, c in enumerate(cases) if not (c.chosen or with_pruned)}
    todo = [(i, c) for i, c in enumerate(cases) if i not in skipped]
    rows = dict(skipped)
    if jobs <= 1:
        for j, (i, c) in enumerate(todo, 1):
            rows[i] = compile_case(c)
            if progress:
                _progress(j, len(todo), rows[i], t0)
    else:
        with ProcessPoolExecutor(jobs) as ex:
            futs = {ex.submit(compile_case, c): i for i, c in todo}
            for j, f in enumerate(as_completed(futs), 1):
                rows[futs[f]] = f.result()
                if progress:
                    _progress(j, len(todo), rows[futs[f]], t0)
    return [rows[i] for i in range(len(cases))]


def _progress(i, n, r, t0):
    flag = "" if r["verdict"] == "ok" else f"  {r['verdict']}: {r['problems']}"
    print(
        f"[{i}/{n} {time.time() - t0:5.0f}s] sm_{r['arch']} {r['kernel']} {r['dtype']} "
        f"{r['config']}{flag}",
        file=sys.stderr,
        flush=True,
    )


# ---------------------------------------------------------------------------------- reports
def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def table(rows) -> str:
    head = (
        "| kernel | config | dtype | arch | compiled | shared bytes | regs | spills "
        "| tensor cores | verdict |\n|---|---|---|---|---|---:|---:|---:|---|---|\n"
    )
    lines = []
    for r in rows:
        verdict = r["verdict"] + (f" ({r['problems']})" if r["problems"] else "")
        if r["compiled"] is False:
            verdict += f": {r['error']}".replace("|", "/")
        lines.append(
            f"| {r['kernel']} | {r['config']} | {r['dtype']} | sm_{r['arch']} "
            f"| {_fmt(r['compiled'])} | {_fmt(r['shared'])} | {_fmt(r['regs'])} "
            f"| {_fmt(r['spills'])} | {_tc(r)} "
            f"| {verdict} |"
        )
    return head + "\n".join(lines) + "\n"


def summary(rows) -> str:
    out = []
    by = {}
    for r in rows:
        by.setdefault((r["kernel"], r["arch"]), []).append(r)
    out.append(
        "| kernel | arch | configs | ok | pruned | FAIL | max shared | max regs "
        "| max spills | tensor cores |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for (kname, arch), rs in sorted(by.items()):
        chosen = [r for r in rs if r["chosen"]]
        comp = [r for r in chosen if r["compiled"]]
        tcs = [r["tensor_cores"] for r in comp if _needs_tc(r)]
        tc = (
            "n/a"
            if not rs[0]["uses_dot"]
            else "-"
            if not tcs
            else "yes (fp16/bf16)"
            if all(tcs)
            else "NO"
        )
        out.append(
            f"| {kname} | sm_{arch} | {len(rs)} | "
            f"{sum(r['verdict'] == 'ok' for r in rs)} | "
            f"{sum(r['verdict'] == 'pruned' for r in rs)} | "
            f"{sum(r['verdict'] == 'FAIL' for r in rs)} | "
            f"{max((r['shared'] for r in comp), default='-')} | "
            f"{max((r['regs'] or 0 for r in comp), default='-')} | "
            f"{max((r['spills'] or 0 for r in comp), default='-')} | {tc} |"
        )
    return "\n".join(out) + "\n"


def versions() -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    return f"triton {triton.__version__}, ptxas {ptxas.version} (`{Path(ptxas.path).name}`)"


def write_docs(rows, archs, elapsed, cmd_args=""):
    text = DOCS.read_text()
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0:
        raise SystemExit(f"check_gpu_compile: {DOCS} lacks the {BEGIN} ... {END} block")
    i = text.index("-->", i) + 3
    fails = sum(r["verdict"] == "FAIL" for r in rows)
    pruned = sum(r["verdict"] == "pruned" for r in rows)
    body = (
        f"\nGenerated by `python scripts/check_gpu_compile.py --arch {' '.join(map(str, archs))}"
        f"{cmd_args} --write-docs` with {versions()}, without a GPU, in {elapsed / 60:.0f} minutes on "
        f"{os.cpu_count()} cores. {len(rows)} configurations: {len(rows) - fails - pruned} "
        f"ok, {pruned} pruned (the attention autotuner's `prune_configs_by` never picks them on "
        f"that arch: `attention/triton.py: prune_configs`), {fails} failing. "
        f"{_EXTENDED.replace(chr(10), ' ')} Shared memory "
        f"is per block (limit sm_80 {SMEM_LIMIT[80]}, sm_90 {SMEM_LIMIT[90]} bytes), "
        f"registers and spill bytes (stores + loads) per thread from `ptxas -v`, registers "
        f"cross-checked with `cuobjdump --dump-resource-usage`; tensor cores: HMMA (sm_80) "
        f"or HGMMA/HMMA (sm_90) in the SASS of kernels that use `tl.dot`, required of fp16 / "
        f"bf16 inputs (fp32 inputs use IEEE fp32 dots by design).\n\n"
        f"Summary per kernel:\n\n{summary(rows)}\n<details><summary>Every configuration "
        f"({len(rows)} rows)</summary>\n\n{table(rows)}\n</details>\n"
    )
    DOCS.write_text(text[:i] + body + text[j:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=_EXTENDED,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--kernel", nargs="+", help="only kernels whose name contains one of these")
    ap.add_argument(
        "--config",
        nargs="+",
        help="only configurations with one of these words (e.g. causal, mask, dropout, w8)",
    )
    ap.add_argument("--quick", action="store_true", help="a representative subset")
    ap.add_argument(
        "--all",
        action="store_true",
        help="also the head dims, dtypes and classes R2D2 does not launch (see below)",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="compile in a fresh temporary triton cache (and results cache), to time a cold run",
    )
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument(
        "--write-docs",
        action="store_true",
        help=f"replace the triton-table block of {DOCS.relative_to(ROOT)}",
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--with-pruned",
        action="store_true",
        help="also compile the configurations the autotuner prunes on each arch",
    )
    ap.add_argument(
        "--summary-only", action="store_true", help="print the per-kernel summary, not every row"
    )
    a = ap.parse_args(argv)
    if a.cold:  # read when first used, in this process and the workers it forks
        cold = tempfile.TemporaryDirectory(prefix="r2d2-triton-cold-")
        os.environ["TRITON_CACHE_DIR"] = cold.name
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"check_gpu_compile: triton's NVIDIA backend is unavailable: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    cases = all_cases(a.arch, a.kernel, a.quick, extended=a.all, config_filter=a.config)
    print(
        f"check_gpu_compile: {len(cases)} compiles, {a.jobs} processes, {versions()}",
        file=sys.stderr,
        flush=True,
    )
    rows = run_cases(cases, a.jobs, with_pruned=a.with_pruned)
    elapsed = time.time() - t0
    if not a.summary_only:
        print(table(rows))
    print(summary(rows))
    fails = [r for r in rows if r["verdict"] == "FAIL"]
    print(
        f"{len(rows)} compiles in {elapsed:.0f} s: {len(rows) - len(fails)} pass "
        f"({sum(r['verdict'] == 'pruned' for r in rows)} of them pruned), {len(fails)} fail"
    )
    for r in fails:
        print(
            f"FAIL sm_{r['arch']} {r['kernel']} {r['dtype']} {r['config']}: {r['problems']}"
            + (f" {r['error']}" if r["error"] else "")
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.write_docs:
        extra = (
            (" --kernel " + " ".join(a.kernel) if a.kernel else "")
            + (" --config " + " ".join(a.config) if a.config else "")
            + (" --quick" if a.quick else "")
            + (" --all" if a.all else "")
        )
        write_docs(rows, a.arch, elapsed, extra)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
