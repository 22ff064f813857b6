"""Chat templates: messages -> prompt text (the BOS token is added by the tokenizer side).

Gemma-3 (``family: gemma3``)::

    <start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n{assistant}<end_of_turn>\\n
    ... <start_of_turn>model\\n

Gemma has no system role: a system message is prepended to the first user turn,
as the official template does. Llama-3 (``family: llama``)::

    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ... <|start_header_id|>assistant<|end_header_id|>\\n\\n
"""

from __future__ import annotations

from collections.abc import Sequence


class TemplateError(ValueError):
    """The messages cannot be rendered (no user turn, bad role order ...)."""


def _gemma3(messages: Sequence[tuple[str, str]]) -> str:
    system = ""
    out: list[str] = []
    for role, content in messages:
        if role in ("system", "developer"):
            system += content + "\n\n"
            continue
        turn = "model" if role == "assistant" else "user"
        if turn == "user" and system:
            content, system = system + content, ""
        out.append(f"<start_of_turn>{turn}\n{content.strip()}<end_of_turn>\n")
    if system:  # only a system message: send it as the user turn
        out.append(f"<start_of_turn>user\n{system.strip()}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


def _llama3(messages: Sequence[tuple[str, str]]) -> str:
    out = []
    for role, content in messages:
        r = "system" if role == "developer" else role
        out.append(f"<|start_header_id|>{r}<|end_header_id|>\n\n{content.strip()}<|eot_id|>")
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


TEMPLATES = {"gemma3": _gemma3, "llama": _llama3}


def render(messages: Sequence[tuple[str, str]], family: str) -> str:
    """Prompt text for ``(role, content)`` messages in the model family's turn format."""
    if not messages:
        raise TemplateError("messages must contain at least one message")
    fn = TEMPLATES.get(family, _gemma3)
    return fn(messages)
