"""``GridUnionSweeper``: the basic sweeper's Cartesian product, once per grid, jobs concatenated.

``params`` apply to every grid; each entry of ``grids`` adds (or replaces) keys for its own
product. Command-line sweep arguments replace the value of the same key in every grid, as with
the basic sweeper. A job that two grids both produce runs once (first occurrence kept).
"""

# No `from __future__ import annotations`: Hydra execs plugin modules before registering them in
# sys.modules, and dataclasses then cannot resolve string annotations.

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class GridUnionSweeperConf:
    _target_: str = "hydra_plugins.calibbench_sweeper.grid_union.GridUnionSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None  # shared by every grid
    grids: List[Dict[str, str]] = field(default_factory=list)  # one Cartesian product each


ConfigStore.instance().store(group="hydra/sweeper", name="grid_union", node=GridUnionSweeperConf,
                             provider="calibbench")


class GridUnionSweeper(BasicSweeper):
    """A :class:`BasicSweeper` whose job list is the union of several products."""

    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None,
                 grids: Optional[List[Dict[str, str]]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(g) for g in (grids or [])] or [{}]

    def job_overrides(self, arguments: Sequence[str]) -> "List[List[str]]":
        """Every job's override list: the product of (params + grid + arguments), grid by grid."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs: List[List[str]] = []
        seen: set = set()
        for grid in self.grids:
            merged = {**(self.params or {}), **grid}
            lines = [f"{k}={v}" for k, v in merged.items()] + list(arguments)
            for batch in self.split_arguments(parser.parse_overrides(lines), None):
                for job in batch:
                    key = tuple(sorted(job))
                    if key not in seen:
                        seen.add(key)
                        jobs.append(job)
        return jobs

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        jobs = self.job_overrides(arguments)
        n = self.max_batch_size or len(jobs) or 1
        self.overrides = [jobs[i:i + n] for i in range(0, len(jobs), n)]
        log.info("grid_union: %d jobs from %d grids", len(jobs), len(self.grids))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns = []
        start = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=start)
            for r in results:
                _ = r.return_value  # re-raises a job's exception, as the basic sweeper does
            start += len(batch)
            returns.append(results)
        return returns
