"""Prompt rendering and the character spans that later become token groups.

A rendered prompt for LLaVA-1.5 looks like::

    <system prompt> USER: <image>\\n<instruction> ASSISTANT:
    |---- system ----------|image|--- prompt ---|- tail -|

The renderer returns the text plus the character span of the instruction, from which
:mod:`cleansight_analysis.inputs.groups` labels every token. Nothing here knows token positions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import jinja2

from ..errors import InputError

#: The system prompt LLaVA-1.5 was trained with (the ``llava_v1`` conversation).
LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

#: Jinja chat template in the LLaVA-1.5 style: ``{system} USER: <image>\n{text} ASSISTANT:``.
#: Used for the embedded tiny models and for processors that ship without a template.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] + ' ' }}{%- endfor -%}"
    "{%- else -%}"
    "{{ message['role'] | upper }}{{ ': ' }}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] + ' ' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def apply_chat_template(processor: Any, messages: list[dict[str, Any]], template: str, *,
                        add_generation_prompt: bool) -> str:
    """Render ``messages`` with the Jinja chat ``template`` (transformers' sandboxed environment), as text.

    A template that is broken or tries to escape the sandboxed Jinja environment (e.g.
    ``{{ ''.__class__.__mro__ }}``) raises :class:`~cleansight_analysis.errors.InputError` naming the
    problem instead of jinja2's own exception; nothing outside the sandbox runs either way.
    """
    try:
        text = processor.apply_chat_template(messages, chat_template=template,
                                             add_generation_prompt=add_generation_prompt, tokenize=False)
    except jinja2.exceptions.SecurityError as exc:
        raise InputError(f"the chat template was refused by the Jinja sandbox (it tries to reach Python "
                         f"internals): {exc}") from None
    except jinja2.exceptions.TemplateError as exc:
        raise InputError(f"the chat template cannot be rendered: {type(exc).__name__}: {exc}") from None
    if isinstance(text, list):  # some versions return one string per conversation
        text = text[0]
    if not isinstance(text, str):
        raise InputError(f"the chat template rendered {type(text).__name__}, not text")
    return text


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as the model will read it (before image-token expansion).

    Attributes:
        text: full text with one image placeholder per image.
        instruction_span: ``(start, end)`` character span of the user's instruction in ``text``.
            Tokens starting at or after ``end`` form the ``template_tail`` group.
    """

    text: str
    instruction_span: tuple[int, int]


def render_prompt(
    processor: Any,
    prompt: str,
    n_images: int,
    *,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> RenderedPrompt:
    """Render one user prompt with ``n_images`` image placeholders.

    Args:
        processor: the model's HF processor (``image_token`` and ``apply_chat_template`` are used).
        prompt: the user's instruction. It may contain the processor's image placeholder
            (e.g. ``"<image>"``) to place images itself; otherwise images go before the text.
        n_images: number of images this sample carries.
        chat_template: wrap the prompt in the processor's chat template (LLaVA-1.5 style when the
            processor has none). ``False`` uses ``prompt`` verbatim; it must then contain exactly
            ``n_images`` placeholders.
        system_prompt: system message placed before the user turn, or ``None`` for none.
    """
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError("prompt is empty; the prompt group (the attention-stealing denominator) needs text")
    image_token = getattr(processor, "image_token", "<image>")
    n_placeholders = prompt.count(image_token)
    if not chat_template:
        if n_placeholders != n_images:
            raise InputError(
                f"prompt {prompt[:60]!r} has {n_placeholders} {image_token!r} placeholder(s) but the sample has "
                f"{n_images} image(s); with chat_template=False the prompt must place every image itself"
            )
        start = prompt.index(image_token) if n_placeholders else 0
        return RenderedPrompt(prompt, (start, len(prompt)))
    if n_placeholders not in (0, n_images):
        raise InputError(
            f"prompt {prompt[:60]!r} has {n_placeholders} {image_token!r} placeholder(s) but the sample has "
            f"{n_images} image(s); use one placeholder per image or none (images then go first)"
        )
    content: list[dict[str, str]] = []
    if n_placeholders == 0:
        content += [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": prompt})
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    template = getattr(processor, "chat_template", None) or LLAVA_CHAT_TEMPLATE
    text = apply_chat_template(processor, messages, template, add_generation_prompt=True)
    if text.count(image_token) != n_images:
        raise InputError(
            f"the chat template produced {text.count(image_token)} image placeholder(s) for {n_images} image(s)"
        )
    if system_prompt and system_prompt not in text:
        warnings.warn("the processor's chat template ignores the system message; no system prompt is used",
                      stacklevel=3)
    # The instruction follows the last image placeholder unless it carries the placeholders itself.
    search_from = 0 if n_placeholders else text.rindex(image_token) + len(image_token) if n_images else 0
    start = text.find(prompt, search_from)
    if start < 0:
        # The template rewrote the instruction (e.g. stripped it): no tail can be told apart.
        first_img = text.index(image_token) if n_images else 0
        return RenderedPrompt(text, (first_img, len(text)))
    return RenderedPrompt(text, (start, start + len(prompt)))
