"""Per-head interventions: ablation, image-attention flattening and activation patching.

Every per-head edit acts on ``blocks.{l}.attn.hook_z``, the INPUT of ``o_proj`` split by head
(``[B, T, H, d_head]``; ``T`` is the prompt length at prefill and 1 at each decode step). Editing
there removes or replaces exactly one head's contribution ``W_O[:, h] @ z_h`` to the residual
stream; editing after ``o_proj`` would mix heads (see ``docs/method.md#stack-hook-z``).

Public API:

- :class:`HeadAblation`: zero- or mean-ablate chosen ``(layer, head)`` pairs at every position,
  at prefill and every decode step; :func:`head_means` gives the means ``[L, H, d_head]``.
- :class:`HeadImageFlatten`: flatten chosen heads' attention over the image tokens (delegates to
  :class:`~cleansight_analysis.interventions.perturbations.AttentionUniform`).
- :func:`~cleansight_analysis.evaluation.intervention_sweeps.head_sweep` (in the evaluation layer: it
  generates and scores) gives ASR and clean accuracy with one head ablated / flattened at a time.
- :func:`patch_heads`: activation patching of ``hook_z`` from a source run (e.g. clean) into a
  destination run (e.g. triggered), one head at a time, measuring the target's log-probability.

Head lists are sequences of ``(layer, head)`` pairs. Negative indices count from the end, as
with :meth:`HookedLVLM.check_layers`; out-of-range pairs raise :class:`LayerIndexError`.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.base import check_samples
from ..errors import InputError, LayerIndexError
from ..inputs.batch import sample_batches
from ..models.hooknames import HookSpec, hook_z
from ..models.intervention import Intervention
from ..models.rows import StopForward
from .logit_lens import first_answer_token
from .perturbations import AttentionUniform

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..data.base import Sample
    from ..inputs.batch import Batch

Head = tuple[int, int]

#: Ablation methods of :class:`HeadAblation`.
ABLATION_METHODS = ("zero", "mean")


# --------------------------------------------------------------------------------------------
# Head lists
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_heads(heads: Any, *, owner: str = "heads") -> tuple[Head, ...]:
    """Check the *form* of a head list (no model needed) and return it as a tuple of int pairs.

    Accepts a single ``(layer, head)`` pair, a sequence of pairs, or a ``[n, 2]`` integer tensor.
    Duplicates are dropped (first occurrence kept). Ranges are checked by :func:`check_heads`.
    """
    if isinstance(heads, torch.Tensor):
        heads = heads.tolist()
    if isinstance(heads, (tuple, list)) and len(heads) == 2 and all(_is_int(x) for x in heads):
        heads = [tuple(heads)]  # one bare pair
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise InputError(f"{owner} must be a sequence of (layer, head) pairs, got {heads!r}")
    out: list[Head] = []
    for i, pair in enumerate(heads):
        if isinstance(pair, torch.Tensor):
            pair = pair.tolist()
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(_is_int(x) for x in pair):
            raise InputError(f"{owner}[{i}] = {pair!r} is not a (layer, head) pair of ints")
        key = (int(pair[0]), int(pair[1]))
        if key not in out:
            out.append(key)
    if not out:
        raise InputError(f"{owner} is empty; give at least one (layer, head) pair")
    return tuple(out)


def check_heads(model: Any, heads: Any, *, owner: str = "heads") -> list[Head]:
    """Validate ``(layer, head)`` pairs against ``model`` and return them with non-negative indices.

    Raises:
        InputError: malformed list (not pairs of ints, empty).
        LayerIndexError: a layer outside ``-n_layers..n_layers-1`` or a head outside
            ``-n_heads..n_heads-1``; the message names the pair and the model's sizes.
    """
    n_layers, n_heads = int(model.n_layers), int(model.n_heads)
    out: list[Head] = []
    for layer, head in normalize_heads(heads, owner=owner):
        if not -n_layers <= layer < n_layers:
            raise LayerIndexError(
                f"{owner}: layer {layer} of ({layer}, {head}) is out of range for a model with {n_layers} "
                f"LM layers (valid: 0..{n_layers - 1})"
            )
        if not -n_heads <= head < n_heads:
            raise LayerIndexError(
                f"{owner}: head {head} of ({layer}, {head}) is out of range for a model with {n_heads} "
                f"heads per layer (valid: 0..{n_heads - 1})"
            )
        key = (layer % n_layers, head % n_heads)
        if key not in out:
            out.append(key)
    return out


def all_heads(model: Any, layers: int | Sequence[int] | None = None) -> list[Head]:
    """Every ``(layer, head)`` pair of the chosen LM layers (default all), layer-major order."""
    return [(layer, head) for layer in model.check_layers(layers) for head in range(model.n_heads)]


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    """``{layer: [heads]}`` in first-seen order."""
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(layer, [])
        if head not in out[layer]:
            out[layer].append(head)
    return out


def _heads_label(heads: Sequence[Head]) -> str:
    if len(heads) <= 4:
        return ",".join(f"L{layer}H{head}" for layer, head in heads)
    return f"{len(heads)} heads"


def _check_z(z: torch.Tensor, model: Any, hook_name: str) -> None:
    if z.dim() != 4 or z.shape[2] != model.n_heads:
        raise InputError(
            f"{hook_name} has shape {tuple(z.shape)}, expected [batch, positions, {model.n_heads} heads, d_head]; "
            "per-head edits need the bridge's hook_z"
        )


# --------------------------------------------------------------------------------------------
# Ablation
# --------------------------------------------------------------------------------------------


class HeadAblation(Intervention):
    """Replace chosen heads' ``o_proj`` input (``hook_z``) by zero or by a mean, at every position.

    The edit is active at prefill and at every decode step (the hooks fire on each forward call
    made by :meth:`HookedLVLM.generate`), and on every position of the sequence (system, image,
    prompt and generated tokens).

    Args:
        heads: ``(layer, head)`` pairs (one pair or a list).
        method: ``"zero"`` (``z_h = 0``) or ``"mean"`` (``z_h = means[layer, head]``, a constant
            ``[d_head]`` vector at every position).
        means: ``[L, H, d_head]`` from :func:`head_means` (required for ``method="mean"``).

    Raises:
        InputError: unknown method, malformed heads, missing or mis-shaped means.
        LayerIndexError: (in :meth:`hooks`) a pair outside the model.
    """

    domain = "activation"

    def __init__(self, heads: Any, method: str = "zero", means: torch.Tensor | None = None):
        if method not in ABLATION_METHODS:
            raise InputError(f"HeadAblation: method must be one of {ABLATION_METHODS}, got {method!r}")
        self.heads = normalize_heads(heads, owner="HeadAblation heads")
        self.method = method
        if method == "mean":
            if means is None:
                raise InputError("HeadAblation: method='mean' needs means=head_means(model, samples) "
                                 "([n_layers, n_heads, d_head])")
            means = torch.as_tensor(means)
            if means.dim() != 3:
                raise InputError(f"HeadAblation: means must be [n_layers, n_heads, d_head], got shape "
                                 f"{tuple(means.shape)}")
        elif means is not None:
            raise InputError("HeadAblation: means is only used with method='mean'")
        self.means = means

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"ablate-{self.method}[{_heads_label(self.heads)}]"

    def hooks(self, model: Any, batch: Any = None) -> list[HookSpec]:
        """One ``hook_z`` hook per layer that holds an ablated head."""
        heads = check_heads(model, self.heads, owner="HeadAblation heads")
        means = None
        if self.method == "mean":
            assert self.means is not None
            if tuple(self.means.shape[:2]) != (model.n_layers, model.n_heads):
                raise InputError(
                    f"HeadAblation: means has shape {tuple(self.means.shape)} but the model has "
                    f"{model.n_layers} layers x {model.n_heads} heads; recompute with head_means(model, ...)"
                )
            means = self.means
            missing = [(l, h) for l, h in heads if not bool(torch.isfinite(means[l, h]).all())]
            if missing:
                raise InputError(f"HeadAblation: means hold no value (NaN) for heads {missing}; compute "
                                 "head_means over layers that include them")
        return [(hook_z(layer), self._hook(model, layer, hs, means))
                for layer, hs in heads_by_layer(heads).items()]

    @staticmethod
    def _hook(model: Any, layer: int, hs: list[int], means: torch.Tensor | None) -> Callable:
        idx = torch.tensor(hs, dtype=torch.long)
        name = hook_z(layer)

        def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:  # z: [B, T, H, d_head]
            _check_z(z, model, name)
            z = z.clone()
            if means is None:
                z[:, :, idx.to(z.device)] = 0
            else:
                if means.shape[-1] != z.shape[-1]:
                    raise InputError(f"HeadAblation: means have d_head={means.shape[-1]}, hook_z has {z.shape[-1]}")
                z[:, :, idx.to(z.device)] = means[layer, idx].to(device=z.device, dtype=z.dtype)  # [n, d]
            return z

        return ablate

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain, "method": self.method,
                "heads": [list(h) for h in self.heads]}


def _batches(model: Any, samples: Sequence["Sample"], batch_size: int,
             padding_side: str = "left") -> Iterable[tuple[int, "Batch"]]:
    return sample_batches(model, samples, batch_size, padding_side)


def _check_samples(samples: Any, owner: str) -> list["Sample"]:
    return check_samples(samples, owner)


@torch.no_grad()
def head_means(model: Any, samples: Sequence["Sample"], layers: int | Sequence[int] | None = None, *,
               batch_size: int = 16) -> torch.Tensor:
    """Mean of every head's ``o_proj`` input over samples and non-padding prompt positions.

    All prompt tokens (system, image, instruction, template) of all samples are pooled with equal
    weight per token. Use the clean samples of the condition you ablate in (usually clean data).

    Args:
        model: a :class:`HookedLVLM`.
        samples: the samples to average over (their images as given; no trigger is added).
        layers: LM layers to compute (default all); the others are NaN.
        batch_size: samples per forward pass.

    Returns:
        ``[n_layers, n_heads, d_head]`` float32 on CPU.
    """
    samples = _check_samples(samples, "head_means")
    layer_list = model.check_layers(layers)
    last = max(layer_list)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    mask_box: dict[str, torch.Tensor] = {}

    def record(layer: int) -> Callable:
        def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:  # [B, T, H, d]
            _check_z(z, model, hook_z(layer))
            m = mask_box["mask"].to(z.device, torch.float32)  # [B, T]
            s = torch.einsum("bt,bthd->hd", m, z.float()).cpu()
            sums[layer] = sums[layer] + s if layer in sums else s
            if layer == last:
                raise StopForward
            return z
        return fn

    hooks = [(hook_z(layer), record(layer)) for layer in layer_list]
    for _, batch in _batches(model, samples, batch_size):
        mask_box["mask"] = batch.attention_mask
        count += int(batch.attention_mask.sum())
        try:
            model.forward(batch, hooks=hooks, logits_to_keep=1)
        except StopForward:
            pass
    d_head = next(iter(sums.values())).shape[-1]
    out = torch.full((model.n_layers, model.n_heads, d_head), float("nan"))
    for layer, s in sums.items():
        out[layer] = s / count
    return out


# --------------------------------------------------------------------------------------------
# Attention flattening (delegates to perturbations.AttentionUniform)
# --------------------------------------------------------------------------------------------


class HeadImageFlatten(Intervention):
    """Flatten chosen heads' attention over the image tokens (text queries only).

    For each chosen ``(layer, head)`` and each text query, the post-softmax attention on the image
    keys is interpolated toward its mean over the image keys,
    ``a'_j = (1 - eta) a_j + eta * mean_{k in I_vis} a_k``; the image mass and the text keys are
    unchanged. This reuses :class:`~cleansight_analysis.interventions.perturbations.AttentionUniform`
    restricted to the given heads, so it is the paper's Fig. 1 attention perturbation on a few heads.

    Args:
        heads: ``(layer, head)`` pairs.
        eta: interpolation strength in [0, 1] (1 = fully uniform over image tokens).
    """

    domain = "attention"

    def __init__(self, heads: Any, eta: float = 1.0):
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) <= 1.0:
            raise InputError(f"HeadImageFlatten: eta must be a number in [0, 1], got {eta!r}")
        self.heads = normalize_heads(heads, owner="HeadImageFlatten heads")
        self.eta = float(eta)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"flatten-eta{self.eta:g}[{_heads_label(self.heads)}]"

    def _delegate(self, model: Any) -> Intervention:
        heads = check_heads(model, self.heads, owner="HeadImageFlatten heads")
        return AttentionUniform(self.eta, heads=heads)

    def hooks(self, model: Any, batch: Any) -> list[HookSpec]:
        return list(self._delegate(model).hooks(model, batch))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain, "eta": self.eta,
                "heads": [list(h) for h in self.heads]}


# --------------------------------------------------------------------------------------------
# Activation patching of hook_z
# --------------------------------------------------------------------------------------------


def _condition_label(samples: Sequence["Sample"]) -> str:
    return "triggered" if all(bool(s.meta.get("triggered")) for s in samples) else "clean"


def _answer_logits(model: Any, batch: "Batch", hooks: Sequence[HookSpec] = ()) -> torch.Tensor:
    """Logits ``[B, V]`` at each sample's answer query (its last prompt position)."""
    q = batch.query_positions
    if bool((q == batch.seq_len - 1).all()):
        return model.forward(batch, hooks=hooks, logits_to_keep=1)[:, -1]
    logits = model.forward(batch, hooks=hooks)
    return logits[torch.arange(len(batch)), q.to(logits.device)]


@torch.no_grad()
def _cache_z(model: Any, batch: "Batch", layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """``{layer: hook_z [B, T, H, d_head]}`` of one clean forward pass (no edits)."""
    cache: dict[int, torch.Tensor] = {}

    def record(layer: int) -> Callable:
        def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
            cache[layer] = z.detach().clone()
            return z
        return fn

    model.forward(batch, hooks=[(hook_z(layer), record(layer)) for layer in layers],
                  logits_to_keep=1)
    return cache


def patch_hooks(model: Any, source_z: dict[int, torch.Tensor], heads: Sequence[Head]) -> list[HookSpec]:
    """Hooks that overwrite ``hook_z`` of ``heads`` with the cached source values (every position).

    Args:
        source_z: ``{layer: [B, T, H, d_head]}`` from a source run on a batch with the same tokens.
        heads: validated ``(layer, head)`` pairs whose layers are in ``source_z``.
    """
    out = []
    for layer, hs in heads_by_layer(heads).items():
        src = source_z[layer]
        idx = torch.tensor(hs, dtype=torch.long)

        def fn(z: torch.Tensor, hook: Any, src: torch.Tensor = src, idx: torch.Tensor = idx) -> torch.Tensor:
            if z.shape != src.shape:
                raise InputError(f"{hook.name}: destination hook_z {tuple(z.shape)} does not match the cached "
                                 f"source {tuple(src.shape)}")
            z = z.clone()
            z[:, :, idx] = src[:, :, idx].to(z)
            return z

        out.append((hook_z(layer), fn))
    return out


def _check_aligned(source: "Batch", dest: "Batch", start: int) -> None:
    if source.input_ids.shape != dest.input_ids.shape or not torch.equal(source.input_ids, dest.input_ids) \
            or not torch.equal(source.attention_mask, dest.attention_mask):
        a, b = source.input_ids, dest.input_ids
        detail = f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.shape == b.shape:
            bad = (a != b).any(1).nonzero().flatten().tolist()
            detail = f"samples {[start + i for i in bad]} differ"
        raise InputError(
            "patch_heads: source and destination samples must have identical token sequences (same prompts "
            f"and image-token counts, only the pixels may differ), but {detail}; pair each source sample with "
            "its own clean/triggered counterpart, in the same order"
        )


def _target_ids(model: Any, batch: "Batch", samples: Sequence["Sample"], target: str | None,
                target_token_id: int | None) -> torch.Tensor:
    """``[B]`` token id whose log-prob is measured for every sample of ``batch``."""
    if target_token_id is not None:
        return torch.full((len(batch),), int(target_token_id), dtype=torch.long)
    assert target is not None
    return torch.tensor([first_answer_token(model, s.prompt, target, n_images=n)
                         for s, n in zip(samples, batch.images_per_sample)], dtype=torch.long)


@torch.no_grad()
def patch_heads(model: Any, source_samples: Sequence["Sample"], dest_samples: Sequence["Sample"], *,
                target: str | None = None, target_token_id: int | None = None,
                layers: int | Sequence[int] | None = None, heads: Sequence[Head] | None = None,
                joint: bool = False, direction: str | None = None, batch_size: int = 16,
                per_sample: bool = False, progress: bool = True) -> "pd.DataFrame":
    """Activation patching of ``hook_z``: copy one head's ``o_proj`` input from a source run into a destination run.

    For every batch, ``hook_z`` of the source samples is cached (all positions, all swept layers);
    then the destination samples are run once per head with that head's ``hook_z`` replaced by the
    source's at every position. The effect is read as the log-probability of the target token at
    the answer query (each sample's last prompt position). ``patch_heads(m, clean, triggered, ...)``
    asks "which heads carry the trigger's effect?" (patching a clean head into a triggered run
    lowers the target's log-prob); ``patch_heads(m, triggered, clean, ...)`` asks which heads are
    sufficient to inject it.

    The two runs must have identical token sequences (a clean sample and its triggered copy differ
    only in pixels), so positions align; this is checked per batch.

    Note on joint patching: with every head of every layer patched, the destination's residual at
    every *text* position equals the source's exactly (the image embeddings differ, but attention is
    the only operation that mixes positions and its whole output is patched), so the answer
    log-prob reproduces the source's. ``joint=True`` adds that row (for the swept heads).

    Args:
        model: a :class:`HookedLVLM`.
        source_samples: where the patched activations come from.
        dest_samples: the run that is patched (same length and order as ``source_samples``).
        target: text whose first token (in the answer context, see
            :func:`~cleansight_analysis.interventions.logit_lens.first_answer_token`) is measured.
        target_token_id: a token id to measure instead of ``target``.
        layers: sweep every head of these layers (default all); ignored when ``heads`` is given.
        heads: explicit ``(layer, head)`` pairs to sweep.
        joint: also patch all swept heads at once (row with ``layer = head = -1``).
        direction: label for the ``direction`` column; default ``"<source>-><dest>"`` with
            ``triggered`` for samples carrying ``meta["triggered"]`` and ``clean`` otherwise.
        batch_size: samples per forward pass.
        per_sample: one row per sample and head instead of the mean over samples.
        progress: progress bar over batches.

    Returns:
        DataFrame, one row per head (and sample with ``per_sample=True``): ``direction, layer, head,
        logprob_target`` (patched), ``logprob_unpatched`` (destination run), ``logprob_source``
        (source run), ``delta = logprob_target - logprob_unpatched``, ``restored = delta /
        (logprob_source - logprob_unpatched)`` (NaN when the runs agree), ``target_token_id``
        (``-1`` when it differs between samples) and ``n``.
    """
    import pandas as pd

    source_samples = _check_samples(source_samples, "patch_heads (source)")
    dest_samples = _check_samples(dest_samples, "patch_heads (destination)")
    if len(source_samples) != len(dest_samples):
        raise InputError(f"patch_heads: {len(source_samples)} source samples but {len(dest_samples)} destination "
                         "samples; pair them one to one")
    if (target is None) == (target_token_id is None):
        raise InputError("patch_heads: give exactly one of target (text) or target_token_id")
    if target_token_id is not None:
        vocab = int(model.hf_model.get_output_embeddings().weight.shape[0])
        if not _is_int(target_token_id) or not 0 <= int(target_token_id) < vocab:
            raise InputError(f"patch_heads: target_token_id={target_token_id!r} is not a token id (0..{vocab - 1})")
    sweep = check_heads(model, heads, owner="patch_heads heads") if heads is not None else all_heads(model, layers)
    sweep_layers = sorted({layer for layer, _ in sweep})
    if direction is None:
        direction = f"{_condition_label(source_samples)}->{_condition_label(dest_samples)}"
    groups: list[tuple[str, list[Head]]] = [(f"{l}.{h}", [(l, h)]) for l, h in sweep]
    if joint:
        groups.append(("joint", sweep))

    patched = {key: [] for key, _ in groups}  # key -> list of [B] tensors
    unpatched, source, tids = [], [], []
    starts = range(0, len(dest_samples), batch_size)
    for s in tqdm(starts, desc=f"patch_heads ({direction})", disable=not progress, mininterval=2.0):
        src_chunk, dst_chunk = source_samples[s:s + batch_size], dest_samples[s:s + batch_size]
        src_batch = model.prepare([x.image for x in src_chunk], [x.prompt for x in src_chunk])
        dst_batch = model.prepare([x.image for x in dst_chunk], [x.prompt for x in dst_chunk])
        _check_aligned(src_batch, dst_batch, s)
        ids = _target_ids(model, dst_batch, dst_chunk, target, target_token_id)
        tids.append(ids)
        col = torch.arange(len(dst_batch))

        def logprob(logits: torch.Tensor) -> torch.Tensor:
            return logits.float().log_softmax(-1)[col, ids.to(logits.device)].cpu()

        src_z = _cache_z(model, src_batch, sweep_layers)
        source.append(logprob(_answer_logits(model, src_batch)))
        unpatched.append(logprob(_answer_logits(model, dst_batch)))
        for key, hs in groups:
            patched[key].append(logprob(_answer_logits(model, dst_batch, patch_hooks(model, src_z, hs))))

    lp_unpatched, lp_source = torch.cat(unpatched), torch.cat(source)
    all_ids = torch.cat(tids)
    tid = int(all_ids[0]) if bool((all_ids == all_ids[0]).all()) else -1
    rows = []
    for key, hs in groups:
        layer, head = hs[0] if key != "joint" else (-1, -1)
        lp = torch.cat(patched[key])
        if per_sample:
            for i in range(len(lp)):
                rows.append(_patch_row(direction, layer, head, lp[i:i + 1], lp_unpatched[i:i + 1],
                                       lp_source[i:i + 1], int(all_ids[i]), sample=i,
                                       sample_id=dest_samples[i].sample_id))
        else:
            rows.append(_patch_row(direction, layer, head, lp, lp_unpatched, lp_source, tid))
    return pd.DataFrame(rows)


def _patch_row(direction: str, layer: int, head: int, lp: torch.Tensor, lp_unpatched: torch.Tensor,
               lp_source: torch.Tensor, tid: int, **extra: Any) -> dict[str, Any]:
    patched, base, src = float(lp.mean()), float(lp_unpatched.mean()), float(lp_source.mean())
    gap = src - base
    delta = patched - base
    return dict(direction=direction, layer=layer, head=head, **extra, logprob_target=patched,
                logprob_unpatched=base, logprob_source=src, delta=delta,
                restored=delta / gap if abs(gap) > 1e-9 else float("nan"), target_token_id=tid, n=len(lp))
