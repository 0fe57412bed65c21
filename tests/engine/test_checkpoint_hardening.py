"""Issue 17, the checkpoint items: no checkpoint with non-finite weights or optimizer state is
written and only a verified one is named "last good" (item 2; infinite hyper-parameters are
config errors); ``--resume`` takes the newest checkpoint that loads, saying what it skipped, and
one line when none loads (8); resuming with another model is one line (9); a full disk while
checkpointing is one line naming the disk and folder, the partial .tmp removed at once (11);
``latest`` naming a missing file is one line (12); ``r2d2 convert official`` takes the head
counts from the checkpoint's config or requires --preset (14)."""

import errno
import io
import os

import pytest
import torch
import torch.nn as nn

import r2d2.engine.checkpoint as C
from _helpers.cli import QUIET, TINY, one_line, run_cli
from _helpers.layouts import official_cfg, official_names
from r2d2.engine.config import ConfigError, load_config
from r2d2.engine.trainer import TrainingError


class Toy(nn.Module):
    """A small objective. ``blow_up_at``: from that forward call on a weight is +inf (the loss goes
    non-finite, as with a huge learning rate). ``nan_unused_at``: a weight the loss does not use
    becomes NaN (the loss stays finite)."""

    def __init__(self, blow_up_at=None, nan_unused_at=None):
        super().__init__()
        self.model = nn.Module()
        self.model.img = nn.Linear(3 * 8 * 8, 4)
        self.model.txt = nn.Embedding(30000, 4)
        self.unused = nn.Parameter(torch.zeros(3))
        self.calls = 0
        self.blow_up_at, self.nan_unused_at = blow_up_at, nan_unused_at

    def forward(self, b):
        self.calls += 1
        with torch.no_grad():
            if self.calls == self.blow_up_at:
                self.model.img.weight[0, 0] = float("inf")
            if self.calls == self.nan_unused_at:
                self.unused.fill_(float("nan"))
        a = self.model.img(b["images"].flatten(1))
        t = (self.model.txt(b["input_ids"] % 30000) * b["attention_mask"][..., None]).sum(1)
        return {"loss": (((a * t).sum(-1) - 1.0) ** 2).mean()}


def _trainer(out, args=(), objective=None, resume=False):
    from r2d2.engine.data.loader import Tokenize
    from r2d2.engine.tokenizer import build_tokenizer
    from r2d2.engine.trainer import Trainer

    cfg = load_config(
        None,
        QUIET
        + [
            "--train.log_every=1",
            "--data.batch_size=4",
            "--data.synthetic_size=64",
            "--train.keep_checkpoints=10",
            *args,
        ],
    )
    torch.manual_seed(0)
    return Trainer(
        cfg,
        str(out),
        resume=resume,
        objective=objective or Toy(),
        tokenize=Tokenize(build_tokenizer(None, 12), 12),
        image_size=8,
        flops_per_sample=1e6,
    )


def _all_finite(folder):
    for f in sorted(os.listdir(folder)):
        if f.endswith(".pt"):
            ck = torch.load(os.path.join(folder, f), weights_only=True)
            bad, _, names = C._non_finite(
                (ck["objective"], "objective"), (ck["optimizer"], "optimizer")
            )
            assert bad == 0, (f, names)


# ---------------------------------------------------------------------------- item 2
@pytest.mark.parametrize(
    "arg",
    [
        "--optim.lr=inf",
        "--optim.lr=.inf",
        "--optim.eps=inf",
        "--loss.distill_alpha=inf",
        "--optim.grad_clip=-.inf",
    ],
)
def test_infinite_hyper_parameters_are_config_errors(arg):
    with pytest.raises(ConfigError, match="is not a finite number"):
        load_config(TINY, [arg])


def test_infinite_lr_on_the_command_line_exits_2(tmp_path, capsys):
    rc, err, _ = run_cli(
        capsys, "pretrain", "--config", TINY, "--out", str(tmp_path / "run"), "--optim.lr=inf"
    )
    assert rc == 2 and "optim.lr=inf is not a finite number" in one_line(err)


def test_no_checkpoint_is_written_during_a_non_finite_streak(tmp_path):
    """The weights blow up at step 3: steps 3.. are non-finite and skipped. The step-4 checkpoint
    (inside the streak) is not written and the run names the verified step-2 one."""
    tr = _trainer(
        tmp_path,
        ["--train.max_steps=20", "--train.checkpoint_every=2", "--train.max_bad_steps=3"],
        Toy(blow_up_at=3),
    )
    with pytest.raises(
        TrainingError,
        match=r"3 non-finite steps in a row .*last good checkpoint: .*step_000002\.pt",
    ):
        tr.fit()
    ck = tmp_path / "checkpoints"
    assert sorted(f for f in os.listdir(ck) if f.endswith(".pt")) == ["step_000002.pt"]
    assert (ck / "latest").read_text().strip() == "step_000002.pt"
    _all_finite(ck)


def test_a_non_finite_state_is_never_written_even_when_the_loss_is_finite(tmp_path):
    tr = _trainer(
        tmp_path, ["--train.max_steps=20", "--train.checkpoint_every=2"], Toy(nan_unused_at=3)
    )
    with pytest.raises(
        TrainingError,
        match=r"step 4: 1 of \d+ tensors .* hold NaN or Inf \(first: objective\.unused\);"
        r" checkpoint step_000004\.pt not written; the run stops, last good "
        r"checkpoint: .*step_000002\.pt",
    ):
        tr.fit()
    ck = tmp_path / "checkpoints"
    assert sorted(os.listdir(ck)) == ["latest", "step_000002.pt"]
    _all_finite(ck)


def test_checkpointer_refuses_non_finite_weights(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    ck = C.Checkpointer(str(tmp_path))
    ck.save(model, opt, None, C.TrainState(step=1))
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(C.NonFiniteStateError, match=r"1 of 2 tensors .*\(first: objective\.bias\)"):
        ck.save(model, opt, None, C.TrainState(step=2))
    assert sorted(os.listdir(ck.dir)) == ["latest", "step_000001.pt"]
    assert ck.latest().endswith("step_000001.pt")


# ---------------------------------------------------------------------------- item 8
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, capsys, damage):
    _trainer(tmp_path, ["--train.max_steps=4", "--train.checkpoint_every=2"]).fit()
    newest = tmp_path / "checkpoints" / "step_000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    capsys.readouterr()
    res = _trainer(
        tmp_path, ["--train.max_steps=6", "--train.checkpoint_every=2"], resume=True
    ).fit()
    out = capsys.readouterr().out
    assert "--resume: skipped step_000004.pt:" in out and "not a readable checkpoint" in out, out
    assert "resumed from step 2" in out
    assert res.step == 6 and res.checkpoint.endswith("step_000006.pt")


def test_resume_when_no_checkpoint_loads_isone_line(tmp_path, capsys):
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "step_000002.pt").write_bytes(b"")
    (ck / "step_000004.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (ck / "latest").write_text("step_000004.pt\n")
    rc, err, _ = run_cli(
        capsys, "pretrain", "--config", TINY, "--out", str(tmp_path / "run"), *QUIET, "--resume"
    )
    assert rc == 1, err
    line = one_line(err)
    assert (
        "--resume: none of the 2 checkpoint(s)" in line
        and "step_000004.pt" in line
        and "step_000002.pt" in line
    )


# ---------------------------------------------------------------------------- item 9
@pytest.mark.parametrize(
    "other",
    [
        ["--model.vision.layers=1"],
        ["--model.preset=prd2-tiny", "--loss.fgr=false", "--loss.mlm=false"],
    ],
)
def test_resume_with_another_model_isone_line(tmp_path, capsys, other):
    from r2d2.engine.trainer import build_objective, build_optimizer

    cfg = load_config(TINY, [])
    obj = build_objective(cfg)
    C.Checkpointer(str(tmp_path / "run")).save(
        obj, build_optimizer(obj, cfg.optim, torch.device("cpu")), None, C.TrainState(step=1)
    )
    rc, err, _ = run_cli(
        capsys,
        "pretrain",
        "--config",
        TINY,
        "--out",
        str(tmp_path / "run"),
        *QUIET,
        "--resume",
        *other,
    )
    assert rc == 1, err
    assert "the weights do not fit the model of the config" in one_line(err)
    assert "resume with the config the run was started with" in err


# ---------------------------------------------------------------------------- item 11
class _FullDisk(io.FileIO):
    budget = 3000

    def write(self, b):
        room = self.budget - self.tell()
        if len(b) > room:
            super().write(bytes(b)[: max(0, room)])
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_disk_full_while_checkpointing_is_one_line_and_removes_the_partial_file(
    tmp_path, monkeypatch
):
    tr = _trainer(tmp_path, ["--train.max_steps=4", "--train.checkpoint_every=2"])
    real_open = open

    def fake_open(path, mode="r", *a, **k):
        if str(path).endswith("step_000004.pt.tmp") and mode == "wb":
            return _FullDisk(path, "w")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(C, "open", fake_open, raising=False)
    with pytest.raises(TrainingError) as e:
        tr.fit()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "no space left on device: the disk /" in msg and str(tmp_path / "checkpoints") in msg, (
        msg
    )
    assert "step_000004.pt was not written" in msg
    ck = tmp_path / "checkpoints"
    assert sorted(os.listdir(ck)) == ["latest", "step_000002.pt"]  # no .tmp left behind
    assert (ck / "latest").read_text().strip() == "step_000002.pt"


# ---------------------------------------------------------------------------- item 12
def test_latest_naming_a_missing_file(tmp_path, capsys):
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "latest").write_text("step_000009.pt\n")
    rc, err, _ = run_cli(
        capsys, "pretrain", "--config", TINY, "--out", str(tmp_path / "run"), *QUIET, "--resume"
    )
    assert rc == 1, err
    assert "points at step_000009.pt, which does not exist" in one_line(err)
    # with an intact older checkpoint beside it, that one is taken (and the run says so)
    _trainer(tmp_path / "b", ["--train.max_steps=2", "--train.checkpoint_every=2"]).fit()
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_000009.pt\n")
    capsys.readouterr()
    res = _trainer(tmp_path / "b", ["--train.max_steps=3"], resume=True).fit()
    out = capsys.readouterr().out
    assert "points at step_000009.pt, which does not exist; trying the other checkpoints" in out
    assert "resumed from step 2" in out and res.step == 3


# ---------------------------------------------------------------------------- item 14 (convert)
def _official(tmp_path, heads, with_config):
    from r2d2.engine.model import R2D2Model

    cfg = official_cfg()
    cfg.vision.heads = cfg.text.heads = heads
    shapes = {k: v.shape for k, v in R2D2Model(cfg).state_dict().items()}
    sd = {theirs: torch.randn(shapes[ours]) for ours, theirs in official_names(cfg).items()}
    ck = {"model": sd}
    if with_config:
        ck["config"] = {
            "vision_config": {"num_attention_heads": heads},
            "text_config": {"num_attention_heads": heads},
        }
    path = tmp_path / "release.pth"
    torch.save(ck, str(path))
    return str(path)


def test_convert_reads_head_counts_from_the_checkpoint_config(tmp_path, capsys):
    from r2d2.engine.model import R2D2Model

    path = _official(
        tmp_path, heads=4, with_config=True
    )  # width 64: 4 heads of 16, not 64 / 64 = 1
    rc, err, out = run_cli(capsys, "convert", "official", path, str(tmp_path / "m"))
    assert rc == 0, err
    assert "attention heads from the checkpoint's config: vision 4, text 4" in out
    m = R2D2Model.from_pretrained(str(tmp_path / "m"))
    assert m.config.vision.heads == 4 and m.config.text.heads == 4


def test_convert_without_preset_or_config_requires_preset(tmp_path, capsys):
    path = _official(tmp_path, heads=4, with_config=False)
    rc, err, _ = run_cli(capsys, "convert", "official", path, str(tmp_path / "m"))
    assert rc == 2 and "pass --preset" in one_line(err)
    assert not (tmp_path / "m").exists()
