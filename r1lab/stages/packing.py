"""Batches of the supervised stages: tokenized documents packed whole into rows.

Whole documents (or prompt + response examples) are placed side by side in rows of
`seq_len` tokens, positions restarting at 0 for each one, so attention never crosses from
one document into another (the model's packed-sequence path). A per-token loss mask says
which tokens are targets: every token for pretraining, only the response for SFT.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


def encode_prompts_batched(tokenizer, prompts: list[str]) -> list[list[int]]:
    """`r1lab.api.encode_prompts` (the sampler's encoding: default special tokens) in one
    batched call, which is many times faster for tens of thousands of prompts."""
    if not prompts:
        return []
    return tokenizer(prompts)["input_ids"]


def tokenize_examples(
    rows: list[dict], tokenizer, seq_len: int
) -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids and loss masks of prompt + response + EOS; the prompt is masked out.

    Prompts are encoded as the sampler encodes them, so training sees the same ids the model
    is later prompted with. An example longer than `seq_len` is cut at the end (counted and
    returned); one whose prompt alone fills the row has nothing to learn and is dropped.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; SFT needs one to teach the model to stop")
    prompts = encode_prompts_batched(tokenizer, [r["prompt"] for r in rows])
    responses = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
    docs, masks, cut = [], [], 0
    for prompt, response in zip(prompts, responses):
        if not response or response[-1] != eos:
            response = [*response, eos]
        ids, mask = prompt + response, [0] * len(prompt) + [1] * len(response)
        if len(ids) > seq_len:
            cut += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        if sum(mask[1:]) == 0:
            continue
        docs.append(ids)
        masks.append(mask)
    return docs, masks, cut


def _fill_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Group document indices into rows of at most `seq_len` tokens (best fit, longest first).

    A document longer than a row gets rows of its own. Packing whole documents keeps every
    example with its beginning: a piece cut from the middle of one would be trained on
    without its question.
    """
    rows: list[list[int]] = []
    open_rows: dict[int, list[int]] = {}  # free space -> rows with that much space left
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        size = lengths[i]
        if size >= seq_len:
            rows.append([i])
            continue
        room = next((r for r in range(size, seq_len) if open_rows.get(r)), None)
        if room is None:
            rows.append([i])
            row, left = len(rows) - 1, seq_len - size
        else:
            row, left = open_rows[room].pop(), room - size
            rows[row].append(i)
        if left:
            open_rows.setdefault(left, []).append(row)
    return rows


def _pieces(
    docs: list[list[int]], masks: list[list[int]], seq_len: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Documents longer than a row cut into row-sized pieces, each then a document of its own."""
    out_docs, out_masks = [], []
    for doc, mask in zip(docs, masks):
        if len(doc) <= seq_len:
            out_docs.append(doc)
            out_masks.append(mask)
            continue
        for start in range(0, len(doc), seq_len):
            out_docs.append(doc[start : start + seq_len])
            out_masks.append(mask[start : start + seq_len])
    return out_docs, out_masks


def pack_rows(
    docs: list[list[int]], masks: list[list[int]], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids, loss_mask), each (rows, seq_len), whole documents per row.

    Positions restart at 0 for every document, so attention stays inside it, and a
    document's first token is no target. Rows are planned by `_fill_rows` so that no
    document is split, and the end of a row is padded (loss mask 0).
    Built as flat lists and converted once, so millions of tokens pack in about a second.
    """
    if not docs:
        raise ValueError("nothing to pack: no documents")
    docs, masks = _pieces(docs, masks, seq_len)
    ids: list[int] = []
    pos: list[int] = []
    targets: list[int] = []
    for row in _fill_rows([len(d) for d in docs], seq_len):
        used = 0
        for i in row:
            doc = docs[i]
            ids += doc
            pos += range(len(doc))
            targets.append(0)
            targets += masks[i][1:]
            used += len(doc)
        pad, last = seq_len - used, len(docs[row[-1]])
        ids += [pad_id] * pad
        pos += range(last, last + pad)  # continues the row's last document, never a new one
        targets += [0] * pad
    return tuple(_as_rows(values, seq_len) for values in (ids, pos, targets))


def _as_rows(values: list[int], seq_len: int) -> torch.Tensor:
    """A flat int list as a (rows, seq_len) tensor (numpy reads a long list ~8x faster)."""
    flat = np.fromiter(values, dtype=np.int64, count=len(values))
    return torch.from_numpy(flat).view(-1, seq_len)


def rows_fingerprint(*tensors: torch.Tensor) -> str:
    """Short hash of the packed data, so a resume can tell the data has not changed."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


class RowSampler:
    """Batches of row indices; a fresh seeded order every epoch.

    Its position is two integers (epoch, offset), saved with the checkpoint, so a resumed
    run draws exactly the batches the interrupted one would have drawn.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def position(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._order = (self.epoch, torch.randperm(self.n_rows, generator=gen))
        return self._order[1]

    def next_batch(self) -> torch.Tensor:
        if self.offset >= self.n_rows:
            self.epoch, self.offset = self.epoch + 1, 0
        batch = self._epoch_order()[self.offset : self.offset + self.batch_size]
        self.offset += len(batch)
        return batch
