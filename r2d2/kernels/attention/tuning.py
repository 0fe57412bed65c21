"""What attention's measured ``auto`` (autotune.py) measures: the shape class, the inputs timed,
the reference class, the checkpoint record.

A class is (device, dtype, Lq and Lk rounded up to a power of two >= 16, D rounded up to a
multiple of 32, masked or not, dropout or not, causal or not, and fwd+bwd when autograd records the call (grad
enabled, an input requires grad) else fwd only). So padded text 64 x 64, image 197 (bucket 256)
and 257 (bucket 512), cross 64 x 257 and their training and no-grad variants are each measured
once per device and process; causal calls (the captioning decoder) are classes of their own, since
the fused kernels skip half the tiles there and SDPA takes another path. The first call of a class times every candidate (cuda, triton,
xformers, sdpa) on fresh random inputs shaped like that call: its Lq, Lk, D, H, its mask rows (the
fused kernels skip fully padded tiles, so the padding matters) and dropout p, with B cut so that
``B*H*Lq*Lk <= MAX_SCORES``. ``auto_backend("attention", dev)`` (``r2d2 doctor``) knows no shape
and reports the reference class: R2D2 text self-attention in training (B 32, H 12, 64 tokens with
~40% padding, D 64, bf16). Off CUDA ``auto`` is sdpa, never the Triton interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from r2d2.kernels import autotune
from r2d2.kernels.common import dtype_from_name, dtype_name

MAX_SCORES = 1 << 24  # B is cut so that one timed call computes at most this many scores


@dataclass(frozen=True)
class Probe:
    """The inputs a measurement times: shaped like the first call of a class."""

    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    dtype: torch.dtype
    device: torch.device
    mask: torch.Tensor | None  # [B, Lk] bool (the caller's rows; copied before use)
    dropout_p: float
    grad: bool
    causal: bool = False


def bucket(n: int, lo: int = 16) -> int:
    """Smallest power of two >= n (at least ``lo``): 64 -> 64, 197 -> 256, 257 -> 512."""
    e = lo
    while e < n:  # comparisons only, so torch.compile can trace it with symbolic sizes
        e *= 2
    return e


def bucket_d(d: int) -> int:
    """D rounded up to a multiple of 32 (the CUDA kernel's padding): 64 -> 64, 80 -> 96."""
    e = 32
    while e < d:
        e += 32
    return e


def class_key(
    device: torch.device,
    dtype,
    Lq,
    Lk,
    D,
    masked: bool,
    dropout: bool,
    grad: bool,
    causal: bool = False,
) -> tuple:
    """(device type, index, dtype, Lq bucket, Lk bucket, D bucket, masked, dropout, causal, grad):
    grad stays last (``probe`` reads it there)."""
    # A plain tuple (not a dataclass) so a compiled caller's lookup traces without a graph break.
    return (
        device.type,
        device.index,
        dtype,
        bucket(Lq),
        bucket(Lk),
        bucket_d(D),
        masked,
        dropout,
        bool(causal),
        grad,
    )


def class_str(key: tuple) -> str:
    dev_type, index, dtype, lq, lk, d, masked, dropout, causal, grad = key
    dev = dev_type if index is None else f"{dev_type}:{index}"
    # " causal" only when set: the non-causal descriptions read as before.
    return (
        f"{dev} {dtype_name(dtype)} Lq<={lq} Lk<={lk} D<={d} "
        f"{'masked' if masked else 'unmasked'}{' dropout' if dropout else ''}"
        f"{' causal' if causal else ''} {'fwd+bwd' if grad else 'fwd'}"
    )


def reference_probe(device: torch.device) -> Probe:
    """R2D2 text self-attention for training: B 32, H 12, 64 tokens, D 64, bf16, caption lengths
    uniform in [13, 64] (39.8% padding on average)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = torch.randint(13, 65, (32,), generator=g)
    mask = (torch.arange(64)[None, :] < lens[:, None]).to(device)
    return Probe(32, 12, 64, 64, 64, torch.bfloat16, device, mask, 0.0, True)


def call_probe(q, k, mask, dropout_p: float, grad: bool, causal: bool = False) -> Probe:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    b = max(1, min(B, MAX_SCORES // max(1, H * Lq * Lk)))
    m = None if mask is None else mask[:b]  # the caller's padding (tile skipping depends on it)
    return Probe(b, H, Lq, Lk, D, q.dtype, q.device, m, float(dropout_p), grad, bool(causal))


class AttentionTuning(autotune.Tuning):
    """``run`` is the public ``attention`` function: the timed call goes through it with an
    explicit backend, exactly as a caller's would."""

    candidates = ("cuda", "triton", "xformers", "sdpa")
    device_types = ("cuda",)  # elsewhere auto is sdpa (never the Triton interpreter)
    capture_fallback = "sdpa"

    def __init__(self, run: Callable[..., torch.Tensor]) -> None:
        self.run = run

    def class_key(self, q, k, v, key_padding_mask, dropout_p, causal=False) -> tuple | None:
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        if B * H * Lq * Lk * D == 0:
            return None
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return class_key(
            q.device,
            q.dtype,
            Lq,
            Lk,
            D,
            key_padding_mask is not None,
            dropout_p > 0.0,
            grad,
            causal,
        )

    def class_str(self, key: tuple) -> str:
        return class_str(key)

    def reference_key(self, device: torch.device) -> tuple:
        return class_key(device, torch.bfloat16, 64, 64, 64, True, False, True)

    def probe(self, key: tuple, call: tuple | None) -> Probe:
        device = torch.device(key[0], key[1])
        if call is None:
            return reference_probe(device)
        q, k, _, mask, dropout_p, *rest = call  # rest: (causal,) from attention()
        causal = bool(rest[0]) if rest else False
        return call_probe(q, k, mask, dropout_p, grad=key[-1], causal=causal)

    def probe_str(self, probe: Probe) -> str:
        causal = " causal" if probe.causal else ""
        return f"B={probe.B} H={probe.H} Lq={probe.Lq} Lk={probe.Lk} D={probe.D}{causal}"

    def time(self, backend: str, probe: Probe) -> float:
        """Median ms of one call of ``backend`` on fresh random inputs shaped like ``probe``:
        forward and backward if ``probe.grad``, else the forward alone under no_grad.

        Runs under ``inference_mode(False)`` and ``enable_grad`` whatever the caller's mode (the
        first call of an eval loop must still be able to time a training class), on new leaves
        (never the caller's tensors), inside ``fork_rng`` so the caller's random stream is not
        advanced.
        """
        dev = probe.device
        g = torch.Generator(device="cpu").manual_seed(0)
        with (
            torch.inference_mode(False),
            torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []),
        ):
            q, k, v = (
                torch.randn((probe.B, probe.H, L, probe.D), generator=g)
                .to(dev, probe.dtype)
                .requires_grad_(probe.grad)
                for L in (probe.Lq, probe.Lk, probe.Lk)
            )
            do = torch.randn(q.shape, generator=g).to(dev, probe.dtype)
            # A copy made here is a normal tensor even if the probe's was made in inference mode
            # (the fused backends save the mask for backward, which an inference tensor refuses).
            mask = None if probe.mask is None else probe.mask.clone()

            def call():
                with torch.enable_grad() if probe.grad else torch.no_grad():
                    out = self.run(
                        q,
                        k,
                        v,
                        key_padding_mask=mask,
                        causal=probe.causal,
                        dropout_p=probe.dropout_p,
                        backend=backend,
                    )
                    if probe.grad:
                        torch.autograd.grad(out, (q, k, v), do)

            return autotune.median_ms(call, dev)

    def to_record(self, key: tuple) -> dict:
        return {
            "device": key[0],
            "dtype": dtype_name(key[2]),
            "lq": key[3],
            "lk": key[4],
            "d": key[5],
            "masked": key[6],
            "dropout": key[7],
            "causal": key[8],
            "grad": key[9],
        }

    def from_record(self, record: dict, device: torch.device) -> tuple:
        return (
            device.type,
            device.index,
            dtype_from_name(record["dtype"]),
            int(record["lq"]),
            int(record["lk"]),
            int(record["d"]),
            bool(record["masked"]),
            bool(record["dropout"]),
            # Records written before causal classes existed have no "causal": non-causal.
            bool(record.get("causal", False)),
            bool(record["grad"]),
        )
