"""Sweeps: many normal runs from one spec, their results in one file, one comparison table.

An experiment here is a base run config, arms (named bundles of dotted overrides) and/or a grid
over dotted fields, crossed with seeds (docs/sweeps.md). This package is the pure-python half:

* ``spec.py``     the sweep spec (YAML), validated up front; ``SpecError`` names field and arm
* ``trials.py``   spec -> ``Trial`` records with stable ids; each trial's config validated with
                  ``config.load_config`` before anything runs
* ``results.py``  ``SWEEP_DIR/results.jsonl``: one atomically appended row per finished trial
* ``collect.py``  what a finished run directory says (eval before/after, eval history, teacher calls)
* ``execute.py``  one trial as a ``correction-rl train`` subprocess, with a timeout
* ``plan.py``     the sweep directory: which trials still have to run (resume, retry)
* ``stats.py``    mean ± std per arm, gain, matched-gain KL, seed-noise marks
* ``report.py``   ``correction-rl report SWEEP_DIR``: the markdown table and PNG plots
* ``command.py``  ``correction-rl sweep``: parses, validates, then hands the trials to the Ray
                  runner (``distributed/sweep_runner.py``, the only part that imports Ray)
"""
