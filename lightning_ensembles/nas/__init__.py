"""Architecture search with Optuna for the NAS-derived ensembles of Kondratyuk et al. (arXiv 2005.00570, fig. 3).

One searched architecture replicated ``N`` times against ``N`` different searched architectures of the same
total cost. The package is split by role:

- :mod:`~lightning_ensembles.nas.space`: the MnasNet/EfficientNet-style search space
  (:class:`NASSearchSpace`, :class:`StageSpace`), which samples a
  :class:`~lightning_ensembles.models.NASArchitecture` from a trial;
- :mod:`~lightning_ensembles.nas.search`: the study runner (:class:`NASSearch`): trained proxies, one
  progress line per trial;
- :mod:`~lightning_ensembles.nas.storage`: the Optuna storage the workers share: opened with retries, with
  heartbeats, and stale trials of stopped workers queued again;
- :mod:`~lightning_ensembles.nas.selection`: pure functions from a finished study to the Pareto set and the
  two arms (:func:`trial_records`, :func:`pareto_front`, :func:`choose_architectures`);
- :mod:`~lightning_ensembles.nas.export`: both arms as LightningCLI YAML (:func:`export_search`,
  :func:`member_config`).

The member, :class:`~lightning_ensembles.models.NASNet`, lives with the other members in
:mod:`lightning_ensembles.models`, and the pruning callback, :class:`~lightning_ensembles.callbacks.OptunaPruning`,
with the other callbacks; it is re-exported here, where it was before.
"""

from lightning_ensembles.callbacks.optuna_pruning import OptunaPruning
from lightning_ensembles.nas._optuna import import_optuna
from lightning_ensembles.nas.export import export_search, member_config
from lightning_ensembles.nas.search import NASSearch
from lightning_ensembles.nas.selection import choose_architectures, pareto_front, trial_records
from lightning_ensembles.nas.space import NASSearchSpace, StageSpace

__all__ = [
    "NASSearch",
    "NASSearchSpace",
    "OptunaPruning",
    "StageSpace",
    "choose_architectures",
    "export_search",
    "import_optuna",
    "member_config",
    "pareto_front",
    "trial_records",
]
