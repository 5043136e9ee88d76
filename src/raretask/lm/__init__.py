"""Language-model side of the study (PAPER.md Sec. 3): an OLMo-2-style decoder and rare tasks.

* :mod:`raretask.lm.model`: :class:`ModelConfig` (presets ``tiny``, ``4m`` .. ``4b``, parameter
  and FLOP counts) and the :class:`Transformer` it builds.
* :mod:`raretask.lm.tasks`: :class:`RareTask` (T_CMP, T_ADD: 10K instances, train/test split,
  accuracy), :func:`inject` into a token batch, :class:`Frequency` and :class:`InjectionSchedule`.
"""

import importlib

_HOMES = {"PRESETS": "model", "ModelConfig": "model", "Transformer": "model",
          "INSTANCE_LEN": "tasks", "LABEL_POSITION": "tasks", "Frequency": "tasks",
          "InjectionSchedule": "tasks", "RareTask": "tasks", "inject": "tasks"}
"""Where each name below lives. They load on first use, so that importing a torch-free
submodule (``raretask.lm.verdict``: what "learned" means, which `raretask calibrate` and `plan`
read) does not load torch (~1.5 s) for every command."""


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"raretask.lm.{_HOMES[name]}"), name)
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
