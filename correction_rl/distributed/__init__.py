"""The Ray actor–learner system: the only package that imports ``ray``.

``driver.run(cfg)`` starts or joins Ray, places rollout workers, teacher workers, the buffer
actor and the learner ranks (``cluster.py``), and runs the ``async`` or ``sync`` loop.
"""
