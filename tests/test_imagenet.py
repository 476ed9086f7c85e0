"""The headline command at ImageNet size, end to end through the CLI, on an ImageNet-layout tree.

``strategy=selectq model=mobilenetv3 bits=6 model.weights=none budget=smoke dataset.root=<tree>``
plus the other ImageNet models and every registered strategy (the registry is read at collection
time, so a new strategy is picked up without editing this file). The tree (tests/
imagenet_fixture.py) has 1000 wnid folders, 3 train and 1 val JPEG each: runs use
``dataset.val_size=200`` (the default 10000 needs a bigger train split) and tiny sizes, because
at 224×224 on two shared cores every image counts. Accuracies mean nothing here (random weights);
what is checked is the plumbing: status, 1000-way metrics, the ImageNet transform, indices.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from imagenet_fixture import corrupt, wnids, write_imagenet_tree

from calibbench import datasets, strategies
from calibbench.config import ConfigError
from calibbench.datasets import CorruptImageError, holdout_indices

TRAIN, VAL, CLASSES, VAL_SIZE = 3000, 1000, 1000, 200
# Sizes that keep one run at 224x224 to seconds; everything else is budget=smoke.
SMALL = ["model.weights=none", "budget=smoke", f"dataset.val_size={VAL_SIZE}", "num_samples=8",
         "budget.eval_limit=10", "budget.pool_size=24", "budget.synth_batch_size=4",
         "budget.synth_iterations=2", "budget.gen_batch_size=4", "budget.gen_warmup_steps=1",
         "budget.refine_steps=1", "budget.refine_batch_size=4", "budget.calib_batch_size=8",
         "budget.eval_batch_size=10", "threads=1", "dataset.num_workers=0",
         "quant.pool_values=4096"]  # the MSE search on 4k values per quantizer (64 of them on mobilenetv3)
IMAGENET_MODELS = ("mobilenetv2", "resnet18", "tv_resnet18")


def cli(tmp_path: Path, *args: str, multirun: bool = False) -> subprocess.CompletedProcess:
    # A sweep job's folder name spells out every override: too long for SMALL's list.
    sweep = ["hydra.sweep.subdir=${strategy.name}_${model.name}"] if multirun else []
    cmd = [sys.executable, "-m", "calibbench", *(["-m"] if multirun else []), *sweep,
           "logger.mode=disabled", "progress=false", f"paths.output_dir={tmp_path}",
           f"paths.cache_dir={tmp_path / 'cache'}", *args]
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]


def check_record(record: dict, *, skipped: tuple[int, ...] = ()) -> None:
    """What every ImageNet-size run must show, whatever the strategy or model."""
    assert record["status"] == "ok", record.get("error")
    ds, metrics = record["dataset"], record["metrics"]
    assert ds["name"] == "imagenet" and ds["num_classes"] == CLASSES == record["config"]["model"]["num_classes"]
    assert ds["train_size"] == TRAIN and ds["val_size"] == VAL_SIZE and ds["pool_size"] == TRAIN - VAL_SIZE
    # The ImageNet eval transform: shorter side to 256, centre crop 224 (the JPEGs are 21-128 px).
    assert "Resize(size=256" in ds["transform"] and "CenterCrop(size=(224, 224))" in ds["transform"]
    for which in ("fp", "quant"):
        m = metrics[which]
        assert m["n"] == record["config"]["budget"]["eval_limit"] == ds["eval_size"]
        assert 0.0 <= m["top1"] <= m["top5"] <= 100.0
    calib = record["calibration"]
    assert calib["num_samples"] == record["config"]["num_samples"]
    if not calib["synthetic"]:
        indices = calib["indices"]
        held_out = set(holdout_indices(TRAIN, VAL_SIZE, 0))
        assert len(set(indices)) == len(indices) == calib["num_samples"]
        assert all(0 <= i < TRAIN and i not in held_out and i not in skipped for i in indices)
    info = calib["info"]
    if "class_counts" in info:  # 1000-way: a count per ImageNet class
        assert len(info["class_counts"]) == CLASSES and sum(info["class_counts"]) == calib["num_samples"]


def test_fixture_has_the_imagenet_layout(imagenet_root):
    names = wnids()
    assert len(set(names)) == CLASSES and all(n[0] == "n" and len(n) == 9 and n[1:].isdigit() for n in names)
    for split, per_class in (("train", 3), ("val", 1)):
        folders = sorted(p.name for p in (imagenet_root / split).iterdir())
        assert folders == names
        files = list((imagenet_root / split).glob("*/*.JPEG"))
        assert len(files) == per_class * CLASSES
    from PIL import Image

    sizes = {Image.open(p).size for p in list((imagenet_root / "train").glob("*/*.JPEG"))[:64]}
    assert len(sizes) >= 4  # varied sizes and aspect ratios


@pytest.mark.slow
def test_headline_command_end_to_end(tmp_path, imagenet_root):
    """The command users type first, as they type it (plus the fixture's sizes)."""
    proc = cli(tmp_path, "strategy=selectq", "model=mobilenetv3", "bits=6", "model.weights=none",
               "budget=smoke", f"dataset.root={imagenet_root}",
               *[o for o in SMALL[2:] if not o.startswith("budget.eval_limit")], "budget.eval_limit=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    check_record(record)
    assert record["quant"]["w_bits"] == record["quant"]["a_bits"] == 6
    assert record["calibration"]["strategy"] == "selectq"
    info = record["calibration"]["info"]
    assert info["pool_size"] == 24 and info["skipped_corrupt"] == [] and len(info["scores"]) == 8
    assert info["num_layers"] == 64  # every Conv2d of mobilenetv3_large (SE and classifier included)
    assert record["metrics"]["quant"]["n"] == 20


@pytest.fixture(scope="module")
def model_sweep(tmp_path_factory, imagenet_root) -> dict[str, dict]:
    """selectq on the other ImageNet models: one multirun, one record per model."""
    out = tmp_path_factory.mktemp("models")
    proc = cli(out, f"model={','.join(IMAGENET_MODELS)}", "strategy=selectq", "bits=6",
               f"dataset.root={imagenet_root}", *SMALL, multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["config"]["model"]["name"]: r for r in records(out)}


@pytest.mark.slow
@pytest.mark.parametrize("model", IMAGENET_MODELS)
def test_headline_command_on_other_imagenet_models(model_sweep, model):
    record = model_sweep[model]
    check_record(record)
    assert record["model"]["weights_source"] == "none"
    assert record["config"]["model"]["input_size"] == 224


# -- every registered strategy, on a tree with corrupt JPEGs at the head of the pool ---------------


@pytest.fixture(scope="module")
def damaged_root(tmp_path_factory) -> tuple[Path, list[int]]:
    """A fresh tree whose first two images in the run's pool order (seed 0) do not decode: random
    draws them first, SelectQ's pool contains them, FDDA's real set wants them as its first
    images of their classes."""
    root = write_imagenet_tree(tmp_path_factory.mktemp("damaged"))
    data = _build(root)
    ctx = strategies.StrategyContext(torch.nn.Identity(), data, torch.device("cpu"), 0, 8, None, False)  # type: ignore[arg-type]
    bad = ctx.pool_permutation()[:2].tolist()
    corrupt(Path(data.file_of(bad[0])), "truncate")
    corrupt(Path(data.file_of(bad[1])), "garbage")
    return root, bad


# Per-strategy overrides a random-init network at 224x224 needs at these sizes: Adam at the
# default lr 0.5 on pixels raises the BN-statistics loss of a random network within 2 steps, which
# the synthesis' divergence check rightly refuses; FDDA's default real set is one image per class
# (1000 forwards at 224x224 per stage), the prediction-based one scans only the pool. A strategy
# not listed here (a new one) runs with SMALL alone.
EXTRA = {"zeroq": ["strategy.lr=0.01"], "dsg": ["strategy.lr=0.01", "strategy.batch_size=4"],
         "fdda": ["strategy.real_labels=predicted"],
         "plf": ["strategy.synth_lr=0.01", "budget.plf_samples=8", "budget.plf_iterations=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", strategies.available())
def test_every_strategy_at_imagenet_size(tmp_path, compose, damaged_root, name, caplog):
    """Every registered strategy through ``pipeline.run`` (what the CLI calls) on the same config
    composition, on the tree whose pool head does not decode; each run must complete."""
    from calibbench import pipeline

    cfg = compose(f"strategy={name}", "model=mobilenetv3", "bits=6", f"dataset.root={damaged_root[0]}",
                  *SMALL, *EXTRA.get(name, []), f"paths.output_dir={tmp_path}",
                  f"paths.cache_dir={tmp_path / 'cache'}")
    with caplog.at_level(logging.WARNING):
        record = pipeline.run(cfg, tmp_path / "run")
    check_record(record, skipped=tuple(damaged_root[1]))
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "ok"
    if record["calibration"]["synthetic"]:
        assert record["config"]["budget"]["synth_batch_size"] == 4
    if name in ("gdfq", "fdda", "clusterq"):  # generator strategies: images at the model's 224x224
        assert record["refine"]["name"] == name and record["refine"]["images_seen"] > 0
    info, bad = record["calibration"]["info"], sorted(damaged_root[1])
    if name == "random":  # the first two of the pool order do not decode: replaced, counted
        assert sorted(info["skipped_corrupt"]) == bad
        assert "skipped 2 corrupt image file(s) in the calibration pool" in caplog.text
    if name == "selectq":  # both are in its 24-image pool: traversed, dropped, counted
        assert sorted(info["skipped_corrupt"]) == bad and info["pool_size"] == 24 - 2
        assert "skipped 2 corrupt image file(s) in the SelectQ pool" in caplog.text


@pytest.mark.slow
def test_fdda_real_set_skips_corrupt_files(damaged_root, make_ctx, compose, caplog):
    """FDDA's default real set (the first pool image of each class): a class whose first image does
    not decode gets its next one."""
    from pytorchcv.model_provider import get_model

    data = _build(damaged_root[0])
    ctx = make_ctx(get_model("mobilenetv3_large_w1", pretrained=False).eval(), data, calib_batch_size=250)
    fdda = strategies.build(compose("strategy=fdda").strategy)
    with caplog.at_level(logging.WARNING):
        real = fdda.real_set(ctx)
    assert len(real["indices"]) == CLASSES and not set(real["indices"]) & set(damaged_root[1])
    assert real["labels"].tolist() == list(range(CLASSES)) and real["missing"] == []
    assert "corrupt image file(s) in the calibration pool" in caplog.text


# -- the data module on ImageNet layout: train_per_class, layout errors, corrupt files -----------


def _build(root: Path, **changes):  # noqa: ANN202 - a DataModule
    from calibbench.config import DatasetConfig, ModelConfig

    cfg = DatasetConfig(name="imagenet", root=str(root), num_classes=CLASSES, download=False, resize=256,
                        num_workers=0, val_size=VAL_SIZE)
    for key, value in changes.items():
        setattr(cfg, key, value)
    model = ModelConfig(name="mobilenetv3", arch="mobilenetv3_large_w1", num_classes=CLASSES, input_size=224)
    return datasets.build(cfg, model)


def test_images_get_the_imagenet_transform(imagenet_root):
    data = _build(imagenet_root)
    x, y = data.load([0, 1, 2, 5], "train")
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [0, 0, 0, 1]
    assert data.test.samples[0][0].endswith(".JPEG") and len(data.test) == VAL


def test_train_per_class_is_a_seeded_sample_per_class(imagenet_root, monkeypatch):
    from torchvision.datasets import folder

    # The full listing (torchvision's make_dataset walks every file) is never used for the train
    # sample; the val split (50k files on ImageNet) is listed whole, as always.
    full_listing = folder.make_dataset

    def no_train_walk(directory, *args, **kwargs):  # noqa: ANN001, ANN202
        assert Path(directory).name != "train", "listed the whole train split"
        return full_listing(directory, *args, **kwargs)

    monkeypatch.setattr(folder, "make_dataset", no_train_walk)
    a = _build(imagenet_root, train_per_class=2, val_size=100)
    monkeypatch.undo()
    b = _build(imagenet_root, train_per_class=2, val_size=100)
    c = _build(imagenet_root, train_per_class=2, val_size=100, val_seed=1)
    assert len(a.train) == 2 * CLASSES and torch.bincount(torch.tensor(a.targets())).tolist() == [2] * CLASSES
    assert a.train.samples == b.train.samples  # seeded: the same files every build
    assert a.train.samples != c.train.samples  # and the seed matters
    assert len(a.test) == VAL  # the evaluation split is never sampled
    full = {p for p, _ in _build(imagenet_root).train.samples}
    assert {p for p, _ in a.train.samples} < full
    assert len(_build(imagenet_root, train_per_class=10).train) == TRAIN  # fewer files: all kept
    with pytest.raises(ConfigError, match="train_per_class=0"):
        _build(imagenet_root, train_per_class=0)


def test_train_per_class_is_part_of_the_dataset_key(compose, imagenet_root):
    from calibbench import pipeline

    keys = []
    for n in (None, 2):
        cfg = compose("model=mobilenetv3", f"dataset.root={imagenet_root}", "dataset.val_size=100",
                      f"dataset.train_per_class={'null' if n is None else n}")
        keys.append(pipeline._dataset_key(cfg, _build(imagenet_root, train_per_class=n, val_size=100)))
    assert keys[0]["train_per_class"] is None and keys[1]["train_per_class"] == 2
    assert keys[0]["pool"] != keys[1]["pool"]


def _copy_tree(src: Path, dst: Path) -> Path:
    """A hard-linked copy (fast); ``corrupt`` replaces a file rather than writing into the link."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


@pytest.mark.parametrize("damage, expected", [
    ("no_train", r"no train/ folder .*expected root/train/<class>/\*\.JPEG"),
    ("no_val", r"no val/ folder"),
    ("class_differs", r"class folders of train/ and val/ differ \(1000 vs 999\): 1 only in train/ \['n"),
    ("empty_class", r"no valid file|holds no image"),
])
def test_wrong_layout_is_one_clear_error(tmp_path, imagenet_root, damage, expected):
    root = _copy_tree(imagenet_root, tmp_path / "imagenet")
    first = sorted((root / "val").iterdir())[0]
    if damage == "no_train":
        shutil.rmtree(root / "train")
    elif damage == "no_val":
        shutil.rmtree(root / "val")
    elif damage == "class_differs":
        shutil.rmtree(first)
    else:
        for f in first.iterdir():
            f.unlink()
    with pytest.raises(ConfigError, match=expected) as err:
        _build(root)
    assert str(root) in str(err.value)


def test_wrong_class_count_names_path_and_counts(tmp_path):
    root = write_imagenet_tree(tmp_path / "ten", num_classes=10)
    with pytest.raises(ConfigError, match=r"has 10 class folders in train/ and val/, the config \(and the "
                                          r"model\) expect 1000") as err:
        _build(root)
    assert str(root) in str(err.value)


@pytest.mark.slow
def test_wrong_layout_from_the_cli(tmp_path):
    root = tmp_path / "imagenet"
    (root / "val").mkdir(parents=True)
    proc = cli(tmp_path, "model=mobilenetv3", "model.weights=none", f"dataset.root={root}")
    assert proc.returncode == 2
    assert proc.stderr.count("error:") == 1 and f"{root}': no train/ folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fill_replaces_corrupt_files_and_load_stays_strict(tmp_path, imagenet_root, caplog):
    root = _copy_tree(imagenet_root, tmp_path / "imagenet")
    data = _build(root)
    corrupt(Path(data.file_of(4)))
    with caplog.at_level(logging.WARNING, logger="calibbench.datasets"):
        images, labels, kept, skipped = data.fill([[4, 7, 9], [5, 11]], [2, 1], batch_size=2)
    assert kept == [5, 7, 9] and skipped == [4] and images.shape == (3, 3, 224, 224)
    assert labels.tolist() == [1, 2, 3]
    assert "skipped 1 corrupt image file(s) in the calibration pool" in caplog.text and data.file_of(4) in caplog.text
    with pytest.raises(ConfigError, match="not enough decodable images"):
        data.fill([[4]], [1])
    with pytest.raises(CorruptImageError, match=f"corrupt or unreadable image file '{data.file_of(4)}'"):
        data.load([3, 4], "train")


def test_corrupt_evaluation_image_is_an_error_naming_the_file(tmp_path, imagenet_root, compose):
    from calibbench import pipeline

    root = _copy_tree(imagenet_root, tmp_path / "imagenet")
    data = _build(root)
    _, eval_idx = data.eval_set("test", 10)
    bad = data.file_of(eval_idx[3], "test")
    corrupt(Path(bad), "garbage")
    # DataLoader workers on: the error crosses the worker boundary and still names the file.
    cfg = compose("model=mobilenetv3", f"dataset.root={root}", *SMALL[:-1], "dataset.num_workers=2",
                  f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(CorruptImageError, match="evaluation split holds a corrupt or unreadable image "
                                                f"file '{bad}'") as err:
        pipeline.run(cfg, tmp_path / "run")
    assert "never skips" in str(err.value)
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "failed" and bad in record["error"] and "metrics" not in record
