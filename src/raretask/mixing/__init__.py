"""The fix (DESIGN.md, "Fix"): analyse a dataset's task frequencies, calibrate the frequency a task
needs at a model size, plan a rebalanced mixture, export it, sample it evenly, and prove it works.

One job per module:

* :mod:`~raretask.mixing.readers`: stream rows from JSONL, CSV, Parquet and HF ``save_to_disk``
  directories (pyarrow), with the file and line of every malformed row.
* :mod:`~raretask.mixing.rules`: a YAML of regex/keyword rules that tags untagged text.
* :mod:`~raretask.mixing.analyze`: counts, shares and tokens per task, rank-frequency power law.
* :mod:`~raretask.mixing.thresholds`: the share a task needs at a size (theory or calibration).
* :mod:`~raretask.mixing.calibrate`: fit that share against model size from a finished grid.
* :mod:`~raretask.mixing.plan`: minimum-KL weights under thresholds and repetition caps.
* :mod:`~raretask.mixing.export`: weights for the loaders people use.
* :mod:`~raretask.mixing.sampler`: deterministic, resumable, evenly spread sampling of a plan.
* :mod:`~raretask.mixing.fix`: train the toy under the natural mix, the plan and a bigger model.
"""
