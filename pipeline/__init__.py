"""Orchestration around the library.

``local.py`` is ``make run`` (DVC on one machine); ``pipeline.py``, ``compile.py`` and
``submit.py`` are the Kubeflow pipeline.
"""
