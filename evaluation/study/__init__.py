"""The calibration study: MAP, temperature scaling and Laplace posteriors, evaluated end to end.

``python -m evaluation study --dataset digits --model mlp --seeds 3 --out reports/digits`` trains
(or loads) a MAP network per seed, fits every method, evaluates it in distribution, along the
rotation shift and on OOD sets, and writes ``results.json``, ``report.md`` and figures
atomically. One concept per module:

- :mod:`~evaluation.study.config`: the :class:`StudyConfig` and its validation (before any work);
- :mod:`~evaluation.study.data`: splits and OOD sets per seed, local-file look-up;
- :mod:`~evaluation.study.checkpoints`: MAP training and the checkpoint cache;
- :mod:`~evaluation.study.methods`: the method registry (name → fitted predictor);
- :mod:`~evaluation.study.evaluate`: in-distribution, shift and OOD metrics;
- :mod:`~evaluation.study.fidelity`: per-layer Fisher fidelity of the seed-0 model;
- :mod:`~evaluation.study.sweep` / :mod:`~evaluation.study.sweep_report`: diag, K-FAC and K-FOC
  at matched priors (seed 0), its report section and figure;
- :mod:`~evaluation.study.tables` / :mod:`~evaluation.study.report`: ``report.md`` and
  ``results.json``; :mod:`~evaluation.study.outdir`: atomic output directories;
- :mod:`~evaluation.study.figures`: the PNG figures;
- :mod:`~evaluation.study.runner`: the orchestration.

Imports are lazy so that :mod:`evaluation.study.laplace_torch` loads without the rest.
"""
