"""The Ray actor–learner system: the only package that imports ``ray``.

``driver.run(cfg)`` runs the shared lifecycle (``run/lifecycle.py``) around a ``RaySession``
(``session.py``): it starts or joins Ray, places rollout workers, teacher workers, the buffer
actor and the learner ranks (``cluster.py``; the actor classes are ``actors/``, one file per
actor), and runs the ``async`` or ``sync`` step loop (``driver.py``). The loop's rooms: where a
batch comes from (``sampling.py``), producers and restarted workers (``producers.py``,
``health.py``), weight sync (``weight_sync.py`` over one transport: ``weights.py`` object store
or ``collective.py`` + ``collective_member.py`` weight group), metrics (``telemetry.py``),
checkpoints (``checkpoints.py``); typed records between actors in ``records.py``.
"""
