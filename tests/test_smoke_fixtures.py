import torch

from calibbench.strategies import build


def test_random_on_tiny(tiny_data, make_ctx, compose):
    cfg = compose("strategy=random")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    calib = build(cfg.strategy).calibration_set(make_ctx(model, tiny_data, num_samples=10))
    assert calib.images.shape == (10, 3, 32, 32)
