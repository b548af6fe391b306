"""The replay buffer (staleness-bounded sampling) and the durable correction log it is rebuilt from."""
