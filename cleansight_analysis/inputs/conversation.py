"""Conversations: ``[(prompt, answer), ...]`` rendered with the model's chat template, with answer labels.

The text is rendered exactly as :meth:`HookedLVLM.prepare` renders a prompt, so the first turn of a
training sequence is token for token what the model sees at test time. Answer tokens (and an EOS
after each answer) carry labels; everything else is ``-100``.

An input-layer piece: training encodes its sequences with it and the logit lens finds the first
answer token with it (:func:`cleansight_analysis.interventions.logit_lens.first_answer_token`).

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import InputError
from .templates import LLAVA_CHAT_TEMPLATE, apply_chat_template

IGNORE = -100


@dataclass
class Encoded:
    """One encoded training sequence (image tokens expanded).

    Attributes:
        input_ids: ``[T]``; labels: ``[T]`` (``-100`` outside answers); answer_spans: ``(start, end)``
        token ranges of each answer (EOS included) in ``input_ids``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer_spans: list[tuple[int, int]]


class ConversationEncoder:
    """Encode ``[(prompt, answer), ...]`` conversations about one image for a given processor.

    Args:
        processor: the model's HF processor (tokenizer + chat template).
        image_token_id: the model's image token id.
        system_prompt: system message (as in :meth:`HookedLVLM.prepare`), or ``None``.
        add_eos: append the tokenizer's EOS after every answer (and train on it).
    """

    def __init__(self, processor: Any, image_token_id: int, system_prompt: str | None, *, add_eos: bool = True):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = int(image_token_id)
        self.system_prompt = system_prompt
        self.add_eos = add_eos
        self.template = getattr(processor, "chat_template", None) or LLAVA_CHAT_TEMPLATE
        if add_eos and self.tokenizer.eos_token_id is None:
            raise InputError("the tokenizer has no EOS token; pass add_eos=False")

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return apply_chat_template(self.processor, messages, self.template, add_generation_prompt=generation_prompt)

    def render(self, conversation: Sequence[tuple[str, str]], n_images: int = 1) -> tuple[str, list[tuple[int, int]]]:
        """Full text and the character span of every answer."""
        if not conversation:
            raise InputError("empty conversation")
        messages: list[dict] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        spans = []
        text = ""
        for turn, (prompt, answer) in enumerate(conversation):
            content = [{"type": "image"} for _ in range(n_images if turn == 0 else 0)]
            messages.append({"role": "user", "content": content + [{"type": "text", "text": prompt}]})
            prefix = self._render(messages, True)
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            text = self._render(messages, False)
            start = text.find(answer, len(prefix))
            if not answer.strip() or start < 0 or not text.startswith(prefix):
                raise InputError(f"cannot place answer {answer!r} after its prompt with this chat template")
            spans.append((start, start + len(answer)))
        return text, spans

    def encode(self, conversation: Sequence[tuple[str, str]], image_tokens: Sequence[int]) -> Encoded:
        """Encode a conversation whose first turn carries ``len(image_tokens)`` images of the given token counts."""
        text, spans = self.render(conversation, len(image_tokens))
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        out_ids: list[int] = []
        out_labels: list[int] = []
        answer_spans: list[tuple[int, int]] = []
        images = iter(image_tokens)
        span_iter = iter(spans)
        current = next(span_iter, None)
        span_start = None
        for i, (tok, (s, e)) in enumerate(zip(ids, offsets)):
            if tok == self.image_token_id:
                out_ids += [tok] * next(images)
                out_labels += [IGNORE] * (len(out_ids) - len(out_labels))
                continue
            inside = current is not None and s >= current[0] and e <= current[1] and e > s
            if inside and span_start is None:
                span_start = len(out_ids)
            out_ids.append(tok)
            out_labels.append(tok if inside else IGNORE)
            nxt_inside = False
            if current is not None and i + 1 < len(ids):
                ns, ne = offsets[i + 1]
                nxt_inside = ns >= current[0] and ne <= current[1] and ne > ns
            if inside and not nxt_inside:  # the answer ends here
                if self.add_eos:
                    out_ids.append(self.tokenizer.eos_token_id)
                    out_labels.append(self.tokenizer.eos_token_id)
                answer_spans.append((span_start, len(out_ids)))
                span_start = None
                current = next(span_iter, None)
        if len(answer_spans) != len(spans):
            raise InputError(f"found {len(answer_spans)} of {len(spans)} answers in the tokenised conversation")
        return Encoded(torch.tensor(out_ids), torch.tensor(out_labels), answer_spans)


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of sequences: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T_max]``."""
    t = max(int(e.input_ids.numel()) for e in encoded)
    ids = torch.full((len(encoded), t), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), t), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = e.input_ids.numel()
        ids[i, :n], labels[i, :n], mask[i, :n] = e.input_ids, e.labels, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
