"""Run every bad input of the table in docs/usage.md and print the table (input, exit code, message).

The message is stderr's last line (Hydra's own composition errors: their first two lines).

    python experiments/bad_inputs.py > /tmp/bad_inputs.md      # ~20 CLI runs at budget=smoke

Every row is what this machine printed: nothing is typed in. Weights files that are broken on
purpose (truncated, random bytes, a pickled list) and a file standing where a folder should be are
made in a temp dir. The Ctrl-C row is tests/test_failures.py::test_ctrl_c_is_one_line_and_the_rerun_resumes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def run(tmp: Path, *args: str) -> tuple[int, str]:
    env = dict(os.environ, WANDB_MODE="disabled")
    env.setdefault("CALIBBENCH_DATA_DIR", str(SHARED / "data"))
    env.setdefault("CALIBBENCH_WEIGHTS_DIR", str(SHARED / "weights"))
    paths = [f"paths.{k}={tmp / k}" for k in ("output_dir", "cache_dir") if not any(
        a.startswith(f"paths.{k}=") for a in args)]
    multirun = ["-m"] if args[:1] == ("-m",) else []
    args = args[len(multirun):]
    cmd = [sys.executable, "-m", "calibbench", *multirun, "budget=smoke", "progress=false",
           "logger.mode=disabled", *paths, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, timeout=900)
    lines = [ln.strip() for ln in proc.stderr.strip().splitlines() if ln.strip()]
    if lines and not lines[-1].startswith("error:") and lines[-1].startswith("Set the environment"):
        # Hydra's own composition errors: what is wrong is in their first two lines
        return proc.returncode, " / ".join(lines[:2])
    return proc.returncode, (lines[-1] if lines else "")


def main() -> int:
    import torch

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        real = SHARED / "weights" / "resnet20_cifar10_jpeg.pth"
        (tmp / "trunc.pth").write_bytes(real.read_bytes()[:300_000])
        (tmp / "random.pth").write_bytes(os.urandom(5000))
        torch.save([torch.zeros(2)], tmp / "list.pth")
        (tmp / "afile").write_text("not a folder")
        rows = [
            ("strategy=nope",), ("bits=abc",), ("bits=1",), ("num_samples=0",), ("num_samples=50001",),
            ("seed=-3",), ("seed=99999999999",), ("threads=0",), ("threads=many",), ("device=cuda",),
            ("eval_split=train",), ("paths.data_dir=/nonexistent/data",),
            ("model.weights=/nonexistent/w.pth",), (f"model.weights={tmp / 'trunc.pth'}",),
            (f"model.weights={tmp / 'random.pth'}",), (f"model.weights={tmp / 'list.pth'}",),
            ("quant.act_observer=kl",), ("quant.observer_reduce=median",), ("quant.percentile=0",),
            ("quant.mse_steps=0",), ("strategy=zeroq", "budget.synth_iterations=0"),
            ("strategy=selectq", "strategy.num_centroids=0"),
            ("refine=kd", "refine.lr=1e9"), ("refine=qdrop", "refine.lr=1e9"),
            (f"paths.output_dir={tmp / 'afile' / 'out'}",), (f"paths.cache_dir={tmp / 'afile' / 'c'}",),
            ("export=tflite",),
        ]
        print("| input | exit | message |")
        print("|---|---|---|")
        for args in rows:
            code, line = run(tmp, *args)
            shown = " ".join(args).replace(str(tmp), "<tmp>")
            print(f"| `{shown}` | {code} | {line.replace(str(tmp), '<tmp>').replace('|', '/')} |", flush=True)
        code, line = run(tmp, "-m", "seed=0,-3")
        print(f"| `-m seed=0,-3` | {code} | {line.replace(str(tmp), '<tmp>')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
