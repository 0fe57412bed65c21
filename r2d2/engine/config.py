"""Typed run configuration: one dataclass per section, YAML presets, ``--section.field=value``.

A run is described by :class:`RunConfig` with the sections ``model`` (:class:`ModelConfig`),
``loss`` (:class:`LossConfig`), ``data``, ``optim``, ``kernels``, ``train``, ``distributed``,
``logging``, and the generative tasks' ``caption`` and ``t2i``. A YAML file gives any subset of them (``base: other.yaml`` inherits another file
first, relative to this one, else a packaged preset of that name); command-line overrides ``--section.field=value`` (or
``--section.field value``) come last, their values parsed as YAML (``64`` -> int, ``null`` ->
None, ``[0.9, 0.98]`` -> list) and coerced to the field's type (``1e-3`` is a float). Every
field is validated in its dataclass's ``__post_init__`` with the checks of
:mod:`r2d2.engine.validate`; an error names the field and what it accepts. The resolved config is
written to ``<out>/config.yaml`` so a run folder says exactly what ran.

``--config`` takes a path or the name of a packaged preset (``r2d2/configs/*.yaml``; ``r2d2
presets`` lists them): ``tiny``, ``tiny.yaml`` and ``configs/tiny.yaml`` all name the same preset
when no such file exists (:func:`resolve_config_path`; an existing file always wins), so the paths
typed in a checkout before the presets moved into the package keep working, from any directory.
Relative paths *inside* a config (``train.init_from``, ``data.path``, ``data.vocab``, ...) are
relative to the current directory of the command, never to the YAML file: a packaged preset lives
in site-packages, and ``init_from: runs/demo/model`` means the ``runs/`` where you run.

``model.preset`` names the model preset the other ``model`` keys change
(:meth:`ModelConfig.tree_base`); without it a run starts from ``tiny``.

The loader (:func:`load_yaml_tree`, :func:`parse_overrides`, :func:`load_tree`) is not tied to
:class:`RunConfig`: ``r2d2 eval`` reads its own schema with it
(:mod:`r2d2.engine.tasks.config`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields

import yaml

from r2d2.engine.data import ccmb
from r2d2.engine.losses import LossConfig
from r2d2.engine.model.config import DEFAULT_PRESET, ModelConfig, model_preset
from r2d2.engine.tasks.caption.config import CaptionConfig
from r2d2.engine.tasks.t2i.config import T2IConfig
from r2d2.engine.validate import (
    ConfigError,
    ConfigFileNotFound,
    build,
    choice,
    in_range,
    merge,
    numbers,
    positive,
)
from r2d2.kernels.dispatch import KernelConfig

__all__ = [
    "PRESETS_DIR",
    "ConfigError",
    "ConfigFileNotFound",
    "DataConfig",
    "DistributedConfig",
    "LoggingConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "eval_manifest_format",
    "infer_data_format",
    "load_config",
    "load_tree",
    "load_yaml_tree",
    "parse_overrides",
    "preset_names",
    "preset_path",
    "resolve_config_path",
]

FORMATS = ("synthetic", "jsonl", "tsv", "webdataset", "aic_icc")
"""Data formats read here; ``ccmb_<name>`` formats (``<name>`` in ``r2d2.engine.data.ccmb.FORMATS``)
go to ``r2d2.engine.data.ccmb``; ``aic_icc`` (AIC-ICC captions) is the same as ``ccmb_aic_icc``."""
TASKS = ("pretrain", "retrieval", "matching", "caption", "t2i")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class DataConfig:
    """Where samples come from and how they become batches."""

    format: str = "synthetic"
    """synthetic | jsonl | tsv | webdataset | aic_icc (AIC-ICC caption JSON) | ccmb_<name> (icr,
    iqr, icm, iqm, flickr30k_cn, coco_cn, ...)"""
    path: str | None = None
    """annotation file (jsonl/tsv/ccmb) or shard pattern ``dir/shard-{000..009}.tar`` (webdataset)"""
    image_root: str | None = None
    """directory image paths are relative to (default: the annotation file's directory)"""
    eval_path: str | None = None
    """held-out annotation file for the end-of-run retrieval eval: read in ``format`` (jsonl, tsv,
    ccmb_*); with synthetic or webdataset, a .jsonl or .tsv manifest (by its extension) instead
    of the synthetic held-out split / of nothing. Images that do not decode are left out with
    their pairs and counted in eval.json"""
    batch_size: int = 32
    """GLOBAL batch per optimizer step (all ranks, all accumulation micro-steps)"""
    image_size: int | None = None
    """input resolution; None = the model's image_size"""
    max_text_len: int = 32
    """tokens per caption after truncation/padding"""
    vocab: str | None = None
    """tokenizer vocab.txt; None = the built-in vocabulary"""
    num_workers: int = 0
    """DataLoader worker processes per rank"""
    augment: bool = True
    """training augmentation: RandomResizedCrop + horizontal flip (eval: resize + center crop)"""
    crop_scale: list = field(default_factory=lambda: [0.5, 1.0])
    """RandomResizedCrop area range"""
    hflip: bool = False
    """random horizontal flip (off by default: it swaps left/right words in captions)"""
    randaugment: list | None = None
    """[n, m]: RandAugment with n ops at magnitude m (0-10) after the crop (the official retrieval
    fine-tuning: [2, 5]); null = off"""
    shuffle_buffer: int = 1000
    """webdataset: raw samples held in the seeded shuffle buffer (and shard order shuffled per
    epoch); 0 = read the shards in order"""
    max_skip_rate: float = 0.1
    """stop with an error when skipped / seen samples passes this (after 100 samples)"""
    synthetic_size: int = 20000
    """synthetic: number of training pairs"""
    synthetic_eval_size: int = 500
    """synthetic: number of held-out pairs for the end-of-run retrieval eval"""
    seed: int = 0
    """data order and augmentation seed (with the epoch and the sample index)"""

    def __post_init__(self) -> None:
        # image-text pair sets only: zero-shot classification sets are not training data
        pairs = getattr(ccmb, "RETRIEVAL_FORMATS", ()) + getattr(
            ccmb, "MATCHING_FORMATS", ()
        ) or tuple(f for f in ccmb.FORMATS if f != "zeroshot")
        allowed = FORMATS + tuple(f"ccmb_{f}" for f in pairs)
        if self.format not in allowed:
            raise ConfigError(
                f"data.format={self.format!r} is not allowed; expected one of {allowed}"
            )
        if self.format != "synthetic" and not self.path:
            raise ConfigError(f"data.path is required for data.format={self.format!r}")
        if self.format == "synthetic" and self.path:
            # the synthetic set reads no file: training on it while the user named data would
            # be a silently wrong run (load_config infers the format when only the path is given)
            raise ConfigError(
                f"data.path={self.path!r} with data.format=synthetic, which reads no file: "
                "set data.format to the path's format (jsonl, tsv, webdataset, "
                "ccmb_<name>) or drop data.path"
            )
        positive(
            "data", self, "batch_size", "max_text_len", "synthetic_size", "synthetic_eval_size"
        )
        positive("data", self, "num_workers", allow_zero=True)
        if self.image_size is not None:
            positive("data", self, "image_size")
        in_range("data", self, "max_skip_rate")
        numbers("data", "crop_scale", self.crop_scale, 2, "[lo, hi] with 0 < lo <= hi <= 1")
        positive("data", self, "shuffle_buffer", allow_zero=True)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(
                f"data.crop_scale={self.crop_scale} must be [lo, hi] with 0 < lo <= hi <= 1"
            )
        if self.randaugment is not None:
            ra = self.randaugment
            if (
                not isinstance(ra, (list, tuple))
                or len(ra) != 2
                or not isinstance(ra[0], int)
                or isinstance(ra[0], bool)
                or ra[0] < 0
                or not isinstance(ra[1], (int, float))
                or not 0 <= ra[1] <= 10
            ):
                raise ConfigError(
                    f"data.randaugment={ra!r} must be [n, m] with an int n >= 0 and "
                    "a magnitude 0 <= m <= 10, or null"
                )


EVAL_MANIFESTS = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv"}


def infer_data_format(path: str) -> str | None:
    """The training format a ``data.path`` names by its form: ``.jsonl`` / ``.json`` -> jsonl,
    ``.tsv`` -> tsv, tar shards (``.tar``, ``.tar.gz``, ``.tgz``, brace patterns such as
    ``dir/shard-{000..009}.tar``, several joined by ``::``) -> webdataset; None when the name does
    not tell (a ccmb_<name> layout, another extension)."""
    p = str(path).strip().lower()
    last = p.split("::")[-1]
    if last.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    return EVAL_MANIFESTS.get(os.path.splitext(last)[1])


def eval_manifest_format(eval_path: str, data_format: str) -> str:
    """The reader of ``data.eval_path``: ``data.format`` itself for the annotation formats;
    for ``synthetic`` and ``webdataset``, which have none, a jsonl or tsv manifest named by its
    extension (held-out tar shards are not read: the evaluation needs random access to images)."""
    if data_format not in ("synthetic", "webdataset"):
        return data_format
    ext = os.path.splitext(str(eval_path))[1].lower()
    if ext not in EVAL_MANIFESTS:
        raise ConfigError(
            f"data.eval_path={eval_path!r} with data.format={data_format}: the held-out set "
            f"must be a jsonl or tsv manifest (extension one of {sorted(EVAL_MANIFESTS)}), "
            "images relative to data.image_root (default: its folder)"
        )
    return EVAL_MANIFESTS[ext]


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay and a warmup + cosine learning-rate schedule."""

    lr: float = 1e-4
    """peak learning rate"""
    weight_decay: float = 0.05
    """applied to weight matrices only (not norms, biases, embeddings, temperatures)"""
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    """AdamW (beta1, beta2)"""
    eps: float = 1e-6
    """AdamW epsilon"""
    warmup_steps: int = 100
    """linear warmup from 0 to ``lr``"""
    min_lr_ratio: float = 0.1
    """cosine decays to ``lr * min_lr_ratio`` at ``train.max_steps``"""
    grad_clip: float = 1.0
    """global gradient-norm clip; 0 = off"""
    fused: str = "auto"
    """fused AdamW: auto (on CUDA), true, false"""

    def __post_init__(self) -> None:
        positive("optim", self, "lr", "eps")
        positive("optim", self, "weight_decay", "warmup_steps", "grad_clip", allow_zero=True)
        numbers("optim", "betas", self.betas, 2, "two numbers in [0, 1)")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        self.fused = str(self.fused).lower()
        choice("optim", "fused", self.fused, ("auto", "true", "false"))


@dataclass
class TrainConfig:
    """The loop: objective, length, precision, checkpoints, failure handling."""

    task: str = "pretrain"
    """pretrain (R2D2 objectives) | retrieval (fine-tune with the pre-training losses) | matching
    (ITM) | caption (the ``caption`` section) | t2i (text-to-image, the ``t2i`` section)"""
    max_steps: int = 1000
    """optimizer steps"""
    grad_accum: int = 1
    """micro-batches per optimizer step (the global batch is split across them)"""
    log_every: int = 10
    """steps between JSONL/TensorBoard rows"""
    checkpoint_every: int = 500
    """steps between checkpoints (0 = only at the end and on SIGTERM)"""
    keep_checkpoints: int = 2
    """how many step checkpoints to keep (older ones are deleted)"""
    seed: int = 0
    """model init and loss randomness seed"""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bitwise reproducible (and resumable) on CPU"""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16"""
    device: str = "auto"
    """auto | cpu | cuda"""
    activation_checkpointing: bool = False
    """recompute encoder blocks in backward (passed to the model when it supports it)"""
    compile: bool = False
    """torch.compile the model"""
    max_bad_steps: int = 5
    """non-finite losses in a row before the run stops (the last good checkpoint is kept)"""
    init_from: str | None = None
    """save_pretrained directory or checkpoint to start from (fine-tuning)"""
    eval_at_end: bool = True
    """zero-shot retrieval on the held-out split after training (prints R@1/5/10)"""
    eval_rerank_k: int = 16
    """with cross encoders, that end-of-run evaluation also re-ranks each query's top k with ITM
    and reports pre-rank + rank beside pre-rank (0 = pre-rank only)"""
    freeze_image_encoder: bool = False
    """keep the ViT fixed (the official retrieval and matching fine-tuning recipes); the
    projections, text encoder and cross encoders still train"""

    def __post_init__(self) -> None:
        choice("train", "task", self.task, TASKS)
        choice("train", "precision", self.precision, PRECISIONS)
        choice("train", "device", self.device, ("auto", "cpu", "cuda"))
        positive(
            "train",
            self,
            "max_steps",
            "grad_accum",
            "log_every",
            "max_bad_steps",
            "keep_checkpoints",
        )
        positive("train", self, "checkpoint_every", "eval_rerank_k", allow_zero=True)


@dataclass
class DistributedConfig:
    """How processes started by torchrun share the work."""

    strategy: str = "auto"
    """auto (ddp when WORLD_SIZE > 1) | none | ddp | fsdp (FSDP2 fully_shard, for large); ddp and
    fsdp in a single process (no torchrun, WORLD_SIZE unset or 1) run as none, with a message"""
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU) | nccl | gloo"""
    timeout_s: int = 1800
    """collective timeout"""
    find_unused_parameters: bool = True
    """DDP: tolerate parameters that get no gradient in a step (a head whose objective is switched
    off, e.g. loss.mlm=false); costs one autograd-graph walk per step, so presets running the full
    objective set it false"""

    def __post_init__(self) -> None:
        choice("distributed", "strategy", self.strategy, STRATEGIES)
        choice("distributed", "backend", self.backend, ("auto", "nccl", "gloo"))
        positive("distributed", self, "timeout_s")


@dataclass
class LoggingConfig:
    """What the run reports besides the JSONL log (always written on rank 0)."""

    progress: bool = True
    """tqdm bar with loss and samples/s"""
    tensorboard: bool = True
    """TensorBoard scalars under <out>/tb"""
    plot: bool = True
    """PNG loss curves <out>/loss.png at the end"""
    device_name: str | None = None
    """peak-FLOP/s table key for MFU (default: detected)"""


@dataclass
class RunConfig:
    """Everything a training run needs; each section is validated on its own, then the checks
    that involve two sections run here."""

    model: ModelConfig = field(default_factory=lambda: model_preset(DEFAULT_PRESET))
    """the model to build: ``preset`` plus the fields that differ from it"""
    loss: LossConfig = field(default_factory=LossConfig)
    """which pre-training objectives run, and their weights"""
    data: DataConfig = field(default_factory=DataConfig)
    """where samples come from and how they become batches"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule"""
    kernels: KernelConfig = field(default_factory=KernelConfig)
    """backend per fused op (``r2d2.kernels.dispatch``)"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """the loop: objective, length, precision, checkpoints, failure handling"""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """how torchrun's processes share the work"""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """what the run reports besides log.jsonl"""
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    """captioning decoder, loss and decoding (``train.task=caption``)"""
    t2i: T2IConfig = field(default_factory=T2IConfig)
    """text-to-image generator, training and sampling (``train.task=t2i``)"""

    def __post_init__(self) -> None:
        """Checks that involve two sections, at config time: before a model is built or a
        progress bar started, with the config's exit code."""
        d, t = self.data, self.train
        if d.batch_size % t.grad_accum:
            raise ConfigError(
                f"data.batch_size={d.batch_size} is not divisible by train.grad_accum="
                f"{t.grad_accum}: the global batch is split into grad_accum equal "
                "micro-batches"
            )
        text = self.model.text
        if d.max_text_len > text.max_positions:
            raise ConfigError(
                f"data.max_text_len={d.max_text_len} exceeds the model's text.max_positions="
                f"{text.max_positions} (model.preset={self.model.preset!r}): lower "
                "data.max_text_len or raise model.text.max_positions"
            )
        if d.eval_path and d.format in ("synthetic", "webdataset"):
            eval_manifest_format(d.eval_path, d.format)

    def to_dict(self) -> dict:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in fields(self)}

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, allow_unicode=True, sort_keys=False)
        os.replace(tmp, path)


PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PRESET_SUFFIXES = (".yaml", ".yml")


def preset_names() -> list[str]:
    """The packaged presets, by name (``tiny``, ``base``, ``eval_synthetic``, ...)."""
    if not os.path.isdir(PRESETS_DIR):
        return []
    return sorted(
        os.path.splitext(f)[0] for f in os.listdir(PRESETS_DIR) if f.endswith(PRESET_SUFFIXES)
    )


def preset_path(name: str) -> str | None:
    """The packaged preset that ``name`` names (``tiny``, ``tiny.yaml``, ``configs/tiny.yaml``),
    or None. Only a bare name or one under a ``configs/`` folder (the checkout's old place)."""
    head, tail = os.path.split(os.path.normpath(str(name)))
    if head not in ("", "configs"):
        return None
    stem, ext = os.path.splitext(tail)
    if ext and ext not in PRESET_SUFFIXES:
        return None
    path = os.path.join(PRESETS_DIR, stem + ".yaml")
    return path if stem and os.path.isfile(path) else None


def resolve_config_path(path: str) -> str:
    """``--config``'s file: ``path`` when it is a file, else the packaged preset it names; a
    :class:`ConfigFileNotFound` that lists the presets otherwise."""
    if os.path.isfile(path):
        return path
    found = preset_path(path)
    if found is None:
        if os.path.dirname(os.path.normpath(str(path))) not in ("", "configs"):
            raise ConfigFileNotFound(f"--config: no such file {path}")
        raise ConfigFileNotFound(
            f"--config: no such file or preset {path} (presets: "
            f"{', '.join(preset_names())}; `r2d2 presets` describes them)"
        )
    return found


def load_yaml_tree(path: str) -> dict:
    """A YAML config (a path or a preset name) with its ``base:`` chain merged in (base first)."""
    path = resolve_config_path(path)
    with open(path, encoding="utf-8") as f:
        tree = yaml.safe_load(f) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = tree.pop("base", None)
    if base:
        beside = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(beside) and preset_path(base) is None:
            raise ConfigFileNotFound(f"{path}: base: {base}: no such file beside it or preset")
        return merge(load_yaml_tree(beside if os.path.isfile(beside) else preset_path(base)), tree)
    return tree


def parse_overrides(args: list[str], schema: type = RunConfig) -> dict:
    """``['--train.max_steps=5', '--data.path', 'x.jsonl']`` -> nested dict of YAML-parsed values.

    The first part of each key must be a field of ``schema`` (a section, or for a schema with
    plain top-level fields such as ``r2d2 eval``'s ``device``, that field); types are checked
    when the tree is built (:func:`r2d2.engine.validate.build`)."""
    secs = _sections(schema)
    top = {f.name: f.name in secs for f in fields(schema)}
    sections = [n for n, is_section in top.items() if is_section]
    tree: dict = {}
    i = 0
    while i < len(args):
        a = args[i]
        key = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        if not key or ("." not in key and top.get(key, True)):
            raise ConfigError(
                f"unrecognised argument {a!r}; overrides look like --section.field=value "
                f"with section one of {sections}"
            )
        if "=" in a:
            raw = a[2:].split("=", 1)[1]
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{a} needs a value")
            raw = args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        if section not in top:
            raise ConfigError(f"--{key}: unknown section {section!r}; sections: {sections}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if not name:  # a plain top-level field
            tree[section] = value
        else:
            node = tree.setdefault(section, {})
            *parents, leaf = name.split(".")  # --model.vision.layers=2 -> {"vision": {"layers": 2}}
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--{key}: {p} is not a section")
            node[leaf] = value
        i += 1
    return tree


def _sections(schema: type) -> set[str]:
    """The fields of ``schema`` that are config dataclasses (annotations are strings under
    ``from __future__ import annotations``, so they are resolved)."""
    hints = typing.get_type_hints(schema)
    return {n for n, t in hints.items() if dataclasses.is_dataclass(t)}


def load_tree(path: str | None, overrides: list[str], schema: type) -> tuple[dict, dict]:
    """(the merged tree, the overrides alone): the YAML file with its ``base:`` chain, then the
    command-line overrides on top, each key's section checked against ``schema``."""
    tree = load_yaml_tree(path) if path else {}
    given = parse_overrides(overrides or [], schema)
    merge(tree, given)
    return tree, given


def _infer_format(tree: dict, given: dict, where: str) -> str | None:
    """``--data.path`` given without ``--data.format`` while the preset's format is synthetic
    (which reads no file): take the format from the path's form, or refuse when it does not tell.
    Returns the line that says so (None when nothing was inferred). A config that sets both
    itself (``data.format=synthetic`` and a ``data.path``) is refused by :class:`DataConfig`."""
    gd = given.get("data") or {}
    if not isinstance(gd, dict) or "format" in gd or not gd.get("path"):
        return None
    data = tree.get("data") or {}
    if not isinstance(data, dict) or data.get("format", "synthetic") != "synthetic":
        return None
    src = f"the preset {where}" if where else "the default"
    fmt = infer_data_format(gd["path"])
    if fmt is None:
        raise ConfigError(
            f"--data.path={gd['path']!r}: data.format is synthetic ({src}), which reads no "
            "file, and the path's name does not tell its format: add --data.format=jsonl, "
            "tsv, webdataset or ccmb_<name>"
        )
    data["format"] = fmt
    return f"data.format={fmt} (inferred from --data.path={gd['path']!r}; {src} says synthetic)"


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + overrides -> validated RunConfig. ``--data.path`` given alone on the
    command line over a synthetic preset sets ``data.format`` from the path (``.jsonl``, ``.tsv``,
    tar shards; :func:`infer_data_format`); the config then carries that line in ``notes`` for
    the command to print."""
    tree, given = load_tree(path, overrides or [], RunConfig)
    note = _infer_format(tree, given, path)
    unknown = sorted(set(tree) - {f.name for f in fields(RunConfig)})
    if unknown:
        raise ConfigError(
            f"unknown section {unknown[0]!r}; sections: {[f.name for f in fields(RunConfig)]}"
        )
    cfg = build(RunConfig, tree)
    cfg.notes = [note] if note else []
    return cfg
