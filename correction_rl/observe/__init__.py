"""What a run shows: metric sinks (console, JSONL, W&B), live progress, correction diffs and the report."""
