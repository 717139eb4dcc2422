"""One function per pipeline stage: ``stages.<verb>.run(cfg, *, <paths>) -> metrics``."""

STAGES = ("preprocess", "train", "prune", "evaluate")

__all__ = ["STAGES"]
