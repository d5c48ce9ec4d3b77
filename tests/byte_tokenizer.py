"""A dependency-free tokenizer for tests and toy models."""

import torch


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 4; 0 pad, 1 bos, 2 eos, 3 mask (vocabulary 260). For tests."""

    pad_token_id, bos_token_id, eos_token_id, mask_token_id = 0, 1, 2, 3
    vocab_size = 260
    model_max_length = 1024
    name_or_path = "byte-tokenizer"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 4 for b in text.encode("utf-8")]
        return ([self.bos_token_id] + ids) if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")

    def batch_decode(self, seqs, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def __call__(self, texts, add_special_tokens: bool = False, **_):
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def __len__(self) -> int:
        return self.vocab_size
