"""The steps of SIMS Algorithm 1 as small shared functions (layer 7 of DESIGN.md).

- :func:`~sims.stages.base.train_base`: the base model (EDM training, or adopted with ``sims.base``);
- :func:`~sims.stages.synthetic.make_synthetic`: n_s samples of a model into a resumable store;
- :func:`~sims.stages.aux.finetune_aux`: the auxiliary model, fine-tuned from the base;
- :func:`~sims.stages.evaluate.evaluate_denoiser`: sample → features → FD / precision-recall;
- :func:`~sims.stages.sims.run_sims`: steps 2–4 with the selection/report protocol;
- :func:`~sims.stages.pipeline.run_training`: what ``sims-train`` runs without a loop.

``sims-train``, the loop's diffusion model, the FD callback and ``sims-fid`` all use these.
"""
