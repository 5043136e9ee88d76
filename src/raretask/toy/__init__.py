"""The solvable toy of PAPER.md Sec. 2: a linear multitask model trained in batches of instances.

* :mod:`raretask.toy.spec`: typed inputs (:class:`Schedule`, :class:`ToyInstance`,
  :class:`TrainSettings`).
* :mod:`raretask.toy.model`: the model's maths as pure batched tensor functions (hand-written
  gradients, exact metrics, init and retraction).
* :mod:`raretask.toy.trainer`: :class:`ToyTrainer`, the loop (Adam + retraction, RNG streams,
  schedules, metrics, traces, bit-exact checkpoints). Its docstring lists the design choices.
"""

from raretask.toy.spec import Schedule, ToyInstance, TrainSettings
from raretask.toy.trainer import MODEL_COLUMNS, TASK_COLUMNS, ToyTrainer

__all__ = [
    "MODEL_COLUMNS",
    "TASK_COLUMNS",
    "Schedule",
    "ToyInstance",
    "ToyTrainer",
    "TrainSettings",
]
