"""The diffusion model in the generation loop (``loop.model=diffusion``): the SIMS stages run per
generation on the generation's training set.

One generation of a ``sims`` stream is SIMS Algorithm 1 (Alemohammad et al. 2024): base on the
generation's training set (:func:`sims.stages.base` machinery: :func:`~sims.training.fit.fit_stage`)
→ n_s base samples (:func:`~sims.stages.synthetic.make_synthetic`) → auxiliary fine-tune
(:func:`~sims.stages.aux.finetune_aux`) → the synthetic data handed to the next generation is
sampled with D = (1+ω)·D_base − ω·D_aux, ω = ``loop.omega``. A ``standard`` stream samples the base
model (ω = 0). What a ``sims`` stream's auxiliary model learns from is ``loop.aux_data``: ``own``
(``sims.num_synthetic`` fresh samples of the generation's base, SIMS Algorithm 1), ``synthetic``
(the synthetic part of the generation's training set — the pollution; generation 1 has none and
uses its own samples), or ``both``; ``<workdir>/aux_data.json`` records what it saw. With workflow ``accumulate`` or ``augment`` this is the MAD-prophylaxis experiment
of SIMS §5 (synthetic augmentation loop).

Base models are content-addressed: ``RUN/models/_bases/<hash of (training data, seed, warm start)>``,
so identical fits (generation 1 of the standard and the SIMS stream) are trained once. Every stage
runs on all ranks of the job's :class:`~sims.dist.DistContext`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from sims.config import to_container
from sims.data import ArrayDataset, load_real_dataset
from sims.data.images import quantize
from sims.dist import DistContext
from sims.errors import ConfigError, MissingFileError
from sims.generation import gather_samples, generate, rank_batches
from sims.stages.aux import finetune_aux
from sims.stages.evaluate import build_reference, evaluate_samples, feature_name, make_extractor
from sims.stages.synthetic import make_synthetic
from sims.training.export import load_denoiser, load_state
from sims.training.fit import fit_stage, stage_done
from sims.training.module import EDMModule
from sims.loop.settings import AUX_DATA
from sims.utils import atomic_write_json, atomic_write_text


class DiffusionLoopModel:
    """:class:`sims.loop.protocol.GenerativeModel` for EDM diffusion on image or vector data.

    Args:
        cfg: the run config (data, network, train, sampler, sims, loop sections).
        ctx: the job's distributed context.
    Raises:
        ConfigError: ``sims`` in loop.methods with ``loop.omega`` = 0.
    """

    batched = False
    supported_methods = ("standard", "sims")
    sample_figures = True  # the driver saves samples/<wf>/<method>/<seed>/genNNN.png

    def __init__(self, cfg: DictConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.real = load_real_dataset(cfg.data)
        self.num_real_available = len(self.real)
        self.omega = float(cfg.loop.omega)
        if "sims" in cfg.loop.methods and self.omega <= 0:
            raise ConfigError("loop.methods has 'sims' but loop.omega is 0: set the guidance weight used for the "
                              "synthetic data, e.g. loop.omega=0.5")
        if cfg.loop.aux_data not in AUX_DATA:
            raise ConfigError(f"loop.aux_data must be one of {', '.join(AUX_DATA)}, got {cfg.loop.aux_data!r}")
        self.base = self.aux = None
        self._measure = None

    # -- data ------------------------------------------------------------------------------------------
    def real_data(self, num: int, *, seed: int) -> np.ndarray:
        """The real set permuted with ``seed``; first ``num`` items ([num, C, H, W] or [num, d], float32)."""
        perm = np.random.default_rng(seed).permutation(len(self.real))[:num]
        return self.real.data[torch.from_numpy(perm)].numpy()

    # -- training --------------------------------------------------------------------------------------
    def _base_dir(self, data: np.ndarray, seed: int, previous: Optional[Path]) -> Path:
        h = hashlib.sha1()
        h.update(np.ascontiguousarray(data, dtype=np.float32).tobytes())
        h.update(f"seed={seed};previous={previous}".encode())
        return Path(self.cfg.run_dir) / "models" / "_bases" / h.hexdigest()[:16]

    def fit(self, train_data, *, generation: int, seed: int, workdir: Path, previous: Optional[Path] = None,
            method: str = "standard") -> None:
        """Train the base (and for ``sims`` the auxiliary) model on ``train_data`` [N, ...]; resumable,
        idempotent; ``previous`` (``loop.init=previous``) warm-starts from that generation's base."""
        cfg, ctx = self.cfg, self.ctx
        data = np.asarray(train_data, dtype=np.float32)
        shape = tuple(data.shape[1:])
        base_dir = self._base_dir(data, seed, previous)
        train = {**to_container(cfg.train), "seed": int(seed) % 2 ** 31}
        if not stage_done(base_dir):
            if previous is not None:
                module = EDMModule.from_state(load_state(_weights_of(previous)), to_container(cfg.network), train,
                                              shape, 0)
            else:
                module = EDMModule(to_container(cfg.network), train, shape, 0)
            dataset = ArrayDataset(torch.from_numpy(data.copy()), name=f"generation{generation}")
            fit_stage(ctx, base_dir, module, dataset, total_kimg=float(cfg.train.total_kimg), train=train,
                      num_workers=int(cfg.data.num_workers), progress=bool(cfg.train.progress_bar))
        base_weights = base_dir / "ema.safetensors"
        if ctx.is_main:
            atomic_write_text(Path(workdir) / "base_weights.txt", str(base_weights) + "\n")
        ctx.barrier()
        self.base, _ = load_denoiser(base_weights, ctx.device)
        self.aux = None
        if method != "sims":
            return
        synthetic = self._aux_set(train_data, data, shape, Path(workdir))
        aux_weights = finetune_aux(ctx, cfg, base_weights, synthetic, Path(workdir) / "aux", seed=int(seed))
        self.aux, _ = load_denoiser(aux_weights, ctx.device)

    def _aux_set(self, train_data, data: np.ndarray, shape, workdir: Path) -> ArrayDataset:
        """The auxiliary's training set under ``loop.aux_data`` (see the module docstring)."""
        cfg, ctx = self.cfg, self.ctx
        sets = getattr(train_data, "sets", ())
        num_real = sets[0].num_real if sets else len(data)
        pollution = data[num_real:]  # the training set holds its real samples first, then the synthetic ones
        mode = str(cfg.loop.aux_data)
        if len(pollution) == 0:
            mode = "own"  # generation 1 trains on real data only: there is no pollution to learn from
        parts, record = [], {"requested": str(cfg.loop.aux_data), "used": mode, "own": 0, "pollution": 0,
                             "pollution_generations": sorted({int(g) for g in sets[0].synthetic[:, 0]}) if sets else []}
        if mode in ("own", "both"):
            offset = int(cfg.sims.synthetic_seed_offset)
            own = make_synthetic(ctx, self.base, workdir / "synthetic", range(offset, offset + int(cfg.sims.num_synthetic)),
                                 data_shape=shape, label_dim=0, sampler=to_container(cfg.sampler),
                                 batch_size=int(cfg.sampler.batch_size))
            parts.append(own.data)
            record["own"] = len(own)
        if mode in ("synthetic", "both"):
            parts.append(torch.from_numpy(np.ascontiguousarray(pollution)))
            record["pollution"] = int(len(pollution))
        if ctx.is_main:
            atomic_write_json(workdir / "aux_data.json", record)
        return ArrayDataset(torch.cat(parts), name=f"aux:{mode}")

    # -- sampling and evaluation ------------------------------------------------------------------------
    def _denoiser(self):
        from sims.stages.evaluate import guided

        if self.base is None:
            raise RuntimeError("sample() before fit()")
        return guided(self.base, self.aux, self.omega if self.aux is not None else 0.0, self.cfg.sims.sigma_interval)[0]

    def sample(self, num: int, *, seed: int) -> np.ndarray:
        """``num`` samples with per-image seeds ``seed·10⁶ + i`` (8-bit quantised images), on every rank."""
        shape = tuple(self.real.data.shape[1:])
        seeds = [int(seed) % 2 ** 31 * 1_000_000 + i for i in range(num)]
        parts: Dict[int, np.ndarray] = {}
        for batch, x, _ in generate(self.ctx, self._denoiser(), seeds, shape, sampler=to_container(self.cfg.sampler),
                                    batch_size=int(self.cfg.sampler.batch_size)):
            parts[batch[0]] = quantize(x).numpy()
        return gather_samples(self.ctx, parts)

    def evaluate(self, samples: np.ndarray, *, seed: int) -> Mapping[str, Any]:
        """Fréchet distance (``sims.features``; digit features on digits), precision and recall (k = 5,
        on min(N, real set) samples) of ``samples`` [N, ...] against the whole real data set."""
        if self._measure is None:
            fname = feature_name(self.cfg.sims.features, self.cfg.data.name, self.real.is_image)
            extractor = make_extractor(fname, data_dim=self.real.dim, inception_weights=self.cfg.sims.inception_weights,
                                       device=self.ctx.device)
            reference = build_reference(self.ctx, extractor, fname, self.real, reference_path=self.cfg.sims.reference,
                                        pr_size=len(self.real))
            self._measure = (extractor, reference)
        extractor, reference = self._measure
        x = torch.from_numpy(np.asarray(samples, dtype=np.float32))
        ids = list(range(len(x)))
        mine = ((b, x[b[0]:b[-1] + 1]) for b in rank_batches(self.ctx, ids, int(self.cfg.sampler.batch_size)))
        out = evaluate_samples(self.ctx, mine, extractor=extractor, reference=reference,
                               pr_ids=ids[:reference.pr_size])
        return {"fd": out["fd"], "precision": out["precision"], "recall": out["recall"]}


def _weights_of(workdir: Path) -> Path:
    ref = Path(workdir) / "base_weights.txt"
    if not ref.exists():
        raise MissingFileError(f"{workdir} has no trained model to warm-start from")
    return Path(ref.read_text().strip())


def factory(cfg: DictConfig, ctx: DistContext) -> DiffusionLoopModel:
    """``loop.model=diffusion``."""
    return DiffusionLoopModel(cfg, ctx)
