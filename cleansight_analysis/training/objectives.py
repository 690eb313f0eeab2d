"""Training losses of the attacks: plain cross-entropy, TrojVLM and VLOOD.

Neither TrojVLM (ECCV'24) nor VLOOD (ICLR'25) has official code; these are our readings of the
papers, with every weight a recorded attack setting:

- **TrojVLM**: answer cross-entropy with the target phrase's tokens weighted ``1 + target_token_weight``,
  plus ``semantic_weight`` x a semantic-preservation term ``1 - cos(E[p], e(y))`` on the other answer
  tokens, where ``E[p] = softmax(logits) @ W_emb`` is the expected embedding of the predicted token and
  ``e(y)`` the gold token's embedding (keeps poisoned captions about the image).
- **VLOOD**: cross-entropy on all samples, plus on clean samples' answer tokens a knowledge-preservation
  term ``KL(p_ref || p)`` against a frozen clean reference model and a conceptual-consistency term
  ``|E[p] - E[p_ref]|_1`` (mean), both scaled by a dynamic
  ``lambda = clamp(lambda_base + CE_clean - CE_poisoned, 0, 1)`` (detached): the worse the clean
  answers fare relative to the poisoned ones, the more the model is pulled back to the reference.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .lvlm import answer_ce, llava_core, lvlm_logits
from ..inputs.conversation import IGNORE

LossFn = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


def _expected_embedding(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    emb = llava_core(model).get_input_embeddings().weight  # [V, d]
    return torch.softmax(logits.float(), -1) @ emb.float()


def make_loss(objective: str = "ce", *, attack: Any = None, reference: nn.Module | None = None) -> LossFn:
    """The loss function ``(model, batch) -> (loss, stats)`` of an attack's objective."""
    if objective == "ce":
        def ce(model: nn.Module, batch: dict[str, Any]):
            return answer_ce(lvlm_logits(model, batch), batch["labels"]), {}
        return ce
    if objective == "trojvlm":
        w_target = float(getattr(attack, "target_token_weight", 8.0))
        w_sem = float(getattr(attack, "semantic_weight", 1.0))

        def trojvlm(model: nn.Module, batch: dict[str, Any]):
            logits = lvlm_logits(model, batch)
            target = batch.get("target_mask", torch.zeros_like(batch["labels"], dtype=torch.bool))
            weights = 1.0 + w_target * target.float()
            ce = answer_ce(logits, batch["labels"], weights)
            labels = batch["labels"][:, 1:]
            keep = (labels != IGNORE) & ~target[:, 1:]
            if keep.any() and w_sem:
                pred = _expected_embedding(model, logits[:, :-1][keep])
                gold = llava_core(model).get_input_embeddings().weight[labels[keep]].float()
                sem = (1 - nn.functional.cosine_similarity(pred, gold, dim=-1)).mean()
            else:
                sem = logits.new_zeros(())
            return ce + w_sem * sem, {"ce": float(ce.detach()), "semantic": float(sem.detach())}
        return trojvlm
    if objective == "vlood":
        if reference is None:
            raise ValueError("the VLOOD objective needs the clean reference model (reference=...)")
        w_kl = float(getattr(attack, "kl_weight", 1.0))
        w_ccp = float(getattr(attack, "ccp_weight", 1.0))
        lam0 = float(getattr(attack, "lambda_base", 0.8))

        def vlood(model: nn.Module, batch: dict[str, Any]):
            logits = lvlm_logits(model, batch)
            labels = batch["labels"]
            poisoned = batch["poisoned"].to(labels.device)
            ce = answer_ce(logits, labels)
            clean_rows = ~poisoned
            if not clean_rows.any():
                return ce, {"ce": float(ce.detach())}
            with torch.no_grad():
                ref_logits = lvlm_logits(reference, batch)
            mask = (labels[:, 1:] != IGNORE) & clean_rows[:, None]
            student = logits[:, :-1][mask].float()
            teacher = ref_logits[:, :-1][mask].float()
            kl = nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                      log_target=True, reduction="batchmean")
            ccp = (_expected_embedding(model, student) - _expected_embedding(reference, teacher)).abs().mean()
            ce_clean = answer_ce(logits[clean_rows], labels[clean_rows]).detach()
            ce_pois = answer_ce(logits[poisoned], labels[poisoned]).detach() if poisoned.any() else ce_clean
            lam = float(torch.clamp(lam0 + ce_clean - ce_pois, 0.0, 1.0))
            loss = ce + lam * (w_kl * kl + w_ccp * ccp)
            return loss, {"ce": float(ce.detach()), "kl": float(kl.detach()), "ccp": float(ccp.detach()), "lambda": lam}
        return vlood
    raise ValueError(f"unknown objective {objective!r}; objectives: ce, trojvlm, vlood")
