"""Chat templates: the model's own Jinja template from its GGUF metadata.

Rendering follows Hugging Face's conventions (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception``) in a sandbox, which is what
llama.cpp's server and llama-cpp-python do with the same metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgespec.errors import UserError

Message = dict[str, str]


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(
            raise_exception=_raise,
            strftime_now=lambda fmt: datetime.now().strftime(fmt),
        )
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise UserError(f"the model's chat template does not compile: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``, ending where the assistant's reply begins."""
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise UserError(f"the model's chat template rejected the conversation: {e}") from None


def turns_to_messages(turns: Sequence[str], answers: Sequence[str]) -> list[Message]:
    """Interleave user turns with the assistant answers given so far (benchmarks, demos)."""
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages
