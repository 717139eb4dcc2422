"""Typed, validated configuration: one frozen dataclass per ``params.yaml`` section.

Every config is built with :func:`from_dict`, which refuses unknown keys, wrong types and
out-of-range values with a single :class:`ConfigError` naming the section and key, so a bad
parameter is reported before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

from switchprune.errors import InputError

T = TypeVar("T")


class ConfigError(InputError, ValueError):
    """A parameter is unknown, of the wrong type or out of range."""


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
class DataConfig:
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
    raw_dir: str = "data/raw"
    download: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    loader: Literal["auto", "memory", "stream"] = "auto"
    num_workers: int = 0
    augment: Literal["none", "standard"] = "none"

    def validate(self) -> None:
        """Check ranges and cross-field rules."""
        _check(0.0 <= self.val_fraction < 0.5, "data", "val_fraction", "must be in [0, 0.5)")
        _check(0.0 < self.test_fraction < 0.5, "data", "test_fraction", "must be in (0, 0.5)")
        _check(self.split_seed >= 0, "data", "split_seed", "must be >= 0")
        _check(
            self.dataset != "idx" or bool(self.idx_dir),
            "data",
            "idx_dir",
            "is required when dataset is 'idx'",
        )
        _check(
            self.dataset != "folder" or bool(self.folder_dir),
            "data",
            "folder_dir",
            "is required when dataset is 'folder'",
        )
        _check(
            self.image_size is None or 1 <= self.image_size <= 4096,
            "data",
            "image_size",
            "must be null or in [1, 4096]",
        )
        _check(0 <= self.num_workers <= 64, "data", "num_workers", "must be in [0, 64]")


@dataclass(frozen=True)
class ModelConfig:
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
    hidden: tuple[int, ...] = (300, 100)
    width_multiplier: float = 1.0
    small_input: bool | None = None

    def validate(self) -> None:
        """Check ranges."""
        _check(len(self.hidden) >= 1, "model", "hidden", "needs at least one layer")
        _check(all(h >= 1 for h in self.hidden), "model", "hidden", "widths must be >= 1")
        _check(0.0 < self.width_multiplier <= 4.0, "model", "width_multiplier", "must be in (0, 4]")
        known = OWN_ARCHS + TORCHVISION_ARCHS
        _check(
            self.arch in known or ":" in self.arch,
            "model",
            "arch",
            f"unknown architecture {self.arch!r} (known: {', '.join(known)}, or "
            "'path/to/file.py:build' / 'package.module:build' for your own)",
        )
        _check(
            self.arch in OWN_ARCHS or self.width_multiplier <= 1.0,
            "model",
            "width_multiplier",
            "must be <= 1 for torchvision and user networks (groups keep their first units)",
        )


@dataclass(frozen=True)
class TrainConfig:
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
        alternation: ``batch`` alternates within an epoch; ``epoch`` alternates whole epochs.
        warmup_epochs: TNN-only epochs (factors fixed at their initial value) before switching.
        switch_epochs_fraction: Share of the epochs during which the SNN learns; afterwards its
            factors are frozen and the TNN fine-tunes under them.
        detach_factors: Detach factors in TNN steps (no gradient from the SNN into the TNN).
        snn_input: ``stats`` (fixed-length per-unit statistics) or ``rows`` (per-layer encoders
            of the raw weight rows).
        snn_hidden: Hidden width of the switcher.
        scorer: Where unit scores come from: ``magnitude`` (L2 norm of incoming weights ÷
            layer mean, read as the TNN trains; the default, because the benchmark found no
            setting in which the learned switcher beats it), ``switcher`` (learned) or
            ``random`` (fixed seeded scores, a control). The fixed scorers need ``compression:
            target`` or ``auto``; the paper's ``penalty``/``none`` modes need the switcher.
        snn_prior: ``target``/``auto`` modes: the switcher adds the log magnitude score to its
            output, so it starts from the magnitude order and learns only what improves on it
            (kept units unscaled).
        snn_gates: ``target``/``auto`` modes: SNN steps through ``straight`` (deterministic
            gates, straight-through for units that are off) or ``stochastic`` gates (units
            near the line sampled on or off). ``penalty`` and ``none`` always use ``straight``.
        gate_temperature: Width of the stochastic band around the line, in standard deviations
            of the scores.
        snn_holdout: Share of the training split reserved for SNN steps (the TNN never trains
            on it); 0 uses the TNN's own batches.
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
        target_metric: ``params`` or ``macs``.
        target_ratio: Fraction of the metric to keep (0.4 keeps 40 %).
        width_multiple: ``target`` mode keeps a multiple of this many units in every group
            (rounded to the nearest, within the budget; a group narrower than it stays whole).
            Widths such as 8 or 16 run faster on vectorised CPU and GPU kernels than odd ones.
        penalty: Pressure weight (``penalty`` mode).
        max_accuracy_drop: ``auto`` mode: largest validation accuracy drop (a fraction, 0.01 =
            one point) accepted against the unpruned reference.
        auto_shrink: ``auto`` mode: each trial keeps this share of the last accepted ratio.
        ramp_fraction: Share of the switching phase over which the target is lowered from 1
            to ``target_ratio`` (``target`` mode).
        baseline: Also train the same TNN without a switcher for the same budget.
        checkpoint_every: Save a resumable checkpoint every this many epochs.
    """

    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tnn_lr: float | Literal["auto"] = "auto"
    tnn_momentum: float = 0.9
    tnn_weight_decay: float = 5e-4
    snn_lr: float = 0.01
    snn_momentum: float = 0.9
    tnn_steps_per_snn_step: int = 8
    alternation: Literal["batch", "epoch"] = "batch"
    warmup_epochs: int = 0
    switch_epochs_fraction: float = 0.75
    detach_factors: bool = True
    snn_input: Literal["stats", "rows"] = "stats"
    snn_hidden: int = 32
    scorer: Literal["switcher", "magnitude", "random"] = "magnitude"
    snn_prior: bool = True
    snn_gates: Literal["straight", "stochastic"] = "stochastic"
    gate_temperature: float = 0.1
    snn_holdout: float = 0.0
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    compression: Literal["target", "auto", "penalty", "none"] = "target"
    target_metric: Literal["params", "macs"] = "params"
    target_ratio: float = 0.4
    width_multiple: int = 1
    penalty: float = 0.05
    max_accuracy_drop: float = 0.01
    auto_shrink: float = 0.6
    ramp_fraction: float = 0.5
    baseline: bool = True
    checkpoint_every: int = 1

    def validate(self) -> None:
        """Check ranges and cross-field rules."""
        _check(self.epochs >= 1, "train", "epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train", "batch_size", "must be >= 1")
        _check(self.tnn_lr == "auto" or self.tnn_lr > 0, "train", "tnn_lr", "must be > 0 or auto")
        _check(self.snn_lr > 0, "train", "snn_lr", "must be > 0")
        for key in ("tnn_momentum", "snn_momentum"):
            _check(0.0 <= getattr(self, key) < 1.0, "train", key, "must be in [0, 1)")
        _check(self.tnn_weight_decay >= 0, "train", "tnn_weight_decay", "must be >= 0")
        _check(self.tnn_steps_per_snn_step >= 1, "train", "tnn_steps_per_snn_step", "must be >= 1")
        _check(
            0 <= self.warmup_epochs < self.epochs,
            "train",
            "warmup_epochs",
            "must be >= 0 and < epochs",
        )
        _check(
            0.0 < self.switch_epochs_fraction <= 1.0,
            "train",
            "switch_epochs_fraction",
            "must be in (0, 1]",
        )
        _check(self.snn_hidden >= 1, "train", "snn_hidden", "must be >= 1")
        _check(
            self.scorer == "switcher" or self.compression in ("target", "auto"),
            "train",
            "scorer",
            f"{self.scorer!r} needs compression: target or auto (it has no zeros of its own)",
        )
        _check(
            0.0 <= self.max_accuracy_drop < 1.0, "train", "max_accuracy_drop", "must be in [0, 1)"
        )
        _check(0.0 < self.auto_shrink < 1.0, "train", "auto_shrink", "must be in (0, 1)")
        _check(
            not self.snn_prior
            or self.snn_gates == "stochastic"
            or self.compression not in ("target", "auto"),
            "train",
            "snn_prior",
            "needs snn_gates: stochastic (kept units are unscaled, so only sampled gates "
            "carry the task loss to the switcher)",
        )
        _check(self.gate_temperature > 0, "train", "gate_temperature", "must be > 0")
        _check(0.0 <= self.snn_holdout < 0.5, "train", "snn_holdout", "must be in [0, 0.5)")
        _check(0.0 < self.target_ratio <= 1.0, "train", "target_ratio", "must be in (0, 1]")
        _check(self.width_multiple >= 1, "train", "width_multiple", "must be >= 1")
        _check(self.penalty >= 0, "train", "penalty", "must be >= 0")
        _check(0.0 <= self.ramp_fraction <= 1.0, "train", "ramp_fraction", "must be in [0, 1]")
        _check(self.checkpoint_every >= 1, "train", "checkpoint_every", "must be >= 1")


@dataclass(frozen=True)
class PruneConfig:
    """Thresholding of the factors and compaction.

    Attributes:
        threshold: Units whose factor is at or below this are removed (0 removes exact zeros).
        relative: Interpret ``threshold`` relative to each group's largest factor.
        min_units: Never keep fewer units than this in a group (a layer is never emptied).
        round_to: Round kept widths up to a multiple of this (hardware-friendly widths).
    """

    threshold: float = 0.0
    relative: bool = False
    min_units: int = 1
    round_to: int = 1

    def validate(self) -> None:
        """Check ranges."""
        _check(self.threshold >= 0, "prune", "threshold", "must be >= 0")
        _check(
            not self.relative or self.threshold < 1.0,
            "prune",
            "threshold",
            "must be < 1 when relative",
        )
        _check(self.min_units >= 1, "prune", "min_units", "must be >= 1 (a layer is never emptied)")
        _check(self.round_to >= 1, "prune", "round_to", "must be >= 1")


@dataclass(frozen=True)
class EvaluateConfig:
    """Measurement settings.

    Attributes:
        batch_size: Batch size of accuracy evaluation.
        latency_warmup: Untimed forward passes before timing.
        latency_repeats: Timed forward passes; the median is reported.
        threads: CPU threads used for latency (0 keeps torch's default).
        device: ``auto``, ``cpu`` or ``cuda``.
        max_logit_diff: Largest accepted max abs difference (float64) between the logits of the
            gated trained model and the compacted one; above it the compacted model is not
            the trained model's and evaluation is refused.
    """

    batch_size: int = 256
    latency_warmup: int = 5
    latency_repeats: int = 20
    threads: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_logit_diff: float = 1e-4

    def validate(self) -> None:
        """Check ranges."""
        _check(self.batch_size >= 1, "evaluate", "batch_size", "must be >= 1")
        _check(self.max_logit_diff > 0, "evaluate", "max_logit_diff", "must be > 0")
        _check(self.latency_warmup >= 0, "evaluate", "latency_warmup", "must be >= 0")
        _check(self.latency_repeats >= 1, "evaluate", "latency_repeats", "must be >= 1")
        _check(self.threads >= 0, "evaluate", "threads", "must be >= 0")


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,99}$")


@dataclass(frozen=True)
class RegisterConfig:
    """Logging and registration in MLflow.

    The tracking URI is not a parameter: it comes from ``MLFLOW_TRACKING_URI``, else the
    embedded default (a SQLite store ``mlflow.db`` with artifacts under ``mlruns/``).

    Attributes:
        model_name: Registered model name.
        experiment: MLflow experiment of the runs.
        alias: Alias set on the registered version.
    """

    model_name: str = "switchprune-digits-mlp"
    experiment: str = "switchprune"
    alias: str = "candidate"

    def validate(self) -> None:
        """Check names."""
        _check(
            bool(_ALIAS_RE.match(self.alias)),
            "register",
            "alias",
            "must be letters, digits, '_' or '-' (an MLflow alias)",
        )
        for key in ("model_name", "experiment"):
            _check(
                bool(_NAME_RE.match(getattr(self, key))),
                "register",
                key,
                "must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        _check(
            self.alias != "champion",
            "register",
            "alias",
            "must not be 'champion' (promote sets it)",
        )


@dataclass(frozen=True)
class PromoteConfig:
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

    s3_uri: str = "s3://switchprune-models"
    alias: str = "champion"
    min_accuracy: float = 0.9
    max_accuracy_drop: float = 0.02
    max_params_ratio: float = 0.8
    max_logit_diff: float = 1e-4
    remove_incomplete_after: float = 3600.0
    not_worse_than_champion: bool = True

    def validate(self) -> None:
        """Check ranges and the S3 URI."""
        _check(
            self.remove_incomplete_after >= 0,
            "promote",
            "remove_incomplete_after",
            "must be >= 0",
        )
        bucket = self.s3_uri[5:].split("/", 1)[0] if self.s3_uri.startswith("s3://") else ""
        _check(
            bool(re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket)),
            "promote",
            "s3_uri",
            f"must be s3://bucket[/prefix] with a valid bucket name, got {self.s3_uri!r}",
        )
        _check(
            bool(_ALIAS_RE.match(self.alias)),
            "promote",
            "alias",
            "must be letters, digits, '_' or '-' (an MLflow alias)",
        )
        _check(0.0 <= self.min_accuracy <= 1.0, "promote", "min_accuracy", "must be in [0, 1]")
        _check(
            0.0 <= self.max_accuracy_drop <= 1.0,
            "promote",
            "max_accuracy_drop",
            "must be in [0, 1]",
        )
        _check(
            0.0 < self.max_params_ratio <= 1.0, "promote", "max_params_ratio", "must be in (0, 1]"
        )


@dataclass(frozen=True)
class KubeflowConfig:
    """Placement of the pipeline's tasks on a Kubernetes cluster (used only when compiling).

    Attributes:
        gpu_type: Accelerator resource of the ``train`` task (``nvidia.com/gpu``).
        gpu_count: Accelerators for ``train`` (0 runs it on a CPU node).
        node_selector: Node labels the ``train`` task must land on.
        tolerations: Taints the ``train`` task tolerates: mappings with ``key``, ``operator``
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
    """

    gpu_type: str = "nvidia.com/gpu"
    gpu_count: int = 1
    node_selector: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    tolerations: tuple[dict[str, str], ...] = (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    )
    cpu_request: str = "500m"
    cpu_limit: str = "2"
    memory_request: str = "1Gi"
    memory_limit: str = "4Gi"
    train_cpu_limit: str = "8"
    train_memory_limit: str = "16Gi"
    s3_secret: str = "switchprune-s3"
    mlflow_secret: str = "switchprune-mlflow"
    retries: int = 3

    def validate(self) -> None:
        """Check counts, quantities and tolerations."""
        _check(self.gpu_count >= 0, "kubeflow", "gpu_count", "must be >= 0")
        _check(self.retries >= 0, "kubeflow", "retries", "must be >= 0")
        for key in (
            "cpu_request",
            "cpu_limit",
            "memory_request",
            "memory_limit",
            "train_cpu_limit",
            "train_memory_limit",
        ):
            _check(_quantity(getattr(self, key)), "kubeflow", key, "is not a Kubernetes quantity")
        for t in self.tolerations:
            _check(
                set(t) <= {"key", "operator", "value", "effect"} and "key" in t,
                "kubeflow",
                "tolerations",
                "entries need 'key' and may have 'operator', 'value', 'effect'",
            )
            _check(
                t.get("operator", "Equal") in ("Exists", "Equal"),
                "kubeflow",
                "tolerations",
                "operator must be Exists or Equal",
            )
        for key in ("s3_secret", "mlflow_secret"):
            _check(
                bool(re.match(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$", getattr(self, key))),
                "kubeflow",
                key,
                "must be a Kubernetes secret name",
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


def _check(ok: bool, section: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"[{section}] {key} {message}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError; ints widen to floats only."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where} has the wrong type")
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        return {
            _coerce(k, key_tp, f"{where} key"): _coerce(v, value_tp, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if origin is tuple:
        (item_tp, _ellipsis) = get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str | None = None) -> T:
    """Build a config from a mapping, refusing unknown keys, wrong types and bad values.

    Args:
        cls: One of the config dataclasses.
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
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"[{section}] unknown key {unknown[0]!r} (known keys: {', '.join(names)})"
        )
    kwargs = {k: _coerce(v, hints[k], f"[{section}] {k}") for k, v in data.items()}
    cfg = cls(**kwargs)
    cfg.validate()  # type: ignore[attr-defined]
    return cfg


def from_struct(cls: type[T], data: dict[str, Any] | None, section: str | None = None) -> T:
    """Like :func:`from_dict`, for a section that travelled as a protobuf ``Struct``.

    A Kubeflow ``dict`` parameter is a ``Struct``, whose numbers are all doubles: depending on
    the runner, ``epochs: 30`` arrives as ``30`` or as ``30.0``. Integral floats are read back
    as ints where the field is an int; everything else is validated by :func:`from_dict`
    exactly as it is for ``params.yaml`` (``2.5`` for an int is still refused).

    Args:
        cls: One of the config dataclasses.
        data: The section's mapping (``None`` means all defaults).
        section: Section name used in messages (defaults to the class's section).

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: With one message naming the section and the key at fault.
    """
    if isinstance(data, dict):
        hints = typing.get_type_hints(cls)
        data = {k: _ints_back(v, hints[k]) if k in hints else v for k, v in data.items()}
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
    origin = get_origin(tp)
    if tp is int:
        is_integral = isinstance(value, float) and value.is_integer()
        return int(value) if is_integral else value
    if origin in (typing.Union, types.UnionType):
        args = set(get_args(tp)) - {type(None)}
        return _ints_back(value, int) if int in args and float not in args else value
    if origin is tuple and isinstance(value, list | tuple):
        return [_ints_back(v, get_args(tp)[0]) for v in value]
    if origin is dict and isinstance(value, dict):
        return {k: _ints_back(v, get_args(tp)[1]) for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return a config as a plain, YAML/JSON-friendly mapping (tuples become lists)."""
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _quantity(text: str) -> bool:
    """A Kubernetes CPU or memory quantity such as ``500m``, ``2``, ``4Gi``."""
    return bool(re.match(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$", text))


def load_params(path: str | Any, sections: list[str] | None = None) -> dict[str, Any]:
    """Read a ``params.yaml`` and build the requested sections' configs.

    Args:
        path: Path to the YAML file.
        sections: Sections to build (default: all known sections present or not).

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
    return {name: from_dict(SECTIONS[name], raw.get(name), name) for name in wanted}


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


__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "PruneConfig",
    "EvaluateConfig",
    "RegisterConfig",
    "PromoteConfig",
    "KubeflowConfig",
    "SECTIONS",
    "from_dict",
    "from_struct",
    "sections_from_struct",
    "to_dict",
    "load_params",
]
