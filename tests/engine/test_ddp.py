"""Two gloo processes (``torchrun --nproc_per_node=2 -m r2d2 pretrain``) with global batch B give
the loss curve of one process with batch B: same samples per step (the sampler splits each global
batch by rank), GCPR over the gathered batch, gradients averaged by DDP. Also with corrupt images
in a manifest (each rank replaces its bad samples by seeded draws, so the batches stay full and
equal-sized for GCPR's all-gather, and the skips are summed over ranks) and with gradient
accumulation (each micro-batch's GCPR gathers over the ranks)."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _helpers.cli import R2D2, TORCHRUN
from r2d2.engine.observability import read_log

ROOT = str(Path(__file__).resolve().parents[2])
STEPS = 6
COMMON = [
    "--config",
    os.path.join(ROOT, "r2d2", "configs", "tiny.yaml"),
    f"--train.max_steps={STEPS}",
    "--train.log_every=1",
    "--train.checkpoint_every=0",
    "--data.batch_size=16",
    "--data.synthetic_size=256",
    "--logging.progress=false",
    "--logging.tensorboard=false",
    "--logging.plot=false",
    "--train.eval_at_end=false",
    "--distributed.backend=gloo",
    "--data.synthetic_eval_size=16",
]


def _run(cmd, out, extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run(
        [*cmd, "pretrain", "--out", str(out), *COMMON, *extra],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return read_log(os.path.join(out, "log.jsonl"))


DETERMINISTIC = ["--loss.mlm=false", "--loss.fgd=false"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _run(R2D2, tmp_path_factory.mktemp("one"), DETERMINISTIC)


def _check_same_curve(one, two):
    assert [r["step"] for r in one] == list(range(1, STEPS + 1))
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    for key in ("loss", "gcpr_loss"):
        a, b = np.array([r[key] for r in one]), np.array([r[key] for r in two])
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5, err_msg=key)
    assert two[-1]["samples"] == one[-1]["samples"] == STEPS * 16
    # The runs did train (six warm-up steps are too few and too noisy for a falling loss; that
    # is test_trainer's job): every step had a gradient and the parameters moved.
    assert all(r["grad_norm"] > 0 for r in one), [r["grad_norm"] for r in one]
    assert len({round(r["loss"], 6) for r in one}) > 1


@pytest.mark.distributed
def test_two_process_ddp_matches_one_process_deterministic_terms(tmp_path, one_process):
    # GCPR (+ TgD targets) and FGR use no per-rank randomness: the curves agree to float noise.
    _check_same_curve(one_process, _run(TORCHRUN, tmp_path, DETERMINISTIC))


@pytest.mark.distributed
def test_two_process_fsdp2_matches_one_process(tmp_path, one_process):
    two = _run(TORCHRUN, tmp_path, DETERMINISTIC + ["--distributed.strategy=fsdp"])
    _check_same_curve(one_process, two)
    assert os.path.isfile(tmp_path / "model" / "model.safetensors")  # gathered from the shards


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_ddp_full_objective_curve_within_tolerance(tmp_path):
    # MLM / FgD masks are drawn per rank, so the full loss agrees only statistically.
    one = _run(R2D2, tmp_path / "one", [])
    two = _run(TORCHRUN, tmp_path / "two", [])
    a, b = np.array([r["loss"] for r in one]), np.array([r["loss"] for r in two])
    np.testing.assert_allclose(b, a, rtol=0.05)


@pytest.fixture(scope="module")
def corrupt_manifest(tmp_path_factory):
    """64 lines: 6 corrupt images (found when loaded), 2 missing files (found by the reader)."""
    d = tmp_path_factory.mktemp("manifest")
    rng = np.random.default_rng(7)
    lines = []
    for i in range(64):
        name = f"{i}.jpg"
        if i % 10 == 3:
            (d / name).write_bytes(b"\xff\xd8 truncated")
        elif i not in (5, 40):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / name)
        lines.append(json.dumps({"image": name, "text": f"第{i}张图片"}, ensure_ascii=False))
    (d / "train.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return ["--data.format=jsonl", f"--data.path={d / 'train.jsonl'}", "--data.max_skip_rate=0.3"]


def _expected_decode_skips(extra, steps, batch):
    """The decode-time skips of the first ``steps`` global batches, from the data stream itself
    (one process reading the same manifest: the replacement draws do not depend on the rank)."""
    from r2d2.engine.config import load_config
    from r2d2.engine.data.loader import Tokenize, build_train_data
    from r2d2.engine.tokenizer import build_tokenizer

    cfg = load_config(COMMON[1], COMMON[2:] + extra)
    it = iter(build_train_data(cfg.data, Tokenize(build_tokenizer(None, 16), 16), 32, batch).loader)
    return [next(it)["skipped"] for _ in range(steps)]


@pytest.mark.distributed
def test_two_process_ddp_with_corrupt_images_completes_and_counts_skips(tmp_path, corrupt_manifest):
    # The audit's case: one corrupt image made the ranks' batches differ in size and gloo's
    # all-gather failed ("collective mismatch"; NCCL would hang).
    two = _run(TORCHRUN, tmp_path / "two", DETERMINISTIC + corrupt_manifest)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert two[-1]["samples"] == STEPS * 16  # every batch full
    assert (
        all(r["skipped_read"] == 2 for r in two) and two[-1]["skip_reasons"]["missing_image"] == 2
    )
    want = np.cumsum(_expected_decode_skips(corrupt_manifest, STEPS, 16)).tolist()
    assert [r["skipped_decode"] for r in two] == want  # summed over both ranks
    # 6 steps x 16 = 96 positions of a 62-record epoch: every corrupt record was met (and replaced)
    assert want[-1] >= 6 and two[-1]["skip_reasons"]["corrupt_image"] == want[-1]
    assert all(r["skipped"] == r["skipped_read"] + r["skipped_decode"] for r in two)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_ddp_with_corrupt_images_and_accumulation_matches_one_process(
    tmp_path, corrupt_manifest
):
    # accumulation 2 on 2 ranks: micro-batches of 8 (4 per rank), GCPR over the gathered 8; the
    # one-process run with the same accumulation sees the same micro-batches and replacements
    accum = DETERMINISTIC + corrupt_manifest + ["--train.grad_accum=2"]
    one = _run(R2D2, tmp_path / "one", accum)
    two = _run(TORCHRUN, tmp_path / "two", accum)
    _check_same_curve(one, two)
    assert [r["skipped_decode"] for r in two] == [r["skipped_decode"] for r in one]
    assert two[-1]["skipped_decode"] > 0
