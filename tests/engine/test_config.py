"""Config parsing: presets, overrides, inheritance, validation errors, the saved resolved config."""

import glob
import os
import random
from pathlib import Path

import pytest
import yaml

from r2d2.cli.train import parse
from r2d2.engine.config import ConfigError, RunConfig, load_config, parse_overrides

ROOT = str(Path(__file__).resolve().parents[2])
# training presets (the eval_*.yaml files are `r2d2 eval` configs with their own schema)
PRESETS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "r2d2", "configs", "*.yaml"))
    if not os.path.basename(p).startswith("eval_")
)


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_every_preset_loads_and_builds_its_model_config(path):
    cfg = load_config(path)
    mc = cfg.model
    assert mc.embed_dim > 0
    assert cfg.data.batch_size % cfg.train.grad_accum == 0


def test_presets_exist():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"tiny.yaml", "base.yaml", "large.yaml", "prd2.yaml", "finetune_tiny.yaml"} <= names


def test_overrides_are_typed_and_nested():
    steps, lr = random.randint(1, 10**6), random.uniform(1e-6, 1e-2)
    cfg = load_config(
        os.path.join(ROOT, "r2d2", "configs", "tiny.yaml"),
        [
            f"--train.max_steps={steps}",
            "--optim.lr",
            f"{lr:e}",
            "--optim.betas=[0.8, 0.9]",
            "--train.deterministic=true",
            "--data.vocab=null",
            "--model.vision.layers=3",
            "--model.embed_dim=48",
            "--kernels.attention=eager",
        ],
    )
    assert cfg.train.max_steps == steps and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(lr, rel=1e-6) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.train.deterministic is True and cfg.data.vocab is None
    mc = cfg.model
    assert mc.vision.layers == 3 and mc.embed_dim == 48
    assert (
        mc.vision.width
        == load_config(os.path.join(ROOT, "r2d2", "configs", "tiny.yaml")).model.vision.width
    )
    assert cfg.kernels.attention == "eager"


def test_base_inheritance(tmp_path):
    (tmp_path / "parent.yaml").write_text("train: {max_steps: 7, log_every: 3}\noptim: {lr: 0.5}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain: {max_steps: 9}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.train.max_steps, cfg.train.log_every, cfg.optim.lr) == (9, 3, 0.5)


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["--train.task=foo"],
            "train.task='foo' is not allowed; expected one of ('pretrain', 'retrieval', 'matching', 'caption', 't2i')",
        ),
        (
            ["--train.nope=1"],
            "train.nope is not a TrainConfig field; fields: ['activation_checkpointing'",
        ),
        (["--bogus.x=1"], "unknown section 'bogus'"),
        (["--train.max_steps=abc"], "train.max_steps='abc' has the wrong type; expected int"),
        (["--train.max_steps=0"], "train.max_steps=0 must be a positive number"),
        (["--kernels.attention=fastest"], "kernels.attention='fastest' is not a backend"),
        (["--data.format=jsonl"], "data.path is required for data.format='jsonl'"),
        (["--data.format=parquet", "--data.path=x"], "data.format='parquet' is not allowed"),
        (["--data.max_skip_rate=1.5"], "data.max_skip_rate=1.5 must be in [0, 1]"),
        (
            ["--distributed.strategy=zero3"],
            "distributed.strategy='zero3' is not allowed; expected one of",
        ),
        (["--optim.betas=[0.9]"], "optim.betas=[0.9] must be two numbers"),
        (["--model.not_a_field=3"], "model.not_a_field is not a ModelConfig field"),
        (["--model.preset=huge"], "model.preset='huge'"),
        (["positional"], "unrecognised argument 'positional'"),
        (["--train.max_steps"], "--train.max_steps needs a value"),
        # values the old validation turned into raw tracebacks (TypeError on comparing strings)
        (["--optim.betas=[a,b]"], "optim.betas=['a', 'b'] must be two numbers in [0, 1)"),
        (["--optim.betas=[0.9, true]"], "optim.betas=[0.9, True] must be two numbers"),
        (["--data.crop_scale=[a,b]"], "data.crop_scale=['a', 'b'] must be [lo, hi]"),
        # nested model fields are checked against the nested dataclasses at config time
        (
            ["--model.vision.layerz=2"],
            "model.vision.layerz is not a VisionConfig field; fields: ['dropout'",
        ),
        (["--model.text.nope=1"], "model.text.nope is not a TextConfig field"),
        (["--model.vision=3"], "model.vision is a section (VisionConfig)"),
        (["--model.vision.layers=-1"], "model.vision.layers=-1 must be a positive int"),
        (["--model.text.dropout=1.5"], "model.text.dropout=1.5"),
        (["--loss.nope=1"], "loss.nope is not a LossConfig field"),
        # ccmb_<name> against the downstream reader registry (pair sets only)
        (
            ["--data.format=ccmb_foo", "--data.path=x"],
            "data.format='ccmb_foo' is not allowed; expected one of",
        ),
        (
            ["--data.format=ccmb_zeroshot", "--data.path=x"],
            "data.format='ccmb_zeroshot' is not allowed",
        ),
        (["--data.shuffle_buffer=-1"], "data.shuffle_buffer=-1 must be a non-negative number"),
        # loss.* is coerced like the plain sections: the error names the field, not a TypeError
        (["--loss.ema_momentum=abc"], "loss.ema_momentum='abc' has the wrong type; expected float"),
        (
            ["--loss.fgr_class_weights=3"],
            "loss.fgr_class_weights=3 has the wrong type; expected list",
        ),
        (["--loss.fgr_class_weights=[a, 1]"], "loss.fgr_class_weights=['a', 1] must be [neg, pos]"),
        (["--loss.gcpr=maybe"], "loss.gcpr='maybe' has the wrong type; expected bool"),
        (["--loss.mask_token_id=1.5"], "loss.mask_token_id=1.5 has the wrong type; expected int"),
        (
            ["--loss.special_token_ids=[0, x]"],
            "loss.special_token_ids=[0, 'x'] must be a list of token ids",
        ),
        (
            ["--model.text.dropout=abc"],
            "model.text.dropout='abc' has the wrong type; expected float",
        ),
        # checks across sections, at config time (exit 2, before a model is built)
        (["--train.grad_accum=5"], "data.batch_size=32 is not divisible by train.grad_accum=5"),
        (
            ["--data.max_text_len=1000"],
            "data.max_text_len=1000 exceeds the model's text.max_positions=64",
        ),
        (
            ["--model.preset=base", "--data.max_text_len=513"],
            "text.max_positions=512 (model.preset='base')",
        ),
        (
            ["--data.format=webdataset", "--data.path=x.tar", "--data.eval_path=held.txt"],
            "data.eval_path='held.txt' with data.format=webdataset: the held-out set must be a jsonl or tsv",
        ),
        (["--data.eval_path=held.csv"], "data.eval_path='held.csv' with data.format=synthetic"),
    ],
)
def test_errors_name_the_field_and_what_is_allowed(args, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, args)
    assert needle in str(e.value)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config(str(tmp_path / "nope.yaml"))


def test_resolved_config_round_trips(tmp_path):
    seed = random.randint(0, 10**6)
    cfg = load_config(
        os.path.join(ROOT, "r2d2", "configs", "finetune_tiny.yaml"),
        [f"--train.seed={seed}", "--model.text.layers=1"],
    )
    path = str(tmp_path / "config.yaml")
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(Path(path).read_text())["train"]["seed"] == seed


def test_cli_checks_task_against_command():
    with pytest.raises(ConfigError, match="use r2d2 finetune"):
        parse("pretrain", ["--out", "x", "--train.task=retrieval"])
    with pytest.raises(ConfigError, match=r"needs train\.task=retrieval, matching, caption or t2i"):
        parse("finetune", ["--out", "x"])
    cfg, args = parse("finetune", ["--out", "x", "--train.task=matching", "--resume"])
    assert args.resume and cfg.train.task == "matching"


def test_parse_overrides_space_and_equals_forms():
    tree = parse_overrides(["--train.max_steps", "5", "--data.path=a b.jsonl"])
    assert tree == {"train": {"max_steps": 5}, "data": {"path": "a b.jsonl"}}


def test_default_runconfig_is_valid():
    assert isinstance(RunConfig().to_dict()["train"], dict)


def test_ccmb_formats_come_from_the_reader_registry():
    from r2d2.engine.data import ccmb

    pairs = [f for f in ccmb.FORMATS if f != "zeroshot"]
    assert pairs and "icr" in pairs
    for f in pairs:
        assert (
            load_config(None, [f"--data.format=ccmb_{f}", "--data.path=x"]).data.format
            == f"ccmb_{f}"
        )
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--data.format=ccmb_nope", "--data.path=x"])
    assert all(f"ccmb_{f}" in str(e.value) for f in pairs)  # the message lists what is allowed


def test_loss_and_model_overrides_are_typed_like_the_other_sections(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; --optim.lr=1e-3 always worked, loss.* and model.* did not
    cfg = load_config(
        None,
        [
            "--loss.distill_alpha=1e-3",
            "--loss.ema_momentum=0",
            "--loss.fgd_weight=2E-1",
            "--loss.fgr_class_weights=[1, 2e0]",
            "--model.text.layer_norm_eps=1e-6",
            "--optim.betas=[0.9, 9.99e-1]",
        ],
    )
    lc, mc = cfg.loss, cfg.model
    assert lc.distill_alpha == 1e-3 and isinstance(lc.distill_alpha, float)
    assert lc.fgd_weight == 0.2 and lc.fgr_class_weights == [1, 2.0]
    assert isinstance(cfg.loss.ema_momentum, float)  # int 0 -> 0.0, as for optim.*
    assert mc.text.layer_norm_eps == 1e-6 and cfg.optim.betas == [0.9, 0.999]
    path = str(tmp_path / "config.yaml")
    cfg.save(path)
    assert load_config(path) == cfg  # the coerced values are what is saved


def test_cross_section_checks_pass_for_valid_combinations():
    assert load_config(None, ["--train.grad_accum=4"]).train.grad_accum == 4
    assert load_config(None, ["--data.max_text_len=64"]).data.max_text_len == 64  # == max_positions
    cfg = load_config(
        None, ["--data.format=webdataset", "--data.path=x.tar", "--data.eval_path=held.TSV"]
    )
    assert cfg.data.eval_path == "held.TSV"
    # annotation formats read eval_path in their own format, whatever its extension
    assert load_config(
        None, ["--data.format=tsv", "--data.path=a", "--data.eval_path=b.txt"]
    ).data.eval_path


TINY_YAML = os.path.join(ROOT, "r2d2", "configs", "tiny.yaml")


@pytest.mark.parametrize(
    "path, fmt",
    [
        ("data/train.jsonl", "jsonl"),
        ("ann.JSON", "jsonl"),
        ("a/b.tsv", "tsv"),
        ("shards/shard-{000..009}.tar", "webdataset"),
        ("x.tar.gz", "webdataset"),
        ("a.tar::b.tar", "webdataset"),
    ],
)
def test_data_path_over_a_synthetic_preset_infers_the_format_and_says_so(path, fmt):
    # issue 17 item 3: --data.path used to be ignored (the run trained on synthetic data)
    cfg = load_config(TINY_YAML, [f"--data.path={path}"])
    assert cfg.data.format == fmt and cfg.data.path == path
    assert cfg.notes == [
        f"data.format={fmt} (inferred from --data.path={path!r}; the preset {TINY_YAML} "
        "says synthetic)"
    ]
    assert (
        load_config(None, [f"--data.path={path}"]).data.format == fmt
    )  # the default is synthetic too
    assert load_config(TINY_YAML, []).notes == []


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["--data.format=synthetic", "--data.path=x.jsonl"],
            "data.path='x.jsonl' with data.format=synthetic, which reads no file",
        ),
        (
            ["--data.path=dataset/ICR/train.txt"],
            "the path's name does not tell its format: add --data.format=",
        ),
    ],
)
def test_data_path_with_the_synthetic_format_is_an_error_when_it_cannot_be_inferred(args, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_YAML, args)
    assert needle in str(e.value)


def test_a_config_file_setting_synthetic_and_a_path_is_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "data:\n  format: synthetic\n  path: train.jsonl\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError, match=r"with data\.format=synthetic, which reads no file"):
        load_config(str(tmp_path / "c.yaml"))
    # an explicit format beside the path is taken as given
    assert (
        load_config(TINY_YAML, ["--data.path=x.txt", "--data.format=ccmb_flickr30k_cna"]).notes
        == []
    )
