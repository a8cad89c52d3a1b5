"""A word-level tokenizer for the demo world, built locally with `tokenizers`.

One token per whitespace-separated word (every invented subject and answer is a single
token, so "the answer" is exactly one scored token). No BOS/EOS post-processor: training
and lm-eval scoring then see the very same token sequences.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose vocabulary is the special tokens then `words` (sorted, deduped)."""
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words)):
        if w in vocab:
            continue
        if not w or any(c.isspace() for c in w):
            raise ValueError(f"tokenizer words must be non-empty without whitespace: {w!r}")
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=128,
    )
    fast.padding_side = "right"
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """Save so that `AutoTokenizer.from_pretrained(directory)` loads it."""
    tokenizer.save_pretrained(str(directory))
