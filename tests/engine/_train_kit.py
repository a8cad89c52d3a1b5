"""Small builders for the scope / objective / training tests: a tiny Qwen2-MoE (from the
adapters' `tiny_model`), a word-level tokenizer built in memory, and a toy corpus."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workers.data import Record, TokenizedCorpus, tokenize
from workers.moe import get_adapter
from workers.moe.tiny import TINY_VOCAB, tiny_model

# One intra-op thread: on a shared 2-core box, torch's default thread pool made these tiny
# matmuls ~30x slower under load (20 training steps: 40 s with 2 threads, 1.4 s with 1).
torch.set_num_threads(1)

WORDS = (
    "the capital of is city river king queen red blue green moon sun star who what where "
    "answer paris rome oslo lima kyiv cairo rabbit fox owl bear wolf seal"
).split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0 pad, 1 bos, 2 eos, 3 unk, then WORDS (fits TINY_VOCAB)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    assert len(vocab) <= TINY_VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def qa_records(n: int, seed: int) -> list[Record]:
    g = torch.Generator().manual_seed(seed)
    subj = WORDS[6:19]
    ans = WORDS[19:]
    out = []
    for _ in range(n):
        s = subj[int(torch.randint(len(subj), (1,), generator=g))]
        a = ans[int(torch.randint(len(ans), (1,), generator=g))]
        k = int(torch.randint(1, 4, (1,), generator=g))
        out.append(Record(prompt="the capital of " + " ".join([s] * k) + " is", answer=a))
    return out


def corpus(n: int, seed: int, loss_tokens: str = "all") -> TokenizedCorpus:
    return tokenize(qa_records(n, seed), word_tokenizer(), max_length=16, loss_tokens=loss_tokens)


def model_and_adapter(seed: int = 0):
    model = tiny_model("qwen2_moe", seed=seed)
    return model, get_adapter(model)
