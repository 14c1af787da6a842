"""Self-consuming generation-loop driver (SPEC section 3; DESIGN "the flow").

One *generation* t = 1..G of one *stream* (workflow, method, seed batch):

1. compose the training set (:func:`sims.data.workflows.compose`: real data and synthetic
   generations < t, by workflow);
2. ``model.fit(train_data, generation=t, seed=..., workdir=..., previous=..., method=...)``
   (for ``method="sims"`` the model also trains its auxiliary model: SIMS Algorithm 1 steps 1-3,
   Alemohammad et al. 2024, arXiv 2408.16333);
3. ``model.sample(num_synthetic, seed=...)``: the synthetic data of generation t (which the
   next generation may train on), stored as ``npz`` (atomic temp + rename);
4. ``model.evaluate(samples, seed=...)`` -> metrics, recorded as the unit
   (workflow, method, seed, generation) in the manifest. ``samples`` is the synthetic data of
   step 3, or, with ``loop.num_eval`` set, that many further samples of the same model (a
   sample-based metric such as FD then has the same finite-sample bias whatever ``num_synthetic``).

Workflows: Gerstgrasser et al. 2024 "Is Model Collapse Inevitable?" (replace, accumulate);
Kazdan, Schaeffer et al. 2025 "Collapse or Thrive?", arXiv 2410.16713 (accumulate-subsample);
Alemohammad et al., ICLR 2024 "Self-Consuming Generative Models Go MAD" (fresh, augment).

Randomness is a pure function of the run seed and the position in the loop, never of process
history: every random draw uses an integer seed from :func:`derive_seed` (numpy ``SeedSequence``
spawn keys):

========================  =====================================================
real data                 ``derive_seed(seed, "real")``
evaluation (test sets)    ``derive_seed(seed, "eval")`` (same for every generation)
fit (e.g. init, aux)      ``derive_seed(seed, "fit", t)``
sampling                  ``derive_seed(seed, "sample", t)``
evaluation samples        ``derive_seed(seed, "eval-sample")`` (``loop.num_eval``; same for every generation)
subset draw               ``derive_seed(seed, "subsample", workflow, t)``
========================  =====================================================

Fit and sample seeds deliberately do *not* depend on the workflow or method: generation 1 is the
same computation for every workflow (it trains on the first ``num_real`` real samples), so its
model and samples are shared between workflows (``_shared`` directories: a diffusion loop trains
its generation-1 base model once), and comparisons between workflows use common random numbers.

Run directory (created by :func:`run_loop`)::

    manifest.json                      format, config hash, hashed config, completed units
    config.yaml                        resolved config (written if absent)
    synthetic/<wf>/<method>/<batch>/gen003.npz   samples [S, n_s, ...] + seeds  (gen 1: _shared/)
    samples/<wf>/<method>/<batch>/gen003.png     grid of 100 synthetic images / 2-D scatter
                                                 (models with ``sample_figures = True``: diffusion)
    models/<wf>/<method>/<batch>/gen003/         model workdir (gen 1: _shared/)
    units/<wf>/<method>/<batch>/gen003.json      metrics of the unit (per seed)
    metrics.csv, metrics.json, plots/<metric>.png

Killing the process at any point and re-running the same command continues from the last
completed unit; for the Gaussian and KDE models the metrics are then bit-identical to an
uninterrupted run's (tested), and the diffusion model's stages resume exactly on CPU at the same
world size (training, synthetic generation and evaluation are tested one by one). A run directory
created by a different config is refused (:class:`~sims.errors.ConfigMismatchError`).

Modules: :mod:`~sims.loop.protocol` (what a model provides), :mod:`~sims.loop.registry` (names →
factories), :mod:`~sims.loop.settings`, :mod:`~sims.loop.rundir`, :mod:`~sims.loop.driver`,
:mod:`~sims.loop.report`; models in :mod:`sims.loop.models` and :mod:`sims.toy`.
"""

from sims.errors import ConfigMismatchError, LoopError
from sims.loop.driver import LoopResult, run_loop
from sims.loop.protocol import INITS, METHODS, GenerativeModel
from sims.loop.registry import available_models, make_model, register_model
from sims.loop.report import (AGGREGATES, KNOWN_METRICS, META_COLUMNS, aggregate_rows, collect_rows, metric_columns,
                              plot_metrics, read_metrics_csv, series, use_log_scale, write_metrics_csv)
from sims.loop.rundir import StepInfo, batch_name, completed_units
from sims.loop.settings import Settings, config_hash, hashed_config, settings
from sims.utils import derive_seed

__all__ = ["AGGREGATES", "ConfigMismatchError", "GenerativeModel", "INITS", "KNOWN_METRICS", "LoopError", "LoopResult",
           "META_COLUMNS", "METHODS", "Settings", "StepInfo", "aggregate_rows", "available_models", "batch_name",
           "collect_rows", "completed_units", "config_hash", "derive_seed", "hashed_config", "make_model",
           "metric_columns", "plot_metrics", "read_metrics_csv", "register_model", "run_loop", "series", "settings",
           "use_log_scale", "write_metrics_csv"]
