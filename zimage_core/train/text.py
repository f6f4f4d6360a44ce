"""The default model's tokenizer and text encoder.

The tokenizer is a byte-level ``Qwen2Tokenizer`` (any text still tokenizes, one token per byte) whose BPE merges
turn each word of the dataset's vocabulary, and the chat template's ``user``/``assistant``, into a single token, so
a caption is ~20 tokens with the chat template and fits one 32-token block of the transformer. The text encoder is
a small random Qwen3 (frozen, never trained): its ``hidden_states[-2]`` differ per word and carry some context from
the causal attention.
"""

from __future__ import annotations

from ..components import CHAT_TEMPLATE
from .dataset import WORDS

TEMPLATE_WORDS = ("user", "assistant")


def word_tokenizer(words=WORDS):
    """Qwen2Tokenizer: 256 byte symbols, merges that build every word (with and without its leading space), and the
    ``<|im_start|>``/``<|im_end|>`` specials with a Qwen3-style chat template."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    words = sorted(set(words) | set(TEMPLATE_WORDS))
    # All space-prefixed forms first ("Ġ" is the byte-level symbol of a leading space): BPE applies the merge of
    # lowest rank first, so a bare word's merges must not outrank the chain that builds "Ġword".
    for form in ["Ġ" + w for w in words] + words:
        cur = form[0]
        for ch in form[1:]:
            if cur + ch not in vocab:
                vocab[cur + ch] = len(vocab)
                merges.append((cur, ch))
            cur = cur + ch
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok
