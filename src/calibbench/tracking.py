"""W&B tracking: one run per job, always finished; offline unless the user opts in.

We log through wandb directly (not Lightning's WandbLogger): ``WandbLogger(offline=True)`` flips
``WANDB_MODE`` for the whole process, and Lightning's wandb shim is on its way out (DESIGN.md #8).
"""

from __future__ import annotations

import logging
import netrc
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from calibbench.config import LoggerConfig

log = logging.getLogger(__name__)


def has_credentials() -> bool:
    """True when W&B could log online without asking: an API key in the env or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


_TRUE = ("true", "1", "yes", "on")

Mode = Literal["online", "offline", "disabled"]
# a mode as written (logger.mode or WANDB_MODE) -> W&B's; dryrun is W&B's older name for offline
_MODES: dict[str, Mode] = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline"}


def resolve_mode(mode: str) -> Mode:
    """``auto`` follows W&B's own environment convention first: ``WANDB_DISABLED=true`` or
    ``WANDB_MODE=disabled|offline|online`` (what CI sets), then online with credentials, else
    offline. An explicit ``logger.mode`` wins over the environment."""
    if mode != "auto":
        if mode not in _MODES:  # config.validate checks logger.mode before any run
            raise ValueError(f"logger.mode={mode!r}; valid: auto, {', '.join(_MODES)}")
        return _MODES[mode]
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in _MODES:
        return _MODES[env]
    return "online" if has_credentials() else "offline"


class Tracker:
    """Thin wrapper so the pipeline never imports wandb when tracking is disabled."""

    def __init__(self, run: Any = None) -> None:
        self.run = run

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, data: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(data)

    def summary(self, data: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(data)

    def images(self, key: str, images: Any, caption: Optional[str] = None) -> None:
        """Log an image grid (tensor N×3×H×W in [0, 1])."""
        if self.run is None:
            return
        import wandb
        from torchvision.utils import make_grid

        grid = make_grid(images, nrow=min(8, len(images)), padding=1)
        self.run.log({key: wandb.Image(grid.permute(1, 2, 0).clamp(0, 1).numpy(), caption=caption)})

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Table(columns=[*columns], data=[*rows])})


@contextmanager
def tracker(cfg: LoggerConfig, run_dir: Path, name: str, config: dict[str, Any],
            job_type: str, tags: list[str], group: Optional[str] = None) -> Iterator[Tracker]:
    """Open a W&B run for one job (or a no-op tracker) and always finish it."""
    mode = resolve_mode(cfg.mode)
    if mode == "disabled":
        yield Tracker()
        return
    import wandb

    run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group or group or "single",
                     job_type=job_type, tags=tags, name=name, config=config, dir=str(run_dir),
                     mode=mode, reinit="finish_previous", settings=wandb.Settings(silent=True))
    log.info("W&B run %s (%s) in %s", run.id, mode, run_dir)
    exit_code = 1
    try:
        yield Tracker(run)
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)
