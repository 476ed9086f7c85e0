"""Refactors keep numbers: the same seed gives the same result as when the expectations in
``tests/same_numbers.json`` were recorded (issue 24).

Each case is one real run at ``budget=smoke`` (resnet20 on the offline CIFAR-10 JPEGs, W3A3,
seed 0, one thread): the calibration set (the indices of real images; the synthetic images'
summary for ZeroQ), top-1/top-5 on the smoke evaluation images, and every quantizer's scale and
zero point as saved in ``quant_state.pt``. A change that moves any of them fails here, naming what
moved. When a change is *meant* to move numbers (a fixed bug, a new default), rerun

    python tests/test_same_numbers.py --write

(``--write CASE ...`` rerecords only those cases) and commit the new file with the reason in the
commit message. random, random_dfq_paper, selectq and zeroq were recorded before issue 24's module
moves (seeding.py, store.py, figures.py) and pass after them; gdfq and brecq were recorded after
those moves, which touch no arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "same_numbers.json"
COMMON = ("budget=smoke", "bits=3", "seed=0", "threads=1")
CASES: dict[str, tuple[str, ...]] = {
    "random": ("strategy=random",),                           # the default preset (MSE activation ranges)
    "random_dfq_paper": ("strategy=random", "quant=dfq_paper"),  # the papers' min/max
    "selectq": ("strategy=selectq",),
    "zeroq": ("strategy=zeroq",),
    "gdfq": ("strategy=gdfq",),                               # generator training (Lightning)
    "brecq": ("strategy=random", "refine=brecq"),             # reconstruction, both stages
}
REL_TOL = 1e-6  # float sums of identical tensors agree to the last bits; this only absorbs printing


def fingerprint(result: dict, run_dir: Path) -> dict[str, Any]:
    """What a refactor must not move, from a finished run's folder."""
    calib = result["calibration"]
    indices = calib.get("indices")
    state = torch.load(run_dir / result["quant_state"]["file"], weights_only=True)["state_dict"]
    quantizers = {k: float(v.double().sum()) for k, v in sorted(state.items())
                  if k.endswith((".scale", ".zero_point"))}
    return {
        "indices_sha256": hashlib.sha256(json.dumps(indices).encode()).hexdigest() if indices else None,
        "images_seen": result.get("images_seen"),
        "top1": result["metrics"]["quant"]["top1"],
        "top5": result["metrics"]["quant"]["top5"],
        "fp_top1": result["metrics"]["fp"]["top1"],
        "quantizers": quantizers,
    }


def run_case(compose: Any, tmp_path: Path, name: str) -> dict[str, Any]:
    from calibbench.pipeline import run

    cfg = compose(*CASES[name], *COMMON, f"paths.output_dir={tmp_path / 'out'}",
                  f"paths.cache_dir={tmp_path / 'cache'}")
    run_dir = tmp_path / name
    return fingerprint(run(cfg, run_dir), run_dir)


def diff(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    out = [f"{k}: expected {expected[k]!r}, got {got[k]!r}" for k in expected
           if k != "quantizers" and expected[k] != got[k]]
    exp_q, got_q = expected["quantizers"], got["quantizers"]
    if set(exp_q) != set(got_q):
        out.append(f"quantizer set changed: missing {sorted(set(exp_q) - set(got_q))[:5]}, "
                   f"new {sorted(set(got_q) - set(exp_q))[:5]}")
    out += [f"{k}: expected {exp_q[k]!r}, got {got_q[k]!r}" for k in sorted(set(exp_q) & set(got_q))
            if not math.isclose(exp_q[k], got_q[k], rel_tol=REL_TOL, abs_tol=1e-12)]
    return out


@pytest.mark.needs_shared
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_seed_same_numbers_as_recorded(compose, tmp_path, name):
    expected = json.loads(EXPECTED.read_text())[name]
    problems = diff(expected, run_case(compose, tmp_path, name))
    assert not problems, (f"{name}: the numbers moved ({len(problems)} differences; if intended, "
                          "rerun `python tests/test_same_numbers.py --write`):\n" + "\n".join(problems[:20]))


def test_the_comparison_catches_a_moved_quantizer_and_metric():
    base = {"indices_sha256": "a", "images_seen": 32, "top1": 50.0, "top5": 90.0, "fp_top1": 88.0,
            "quantizers": {"x.scale": 1.0, "y.zero_point": 3.0}}
    assert diff(base, json.loads(json.dumps(base))) == []
    moved = dict(base, top1=50.5, quantizers={"x.scale": 1.0 + 1e-4, "y.zero_point": 3.0})
    problems = diff(base, moved)
    assert len(problems) == 2 and problems[0].startswith("top1") and "x.scale" in problems[1]


if __name__ == "__main__":  # python tests/test_same_numbers.py --write
    import tempfile

    if sys.argv[1:2] != ["--write"]:
        sys.exit("usage: python tests/test_same_numbers.py --write [case ...]")
    from conftest import config_composer  # its import sets the offline paths and one thread, as in pytest

    composer = config_composer()
    record = json.loads(EXPECTED.read_text()) if EXPECTED.is_file() else {}
    only = sys.argv[2:] or sorted(CASES)  # --write [case ...]: rerecord only those
    for case in only:
        with tempfile.TemporaryDirectory() as tmp:
            record[case] = run_case(composer, Path(tmp), case)
            print(case, record[case]["top1"], flush=True)
    EXPECTED.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {EXPECTED}")
