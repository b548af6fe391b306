"""The one rendering of a prompt into the token ids a policy sees, and the ids it stops on.

Why one function for everyone: a chat model answers what its chat template makes of the
conversation. If the HF rollout, the vLLM rollout, evaluation and the pi_ref scorer each built
the prompt their own way, the policy would be trained on one rendering and sampled on another
(a missing ``<|im_start|>assistant\\n`` is enough to turn a chat model into a text completer).
So every engine asks a ``PromptRenderer`` for ``ids(prompt)`` and hands the *ids* (never text)
to its model: HF and vLLM see exactly the same prompt tokens by construction.

``model.chat_template`` (docs/models.md):

* ``auto``: the tokenizer's own template when it has one, else the plain text (the project's
  character models have none, so they keep the behaviour they always had);
* ``none``: the plain text, tokenized with the tokenizer's special tokens (its BOS), as before
  chat templates existed; a prompt holding a multi-turn conversation is then an error;
* a path: a Jinja chat template file (the same language as ``tokenizer.chat_template``).

A template renders ``conversation(prompt)`` (the prompt's ``messages``, or one user turn of its
text, with ``model.system_prompt`` first when the conversation has no system turn of its own)
with ``add_generation_prompt=True`` to text, and the text is tokenized WITHOUT adding special
tokens (the template writes them, BOS included when it wants one), exactly as
``apply_chat_template(..., tokenize=True)`` does.

Stop ids (``declared_stop_ids``): the tokenizer's eos first, then every id of the generation
config's ``eos_token_id`` (an int or a list: end of turn and end of text), so a ChatML model
stops on ``<|im_end|>`` and on ``<|endoftext|>`` in both engines. The first one is the stop a
correction of a length-cut response ends with (``pairs/make.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

from correction_rl.errors import UserError
from correction_rl.types import Prompt

TEMPLATE_FIELD = "model.chat_template"
SYSTEM_FIELD = "model.system_prompt"


class RenderError(UserError, ValueError):
    """A chat template or a conversation that cannot be rendered; names the field or prompt."""


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation as the records carry it: a non-empty list of ``{"role", "content"}``
    strings ending with a ``user`` turn. ``where`` prefixes every error."""
    if not isinstance(value, list) or not value:
        raise RenderError(f"{where}: messages must be a non-empty list of {{role, content}} objects, got {value!r:.60}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise RenderError(f"{where}: message {i} must be an object with only 'role' and 'content', got {message!r:.60}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise RenderError(f"{where}: message {i} needs a non-empty string 'role' and a string 'content', got {message!r:.60}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise RenderError(f"{where}: messages must end with a 'user' turn (the prompt), ends with {out[-1]['role']!r}")
    return out


def conversation(prompt: Prompt, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The turns a chat template renders for ``prompt``: its messages (or one user turn of its
    text), with ``system_prompt`` first unless the conversation brings its own system turn."""
    turns = [dict(m) for m in prompt.messages] if prompt.messages else [{"role": "user", "content": prompt.text}]
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def conversation_text(prompt: Prompt) -> str:
    """The prompt as a teacher reads it (the ``{prompt}`` of a correction template): its text
    for a single user turn; for a conversation, every turn as ``role: content``, blank-line
    separated. Never a rendered template string: the teacher has its own template."""
    if not prompt.messages or (len(prompt.messages) == 1 and prompt.messages[0]["role"] == "user"):
        return prompt.messages[0]["content"] if prompt.messages else prompt.text
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt.messages)


def declared_stop_ids(tokenizer: Any, generation_eos: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """The tokenizer's eos, then the generation config's ``eos_token_id`` entries, deduplicated."""
    ids: list[int] = []
    extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    for i in [tokenizer.eos_token_id, *extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise RenderError("the model declares no stop token (no tokenizer eos, no generation_config eos_token_id)")
    return tuple(ids)


def generation_eos_of(model_dir: str | Path) -> int | list[int] | None:
    """``eos_token_id`` of a saved model's ``generation_config.json`` (None when it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:  # no generation_config.json: the model config's eos is the tokenizer's
        return None


def read_template(spec: str, tokenizer: Any) -> str | None:
    """The Jinja template ``model.chat_template`` names (None: plain text)."""
    if spec == "none":
        return None
    if spec == "auto":
        own = getattr(tokenizer, "chat_template", None)  # HF tokenizers may lack the attribute
        if isinstance(own, dict):  # named templates: the default one renders conversations
            own = own.get("default")
        return own or None
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise RenderError(f"{TEMPLATE_FIELD}: {spec!r} is neither auto, none nor a template file") from None
    except UnicodeDecodeError as exc:
        raise RenderError(f"{TEMPLATE_FIELD}: {spec} is not UTF-8 text ({exc})") from None
    if not text.strip():
        raise RenderError(f"{TEMPLATE_FIELD}: {spec} is empty")
    return text


@dataclass(frozen=True)
class PromptRenderer:
    """Prompt -> the ids a policy sees; the stop ids it ends on. Built once per engine."""

    tokenizer: Any
    template: str | None
    """The Jinja chat template, or None for plain text."""
    system_prompt: str | None
    stop_ids: tuple[int, ...]
    """Every id the policy stops on; ``stop_ids[0]`` is the tokenizer's eos."""

    @classmethod
    def build(cls, tokenizer: Any, chat_template: str = "auto", system_prompt: str | None = None,
              generation_eos: int | Sequence[int] | None = None) -> "PromptRenderer":
        """The renderer of a config (``model.chat_template``, ``model.system_prompt``) for one
        tokenizer; a system prompt without a template to put it in is an error, not ignored."""
        template = read_template(chat_template, tokenizer)
        if system_prompt and template is None:
            raise RenderError(
                f"{SYSTEM_FIELD} is set but {TEMPLATE_FIELD}={chat_template!r} gives no chat template "
                "(the tokenizer has none): a system prompt needs a template to render it"
            )
        renderer = cls(tokenizer, template, system_prompt or None, declared_stop_ids(tokenizer, generation_eos))
        if template is not None:  # a broken template fails here, naming the field, not in a worker
            try:
                renderer.text(Prompt(prompt_id="check", text="hi"))
            except RenderError:
                raise
            except Exception as exc:  # jinja2 TemplateError and friends
                raise RenderError(f"{TEMPLATE_FIELD}: the template does not render ({type(exc).__name__}: {exc})") from None
        return renderer

    @property
    def eos_id(self) -> int:
        return self.stop_ids[0]

    def text(self, prompt: Prompt) -> str:
        """The rendered prompt text (a chat template's output, or the plain text)."""
        if self.template is None:
            if prompt.messages and (len(prompt.messages) > 1 or prompt.messages[0]["role"] != "user"):
                raise RenderError(
                    f"prompt {prompt.prompt_id!r} is a conversation of {len(prompt.messages)} turns but there is "
                    f"no chat template ({TEMPLATE_FIELD}: none, or the tokenizer has none) to render it"
                )
            return prompt.text
        return self.tokenizer.apply_chat_template(
            conversation(prompt, self.system_prompt), chat_template=self.template,
            add_generation_prompt=True, tokenize=False,
        )

    def ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, as every engine, scorer and evaluation feeds them."""
        text = self.text(prompt)
        encoded = self.tokenizer(text, add_special_tokens=self.template is None)
        return [int(i) for i in encoded["input_ids"]]

    def batch(self, prompts: Iterable[Prompt]) -> list[list[int]]:
        return [self.ids(p) for p in prompts]


@runtime_checkable
class RendersPrompts(Protocol):
    """An engine that renders with a ``PromptRenderer`` (both rollout engines do); evaluation
    scores prompts with the engine's own renderer."""

    renderer: PromptRenderer
