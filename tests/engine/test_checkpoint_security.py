"""Loading a checkpoint never runs code (issue 21): every file a user names is read with
``torch.load(weights_only=True)`` or safetensors. A checkpoint carrying a ``__reduce__`` payload
(``os.system`` touching a sentinel file) is refused with one line naming the offending type and
the file, through ``train.init_from`` (a file and a run folder), ``--resume``, ``r2d2 eval
--checkpoint`` and ``r2d2 convert``, and the sentinel is never created. Training checkpoints are
plain data; a checkpoint of the earlier format (numpy RNG state) is refused with the command that
re-saves it, ``r2d2 convert checkpoint OLD NEW --trust-source``, after which it resumes exactly."""

import datetime
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from _helpers.cli import QUIET, TINY, one_line, run_cli
from r2d2.engine.checkpoint import (
    Checkpointer,
    TrainState,
    UnsafeCheckpointError,
    load_weights,
    rng_state,
    safe_load,
    set_rng_state,
)
from r2d2.engine.config import load_config
from r2d2.engine.observability import read_log


class Payload:
    """Unpickling this runs ``touch <sentinel>`` (what a malicious checkpoint would do)."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _evil_checkpoint(path, sentinel, objective=None):
    """A training checkpoint (real weights when ``objective`` is given) with a payload inside."""
    sd = dict(objective.state_dict()) if objective is not None else {"w": torch.zeros(2)}
    sd["payload"] = Payload(sentinel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(
        {
            "objective": sd,
            "optimizer": None,
            "scheduler": None,
            "state": {"step": 3},
            "rng": [rng_state()],
            "rank_data": [{}],
            "extra": {},
        },
        path,
    )
    return path


def _tiny_objective():
    from r2d2.engine.trainer import build_objective

    return build_objective(load_config(TINY, []))


def test_safe_load_refuses_a_payload_and_never_runs_it(tmp_path):
    sentinel = tmp_path / "pwned"
    path = _evil_checkpoint(str(tmp_path / "evil.pt"), sentinel)
    with pytest.raises(
        UnsafeCheckpointError, match=r"evil\.pt: refused: loading it needs posix\.system"
    ):
        safe_load(path)
    with pytest.raises(UnsafeCheckpointError, match="r2d2 convert checkpoint"):
        load_weights(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("where", ["file", "run folder"])
def test_init_from_refuses_a_payload(tmp_path, capsys, where):
    sentinel = tmp_path / "pwned"
    if where == "file":
        target = _evil_checkpoint(str(tmp_path / "shared.pt"), sentinel, _tiny_objective())
    else:  # a run folder: its checkpoints/latest names the file
        run = tmp_path / "shared_run"
        _evil_checkpoint(str(run / "checkpoints" / "step_000003.pt"), sentinel, _tiny_objective())
        (run / "checkpoints" / "latest").write_text("step_000003.pt\n")
        target = str(run)
    rc, err, _ = run_cli(
        capsys,
        "pretrain",
        "--config",
        TINY,
        "--out",
        str(tmp_path / "run"),
        *QUIET,
        f"--train.init_from={target}",
        "--train.max_steps=1",
    )
    assert rc == 1 and "refused: loading it needs posix.system" in one_line(err)
    assert "train.init_from=" in err
    assert not sentinel.exists()
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(
        tmp_path / "run" / "checkpoints"
    )


def test_resume_refuses_a_payload(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    run = tmp_path / "run"
    _evil_checkpoint(str(run / "checkpoints" / "step_000003.pt"), sentinel, _tiny_objective())
    (run / "checkpoints" / "latest").write_text("step_000003.pt\n")
    rc, err, _ = run_cli(
        capsys,
        "pretrain",
        "--config",
        TINY,
        "--out",
        str(run),
        *QUIET,
        "--resume",
        "--train.max_steps=4",
    )
    assert rc == 1, err
    assert (
        "--resume:" in one_line(err)
        and "step_000003.pt: refused: loading it needs posix.system" in err
    )
    assert not sentinel.exists()


def test_eval_checkpoint_never_unpickles(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    evil = _evil_checkpoint(str(tmp_path / "evil.pt"), sentinel)
    # a file: not a model folder
    rc, err, _ = run_cli(
        capsys,
        "eval",
        "retrieval",
        "--checkpoint",
        evil,
        "--out",
        str(tmp_path / "e1"),
        "--data.format=synthetic",
    )
    assert rc == 2 and one_line(err)
    # a model folder whose model.safetensors is a pickle with a payload: safetensors never unpickles
    from r2d2.engine.model import R2D2Model, model_preset

    folder = tmp_path / "model"
    R2D2Model(model_preset("tiny")).save_pretrained(str(folder))
    shutil.copy(evil, folder / "model.safetensors")
    rc, err, _ = run_cli(
        capsys,
        "eval",
        "retrieval",
        "--checkpoint",
        str(folder),
        "--out",
        str(tmp_path / "e2"),
        "--data.format=synthetic",
    )
    assert rc == 1 and "model.safetensors" in one_line(err)
    # a run folder: its model/ is what is read, never its checkpoints/
    run = tmp_path / "run"
    shutil.copytree(folder, run / "model")
    _evil_checkpoint(str(run / "checkpoints" / "step_000003.pt"), sentinel)
    (run / "checkpoints" / "latest").write_text("step_000003.pt\n")
    rc, err, _ = run_cli(
        capsys,
        "eval",
        "retrieval",
        "--checkpoint",
        str(run),
        "--out",
        str(tmp_path / "e3"),
        "--data.format=synthetic",
    )
    assert rc == 1 and one_line(err)
    assert not sentinel.exists()


def test_convert_refuses_a_payload(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    evil = str(tmp_path / "release.pth")
    torch.save({"model": {"visual_encoder.x": torch.zeros(1), "payload": Payload(sentinel)}}, evil)
    rc, err, _ = run_cli(
        capsys, "convert", "official", evil, str(tmp_path / "out"), "--preset", "tiny"
    )
    assert rc == 1 and "refused: loading it needs posix.system" in one_line(err)
    rc, err, _ = run_cli(capsys, "convert", "official", evil, str(tmp_path / "out2"))
    assert rc == 1 and "refused" in one_line(err)
    # re-saving needs the explicit flag: without it nothing is loaded
    ck = _evil_checkpoint(str(tmp_path / "ck.pt"), sentinel)
    rc, err, _ = run_cli(capsys, "convert", "checkpoint", ck, str(tmp_path / "new.pt"))
    assert rc == 2 and "--trust-source" in one_line(err)
    assert not sentinel.exists() and not (tmp_path / "new.pt").exists()


def test_training_checkpoints_are_plain_data(tmp_path):
    """What Checkpointer writes loads with weights_only=True and holds only tensors, containers
    and scalars; the RNG states it stores restore every generator exactly."""
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck = Checkpointer(str(tmp_path))
    random.random(), np.random.rand(), torch.rand(1)
    path = ck.save(
        model,
        opt,
        None,
        TrainState(step=1),
        extra={"config": {"a": [1, 2.0]}, "data_position": {"samples": 4}},
    )
    want = (random.random(), np.random.rand(), torch.rand(1))
    raw = torch.load(path, weights_only=True)  # would raise on any pickled class or function

    def walk(o):
        if isinstance(o, dict):
            assert all(isinstance(k, (str, int)) for k in o)
            return all(walk(v) for v in o.values())
        if isinstance(o, (list, tuple)):
            return all(walk(v) for v in o)
        return type(o) in (torch.Tensor, str, int, float, bool, type(None))

    assert walk(raw)
    assert raw["format"] == 2 and isinstance(raw["rng"][0]["numpy"]["key"], torch.Tensor)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(raw["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(1))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


# ---------------------------------------------------------------------------- the earlier format
class Noisy(nn.Module):
    """A toy objective whose loss draws from the Python, numpy and torch RNGs each step: resuming
    gives the same losses only if all three states come back exactly."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.img = nn.Linear(3 * 8 * 8, 4)
        self.model.txt = nn.Embedding(30000, 4)

    def forward(self, b):
        a = self.model.img(b["images"].flatten(1))
        t = (self.model.txt(b["input_ids"] % 30000) * b["attention_mask"][..., None]).sum(1)
        noise = random.random() + float(np.random.rand()) + float(torch.rand(()))
        loss = (((a * t).sum(-1) - 1.0) ** 2).mean() + 1e-3 * noise
        return {"loss": loss}


def _toy_trainer(out, resume=False):
    from r2d2.engine.data.loader import Tokenize
    from r2d2.engine.tokenizer import build_tokenizer
    from r2d2.engine.trainer import Trainer

    cfg = load_config(
        None,
        QUIET
        + [
            "--train.max_steps=6",
            "--train.checkpoint_every=3",
            "--train.log_every=1",
            "--data.batch_size=4",
            "--data.synthetic_size=64",
            "--train.keep_checkpoints=5",
        ],
    )
    torch.manual_seed(0)
    return Trainer(
        cfg,
        str(out),
        resume=resume,
        objective=Noisy(),
        tokenize=Tokenize(build_tokenizer(None, 12), 12),
        image_size=8,
        flops_per_sample=1e6,
    )


def _losses(out):
    return {r["step"]: r["loss"] for r in read_log(os.path.join(out, "log.jsonl"))}


def _old_format(path):
    """Rewrite ``path`` as the earlier code wrote it: RNG states as random.getstate() /
    np.random.get_state() tuples (a numpy array: needs numpy's reconstructor to unpickle)."""
    ck = torch.load(path, weights_only=True)
    for r in ck["rng"]:
        py, npst = r["python"], r["numpy"]
        r["python"] = (py["version"], tuple(py["state"].tolist()), py["gauss_next"])
        r["numpy"] = (
            npst["kind"],
            npst["key"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    del ck["format"]
    torch.save(ck, path)


@pytest.mark.parametrize("old", [False, True])
def test_resume_is_exact_and_an_old_checkpoint_resumes_after_convert(tmp_path, capsys, old):
    ref = tmp_path / "ref"
    _toy_trainer(ref).fit()
    want = _losses(ref)
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    step3 = cut / "checkpoints" / "step_000003.pt"
    shutil.copy(ref / "checkpoints" / "step_000003.pt", step3)
    (cut / "checkpoints" / "latest").write_text("step_000003.pt\n")
    if old:
        _old_format(str(step3))
        from r2d2.engine.trainer import TrainingError

        with pytest.raises(
            TrainingError,
            match=r"needs numpy\..*written before checkpoints became plain data"
            r".*r2d2 convert checkpoint .*--trust-source",
        ):
            _toy_trainer(cut, resume=True).fit()
        rc, err, _ = run_cli(
            capsys, "convert", "checkpoint", str(step3), str(step3), "--trust-source", "--force"
        )
        assert rc == 0, err
        assert safe_load(str(step3))["format"] == 2
    capsys.readouterr()
    res = _toy_trainer(cut, resume=True).fit()
    assert res.step == 6
    got = _losses(cut)
    assert sorted(got) == [4, 5, 6] and all(got[s] == want[s] for s in got), (got, want)


def test_convert_checkpoint_refuses_what_cannot_be_plain(tmp_path, capsys):
    """--trust-source loads the file (the user vouched for it) but writes only plain data: an
    object that is not is named, and nothing is written."""
    path = tmp_path / "odd.pt"
    torch.save(
        {"objective": {"w": torch.zeros(1)}, "extra": {"when": datetime.date(2020, 1, 1)}},
        str(path),
    )
    rc, err, _ = run_cli(
        capsys, "convert", "checkpoint", str(path), str(tmp_path / "new.pt"), "--trust-source"
    )
    assert rc == 1 and "datetime.date is not plain data" in one_line(err)
    assert not (tmp_path / "new.pt").exists()
