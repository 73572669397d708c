"""Character-level tokenizer for the embedded arithmetic task.

One token per character, built with the ``tokenizers`` library and wrapped as a
``PreTrainedTokenizerFast``, so it saves with ``save_pretrained`` and reloads with plain
``AutoTokenizer.from_pretrained(dir)``. Decoding concatenates characters (no spaces
inserted, no clean-up), so ``decode(encode(s)) == s`` for every string made of
``CHAR_VOCAB`` characters, spaces and newlines included.
"""

from __future__ import annotations

import string

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
"""Special tokens, ids 0, 1, 2. There is no BOS token: prompts start with plain text."""

CHAR_VOCAB = (
    string.digits
    + string.ascii_lowercase
    + string.ascii_uppercase
    + "+-*/=()^.,:;!?'\"%<>[]{}_\\|#$&@~`"
    + " \n"
)
"""The ordinary characters, ids 3.. in this order. Covers everything the arithmetic task
writes (digits, ``+ - * = ( )``, ``Answer:``, spaces, newlines) with room for plain text."""


def char_tokenizer():
    """Build the character-level tokenizer.

    Vocabulary: ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2, then one id per character of
    ``CHAR_VOCAB`` (3 + 96 = 99 tokens). A character outside the vocabulary maps to
    ``<unk>``. ``pad_token``/``eos_token``/``unk_token`` are set; no BOS is added, and
    encoding adds no special tokens (the caller appends ``eos_token`` to SFT targets).

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with ``padding_side="left"`` (generation
        pads prompts on the left) and ``clean_up_tokenization_spaces=False``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHAR_VOCAB:
        assert ch not in vocab, ch
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character (newline included: [\s\S]) is its own pre-token, kept verbatim.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate, never insert spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    return tok
