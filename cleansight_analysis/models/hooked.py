"""``HookedLVLM``: a LLaVA-style model wrapped by TransformerLens' ``TransformerBridge``.

The bridge replaces each language-model attention module in place with one that exposes hook points
(``blocks.{l}.attn.hook_pattern``, ``hook_attn_scores``, ``hook_z`` = input of ``o_proj`` split by head,
...). Calling the wrapped HF model therefore fires those hooks, so we keep HF's own forward and
``generate`` (cache, positions, image merging) and add hooks around them: prefill and every decode step
see the same edits.

Attention runs as SDPA in every layer (``attention="sdpa"``, the default) except where a hook needs the
full pattern or the pre-softmax scores (:mod:`.sdpa`); the attention rows and key masks of this package
are declared hooks (:mod:`.attention_hooks`) that SDPA serves from q and k. ``attention="eager"`` runs
the bridge's eager attention everywhere, as before.
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, NoReturn, Sequence

import numpy as np
import torch

from ..errors import InputError, LayerIndexError, NumericalError
from ..inputs.batch import Batch, check_prompt_length, max_positions, prepare_batch
from ..inputs.images import to_rgb_image
from ..inputs.templates import LLAVA_SYSTEM_PROMPT
from .families import ModelFamily, projector_inputs
from .hooknames import EMBED_IN, FINAL_NORM_OUT, UNEMBED_OUT, HookSpec, hook_attn, hook_block_out, hook_pattern
from .rows import AttentionRows, RowRecorder, StopForward
from .sdpa import check_mode, install_attention

_DEFAULT: Any = object()


@dataclass
class Generation:
    """Result of :meth:`HookedLVLM.generate`.

    Attributes:
        sequences: ``[B, T + n]`` prompt ids followed by the new tokens.
        tokens: ``[B, n]`` new tokens only (``pad_token_id`` after a sample's EOS).
        texts: decoded new tokens, special tokens removed.
        n_tokens: ``[B]`` new tokens up to and including EOS.
        rows: attention rows of every decoding query when requested (``[B, n, L, H, K]``).
    """

    sequences: torch.Tensor
    tokens: torch.Tensor
    texts: list[str]
    n_tokens: torch.Tensor
    rows: AttentionRows | None = None


class HookedLVLM:
    """A hooked LLaVA-style LVLM. Build one with :func:`cleansight_analysis.load_lvlm`.

    Attributes:
        bridge: the ``TransformerBridge`` (``bridge.hooks(...)``, ``run_with_cache``, hook names).
        processor: the HF processor used by :meth:`prepare`.
        family: the architecture adapter (:class:`ModelFamily`).
        name: where the model came from (registry name, folder or ``"<in-memory>"``).
        system_prompt: default system message of :meth:`prepare`.
        attention: ``"sdpa"`` (default: SDPA in every layer, eager only in layers whose pattern or scores
            a hook needs) or ``"eager"`` (the bridge's eager attention everywhere). Settable.
    """

    def __init__(self, bridge: Any, processor: Any, family: ModelFamily, *, name: str,
                 system_prompt: str | None = LLAVA_SYSTEM_PROMPT, attention: str = "sdpa"):
        self.bridge = bridge
        self.processor = processor
        self.family = family
        self.name = name
        self.system_prompt = system_prompt
        self._attention = install_attention(bridge, check_mode(attention))

    # ------------------------------------------------------------------ properties
    @property
    def hf_model(self) -> torch.nn.Module:
        """The wrapped HF model (its attention modules are the bridge's)."""
        return self.bridge.original_model

    @property
    def config(self) -> Any:
        return self.hf_model.config

    @property
    def attention(self) -> str:
        """``"sdpa"`` or ``"eager"`` (see the class docstring); assign to switch."""
        return self._attention.mode

    @attention.setter
    def attention(self, mode: str) -> None:
        self._attention.mode = check_mode(mode)

    @property
    def text_config(self) -> Any:
        return self.config.text_config

    @property
    def n_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.n_heads)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def final_norm(self) -> torch.nn.Module:
        """The language model's final norm, as HF calls it (the bridge's ``ln_final`` when it has one,
        else the family's module, :meth:`ModelFamily.final_norm`). Fires ``ln_final`` hooks."""
        norm = getattr(self.bridge, "ln_final", None)
        return norm if norm is not None else self.family.final_norm(self.hf_model)

    @property
    def unembedding(self) -> torch.nn.Module:
        """The unembedding (``lm_head``): the bridge's ``unembed`` when it has one, else HF's output embeddings."""
        unembed = getattr(self.bridge, "unembed", None)
        return unembed if unembed is not None else self.hf_model.get_output_embeddings()

    def __repr__(self) -> str:
        return (f"HookedLVLM(name={self.name!r}, architecture={self.family.architecture}, layers={self.n_layers}, "
                f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, device={self.device}, dtype={self.dtype}, "
                f"attention={self.attention!r})")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def hook_name(layer: int, hook: str = "pattern") -> str:
        """Bridge hook name of an LM attention hook, e.g. ``hook_name(3, "z") == "blocks.3.attn.hook_z"``
        (see :mod:`cleansight_analysis.models.hooknames`)."""
        return hook_attn(layer, hook)

    def lm_hooks(self, hook: str, fn: Any, layers: int | Sequence[int] | None = None) -> list[HookSpec]:
        """``[(name, fn)]`` for one attention hook in chosen LM layers (default all).

        Use this rather than a name filter such as ``n.endswith("hook_pattern")``, which would also
        match the vision tower's attention hooks.
        """
        return [(self.hook_name(layer, hook), fn) for layer in self.check_layers(layers)]

    def check_layers(self, layers: int | Sequence[int] | None) -> list[int]:
        """Normalise ``layers`` (None = all; negative indices count from the end) or raise."""
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, torch.Tensor):
            layers = layers.tolist()
        if isinstance(layers, numbers.Integral):
            layers = [layers]
        out: list[int] = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not (
                    -self.n_layers <= layer < self.n_layers):
                raise LayerIndexError(
                    f"layer {layer!r} is out of range for a model with {self.n_layers} LM layers "
                    f"(valid: 0..{self.n_layers - 1}, or -{self.n_layers}..-1)"
                )
            layer = int(layer) % self.n_layers
            if layer not in out:
                out.append(layer)
        if not out:
            raise LayerIndexError("layers is empty; pass None for every layer")
        return out

    @contextmanager
    def hooks(self, hooks: Sequence[HookSpec] = ()) -> Iterator["HookedLVLM"]:
        """Context manager adding TransformerLens-style ``(name_or_filter, fn)`` forward hooks.

        Under ``attention="sdpa"``, key masks and row readers (:mod:`.attention_hooks`) of layers without
        other pattern / score hooks are served inside SDPA; every other hook goes to the bridge.
        """
        bridge_hooks, declared = self._attention.route(hooks)
        with self._attention.serving(declared), self.bridge.hooks(fwd_hooks=bridge_hooks):
            yield self

    @staticmethod
    def _check_batch(batch: Any) -> None:
        if not isinstance(batch, Batch):
            raise InputError(f"expected a Batch from HookedLVLM.prepare(), got {type(batch).__name__}")

    def _inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        self._check_batch(batch)
        check_prompt_length(self.config, batch.input_ids, batch.attention_mask, self.image_token_id)
        return batch.to(self.device, self.dtype).model_inputs()

    # ------------------------------------------------------------------ numerical guards
    @staticmethod
    def _nonfinite_real(values: torch.Tensor, real: torch.Tensor) -> bool:
        """True when ``values`` (``[B, T', ...]``, the last ``T'`` positions) is non-finite at a real token."""
        bad = ~torch.isfinite(values.flatten(2).sum(-1, dtype=torch.float32) if values.dim() > 2 else values)
        return bool((bad & real[:, -bad.shape[1]:].to(bad.device)).any())

    def _check_logits(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], hooks: Sequence[HookSpec],
                      what: str = "logits") -> None:
        """Raise :class:`NumericalError` when ``logits`` ``[B, T', V]`` is non-finite at a real token."""
        mask = inputs["attention_mask"].bool()
        if self._nonfinite_real(logits, mask):
            self._raise_nonfinite(inputs, hooks, what)

    def _raise_nonfinite(self, inputs: dict[str, torch.Tensor], hooks: Sequence[HookSpec], what: str) -> NoReturn:
        """Re-run one forward pass with probes on every LM layer and raise :class:`NumericalError`
        naming where NaN / inf first appears (only real tokens are looked at, never padding).

        Runs only once something non-finite was already seen, so healthy passes pay nothing.
        """
        real = inputs["attention_mask"].bool()
        found: list[str] = []

        def probe(label: str, pattern: bool = False) -> Any:
            def fn(x: Any, hook: Any) -> Any:
                if torch.is_tensor(x) and x.is_floating_point():
                    # pattern [B, H, Q, K] -> the row of each query; activations [B, T, D] -> each position
                    if self._nonfinite_real(x.transpose(1, 2) if pattern else x, real):
                        found.append(label)
                        raise StopForward
                return x
            return fn

        probes: list[HookSpec] = [(EMBED_IN, probe(
            "the input embeddings before layer 0 (token embeddings or image features from the vision tower "
            "and projector)"))]
        for layer in range(self.n_layers):
            probes += [(hook_pattern(layer), probe(f"layer {layer} (attention rows)", pattern=True)),
                       (hook_block_out(layer), probe(f"layer {layer} (residual output; its attention rows "
                                                          "are finite)"))]
        probes += [(FINAL_NORM_OUT, probe(f"the final norm after layer {self.n_layers - 1}")),
                   (UNEMBED_OUT, probe("the unembedding (lm_head)"))]
        try:
            with self.hooks([*hooks, *probes]):
                self.hf_model(**inputs, use_cache=False, logits_to_keep=1)
        except StopForward:
            pass
        where = found[0] if found else "not reproduced by a diagnostic re-run of the full sequence"
        raise NumericalError(
            f"{what} are non-finite (NaN/inf); first non-finite: {where}. Check the weights (a corrupted or "
            "overflowing checkpoint, a float16 overflow) and any hooks or edits applied"
        )

    # ------------------------------------------------------------------ inputs
    def prepare(self, images: Any, prompts: str | Sequence[str], *, chat_template: bool = True,
                system_prompt: str | None = _DEFAULT, padding_side: str = "left") -> Batch:
        """Turn images and prompts into a :class:`Batch` with per-sample token groups.

        Args:
            images: one entry per prompt: an image (PIL, path, array ``[H, W, C]``, tensor
                ``[C, H, W]``) or a list of images for a sample with several images.
            prompts: one string per sample (a single string is shared by every image entry).
            chat_template: wrap prompts in the chat template (LLaVA-1.5 style for the tiny models, the
                processor's own for real models). ``False``: prompts are used verbatim and must contain
                one image placeholder (``<image>``) per image.
            system_prompt: system message; defaults to :attr:`system_prompt` (LLaVA-1.5's). ``None``: none.
            padding_side: ``"left"`` (needed for generation) or ``"right"``.

        Returns:
            :class:`Batch` with ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]``, ``pixel_values``
            and ``groups`` (one :class:`TokenGroups` per sample).
        """
        system = self.system_prompt if system_prompt is _DEFAULT else system_prompt
        return prepare_batch(self.processor, self.family, self.config, images, prompts,
                             chat_template=chat_template, system_prompt=system, padding_side=padding_side)

    def processed_image(self, batch: Batch, index: int = 0) -> "np.ndarray":
        """The ``index``-th image as the vision tower saw it: ``[H, W, 3]`` uint8 (normalisation undone).

        Its pixels line up with the ``base`` grid of :class:`ImageTokens` (LLaVA-1.5's only grid; for
        LLaVA-NeXT the low-res view of the whole image, padded to a square).
        """
        pix = batch.pixel_values[index]
        if pix.dim() == 4:  # LLaVA-NeXT: [patches, 3, h, w]; patch 0 is the whole image
            pix = pix[0]
        ip = self.processor.image_processor
        mean = torch.tensor(getattr(ip, "image_mean", None) or [0.0, 0.0, 0.0])[:, None, None]
        std = torch.tensor(getattr(ip, "image_std", None) or [1.0, 1.0, 1.0])[:, None, None]
        img = (pix.float().cpu() * std + mean).clamp(0, 1)
        return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    @torch.no_grad()
    def vision_features(self, images: Sequence[Any], *, batch_size: int = 64) -> torch.Tensor:
        """What the projector reads for each image: the frozen vision tower's features.

        Args:
            images: images (PIL, path, array ``[H, W, C]``, tensor ``[C, H, W]``), one per entry.
            batch_size: images per tower pass.

        Returns:
            ``[n_images, n_tokens, d_vision]`` float32 on the CPU. LLaVA-NeXT: the tiles of each image one after
            another along the token axis (``n_tiles * tokens_per_tile``; padded tiles included), so images of one
            size line up token for token.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"vision_features: batch_size must be a positive integer, got {batch_size!r}")
        images = [to_rgb_image(img, f"image {i}") for i, img in enumerate(images)]
        if not images:
            raise InputError("vision_features: no images")
        out = []
        for start in range(0, len(images), batch_size):
            pix = self.processor.image_processor(images[start:start + batch_size], return_tensors="pt")["pixel_values"]
            n = pix.shape[0]
            feats = projector_inputs(self.hf_model, pix.reshape(-1, *pix.shape[-3:]))
            out.append(feats.reshape(n, -1, feats.shape[-1]).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ forward passes
    @torch.no_grad()
    def forward(self, batch: Batch, *, hooks: Sequence[HookSpec] = (), logits_to_keep: int = 0) -> torch.Tensor:
        """Logits ``[B, T, V]`` (or ``[B, logits_to_keep, V]``) with ``hooks`` active."""
        inputs = self._inputs(batch)
        with self.hooks(hooks):
            out = self.hf_model(**inputs, use_cache=False, logits_to_keep=logits_to_keep)
        self._check_logits(out.logits, inputs, hooks)
        return out.logits

    @torch.no_grad()
    def last_token_logits(self, batch: Batch, variants: Sequence[Sequence[HookSpec]]) -> torch.Tensor:
        """Logits at the last position under each of several hook sets, the rest of the prompt run once:
        ``[len(variants), B, V]``.

        The prompt minus its last token runs once without hooks and fills a KV cache; then the last token
        runs as one decode step per variant, with that variant's hooks active (and the cache trimmed back
        after it). Every position before the last is computed once instead of once per variant, so ``n``
        variants cost about one forward pass plus ``n`` one-token steps instead of ``n`` forward passes.

        Exact for hooks that change only the last position's computation (e.g. a key mask on the last
        query's row, as the fusion-onset probe uses: no earlier position attends to the last one); a hook
        that edits an earlier position's activations would be ignored there, so such hooks must use
        :meth:`forward`. The logits equal ``forward(batch, hooks=v)[:, -1]`` up to float rounding (one
        query's attention and matmuls instead of the whole sequence's).

        Args:
            batch: a batch whose last position is a real (non-image) token of every sample (left padding).
            variants: hook sets, each ``[(name_or_filter, fn)]``; ``[]`` is the unhooked model.

        Raises:
            InputError: a right-padded batch, a one-token prompt or a prompt ending in an image token.
        """
        self._check_batch(batch)
        if not variants:
            raise InputError("last_token_logits: needs at least one hook set ([] is the unhooked model)")
        problem = self._last_token_problem(batch)
        if problem is not None:
            raise InputError(f"last_token_logits: {problem}")
        inputs = self._inputs(batch)
        prefix = dict(inputs)
        prefix["input_ids"] = inputs["input_ids"][:, :-1]
        prefix["attention_mask"] = inputs["attention_mask"][:, :-1]
        out = self.hf_model(**prefix, use_cache=True, logits_to_keep=1)
        cache = out.cache
        step = {"input_ids": inputs["input_ids"][:, -1:], "attention_mask": inputs["attention_mask"]}
        results = []
        for hooks in variants:
            with self.hooks(hooks):
                logits = self.hf_model(**step, cache=cache, use_cache=True, logits_to_keep=1).logits
            cache.crop(-1)  # back to the prefix (a negative count removes that many tokens)
            self._check_logits(logits, inputs, hooks)
            results.append(logits[:, -1])
        return torch.stack(results)

    def decodes_last_token(self, batch: Batch) -> bool:
        """Whether :meth:`last_token_logits` can run ``batch``: every sample's answer query is the batch's last
        position (left padding), a real, non-image token after at least one other position."""
        return self._last_token_problem(batch) is None

    def _last_token_problem(self, batch: Batch) -> str | None:
        """Why ``batch``'s last position cannot be run as one decode step after a cached prefix (``None``: it can)."""
        if not bool(batch.attention_mask[:, -1].all()) or not bool((batch.query_positions == batch.seq_len - 1).all()):
            return ("the last position must be a real token and every sample's query "
                    "(prepare(..., padding_side='left'))")
        if batch.seq_len < 2:
            return "needs prompts of at least 2 positions"
        if bool((batch.input_ids[:, -1] == self.image_token_id).any()):
            return "a prompt ends in an image token (its image must be in the prefix)"
        return None

    def _query_positions(self, batch: Batch, query: Any) -> torch.Tensor:
        """``[B, Q]`` absolute query positions, validated against the attention mask."""
        if isinstance(query, str):
            if query != "last":
                raise InputError(f"query must be 'last', 'generated', a position or positions; got {query!r}")
            return batch.query_positions[:, None]
        q = torch.as_tensor(query, dtype=torch.long)
        if q.dim() == 0:
            q = q.expand(len(batch))[:, None]
        elif q.dim() == 1:
            q = q[None].expand(len(batch), -1)
        if q.dim() != 2 or q.shape[0] != len(batch):
            raise InputError(f"query positions of shape {tuple(q.shape)} do not fit a batch of {len(batch)}")
        t = batch.seq_len
        if ((q < -t) | (q >= t)).any():
            raise InputError(f"query positions {q.tolist()} are outside the sequence (length {t})")
        q = q % t
        if not batch.attention_mask.gather(1, q).bool().all():
            raise InputError(f"query positions {q.tolist()} include padding positions")
        return q

    @torch.no_grad()
    def attention_rows(self, batch: Batch, *, layers: int | Sequence[int] | None = None, query: Any = "last",
                       hooks: Sequence[HookSpec] = (), max_new_tokens: int = 16,
                       dtype: torch.dtype = torch.float32, early_exit: bool = True) -> AttentionRows:
        """Post-softmax attention rows of chosen queries, per layer and head.

        Args:
            batch: from :meth:`prepare`.
            layers: LM layers (default all).
            query: ``"last"`` (the last prompt token of each sample), ``"generated"`` (every query
                of greedy decoding: the last prompt token, then each generated token; runs
                :meth:`generate` with ``max_new_tokens``), an int position, positions ``[Q]`` shared by
                every sample, or ``[B, Q]`` per sample (positions index the padded sequence).
            hooks: extra forward hooks active during the pass (e.g. edits whose effect to measure).
            dtype: storage dtype of the rows (float16 halves memory for long sequences).
            early_exit: stop the forward pass once the deepest requested layer's rows are recorded
                (nothing after it can change the rows); ``False`` runs the whole model.

        Returns:
            :class:`AttentionRows` with ``values`` ``[B, L, H, K]`` for ``"last"`` or an int, else
            ``[B, Q, L, H, K]``. Only these rows are kept; no ``[L, H, T, T]`` cache is built. Under
            ``attention="sdpa"`` the rows are computed from each layer's q and k inside SDPA attention (no
            pattern exists); a layer whose pattern or scores one of ``hooks`` edits runs eager and its rows
            are sliced from the (edited) pattern.
        """
        self._check_batch(batch)
        layer_list = self.check_layers(layers)
        if isinstance(query, str) and query == "generated":
            gen = self.generate(batch, max_new_tokens=max_new_tokens, hooks=hooks, record_rows=layer_list,
                                rows_dtype=dtype)
            assert gen.rows is not None
            return gen.rows
        qpos = self._query_positions(batch, query)
        recorder = RowRecorder(layer_list, qpos, dtype=dtype, stop_after=early_exit)
        inputs = self._inputs(batch)
        try:
            with self.hooks([*hooks, *recorder.hooks()]):
                self.hf_model(**inputs, use_cache=False, logits_to_keep=1)
        except StopForward:
            pass
        values = recorder.stacked()  # [B, Q, L, H, K]
        if recorder.nonfinite_layers():  # query positions are real tokens (checked above), never padding
            self._raise_nonfinite(inputs, hooks, f"attention rows of layer(s) {recorder.nonfinite_layers()}")
        if isinstance(query, str) or torch.as_tensor(query).dim() == 0:
            values, qpos = values[:, 0], qpos[:, 0]
        return AttentionRows(values, tuple(layer_list), qpos, list(batch.groups),
                             meta={"query": query if isinstance(query, str) else "positions"})

    @torch.no_grad()
    def generate(self, batch: Batch, *, max_new_tokens: int = 64, hooks: Sequence[HookSpec] = (),
                 record_rows: bool | int | Sequence[int] = False, rows_dtype: torch.dtype = torch.float32,
                 stop_at_eos: bool = True) -> Generation:
        """Greedy decoding with ``hooks`` active at prefill and at every decode step.

        Hooks see ``hook_pattern`` / ``hook_attn_scores`` as ``[B, H, Q, K]`` with ``Q = T`` at prefill
        and ``Q = 1`` afterwards; the queries are always the last ``Q`` of the ``K`` positions, and key
        positions never move (the KV cache keeps every token), so a key mask computed on the
        prompt's positions stays valid for the whole generation.

        Args:
            batch: from :meth:`prepare` with ``padding_side="left"``.
            max_new_tokens: tokens to decode (default 64, as in the paper).
            hooks: ``(name_or_filter, fn)`` forward hooks.
            record_rows: ``True`` (every layer) or layers whose rows of every decoding query to keep.
            stop_at_eos: stop a sample at EOS (later tokens are padding).
        """
        self._check_batch(batch)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if batch.padding_side != "left" and not bool(batch.attention_mask[:, -1].all()):
            raise InputError("generation needs left padding: prepare(..., padding_side='left')")
        limit = max_positions(self.config)
        if limit is not None and batch.seq_len + max_new_tokens > limit:
            raise InputError(
                f"prompt of {batch.seq_len:,} positions + max_new_tokens={max_new_tokens:,} needs "
                f"{batch.seq_len + max_new_tokens:,} positions but the model takes at most {limit:,} "
                f"(text_config.max_position_embeddings); use max_new_tokens <= {max(limit - batch.seq_len, 0):,}"
            )
        from transformers import GenerationConfig

        tok = self.tokenizer
        eos = tok.eos_token_id if stop_at_eos else None
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=eos, pad_token_id=pad, bos_token_id=tok.bos_token_id)
        recorder = None
        bad: list[torch.Tensor] = []  # per-step [B] flags, kept on the device (no sync while decoding)

        def watch_logits(logits: torch.Tensor, hook: Any) -> torch.Tensor:
            last = logits[:, -1]  # the position decoded from: a real token (left padding)
            bad.append(~torch.isfinite(last.sum(-1, dtype=torch.float32)))
            return logits

        all_hooks = [*hooks, (UNEMBED_OUT, watch_logits)]
        if record_rows is not False:
            layer_list = self.check_layers(None if record_rows is True else record_rows)
            recorder = RowRecorder(layer_list, None, dtype=rows_dtype)
            all_hooks += recorder.hooks()
        inputs = self._inputs(batch)
        with self.hooks(all_hooks):
            sequences = self.hf_model.generate(**inputs, generation_config=config, use_cache=True)
        if bad and bool(torch.stack(bad).any()):
            # re-run the prompt and the tokens decoded so far in one pass to find the first bad layer
            full = dict(inputs, input_ids=sequences, attention_mask=torch.cat(
                [inputs["attention_mask"], torch.ones_like(sequences[:, batch.seq_len:])], 1))
            self._raise_nonfinite(full, hooks, "logits during generation")
        sequences = sequences.cpu()
        new = sequences[:, batch.seq_len:]
        if eos is not None:
            is_eos = new == eos
            ended = is_eos.cumsum(1) > 0
            after = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], 1)  # strictly after EOS
            new = new.masked_fill(after, pad)
            n_tokens = (~after).sum(1)
        else:
            n_tokens = torch.full((new.shape[0],), new.shape[1])
        texts = tok.batch_decode(new, skip_special_tokens=True)
        rows = None
        if recorder is not None:
            values = recorder.stacked()  # [B, S, L, H, K]
            steps = values.shape[1]
            qpos = batch.seq_len - 1 + torch.arange(steps)[None].expand(len(batch), -1)
            valid = torch.arange(steps)[None] < n_tokens[:, None]
            rows = AttentionRows(values, recorder.layers, qpos, list(batch.groups), valid=valid,
                                 meta={"query": "generated"})
        return Generation(sequences, new, texts, n_tokens, rows)
