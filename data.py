"""Data for one-stage all-in-one training: tokenizer first, then conversations.

The tokenizer is one small interface over the two file formats LLM checkpoints ship:
a SentencePiece `.model` (LLaMA-2, TinyLlama, Mixtral, InternLM2) and a HF
`tokenizer.json`. BOS and EOS are never added implicitly: the caller says where they go,
because the image block is spliced in right after BOS.
"""
from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, path, bos: str | None = None, eos: str | None = None):
        """path: a SentencePiece .model or a HF tokenizer.json. bos/eos: token strings, needed
        only for a tokenizer.json whose BOS/EOS are not among the usual names."""
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"tokenizer file {self.path} does not exist")
        if self.path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer
            self._hf = HFTokenizer.from_file(str(self.path))
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self.bos_id = self._find(bos, ["<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"])
            self.eos_id = self._find(eos, ["</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"])
        else:
            import sentencepiece as spm
            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.Load(str(self.path))
            except Exception as e:   # sentencepiece raises bare OSError/RuntimeError on a bad file
                raise ValueError(f"{self.path}: not a SentencePiece model ({e})") from None
            self._hf = None
            self.vocab_size = self._sp.GetPieceSize()
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            if self.bos_id < 0 or self.eos_id < 0:
                raise ValueError(f"{self.path}: SentencePiece model has no BOS/EOS ids")

    def _find(self, explicit, candidates) -> int:
        for tok in ([explicit] if explicit else candidates):
            i = self._hf.token_to_id(tok)
            if i is not None:
                return i
        raise ValueError(f"{self.path}: none of {[explicit] if explicit else candidates} is a token; "
                         "pass bos=/eos= explicitly")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._sp.EncodeAsIds(text) if self._sp else self._hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + list(ids) + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._sp.DecodeIds(ids) if self._sp else self._hf.decode(ids, skip_special_tokens=True)
