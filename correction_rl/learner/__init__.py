"""The learner: the correction objectives (pure maths), log-prob kernels, the shared-prefix forward, collation, and the torch / DeepSpeed step."""
