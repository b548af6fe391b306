"""Correction prompt templates: what an LLM teacher is asked, and how its answer is read back.

A template turns one rollout (x, y) into a request for a teacher model and names the output
format, so that ``validation.py`` can parse y' out of the answer and reject anything else. Two
templates are built in (docs/teachers.md):

* ``instruct`` — for real instruction-following chat models (a hosted API, Mistral-7B-Instruct
  behind vLLM ...): a system message asks for the response with the FEWEST edits that make it
  correct and good, unchanged when it already is, written between ``<corrected>`` and
  ``</corrected>`` markers. Markers instead of "answer with the corrected text only" because chat
  models like to add a preamble ("Sure! Here is ..."); between markers the preamble is harmless,
  and a missing marker is a clear, countable ``unparseable`` rejection instead of a silently wrong
  y'.
* ``task_answer`` — for the project's own task models, which answer prompts but follow no
  instructions: the request IS the task prompt x, and the teacher's whole answer is y'. The
  correction is then "what a stronger model answers", not a minimal edit of y; it is the
  honest way to use a small model as a teacher.

Templates can be chosen per task or domain (``teacher.templates_by_task``) and extended from a
YAML file (``teacher.template_file``, format in ``load_template_file``).

What ``{prompt}`` is: the conversation the policy answered, as readable text
(``prompts/render.conversation_text``: the user's text for one turn, ``role: content`` turns
for a longer conversation), never the policy's rendered chat template (special tokens of
another model's template would only confuse the teacher, which has its own). A template that
is the prompt alone (``answers_prompt``: ``task_answer``) is rendered by the vLLM teacher with
its OWN chat template over the prompt's conversation, the same ``PromptRenderer`` the policy
uses, so a chat teacher answers x exactly as it would in a chat.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from correction_rl.errors import UserError
from correction_rl.prompts.render import conversation, conversation_text
from correction_rl.types import Rollout

OutputFormat = Literal["markers", "raw"]
Api = Literal["chat", "completions"]


class TemplateError(ValueError, UserError):
    """A template that cannot be used: unknown name, bad file, unknown placeholder."""


@dataclass(frozen=True)
class ParsedOutput:
    """The y' read from a teacher's answer, or why none could be read."""

    text: str | None
    reason: str | None = None
    """``unparseable`` when the output format was not followed; None when ``text`` is set."""


@dataclass(frozen=True)
class CorrectionTemplate:
    """One way to ask a teacher for a correction.

    ``user`` (and ``system``) are ``str.format`` templates with the placeholders ``{prompt}``
    (x), ``{response}`` (y) and ``{task}`` (the prompt's task or domain label).
    """

    name: str
    user: str
    system: str | None = None
    output: OutputFormat = "markers"
    start_marker: str = "<corrected>"
    end_marker: str = "</corrected>"
    api: Api = "chat"
    """The endpoint this template is written for (``teacher.api: auto`` follows it)."""

    def __post_init__(self) -> None:
        for label, text in (("user", self.user), ("system", self.system or "")):
            try:
                text.format(prompt="", response="", task="")
            except (KeyError, IndexError, ValueError) as exc:
                raise TemplateError(
                    f"template {self.name!r}: {label} text has a bad placeholder ({exc!r}); "
                    "allowed: {prompt}, {response}, {task} (write {{ and }} for braces)"
                ) from None
        if self.output == "markers" and not (self.start_marker and self.end_marker):
            raise TemplateError(f"template {self.name!r}: output 'markers' needs start_marker and end_marker")

    @property
    def answers_prompt(self) -> bool:
        """The request is x itself (``task_answer``): the teacher answers the conversation."""
        return self.user == "{prompt}" and not self.system

    def _fields(self, rollout: Rollout) -> dict[str, str]:
        return {
            "prompt": conversation_text(rollout.prompt),
            "response": rollout.response_text,
            "task": rollout.prompt.task or "general",
        }

    def messages(self, rollout: Rollout) -> list[dict[str, str]]:
        """Chat messages for ``/v1/chat/completions`` (or a chat template). A template that is
        the prompt alone (``answers_prompt``) sends the prompt's conversation turn by turn."""
        if self.answers_prompt:
            return conversation(rollout.prompt)
        fields = self._fields(rollout)
        out = []
        if self.system:
            out.append({"role": "system", "content": self.system.format(**fields)})
        out.append({"role": "user", "content": self.user.format(**fields)})
        return out

    def completion_prompt(self, rollout: Rollout) -> str:
        """One plain-text prompt for ``/v1/completions`` (system text, a blank line, user text)."""
        fields = self._fields(rollout)
        user = self.user.format(**fields)
        return f"{self.system.format(**fields)}\n\n{user}" if self.system else user

    def parse(self, output: str) -> ParsedOutput:
        """y' from the teacher's raw answer. With markers: the text between the FIRST start
        marker and the next end marker, one leading and one trailing newline removed (models
        often put the markers on their own lines); without: the answer as it is."""
        if self.output == "raw":
            return ParsedOutput(output)
        start = output.find(self.start_marker)
        if start < 0:
            return ParsedOutput(None, "unparseable")
        body_start = start + len(self.start_marker)
        end = output.find(self.end_marker, body_start)
        if end < 0:
            return ParsedOutput(None, "unparseable")
        body = output[body_start:end]
        body = body[1:] if body.startswith("\n") else body
        body = body[:-1] if body.endswith("\n") else body
        return ParsedOutput(body)


INSTRUCT_SYSTEM = (
    "You correct responses. Return the given response with the FEWEST edits that make it "
    "correct and good. Keep every part that is already right, word for word. If the response "
    "is already correct and good, return it unchanged. Write only the corrected response "
    "between <corrected> and </corrected>, with no explanation inside the markers."
)

INSTRUCT_USER = (
    "Task ({task}):\n{prompt}\n\n"
    "Response to correct:\n<response>\n{response}\n</response>\n\n"
    "Corrected response, between <corrected> and </corrected>:"
)

BUILTIN: dict[str, CorrectionTemplate] = {
    "instruct": CorrectionTemplate(name="instruct", user=INSTRUCT_USER, system=INSTRUCT_SYSTEM),
    "task_answer": CorrectionTemplate(name="task_answer", user="{prompt}", output="raw", api="completions"),
}


def load_template_file(path: str | Path) -> dict[str, CorrectionTemplate]:
    """Templates from a YAML mapping ``name -> {user, system, output, start_marker,
    end_marker, api}`` (only ``user`` is required). Errors name the file and the template."""
    import yaml

    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TemplateError(f"teacher.template_file: {path} not found") from None
    except yaml.YAMLError as exc:
        raise TemplateError(f"teacher.template_file: {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise TemplateError(f"{path}: expected a mapping of template name -> fields")
    allowed = {"user", "system", "output", "start_marker", "end_marker", "api"}
    out: dict[str, CorrectionTemplate] = {}
    for name, spec in tree.items():
        if not isinstance(spec, dict) or "user" not in spec:
            raise TemplateError(f"{path}: template {name!r} must be a mapping with a 'user' text")
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise TemplateError(f"{path}: template {name!r}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        if spec.get("output", "markers") not in ("markers", "raw"):
            raise TemplateError(f"{path}: template {name!r}: output must be 'markers' or 'raw'")
        if spec.get("api", "chat") not in ("chat", "completions"):
            raise TemplateError(f"{path}: template {name!r}: api must be 'chat' or 'completions'")
        out[str(name)] = CorrectionTemplate(name=str(name), **spec)
    return out


class TemplateSet:
    """Picks the template of each rollout: ``by_task[prompt.task]`` or the default."""

    def __init__(
        self,
        default: str = "instruct",
        by_task: Mapping[str, str] | None = None,
        template_file: str | Path | None = None,
    ) -> None:
        self.templates: dict[str, CorrectionTemplate] = dict(BUILTIN)
        if template_file:
            self.templates.update(load_template_file(template_file))
        self.by_task = dict(by_task or {})
        for where, name in [("teacher.template", default)] + [
            (f"teacher.templates_by_task.{task}", n) for task, n in self.by_task.items()
        ]:
            if name not in self.templates:
                raise TemplateError(
                    f"{where}: unknown template {name!r}; available: {sorted(self.templates)}"
                )
        self.default = default

    def for_rollout(self, rollout: Rollout) -> CorrectionTemplate:
        return self.templates[self.by_task.get(rollout.prompt.task, self.default)]

    @classmethod
    def from_config(cls, cfg: Any) -> "TemplateSet":
        """From a ``TeacherConfig``."""
        return cls(cfg.template, cfg.templates_by_task, cfg.template_file)
