"""Models and datasets: offline build, and every way of pointing at missing or wrong files."""

import pytest
import torch

from calibbench import datasets, models
from calibbench.config import ConfigError


def test_offline_default_pair(compose, cifar):
    cfg = compose()
    built = models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir)
    assert built.weights_source.endswith("resnet20_cifar10_jpeg.pth")
    assert len(built.weights_id) == 16 and not built.module.training
    assert (len(cifar.train), len(cifar.test), cifar.num_classes) == (50000, 10000, 10)
    x, y = cifar.load([0, 5000, 49999])
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 9]
    assert x.mean().abs() < 1.5  # normalized, not raw [0, 1] pixels


def test_missing_weights_file_names_both_ways(compose, tmp_path):
    cfg = compose(f"model.weights={tmp_path}/nope.pth")
    with pytest.raises(ConfigError, match="does not exist.*model.weights=PATH.*model.weights=pretrained"):
        models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir)


def test_missing_weights_dir(compose, tmp_path):
    cfg = compose(f"paths.weights_dir={tmp_path}")
    with pytest.raises(ConfigError, match="CALIBBENCH_WEIGHTS_DIR"):
        models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir)


def test_mismatched_weights_file(compose):
    cfg = compose()
    wrong = f"{cfg.paths.weights_dir}/resnet56_cifar10_jpeg.pth"
    cfg = compose(f"model.weights={wrong}")
    with pytest.raises(ConfigError, match="does not match model 'resnet20_cifar10'.*unexpected keys"):
        models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir)


def test_no_weights_reachable(compose, monkeypatch):
    import pytorchcv.model_provider as mp

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(mp, "get_model", offline)
    cfg = compose("dataset=cifar10")  # no local file for this dataset → pretrained download
    with pytest.raises(ConfigError, match="no weights reachable.*internet.*model.weights=PATH"):
        models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir)


def test_random_init_and_zoo_names(compose):
    cfg = compose("model=mobilenetv3", "model.weights=none")
    built = models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir)
    assert built.module(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    cfg = compose("model.arch=resnet_nonexistent", "model.weights=none")
    with pytest.raises(ConfigError, match="pytorchcv has no model 'resnet_nonexistent'"):
        models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir)


def test_missing_data_dir(compose, tmp_path):
    cfg = compose(f"paths.data_dir={tmp_path}/absent")
    with pytest.raises(ConfigError, match="data directory .*absent.* does not exist.*CALIBBENCH_DATA_DIR"):
        datasets.build(cfg.dataset, cfg.model)


def test_legacy_gdfq_normalization(compose):
    cfg = compose("dataset.normalization=legacy_gdfq")
    data = datasets.build(cfg.dataset, cfg.model)
    assert data.std == (0.2470, 0.2435, 0.2616)


def test_spread_indices_cover_all_classes(cifar):
    idx = datasets.spread_indices(len(cifar.test), 50)
    labels = {cifar.test.targets[i] for i in idx}
    assert len(idx) == 50 and labels == set(range(10))


def test_folder_listing_is_read_once_and_follows_added_or_removed_files(tmp_path, monkeypatch):
    """The listing memo (a sweep builds the same split many times): a second build does not list
    the folders again; a file added to or removed from a class folder is seen by the next build."""
    from PIL import Image

    for wnid in ("a", "b"):
        (tmp_path / wnid).mkdir()
        for i in range(2):
            Image.new("RGB", (4, 4)).save(tmp_path / wnid / f"{i}.jpg")
    first = datasets.SampledImageFolder(str(tmp_path), None)
    calls = []
    real = datasets.SampledImageFolder._list
    monkeypatch.setattr(datasets.SampledImageFolder, "_list",
                        lambda self, *a: calls.append(a) or real(self, *a))
    assert datasets.SampledImageFolder(str(tmp_path), None).samples == first.samples and not calls
    Image.new("RGB", (4, 4)).save(tmp_path / "b" / "new.jpg")
    assert len(datasets.SampledImageFolder(str(tmp_path), None).samples) == 5 and len(calls) == 1
    (tmp_path / "a" / "0.jpg").unlink()
    assert [p for p, _ in datasets.SampledImageFolder(str(tmp_path), None).samples] == \
        [str(tmp_path / n) for n in ("a/1.jpg", "b/0.jpg", "b/1.jpg", "b/new.jpg")]
