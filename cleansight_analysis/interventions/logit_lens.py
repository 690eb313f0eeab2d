"""Logit lens for LVLMs (the paper's Fig. 7): at which layer does the trigger take over the answer?

The residual stream of the answer query (each sample's last prompt position, which predicts the
first answer token) is read after every LM layer at ``blocks.{l}.hook_resid_post`` (on the
TransformerBridge this is the decoder layer's output; it equals ``blocks.{l}.hook_out``) and
decoded with the LM's own final norm and unembedding (:attr:`HookedLVLM.final_norm`,
:attr:`HookedLVLM.unembedding`: the very modules HF calls). At the last layer this reproduces the model's logits exactly.

First-token choice. ``p_correct`` and ``p_target`` are the probabilities of the FIRST token of the
reference answer and of the attack target *as the model would emit it after the prompt*. Tokenising
the answer alone is ambiguous: SentencePiece tokenizers give ``"Yes"`` and ``" Yes"`` (``"▁Yes"``)
different ids, and BOS or merged punctuation can shift the first piece. We therefore render the
full one-turn conversation with the model's chat template (exactly as the training sequences are
built: :class:`~cleansight_analysis.inputs.conversation.ConversationEncoder`), tokenise it, and take
the first token whose character span reaches into the answer (:func:`first_answer_token`). That is
the token the model is trained to produce first, whatever separator the template puts before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..attacks import triggered_copy
from ..attacks.base import DEFAULT_TARGET
from ..data.base import check_samples
from ..errors import InputError
from ..inputs.conversation import ConversationEncoder
from ..models.hooknames import HookSpec, hook_resid_post
from ..models.intervention import Intervention, NoIntervention, as_intervention

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..data.base import Sample
    from ..inputs.batch import Batch


def resid_hook_name(layer: int) -> str:
    """Bridge hook holding the residual stream after LM layer ``layer`` (``[B, T, d_model]``)."""
    return hook_resid_post(layer)


def first_answer_token(model: Any, prompt: str, answer: str, *, n_images: int = 1) -> int:
    """Id of the first token of ``answer`` when it follows ``prompt`` in the model's chat template.

    The conversation ``[(prompt, answer)]`` is rendered with the model's system prompt and chat
    template (as training sequences are), tokenised with character offsets, and the first token
    whose span ends after the answer's first character is returned; this picks e.g. ``"▁Yes"``
    rather than ``"Yes"`` for SentencePiece tokenizers. Tokenizers without offsets fall back to the
    first token where the tokenisations of the text with and without the answer diverge.

    Raises:
        InputError: empty answer, or the template cannot place it.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise InputError(f"first_answer_token: answer must be a non-empty string, got {answer!r}")
    answer = answer.strip()
    encoder = ConversationEncoder(model.processor, model.image_token_id, model.system_prompt, add_eos=False)
    text, spans = encoder.render([(prompt, answer)], n_images)
    start = spans[0][0]
    tok = model.tokenizer
    try:
        enc = tok(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        ids, offsets = None, None
    if ids is not None and offsets is not None:
        for tid, (s, e) in zip(ids, offsets):
            if e > start and e > s and tid != model.image_token_id:
                return int(tid)
    full = list(tok(text)["input_ids"])
    prefix = list(tok(text[:start])["input_ids"])
    k = 0
    while k < min(len(full), len(prefix)) and full[k] == prefix[k]:
        k += 1
    if k >= len(full):
        raise InputError(f"first_answer_token: cannot find a token of {answer!r} after the prompt")
    return int(full[k])


def residual_at_query(model: Any, batch: "Batch", layers: Sequence[int] | None = None, *,
                      hooks: Sequence[HookSpec] = ()) -> torch.Tensor:
    """Residual stream after each layer at each sample's answer query.

    Args:
        model: a :class:`HookedLVLM`.
        batch: from ``model.prepare``; the query is ``batch.query_positions`` (last prompt token).
        layers: LM layers (default all).
        hooks: extra forward hooks active during the pass (e.g. an intervention's).

    Returns:
        ``[B, L, d_model]`` in the model's dtype, on the model's device.
    """
    layer_list = model.check_layers(layers)
    q = batch.query_positions
    rows: dict[int, torch.Tensor] = {}

    def record(layer: int) -> Callable:
        def fn(x: torch.Tensor, hook: Any) -> torch.Tensor:  # [B, T, d]
            rows[layer] = x[torch.arange(x.shape[0], device=x.device), q.to(x.device)].detach().clone()
            return x
        return fn

    model.forward(batch, hooks=[*hooks, *[(resid_hook_name(l), record(l)) for l in layer_list]],
                  logits_to_keep=1)
    missing = [l for l in layer_list if l not in rows]
    if missing:
        raise InputError(f"residual hooks of layers {missing} did not fire ({resid_hook_name(missing[0])})")
    return torch.stack([rows[l] for l in layer_list], dim=1)


@torch.no_grad()
def lens_logits(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """Decode residual vectors ``[..., d_model]`` with the final norm and unembedding: ``[..., V]``."""
    return model.unembedding(model.final_norm(resid))


@torch.no_grad()
def logit_lens(model: Any, samples: Sequence["Sample"], attack: Any = None, *, intervention: Any = None,
               target: str | None = None, layers: int | Sequence[int] | None = None, batch_size: int = 16,
               progress: bool = False) -> "pd.DataFrame":
    """Per-layer probability of the correct vs. the target first token (paper Fig. 7).

    Conditions: ``clean`` (the samples), ``triggered`` (``triggered_copy(samples, attack)``, when
    ``attack`` is given) and ``triggered+<intervention.name>`` (the triggered samples with the
    intervention's image transform and hooks; ``clean+<name>`` when there is no attack).

    Args:
        model: a :class:`HookedLVLM`.
        samples: clean samples; ``sample.answer`` is the correct answer.
        attack: the attack (its ``target`` is the target phrase; default target
            ``"you have been hacked lol"``).
        intervention: an :class:`Intervention` (or hook list / factory) evaluated as an extra condition.
        target: override of the target phrase.
        layers: LM layers to read (default all).
        batch_size: samples per forward pass.
        progress: progress bar over batches.

    Returns:
        DataFrame, one row per sample x layer x condition: ``condition, sample, sample_id, layer,
        p_correct, p_target, diff = p_correct - p_target, correct_token_id, target_token_id``.
        Probabilities are the softmax of the lens logits at the answer query, in float32.
    """
    import pandas as pd

    samples = check_samples(samples, "logit_lens")
    if batch_size < 1:
        raise InputError(f"logit_lens: batch_size must be at least 1, got {batch_size}")
    layer_list = model.check_layers(layers)
    target = target or getattr(attack, "target", None) or DEFAULT_TARGET
    conditions: list[tuple[str, list, Intervention]] = [("clean", samples, NoIntervention())]
    base_name, base = "clean", samples
    if attack is not None:
        base_name, base = "triggered", triggered_copy(samples, attack)
        conditions.append((base_name, base, NoIntervention()))
    if intervention is not None:
        iv = as_intervention(intervention)
        conditions.append((f"{base_name}+{iv.name}", base, iv))

    token_cache: dict[tuple[str, str, int], int] = {}

    def first(prompt: str, text: str, n: int) -> int:
        key = (prompt, text, n)
        if key not in token_cache:
            token_cache[key] = first_answer_token(model, prompt, text, n_images=n)
        return token_cache[key]

    rows = []
    jobs = [(c, s) for c in conditions for s in range(0, len(samples), batch_size)]
    for (name, items, iv), s in tqdm(jobs, desc="logit_lens", disable=not progress, mininterval=2.0):
        chunk = items[s:s + batch_size]
        plain = isinstance(iv, NoIntervention)
        images = [x.image if plain else iv.transform(x.image) for x in chunk]
        batch = model.prepare(images, [x.prompt for x in chunk])
        resid = residual_at_query(model, batch, layer_list, hooks=iv.hooks(model, batch))  # [B, L, d]
        probs = lens_logits(model, resid).float().softmax(-1).cpu()  # [B, L, V]
        for i, (x, n_img) in enumerate(zip(chunk, batch.images_per_sample)):
            c_id, t_id = first(x.prompt, x.answer, n_img), first(x.prompt, target, n_img)
            for j, layer in enumerate(layer_list):
                pc, pt = float(probs[i, j, c_id]), float(probs[i, j, t_id])
                rows.append(dict(condition=name, sample=s + i, sample_id=x.sample_id, layer=layer,
                                 p_correct=pc, p_target=pt, diff=pc - pt, correct_token_id=c_id,
                                 target_token_id=t_id))
    return pd.DataFrame(rows)
