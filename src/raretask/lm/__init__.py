"""Language-model side of the study (PAPER.md Sec. 3): an OLMo-2-style decoder and rare tasks.

* :mod:`raretask.lm.model`: :class:`ModelConfig` (presets ``tiny``, ``4m`` .. ``4b``, parameter
  and FLOP counts) and the :class:`Transformer` it builds.
* :mod:`raretask.lm.tasks`: :class:`RareTask` (T_CMP, T_ADD: 10K instances, train/test split,
  accuracy), :func:`inject` into a token batch, :class:`Frequency` and :class:`InjectionSchedule`.
"""

from raretask.lm.model import PRESETS, ModelConfig, Transformer
from raretask.lm.tasks import (
    INSTANCE_LEN,
    LABEL_POSITION,
    Frequency,
    InjectionSchedule,
    RareTask,
    inject,
)

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
