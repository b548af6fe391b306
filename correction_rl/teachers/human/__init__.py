"""Human teachers: people correct rollouts in a browser (docs/human-teachers.md).

``queue.py`` is the durable SQLite correction queue with leases, ``app.py`` the web app that
serves it to annotators, ``teacher.py`` the ``Teacher`` that feeds a training run from it, and
``offline.py`` the JSONL export/import for annotation tools people already use.
"""
