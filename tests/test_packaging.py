"""conf/ ships inside the wheel: a non-editable install composes the configs from the package."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_conf_and_composes_without_the_repo(tmp_path):
    pytest.importorskip("setuptools")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            str(REPO), "-w", str(tmp_path / "wheel")], check=True, capture_output=True, text=True)
    # setuptools' deprecations (license table, conf folders missing from `packages`) would be here
    assert "BuildBackendWarning" not in build.stdout + build.stderr
    wheel = next((tmp_path / "wheel").glob("calibbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("calibbench/conf/") and n.endswith(".yaml")}
    in_repo = {f"calibbench/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == in_repo
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-c", "import calibbench.conf, sys; print(calibbench.conf.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.startswith(str(tmp_path / "site"))  # not the repository's conf/
    proc = subprocess.run([sys.executable, "-m", "calibbench", "--cfg", "job", "strategy=selectq"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: selectq" in proc.stdout and "num_centroids: 10" in proc.stdout
