"""The smoke recipe's tokenizer: one token per character plus R1's tags, made with `tokenizers` and
saved as a normal transformers tokenizer directory (data/tokenizer), so the same loading code serves
it and any hub tokenizer."""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
CHARS = [ch for ch in string.printable if ch not in "\x0b\x0c\r"]  # 97 characters
DIR = Path(__file__).resolve().parents[1] / "data" / "tokenizer"


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + TAGS + CHARS + ["<|unk|>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    # each tag is one token; everything else splits into single characters
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"</?(?:think|answer)>|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", unk_token="<|unk|>")


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerFast:
    """`None` or "char" = the project's character tokenizer; otherwise any transformers tokenizer."""
    if name_or_path in (None, "char"):
        if (DIR / "tokenizer.json").exists():
            return PreTrainedTokenizerFast.from_pretrained(str(DIR))
        return make_char_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


if __name__ == "__main__":  # regenerate data/tokenizer
    make_char_tokenizer().save_pretrained(str(DIR))
    print(f"saved {DIR}")
