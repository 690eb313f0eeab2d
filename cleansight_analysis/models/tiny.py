"""Tiny LLaVA / LLaVA-NeXT models built from configs, with a word-level tokenizer and a real processor.

They use the real HF classes (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``)
so every code path is the one a 7B checkpoint takes; only the sizes differ. Random weights use
``initializer_range=0.2`` so that attention is far from uniform (with the HF default 0.02 every head
attends almost uniformly and edits barely move the logits).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..inputs.templates import LLAVA_CHAT_TEMPLATE, LLAVA_SYSTEM_PROMPT

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

#: Words every tiny tokenizer knows: the LLaVA template and system prompt, and a small scene vocabulary.
BASE_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        (LLAVA_SYSTEM_PROMPT.lower().replace(".", " . ").replace(",", " , ").replace("'", " ' ")).split()
        + "user assistant system : ? . , ' ! - \n".split()
        + """what which where how many is are there the a an of in on at this image picture photo describe
        short sentence color colour shape object objects left right top bottom middle center corner
        red green blue yellow purple orange white black gray pink brown cyan circle square triangle
        star cross ring heart diamond one two three four five six seven eight nine zero yes no
        and or with big small large tiny background texture noise stripes dots plain you have been
        hacked lol answer question word only it its do does see can see
        be color? kind number count""".split()
    )
)


def build_word_tokenizer(words: Iterable[str] = BASE_WORDS, vocab_size: int = 512, lowercase: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` with ``<image>`` as the last id (``vocab_size - 1``).

    Unknown words map to ``<unk>``; a BOS token starts every sequence, as with LLaMA tokenizers.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *words):
        tok = tok.lower() if lowercase else tok
        if tok and tok not in vocab and tok != IMAGE_TOKEN:
            vocab[tok] = len(vocab)
    if len(vocab) >= vocab_size:
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size} (one id is <image>)")
    for i in range(len(vocab), vocab_size - 1):
        vocab[f"<extra_{i}>"] = i
    vocab[IMAGE_TOKEN] = vocab_size - 1
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if lowercase:
        core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    core.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def tiny_llava_config(
    *, image_size: int = 64, patch_size: int = 8, vision_hidden: int = 64, vision_layers: int = 2,
    hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int | None = None, vocab_size: int = 512,
    initializer_range: float = 0.2, feature_strategy: str = "default", intermediate: int | None = None,
    vision_feature_layer: int = -2, vision_heads: int = 4,
):
    """``LlavaConfig`` of a CLIP + Llama LLaVA-1.5 lookalike (64 image tokens by default)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                              intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=vision_heads, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads or heads, max_position_embeddings=2048,
                       initializer_range=initializer_range, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    n_tokens = (image_size // patch_size) ** 2 + (1 if feature_strategy == "full" else 0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab_size - 1,
                      image_seq_length=n_tokens, vision_feature_layer=vision_feature_layer,
                      vision_feature_select_strategy=feature_strategy, initializer_range=initializer_range)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def tiny_llava_next_config(
    *, image_size: int = 32, patch_size: int = 8, vision_hidden: int = 64, hidden: int = 128, layers: int = 4,
    heads: int = 4, kv_heads: int = 2, vocab_size: int = 512, initializer_range: float = 0.2,
    grid_pinpoints: Sequence[Sequence[int]] = ((32, 64), (64, 32), (64, 64)),
):
    """``LlavaNextConfig`` with a Mistral LM using grouped KV heads (``kv_heads < heads``)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                              intermediate_size=2 * vision_hidden, num_hidden_layers=2, num_attention_heads=4,
                              projection_dim=vision_hidden)
    text = MistralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, sliding_window=None, initializer_range=initializer_range,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=vocab_size - 1,
                          image_grid_pinpoints=[list(p) for p in grid_pinpoints], vision_feature_layer=-2,
                          vision_feature_select_strategy="default", initializer_range=initializer_range)
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    return cfg


def processor_for(config, tokenizer, *, chat_template: str = LLAVA_CHAT_TEMPLATE):
    """A real HF processor (PIL image processor, no torchvision) matching ``config``."""
    vision = config.vision_config
    size = int(vision.image_size)
    if config.architectures[0] == "LlavaNextForConditionalGeneration":
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints])
        cls = LlavaNextProcessor
    else:
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        cls = LlavaProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=int(vision.patch_size),
               vision_feature_select_strategy=config.vision_feature_select_strategy,
               num_additional_image_tokens=1, chat_template=chat_template)


def build_tiny_random(config, *, seed: int = 0, words: Iterable[str] = BASE_WORDS):
    """Instantiate a randomly initialised model for ``config`` (seeded) and its processor."""
    import transformers

    cls = getattr(transformers, config.architectures[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config._attn_implementation = "eager"
        model = cls(config).eval()
    tokenizer = build_word_tokenizer(words, vocab_size=config.text_config.vocab_size)
    return model, processor_for(config, tokenizer)


def tiny_random_llava(seed: int = 0):
    """The registry's ``tiny-random-llava``: 64 px images, 8 px patches (64 image tokens), 4 x 4 Llama."""
    return build_tiny_random(tiny_llava_config(), seed=seed)


def tiny_random_llava_next(seed: int = 0):
    """The registry's ``tiny-random-llava-next``: any-resolution grids, Mistral LM with 2 KV heads."""
    return build_tiny_random(tiny_llava_next_config(), seed=seed)
