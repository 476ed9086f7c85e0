"""Typed schemas for every config group (registered in Hydra's ConfigStore by ``store.py``).

Each YAML in ``conf/<group>/`` lists ``base_<group>`` (or ``base_<strategy>``) first in its
defaults, so Hydra validates the YAML against the dataclass at compose time: an unknown key or a
value of the wrong type (``bits=abc``) fails before anything runs. Value *ranges* and names that
depend on the registry are checked in :func:`validate`, which gives one readable message.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

# numpy's legacy seeding (np.random.seed) takes 0 <= seed < 2**32; torch and Python take more.
SEED_MAX = 2**32 - 1
# Bit-widths the fake-quant kernels handle exactly. 1-bit needs a binary (sign) quantizer that is
# not a uniform grid; above 16 bits the int32 zero point of the kernels loses precision.
MIN_BITS, MAX_BITS = 2, 16


@dataclass
class PathsConfig:
    """Where data, weights and outputs live. Env vars let CI/Makefile point at ../shared."""

    data_dir: str = "${oc.env:CALIBBENCH_DATA_DIR,data}"
    weights_dir: str = "${oc.env:CALIBBENCH_WEIGHTS_DIR,weights}"
    output_dir: str = "${oc.env:CALIBBENCH_OUTPUT_DIR,outputs}"
    cache_dir: str = "${paths.output_dir}/cache"


@dataclass
class ModelConfig:
    """A classifier from a model zoo plus where its weights come from.

    ``weights``: ``auto`` (the local file listed for the selected dataset in ``local_weights`` if it
    exists under ``paths.weights_dir``, else the zoo's pretrained download), ``pretrained`` (zoo
    download only), ``none`` (random init: tests and architecture checks), or a path to a
    state-dict file.
    """

    name: str = MISSING
    source: str = "pytorchcv"  # pytorchcv | torchvision
    arch: str = MISSING
    num_classes: int = MISSING
    input_size: int = MISSING
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    weights: str = "auto"
    local_weights: dict[str, str] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    """An image-classification dataset: train split = calibration pool, test/val = evaluation."""

    name: str = MISSING  # cifar10 | cifar100 | cifar10_jpeg | imagenet
    # Which of a paper's per-dataset hyper-parameter sets applies (PLF: refine.plf.family_defaults).
    family: str = MISSING  # cifar | imagenet
    root: str = MISSING
    num_classes: int = MISSING
    download: bool = True  # torchvision datasets only; ignored offline when files exist
    normalization: str = "model_zoo"  # model_zoo | legacy_gdfq
    resize: Optional[int] = None  # ImageNet: shorter side before the center crop
    num_workers: int = 2
    # Validation split carved from train (seeded by val_seed, not the run seed), disjoint from
    # every calibration/selection pool; decisions are made on it (eval_split=val).
    val_size: int = 0
    val_seed: int = 0
    # Folder datasets: keep a seeded sample of N files per train class folder (null = all). Seeded
    # by val_seed (a fixed property of the dataset, like the validation split); in every cache key.
    train_per_class: Optional[int] = None


@dataclass
class QuantConfig:
    """Fake-quantization preset. ``w_bits``/``a_bits`` override the top-level ``bits``."""

    name: str = MISSING  # dfq_legacy | academic | reference (academic, image unquantized)
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    weight_observer: str = "minmax"
    weight_per_channel: bool = True
    weight_symmetric: bool = False
    act_observer: str = "mse"  # minmax | ema | percentile | mse | aciq (mse: issue 20, on val)
    act_symmetric: bool = False
    act_placement: str = "after_relu"  # after_relu | layer_input
    # Which modules get an output quantizer under after_relu: all feature activations (ReLU,
    # ReLU6, Hardswish, SiLU, pytorchcv HSwish, ...; gates like Sigmoid never) or ZeroQ's literal
    # ReLU/ReLU6 only. Identical on ReLU networks (resnet20/56). null = the preset's choice (all).
    act_modules: Optional[str] = None  # all | relu
    # Force 0 into the weight / activation range (null = the preset's choice: dfq_legacy weights
    # no, as ZeroQ's per-channel min/max; activations yes; academic both yes).
    weight_include_zero: Optional[bool] = None
    act_include_zero: Optional[bool] = None
    fold_bn: bool = False
    first_last_bits: Optional[int] = None  # academic: 8
    quantize_input: bool = False
    ema_decay: float = 0.9
    percentile: float = 99.99
    mse_steps: int = 100
    # Lp norm of the MSE search: 2.4 as QDrop/MQBench's MSEObserver and BRECQ's scale_method='mse'.
    mse_p: float = 2.4
    # percentile/mse/aciq: one estimate per calibration batch averaged over batches (batch_mean) or
    # one over a uniform sample of all calibration values (pooled, as QDrop/BRECQ calibrate).
    observer_reduce: str = "pooled"
    pool_values: int = 65536  # pooled: values sampled per quantizer row (2^16)


def _plf_family_defaults() -> dict[str, dict[str, float]]:
    """PLF's hyper-parameters per dataset family (Fan et al., section 4.1)."""
    return {
        "cifar": {"t_low": 0.2, "t_high": 0.5, "beta": 0.3, "mu": 100.0, "tau": 1.0, "gamma": 10.0,
                  "lr": 1e-3},
        "imagenet": {"t_low": 0.1, "t_high": 0.4, "beta": 0.5, "mu": 4000.0, "tau": 1.0, "gamma": 0.1,
                     "lr": 1e-5},
    }


def _family(key: str) -> Any:
    """Interpolation: ``key`` from ``family_defaults`` of the run's ``dataset.family``."""
    return "${.family_defaults.${dataset.family}." + key + "}"


@dataclass
class PLFRefineConfig:
    """The pseudo-label-filtering objective (``refine=plf``): L_KL + tau * (L_CE^h + beta * L_CE^l
    + mu * L_MSE), eq. 11-15. Every number defaults to the paper's value for the run's
    ``dataset.family`` (``family_defaults``); ``strategy=plf`` routes its ``strategy.*`` keys here."""

    t_low: float = _family("t_low")  # T_l: the threshold at the last epoch (eq. 5)
    t_high: float = _family("t_high")  # T_u: the threshold at the first epoch
    beta: float = _family("beta")  # weight of the low-reliable CE (eq. 11)
    mu: float = _family("mu")  # weight of the feature MSE (eq. 12)
    tau: float = _family("tau")  # weight of L_P (eq. 15)
    lr: float = _family("lr")  # the fine-tuning learning rate (refine.lr of refine=plf)
    use_high: bool = True  # L_CE^h on (Table 5's rows)
    use_low: bool = True  # L_CE^l on
    # Where the MSE of eq. 13 reads intermediate features: stages (the output of every stage,
    # pytorchcv features.stage<k> / torchvision layer<k>; calibbench's choice, no reference code
    # hooks these) | hast (HAST's hooks: every pytorchcv ResUnit.body output before the residual
    # add, 9 on resnet20; DwsConvBlock.pw_conv.bn; LinearBottleneck.conv3) | units (every residual /
    # inverted-residual unit) | bn (every BN layer's output) | list (refine.feature_modules).
    # stages vs hast is not yet chosen on the validation split (docs/plf.md)
    features: str = "stages"
    # What eq. 13 compares at each layer: attention (per-sample L2-normalized channel energy
    # mean_hw(x^2), HAST's feature alignment, the scale mu = 100 / 4000 is set for) |
    # raw (the feature map itself; with mu = 100 it diverges here, docs/plf.md)
    feature_map: str = "attention"
    family_defaults: dict[str, dict[str, float]] = field(default_factory=_plf_family_defaults)


@dataclass
class RefineConfig:
    """Optional fine-tuning of the quantized model after calibration (``none`` = pure PTQ).

    ``none`` ignores everything below ``name``. Steps come from ``budget.refine_steps``; the
    batch size from ``budget.refine_batch_size`` unless ``batch_size`` is set. Defaults are
    ``refine=kd``'s, so a summary splits none/kd by ``refine.name`` alone.
    """

    name: str = "none"  # none | kd | adaround | brecq | qdrop | gdfq | ... (calibbench.refine.available())
    # Loss term -> weight (kd | ce | feature); 0 switches a term off.
    losses: dict[str, float] = field(default_factory=lambda: {"kd": 1.0})
    temperature: float = 1.0  # kd: T; the KL is scaled by T^2
    ce_labels: str = "batch"  # ce: batch (the stream's labels) | teacher (the FP model's argmax)
    feature_modules: list[str] = field(default_factory=list)  # feature: module paths to match
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 1e-4  # peak learning rate, cosine decay to 0; chosen on the val split (docs/results.md)
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    weight_decay: float = 1e-4
    batch_size: Optional[int] = None  # null: budget.refine_batch_size
    act_ranges: str = "frozen"  # frozen (the calibrated grid) | learned (per-tensor range trains)
    bn: str = "frozen"  # frozen (eval mode: running stats used, untouched) | train (batch stats)
    # kd term: batchmean (KL summed over classes, mean over the batch: ClusterQ / the PyTorch docs'
    # KL) | mean (element-wise mean, 1/num_classes of it: GDFQ's nn.KLDivLoss())
    kd_reduction: str = "batchmean"
    plf: PLFRefineConfig = field(default_factory=PLFRefineConfig)  # refine=plf only
    # Reconstruction refiners (adaround | brecq | qdrop, refine/recon.py); null for the others, so
    # kd/none records never split on them. Steps per unit: budget.refine_unit_steps (iterations
    # overrides), batch: budget.refine_unit_batch_size (batch_size overrides); lr: the rounding's.
    granularity: Optional[str] = None  # layer (AdaRound) | block (BRECQ, QDrop)
    drop_prob: Optional[float] = None  # QDrop: P(an activation stays float), element-wise, in [0, 1]
    fisher: Optional[bool] = None  # BRECQ's Fisher-diagonal weighting of the output error
    learn_act: Optional[bool] = None  # activation step sizes learned with the rounding (LSQ-style)
    act_lr: Optional[float] = None  # their learning rate (cosine to 0); a budget field per refiner
    # Learned activation quantization as BRECQ/QDrop parameterize it: the step size (LSQ gradient
    # scale), and with learn_zero_point also the zero point of asymmetric grids (QDrop's LSQ+).
    learn_zero_point: Optional[bool] = None
    # Scales the rounding starts from: mse (the references: MSE search, weights per channel,
    # activations per tensor, quant.mse_p, quant/observers.py) | calibrated (the calibration grid)
    init: Optional[str] = None
    # joint (one stage: rounding and activation steps together, AdaRound / QDrop) | two_stage
    # (BRECQ: rounding with activation quantization off, then activation steps alone)
    procedure: Optional[str] = None
    p: Optional[float] = None  # Lp exponent of the activation stage's loss (BRECQ: 2.4)
    act_iterations: Optional[int] = None  # per unit in the activation stage; null: budget.refine_act_steps
    # The activation stage's unit input: float (BRECQ's code: the FP model's) | quantized
    act_input: Optional[str] = None
    # Images the units are reconstructed on: calibration (the calibration set) | generator (fresh
    # batches of a generator strategy's warmed-up generator at every iteration)
    source: Optional[str] = None
    round_lambda: Optional[float] = None  # lambda of the rounding regulariser, >= 0
    beta: Optional[list[float]] = None  # [start, end] of the annealed regulariser exponent
    warmup: Optional[float] = None  # share of a unit's iterations without the regulariser
    iterations: Optional[int] = None  # per unit; null: budget.refine_unit_steps
    cache_mb: Optional[float] = None  # a unit's inputs/targets above this are streamed, not cached


@dataclass
class BudgetConfig:
    """Every size a strategy or stage uses. Strategies read sizes from here, never literals."""

    name: str = MISSING
    # The default calibration-set size of this budget: the top-level ``num_samples`` (the same for
    # every strategy) interpolates it, and ``num_samples=N`` overrides it. Not read by strategies
    # (they read ``ctx.num_samples``), so not part of the calibration cache key by itself.
    num_samples: int = 256
    eval_limit: Optional[int] = None  # first N val images (stratified), None = the whole split
    eval_batch_size: int = 256
    calib_batch_size: int = 64
    pool_size: Optional[int] = None  # real-data pool subset for selection strategies
    synth_iterations: int = 500
    synth_batch_size: int = 32
    refine_steps: int = 0  # optimizer steps of a training refiner (refine=kd, ...)
    refine_batch_size: int = 64
    # Generator-based strategies (gdfq, fdda, clusterq): generator-only steps before the
    # quantized model trains (spent in the calibration stage; the calibration set is sampled
    # from the warmed-up generator), and images per generator batch (both players train on it;
    # the quantized-model steps are refine_steps).
    gen_warmup_steps: int = 0
    gen_batch_size: int = 32
    # PLF's labelled synthetic set (strategy=plf): images and optimization steps per batch
    # (paper: 5120 images, 1000 iterations); batches of synth_batch_size.
    plf_samples: int = 256
    plf_iterations: int = 200
    # Reconstruction refiners (adaround, brecq, qdrop): optimisation steps per unit, batch size, and
    # the learning rate of the rounding variables (their YAMLs' refine.lr interpolates it): the
    # reference code's 1e-3 is for 20k steps; fewer steps need a larger one (docs/results.md, issue 14).
    refine_unit_steps: int = 0
    refine_unit_batch_size: int = 32
    refine_unit_lr: float = 1e-3
    # Learned activation steps: lr of the joint stage (QDrop's 4e-5 over 20k iterations), and
    # iterations per unit and lr of BRECQ's activation stage (iters_a 5,000, lr 4e-4)
    refine_unit_act_lr: float = 4e-5
    refine_act_steps: int = 0
    refine_act_lr: float = 4e-4


@dataclass
class LoggerConfig:
    """W&B tracking. ``auto``: online when credentials exist, else offline."""

    mode: str = "auto"  # auto | online | offline | disabled
    project: str = "calibbench"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the sweep dir name, or "single"
    log_images: bool = True


@dataclass
class DiagnosticsConfig:
    """Per-layer diagnostics after evaluation (calibbench/diagnostics.py): clipping rate, range
    inflation, SNR per quantized layer on a fixed evaluation subset. ``diagnostics=true`` on the
    command line is an alias of ``diagnostics.enabled=true`` (cli.py)."""

    enabled: bool = False
    eval_images: int = 1000  # images of the evaluation split, the same subset for every run
    seed: int = 0  # draws the subset; not the run seed, so every strategy and seed share it
    batch_size: int = 100  # one batch of FP activations per layer is held at a time
    bins: int = 2048  # histogram bins per layer (percentile error <= one bin), a power of two


@dataclass
class GuardConfig:
    """The divergence guard of every training stage (``refine/guard.py``, where the defaults are
    justified): a loss above ``factor`` × its value at the stage's first step, or a reconstruction
    unit whose loss after reconstruction is above ``unit_factor`` × before, fails the run. 0 = off."""

    factor: float = 1000.0
    unit_factor: float = 10.0


@dataclass
class StrategyConfig:
    """Fields every strategy has. Each strategy extends this with its own dataclass."""

    name: str = MISSING


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    strategy: Any = MISSING  # validated by the chosen strategy's own schema
    quant: QuantConfig = MISSING
    refine: RefineConfig = MISSING
    budget: BudgetConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    bits: int = 4
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_samples: int = 256
    eval_split: str = "test"  # test: what tables report | val: the held-out train slice, for decisions
    progress: bool = True
    resume: bool = True  # skip a job whose run dir already holds a complete result
    # torch intra-op threads: an integer >= 1, or auto / null (torch's default; in a joblib sweep
    # cores / n_jobs). A string so that ``threads=auto`` composes; :func:`resolve_threads` reads it.
    threads: Optional[str] = None
    export: Optional[str] = None  # onnx: write model.onnx and check it under onnxruntime (deploy.py)
    # With export: true = the exact form (the evaluated model is the exported one bit for bit:
    # ConvInteger/MatMulInteger + float64 layers); false = the fused QDQ graph (QLinearConv, ~2x
    # faster on the resnets, agreement 99.6-100 %). quant/export.py, docs/results.md.
    export_exact: bool = True


_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "quant": QuantConfig,
    "refine": RefineConfig,
    "budget": BudgetConfig,
    "logger": LoggerConfig,
    "paths": PathsConfig,
}


class ConfigError(ValueError):
    """A config value that composes but cannot run (bad range, unknown name, missing file)."""


def _choices(valid) -> str:
    return ", ".join(str(v) for v in valid)


def check_choice(what: str, value: Any, valid) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {_choices(valid)}")


def check_plf_values(prefix: str, values: Any) -> None:
    """PLF's thresholds and weights (``refine.plf.*`` or ``strategy.*`` of strategy=plf): one
    ConfigError naming the key."""
    for key in ("t_low", "t_high"):
        v = float(values[key])
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{prefix}.{key}={v} is out of range: a normalized-entropy threshold "
                              f"in [0, 1]")
    if float(values["t_low"]) > float(values["t_high"]):
        raise ConfigError(f"{prefix}.t_low={values['t_low']} > {prefix}.t_high={values['t_high']}: the "
                          f"threshold falls from t_high (T_u) to t_low (T_l); need t_low <= t_high")
    for key in ("beta", "mu", "tau"):
        if float(values[key]) < 0:
            raise ConfigError(f"{prefix}.{key}={values[key]} is negative; must be >= 0")


def resolve_threads(value: Any) -> Optional[int]:
    """``threads``: ``None``/``auto`` → ``None`` (leave torch's default), ``"N"`` (N >= 1) → N;
    anything else is a ConfigError naming the key."""
    if value is None or str(value).strip().lower() in ("auto", "null", "none", ""):
        return None
    text = str(value).strip()
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise ConfigError(f"threads={value} is out of range; valid: an integer >= 1 (torch threads "
                          f"per job) or auto")
    return int(text)


def check_writable(path: str | Path, what: str) -> None:
    """``path`` (created if missing) accepts a new file; else one ConfigError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".calibbench-write-check.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        reason = "read-only" if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else err.strerror
        raise ConfigError(f"{what} {str(path)!r} is not writable ({reason}); point it elsewhere, "
                          f"e.g. paths.output_dir=DIR (or CALIBBENCH_OUTPUT_DIR) / paths.cache_dir=DIR"
                          ) from None


def effective_bits(cfg: DictConfig) -> tuple[int, int]:
    """(weight bits, activation bits): ``quant.w_bits``/``a_bits`` override ``bits``."""
    w = cfg.quant.w_bits if cfg.quant.w_bits is not None else cfg.bits
    a = cfg.quant.a_bits if cfg.quant.a_bits is not None else cfg.bits
    return int(w), int(a)


# Budget fields by what they count: sizes need at least one image, step counts may be zero.
_COUNT_SUFFIXES = ("_iterations", "_steps", "_epochs")


def validate_budget(budget: Any) -> None:
    """Every budget field: sizes (and limits) >= 1 or null where allowed, step counts >= 0."""
    for key, value in (budget.items() if isinstance(budget, DictConfig) else vars(budget).items()):
        if key == "name" or value is None or not isinstance(value, int):
            continue
        key = str(key)
        low = 0 if key.endswith(_COUNT_SUFFIXES) else 1
        if value < low:
            kind = "a step count" if low == 0 else "a size"
            raise ConfigError(f"budget.{key}={value} is out of range: {kind}, must be >= {low}")


def validate_estimator(q: Any) -> None:
    """The range estimator's own settings (the observers check them again when built)."""
    check_choice("quant.observer_reduce", q.get("observer_reduce", "batch_mean"), ("batch_mean", "pooled"))
    if not 50.0 < q.percentile <= 100.0:
        raise ConfigError(f"quant.percentile={q.percentile} is out of range; valid: (50, 100] "
                          "(the upper percentile; the range's lower end is 100 - percentile)")
    if q.mse_steps < 1:
        raise ConfigError(f"quant.mse_steps={q.mse_steps} must be an integer >= 1 (candidate ranges)")
    if not q.get("mse_p", 2.0) > 0:
        raise ConfigError(f"quant.mse_p={q.mse_p} must be > 0 (the Lp norm of the MSE search)")
    if not 0.0 <= q.ema_decay < 1.0:
        raise ConfigError(f"quant.ema_decay={q.ema_decay} must be in [0, 1)")
    if q.get("pool_values", 1) < 1:
        raise ConfigError(f"quant.pool_values={q.pool_values} must be an integer >= 1")


def validate(cfg: DictConfig) -> None:
    """Checks that need more than a type: value ranges and fixed choices. Raises ConfigError.

    Registry names (strategy, refine) are checked by their registries when the pipeline builds
    them, before any work: config.py stays below the packages that import it (no import cycle).
    """
    for key, value in (("bits", cfg.bits), ("quant.w_bits", cfg.quant.w_bits),
                       ("quant.a_bits", cfg.quant.a_bits),
                       ("quant.first_last_bits", cfg.quant.first_last_bits)):
        if value is not None and not (MIN_BITS <= value <= MAX_BITS):
            raise ConfigError(f"{key}={value} is out of range; valid: integers {MIN_BITS}..{MAX_BITS}")
    if cfg.num_samples <= 0:
        raise ConfigError(f"num_samples={cfg.num_samples} must be a positive integer")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ConfigError(f"seed={cfg.seed} is out of range; valid: integers 0..{SEED_MAX} (2**32 - 1)")
    resolve_threads(cfg.threads)
    guard = cfg.get("guard")
    if guard is not None:
        for key in ("factor", "unit_factor"):
            if not float(guard[key]) >= 0:
                raise ConfigError(f"guard.{key}={guard[key]} must be >= 0 (0 switches the check off)")
        if 0 < float(guard.factor) <= 1 or 0 < float(guard.unit_factor) <= 1:
            raise ConfigError(f"guard.factor={guard.factor} / guard.unit_factor={guard.unit_factor}: a bound "
                              f"relative to the start must be > 1 (or 0 = off)")
    check_choice("eval_split", cfg.eval_split, ("test", "val"))
    if not isinstance(cfg.get("export_exact", True), bool):
        raise ConfigError(f"export_exact={cfg.export_exact!r} must be true (the bit-exact graph) or false "
                          f"(the fused QDQ graph)")
    if cfg.get("export") is not None:
        check_choice("export", cfg.export, ("onnx",))
        try:
            import onnx  # noqa: F401 - imported only to check that it is installed
            import onnxruntime  # noqa: F401 - likewise
        except ImportError as err:
            raise ConfigError(f"export={cfg.export} needs onnx and onnxruntime ({err}); install the "
                              f"extra: pip install 'calibbench[export]'") from None
    diag = cfg.get("diagnostics")
    if diag is not None and diag.enabled:
        if diag.eval_images <= 0:
            raise ConfigError(f"diagnostics.eval_images={diag.eval_images} must be a positive integer "
                              "(at most the evaluation split's size)")
        if diag.batch_size <= 0:
            raise ConfigError(f"diagnostics.batch_size={diag.batch_size} must be a positive integer")
        if diag.bins < 2 or diag.bins & (diag.bins - 1):
            raise ConfigError(f"diagnostics.bins={diag.bins} must be a power of two >= 2")
    validate_budget(cfg.budget)
    if cfg.dataset.val_size < 0:
        raise ConfigError(f"dataset.val_size={cfg.dataset.val_size} must be >= 0")
    if cfg.eval_split == "val" and cfg.dataset.val_size == 0:
        raise ConfigError("eval_split=val needs a validation split: dataset.val_size=0; set it > 0")
    check_choice("quant preset", cfg.quant.name, ("dfq_legacy", "academic", "reference"))
    check_choice("quant.act_observer", cfg.quant.act_observer, ("minmax", "ema", "percentile", "mse", "aciq"))
    check_choice("quant.weight_observer", cfg.quant.weight_observer, ("minmax", "mse"))
    validate_estimator(cfg.quant)
    check_choice("quant.act_placement", cfg.quant.act_placement, ("after_relu", "layer_input"))
    check_choice("dataset", cfg.dataset.name, ("cifar10", "cifar100", "cifar10_jpeg", "imagenet"))
    check_choice("dataset.family", cfg.dataset.family, ("cifar", "imagenet"))
    check_choice("dataset.normalization", cfg.dataset.normalization, ("model_zoo", "legacy_gdfq"))
    check_choice("model.source", cfg.model.source, ("pytorchcv", "torchvision"))
    check_choice("logger.mode", cfg.logger.mode, ("auto", "online", "offline", "disabled"))
    dev = str(cfg.device)
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        raise ConfigError(f"unknown device {dev!r}; valid choices: auto, cpu, cuda, cuda:N")
    if cfg.model.num_classes != cfg.dataset.num_classes:
        raise ConfigError(
            f"model {cfg.model.name!r} predicts {cfg.model.num_classes} classes but dataset "
            f"{cfg.dataset.name!r} has {cfg.dataset.num_classes}; pick a matching model/dataset pair")


def to_container(cfg: object) -> dict[str, Any]:
    """A config mapping as a plain, resolved dict. ``cfg`` is a DictConfig, possibly annotated as
    its schema dataclass (a structured config duck-types it)."""
    out = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else None
    if not isinstance(out, dict):
        raise TypeError(f"to_container: expected a config mapping (DictConfig), got {type(cfg).__name__}")
    return {str(key): value for key, value in out.items()}
