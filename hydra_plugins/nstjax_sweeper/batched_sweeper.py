"""``hydra/sweeper=nstjax``, the default of ``python -m nstjax.run -m``: Hydra's override
grammar (comma lists, ``range()``, ``choice()``, group choices) expanded as the basic sweeper
does, the points numbered as it numbers them, then grouped by structure (nstjax.sweeps) and
launched one job per group through the configured launcher. ``hydra/sweeper=basic`` runs one
job per point instead. A sweep directory that already holds anything is refused before anything
is written, and nothing is written before every point is validated; a sweep whose first group is
refused (the memory check) removes what it wrote.
"""


import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf, open_dict


@dataclass
class BatchedSweeperConf:
    _target_: str = "hydra_plugins.nstjax_sweeper.batched_sweeper.BatchedSweeper"
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="nstjax", node=BatchedSweeperConf,
                             provider="nstjax")


class BatchedSweeper(Sweeper):
    def __init__(self, params: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        self.params = params or {}
        self.hydra_context = self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from nstjax import sweeps
        from nstjax.atomic import write_text
        from nstjax.status import EXIT_SIGNAL
        from nstjax.errors import UserError
        from nstjax.rundir import first_existing, require_empty

        sweep_dir = Path(self.config.hydra.sweep.dir)
        require_empty(sweep_dir, "sweep")  # an earlier sweep's files stay as they are
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        swept = [o.get_key_element() for o in overrides if o.is_sweep_override()]
        points = []
        for n, point in enumerate(BasicSweeper.split_arguments(overrides, None)[0]):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(point))
            with open_dict(cfg):
                del cfg["hydra"]
            values = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in point}
            points.append(sweeps.Point(n, list(point), {k: values[k] for k in swept}, cfg))
        groups = sweeps.plan(points)
        existed = first_existing(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_text(sweep_dir / sweeps.MULTIRUN, OmegaConf.to_yaml(self.config))
        sweeps.write_plan(sweep_dir, swept, groups)
        print(f"{len(points)} points in {len(groups)} group(s) of {', '.join(str(len(g)) for g in groups)} "
              f"member(s) -> {sweep_dir}", file=sys.stderr)
        try:
            results = self.launcher.launch(sweeps.job_overrides(groups), initial_job_idx=0)
        except SystemExit as e:
            if e.code == UserError.exit_code:  # a group refused before it started (the memory check)
                sweeps.discard_unstarted(sweep_dir, existed)
            raise
        for r in results:
            _ = r.return_value  # re-raises a job's exception
        code = sweeps.exit_code(sweeps.summarize(sweep_dir))
        if code in EXIT_SIGNAL.values():
            print(f"interrupted: resume with python -m nstjax.run resume={sweep_dir}", file=sys.stderr)
        if code:
            sys.exit(code)
        return [results]
