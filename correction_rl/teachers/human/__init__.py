"""Human teachers: people correct rollouts in a browser (docs/human-teachers.md).

``queue.py`` is the durable SQLite correction queue with leases, ``app.py`` the web app that
serves it to annotators, ``host.py`` the lock that makes exactly one process serve it when
several share the queue (the Ray modes' teacher workers), ``teacher.py`` the ``Teacher`` that
feeds a training run from it, and ``offline.py`` the JSONL export/import for annotation tools
people already use.
"""
