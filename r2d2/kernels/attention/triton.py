"""Attention, Triton kernels and launchers (the math, the contract and the dispatch live in
attention.py).

Forward (one program = ``BLOCK_M`` queries of one (batch, head)), FlashAttention-2 style::

    for each K/V tile j (BLOCK_N keys):
        skip it when none of its keys is attended (key_padding_mask all False or past Lk)
        load k_j, v_j with padded keys read as 0 (NaN/Inf in a padding slot cannot leak)
        s   = (q k_j^T) * scale * log2(e)           masked keys -> -inf
        m'  = max(m, rowmax s);  p = exp2(s - m');  l = l * exp2(m - m') + rowsum p
        acc = acc * exp2(m - m') + dropout(p) v_j
    o = acc / l  (0 where l == 0: every key masked);  lse2 = m + log2 l (+inf where l == 0)

Backward recomputes p from the saved ``lse2`` (no [Lq, Lk] matrix is ever stored)::

    delta = rowsum(dO * O)                       (preprocess kernel)
    dp    = dO v^T, dropped/rescaled like p;  ds = p * (dp - delta)
    dv    = sum_i dropout(p)^T dO;  dk = scale * ds^T q;  dq = scale * ds k

Causal (``CAUSAL``, bottom-right: query i sees key j iff j <= i + Lk - Lq): a query tile's key
range is split by ``_causal_keys`` into tiles every row of the tile sees (run unmasked), tiles
straddling the diagonal (``DIAG``: the one elementwise mask) and tiles wholly above it, which the
forward and dQ loops never reach (their loop stops there); the dK/dV loop of a key tile starts at
the first query tile that sees one of its keys (``_causal_queries``). So causal self-attention
does about half the tile work, and nothing is loaded from a tile a query tile cannot see.

dk/dv and dq are two kernels (one looping over query tiles per key tile, one over key tiles per
query tile) rather than one kernel with fp32 atomics on dq: at R2D2's lengths (<= 577) the second
q k^T recompute is cheap, the results are deterministic, and no zero-initialised fp32 dq buffer
plus a cast pass is needed.

Budget: forward reads q, k, v once per query tile (K/V are re-read Lq / BLOCK_M times, from L2 at
these sizes) and writes o and a 4-byte LSE per row; backward reads q, k, v, o, dO and writes dq,
dk, dv. FLOPs: 4 B H Lq Lk D forward, 10 B H Lq Lk D backward (2.5x), minus skipped tiles.

Dropout: a keep mask drawn with Philox (``tl.rand(seed, offset)``), the offset of element
(bh, i, j) being ``bh * Lq * Lk + i * Lk + j`` (mod 2^32), so the backward (and
``dropout_keep_mask``) regenerate exactly the forward's mask. Kept probabilities are scaled by
1 / (1 - p); the softmax normaliser ``l`` uses the undropped ``p``.

Tests: the launchers take an optional int32 ``tile_count`` per (batch, head) that the kernels
increment for every tile they process (forward and dQ: K/V tiles; dK/dV: query tiles; compiled
out otherwise), so the padding and causal skips are asserted, not assumed.

Limits: q/k/v any strides (unit stride in D is fastest), D <= 256 (padded to a power of two with
masked loads, so D = 80 works), fp16/bf16/fp32 (fp32 uses IEEE dots on GPU, not TF32). On CPU
tensors only under ``TRITON_INTERPRET=1``, where autotuning is reduced to one config.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from r2d2.kernels.dispatch import triton_interpret

LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel and element size: "16" for
# fp16 / bf16 (tensor-core dots), "32" for fp32 (IEEE dots on the FMA units). The autotuner holds
# their union; ``prune_configs`` keeps those of the call's element size that fit its class.
_SHAPES = {
    ("fwd", 16): [
        (64, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 32, 4, 3),
        (64, 32, 4, 2),
        (32, 64, 4, 2),
        (32, 32, 4, 1),
    ],
    # dK/dV: BLOCK_N keys held per program, BLOCK_M queries streamed.
    ("dkdv", 16): [
        (32, 64, 4, 2),
        (64, 64, 4, 2),
        (32, 128, 8, 2),
        (64, 128, 8, 2),
        (32, 32, 4, 1),
        (32, 32, 8, 1),
    ],
    # dQ: BLOCK_M queries held, BLOCK_N keys streamed.
    ("dq", 16): [
        (64, 32, 4, 2),
        (64, 64, 4, 2),
        (128, 32, 8, 2),
        (128, 64, 8, 2),
        (32, 32, 4, 1),
        (32, 32, 8, 1),
    ],
    # fp32: compiled for sm_80 (triton 3.9, scripts/check_gpu_compile.py --with-pruned), every
    # tile larger than 32 x 32 spills at D >= 64 (forward 300-34,292 bytes a thread, dK/dV
    # 32,280-73,196, dQ 752-50,908; at D = 32 most of them too), so fp32 gets unpipelined 32 x 32
    # tiles, at 4 and 8 warps (``_SPILLS`` drops one where it spills), and where both spill in
    # some classes one narrower tile (``_FP32_NARROW``).
    ("fwd", 32): [(32, 32, 4, 1), (32, 32, 8, 1), (16, 32, 8, 1)],
    ("dkdv", 32): [(32, 32, 4, 1), (32, 32, 8, 1), (32, 16, 8, 1)],
    ("dq", 32): [(32, 32, 4, 1), (32, 32, 8, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
}
# (kind, BLOCK_D) -> the one narrower fp32 tile kept there (16 queries, or 16 keys for dK/dV),
# for the classes where both 32 x 32 tiles spill (``_SPILLS``): on sm_90 the forward at D >= 128,
# dK/dV at D = 256 (at D = 128 with dropout) and dQ at D = 256; on sm_80 dQ at D = 32 and 128
# with dropout. Compiled with every switch on sm_80 and sm_90, it is spill-free except where
# ``_SPILLS`` says (a 32 x 32 one is kept there). dQ at D = 256 uses 16 x 16: 16 x 32 spills at
# 4 warps (sm_80 64-88 bytes with dropout, sm_90 4,316-5,200 without) and at 8 warps (sm_80 32
# with the mask alone).
_FP32_NARROW = {
    ("fwd", 128): (16, 32, 8, 1),
    ("fwd", 256): (16, 32, 8, 1),
    ("dkdv", 128): (32, 16, 8, 1),
    ("dkdv", 256): (32, 16, 8, 1),
    ("dq", 32): (16, 32, 4, 1),
    ("dq", 128): (16, 32, 4, 1),
    ("dq", 256): (16, 16, 4, 1),
}


def _configs(kind: str) -> list[triton.Config]:
    """Block configs autotuned per ``_TUNE_KEY`` (Lq, Lk, D, masked, dropout, dtypes): the union of
    ``_SHAPES`` for ``kind``; a single small one under the interpreter, where every config would
    be run (slowly) on the CPU."""
    if triton_interpret():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    shapes = list(dict.fromkeys(_SHAPES[(kind, 16)] + _SHAPES[(kind, 32)]))
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in shapes
    ]


def block_d_choices() -> list[int]:
    """Every BLOCK_D the launchers can pick (D <= 256 padded to a power of two, at least 16)."""
    return sorted({_block_d(D) for D in range(1, 257)})


def _shape(c) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _spills_by_rule(kind: str, bits: int, block_d: int, shape) -> bool:
    """Tiles dropped by kind and head dim. fp32: the narrow tiles outside their class
    (``_FP32_NARROW``). fp16 / bf16: the tiles that run out of registers at wide head dims
    (compiled for sm_80 with triton 3.9 / ptxas 13.4, bytes of spill stores + loads a thread,
    mask + dropout unless said):

    - forward at D >= 128: a 64-key tile's scores and probabilities no longer fit beside the
      [BLOCK_M, D] fp32 accumulator (D = 128: M64 N64 104, M128 N64 300, M32 N64 8 without any
      switch; D = 256: M32 N64 204), so BLOCK_N = 32 only;
    - dK/dV with BLOCK_N = 128 holds two fp32 [128, D] accumulators: 255 registers from D = 32 on
      and spills (D = 32: M64 N128 20 without switches, 44; D = 64: M32 N128 516 / 660, M64 N128
      524 / 576), so 128-key tiles only at D = 16;
    - dQ at D >= 128 with more than 2048 scores a tile (M64 N64 148, M128 N32 48, M128 N64 128
      without switches and 1148)."""
    m, n = shape[0], shape[1]
    if bits != 16:
        return (m, n) != (32, 32) and _FP32_NARROW.get((kind, block_d)) != shape
    if kind == "fwd":
        return block_d >= 128 and n > 32
    if kind == "dkdv":
        return n == 128 and block_d > 16
    return block_d >= 128 and m * n > 2048


# The remaining configs measured to spill in some classes only, where the footprint and the rules
# above keep them (triton 3.9 / ptxas 13.4, scripts/check_gpu_compile.py --with-pruned; bytes of
# spill stores + loads a thread). Key: (kind, bits, BLOCK_D, (BLOCK_M, BLOCK_N, num_warps,
# num_stages)); value: {arch: switches}, "80" for sm_80 and the other pre-Hopper archs, "90" for
# sm_90 and later. Switches, any of: "any"; "mask" (with a key-padding mask, dropout or not);
# "dropout" (with dropout, masked or not: the Philox draws tip them over; some spill with dropout
# alone and not with mask + dropout, or the other way round); "count" (with the tests' tile
# counter, COUNT_TILES); "mask-only" (a mask without dropout or the tile counter: the counter's
# class, not compiled by default, would otherwise keep no config); "causal" (CAUSAL: the two loop ranges, each with its own copy of the tile
# body, hold more live values). The 16-bit entries at D = 16 / 32 were measured on sm_80 only (those
# head dims are not compiled for sm_90 yet) and are pruned on sm_90 too.
_SPILLS: dict[tuple, dict[str, tuple[str, ...]]] = {
    # fp16 / bf16 at D = 16, mask + dropout: 8 bytes each (sm_80).
    ("fwd", 16, 16, (64, 64, 4, 3)): {"80": ("dropout",), "90": ("dropout",)},
    ("fwd", 16, 16, (128, 64, 8, 3)): {"80": ("dropout",), "90": ("dropout",)},
    ("dkdv", 16, 16, (32, 64, 4, 2)): {"80": ("dropout",), "90": ("dropout",)},
    ("dq", 16, 16, (128, 64, 8, 2)): {"80": ("dropout",), "90": ("dropout",)},
    # fp16 / bf16 dQ at D = 32, mask + dropout: 28 bytes (sm_80).
    ("dq", 16, 32, (128, 32, 8, 2)): {"80": ("dropout",), "90": ("dropout",)},
    # fp16 / bf16 at D = 64 with dropout alone (none with mask + dropout): dK/dV M64 N64 40 bytes
    # on sm_80, 56 on sm_90; dK/dV M32 N64 32 on sm_90; dQ M64 N64 88 on sm_80.
    # Causal (compiled at D = 64, fp16 and bf16 alike, for the decoder's classes: mask, mask +
    # dropout, and the unmasked forward): forward M64 N32 s2 24-28 bytes on sm_80 (unmasked and
    # mask + dropout); dK/dV M64 N64 60+56 on sm_80, 60+80 on sm_90 (mask), M32 N64 12-32 on sm_80
    # (mask, mask + dropout), M32 N32 8 warps 20 on sm_80 (mask + dropout) and 8 on sm_90 (mask);
    # dQ M32 N32 8 warps 36 on sm_90 (mask + dropout). Pruned for every causal class there.
    ("fwd", 16, 64, (64, 32, 4, 2)): {"80": ("causal",)},
    # dK/dV with the tile counter (it counts every query tile inside the loop since the causal
    # change): M64 N64 24 bytes on sm_80.
    ("dkdv", 16, 64, (64, 64, 4, 2)): {
        "80": ("dropout", "causal", "count"),
        "90": ("dropout", "causal"),
    },
    ("dkdv", 16, 64, (32, 64, 4, 2)): {"80": ("causal",), "90": ("dropout",)},
    ("dkdv", 16, 64, (32, 32, 8, 1)): {"80": ("causal",), "90": ("causal",)},
    ("dq", 16, 64, (64, 64, 4, 2)): {"80": ("dropout",)},
    ("dq", 16, 64, (32, 32, 8, 1)): {"90": ("causal",)},
    # fp32 forward. D = 32, 4 warps, with dropout: 8-16 bytes on sm_90. D = 64, 4 warps, with the
    # tile counter: 752 bytes on sm_80, 700 on sm_90 (92 registers and none without it). D = 128:
    # 4 warps 1,328-1,432 bytes and 8 warps 140-240 on sm_90 (none on sm_80); 16 x 32 8 bytes
    # with mask + dropout on sm_80. D = 256: 4 warps 3,036 (41,844 with mask + dropout) on sm_80;
    # 8 warps 5,820 (4,192-20,704) on sm_90.
    ("fwd", 32, 32, (32, 32, 4, 1)): {"90": ("dropout",)},
    ("fwd", 32, 64, (32, 32, 4, 1)): {"80": ("count",), "90": ("count",)},
    ("fwd", 32, 128, (32, 32, 4, 1)): {"90": ("any",)},
    ("fwd", 32, 128, (32, 32, 8, 1)): {"90": ("any",)},
    ("fwd", 32, 128, (16, 32, 8, 1)): {"80": ("dropout",)},
    ("fwd", 32, 256, (32, 32, 4, 1)): {"80": ("any",), "90": ("any",)},
    ("fwd", 32, 256, (32, 32, 8, 1)): {"90": ("any",)},
    # fp32 dK/dV. D = 16, 8 warps, with dropout: 8 bytes on sm_90. D = 64, 4 warps, dropout
    # alone: 20 bytes on sm_90; with the tile counter (per query tile since the causal change)
    # 1,436 bytes on sm_80, 1,368 on sm_90. D = 128: 4 warps 1,648 with mask + dropout on sm_80, 3,700 on
    # sm_90; 8 warps 112 with dropout alone on sm_90; 32 x 16 8 bytes without dropout on sm_80.
    # D = 256: 8 warps 2,200-44,808 on sm_90 (none on sm_80); 32 x 16 32 bytes with dropout on
    # sm_80.
    ("dkdv", 32, 16, (32, 32, 8, 1)): {"90": ("dropout",)},
    ("dkdv", 32, 64, (32, 32, 4, 1)): {"80": ("count",), "90": ("dropout", "count")},
    ("dkdv", 32, 128, (32, 32, 4, 1)): {"80": ("dropout",), "90": ("any",)},
    ("dkdv", 32, 128, (32, 32, 8, 1)): {"90": ("dropout",)},
    ("dkdv", 32, 128, (32, 16, 8, 1)): {"80": ("any",)},
    ("dkdv", 32, 256, (32, 32, 8, 1)): {"90": ("any",)},
    ("dkdv", 32, 256, (32, 16, 8, 1)): {"80": ("dropout",)},
    # fp32 dQ. D = 32 on sm_80: 4 warps 8 bytes with the mask alone and with dropout alone
    # (none with both), 8 warps 8 with dropout alone. D = 64, 4 warps: 16 bytes with mask +
    # dropout on sm_80; with the tile counter 672 on sm_80, 624 on sm_90. D = 128: 4 warps 64 with
    # mask + dropout on sm_80, 1,536-1,656 on sm_90; 8 warps 16 with dropout on sm_80. D = 256:
    # 8 warps 4,212-5,140 on sm_90 (none with mask + dropout, none on sm_80).
    ("dq", 32, 32, (32, 32, 4, 1)): {"80": ("mask", "dropout")},
    ("dq", 32, 32, (32, 32, 8, 1)): {"80": ("dropout",)},
    ("dq", 32, 64, (32, 32, 4, 1)): {"80": ("dropout", "count"), "90": ("count",)},
    # fp32 dQ D = 64, 8 warps, with the mask alone: 16 bytes on sm_80 since the causal change
    # (none with mask + dropout, which keeps this config there).
    ("dq", 32, 64, (32, 32, 8, 1)): {"80": ("mask-only",)},
    ("dq", 32, 128, (32, 32, 4, 1)): {"80": ("dropout",), "90": ("any",)},
    ("dq", 32, 128, (32, 32, 8, 1)): {"80": ("dropout",)},
    ("dq", 32, 256, (32, 32, 8, 1)): {"90": ("any",)},
}


def prune_configs(
    configs,
    kind: str,
    block_d: int,
    itemsize: int,
    arch: int,
    has_mask: bool = True,
    dropout: bool = True,
    count_tiles: bool = False,
    causal: bool = False,
):
    """The configs of ``configs`` that kernel ``kind`` may run at ``BLOCK_D`` and element size
    ``itemsize``, with or without a key-padding mask, dropout and the tests' tile counter, on
    compute capability ``arch`` (major * 10 + minor). Pure: the autotuner's early_config_prune
    calls it with the call's switches and the GPU's arch, scripts/check_gpu_compile.py with each
    class and arch.

    A config is kept when (1) it is a candidate for the element size (``_SHAPES``: fp32 has its
    own, 32 x 32 and narrower), (2) the tiles it holds across its loop fit a thread's registers
    and its tiles fit the arch's shared memory (``gpu_footprint``) and (3) it does not run out of
    registers in this class (``_spills_by_rule``, ``_SPILLS``). Every class (kind, BLOCK_D,
    dtype, mask, dropout, tile counter) keeps at least one config on sm_80 and sm_90. Compiled
    with scripts/check_gpu_compile.py, the kept configs are spill-free and within shared memory
    on both arches in every class at D = 64 and in every fp32 class; fp16 / bf16 at the other
    head dims were compiled on sm_80, with neither or both of mask and dropout (``--all``
    compiles them all, ``--with-pruned`` the dropped ones too)."""
    smem = SMEM_BYTES.get(arch, min(SMEM_BYTES.values()))
    bits = 32 if itemsize >= 4 else 16
    cands = set(_SHAPES[(kind, bits)])
    gen = "90" if arch >= 90 else "80"
    kept = []
    for c in configs:
        shape = _shape(c)
        if shape not in cands:
            continue
        regs, shared = gpu_footprint(
            kind, shape[0], shape[1], block_d, itemsize, shape[2], shape[3]
        )
        if regs > HELD_REGS or shared > smem or _spills_by_rule(kind, bits, block_d, shape):
            continue
        when = _SPILLS.get((kind, bits, block_d, shape), {}).get(gen, ())
        if (
            "any" in when
            or ("mask" in when and has_mask)
            or ("dropout" in when and dropout)
            or ("count" in when and count_tiles)
            or ("causal" in when and causal)
            or ("mask-only" in when and has_mask and not dropout and not count_tiles)
        ):
            continue
        kept.append(c)
    return kept


SMEM_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
"""Shared memory a block may use per compute capability (sm_86 / sm_89 / sm_120 have 99 KB)."""
HELD_REGS = 128
"""Registers a thread may spend on the tiles a program holds across its loop (accumulators and
resident operands); the rest of the 255 go to the streamed tiles, scores and addresses."""


def gpu_footprint(
    kind: str, bm: int, bn: int, block_d: int, itemsize: int, warps: int, stages: int
) -> tuple[int, int]:
    """(registers a thread holds across the loop, shared bytes of the streamed and resident
    tiles) of kernel ``kind``: fwd holds q and the fp32 o accumulator (BLOCK_M rows) and streams
    k, v; dK/dV holds k, v and two fp32 accumulators (BLOCK_N rows) and streams q, dO; dQ holds
    q, dO and one accumulator (BLOCK_M rows) and streams k, v."""
    threads = 32 * warps
    if kind == "fwd":
        held_rows, held_bytes, streamed_rows, resident = bm, 4 + itemsize, bn, 1
    elif kind == "dkdv":
        held_rows, held_bytes, streamed_rows, resident = bn, 2 * (4 + itemsize), bm, 2
    else:
        held_rows, held_bytes, streamed_rows, resident = bm, 4 + 2 * itemsize, bn, 2
    regs = held_rows * block_d * held_bytes // (4 * threads)
    shared = (max(stages, 1) * 2 * streamed_rows + resident * held_rows) * block_d * itemsize
    return regs, shared


def _early_prune(kind: str):
    def prune(configs, named_args, **kwargs):
        # named_args: the launch's arguments by name; kwargs: its constexprs (HAS_MASK, DROPOUT,
        # BLOCK_D, COUNT_TILES, ...), the class ``prune_configs`` decides on.
        q = named_args["q_ptr"]
        if not q.is_cuda:
            return configs
        major, minor = torch.cuda.get_device_capability(q.device)
        kept = prune_configs(
            configs,
            kind,
            kwargs["BLOCK_D"],
            q.element_size(),
            major * 10 + minor,
            bool(kwargs["HAS_MASK"]),
            bool(kwargs["DROPOUT"]),
            bool(kwargs.get("COUNT_TILES", False)),
            bool(kwargs.get("CAUSAL", False)),
        )
        return kept or configs

    return prune


# A padded call skips tiles, a causal one about half of them, and a dropout call draws Philox per
# score: each moves the best block shape, so a config tuned on unmasked, non-causal, dropout-free
# calls must not be reused for them. (Triton
# appends the pointer arguments' dtypes to the key itself.)
_TUNE_KEY = ["Lq", "Lk", "D", "HAS_MASK", "DROPOUT", "CAUSAL"]
# The autotuner runs each config several times on the caller's arguments; the outputs are plain
# writes, but the tile counter accumulates, so it is put back after every trial run (and a count
# taken on the first call of a key is exact).
_RESTORE = ["cnt_ptr"]
# cache_results: the pick is kept in Triton's on-disk cache (keyed by GPU arch, kernel source and
# the tuning key), so a restarted or resumed run reuses the same block shapes (and summation
# order) instead of re-timing and perhaps picking another on timing noise.


@triton.jit
def _program(L, H, BLOCK: tl.constexpr):
    # A 1-D grid of cdiv(L, BLOCK) tiles x B*H, tile index fastest (a (batch, head)'s tiles run
    # side by side and share its K/V in L2): grid axis 1 would cap B*H at 65535. Returns (tile,
    # bh, b, h, bh as int64); b, h are int64 too, so base offsets (b * stride_b, bh * L * D) do not
    # wrap at 2^31 elements.
    pid = tl.program_id(0)
    n_t = tl.cdiv(L, BLOCK)
    bh = pid // n_t
    bh64 = bh.to(tl.int64)
    return pid % n_t, bh, bh64 // H, bh64 % H, bh64


@triton.jit
def _dropout_keep(seed, offset, bh, rows, cols, Lq, Lk, dropout_p):
    # [BLOCK_M, BLOCK_N] bool: True where the probability is kept. uint32 offsets wrap mod 2^32.
    off = offset + (bh * Lq + rows[:, None]) * Lk + cols[None, :]
    return tl.rand(seed, off.to(tl.uint32)) >= dropout_p


@triton.jit
def _key_ok(mask_ptr, stride_mb, stride_mk, b, cols, Lk, HAS_MASK: tl.constexpr):
    # [BLOCK_N] bool: key exists and is attended.
    ok = cols < Lk
    if HAS_MASK:
        mv = tl.load(mask_ptr + b * stride_mb + cols * stride_mk, mask=ok, other=0)
        ok = ok & (mv != 0)
    return ok


@triton.jit
def _causal_keys(m0, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Causal (bottom-right: row i sees key j iff j <= i + Lk - Lq), query rows [m0, m0 + BLOCK_M):
    # every row sees the keys < m0 + Lk - Lq + 1, some row those < m0 + BLOCK_M + Lk - Lq.
    # Returns (full, hi): key tiles starting below ``full`` (a multiple of BLOCK_N) hold only keys
    # every row sees (no elementwise mask), tiles in [full, hi) straddle the diagonal; keys from
    # ``hi`` on are seen by no row and their tiles are never visited. hi <= 0: no key at all.
    hi = tl.maximum(tl.minimum(m0 + BLOCK_M + Lk - Lq, Lk), 0)
    full = tl.minimum(tl.maximum(m0 + Lk - Lq + 1, 0), hi)
    return (full // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _causal_queries(n0, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Causal, key rows [n0, n0 + BLOCK_N): key j is seen by the queries i >= j - (Lk - Lq), so the
    # tile's first key from row n0 - (Lk - Lq) on and its last (existing) key from row
    # min(n0 + BLOCK_N, Lk) - 1 - (Lk - Lq) on. Returns (lo, full), multiples of BLOCK_M: query
    # tiles before ``lo`` see none of these keys and are never visited, tiles in [lo, full)
    # straddle the diagonal, tiles from ``full`` on see every key (no elementwise mask).
    lo = tl.maximum(n0 - (Lk - Lq), 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    full = tl.maximum(tl.minimum(n0 + BLOCK_N, Lk) - 1 - (Lk - Lq), lo)
    full = tl.minimum(tl.cdiv(full, BLOCK_M), tl.cdiv(Lq, BLOCK_M)) * BLOCK_M
    return lo, full


@triton.jit
def _causal_ok(rows, cols, Lq, Lk):
    # [BLOCK_M, BLOCK_N] bool: query row i may see key j (diagonal tiles only).
    return cols[None, :] <= rows[:, None] + (Lk - Lq)


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    skn,
    skd,
    svn,
    svd,
    mask_ptr,
    stride_mb,
    stride_mk,
    cnt_ptr,
    b,
    bh,
    rows,
    dcol,
    d_ok,
    lo,
    hi,
    Lq,
    Lk,
    qk_scale,
    dropout_p,
    seed,
    offset,
    HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    DIAG: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The forward's online softmax over the K/V tiles starting in [lo, hi); DIAG: the causal
    # diagonal tiles, which mask scores elementwise (the others need no causal mask at all).
    inv_keep = 1.0 / (1.0 - dropout_p)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kok = _key_ok(mask_ptr, stride_mb, stride_mk, b, cols, Lk, HAS_MASK)
        # Padding tiles (the tail of short captions) cost one mask load and no math. Without a
        # mask every tile is live and the test is static: loads under a runtime `if` are not
        # software-pipelined (compiled for sm_90, fp16 D=64: 24 KB of shared memory whatever
        # num_stages, 56 KB = 3 K/V stages without it).
        live = True
        if HAS_MASK:
            live = tl.max(kok.to(tl.int32), axis=0) > 0
        if live:
            if COUNT_TILES:
                tl.atomic_add(cnt_ptr + bh, 1)
            # Padded keys load as 0: their p is 0, and 0 * (NaN or Inf left in a padded slot of
            # V) would still be NaN in p @ v.
            kv_mask = kok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * skn + dcol[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + dcol[None, :] * svd, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            ok = kok[None, :]
            if DIAG:
                ok = ok & _causal_ok(rows, cols, Lq, Lk)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:
                keep = _dropout_keep(seed, offset, bh, rows, cols, Lq, Lk, dropout_p)
                p = tl.where(keep, p * inv_keep, 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs("fwd"),
    key=_TUNE_KEY,
    restore_value=_RESTORE,
    prune_configs_by={"early_config_prune": _early_prune("fwd")},
    cache_results=True,
)
@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,  # [B, H, Lq, D], [B, H, Lk, D] x2, any strides
    mask_ptr,  # [B, Lk] uint8 (1 = attend); unused unless HAS_MASK
    o_ptr,  # [B, H, Lq, D] out, q's dtype
    lse_ptr,  # [B*H, Lq] fp32 out: log2-domain logsumexp of the scaled scores
    cnt_ptr,  # [B*H] int32 in/out: += key tiles processed (tests); unused unless COUNT_TILES
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    soh,
    som,
    sod,
    stride_mb,
    stride_mk,
    H,
    Lq,
    Lk,
    D,
    qk_scale,  # qk_scale = scale * log2(e)
    dropout_p,
    seed,
    offset,
    HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, bh, b, h, bh64 = _program(Lq, H, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    d_ok = dcol < D
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rows[:, None] * sqm + dcol[None, :] * sqd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    # A finite floor (not -inf) for the running max keeps exp2(m - m') = 1, not NaN, for rows that
    # have seen only masked keys so far.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        # Tiles wholly above the diagonal are never visited (no load, no math), tiles wholly
        # below it run unmasked, only the diagonal ones mask elementwise.
        full, hi = _causal_keys(pid_m * BLOCK_M, Lq, Lk, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, mask_ptr, stride_mb, stride_mk,
            cnt_ptr, b, bh, rows, dcol, d_ok, 0, full, Lq, Lk, qk_scale, dropout_p, seed,
            offset, HAS_MASK, DROPOUT, PRECISION, COUNT_TILES, False, BLOCK_N,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, mask_ptr, stride_mb, stride_mk,
            cnt_ptr, b, bh, rows, dcol, d_ok, full, hi, Lq, Lk, qk_scale, dropout_p, seed,
            offset, HAS_MASK, DROPOUT, PRECISION, COUNT_TILES, True, BLOCK_N,
        )  # fmt: skip
    else:
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, mask_ptr, stride_mb, stride_mk,
            cnt_ptr, b, bh, rows, dcol, d_ok, 0, Lk, Lq, Lk, qk_scale, dropout_p, seed,
            offset, HAS_MASK, DROPOUT, PRECISION, COUNT_TILES, False, BLOCK_N,
        )  # fmt: skip
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(
        o_ptr + b * sob + h * soh + rows[:, None] * som + dcol[None, :] * sod,
        o.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + bh64 * Lq + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr,
    do_ptr,  # [B, H, Lq, D] each, any strides
    delta_ptr,  # [B*H, Lq] fp32 out: rowsum(dO * O)
    sob,
    soh,
    som,
    sod,
    sdb,
    sdh,
    sdm,
    sdd,
    H,
    Lq,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, _bh, b, h, bh64 = _program(Lq, H, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    msk = (rows < Lq)[:, None] & (dcol < D)[None, :]
    o = tl.load(
        o_ptr + b * sob + h * soh + rows[:, None] * som + dcol[None, :] * sod, mask=msk, other=0.0
    ).to(tl.float32)
    do = tl.load(
        do_ptr + b * sdb + h * sdh + rows[:, None] * sdm + dcol[None, :] * sdd, mask=msk, other=0.0
    ).to(tl.float32)
    tl.store(delta_ptr + bh64 * Lq + rows, tl.sum(o * do, axis=1), mask=rows < Lq)


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    kok,
    cols,
    q_base,
    do_base,
    sqm,
    sqd,
    sdm,
    sdd,
    lse_ptr,
    delta_ptr,
    cnt_ptr,
    bh,
    bh64,
    dcol,
    d_ok,
    lo,
    hi,
    Lq,
    Lk,
    qk_scale,
    dropout_p,
    seed,
    offset,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # dK/dV of one key tile accumulated over the query tiles starting in [lo, hi); DIAG: the
    # causal diagonal tiles (elementwise mask), the others need none.
    inv_keep = 1.0 / (1.0 - dropout_p)
    for m0 in range(lo, hi, BLOCK_M):
        if COUNT_TILES:
            tl.atomic_add(cnt_ptr + bh, 1)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        qm = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * sqm + dcol[None, :] * sqd, mask=qm, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdm + dcol[None, :] * sdd, mask=qm, other=0.0)
        # +inf LSE (absent or fully masked rows) makes p exactly 0.
        lse = tl.load(lse_ptr + bh64 * Lq + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + bh64 * Lq + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = kok[None, :]
        if DIAG:
            ok = ok & _causal_ok(rows, cols, Lq, Lk)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, offset, bh, rows, cols, Lq, Lk, dropout_p)
            pd = tl.where(keep, p * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            pd = p
        dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(
    configs=_configs("dkdv"),
    key=_TUNE_KEY,
    restore_value=_RESTORE,
    prune_configs_by={"early_config_prune": _early_prune("dkdv")},
    cache_results=True,
)
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,  # [B, H, L*, D], any strides (do: like q)
    mask_ptr,  # [B, Lk] uint8
    lse_ptr,
    delta_ptr,  # [B*H, Lq] fp32
    dk_ptr,
    dv_ptr,  # [B, H, Lk, D] contiguous out
    cnt_ptr,  # [B*H] int32 in/out: += query tiles processed (tests); unused unless COUNT_TILES
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdb,
    sdh,
    sdm,
    sdd,
    stride_mb,
    stride_mk,
    H,
    Lq,
    Lk,
    D,
    scale,
    qk_scale,
    dropout_p,
    seed,
    offset,
    HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n, bh, b, h, bh64 = _program(Lk, H, BLOCK_N)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    kv_mask = (cols < Lk)[:, None] & d_ok[None, :]
    kok = _key_ok(mask_ptr, stride_mb, stride_mk, b, cols, Lk, HAS_MASK)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Masked keys get exactly zero gradient; a tile of only masked keys does no math at all.
    if tl.max(kok.to(tl.int32), axis=0) > 0:
        kv_load = kok[:, None] & d_ok[None, :]  # padded keys as 0: no NaN from padding slots
        k = tl.load(
            k_ptr + b * skb + h * skh + cols[:, None] * skn + dcol[None, :] * skd,
            mask=kv_load,
            other=0.0,
        )
        v = tl.load(
            v_ptr + b * svb + h * svh + cols[:, None] * svn + dcol[None, :] * svd,
            mask=kv_load,
            other=0.0,
        )
        q_base = q_ptr + b * sqb + h * sqh
        do_base = do_ptr + b * sdb + h * sdh
        if CAUSAL:
            # Query tiles that see none of these keys are never visited; those that see all of
            # them run unmasked; only the diagonal ones mask elementwise.
            lo, full = _causal_queries(pid_n * BLOCK_N, Lq, Lk, BLOCK_M, BLOCK_N)
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, kok, cols, q_base, do_base, sqm, sqd, sdm, sdd, lse_ptr, delta_ptr,
                cnt_ptr, bh, bh64, dcol, d_ok, lo, full, Lq, Lk, qk_scale, dropout_p, seed,
                offset, DROPOUT, PRECISION, COUNT_TILES, True, BLOCK_M,
            )  # fmt: skip
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, kok, cols, q_base, do_base, sqm, sqd, sdm, sdd, lse_ptr, delta_ptr,
                cnt_ptr, bh, bh64, dcol, d_ok, full, Lq, Lq, Lk, qk_scale, dropout_p, seed,
                offset, DROPOUT, PRECISION, COUNT_TILES, False, BLOCK_M,
            )  # fmt: skip
        else:
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, kok, cols, q_base, do_base, sqm, sqd, sdm, sdd, lse_ptr, delta_ptr,
                cnt_ptr, bh, bh64, dcol, d_ok, 0, Lq, Lq, Lk, qk_scale, dropout_p, seed,
                offset, DROPOUT, PRECISION, COUNT_TILES, False, BLOCK_M,
            )  # fmt: skip
    out_off = cols[:, None] * D + dcol[None, :]  # int32 per element; the int64 base apart
    tl.store(
        dk_ptr + bh64 * Lk * D + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask
    )
    tl.store(dv_ptr + bh64 * Lk * D + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    skn,
    skd,
    svn,
    svd,
    mask_ptr,
    stride_mb,
    stride_mk,
    cnt_ptr,
    b,
    bh,
    rows,
    dcol,
    d_ok,
    lo,
    hi,
    Lq,
    Lk,
    qk_scale,
    dropout_p,
    seed,
    offset,
    HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    DIAG: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # dQ of one query tile accumulated over the key tiles starting in [lo, hi); DIAG: the causal
    # diagonal tiles (elementwise mask), the others need none.
    inv_keep = 1.0 / (1.0 - dropout_p)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kok = _key_ok(mask_ptr, stride_mb, stride_mk, b, cols, Lk, HAS_MASK)
        live = True  # static without a mask, so the loads pipeline (see the forward)
        if HAS_MASK:
            live = tl.max(kok.to(tl.int32), axis=0) > 0
        if live:
            if COUNT_TILES:
                tl.atomic_add(cnt_ptr + bh, 1)
            kv_mask = kok[:, None] & d_ok[None, :]  # padded keys as 0 (see the forward)
            k = tl.load(k_base + cols[:, None] * skn + dcol[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + dcol[None, :] * svd, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            ok = kok[None, :]
            if DIAG:
                ok = ok & _causal_ok(rows, cols, Lq, Lk)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, offset, bh, rows, cols, Lq, Lk, dropout_p)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.autotune(
    configs=_configs("dq"),
    key=_TUNE_KEY,
    restore_value=_RESTORE,
    prune_configs_by={"early_config_prune": _early_prune("dq")},
    cache_results=True,
)
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    mask_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,  # [B, H, Lq, D] contiguous out
    cnt_ptr,  # [B*H] int32 in/out: += key tiles processed (tests); unused unless COUNT_TILES
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdb,
    sdh,
    sdm,
    sdd,
    stride_mb,
    stride_mk,
    H,
    Lq,
    Lk,
    D,
    scale,
    qk_scale,
    dropout_p,
    seed,
    offset,
    HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, bh, b, h, bh64 = _program(Lq, H, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    d_ok = dcol < D
    qm = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rows[:, None] * sqm + dcol[None, :] * sqd, mask=qm, other=0.0
    )
    do = tl.load(
        do_ptr + b * sdb + h * sdh + rows[:, None] * sdm + dcol[None, :] * sdd, mask=qm, other=0.0
    )
    lse = tl.load(lse_ptr + bh64 * Lq + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh64 * Lq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    if CAUSAL:
        # The forward's key range: tiles above the diagonal never visited, diagonal ones masked.
        full, hi = _causal_keys(pid_m * BLOCK_M, Lq, Lk, BLOCK_M, BLOCK_N)
        dq = _dq_tiles(
            dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, mask_ptr, stride_mb,
            stride_mk, cnt_ptr, b, bh, rows, dcol, d_ok, 0, full, Lq, Lk, qk_scale, dropout_p,
            seed, offset, HAS_MASK, DROPOUT, PRECISION, COUNT_TILES, False, BLOCK_N,
        )  # fmt: skip
        dq = _dq_tiles(
            dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, mask_ptr, stride_mb,
            stride_mk, cnt_ptr, b, bh, rows, dcol, d_ok, full, hi, Lq, Lk, qk_scale, dropout_p,
            seed, offset, HAS_MASK, DROPOUT, PRECISION, COUNT_TILES, True, BLOCK_N,
        )  # fmt: skip
    else:
        dq = _dq_tiles(
            dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, mask_ptr, stride_mb,
            stride_mk, cnt_ptr, b, bh, rows, dcol, d_ok, 0, Lk, Lq, Lk, qk_scale, dropout_p,
            seed, offset, HAS_MASK, DROPOUT, PRECISION, COUNT_TILES, False, BLOCK_N,
        )  # fmt: skip
    tl.store(
        dq_ptr + bh64 * Lq * D + rows[:, None] * D + dcol[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=qm,
    )


@triton.jit
def _keep_mask_kernel(
    out_ptr, Lq, Lk, dropout_p, seed, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    # out [B*H, Lq, Lk] uint8: the forward's keep mask, for tests and debugging.
    pid_m, bh, _b, _h, bh64 = _program(Lq, 1, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for n0 in range(0, Lk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, offset, bh, rows, cols, Lq, Lk, dropout_p)
        tl.store(
            out_ptr + bh64 * Lq * Lk + rows[:, None] * Lk + cols[None, :],
            keep.to(tl.uint8),
            mask=(rows < Lq)[:, None] & (cols < Lk)[None, :],
        )


# ----------------------------------------------------------------------------------------------
# Launchers


DELTA_BLOCK_M = 64
"""Rows per program of the backward preprocess (delta) kernel on a GPU."""


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _mask_args(key_padding_mask: torch.Tensor | None, q: torch.Tensor):
    if key_padding_mask is None:
        return q, 0, 0, False  # any valid pointer; never read
    m = key_padding_mask.view(torch.uint8)  # bool -> uint8 without a copy (same element size)
    return m, m.stride(0), m.stride(1), True


def _on_device(x: torch.Tensor):
    # Triton launches on the current CUDA device, not the tensors' one.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_dropout_range(B: int, H: int, Lq: int, Lk: int, dropout_p: float) -> None:
    if dropout_p > 0.0 and B * H * Lq * Lk >= 2**32:
        raise ValueError(
            f"attention (triton): dropout draws one Philox offset per score and needs "
            f"B*H*Lq*Lk < 2^32, got {B * H * Lq * Lk}"
        )


def _counter(tile_count: torch.Tensor | None, BH: int, fallback: torch.Tensor):
    """(pointer, COUNT_TILES) for a kernel's tile counter: an int32 [B*H] tensor the caller zeroed,
    or any valid pointer (never read) when not counting."""
    if tile_count is None:
        return fallback, False
    if (
        tile_count.dtype != torch.int32
        or tile_count.shape != (BH,)
        or not tile_count.is_contiguous()
    ):
        raise ValueError(
            f"attention (triton): tile_count must be a contiguous int32 [B*H={BH}] "
            f"tensor, got {tile_count.dtype} {tuple(tile_count.shape)}"
        )
    return tile_count, True


def fwd(
    q,
    k,
    v,
    key_padding_mask,
    scale,
    dropout_p=0.0,
    seed=0,
    offset=0,
    causal=False,
    out=None,
    tile_count=None,
):
    """Forward: returns (o [B,H,Lq,D] in q's dtype, lse2 [B*H, Lq] fp32). ``out`` may be given
    (tests pass a poisoned buffer) and must be a contiguous [B,H,Lq,D] tensor like q.

    ``causal``: bottom-right causal mask (see the module docstring); tiles above the diagonal are
    skipped. ``tile_count`` (tests): an int32 [B*H] tensor; each program adds the number of K/V
    tiles it did not skip, so a test can assert that padding and causal tiles are skipped. The autotuner's trial runs
    restore it, so the count is the chosen config's (its BLOCK_M/BLOCK_N: ``best_config``)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if q.dtype not in _TL_DTYPES:
        raise TypeError(f"attention (triton): dtype {q.dtype} unsupported; expected fp16/bf16/fp32")
    if D > 256:
        raise ValueError(f"attention (triton): head dim D={D} > 256 is not supported")
    _check_dropout_range(B, H, Lq, Lk, dropout_p)
    o = torch.empty((B, H, Lq, D), device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty((B * H, Lq), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    m, smb, smk, has_mask = _mask_args(key_padding_mask, q)
    cnt, count = _counter(tile_count, B * H, lse)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    with _on_device(q):
        _attn_fwd_kernel[grid](
            q,
            k,
            v,
            m,
            o,
            lse,
            cnt,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *o.stride(),
            smb,
            smk,
            H,
            Lq,
            Lk,
            D,
            scale * LOG2E,
            float(dropout_p),
            int(seed),
            int(offset),
            HAS_MASK=has_mask,
            DROPOUT=dropout_p > 0.0,
            CAUSAL=bool(causal),
            BLOCK_D=_block_d(D),
            PRECISION=_precision(q.dtype),
            COUNT_TILES=count,
        )
    return o, lse


def bwd(
    do,
    q,
    k,
    v,
    o,
    lse,
    key_padding_mask,
    scale,
    dropout_p=0.0,
    seed=0,
    offset=0,
    causal=False,
    dq=None,
    dk=None,
    dv=None,
    tile_count=None,
):
    """Backward: returns (dq, dk, dv), contiguous, in q's dtype. Buffers may be given (poisoned
    ones in tests); they must be contiguous and shaped like q, k, v. ``tile_count`` (tests): a
    pair of int32 [B*H] tensors counting the key tiles the dK/dV and the dQ kernels processed
    (see ``fwd``; the dK/dV kernel counts the query tiles each of its key tiles visits)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq = torch.empty((B, H, Lq, D), device=q.device, dtype=q.dtype) if dq is None else dq
    dk = torch.empty((B, H, Lk, D), device=q.device, dtype=q.dtype) if dk is None else dk
    dv = torch.empty((B, H, Lk, D), device=q.device, dtype=q.dtype) if dv is None else dv
    if B * H == 0 or D == 0:
        return dq, dk, dv
    if Lq == 0 or Lk == 0:  # no score at all: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B * H, Lq), device=q.device, dtype=torch.float32)
    BLOCK_D = _block_d(D)
    bm = 16 if triton_interpret() else DELTA_BLOCK_M
    m, smb, smk, has_mask = _mask_args(key_padding_mask, q)
    common = (
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do.stride(),
        smb,
        smk,
        H,
        Lq,
        Lk,
        D,
        float(scale),
        scale * LOG2E,
        float(dropout_p),
        int(seed),
        int(offset),
    )
    kw = dict(
        HAS_MASK=has_mask,
        DROPOUT=dropout_p > 0.0,
        CAUSAL=bool(causal),
        BLOCK_D=BLOCK_D,
        PRECISION=_precision(q.dtype),
    )
    cnt_kv, cnt_q = (None, None) if tile_count is None else tile_count
    with _on_device(q):
        _attn_bwd_delta_kernel[(triton.cdiv(Lq, bm) * B * H,)](
            o, do, delta, *o.stride(), *do.stride(), H, Lq, D, BLOCK_M=bm, BLOCK_D=BLOCK_D
        )
        cnt, count = _counter(cnt_kv, B * H, delta)
        _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]) * B * H,)](
            q, k, v, do, m, lse, delta, dk, dv, cnt, *common, COUNT_TILES=count, **kw
        )
        cnt, count = _counter(cnt_q, B * H, delta)
        _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * H,)](
            q, k, v, do, m, lse, delta, dq, cnt, *common, COUNT_TILES=count, **kw
        )
    return dq, dk, dv


def dropout_keep_mask(B, H, Lq, Lk, dropout_p, seed, offset, device) -> torch.Tensor:
    """The bool keep mask [B, H, Lq, Lk] the kernels draw for (seed, offset)."""
    _check_dropout_range(B, H, Lq, Lk, dropout_p)
    out = torch.empty((B * H, Lq, Lk), device=device, dtype=torch.uint8)
    if out.numel():
        with _on_device(out):
            _keep_mask_kernel[(triton.cdiv(Lq, 16) * B * H,)](
                out, Lq, Lk, float(dropout_p), int(seed), int(offset), BLOCK_M=16, BLOCK_N=16
            )
    return out.view(B, H, Lq, Lk).bool()
