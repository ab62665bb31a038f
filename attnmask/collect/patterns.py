"""Stream average attention probabilities of a model over a dataset into running sums.

For every attention site s, layer l, head h and every sequence b of the data, with real query
positions Q_b and real key positions K_b (padding and missing memory excluded):

    sum[s][l, h, q, k]  += P_b(l, h, q -> k)      for q in Q_b, k in K_b
    count[s][q, k]      += 1                      for q in Q_b, k in K_b

With token classes (`collect --token-classes`), every key token k of sequence b also has a class
c_b(k) (e.g. [CLS], [SEP], punctuation, other; the adapter decides), and per site

    token_class_mass[s][l, h, c] += sum_{q in Q_b} sum_{k in K_b, c_b(k) = c} P_b(l, h, q -> k)
    token_class_tokens[s][c]     += |{k in K_b : c_b(k) = c}|

which positions cannot show, since such tokens sit at different positions in different sequences.

With `tile` B > 1 (`collect --block-size B`, a tile store) the sums are kept per B x B tile of the plane:

    sum[s][l, h, r, c]  += sum over q in tile row r, k in tile column c of the element terms above
    count[s][r, c]      += the same tile sums of the element counts

reduced as the probabilities arrive, so no [L, H, Q, K] array is ever held.

The sums live on the model's device in float64 and are updated as each layer runs (the adapter's
attention seam calls the accumulator), so peak memory is one layer's attention whatever the size of
the dataset.

Long runs can checkpoint (attnmask/collect/checkpoint.py): the examples are then fed to the adapter in
windows of `collection_window` examples and the state is saved between windows only, so a resumed
run adds exactly the batches an uninterrupted run adds, in the same order. Distributed runs
(attnmask/collect/distributed.py) give each process a share of the examples and add the partial sums.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from attnmask.collect.checkpoint import CollectState, save_checkpoint
from attnmask.errors import AttnmaskError
from attnmask.models.base import Batch, ModelAdapter, Site
from attnmask.store.stores import SitePatterns, TokenClasses, check_tile_size, check_tiles_plane

WINDOW_BATCHES = 16


class PatternAccumulator:
    """Running `sum` [L, H, Q, K] float64 and `count` [Q, K] int64 per site, on one device; with
    `classify` (batch -> {site: class [B, K]}) and the class names, also the token-class sums. With
    `tile` B > 1: `sum` [L, H, Q/B, K/B] and `count` [Q/B, K/B], the tile sums (B divides every plane).

    The sink's calling convention (what an adapter's attention seam calls, after `begin(batch)`):

        acc(site, layer, probs)            probs [batch, heads, q, k]: every query row of the call
        acc(site, layer, probs, row0=r0)   probs [batch, heads, r, k]: query rows r0 .. r0 + r - 1 of the
                                           call only (a chunk); the call's rows may come in any chunks,
                                           each row exactly once

    probs are after softmax, before dropout, laid out so that the call's [q, k] plane is the top-left
    corner of the store's plane; k is the call's full key length in every chunk. Chunks may start and end
    anywhere, mid-tile included (a tile's rows then add up over the chunks). `rows_per_call` is the chunk
    height this accumulator wants (B for a tile store, so each chunk is one tile row; None for an element
    store: whole calls are fine); adapters that compute probabilities in chunks read it."""

    def __init__(self, sites: list[Site], planes: dict[str, tuple[int, int]], device: torch.device,
                 classify: Callable[[Batch], dict[str, torch.Tensor]] | None = None,
                 class_names: list[str] | None = None, tile: int = 1):
        self.sites = {s.name: s for s in sites}
        self.tile = tile
        self.rows_per_call: int | None = tile if tile > 1 else None
        shapes = {name: (q // tile, k // tile) for name, (q, k) in planes.items()}
        self.sum = {s.name: torch.zeros(s.layers, s.heads, *shapes[s.name], dtype=torch.float64, device=device)
                    for s in sites}
        self.count = {s.name: torch.zeros(shapes[s.name], dtype=torch.int64, device=device) for s in sites}
        self._query_weights: dict[str, torch.Tensor] = {}
        self.classify, self.class_names = classify, class_names
        classes = len(class_names or ())
        self.class_mass = {s.name: torch.zeros(s.layers, s.heads, classes, dtype=torch.float64, device=device)
                           for s in sites} if classify else {}
        self.class_tokens = {s.name: torch.zeros(classes, dtype=torch.int64, device=device)
                             for s in sites} if classify else {}
        self._key_onehot: dict[str, torch.Tensor] = {}
        self.sequences = 0
        self.tokens = 0

    def begin(self, batch: Batch) -> None:
        """Count the real (query, key) cells of the batch: valid[b, q, k] = query_real[b, q] & key_real[b, k];
        keep the query weights [Q, B] float32 (1.0 where query q of sequence b is real) for the sums."""
        for name in self.sum:
            query_real, key_real = batch.real[name]
            q, k = query_real.shape[1], key_real.shape[1]
            plane_q, plane_k = (side * self.tile for side in self.count[name].shape)
            if q > plane_q or k > plane_k:
                raise AttnmaskError(f"site {name}: a batch of {q}x{k} positions exceeds the store's "
                                    f"{plane_q}x{plane_k} plane")
            if self.tile == 1:
                self.count[name][:q, :k] += (query_real[:, :, None] & key_real[:, None, :]).sum(0)
            else:
                self.count[name] += tile_counts(query_real, key_real, self.tile, self.count[name].shape)
            self._query_weights[name] = query_real.T.to(torch.float32)
        if self.classify is not None:
            self._begin_classes(batch)
        self.sequences += batch.size
        self.tokens += batch.tokens

    def __call__(self, site: str, layer: int, probs: torch.Tensor, row0: int = 0) -> None:
        """Add sum over b of valid[b] * probs[b] ([batch, heads, r, k], query rows row0 .. row0 + r - 1 of
        the call) into those rows of the top-left corner (a tile store: into their tiles).

        The sum over the batch's sequences is taken in float32 (a batch adds at most `batch` terms per
        cell) and added to the float64 running sums (see `real_query_sum` for how it is taken); a tile
        store sums each tile's cells of that in float64, B rows at a time (so the float64 copy of a whole
        call's rows is never made)."""
        if site not in self.sum:
            return
        r, k = probs.shape[-2:]
        weights = self._query_weights[site][row0:row0 + r]
        contribution = real_query_sum(probs.float(), weights)
        if self.tile == 1:
            self.sum[site][layer, :, row0:row0 + r, :k] += contribution
        else:
            for start in range(0, r, self.tile):
                add_tile_rows(self.sum[site][layer], contribution[:, start:start + self.tile].double(), row0 + start,
                              self.tile)
        if site in self._key_onehot:
            self.class_mass[site][layer] += class_mass(probs.float(), weights, self._key_onehot[site][:, :k])

    def _begin_classes(self, batch: Batch) -> None:
        """One-hot classes [B, K, C] float32 of the batch's real keys (padding keys all zero), and their counts."""
        classes = self.classify(batch)
        for name in self.class_mass:
            _, key_real = batch.real[name]
            onehot = torch.nn.functional.one_hot(classes[name], len(self.class_names)).float()
            onehot *= key_real[..., None]
            self._key_onehot[name] = onehot
            self.class_tokens[name] += onehot.sum((0, 1)).to(torch.int64)

    def load_state(self, sums: dict[str, Any], counts: dict[str, Any], sequences: int, tokens: int) -> None:
        """Start from saved sums and counts (a checkpoint); shapes must match this accumulator's."""
        for name in self.sum:
            if name not in sums or tuple(sums[name].shape) != tuple(self.sum[name].shape) \
                    or tuple(counts[name].shape) != tuple(self.count[name].shape):
                raise AttnmaskError(f"the checkpoint's site {name} does not match the model's shapes")
            self.sum[name].copy_(torch.as_tensor(sums[name]))
            self.count[name].copy_(torch.as_tensor(counts[name]))
        self.sequences, self.tokens = sequences, tokens

    def result(self) -> dict[str, SitePatterns]:
        return {name: SitePatterns(self.sum[name].cpu().numpy(), self.count[name].cpu().numpy(),
                                   self.sites[name].causal, {}, self._classes_of(name), self.tile)
                for name in self.sum}

    def _classes_of(self, name: str) -> TokenClasses | None:
        if name not in self.class_mass:
            return None
        return TokenClasses(list(self.class_names), self.class_mass[name].cpu().numpy(),
                            self.class_tokens[name].cpu().numpy())


def tile_counts(query_real: torch.Tensor, key_real: torch.Tensor, tile: int, shape: tuple[int, int]) -> torch.Tensor:
    """int64 [R, C]: count[r, c] = sum over b of (real queries of sequence b in tile row r) * (real keys of b
    in tile column c), the tile sums of sum_b query_real[b, q] & key_real[b, k] (query_real [B, q],
    key_real [B, k]), padded with zeros to `shape`. Exact: float64 products of counts below 2^53."""
    def per_tile(real: torch.Tensor, tiles: int) -> torch.Tensor:  # [B, tiles]: real positions per tile
        padded = torch.zeros(real.shape[0], tiles * tile, dtype=torch.float64, device=real.device)
        padded[:, :real.shape[1]] = real
        return padded.view(real.shape[0], tiles, tile).sum(-1)

    return torch.matmul(per_tile(query_real, shape[0]).T, per_tile(key_real, shape[1])).round().to(torch.int64)


def add_tile_rows(tiles: torch.Tensor, rows: torch.Tensor, row0: int, tile: int) -> None:
    """Add rows [H, r, k] (plane rows row0 .. row0 + r - 1, keys 0 .. k - 1) into their tiles of tiles
    [H, R, C]: tiles[h, (row0 + i) // B, j // B] += rows[h, i, j]; r and row0 need not be multiples of B."""
    heads, r, k = rows.shape
    columns = -(-k // tile)
    if columns * tile != k:
        rows = torch.nn.functional.pad(rows, (0, columns * tile - k))
    by_column = rows.reshape(heads, r, columns, tile).sum(-1)  # [H, r, columns]
    first, last = row0 // tile, (row0 + r - 1) // tile
    offset = row0 - first * tile  # rows of the first tile before the chunk
    padded = torch.nn.functional.pad(by_column, (0, 0, offset, (last + 1) * tile - row0 - r))
    tiles[:, first:last + 1, :columns] += padded.view(heads, last - first + 1, tile, columns).sum(2)


def class_mass(probs: torch.Tensor, weights: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """[H, C]: sum over b and q of weights[q, b] * sum_k probs[b, h, q, k] * onehot[b, k, c], the attention that
    real queries give to keys of each class, from probs [B, H, Q, K], weights [Q, B] and onehot [B, K, C]."""
    per_query = torch.matmul(probs, onehot[:, None])  # [B, H, Q, C]
    return torch.einsum("bhqc,qb->hc", per_query, weights)


def real_query_sum(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum over b of weights[q, b] * probs[b, h, q, k]: [H, Q, K] in probs' dtype, from probs [B, H, Q, K]
    and weights [Q, B] (1 where query q of sequence b is real, else 0).

    This equals sum over b of valid[b, q, k] * probs[b, h, q, k] with valid = query_real & key_real,
    because a real query gives probability exactly 0 to keys that are not real: Hugging Face adds the
    dtype's minimum to their scores, which the float32 softmax turns into 0; fairseq fills them with
    -inf; Transformer-XL pads missing memory with zeros. So only padding query rows are excluded.
    It is one [1, B] x [B, K] product per (h, q), read in place from probs: no [B, H, Q, K] temporary,
    where the einsum over valid first copied probs into a (q, k)-major layout."""
    return torch.matmul(weights[:, None, :], probs.permute(1, 2, 0, 3)).squeeze(-2)


@dataclass
class CollectResult:
    sites: dict[str, SitePatterns]
    sequences: int
    tokens: int
    cursor: int = 0  # examples consumed (counted only when the stream was cut into windows)
    batches: int = 0


@dataclass
class CheckpointPlan:
    """Save the state to `path` at the first window boundary after every `every` batches."""

    path: Path
    every: int
    settings: dict
    collection: str


def collection_window(batch_size: int, checkpoint_every: int | None) -> int:
    """Examples per window: batch_size * min(16, checkpoint_every) (16 batches without checkpoints,
    the window within which the Hugging Face adapter groups texts by length)."""
    batches = WINDOW_BATCHES if checkpoint_every is None else max(1, min(WINDOW_BATCHES, checkpoint_every))
    return batch_size * batches


def windows(examples: Iterable[Any], size: int) -> Iterator[list]:
    """Consecutive lists of `size` examples (the last may be shorter)."""
    it = iter(examples)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def check_windowable(adapter: ModelAdapter, what: str) -> None:
    if not adapter.windowable:
        raise AttnmaskError(f"{what} is not supported for {adapter.family} models (their examples are "
                            "collected in one pass, which cannot be cut)")


def accumulate(adapter: ModelAdapter, examples: Iterable[Any], *, batch_size: int, max_length: int,
               on_batch: Callable[[Batch], None] | None = None, checkpoint: CheckpointPlan | None = None,
               resume=None, rank: int = 0, world: int = 1, checkpoint_every: int | None = None,
               token_classes: bool = False, block_size: int = 1) -> CollectResult:
    """Accumulate attention over `examples` (possibly none); with `checkpoint`, save between windows;
    with `token_classes`, also the attention each class of key token receives (adapter.token_classes());
    with `block_size` B > 1, a tile store's sums (B a multiple of 16 up to 512 dividing every plane).

    Windowable models (`adapter.windowable`) get the examples in windows of `collection_window` examples and
    the batches j = 0, 1, 2, ... of the run are numbered across windows: this process runs batch j
    iff j % world == rank. Every process forms the same batches as a single process would, so the
    sums of all ranks add up to the single-process sums up to float64 rounding.

    `resume` is a CollectState (attnmask/collect/checkpoint.py) to start from; `examples` must then already
    skip the `resume.cursor` examples it holds (the cursor counts examples of the whole stream).
    """
    sites = adapter.sites()
    planes = {s.name: adapter.plane(s.name, max_length) for s in sites}
    if block_size != 1:
        check_tile_size(block_size)
        for name, plane in planes.items():
            check_tiles_plane(block_size, name, plane)
    if token_classes and (checkpoint is not None or resume is not None or world > 1):
        raise AttnmaskError("--token-classes cannot be combined with checkpoints, --resume or distributed "
                            "collection (their saved and shared state holds the positional sums only)")
    acc = PatternAccumulator(sites, planes, adapter.device, *(
        (adapter.key_classes, adapter.token_classes()) if token_classes else (None, None)), tile=block_size)
    cursor = batches = 0  # examples consumed in whole windows; batches of the whole run (all ranks)
    if resume is not None:
        acc.load_state(resume.sums, resume.counts, resume.sequences, resume.tokens)
        cursor, batches = resume.cursor, resume.batches
    if checkpoint is not None:
        checkpoint_every = checkpoint.every

    def step(batch: Batch) -> None:
        nonlocal batches
        if batches % world == rank:
            acc.begin(batch)
            adapter.forward(batch)
            if on_batch is not None:
                on_batch(batch)
        batches += 1

    adapter.model.eval()
    with torch.inference_mode(), adapter.capture(acc):
        if not adapter.windowable:
            if world > 1:
                check_windowable(adapter, "distributed collection")
            for batch in adapter.batches(examples, batch_size, max_length):
                step(batch)
        else:
            since = 0
            for window in windows(examples, collection_window(batch_size, checkpoint_every)):
                before = batches
                for batch in adapter.batches(window, batch_size, max_length):
                    step(batch)
                cursor += len(window)
                since += batches - before
                if checkpoint is not None and since >= checkpoint.every:
                    result = acc.result()
                    save_checkpoint(checkpoint.path, CollectState(
                        {n: r.sum for n, r in result.items()}, {n: r.count for n, r in result.items()},
                        cursor, batches, acc.sequences, acc.tokens, checkpoint.settings, checkpoint.collection))
                    since = 0
    return CollectResult(acc.result(), acc.sequences, acc.tokens, cursor, batches)


def collect(adapter: ModelAdapter, examples: Iterable[Any], *, batch_size: int, max_length: int,
            on_batch: Callable[[Batch], None] | None = None, checkpoint: CheckpointPlan | None = None,
            resume=None, checkpoint_every: int | None = None, token_classes: bool = False,
            block_size: int = 1) -> CollectResult:
    """Run the model over `examples` in eval mode under inference_mode and accumulate its attention
    (`checkpoint_every` without `checkpoint` forms the same windows as a checkpointing run; `block_size`
    B > 1: a tile store's sums)."""
    result = accumulate(adapter, examples, batch_size=batch_size, max_length=max_length, on_batch=on_batch,
                        checkpoint=checkpoint, resume=resume, checkpoint_every=checkpoint_every,
                        token_classes=token_classes, block_size=block_size)
    if result.sequences == 0:
        raise AttnmaskError("the dataset is empty: no example to collect attention from")
    return result


def check_row_sums(site: SitePatterns, atol: float = 1e-6) -> float:
    """Largest |sum_k sum[l, h, q, k] - n_q| over real rows, where n_q = max_k count[q, k] is the number
    of sequences in which query q was real (count[q, q] on a square self-attention plane). Should be ~0."""
    real_rows = site.count.max(axis=-1).astype(np.float64)
    rows = site.sum.sum(-1)
    real = real_rows > 0
    if not real.any():
        return 0.0
    return float(np.abs(rows[..., real] - real_rows[real]).max())
