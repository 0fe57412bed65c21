"""Distributed GCPR on gloo, 2 and 3 processes, one spawn per world size:

  * eager (all-gather, the spec) equals one process over the concatenated batch: mean of the
    rank losses = the single loss, local-feature gradient on rank r = W x the single-process
    gradient of its slice (gather's backward sums the column terms over ranks), mean over ranks
    of the logit_scale gradient (what DDP averages) = the single one, same hard negatives;
  * the fused Triton backend (interpreter on CPU) in ``gather`` and ``ring`` modes equals the
    eager distributed run rank by rank: loss, image / text / logit_scale gradients, negatives.
    The ranks' upstream gradients differ (rank r back-propagates (1 + r / 2) * loss_r), so the
    fused backward must use every rank's own upstream scalar for the columns that rank owns.
Both with alpha in {0, 0.4} and ids repeated within and across ranks. The eager checks do not
need triton."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from r2d2.kernels import contrastive as C
from r2d2.kernels.dispatch import why_unavailable

pytestmark = pytest.mark.distributed

B_LOCAL, D = 5, 16
SEED = 7
ALPHAS = (0.0, 0.4)
FUSED = [("triton", "gather"), ("triton", "ring")]


def _global_batch(world):
    g = torch.Generator().manual_seed(1234 + world)
    n = world * B_LOCAL

    def feats():
        return F.normalize(torch.randn(n, D, generator=g), dim=1)

    img, txt, t_img, t_txt = feats(), feats(), feats(), feats()
    ids = torch.randint(0, max(2, n // 2), (n,), generator=g)  # positives across ranks
    return img, txt, t_img, t_txt, ids


def _run(img, txt, t_img, t_txt, ids, backend, mode, alpha, weight=1.0, group=None):
    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_()
    s = torch.tensor(40.0, requires_grad=True)
    teacher = dict(teacher_image_feat=t_img, teacher_text_feat=t_txt) if alpha > 0 else {}
    out = C.contrastive_loss(
        img,
        txt,
        s,
        image_ids=ids,
        distill_alpha=alpha,
        group=group,
        backend=backend,
        mode=mode,
        return_negatives=True,
        seed=SEED,
        **teacher,
    )
    g_img, g_txt, g_s = torch.autograd.grad(weight * out.loss, [img, txt, s])
    return dict(
        loss=out.loss.detach(),
        g_img=g_img,
        g_txt=g_txt,
        g_s=g_s,
        neg_t=out.neg_text_for_image,
        neg_i=out.neg_image_for_text,
    )


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt, t_img, t_txt, ids = _global_batch(world)
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        local = (img[sl], txt[sl], t_img[sl], t_txt[sl], ids[sl])
        weight = 1.0 + rank / 2
        res = {}
        for alpha in ALPHAS:
            res[("eager", "gather", alpha, 1.0)] = _run(*local, "eager", "gather", alpha)
            res[("eager", "gather", alpha, "w")] = _run(*local, "eager", "gather", alpha, weight)
            for backend, mode in FUSED:
                if why_unavailable("contrastive", backend, "cpu") is None:
                    res[(backend, mode, alpha, "w")] = _run(*local, backend, mode, alpha, weight)
        # Unequal b (rank 0 brings one row fewer): a clear error on every rank, before a gather
        # of unequal sizes can abort gloo (or hang NCCL).
        short = tuple(t[1:] if rank == 0 else t for t in local)
        for backend in ("eager", "triton"):
            if why_unavailable("contrastive", backend, "cpu") is not None:
                continue
            try:
                _run(*short, backend, "gather", 0.0)
                res[("unequal", backend)] = None
            except ValueError as e:
                res[("unequal", backend)] = str(e)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNS = {}


def _ranks(world, tmp_path_factory):
    if world not in _RUNS:
        out = tmp_path_factory.mktemp(f"gcpr{world}")
        mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
        _RUNS[world] = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    return _RUNS[world]


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("world", [2, 3])
def test_eager_distributed_equals_single_process(world, alpha, tmp_path_factory):
    ranks = _ranks(world, tmp_path_factory)
    ref = _run(*_global_batch(world), "eager", "gather", alpha)
    got = [r[("eager", "gather", alpha, 1.0)] for r in ranks]
    torch.testing.assert_close(
        torch.stack([r["loss"] for r in got]).mean(), ref["loss"], atol=2e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        torch.stack([r["g_s"] for r in got]).mean(), ref["g_s"], atol=2e-5, rtol=1e-4
    )
    for key in ("g_img", "g_txt"):
        assert ref[key].abs().max() > 0
        torch.testing.assert_close(
            torch.cat([r[key] for r in got]) / world, ref[key], atol=2e-5, rtol=1e-4, msg=key
        )
    for key in ("neg_t", "neg_i"):
        assert torch.equal(torch.cat([r[key] for r in got]), ref[key]), key


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("mode", ["gather", "ring"])
@pytest.mark.parametrize("world", [2, 3])
def test_fused_distributed_equals_eager_rank_by_rank(world, mode, alpha, tmp_path_factory):
    if why_unavailable("contrastive", "triton", "cpu") is not None:
        pytest.skip("the fused path needs triton (TRITON_INTERPRET=1 on CPU)")
    ranks = _ranks(world, tmp_path_factory)
    for r, res in enumerate(ranks):
        ref, got = res[("eager", "gather", alpha, "w")], res[("triton", mode, alpha, "w")]
        torch.testing.assert_close(
            got["loss"], ref["loss"], atol=2e-5, rtol=1e-5, msg=f"rank {r} loss"
        )
        for key in ("g_img", "g_txt", "g_s"):
            assert ref[key].abs().max() > 0, key
            torch.testing.assert_close(
                got[key], ref[key], atol=2e-5, rtol=1e-4, msg=f"rank {r} {key}"
            )
        # Counter-based noise: the sample depends on (seed, global row, column) only.
        for key in ("neg_t", "neg_i"):
            assert torch.equal(got[key], ref[key]), f"rank {r} {key}"


@pytest.mark.parametrize("world", [2, 3])
def test_unequal_rows_are_one_clear_error_on_every_rank(world, tmp_path_factory):
    ranks = _ranks(world, tmp_path_factory)
    sizes = [B_LOCAL - 1] + [B_LOCAL] * (world - 1)
    for r, res in enumerate(ranks):
        for key in [k for k in res if k[0] == "unequal"]:
            assert res[key] is not None, f"rank {r} {key[1]} accepted unequal b"
            assert f"same number of rows; per rank: {sizes}" in res[key], res[key]
