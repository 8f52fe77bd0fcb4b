"""Row selection and concatenation of TRL generation batches (the dicts TRL's
``GRPOTrainer`` builds for a generation batch, :data:`grouprl_trl._compat.BATCH_KEYS`).

Batches from different generation rounds have different padded widths: prompts are
left-padded, completions right-padded. Merging re-pads every ``(B, T)`` tensor to the widest
piece on the correct side. ``num_items_in_batch`` (0-dim) is not merged: the caller recounts it.
"""

from __future__ import annotations

import torch

LEFT_PADDED = {"prompt_ids", "prompt_mask"}
UNSUPPORTED = {"pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "num_images", "num_tiles"}


def _pad_to(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - t.size(1)
    if extra == 0:
        return t
    filler = torch.full((t.size(0), extra, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([filler, t] if left else [t, filler], dim=1)


def batch_size_of(batch: dict) -> int:
    return batch["completion_ids"].size(0)


def select_and_concat(pieces: list[tuple[dict, list[int]]], pad_token_id: int) -> dict:
    """Concatenate ``batch[rows]`` for each ``(batch, rows)`` piece, in order.

    Tensors with a batch dimension are row-selected and re-padded; lists are row-selected;
    0-dim tensors are dropped (recount them). Multimodal keys are not supported.
    """
    pieces = [(b, rows) for b, rows in pieces if len(rows) > 0]
    if not pieces:
        raise ValueError("nothing to concatenate")
    def row_keys(b: dict) -> list[str]:
        return [k for k, v in b.items() if not (isinstance(v, torch.Tensor) and v.ndim == 0)]

    keys = row_keys(pieces[0][0])
    for b, _ in pieces:
        if set(row_keys(b)) != set(keys):
            raise ValueError(f"generation batches have different keys: {sorted(b.keys())} vs {sorted(keys)}")
        bad = UNSUPPORTED.intersection(k for k, v in b.items() if v is not None)
        if bad:
            raise NotImplementedError(f"merging generation rounds is not supported for multimodal keys {sorted(bad)}")
    out = {}
    for key in keys:
        first = pieces[0][0][key]
        if first is None:
            out[key] = None
        elif isinstance(first, torch.Tensor):
            parts = [b[key][torch.as_tensor(rows, device=b[key].device)] for b, rows in pieces]
            if first.ndim >= 2:
                width = max(p.size(1) for p in parts)
                left = key in LEFT_PADDED
                if key in ("prompt_ids", "completion_ids"):
                    value = pad_token_id
                elif key == "tool_mask":
                    value = 1  # TRL pads tool_mask with 1 (the completion mask already hides padding)
                else:
                    value = 0
                parts = [_pad_to(p, width, value, left) for p in parts]
            out[key] = torch.cat(parts, dim=0)
        elif isinstance(first, list):
            out[key] = [b[key][i] for b, rows in pieces for i in rows]
        else:
            raise TypeError(f"cannot merge batch field {key!r} of type {type(first).__name__}")
    return out


def split_rows_evenly(batch: dict, num_chunks: int) -> list[dict]:
    """Split a generation batch into ``num_chunks`` micro-batches whose sizes differ by at most 1.

    Like TRL's equal split of a generation batch (:func:`grouprl_trl._compat.split_generation_batch`),
    which assumes the row count divides evenly and would silently drop the remainder; here the first ``B % num_chunks``
    chunks get one extra row, so no row is lost. 0-dim tensors are copied into every chunk.
    """
    size = batch_size_of(batch)
    if size < num_chunks:
        raise ValueError(f"cannot split {size} rows into {num_chunks} non-empty micro-batches")
    base, extra = divmod(size, num_chunks)
    chunks, start = [], 0
    for i in range(num_chunks):
        stop = start + base + (1 if i < extra else 0)
        chunk = {}
        for key, value in batch.items():
            if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
                chunk[key] = value
            else:
                chunk[key] = value[start:stop]
        chunks.append(chunk)
        start = stop
    return chunks

