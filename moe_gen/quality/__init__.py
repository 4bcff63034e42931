"""Learning-quality benchmark: does the tag-routed generalist do what specialists and classical
models do on held-out rows, and does tag routing help?

    from moe_gen.quality import SUITE, run_benchmark
    report = run_benchmark(BenchConfig(seeds=(0, 1, 2)))   # scripts/bench_quality.py is the entry point

``suite`` declares the tasks (built-in presets plus numeric tables from scikit-learn, declared
through the public ``Task`` API as a user would), ``baselines`` the classical models on raw
features, ``runner`` trains specialists and generalists and scores them, ``report`` writes the
Markdown table, JSON and plot, ``compare`` sets two runs side by side, paired by seed.
"""

from moe_gen.quality.runner import BenchConfig, run_benchmark
from moe_gen.quality.suite import SUITE, SuiteTask, suite_tasks

__all__ = ["BenchConfig", "run_benchmark", "SUITE", "SuiteTask", "suite_tasks"]
