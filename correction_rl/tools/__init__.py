"""Commands around training: the supervised warm start of an imperfect policy and the README's demo."""
