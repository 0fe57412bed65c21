"""Distributed GCPR on gloo: W processes (2 and 3) give the loss, gradients and hard negatives of
one process over the concatenated batch, for the eager backend (all-gather) and the fused Triton
backend (interpreter on CPU) in both ``gather`` and ``ring`` modes.

Gradient property: each rank's local loss is a mean over its b rows, the single-process loss is
the mean of the rank losses, and the gather's backward sums the column terms over ranks; so the
local-feature gradient on rank r equals W * (single-process gradient of its slice), and the mean
over ranks of the logit_scale gradient (what DDP averages) equals the single-process one."""

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
CASES = [("eager", "gather"), ("triton", "gather"), ("triton", "ring")]


def _global_batch(world):
    g = torch.Generator().manual_seed(1234 + world)
    n = world * B_LOCAL

    def feats():
        return F.normalize(torch.randn(n, D, generator=g), dim=1)

    img, txt, t_img, t_txt = feats(), feats(), feats(), feats()
    ids = torch.randint(0, max(2, n // 2), (n,), generator=g)   # positives across ranks
    return img, txt, t_img, t_txt, ids


def _run(img, txt, t_img, t_txt, ids, backend, mode, group=None):
    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_()
    s = torch.tensor(40.0, requires_grad=True)
    out = C.contrastive_loss(img, txt, s, image_ids=ids, teacher_image_feat=t_img,
                             teacher_text_feat=t_txt, distill_alpha=0.4, group=group,
                             backend=backend, mode=mode, return_negatives=True, seed=SEED)
    g_img, g_txt, g_s = torch.autograd.grad(out.loss, [img, txt, s])
    return dict(loss=out.loss.detach(), g_img=g_img, g_txt=g_txt, g_s=g_s,
                neg_t=out.neg_text_for_image, neg_i=out.neg_image_for_text)


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt, t_img, t_txt, ids = _global_batch(world)
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        res = {}
        for backend, mode in CASES:
            if why_unavailable("contrastive", backend, "cpu") is not None:
                continue
            res[(backend, mode)] = _run(img[sl], txt[sl], t_img[sl], t_txt[sl], ids[sl], backend,
                                        mode)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_single_process(world, tmp_path):
    if why_unavailable("contrastive", "triton", "cpu") is not None:
        pytest.skip("the fused path needs triton (TRITON_INTERPRET=1 on CPU)")
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    ref = _run(*_global_batch(world), "eager", "gather")
    for case in CASES:
        assert all(case in r for r in ranks), f"{case} did not run"
        loss = torch.stack([r[case]["loss"] for r in ranks]).mean()
        torch.testing.assert_close(loss, ref["loss"], atol=2e-5, rtol=1e-5, msg=str(case))
        g_s = torch.stack([r[case]["g_s"] for r in ranks]).mean()
        torch.testing.assert_close(g_s, ref["g_s"], atol=2e-5, rtol=1e-4, msg=f"{case} scale")
        for key in ("g_img", "g_txt"):
            got = torch.cat([r[case][key] for r in ranks]) / world
            assert ref[key].abs().max() > 0
            torch.testing.assert_close(got, ref[key], atol=2e-5, rtol=1e-4, msg=f"{case} {key}")
        # Counter-based noise: the sample depends on (seed, global row, column) only.
        for key in ("neg_t", "neg_i"):
            got = torch.cat([r[case][key] for r in ranks])
            assert torch.equal(got, ref[key]), f"{case} {key}"
