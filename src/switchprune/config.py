"""Typed, validated configuration: one frozen pydantic dataclass per ``params.yaml`` section.

Every config is built with :func:`from_dict`, which refuses unknown keys, wrong types and
out-of-range values with a single :class:`ConfigError` naming the section and key, so a bad
parameter is reported before any work starts. Fields are strict (no ``"5"`` for ``5``, no ``1``
for ``true``); only ints widen to floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from switchprune import names
from switchprune.errors import InputError

T = TypeVar("T")


class ConfigError(InputError, ValueError):
    """A parameter is unknown, of the wrong type or out of range."""


def _check(ok: bool, message: str) -> None:
    """Raise ``message`` unless ``ok``: a rule that field bounds cannot express."""
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class _Section:
    """A section: strict types, no keys it does not know, frozen."""

    @field_validator("*", mode="wrap")
    @classmethod
    def _keep_strings(cls, value: Any, handler: Callable[[Any], Any]) -> Any:
        """Keep the caller's string objects (pydantic returns its own copy of a literal).

        Configs are pickled into checkpoints, where a string shared by several keys is written
        once: which objects are shared shows in the bytes.
        """
        result = handler(value)
        return value if isinstance(value, str) and result == value else result


# Patterns of string fields, with what a mismatch message says (``{!r}``: the value).
_NAME, _ALIAS, _S3_URI = names.NAME, names.ALIAS, names.S3_URI
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
_SECRET = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"
_PATTERN_MESSAGES = {
    _NAME: "must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit",
    _ALIAS: f"must be an MLflow alias: {names.ALIAS_RULE}",
    _S3_URI: "must be s3://bucket[/prefix] with a valid bucket name, got {!r}",
    _QUANTITY: "is not a Kubernetes quantity",
    _SECRET: "must be a Kubernetes secret name",
}

Dataset = Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "idx", "folder"]
# Hand-written task networks, then torchvision's (gated through the dependency graph).
OWN_ARCHS = ("mlp", "lenet5", "vgg11", "vgg16", "resnet20", "resnet56")
TORCHVISION_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "vgg11_bn",
    "vgg16_bn",
)


# The task network's SGD learning rate per family (``train.tnn_lr: auto``). One rate does not
# fit all: LeNet-5 without normalisation diverges on MNIST at 0.05; BatchNorm networks train well
# there. Unknown (user) networks get the cautious rate.
LR_RECIPES: dict[str, float] = {
    "mlp": 0.05,
    "lenet5": 0.01,
    **dict.fromkeys(("vgg11", "vgg16", "resnet20", "resnet56"), 0.05),
    **dict.fromkeys(TORCHVISION_ARCHS, 0.05),
}
USER_LR = 0.01


def recipe_lr(tnn_lr: float | str, arch: str) -> float:
    """The task network's learning rate: ``tnn_lr`` itself, or the recipe of ``arch``."""
    if tnn_lr != "auto":
        return float(tnn_lr)
    return LR_RECIPES.get(arch, USER_LR)


@dataclass(frozen=True)
class DataConfig(_Section):
    """Which dataset to use, how to split it and how training reads it.

    Attributes:
        dataset: ``digits`` (bundled with scikit-learn), a torchvision dataset, ``idx`` or
            ``folder``.
        idx_dir: Directory of IDX files (``*-images-idx3-ubyte[.gz]``, ``*-labels-idx1-ubyte[.gz]``)
            when ``dataset`` is ``idx``.
        folder_dir: Image folder in torchvision's ``ImageFolder`` layout
            (``train/<class>/<image>``, optional ``val/`` and ``test/``) when ``dataset`` is
            ``folder``. Class indices follow the sorted class folder names.
        image_size: ``folder``: resize every image to ``image_size`` × ``image_size`` pixels;
            ``None`` keeps the images' own size, which they must then all share.
        max_image_pixels: ``folder``: refuse an image with more pixels (width × height, read
            from its header before anything is decoded). The default is PIL's own warning
            threshold (about 9,459 × 9,459).
        raw_dir: Where torchvision datasets are downloaded to when absent.
        download: Allow torchvision to download a missing dataset.
        val_fraction: Share of the training data held out for validation (when the dataset has
            no validation split of its own).
        test_fraction: Share held out for testing, for datasets without an official test split.
        split_seed: Seed of the stratified splits.
        loader: How training and evaluation read the splits: ``memory`` (all of a split as one
            float tensor), ``stream`` (batches read from the files through a ``DataLoader``, so
            memory does not grow with the dataset) or ``auto`` (``memory`` when the training
            split takes less than 1 GiB as float32, else ``stream``).
        num_workers: ``DataLoader`` worker processes when streaming (0 reads in the training
            process).
        augment: Training-time augmentation: ``none``, or ``standard`` = random crop with zero
            padding (4 px at 32 px, scaled to the image size) and, only for datasets whose
            labels survive a mirror image (``folder``, ``cifar10``, ``cifar100``,
            ``fashion_mnist``; never the digit sets), a random horizontal flip. Validation and
            test data are never augmented.
    """

    dataset: Dataset = "digits"
    idx_dir: str | None = None
    folder_dir: str | None = None
    image_size: int | None = None
    max_image_pixels: int = Field(89_478_485, ge=1)
    raw_dir: str = "data/raw"
    download: bool = True
    val_fraction: float = Field(0.1, ge=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    split_seed: int = Field(0, ge=0)
    loader: Literal["auto", "memory", "stream"] = "auto"
    num_workers: int = Field(0, ge=0, le=64)
    augment: Literal["none", "standard"] = "none"

    def __post_init__(self) -> None:
        """Check the rules across fields."""
        _check(
            self.dataset != "idx" or bool(self.idx_dir),
            "[data] idx_dir is required when dataset is 'idx'",
        )
        _check(
            self.dataset != "folder" or bool(self.folder_dir),
            "[data] folder_dir is required when dataset is 'folder'",
        )
        _check(
            self.image_size is None or 1 <= self.image_size <= 4096,
            "[data] image_size must be null or in [1, 4096]",
        )


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The task network (TNN).

    Attributes:
        arch: A hand-written network (:data:`OWN_ARCHS`), a torchvision one
            (:data:`TORCHVISION_ARCHS`), or the user's builder ``"path/to/file.py:build"`` /
            ``"package.module:build"``, called as ``build(num_classes, in_channels)``.
        hidden: Hidden widths of ``mlp`` (LeNet-300-100 by default).
        width_multiplier: Scales every hidden width of ``vgg*``/``resnet*`` (CPU-sized nets);
            for torchvision and user networks, every gated group keeps its first units.
        small_input: torchvision networks: the small-image stem (3x3 stride-1 first conv, no
            first max-pool; MobileNet keeps two more strides at 1; VGG drops its last pooling
            and has one linear classifier). ``null``: on for images of at most 64 px.
    """

    arch: str = "mlp"
    # Lax only for the container: YAML gives a list; the widths themselves stay strict ints.
    hidden: tuple[int, ...] = Field((300, 100), strict=False)
    width_multiplier: float = Field(1.0, gt=0, le=4)
    small_input: bool | None = None

    def __post_init__(self) -> None:
        """Check the widths, the architecture and the rules across fields."""
        _check(len(self.hidden) >= 1, "[model] hidden needs at least one layer")
        _check(all(h >= 1 for h in self.hidden), "[model] hidden widths must be >= 1")
        known = OWN_ARCHS + TORCHVISION_ARCHS
        _check(
            self.arch in known or ":" in self.arch,
            f"[model] arch unknown architecture {self.arch!r} (known: {', '.join(known)}, or "
            "'path/to/file.py:build' / 'package.module:build' for your own)",
        )
        _check(
            self.arch in OWN_ARCHS or self.width_multiplier <= 1.0,
            "[model] width_multiplier must be <= 1 for torchvision and user networks "
            "(groups keep their first units)",
        )


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Alternating SNN/TNN training.

    Attributes:
        epochs: Training epochs (for both the switched TNN and the baseline).
        batch_size: Mini-batch size.
        seed: Seed of initialisation and data order.
        device: ``auto`` (``cuda`` when available), ``cpu`` or ``cuda``.
        tnn_lr: SGD learning rate of the task network; ``auto``: the architecture family's
            recipe (:data:`LR_RECIPES`: 0.05 for the MLP and the BatchNorm networks, 0.01 for
            LeNet-5, which has no normalisation, and for the user's own networks).
        tnn_momentum: SGD momentum of the task network.
        tnn_weight_decay: SGD weight decay of the task network.
        snn_lr: SGD learning rate of the switcher.
        snn_momentum: SGD momentum of the switcher.
        tnn_steps_per_snn_step: ``k``: TNN steps between two SNN steps.
        warmup_epochs: TNN-only epochs (factors fixed at their initial value) before switching.
        switch_epochs_fraction: Share of the epochs during which the SNN learns; afterwards its
            factors are frozen and the TNN fine-tunes under them.
        snn_hidden: Hidden width of the switcher.
        scorer: Where unit scores come from: ``magnitude`` (L2 norm of incoming weights ÷
            layer mean, read as the TNN trains; the default, because the benchmark found no
            setting in which the learned switcher beats it), ``group_norm`` (DepGraph's L2 norm
            of every parameter coupled to the unit ÷ layer mean), ``switcher`` (learned) or
            ``random`` (fixed seeded scores, a control). The fixed scorers need ``compression:
            target`` or ``auto``; the paper's ``penalty``/``none`` modes need the switcher.
        gate_temperature: ``target``/``auto`` modes: SNN steps sample the gates of units near
            the line (on or off); this is the width of that band, in standard deviations of the
            scores. The switcher starts from the magnitude order (its prior) and learns only
            what improves on it. ``penalty`` and ``none`` use straight-through gates.
        amp: Mixed precision of TNN steps on CUDA: ``auto`` (bfloat16 where supported, else
            float16 with loss scaling), ``bf16``, ``fp16`` or ``off``. Always off on the CPU.
        compression: ``target`` switches off the lowest-scored units until ``target_metric`` is
            at ``target_ratio`` of the full network; ``penalty`` adds a fixed cost-weighted L1
            pressure ``penalty`` to the switcher's loss; ``none`` is the paper's task-loss-only
            mode. ``auto`` finds the ratio itself: after the warm-up (at least one epoch) the
            unpruned network's validation accuracy is the reference; each switching epoch
            then tries ``auto_shrink`` times the last accepted ratio, keeps it if validation
            accuracy after that epoch stays within ``max_accuracy_drop`` of the reference,
            and otherwise returns to the last accepted ratio and stops shrinking.
        target_metric: ``params``, ``macs``, or ``latency``: the forward time of a batch of
            256 on the training device, predicted from a table measured there before
            switching (:mod:`switchprune.latency`); ``target_ratio`` is then a share of the
            unpruned network's time (0.5: twice as fast).
        target_ratio: Fraction of the metric to keep (0.4 keeps 40 %).
        width_multiple: Every group keeps a multiple of this many units (a group narrower than
            it stays whole): ``target``/``auto`` modes round to the nearest multiple within the
            budget; ``prune`` rounds the paper's modes up. Widths such as 8 or 16 run faster on
            vectorised CPU and GPU kernels than odd ones.
        penalty: Pressure weight (``penalty`` mode).
        max_accuracy_drop: ``auto`` mode: largest validation accuracy drop (a fraction, 0.01 =
            one point) accepted against the unpruned reference.
        auto_shrink: ``auto`` mode: each trial keeps this share of the last accepted ratio.
        ramp_fraction: Share of the switching phase over which the target is lowered from 1
            to ``target_ratio`` (``target`` mode).
        baseline: Also train the same TNN without a switcher for the same budget.
        nproc_per_node: Processes ``switchprune train`` starts on this machine: above 1 it runs
            itself under ``torchrun --standalone`` (one per GPU on CUDA; data-parallel, below).
            Ignored inside a ``torchrun`` launch (the launcher already chose).
        sync_bn: BatchNorm under ``torchrun`` (several processes). ``auto``/``true``: every
            process normalises its share of a batch with the statistics of the whole global
            batch, as one process would (on CUDA torch's ``SyncBatchNorm``; on the CPU, where
            torch has none, the same statistics through one all-reduce each way per layer and
            step). ``false``: each process normalises with its own share's
            statistics (no communication, but the training differs from one process's) and the
            running statistics are averaged over the processes at every epoch's end, so all
            hold the same network. One process: no effect.
        threads: CPU threads of each training process (torch intra-op threads); ``auto``: torch's
            default in one process (``OMP_NUM_THREADS`` when set), and under ``torchrun`` this
            machine's CPUs divided by its processes, at least one each.
    """

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tnn_lr: float | Literal["auto"] = "auto"
    tnn_momentum: float = Field(0.9, ge=0, lt=1)
    tnn_weight_decay: float = Field(5e-4, ge=0)
    snn_lr: float = Field(0.01, gt=0)
    snn_momentum: float = Field(0.9, ge=0, lt=1)
    tnn_steps_per_snn_step: int = Field(8, ge=1)
    warmup_epochs: int = 0
    switch_epochs_fraction: float = Field(0.75, gt=0, le=1)
    snn_hidden: int = Field(32, ge=1)
    scorer: Literal["switcher", "magnitude", "group_norm", "random"] = "magnitude"
    gate_temperature: float = Field(0.1, gt=0)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    compression: Literal["target", "auto", "penalty", "none"] = "target"
    target_metric: Literal["params", "macs", "latency"] = "params"
    target_ratio: float = Field(0.4, gt=0, le=1)
    width_multiple: int = Field(1, ge=1)
    penalty: float = Field(0.05, ge=0)
    max_accuracy_drop: float = Field(0.01, ge=0, lt=1)
    auto_shrink: float = Field(0.6, gt=0, lt=1)
    ramp_fraction: float = Field(0.5, ge=0, le=1)
    baseline: bool = True
    nproc_per_node: int = Field(1, ge=1)
    sync_bn: bool | Literal["auto"] = "auto"
    threads: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        """Check the rules across fields."""
        _check(self.tnn_lr == "auto" or self.tnn_lr > 0, "[train] tnn_lr must be > 0 or auto")
        _check(self.threads == "auto" or self.threads >= 1, "[train] threads must be >= 1 or auto")
        _check(
            0 <= self.warmup_epochs < self.epochs, "[train] warmup_epochs must be >= 0 and < epochs"
        )
        _check(
            self.scorer == "switcher" or self.compression in ("target", "auto"),
            f"[train] scorer {self.scorer!r} needs compression: target or auto "
            "(it has no zeros of its own)",
        )


@dataclass(frozen=True)
class PruneConfig(_Section):
    """Thresholding of the factors and compaction.

    Attributes:
        threshold: Units whose factor is at or below this are removed (0 removes exact zeros).
        relative: Interpret ``threshold`` relative to each group's largest factor.
        min_units: Never keep fewer units than this in a group (a layer is never emptied).
    """

    threshold: float = Field(0.0, ge=0)
    relative: bool = False
    min_units: int = 1

    def __post_init__(self) -> None:
        """Check the rules across fields."""
        _check(
            not self.relative or self.threshold < 1.0, "[prune] threshold must be < 1 when relative"
        )
        _check(self.min_units >= 1, "[prune] min_units must be >= 1 (a layer is never emptied)")


@dataclass(frozen=True)
class EvaluateConfig(_Section):
    """Measurement settings.

    Attributes:
        batch_size: Batch size of accuracy evaluation.
        latency_warmup: Untimed rounds (one pass of each model) before timing.
        latency_repeats: Timed rounds; the median and interquartile range are reported, and
            a figure from fewer than 20 is flagged as noisy.
        threads: CPU threads used for latency (0 keeps torch's default).
        device: ``auto``, ``cpu`` or ``cuda``.
        runtime: ``torch`` or ``onnxruntime``: whose latency a ``train.target_metric:
            latency`` target asks for (its table is measured there, at ``batch_size`` and
            ``threads``), and whose measured speedup the prediction is set beside.
        max_logit_diff: Largest accepted max abs difference (float64) between the logits of the
            gated trained model and the compacted one; above it the compacted model is not
            the trained model's and evaluation is refused.
    """

    batch_size: int = Field(256, ge=1)
    latency_warmup: int = Field(5, ge=0)
    latency_repeats: int = Field(20, ge=1)
    threads: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runtime: Literal["torch", "onnxruntime"] = "torch"
    max_logit_diff: float = Field(1e-4, gt=0)


@dataclass(frozen=True)
class RegisterConfig(_Section):
    """Logging and registration in MLflow.

    The tracking URI is not a parameter: it comes from ``MLFLOW_TRACKING_URI``, else the
    embedded default (a SQLite store ``mlflow.db`` with artifacts under ``mlruns/``).

    Attributes:
        model_name: Registered model name.
        experiment: MLflow experiment of the runs.
        alias: Alias set on the registered version.
    """

    model_name: str = Field("switchprune-digits-mlp", pattern=_NAME)
    experiment: str = Field("switchprune", pattern=_NAME)
    alias: str = Field("candidate", pattern=_ALIAS)

    def __post_init__(self) -> None:
        """Keep ``champion`` for promotion, and MLflow's reserved aliases for MLflow."""
        _check(names.is_alias(self.alias), f"[register] alias {names.ALIAS_RULE}")
        _check(
            self.alias != "champion", "[register] alias must not be 'champion' (promote sets it)"
        )


@dataclass(frozen=True)
class PromoteConfig(_Section):
    """The gate a registered model passes before it is copied to S3 and made ``champion``.

    Attributes:
        s3_uri: Where promoted models go: ``s3://bucket[/prefix]``; a version lands under
            ``<prefix>/<model_name>/v<version>/`` and the manifest at
            ``<prefix>/<model_name>/current.json``.
        alias: Alias moved to the promoted version.
        min_accuracy: Lowest acceptable ``test_accuracy``.
        max_accuracy_drop: Largest acceptable ``baseline_accuracy - test_accuracy``.
        max_logit_diff: Largest acceptable ``max_abs_logit_diff_f64`` (the compacted model
            must compute what the trained, gated one computes).
        remove_incomplete_after: Seconds after which the files of a promotion that died before
            writing its manifest are removed (by the next promotion of the model).
        max_params_ratio: Largest acceptable ``params_after / params_before`` (minimum
            compression).
        not_worse_than_champion: Refuse a model less accurate than the current champion.
    """

    s3_uri: str = Field("s3://switchprune-models", pattern=_S3_URI)
    alias: str = Field("champion", pattern=_ALIAS)
    min_accuracy: float = Field(0.9, ge=0, le=1)
    max_accuracy_drop: float = Field(0.02, ge=0, le=1)
    max_params_ratio: float = Field(0.8, gt=0, le=1)
    max_logit_diff: float = 1e-4
    remove_incomplete_after: float = Field(3600.0, ge=0)
    not_worse_than_champion: bool = True

    def __post_init__(self) -> None:
        """Rules the field patterns cannot express: reserved aliases, '..' in a bucket."""
        _check(names.is_alias(self.alias), f"[promote] alias {names.ALIAS_RULE}")
        bucket = self.s3_uri.removeprefix("s3://").split("/", 1)[0]
        _check(names.is_bucket(bucket), f"[promote] s3_uri has an invalid bucket {bucket!r}")


@dataclass(frozen=True)
class KubeflowConfig(_Section):
    """Placement of the pipeline's tasks on a Kubernetes cluster (read when compiling).

    Attributes:
        gpu_type: Accelerator resource of the ``train`` task (``nvidia.com/gpu``).
        train_nodes: Nodes that train together (more than one needs ``gpus_per_node >= 1``).
        gpus_per_node: Accelerators on each training node (0 trains on a CPU node). With more
            than one in all (``train_nodes × gpus_per_node``), ``train`` launches a Kubeflow
            Trainer ``TrainJob`` of ``train_nodes`` nodes running ``torchrun``; otherwise it
            trains in its own pod.
        node_selector: Node labels the training pods must land on.
        tolerations: Taints the training pods tolerate: mappings with ``key``, ``operator``
            (``Exists``/``Equal``), optional ``value`` and ``effect``.
        cpu_request: CPU request of every task.
        cpu_limit: CPU limit of every task.
        memory_request: Memory request of every task.
        memory_limit: Memory limit of every task.
        train_cpu_limit: CPU limit of ``train``.
        train_memory_limit: Memory limit of ``train``.
        s3_secret: Kubernetes secret with ``SWITCHPRUNE_S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``
            and ``AWS_SECRET_ACCESS_KEY``.
        mlflow_secret: Kubernetes secret with ``MLFLOW_TRACKING_URI`` (and, if the server
            needs them, ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``).
        retries: Retries of the tasks that talk to S3 or MLflow.
        trainjob_s3_uri: Where a ``TrainJob`` gets the prepared data from and leaves the
            trained models (``s3://bucket[/prefix]``, through ``s3_secret``): one folder per
            job, removed once the models are back.
        trainjob_timeout: Seconds a ``TrainJob`` may run (its ``activeDeadlineSeconds``).
    """

    gpu_type: str = "nvidia.com/gpu"
    train_nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=0)
    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    # Lax only for the container (YAML gives a list); the entries stay strict mappings.
    tolerations: tuple[dict[str, str], ...] = Field(
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},), strict=False
    )
    cpu_request: str = Field("500m", pattern=_QUANTITY)
    cpu_limit: str = Field("2", pattern=_QUANTITY)
    memory_request: str = Field("1Gi", pattern=_QUANTITY)
    memory_limit: str = Field("4Gi", pattern=_QUANTITY)
    train_cpu_limit: str = Field("8", pattern=_QUANTITY)
    train_memory_limit: str = Field("16Gi", pattern=_QUANTITY)
    s3_secret: str = Field("switchprune-s3", pattern=_SECRET)
    mlflow_secret: str = Field("switchprune-mlflow", pattern=_SECRET)
    retries: int = Field(3, ge=0)
    trainjob_s3_uri: str = Field("s3://switchprune-trainjobs", pattern=_S3_URI)
    trainjob_timeout: int = Field(86400, ge=60)

    @property
    def train_gpus(self) -> int:
        """Accelerators of the whole training run: above 1, ``train`` launches a TrainJob."""
        return self.train_nodes * self.gpus_per_node

    def __post_init__(self) -> None:
        """Check the node count and the tolerations' keys and operators."""
        _check(
            self.train_nodes == 1 or self.gpus_per_node >= 1,
            "[kubeflow] train_nodes > 1 needs gpus_per_node >= 1 (several nodes train on GPUs)",
        )
        bucket = self.trainjob_s3_uri.removeprefix("s3://").split("/", 1)[0]
        _check(
            names.is_bucket(bucket), f"[kubeflow] trainjob_s3_uri has an invalid bucket {bucket!r}"
        )
        for t in self.tolerations:
            _check(
                set(t) <= {"key", "operator", "value", "effect"} and "key" in t,
                "[kubeflow] tolerations entries need 'key' and may have 'operator', 'value', "
                "'effect'",
            )
            _check(
                t.get("operator", "Equal") in ("Exists", "Equal"),
                "[kubeflow] tolerations operator must be Exists or Equal",
            )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "prune": PruneConfig,
    "evaluate": EvaluateConfig,
    "register": RegisterConfig,
    "promote": PromoteConfig,
    "kubeflow": KubeflowConfig,
}

# What a wrong type is called in messages, by pydantic error type.
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "dict_type": "a mapping",
}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _bounds_message(metadata: list[Any]) -> str:
    """``must be in (0, 1]`` or ``must be >= 1``: a field's whole range, not the bound missed."""
    b = {op: getattr(m, op) for m in metadata for op in _BOUNDS if hasattr(m, op)}
    if len(b) == 1:
        ((op, bound),) = b.items()
        return f"must be {_BOUNDS[op]} {bound:g}"
    low, high = b.get("ge", b.get("gt")), b.get("le", b.get("lt"))
    return f"must be in {'[' if 'ge' in b else '('}{low:g}, {high:g}{']' if 'le' in b else ')'}"


def _error(cls: type, section: str, exc: ValidationError) -> ConfigError:
    """The first of pydantic's errors as one ``[section] key …`` line."""
    error = exc.errors()[0]
    ctx = error.get("ctx", {})
    if isinstance(ctx.get("error"), ConfigError):
        return ctx["error"]  # a rule across fields, already worded
    name, *path = error["loc"]
    key = path[-1:] == ["[key]"]  # a mapping's key is at fault, not its value
    path = path[:-2] if key else path
    field = cls.__pydantic_fields__[name]  # type: ignore[attr-defined]
    where = f"[{section}] {name}"
    if get_origin(field.annotation) in (tuple, dict):  # elsewhere the path names union members
        where += "".join(f"[{p!r}]" for p in path) + (" key" if key else "")
    kind, value = error["type"], error["input"]
    if kind in _EXPECTED:
        got = repr(value)
        if kind in ("tuple_type", "dict_type"):
            got = f"{type(value).__name__} {got}"
        return ConfigError(f"{where} must be {_EXPECTED[kind]}, got {got}")
    if kind == "literal_error":
        return ConfigError(
            f"{where} must be one of {list(get_args(field.annotation))}, got {value!r}"
        )
    if kind == "string_pattern_mismatch":
        return ConfigError(f"{where} {_PATTERN_MESSAGES[ctx['pattern']].format(value)}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return ConfigError(f"{where} {_bounds_message(field.metadata)}")
    return ConfigError(f"{where}: {error['msg']}")  # pragma: no cover


# Keys that are gone, with what replaced them: a params.yaml that still sets one is told so.
REMOVED_KEYS: dict[tuple[str, str], str] = {
    ("train", "alternation"): "SNN steps always follow every tnn_steps_per_snn_step TNN steps",
    ("train", "detach_factors"): "TNN steps never take gradients through the switcher",
    ("train", "snn_input"): "the switcher always reads per-unit statistics",
    ("train", "snn_holdout"): "SNN steps always use the TNN's own training batches",
    ("train", "snn_gates"): "target/auto modes always sample gates (train.gate_temperature)",
    ("train", "snn_prior"): "in target/auto modes the switcher always starts from magnitude",
    ("prune", "round_to"): "use train.width_multiple (kept widths are its multiples)",
    ("train", "checkpoint_every"): "a checkpoint is written after every epoch",
    ("kubeflow", "gpu_count"): "use gpus_per_node (GPUs on each of train_nodes nodes)",
}


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str | None = None) -> T:
    """Build a config from a mapping, refusing unknown keys, wrong types and bad values.

    Args:
        cls: One of the config classes.
        data: The section's mapping (``None`` means all defaults).
        section: Section name used in messages (defaults to the class's section).

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: With one message naming the section and the key at fault.
    """
    section = section or next((k for k, v in SECTIONS.items() if v is cls), cls.__name__)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a mapping, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    gone = [k for k in data if (section, k) in REMOVED_KEYS]
    if gone:
        raise ConfigError(f"[{section}] {gone[0]} was removed: {REMOVED_KEYS[section, gone[0]]}")
    unknown = sorted((k for k in data if k not in known), key=str)
    if unknown:
        raise ConfigError(
            f"[{section}] unknown key {unknown[0]!r} (known keys: {', '.join(known)})"
        )
    try:
        return cls(**data)
    except ValidationError as exc:
        raise _error(cls, section, exc) from None


def from_struct(cls: type[T], data: dict[str, Any] | None, section: str | None = None) -> T:
    """:func:`from_dict` for a section that travelled as a protobuf ``Struct``.

    A Kubeflow ``dict`` parameter is a ``Struct``, whose numbers are all doubles: depending on
    the runner, ``epochs: 30`` arrives as ``30`` or as ``30.0``. Integral floats are read back
    as ints where the field is an int; everything else is validated by :func:`from_dict`
    exactly as it is for ``params.yaml`` (``2.5`` for an int is still refused).

    Args:
        cls: As for :func:`from_dict`.
        data: The section's ``Struct`` as a mapping (``None`` means all defaults).
        section: As for :func:`from_dict`.

    Returns:
        What :func:`from_dict` returns for ``data`` with its integral floats read back.

    Raises:
        ConfigError: As :func:`from_dict` does.
    """
    if isinstance(data, dict):
        fields = cls.__pydantic_fields__  # type: ignore[attr-defined]
        data = {
            k: _ints_back(v, fields[k].annotation) if k in fields else v for k, v in data.items()
        }
    return from_dict(cls, data, section)


def sections_from_struct(sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Parameter sections that travelled as protobuf ``Struct``s, validated and complete.

    This is what a run records as its parameters: every key of each section, with the types of
    ``params.yaml`` (``epochs`` is ``4``, not ``4.0``), exactly as a run driven by DVC records
    them.

    Args:
        sections: Section name to its mapping (names of :data:`SECTIONS`).

    Returns:
        Section name to ``to_dict`` of the validated config.

    Raises:
        ConfigError: If a section is unknown or invalid.
    """
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} (known sections: {', '.join(SECTIONS)})")
    return {
        name: to_dict(from_struct(SECTIONS[name], value, name)) for name, value in sections.items()
    }


def _ints_back(value: Any, tp: Any) -> Any:
    """``value`` with integral floats turned into ints wherever ``tp`` expects an int."""
    if get_origin(tp) is tuple and isinstance(value, list | tuple):
        return [_ints_back(v, get_args(tp)[0]) for v in value]
    wants_int = tp is int or (int in get_args(tp) and float not in get_args(tp))
    return int(value) if wants_int and isinstance(value, float) and value.is_integer() else value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return a config as a plain, YAML/JSON-friendly mapping (tuples become lists)."""
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def load_params(
    path: str | Any, sections: list[str] | None = None, optional: Sequence[str] = ()
) -> dict[str, Any]:
    """Read a ``params.yaml`` and build the requested sections' configs.

    Args:
        path: Path to the YAML file.
        sections: Sections to build (default: all known sections present or not).
        optional: Further sections to build, from their defaults where the file has none.

    Returns:
        Mapping of section name to config.

    Raises:
        ConfigError: If the file is missing, unreadable, or any section is invalid.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError as exc:
        raise ConfigError(f"parameter file not found: {path}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"parameter file {path} is not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read parameter file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"parameter file {path} is not valid YAML: {exc}") from exc
    if raw is None:
        raise ConfigError(f"parameter file {path} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"parameter file {path} must hold a mapping of sections")
    unknown = sorted(str(k) for k in raw if k not in SECTIONS)
    if unknown:
        # A misspelt section would otherwise silently leave every one of its keys at default.
        raise ConfigError(
            f"parameter file {path}: unknown section {unknown[0]!r} "
            f"(known sections: {', '.join(SECTIONS)})"
        )
    wanted = sections or list(SECTIONS)
    missing = [name for name in wanted if sections and name not in raw]
    if missing:
        # Silently training on every default is never what a missing section means.
        raise ConfigError(f"parameter file {path} has no section {missing[0]!r}")
    return {name: from_dict(SECTIONS[name], raw.get(name), name) for name in [*wanted, *optional]}


def _unique_key_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """A SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(loader: Loader, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


_UniqueKeyLoader = _unique_key_loader()
