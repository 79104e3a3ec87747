"""Helpers of the serve-cloud tests: a tiny chat tokenizer and model, built locally."""

from __future__ import annotations

import dataclasses

from _inference_util import bytelevel_tokenizer, tiny_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if not (loop.last and m['role'] == 'assistant') %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_tokenizer():
    """A Hugging Face fast tokenizer over the tiny byte-level BPE, with a chat template and an
    end-of-text token (what a real checkpoint's tokenizer folder gives)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=bytelevel_tokenizer(),
        eos_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def chat_model(tok, seed: int = 3, context: int = 96):
    """A tiny random model over `tok`'s vocabulary with a short context (so the context limit is
    cheap to reach)."""
    cfg, params = tiny_model(len(tok.get_vocab()), seed)
    return dataclasses.replace(cfg, max_position_embeddings=context), params
