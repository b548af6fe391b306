"""Weight buckets and the transports that move a learner version to the rollout engines (no Ray here: the object-store transport lives in distributed/)."""
