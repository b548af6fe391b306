"""Hugging Face ``generate`` as a rollout engine.

Why keep it next to vLLM: on the project's CPU machines (AVX2, 2 cores) batched HF generate is
the faster engine for the tiny models (docs/rollout.md has the numbers), it runs in the
learner's own process without spawning workers, and it is the reference the vLLM engine is
checked against.

Engine log-probs: ``Rollout.logprobs[t]`` is the log-probability of the sampled token under the
distribution generate actually sampled from, i.e. ``log_softmax`` of the *processed* scores
(raw logits divided by the temperature, then top-p truncation). For greedy decoding no
processing happens, so they are the model's raw ``log pi(y_t | x, y_<t)``. vLLM is run with
``logprobs_mode="processed_logprobs"`` so both engines report the same quantity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from correction_rl.prompts.render import PromptRenderer
from correction_rl.rollout.common import cut_at_stop, make_rollout, request_seed, validate_sampling
from correction_rl.rollout import lora_apply
from correction_rl.weights.adapter import is_adapter_update
from correction_rl.weights.sync import check_version, load_into_module, unflatten
from correction_rl.types import Prompt, Rollout, Sampling, WeightUpdate


class HFGenerator:
    """Batched, left-padded ``model.generate`` returning ``Rollout``s."""

    def __init__(
        self,
        model_or_path,
        tokenizer=None,
        policy_version: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        chat_template: str = "auto",
        system_prompt: str | None = None,
        lora=None,
    ):
        from correction_rl.models import load_model, load_tokenizer

        self._owns_model = isinstance(model_or_path, (str, Path))
        self._flat: list[torch.Tensor] = []  # parameter storage once re-homed (load_weights)
        self._flat_signature: tuple | None = None
        self._adopted: WeightUpdate | None = None  # read-only buckets the parameters view
        if self._owns_model:
            self.model = load_model(model_or_path, dtype=dtype)
            tokenizer = tokenizer or load_tokenizer(model_or_path)
        else:
            self.model = model_or_path
        if tokenizer is None:
            raise ValueError("HFGenerator got a model object but no tokenizer")
        if tokenizer.padding_side != "left":
            raise ValueError(
                f"HFGenerator needs a left-padding tokenizer (got padding_side="
                f"{tokenizer.padding_side!r}): right padding would put pad tokens between the "
                f"prompt and the response"
            )
        self.tokenizer = tokenizer
        self.renderer = PromptRenderer.build(  # the one rendering every engine uses (prompts/render.py)
            tokenizer, chat_template, system_prompt, self.model.generation_config.eos_token_id)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        if lora is not None:  # learner.lora: adapter-only syncs land in the same peft layers
            self.model = lora_apply.attach(self.model, lora)
        self.policy_version = policy_version

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        validate_sampling(sampling)
        if not prompts:
            return []
        enc = self.tokenizer.pad(
            {"input_ids": self.renderer.batch(prompts)}, padding=True, return_tensors="pt"
        ).to(self.device)
        stops, pad = list(self.renderer.stop_ids), self.tokenizer.pad_token_id
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=0,
            eos_token_id=stops,
            pad_token_id=pad,
            output_scores=True,
            return_dict_in_generate=True,
        )
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            seed = request_seed(sampling.seed, 0)
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**enc, **kwargs)
        width = enc["input_ids"].shape[1]
        new_tokens = out.sequences[:, width:]
        # [batch, steps]: log-prob of each sampled token under the processed distribution
        scores = torch.stack(out.scores, dim=1).float()
        logps = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)

        rollouts = []
        for i, prompt in enumerate(prompts):
            mask = enc["attention_mask"][i].bool()
            prompt_ids = enc["input_ids"][i][mask].tolist()
            response_ids, finish, stop_id = cut_at_stop(new_tokens[i].tolist(), stops)
            rollouts.append(
                make_rollout(
                    prompt, prompt_ids, response_ids, finish, logps[i].tolist(),
                    self.tokenizer, self.policy_version, stop_id,
                )
            )
        return rollouts

    def load_weights(self, update: WeightUpdate) -> None:
        """Copy the buckets into the model and adopt ``update.version``; older versions are
        refused.

        When the generator owns its model (built from a path), the first update re-homes the
        parameters as views into flat buffers laid out like the update's buckets, so every
        later update with the same layout is one ``copy_`` per bucket, as fast as a raw memory
        copy. A model object handed in by the caller is only ever copied into parameter by
        parameter (its storage may be shared with an optimizer or a learner)."""
        check_version(self.policy_version, update.version, "HFGenerator")
        if is_adapter_update(update):  # LoRA: only the adapter moves (rollout/lora_apply.py)
            lora_apply.apply_adapter(self.model, update)
            self.policy_version = update.version
            return
        signature = _signature(update)
        if self._adopted is not None:  # parameters view read-only memory: own them again first
            self._rehome(self._adopted)
            self._flat_signature, self._adopted = _signature(self._adopted), None
        with torch.no_grad():
            if self._owns_model and signature == self._flat_signature:
                for dst, src in zip(self._flat, update.buckets):
                    dst.copy_(src)
            else:
                load_into_module(self.model, update)  # validates names, shapes, coverage
                if self._owns_model:
                    self._rehome(update)
                    self._flat_signature = signature
        self.policy_version = update.version

    def adopt_weights(self, update: WeightUpdate) -> None:
        """Zero-copy load: the parameters become views into ``update``'s buckets, which this
        generator then keeps alive until the next update.

        For buckets nobody will write again — the read-only shared memory that Ray's object
        store maps into a rollout worker (``correction_rl.distributed.weights``) — this makes
        loading free: the only copy of a sync is the publisher's. Generation never writes the
        parameters. Falls back to ``load_weights`` (a copy) when the generator does not own its
        model or the buckets' device differs.
        """
        if not self._owns_model or is_adapter_update(update) or any(b.device != self.device for b in update.buckets):
            self.load_weights(update)
            return
        check_version(self.policy_version, update.version, "HFGenerator")
        params = dict(self.model.named_parameters())
        covered = set()
        views = []
        for name, view in unflatten(update):  # validates the layout against the buckets
            param = params.get(name)
            if param is None or tuple(param.shape) != tuple(view.shape) or param.dtype != view.dtype:
                self.load_weights(update)  # a naming/shape/dtype mismatch: the copying path explains it
                return
            views.append((param, view))
            covered.add(name)
        if covered != set(params):
            self.load_weights(update)
            return
        for param, view in views:
            param.data = view
        self._adopted, self._flat, self._flat_signature = update, [], None
        self.policy_version = update.version

    def _rehome(self, update: WeightUpdate) -> None:
        params = dict(self.model.named_parameters())
        self._flat = [torch.empty(b.numel(), dtype=b.dtype, device=self.device) for b in update.buckets]
        for name, b, offset, shape, _ in update.layout:
            view = self._flat[b][offset : offset + params[name].numel()].view(shape)
            view.copy_(params[name].data)
            params[name].data = view

    def close(self) -> None:
        """Nothing to release; present so callers can treat every engine alike."""


def _signature(update: WeightUpdate) -> tuple:
    """Layout identity: same names, offsets, shapes and bucket sizes/dtypes."""
    return tuple(update.layout), tuple((b.numel(), b.dtype) for b in update.buckets)
