"""Repository-level evaluation code for bayes-kfoc (metrics, benchmarks).

This package is not installed with ``bayes_kfoc``; import it from the repository root
(``import evaluation``).
"""
