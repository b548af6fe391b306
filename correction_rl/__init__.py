"""correction_rl: align language models by minimizing how much a teacher must correct them.

Core modules are plain Python and import only torch/transformers; Ray lives in
``correction_rl.distributed`` and vLLM, DeepSpeed and W&B are imported lazily where used.
"""

__version__ = "0.1.0"
