"""GPU check: 7B-shaped random LLaVA-1.5 and LLaVA-NeXT models on one device, checked against HF and timed.

One command, no download: ``python benchmarks/gpu_check.py`` (about 8 minutes or less on one large GPU;
``--time-budget-s`` bounds it). The test suite runs the same code with ``--scale cpu-tiny`` on the CPU
(tests/test_gpu_check.py), so the script cannot rot between GPU runs.

**Models** (random weights, seed 0, built directly on the device: ``torch.device`` context, no CPU copy).

* ``llava-1.5-7b-shape``: ``LlavaForConditionalGeneration``, CLIP ViT-L/14 at 336 px (24 layers, width 1024,
  576 image tokens), Llama LM 32 layers x 32 heads, d_model 4096, MLP 11008, vocabulary 32064.
* ``llava-next-7b-shape``: ``LlavaNextForConditionalGeneration`` (any-resolution tiles, LLaVA-1.6's grid
  pinpoints), the same vision tower, Mistral LM 32 layers x 32 heads with 8 KV heads (grouped), d_model 4096,
  MLP 14336.

``--scale full`` builds them in bfloat16 (CUDA only); ``--scale cpu-tiny`` builds the registry's tiny shapes
(``models.tiny``: 4 layers x 4 heads, width 128; the NeXT one with 2 KV heads) in float32.

**Checks** (the script exits 1 when one fails or cannot run).

1. *Rows*: ``HookedLVLM.attention_rows`` (SDPA path: rows from q and k, ``rows_from_qk``) against the rows HF's
   own ``eager_attention_forward`` computes for the last prompt token, **on the same inputs**: the untouched
   HF model runs with an attention function registered here that returns HF's SDPA output (so every layer
   sees exactly the hidden states the project's SDPA path sees) and, for each LM layer, also calls HF's eager
   attention on the last query to read its post-softmax row. So the rows differ only by how the two compute
   ``softmax((q k^T) * c)`` from the same q and k. Also recorded: the largest difference of the last-token
   logits of the bridged model and of HF's SDPA model (expected 0: the premise "same inputs").

   Tolerance. float32: ``1e-5`` absolute (tests/tolerances.py ``SDPA_ROWS_ATOL``: two accumulation orders of
   the ``q . k`` sums; its derivation assumes score spans up to 50, and the span ``S`` is reported).
   bfloat16: both sides round the ``q k^T`` GEMM output to bf16 (float32 accumulation inside), then the scaled
   scores to bf16, and cast the float32 softmax back to bf16. Two accumulation orders agree to far below
   a bf16 ulp, so a score differs only where a rounding falls on the other side: by one ulp,
   at most ``2^-7 |s|`` (bf16 keeps 8 significant bits: unit roundoff ``u = 2^-8``, ulp ``<= 2u |s|``), twice
   (product, then scaling): ``|ds| <= 2^-6 S`` with ``S`` the row's largest ``|score|`` over visible keys.
   A softmax entry moves by ``p_j |ds_j - sum_k p_k ds_k| <= 2^-5 S p_j`` (first order), and the cast back
   to bf16 by one more ulp, ``2^-7 p_j``. Per entry: ``|dp_j| <= 2^-7 (1 + 4 S) max(p_j, p'_j)``; asserted
   for every entry, with ``S`` measured per (sample, layer, head) row in float32 from the same q and k.
   A wrong query row, KV-head mapping or token position changes entries by ``O(p)``; two controls show the
   tolerance can fail: the project's rows rolled by one head, and by one key, must each break it (else the
   check fails as not discriminating).
2. *Generation*: greedy token ids of ``HookedLVLM.generate`` (no hooks but the logits guard) equal HF's
   ``generate`` on the untouched model with SDPA attention (``--new-tokens`` steps, no EOS stop). float32:
   identical. bfloat16: identical, or diverging first at a step where HF's own top-2 logit gap is within two
   bf16 ulps of the top logit (a tie that any reordering may flip; reported as ``tie``).

**Measurements** (best of ``--repeats`` calls after one warm-up; CUDA synchronised; per call the peak memory
above what was allocated before it: ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS on the CPU):
HF SDPA ``generate`` on the untouched model (the reference), ``attention_rows`` (all layers, last token),
the bridged model's ``generate``, CleanSight one-pass ``generate`` (calibrated on random clean inputs; as
fitted, and with every sample flagged), CleanSight ``mask_scope="all_layers"`` (every sample flagged), the
authors'-style baseline (one sample at a time, eager attention, rows of every layer at every decoding
query), the stealing table (clean + BadNet-triggered copies, all layers) in samples per second, and on CUDA
the largest batch that fits (doubling until out of memory, capped at ``--max-batch``) for CleanSight
one-pass generation and for ``attention_rows``. Model build, calibration and weight fingerprinting are
timed but are not part of the ratios.

Every phase is guarded: a phase that raises records its error in the JSON and the script goes on; a phase
that would start after its model's share of ``--time-budget-s`` is skipped with a reason. The JSON is
rewritten after every phase, so a killed run leaves what it measured. Exit status: 0 when every check
passed and no phase failed, 1 when a check failed, errored or was skipped, 2 when only a measurement failed.

Run: ``python benchmarks/gpu_check.py`` (CUDA; writes ``benchmarks/results/gpu_check.json``, refusing to
overwrite it without ``--overwrite``), ``python benchmarks/gpu_check.py --scale cpu-tiny --device cpu --out
/tmp/gpu_check.json`` (CPU, seconds).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # bench_common.py sits next to this script
    sys.path.insert(0, _HERE)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
#: Name of the reference attention function registered with transformers (HF SDPA output + HF eager rows).
REFERENCE_IMPL = "gpu_check_sdpa_with_eager_rows"
#: float32 rows tolerance: tests/tolerances.py SDPA_ROWS_ATOL (same inputs, two accumulation orders).
F32_ROWS_ATOL = 1e-5
#: ulp of a 16-bit float relative to its value (bf16: 8 significant bits; fp16: 11).
ULP_REL = {"torch.bfloat16": 2.0 ** -7, "torch.float16": 2.0 ** -10}
PROMPTS = ("what color is it?", "describe this image in a short sentence.", "shape?",
           "how many objects are in this picture?")


# ------------------------------------------------------------------------------------------ settings
@dataclass
class Scale:
    """Everything ``--scale`` decides."""

    name: str
    dtype: str
    batch: int                 # samples per timed call
    new_tokens: int            # greedy steps per generation
    repeats: int               # timed calls after the warm-up
    calibration: int           # clean samples for CleanSight
    detection_layers: list[int]
    stealing_n: int            # clean samples of the stealing table (plus as many triggered copies)
    stealing_batch: int
    max_batch: int             # cap of the largest-batch search
    image_sizes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


SCALES = {
    "full": Scale("full", "bfloat16", batch=8, new_tokens=16, repeats=2, calibration=16,
                  detection_layers=[15], stealing_n=32, stealing_batch=16, max_batch=256,
                  image_sizes={"llava": [(336, 336), (500, 375)],
                               "llava_next": [(336, 336), (640, 320), (320, 640), (500, 500)]}),
    "cpu-tiny": Scale("cpu-tiny", "float32", batch=2, new_tokens=3, repeats=1, calibration=6,
                      detection_layers=[1, 2], stealing_n=2, stealing_batch=2, max_batch=0,
                      image_sizes={"llava": [(64, 64), (48, 80)], "llava_next": [(48, 80), (90, 40)]}),
}


def model_config(kind: str, scale: str):
    """HF config of ``kind`` (``"llava"`` / ``"llava_next"``) at ``scale``."""
    from cleansight_analysis.models import tiny

    if scale == "cpu-tiny":
        return tiny.tiny_llava_config() if kind == "llava" else tiny.tiny_llava_next_config()
    if kind == "llava":  # llava-hf/llava-1.5-7b-hf's shapes
        cfg = tiny.tiny_llava_config(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24,
                                     vision_heads=16, hidden=4096, layers=32, heads=32, vocab_size=32064,
                                     intermediate=11008, initializer_range=0.02)
        cfg.text_config.max_position_embeddings = 4096
        cfg.text_config.rms_norm_eps = 1e-5
    else:  # llava-hf/llava-v1.6-mistral-7b-hf's shapes
        cfg = tiny.tiny_llava_next_config(
            image_size=336, patch_size=14, vision_hidden=1024, hidden=4096, layers=32, heads=32, kv_heads=8,
            vocab_size=32064, initializer_range=0.02,
            grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)))
        cfg.vision_config.num_hidden_layers = 24
        cfg.vision_config.num_attention_heads = 16
        cfg.text_config.intermediate_size = 14336
        cfg.text_config.max_position_embeddings = 32768
    cfg.vision_config.intermediate_size = 4 * cfg.vision_config.hidden_size
    return cfg


MODELS = {"llava": "llava-1.5", "llava_next": "llava-next"}


def model_label(kind: str, scale: str) -> str:
    return f"{MODELS[kind]}-{'7b-shape' if scale == 'full' else scale}"


# ------------------------------------------------------------------------------------------ helpers
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field_name: str) -> int:
    from bench_common import rss_kib  # noqa: E402 - benchmarks/ is on sys.path when run as a script

    return rss_kib(field_name, missing=-1)


def _reset_peak_rss() -> bool:
    from bench_common import reset_peak_rss  # noqa: E402 - benchmarks/ is on sys.path when run as a script

    return reset_peak_rss()


class Memory:
    """Peak memory of one call above what was in use before it (CUDA allocator, or RSS on the CPU)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self) -> "Memory":
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.exact = _reset_peak_rss()
            self.before = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _rss_kib("VmHWM") * 1024

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.before) / 2 ** 20


def timed(fn: Callable[[], Any], device, batch: int, repeats: int) -> tuple[dict, Any]:
    """``(record, last output)``: one warm-up call, then ``repeats`` timed calls."""
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        out = fn()
        _sync(device)
        warm = time.perf_counter() - start
        times, cpu, extra = [], [], []
        for _ in range(repeats):
            del out
            with Memory(device) as mem:
                start, c0 = time.perf_counter(), time.process_time()
                out = fn()
                _sync(device)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - c0)
            extra.append(mem.extra_mib)
    best = min(times)
    rec = {"batch": batch, "warmup_s": round(warm, 4), "best_s": round(best, 4),
           "median_s": round(sorted(times)[len(times) // 2], 4), "all_s": [round(t, 4) for t in times],
           "best_cpu_s": round(min(cpu), 4), "samples_per_s": round(batch / best, 3),
           "peak_extra_mib": round(max(extra), 1), "peak_extra_mib_per_sample": round(max(extra) / batch, 2),
           "memory": "torch.cuda.max_memory_allocated above the allocation before the call"
           if device.type == "cuda" else "peak RSS (VmHWM) above RSS before the call"}
    return rec, out


def random_images(sizes: list[tuple[int, int]], n: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % len(sizes)][1], sizes[i % len(sizes)][0], 3),
                                         dtype=np.uint8)) for i in range(n)]


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory, whether torch raises it as ``OutOfMemoryError`` or cuBLAS as a RuntimeError."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("out of memory", "ALLOC_FAILED"))


def doubling_search(probe: Callable[[int], dict], start: int, cap: int, until: float,
                    oom: Callable[[BaseException], bool], cleanup: Callable[[], None] = lambda: None) -> dict:
    """Largest batch ``start * 2^k <= cap`` for which ``probe(batch)`` runs: stop at the first out-of-memory
    (``oom(exc)``; other errors propagate), at the cap, or when the next probe (estimated at 2.5x the last
    one's time) would end after ``until``."""
    fits, stopped, tried, b, last = 0, None, [], start, 0.0
    while b <= cap:
        if time.perf_counter() + 2.5 * last > until:
            stopped = f"time budget (the probe at batch {b} was estimated at {2.5 * last:.0f} s)"
            break
        t0 = time.perf_counter()
        try:
            tried.append(probe(b))
            fits, b = b, 2 * b
        except Exception as exc:  # noqa: BLE001 - only out-of-memory ends the search quietly
            if not oom(exc):
                raise
            stopped = f"out of memory at batch {b}: {str(exc)[:200]}"
            break
        finally:
            last = time.perf_counter() - t0
            cleanup()
    return {"largest_fitting": fits, "stopped": stopped or f"cap {cap}", "tried": tried}


def prompts_for(n: int, offset: int = 0) -> list[str]:
    return [PROMPTS[(offset + i) % len(PROMPTS)] for i in range(n)]


def clean_samples(sizes, n: int, seed: int, prefix: str):
    from cleansight_analysis.data.base import Sample

    return [Sample(im, p, "x", sample_id=f"{prefix}{i}")
            for i, (im, p) in enumerate(zip(random_images(sizes, n, seed), prompts_for(n, seed)))]


# ------------------------------------------------------------------------------------------ reference
class EagerRows:
    """The reference attention function: HF's SDPA output for every attention module, and for the LM layers
    also HF's own ``eager_attention_forward`` row of the last query (post-softmax, in the model dtype) and that
    row's score span ``S`` (largest ``|q . k| * scaling`` over visible keys, float32)."""

    def __init__(self, layers: dict[int, int]):
        self.layers = layers  # id(attention module) -> LM layer
        self.rows: dict[int, Any] = {}
        self.span: dict[int, Any] = {}

    def __call__(self, module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        import torch
        from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

        layer = self.layers.get(id(module))
        if layer is not None:
            eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward")
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            q_last = query[:, :, -1:]
            visible = None
            additive = None
            if attention_mask is not None:
                visible = attention_mask[:, :, -1:, :]
                if visible.dtype == torch.bool:  # HF's SDPA mask (True = may attend) as eager's additive mask
                    additive = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill(
                        ~visible, torch.finfo(query.dtype).min)
                else:
                    additive, visible = visible, visible > torch.finfo(visible.dtype).min / 2
            _, weights = eager(module, q_last, key, value, additive, scaling=scale, dropout=0.0)
            self.rows[layer] = weights[:, :, 0].detach()                       # [B, H, K]
            k = repeat_kv(key, query.shape[1] // key.shape[1]).float()
            s = (q_last.float() @ k.transpose(-1, -2))[:, :, 0] * scale          # [B, H, K]
            if visible is not None:
                s = s.masked_fill(~visible[:, :, 0].expand_as(s), 0.0)
            self.span[layer] = s.abs().amax(-1)                                 # [B, H]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)


def register_reference(fn: EagerRows) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REFERENCE_IMPL, fn)
    AttentionMaskInterface.register(REFERENCE_IMPL, sdpa_mask)


def lm_attention_layers(hf) -> dict[int, int]:
    layers = hf.model.language_model.layers
    return {id(block.self_attn): i for i, block in enumerate(layers)}


# ------------------------------------------------------------------------------------------ the run
class Run:
    """Phases, their records and the JSON file."""

    def __init__(self, args: argparse.Namespace, scale: Scale, device, out: Path):
        self.args, self.scale, self.device, self.out = args, scale, device, out
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.time_budget_s
        self.record: dict[str, Any] = {"models": {}, "checks": {}, "errors": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self) -> None:
        self.record["elapsed_s"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=str, allow_nan=True) + "\n")
        os.replace(tmp, self.out)

    def phase(self, model: str, name: str, fn: Callable[[], dict], *, until: float, check: bool = False) -> dict | None:
        """Run ``fn`` unless ``until`` (a perf_counter deadline) has passed; record its result or its error."""
        phases = self.record["models"][model]["phases"]
        if time.perf_counter() > until:
            phases[name] = {"ok": False, "skipped": f"time budget: {self.elapsed():.0f} s used of "
                                                    f"{self.args.time_budget_s:.0f} s"}
            print(f"[{model}] {name}: skipped (time budget)", flush=True)
            self.write()
            return None
        start = time.perf_counter()
        try:
            rec = fn()
            rec = {"ok": True, **rec}
        except Exception as exc:  # noqa: BLE001 - a failed phase is recorded, the run goes on
            rec = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
            self.record["errors"].append(f"{model}/{name}: {type(exc).__name__}: {str(exc)[:300]}")
            if self.device.type == "cuda":
                gc.collect()
                import torch

                torch.cuda.empty_cache()
        rec["phase_s"] = round(time.perf_counter() - start, 2)
        phases[name] = rec
        if check:
            self.record["checks"][f"{model}/{name}"] = bool(rec.get("passed", False))
        status = "ok" if rec["ok"] else f"FAILED {rec['error'][:300]}"
        if check and rec["ok"]:
            status = "passed" if rec.get("passed") else "CHECK FAILED"
        print(f"[{model}] {name}: {status} ({rec['phase_s']:.1f} s)", flush=True)
        self.write()
        return rec if rec["ok"] else None


def check_model(run: Run, kind: str, until: float) -> None:
    import torch

    import cleansight_analysis as cs
    from cleansight_analysis.defenses.cleansight import CleanSight, CleanSightConfig
    from cleansight_analysis.inputs.batch import prepare_batch
    from cleansight_analysis.inputs.templates import LLAVA_SYSTEM_PROMPT
    from cleansight_analysis.models import tiny
    from cleansight_analysis.models.families import family_for

    sc, dev = run.scale, run.device
    dtype = getattr(torch, sc.dtype)
    name = model_label(kind, sc.name)
    run.record["models"][name] = {"phases": {}}
    state: dict[str, Any] = {}
    sizes = sc.image_sizes[kind]

    def build() -> dict:
        import transformers

        cfg = model_config(kind, sc.name)
        cfg._attn_implementation = "eager"
        cls = getattr(transformers, cfg.architectures[0])
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.device(dev):  # weights are created on the device: no CPU copy of 7B parameters
            hf = cls._from_config(cfg, dtype=dtype).eval()
        _sync(dev)
        seconds = time.perf_counter() - start
        tokenizer = tiny.build_word_tokenizer(vocab_size=cfg.text_config.vocab_size)
        state["hf"], state["proc"] = hf, tiny.processor_for(cfg, tokenizer)
        state["family"] = family_for(cfg.architectures[0])
        n_params = sum(p.numel() for p in hf.parameters())
        devices = sorted({str(p.device) for p in hf.parameters()})
        t = cfg.text_config
        shape = {"architecture": cfg.architectures[0], "lm": type(t).__name__, "layers": t.num_hidden_layers,
                 "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads, "d_model": t.hidden_size,
                 "mlp": t.intermediate_size, "vocab": t.vocab_size, "vision_layers": cfg.vision_config.num_hidden_layers,
                 "vision_width": cfg.vision_config.hidden_size, "image_size": cfg.vision_config.image_size,
                 "patch_size": cfg.vision_config.patch_size, "initializer_range": t.initializer_range}
        if kind == "llava_next":
            shape["grid_pinpoints"] = cfg.image_grid_pinpoints
        return {"seconds": round(seconds, 2), "parameters": n_params, "dtype": sc.dtype, "devices": devices,
                "weights_gib": round(sum(p.numel() * p.element_size() for p in hf.parameters()) / 2 ** 30, 2),
                "shape": shape}

    if run.phase(name, "build", build, until=until) is None:
        return
    hf, proc = state["hf"], state["proc"]
    images, prompts = random_images(sizes, sc.batch, seed=1), prompts_for(sc.batch)
    batch = prepare_batch(proc, state["family"], hf.config, images, prompts, chat_template=True,
                          system_prompt=LLAVA_SYSTEM_PROMPT, padding_side="left")
    inputs = batch.to(dev, dtype).model_inputs()
    tok = proc.tokenizer

    def gen_config():
        from transformers import GenerationConfig

        return GenerationConfig(max_new_tokens=sc.new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)

    # -- the untouched HF model: reference rows, logits, generation and timing (before the bridge wraps it)
    def reference() -> dict:
        ref = EagerRows(lm_attention_layers(hf))
        register_reference(ref)
        hf.set_attn_implementation(REFERENCE_IMPL)
        with torch.no_grad():
            hf(**inputs, use_cache=False, logits_to_keep=1)
        state["ref_rows"] = torch.stack([ref.rows[i] for i in sorted(ref.rows)], 1).float().cpu()   # [B, L, H, K]
        state["ref_span"] = torch.stack([ref.span[i] for i in sorted(ref.span)], 1).float().cpu()   # [B, L, H]
        ref.rows.clear()
        ref.span.clear()
        hf.set_attn_implementation("sdpa")
        with torch.no_grad():
            state["ref_logits"] = hf(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu()
            out = hf.generate(**inputs, generation_config=gen_config(), use_cache=True, return_dict_in_generate=True,
                              output_logits=True)
        state["ref_tokens"] = out.sequences[:, batch.seq_len:].cpu()
        state["ref_step_logits"] = torch.stack(out.logits, 1).float().cpu()                          # [B, S, V]
        rec, _ = timed(lambda: hf.generate(**inputs, generation_config=gen_config(), use_cache=True), dev,
                       sc.batch, sc.repeats)
        state["timings"] = {"hf_sdpa_generate": rec}
        return {"prompt_tokens": batch.seq_len, "real_tokens": batch.attention_mask.sum(1).tolist(),
                "rows_shape": list(state["ref_rows"].shape)}

    if run.phase(name, "reference", reference, until=until) is None:
        return
    start = time.perf_counter()
    model = cs.load_lvlm(hf, processor=proc, device=dev, name=name)  # wraps hf in place; attention="sdpa"
    state["wrap_s"] = round(time.perf_counter() - start, 2)

    def rows_check() -> dict:
        mine = model.attention_rows(batch).values.float().cpu()                                       # [B, L, H, K]
        ref, span = state["ref_rows"], state["ref_span"]
        ulp = ULP_REL.get(str(dtype))

        def tolerance(rows):
            if ulp is None:  # float32
                return torch.full_like(rows, F32_ROWS_ATOL)
            return ulp * (1 + 4 * span[..., None]) * torch.maximum(rows, ref)

        diff, tol = (mine - ref).abs(), tolerance(mine)
        with torch.no_grad():
            logits = model.forward(batch, logits_to_keep=1)[:, -1].float().cpu()
        # controls: rows of the neighbouring head, and rows shifted by one key, must fail the same tolerance
        controls = {what: not bool(((rows - ref).abs() <= tolerance(rows)).all())
                    for what, rows in (("next_head", mine.roll(1, dims=2)), ("keys_shifted", mine.roll(1, dims=3)))}
        within = bool((diff <= tol).all())
        rec = {"shape": list(mine.shape), "max_abs_err": float(diff.max()), "score_span_max": float(span.max()),
               "entries_differing": int((diff > 0).sum()), "entries": diff.numel(),
               "max_err_over_tolerance": round(float((diff / tol.clamp_min(1e-30)).max()), 6),
               "within_tolerance": within, "controls_fail_tolerance": controls,
               "premise_last_logits_max_abs_diff_vs_hf_sdpa": float((logits - state["ref_logits"]).abs().max())}
        if ulp is None:
            rec["tolerance_rule"] = ("|dp| <= 1e-5 (tests/tolerances.py SDPA_ROWS_ATOL; derived for score spans <= 50; "
                                     "float32)")
            rec["score_span_within_derivation"] = bool(span.max() <= 50)
        else:
            rec["tolerance_rule"] = (f"|dp| <= {ulp:g} * (1 + 4 S) * max(p, p') per entry, S = the row's largest "
                                     f"|score| ({sc.dtype} ulp <= {ulp:g} |x|; see the module docstring)")
        return {**rec, "passed": within and all(controls.values())}

    run.phase(name, "rows_check", rows_check, until=until + 1e9, check=True)

    def generation_check() -> dict:
        gen = model.generate(batch, max_new_tokens=sc.new_tokens, stop_at_eos=False)
        mine, ref = gen.tokens.cpu(), state["ref_tokens"]
        rec = {"tokens": mine.tolist(), "hf_tokens": ref.tolist(), "identical": bool(torch.equal(mine, ref))}
        if rec["identical"]:
            return {**rec, "passed": True}
        if sc.dtype == "float32" or mine.shape != ref.shape:
            return {**rec, "passed": False}
        ulp = ULP_REL[str(dtype)]
        ties = []
        for b in range(mine.shape[0]):
            bad = (mine[b] != ref[b]).nonzero()
            if len(bad) == 0:
                continue
            step = int(bad[0])
            top2 = state["ref_step_logits"][b, step].topk(2).values
            gap, allowed = float(top2[0] - top2[1]), 2 * ulp * float(top2[0].abs())
            ties.append({"sample": b, "step": step, "hf_top2_gap": gap, "allowed_gap": allowed, "tie": gap <= allowed})
        return {**rec, "divergences": ties, "passed": all(t["tie"] for t in ties)}

    run.phase(name, "generation_check", generation_check, until=until + 1e9, check=True)

    def calibrate() -> dict:
        start = time.perf_counter()
        from cleansight_analysis.models.fingerprint import weights_fingerprint

        weights_fingerprint(model)
        fp_s = time.perf_counter() - start
        layers = [min(layer, model.n_layers - 1) for layer in sc.detection_layers]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            defense = CleanSight(config=CleanSightConfig(layers=layers, batch_size=sc.batch)).fit(
                model, clean_samples(sizes, sc.calibration, seed=100, prefix="cal"))
            fit_s = time.perf_counter() - start
        state["defense"] = defense
        return {"fingerprint_s": round(fp_s, 2), "fit_s": round(fit_s, 2), "layers": layers,
                "clean_samples": sc.calibration, "gamma": defense.calibration.gamma, "tau": defense.calibration.tau,
                "warnings": sorted({str(w.message)[:200] for w in caught})}

    run.phase(name, "calibrate", calibrate, until=until)

    def timings() -> dict:
        out = state["timings"]
        out["attention_rows"], _ = timed(lambda: model.attention_rows(batch), dev, sc.batch, sc.repeats)
        out["bridged_generate"], _ = timed(
            lambda: model.generate(batch, max_new_tokens=sc.new_tokens, stop_at_eos=False), dev, sc.batch, sc.repeats)
        defense = state.get("defense")
        if defense is not None:
            flagged = copy.copy(defense)
            flagged.calibration = copy.copy(defense.calibration)
            flagged.calibration.gamma = float("-inf")
            all_layers = copy.copy(flagged)
            all_layers.config = replace(defense.config, mask_scope="all_layers")
            for key, d in (("cleansight_one_pass", defense), ("cleansight_one_pass_all_flagged", flagged),
                           ("cleansight_all_layers_all_flagged", all_layers)):
                rec, res = timed(lambda d=d: d.generate(model, batch, max_new_tokens=sc.new_tokens), dev,
                                 sc.batch, sc.repeats)
                rec["flagged"] = int(res.flags.sum())
                rec["pruned_mean"] = round(sum(int(p.numel()) for p in res.pruned) / len(res.pruned), 1)
                rec["passes"] = res.info["passes"]
                out[key] = rec
        else:
            out["cleansight"] = {"skipped": "calibration failed"}
        singles = [model.prepare([im], [p]) for im, p in zip(images, prompts)]

        def authors() -> Any:
            return [model.generate(one, max_new_tokens=sc.new_tokens, record_rows=True, stop_at_eos=False)
                    for one in singles][-1]

        model.attention = "eager"
        try:
            out["authors_style"], _ = timed(authors, dev, sc.batch, sc.repeats)
        finally:
            model.attention = "sdpa"
        out["authors_style"]["note"] = ("one sample at a time, eager attention, rows of every layer at every "
                                        "decoding query recorded (generate(record_rows=True))")
        ref = out["hf_sdpa_generate"]["best_s"]
        ratios = {k: round(v["best_s"] / ref, 3) for k, v in out.items()
                  if isinstance(v, dict) and "best_s" in v and k != "attention_rows"}  # generation modes only
        return {"timings": out, "ratio_to_hf_sdpa_generate": ratios, "new_tokens": sc.new_tokens,
                "repeats": sc.repeats, "wrap_s": state["wrap_s"]}

    run.phase(name, "timings", timings, until=until)

    def stealing() -> dict:
        from cleansight_analysis.attacks import get_attack
        from cleansight_analysis.attention import StealingSettings, stealing_tables

        attack = get_attack("badnet")
        settings = StealingSettings(batch_size=sc.stealing_batch)
        samples = clean_samples(sizes, sc.stealing_n, seed=200, prefix="st")
        stealing_tables(model, samples[:1], attack, settings=settings, progress=False)  # warm-up
        _sync(dev)
        with Memory(dev) as mem:
            start = time.perf_counter()
            table = stealing_tables(model, samples, attack, settings=settings, progress=False)
            _sync(dev)
            seconds = time.perf_counter() - start
        n = 2 * len(samples)
        return {"samples": n, "table_rows": len(table), "seconds": round(seconds, 3),
                "samples_per_s": round(n / seconds, 3), "batch_size": sc.stealing_batch, "layers": "all",
                "peak_extra_mib": round(mem.extra_mib, 1)}

    run.phase(name, "stealing_table", stealing, until=until)

    def largest_batch() -> dict:
        if dev.type != "cuda":
            return {"skipped": "CUDA only: on the CPU an out-of-memory ends in the OS killing the process, "
                               "not in an exception"}
        defense = state.get("defense")
        result = {}
        for what in ("cleansight_one_pass", "attention_rows"):
            if what == "cleansight_one_pass" and defense is None:
                result[what] = {"skipped": "calibration failed"}
                continue

            def probe(b: int, what: str = what) -> dict:
                big = model.prepare(random_images(sizes, b, seed=300 + b), prompts_for(b))
                with Memory(dev) as mem:
                    t0 = time.perf_counter()
                    if what == "attention_rows":
                        model.attention_rows(big)
                    else:
                        defense.generate(model, big, max_new_tokens=sc.new_tokens)
                    _sync(dev)
                    seconds = time.perf_counter() - t0
                return {"batch": b, "seconds": round(seconds, 3), "peak_extra_mib": round(mem.extra_mib, 1),
                        "samples_per_s": round(b / seconds, 3)}

            def cleanup() -> None:
                gc.collect()
                torch.cuda.empty_cache()

            result[what] = doubling_search(probe, max(1, sc.batch), sc.max_batch, until, is_oom, cleanup)
        return result

    run.phase(name, "largest_batch", largest_batch, until=until)
    state.clear()  # the model goes with this frame; main() collects before the next model is built


def device_info(device) -> dict:
    import torch

    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    cuda=torch.version.cuda)
    else:
        from bench_common import machine  # noqa: E402 - benchmarks/ is on sys.path when run as a script

        info.update(machine(), torch_threads=torch.get_num_threads())
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run (default 420 for full, 300 for cpu-tiny)")
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="override the scale's dtype (full: bfloat16, cpu-tiny: float32); e.g. cpu-tiny in "
                             "bfloat16 exercises the bf16 tolerances on the CPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU run shares its machine: one thread, as every benchmark here
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: CUDA requested but not available", file=sys.stderr)
        return 2
    if args.scale == "full" and device.type != "cuda":
        print("gpu_check: error: --scale full builds two 7B-shaped models in bfloat16 and needs a CUDA device; "
              "use --scale cpu-tiny on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"gpu_check: error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if args.time_budget_s is None:
        args.time_budget_s = 420.0 if args.scale == "full" else 300.0
    scale = replace(SCALES[args.scale], dtype=args.dtype or SCALES[args.scale].dtype)
    from cleansight_analysis._runtime import disable_torchvision_autoinstall, quiet_transformers
    from cleansight_analysis.manifest import build_manifest

    disable_torchvision_autoinstall()
    quiet_transformers()
    run = Run(args, scale, device, out)
    settings = {**{k: v for k, v in vars(args).items()}, "scale_settings": asdict(scale)}
    run.record = {"manifest": build_manifest(settings=settings), "device": device_info(device), **run.record}
    run.write()
    n = len(args.models)
    for i, kind in enumerate(args.models):
        until = run.t0 + args.time_budget_s * (i + 1) / n  # each model gets its share; checks always run
        try:
            check_model(run, kind, until)
        except Exception as exc:  # noqa: BLE001 - recorded; the next model still runs
            label = model_label(kind, scale.name)
            run.record["errors"].append(f"{label}: {type(exc).__name__}: {exc}"[:2000])
            run.record["models"].setdefault(label, {})["error"] = traceback.format_exc()[-4000:]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    expected = [f"{model_label(k, scale.name)}/{c}" for k in args.models for c in ("rows_check", "generation_check")]
    checks = run.record["checks"]
    run.record["checks_passed"] = all(checks.get(c, False) for c in expected)
    run.record["missing_checks"] = [c for c in expected if c not in checks]
    run.write()
    print(f"wrote {out} ({run.elapsed():.0f} s): checks {'passed' if run.record['checks_passed'] else 'FAILED'}"
          + (f"; {len(run.record['errors'])} phase error(s)" if run.record["errors"] else ""), flush=True)
    if not run.record["checks_passed"]:
        return 1
    return 2 if run.record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
