"""Language-model side of the study (PAPER.md Sec. 3): an OLMo-2-style decoder and rare tasks.

* :mod:`raretask.lm.model`: :class:`ModelConfig` (presets ``tiny``, ``4m`` .. ``4b``, parameter
  and FLOP counts) and the :class:`Transformer` it builds.
* :mod:`raretask.lm.tasks`: :class:`RareTask` (T_CMP, T_ADD: 10K instances, train/test split,
  accuracy), :func:`inject` into a token batch, :class:`Frequency` and :class:`InjectionSchedule`.
"""

_MODEL = ("PRESETS", "ModelConfig", "Transformer")
_TASKS = ("INSTANCE_LEN", "LABEL_POSITION", "Frequency", "InjectionSchedule", "RareTask", "inject")


def __getattr__(name: str):
    """The names below load on first use, so that importing a torch-free submodule
    (``raretask.lm.verdict``: what "learned" means, which `raretask calibrate` and `plan` read)
    does not load torch (~1.5 s) for every command."""
    if name in _MODEL:
        from raretask.lm import model

        return getattr(model, name)
    if name in _TASKS:
        from raretask.lm import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'raretask.lm' has no attribute {name!r}")


__all__ = [
    "INSTANCE_LEN",
    "LABEL_POSITION",
    "PRESETS",
    "Frequency",
    "InjectionSchedule",
    "ModelConfig",
    "RareTask",
    "Transformer",
    "inject",
]
