import torch

from calibbench.cache import Cache, content_key


def test_key_ignores_dict_order_and_sees_values():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_round_trip_and_hit(tmp_path):
    cache, calls = Cache(tmp_path), []

    def compute():
        calls.append(1)
        return {"x": torch.arange(5)}

    first, hit1, key = cache.get_or_compute("k", {"p": 1}, compute)
    second, hit2, key2 = cache.get_or_compute("k", {"p": 1}, compute)
    assert (hit1, hit2, len(calls), key) == (False, True, 1, key2)
    assert torch.equal(first["x"], second["x"])
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_corrupt_entry_is_detected_and_recomputed(tmp_path):
    cache = Cache(tmp_path)
    _, _, key = cache.get_or_compute("k", {"p": 1}, lambda: torch.ones(3))
    path = cache.path("k", key)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip a byte in the body
    path.write_bytes(bytes(raw))
    value, hit, _ = cache.get_or_compute("k", {"p": 1}, lambda: torch.zeros(3))
    assert not hit and torch.equal(value, torch.zeros(3))
    path.write_bytes(b"truncated")
    value, hit, _ = cache.get_or_compute("k", {"p": 1}, lambda: torch.full((3,), 7.0))
    assert not hit and torch.equal(value, torch.full((3,), 7.0))
    assert cache.load("k", key) is not None
