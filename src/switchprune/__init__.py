"""switchprune: learn which neurons a network needs with a switcher network, ship the rest."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(uri: Any, *, tracking_uri: str | None = None, raw: bool = True) -> Any:
    """Load a compacted model (see :func:`switchprune.loading.load_model`).

    By default it takes raw ``uint8`` ``N×C×H×W`` pixels and normalises them itself, as every
    shipped form of the model does; ``raw=False`` gives the bare task network (normalised
    float32 inputs), for fine-tuning.
    """
    from switchprune.loading import load_model as _load

    return _load(uri, tracking_uri=tracking_uri, raw=raw)


__all__ = ["__version__", "load_model"]
