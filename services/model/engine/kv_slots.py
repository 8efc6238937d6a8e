"""KV layout ``slots`` (``KV_LAYOUT=slots``): each row keeps its keys and values in one place all its life.

Per decoder layer one keys and one values buffer of shape (S, kv_heads, C, head_dim), zero-filled when made,
on that layer's own device (a ``device_map`` may split the layers). S *slots* (a bucket of
:func:`slot_buckets`: 1, 2, 4, 8, 16, 24, 32, 48, 64, ... up to the batch size; under a KV budget that the
bucket's rectangle would exceed, at the tokens the rows may reach (:attr:`SlotBatch.longest`), the rows
rounded up to a multiple of :data:`SLOT_STEP`, or the rows exactly: :meth:`SlotConfig.slots_for`, which
admission's :func:`reserved_shape` uses alike) and C columns (whole blocks
of ``BLOCK``; under a KV budget never past ``budget_tokens // S`` unless a row itself needs more, so that
S x C stays within the budget whenever the rows fit it). A row owns one slot from its join to its leave;
column j of its slot holds its token j (left-aligned: no padding, nothing ever shifts), and the slot's
*length* (tokens cached) is both an entry of a (S,) tensor and of a host-side list kept in step.

- join (:meth:`SlotBatch.join`): the prefilled newcomers' KV (each part one row, or ``n`` rows after a fork;
  a burst of parts at once) is copied into the lowest free slots, and the columns past each newcomer that an
  earlier occupant of its slot wrote are zeroed (a freed slot still holds its last occupant's KV; masked
  columns still enter the products, and 0 x NaN is NaN; a per-slot high-water mark says how far). A join
  that needs more slots than S, or a newcomer longer than C, first reallocates the buffers once, for all the
  newcomers together, to the bucket / the columns the rows need (one copy of everything, amortised).
- leave (:meth:`SlotBatch.select`): the slot is marked free (length 0) and the row order updated; no KV
  moves.
- settle (:meth:`SlotBatch.settle`, and every join): the rows are compacted into new, smaller buffers (one
  copy of those rows) when they are sparse, so memory follows the rows down, with hysteresis so that rows
  coming and going at a bucket edge do not copy every step: the slots shrink only to a bucket with at least
  one free slot (the bucket of rows + 1) that is at most half of S, the columns only when the rows need at
  most half of C. The scheduler settles after its step's joins (a leave and a join in consecutive steps
  then copy nothing), never right after a leave.
- decode (:meth:`SlotBatch.decode`): one step over the slots [0, hi) (hi = 1 + the highest slot in use; with
  ``static`` the whole bucket S and all C columns, fixed shapes per bucket as CUDA graph capture needs). Each
  slot's new column is written at its own length (``scatter_`` along the column dim, in place); attention
  spans the columns [0, width) with a per-slot mask built from the lengths (a prebuilt 4-D mask, which
  transformers' ``create_causal_mask`` passes through as it is: sdpa or eager attention only, checked by
  :func:`attention_kind` when the scheduler is built). Free slots decode a harmless dummy: their step input
  is whatever id their entry of the (S, 1) token buffer holds (0 when never used, else their last
  occupant's last input) at length 0, one valid column (their own), so no row of softmax is empty (no NaN);
  their outputs are never read. The last hidden states of the rows are gathered in the scheduler's row
  order and the output head writes the (B, V) logits. The step never reads a device value on the host:
  spans come from the host-side lengths, the writes, mask and positions from the (S,) tensors.

Reallocation (a grow, a compaction) makes each layer's new buffers, copies that layer's rows and releases
its old buffers before the next layer: while layer i is copied, the new buffers of layers 0..i and the old
ones of layers i..L-1 are alive. The peak is therefore the larger of the old and the new cache plus one
layer's buffers (for a compaction also one layer's gathered rows, at most the new columns wide), not both
caches at once; a grow still needs the new, larger cache's memory. The caching
allocator of CUDA may still hold the freed blocks (reserved, not allocated) for later reuse. A
reallocation that fails half-way (out of memory) leaves the batch unusable (:attr:`SlotBatch.lost`): every
later join or decode raises, and the scheduler fails its rows at once (no isolation probing).

CUDA graphs (``CUDA_GRAPHS``, with ``static`` on one CUDA device): the step's forward through the decoder
(embedding, layers, norm: everything but the output head) is captured once per buffer shape, after one
warm-up run on a side stream, and replayed on later steps: its inputs (the (S, 1) tokens, the lengths, the
mrope deltas, the buffers) are updated in place between steps, so the graph reads them where it recorded
them. A reallocation (new S or C: a bucket change, a column block) drops the graph and the next step
captures anew; columns that are not whole blocks (a KV budget's cap grows them a column per step) decode
eagerly rather than capture every step. Captures and replays run on the model's CUDA device (made current
for them). The warm-up and the capture are harmless to the cache: a step writes each slot's new column at its
length, and the lengths advance only after the step, so running it again writes the same values. The head
(index_select of the rows, one product) runs eagerly after the replay. Out of memory while capturing turns
graphs off for that batch; any other failed capture is logged once and every batch of the process decodes
eagerly from then on. Why: on the lent H200 the eager step is bound by launching ~1,600 kernels from Python;
the scheduler's step at 16 rows took 10.2 ms with graphs against 31 ms without (1 row: 6.1 vs 27.4; 64 rows:
20.5 vs 59.9), the same greedy text in every row (``python -m bench.gpu.probe --mode graphs``,
bench/results/README.md; measured before the review that made the capture device-explicit and stream-safe).

A failed step is undone by its lengths (:meth:`snapshot` / :meth:`restore`): the lengths advance only after a
step succeeded, and a step writes only at the columns just past them, which stay masked.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

log = logging.getLogger(__name__)

BLOCK = 128  # columns: buffers are allocated in multiples of this (unless the KV budget caps them)
SLOT_STEP = 4  # under a binding KV budget, slots are allocated in multiples of this (else exactly the rows)
ATTENTION = ("sdpa", "eager")  # the implementations that take the prebuilt 4-D mask as it is


def attention_kind(model: Any) -> str:
    """The text decoder's attention implementation (``sdpa`` when unset); raises ValueError, naming
    KV_LAYOUT and the implementation, for one that cannot take the slots' 4-D mask."""
    kind = getattr(model.config.get_text_config(decoder=True), "_attn_implementation", None) or "sdpa"
    if kind not in ATTENTION:
        raise ValueError(
            f"KV_LAYOUT=slots needs sdpa or eager attention; the model uses {kind!r} attention "
            "(use KV_LAYOUT=concat, or load the model with attn_implementation='sdpa')"
        )
    return kind


def slot_buckets(max_slots: int) -> list[int]:
    """The slot counts buffers take: 1, 2, 4, 8, 16, then 1.5x and 2x of each power of two (24, 32, 48,
    64, 96, ...) below ``max_slots``, and ``max_slots`` itself last."""
    sizes = [1, 2, 4, 8]
    power = 16
    while power < max_slots:
        sizes += [power, power * 3 // 2]
        power *= 2
    return sorted({s for s in sizes if s < max_slots} | {max_slots})


def slot_bucket(needed: int, max_slots: int) -> int:
    """The smallest bucket of :func:`slot_buckets` holding ``needed`` slots (0 for 0); raises ValueError
    past ``max_slots``."""
    if needed <= 0:
        return 0
    for size in slot_buckets(max_slots):
        if size >= needed:
            return size
    raise ValueError(f"{needed} slots asked for, {max_slots} at most")


def columns_for(needed: int, cap: int = 0, block: int = BLOCK) -> int:
    """Columns to allocate for ``needed`` ones: whole blocks, but not past ``cap`` (a slot's share of the
    KV budget, :meth:`SlotConfig.column_cap`; 0: no cap) unless ``needed`` itself is. (Exactly ``needed``
    past the cap would leave more room for kept prefixes, but the next decode step would then reallocate
    every slot's buffers, each step, until the block's end.)"""
    rounded = -(-needed // block) * block
    return min(rounded, max(needed, cap)) if cap else rounded


@dataclass(slots=True)
class GraphCounts:
    """CUDA-graph totals of the batches made with one :class:`SlotConfig` whose ``graphs`` is on: decode
    steps replayed from a graph, decode steps run eagerly although graphs were on (columns short of a block,
    out of memory while capturing, a capture that failed before), graphs captured and captures that failed.
    The scheduler reports them (``KVCacheStats``); its thread alone writes them."""

    graphed_steps: int = 0
    eager_steps: int = 0
    graph_captures: int = 0
    graph_capture_failures: int = 0


@dataclass(frozen=True, slots=True)
class SlotConfig:
    """``max_slots``: the batch size; ``budget_tokens``: tokens of KV the budget holds (0: no budget): the
    S x C rectangle stays within it whenever the rows' own lengths allow; ``static``: decode over the whole
    (S, C) rectangle every step."""

    max_slots: int
    budget_tokens: int = 0
    static: bool = False
    block: int = BLOCK
    # CUDA_GRAPHS: capture the decode forward per buffer shape; with ``static`` and the model on one CUDA
    # device only (``Scheduler._configure_slots`` sets it so)
    graphs: bool = False
    graph_counts: GraphCounts = field(default_factory=GraphCounts, compare=False)  # counted when ``graphs``

    def column_cap(self, slots: int) -> int:
        """Columns a buffer of ``slots`` slots may take within the budget (0: no budget). With ``graphs``
        rounded down to whole blocks (when that leaves at least one): columns short of a block decode
        eagerly, and under the default budget they would from ~2,300 columns on."""
        cap = self.budget_tokens // slots if self.budget_tokens and slots else 0
        return cap - cap % self.block if self.graphs and cap >= self.block else cap

    def columns(self, needed: int, slots: int) -> int:
        """Columns to allocate for ``needed`` in buffers of ``slots`` slots (:func:`columns_for`)."""
        return columns_for(needed, self.column_cap(slots), self.block)

    def slots_for(self, rows: int, longest: int) -> int:
        """Slots for ``rows`` rows that may each reach ``longest`` tokens: the bucket
        holding them (:func:`slot_bucket`), unless a KV budget binds: when bucket x ``longest`` exceeds
        ``budget_tokens``, the rows rounded up to a multiple of :data:`SLOT_STEP` when that fits, else the
        rows exactly (the rectangle concat reserves). Never fewer than the rows, and monotone in them; the
        columns (:meth:`columns`) then stay within ``budget_tokens // slots`` whenever the count fits.
        Raises ValueError past ``max_slots``."""
        bucket = slot_bucket(rows, self.max_slots)
        if not self.budget_tokens or bucket * longest <= self.budget_tokens:
            return bucket
        rounded = min(-(-rows // SLOT_STEP) * SLOT_STEP, bucket)
        return rounded if rounded * longest <= self.budget_tokens else rows

    def alone_rows(self, rows: int) -> int:
        """Slots the rows of one request (its ``n``) take at least when they run alone: the bucket holding
        them, or under a KV budget the rows themselves (:meth:`slots_for` falls back to them whenever the
        bucket's rectangle would not fit)."""
        rows = min(rows, self.max_slots)
        return rows if self.budget_tokens else slot_bucket(rows, self.max_slots)


class RowsState(Protocol):
    """What a join takes: ``batch.BatchTensors`` of prefilled rows: left-padded ``mask`` (r, T), a
    ``transformers`` cache whose layers have ``keys``/``values`` (r, H, T, D), ``delta`` (r,), ``tokens``
    (r, 1)."""

    cache: Any
    mask: torch.Tensor
    delta: torch.Tensor
    tokens: torch.Tensor


class _Span:
    """The decode step in progress: where each slot writes ((hi, 1, 1, 1) column indices, one copy per
    device the layers live on) and the span."""

    __slots__ = ("hi", "index", "width")

    def __init__(self) -> None:
        self.hi, self.width = 0, 0
        self.index: dict[torch.device, torch.Tensor] = {}

    def start(self, hi: int, width: int, lengths: torch.Tensor) -> None:
        """Begin a step over the slots [0, ``hi``) and columns [0, ``width``); ``lengths`` (hi,) long."""
        self.hi, self.width = hi, width
        self.index = {lengths.device: lengths.view(hi, 1, 1, 1)}

    def write(self, buffer: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Write ``states`` (hi, H, 1, D) at each slot's column; returns the view (hi, H, width, D) that
        attention reads. Raises ValueError outside a decode step or for more than one token per row."""
        if not self.index or states.shape[2] != 1:
            raise ValueError("a slot cache takes one decode token per row (prefill runs on its own cache)")
        rows = buffer[: self.hi]
        at = self.index.get(buffer.device)
        if at is None:  # a layer on another device (device_map): one copy of the indices per device
            at = self.index[buffer.device] = next(iter(self.index.values())).to(buffer.device)
        index = at.expand(-1, states.shape[1], 1, states.shape[3])
        rows.scatter_(2, index, states.to(rows.dtype))
        return rows[:, :, : self.width]


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys and values buffers (S, H, C, D); writes go where the step's span says."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, span: _Span) -> None:
        super().__init__()
        self.keys, self.values, self._span = keys, values, span
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None  # made with its buffers

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's ``key_states``/``value_states`` (hi, H, 1, D) at each slot's own column (its
        length) in place; returns the keys and values attention reads, (hi, H, width, D) views of the
        buffers (the step's span; the mask hides each slot's columns past its length). Raises ValueError
        outside a decode step or for more than one token per row."""
        assert self.keys is not None and self.values is not None
        return self._span.write(self.keys, key_states), self._span.write(self.values, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for transformers' mask builder: the step's width and no offset (the
        4-D mask the step passes is used as it is; these only size the one it would build)."""
        return self._span.width, 0

    def get_seq_length(self) -> int:
        """The step's width: the columns attention spans (the longest row's length + 1, or C when
        static), not any one row's length (each row's is its slot's entry of the lengths)."""
        return self._span.width

    def get_max_length(self) -> int:
        return -1 if self.keys is None else int(self.keys.shape[2])


class SlotCache(Cache):
    """The ``transformers`` cache the decode step passes to the model: one :class:`SlotLayer` per layer."""

    def __init__(self, layers: list[SlotLayer]) -> None:
        super().__init__(layers=layers)  # type: ignore[arg-type]


class SlotBatch:
    """The running rows' KV in slots (see the module docstring) and their per-row decode inputs.

    Row ``i`` of the scheduler's order lives in slot ``slots[i]``. ``tokens`` (B, 1) in row order are the
    tokens to feed next. Not thread-safe: the scheduler thread owns it."""

    def __init__(
        self,
        config: SlotConfig,
        layers: int,
        heads: int,
        head_dim: int,
        dtype: Any,
        device: Any,
        layer_devices: Sequence[Any] | None = None,
    ):
        """Empty: no buffers until the first join. ``device`` holds the per-slot state (lengths, tokens,
        mask); ``layer_devices`` (one per layer; default ``device`` for all) the layers' buffers."""
        self.config = config
        self._shape = (layers, heads, head_dim)
        self._dtype, self._device = dtype, device
        self._layer_devices = list(layer_devices) if layer_devices is not None else [device] * layers
        self._lost = False  # a reallocation failed half-way: the buffers are gone
        self._span = _Span()
        self.cache = SlotCache([])
        self._slots, self._columns = 0, 0
        self._order: list[int] = []  # slot of each row
        self._lengths: list[int] = []  # per slot, host side
        self._written: list[int] = []  # per slot: columns [0, n) may hold an earlier occupant's writes
        self._length_t = self._zeros(0)  # (S,) the same, on the device
        self._delta_t = self._zeros(0)  # (S,) mrope delta per slot
        self._active_t = self._zeros(0)  # (S,) 1 where a row lives
        self._slot_tokens = self._zeros(0, 1)  # (S, 1) the step's input per slot (free slots: any id)
        self._column_ids = self._zeros(0)  # (C,) 0..C-1
        self._order_t = self._zeros(0)
        self._tokens = self._zeros(0, 1)
        self._mask_kind: str | None = None
        self._graph: _DecodeGraph | None = None  # the captured forward of this buffer shape
        self._graphs = config.graphs  # False once a capture ran out of memory
        # tokens any row here or joining may reach (prompt + max_tokens; 0: unknown, their lengths so far),
        # set by the scheduler before each join and settle: sizes the slots under a KV budget
        self.longest = 0

    @classmethod
    def like(cls, config: SlotConfig, part: RowsState) -> SlotBatch:
        """An empty batch for rows of ``part``'s layers, heads, dtype and devices (each layer's own)."""
        keys = part.cache.layers[0].keys
        devices = [layer.keys.device for layer in part.cache.layers]
        return cls(
            config,
            len(devices),
            int(keys.shape[1]),
            int(keys.shape[3]),
            keys.dtype,
            part.mask.device,
            devices,
        )

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.long, device=self._device)

    @property
    def lost(self) -> bool:
        """Whether a reallocation failed half-way and took the buffers with it (no join or decode works
        any more: the rows must be failed)."""
        return self._lost

    # ---- what the scheduler reads -------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._order)

    @property
    def tokens(self) -> torch.Tensor:
        return self._tokens

    @tokens.setter
    def tokens(self, tokens: torch.Tensor) -> None:
        """The rows' next inputs (B, 1), in row order, on the batch's device (the output head, hence the
        sampled tokens, may sit on another device with a split DEVICE_MAP)."""
        self._tokens = tokens.reshape(-1, 1).to(self._device)

    @property
    def slots(self) -> list[int]:
        """The slot of each row, in row order."""
        return list(self._order)

    @property
    def capacity(self) -> tuple[int, int]:
        """(S, C): slots and columns allocated."""
        return self._slots, self._columns

    @property
    def next_pos(self) -> torch.Tensor:
        """(B,) text position of each row's next token (= its cached tokens), in row order."""
        return self._length_t.index_select(0, self._order_t)

    @property
    def delta(self) -> torch.Tensor:
        """(B,) each row's mrope delta, in row order."""
        return self._delta_t.index_select(0, self._order_t)

    def lengths(self) -> list[int]:
        """Tokens cached by each row, in row order (host side)."""
        return [self._lengths[s] for s in self._order]

    def nbytes(self) -> int:
        """Bytes of the keys and values buffers (the whole S x C rectangle of every layer)."""
        layers, heads, head_dim = self._shape
        return 2 * layers * self._slots * heads * self._columns * head_dim * self._dtype.itemsize

    def high_after(self, new_rows: int) -> int:
        """1 + the highest slot in use once ``new_rows`` more rows took the lowest free slots."""
        taken = self._free_slots(new_rows)
        return max([*self._order, *taken], default=-1) + 1

    def _free_slots(self, n: int) -> list[int]:
        """The ``n`` lowest free slots (past S where S has too few)."""
        used = set(self._order)
        free = [s for s in range(self._slots) if s not in used][:n]
        return free + list(range(self._slots, self._slots + n - len(free)))

    # ---- join and leave -----------------------------------------------------------------------------

    def join(self, parts: Sequence[RowsState]) -> list[int]:
        """Copy the rows of ``parts`` (in order) into the lowest free slots, zeroing the columns past each
        that an earlier occupant of its slot wrote; returns their slots. The buffers are reshaped at most
        once for all of them (:meth:`_reshape`): grown when the rows need more slots than S or a newcomer is
        longer than C (the rows here stay in place), or compacted when the rows, newcomers included, are
        sparse; otherwise no running row's KV moves.

        Each part (:class:`RowsState`) is left-padded: row i's real tokens are the last ``mask[i].sum()``
        columns of its cache, whose layers match this batch's (count, heads, head_dim, dtype). Raises
        ValueError when the rows would need more than ``max_slots`` slots (the scheduler never lets them
        in) and RuntimeError once a failed reallocation lost the buffers."""
        self._check_usable()
        valid = [[int(n) for n in part.mask.sum(dim=1).tolist()] for part in parts]  # host read: not a step
        joining = sum(len(v) for v in valid)
        if not joining:
            return []
        self._reshape(joining, max(max(v) for v in valid))
        slots = self._free_slots(joining)
        taken = iter(slots)
        for part, part_valid in zip(parts, valid, strict=True):
            self._copy_in(part, [next(taken) for _ in part_valid], part_valid)
        self._set_order(self._order + slots)
        self._tokens = torch.cat([self._tokens, *(p.tokens.reshape(-1, 1).to(self._tokens) for p in parts)])
        return slots

    def _copy_in(self, part: RowsState, slots: list[int], valid: list[int]) -> None:
        """Copy ``part``'s rows into ``slots`` (free, within the buffers) and set their per-slot state."""
        width = int(part.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, part.cache.layers, strict=True):
            for i, (slot, n) in enumerate(zip(slots, valid, strict=True)):
                for buffer, states in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                    buffer[slot, :, :n].copy_(states[i, :, width - n :])
                    if self._written[slot] > n:  # an earlier occupant's KV (maybe non-finite)
                        buffer[slot, :, n : self._written[slot]].zero_()
        index = torch.tensor(slots, dtype=torch.long, device=self._device)
        self._length_t.index_copy_(0, index, torch.tensor(valid, dtype=torch.long, device=self._device))
        self._delta_t.index_copy_(0, index, part.delta.to(self._device, torch.long).reshape(-1))
        self._active_t.index_fill_(0, index, 1)
        for slot, n in zip(slots, valid, strict=True):
            self._lengths[slot] = self._written[slot] = n

    def select(self, keep: Sequence[int]) -> SlotBatch:
        """Keep the rows at ``keep`` (in that order; each at most once; ValueError otherwise) and free the
        others' slots; no KV is copied (a later :meth:`settle` or join compacts sparse rows)."""
        order = [self._order[i] for i in keep]
        if len(set(order)) != len(order):
            raise ValueError("a slot batch cannot keep a row twice")
        gone = sorted(set(self._order) - set(order))
        if gone:
            index = torch.tensor(gone, dtype=torch.long, device=self._device)
            for t in (self._length_t, self._delta_t, self._active_t):
                t.index_fill_(0, index, 0)
            for slot in gone:  # its last step may have written (and failed) one column past its length
                self._written[slot] = max(self._written[slot], self._lengths[slot] + 1)
                self._lengths[slot] = 0
        self._tokens = self._tokens.index_select(
            0, torch.tensor(list(keep), dtype=torch.long, device=self._device)
        )
        self._set_order(order)
        return self

    def settle(self) -> bool:
        """Compact the rows into smaller buffers when they are sparse (see the module docstring); returns
        whether the buffers were reallocated. The compaction is optional: one that fails before it
        released an old layer is logged and the batch keeps its buffers (False); one that lost them re-raises,
        as every call does afterwards (RuntimeError)."""
        self._check_usable()
        try:
            return bool(self._order) and self._reshape(0, 0, grow=False)
        except Exception:
            if self._lost:
                raise
            log.exception("compacting the KV slots failed; the batch keeps its buffers")
            return False

    def row_kv(self, row: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Views of row ``row``'s cached (keys, values) per layer, (1, H, L, D) each, and L."""
        slot = self._order[row]
        n = self._lengths[slot]
        return [
            (layer.keys[slot : slot + 1, :, :n], layer.values[slot : slot + 1, :, :n])
            for layer in self.cache.layers
        ], n

    def _set_order(self, order: list[int]) -> None:
        self._order = order
        self._order_t = torch.tensor(order, dtype=torch.long, device=self._device)

    def _reshape(self, joining: int, longest: int, grow: bool = True) -> bool:
        """Reallocate, at most once, for the rows here and ``joining`` more (the longest ``longest``
        tokens) when they need it or are sparse (:meth:`_target`; without ``grow`` only to compact: a
        decode step grows the columns when it needs them); returns whether it did."""
        target = self._target(joining, longest)
        if target is None or not (grow or target[2]):
            return False
        slots, columns, compact = target
        if compact:
            self._reallocate(slots, columns, sources=self._order)
            self._set_order(list(range(len(self._order))))
        else:
            self._reallocate(slots, columns)
        return True

    def _target(self, joining: int, longest: int) -> tuple[int, int, bool] | None:
        """(S, C, compact) of the buffers the rows and ``joining`` more need, or None to keep these. Grow
        (rows in place) when the rows need more slots than S or more columns than C; compact (rows into the
        lowest slots) when the rows + 1 fit a bucket at most half of S, or need at most half of C, and the
        new buffers are smaller. The gap between the two is the hysteresis. The slot counts come from
        :meth:`SlotConfig.slots_for` at what the rows may reach (:attr:`longest`, or their lengths)."""
        config = self.config
        rows = len(self._order) + joining
        needed = max([longest + 1 if joining else 0] + [self._lengths[s] + 1 for s in self._order])
        reach = max(needed, self.longest)  # what the rows may grow to: sizes the slots under a budget
        if rows > self._slots:
            slots = max(self._slots, config.slots_for(rows, reach))
            return slots, config.columns(needed, slots), False
        roomy = config.slots_for(min(rows + 1, config.max_slots), reach)
        slots = roomy if 2 * roomy <= self._slots else self._slots
        columns = config.columns(needed, slots)
        sparse = slots < self._slots or 2 * needed <= self._columns
        if sparse and slots * columns < self._slots * self._columns:
            return slots, columns, True
        if needed > self._columns:
            return self._slots, config.columns(needed, self._slots), False
        return None

    def _check_usable(self) -> None:
        if self._lost:
            raise RuntimeError("the slot buffers were lost to a reallocation that failed half-way")

    def _reallocate(self, slots: int, columns: int, sources: list[int] | None = None) -> None:
        """New buffers of (``slots``, ``columns``): slot i takes old slot ``sources[i]`` (None: every slot
        stays where it is); the per-slot state moves alike and every other slot is free."""
        if sources is None and (slots, columns) == (self._slots, self._columns):
            return
        self._graph = None  # it recorded the old buffers' addresses
        if sources is None:
            sources = list(range(min(slots, self._slots)))
        index = torch.tensor(sources, dtype=torch.long, device=self._device)
        width = min(columns, self._columns)
        old_layers = list(self.cache.layers) if self._slots else [None] * self._shape[0]
        layers: list[SlotLayer] = []
        released = False
        try:
            for old, device in zip(old_layers, self._layer_devices, strict=True):
                keys, values = self._buffer(slots, columns, device), self._buffer(slots, columns, device)
                if old is not None:
                    _copy_rows(keys, old.keys, sources, index, width)
                    _copy_rows(values, old.values, sources, index, width)
                    old.keys = old.values = None  # released now: the transient extra is one layer
                    released = True
                layers.append(SlotLayer(keys, values, self._span))
        except BaseException:
            if released or not self._slots:  # some old KV is gone (or there was none): the batch is lost
                self._lost, self.cache = True, SlotCache([])
            raise
        self.cache = SlotCache(layers)
        self._length_t, self._delta_t, self._active_t, self._slot_tokens = (
            _moved(t, index, slots)
            for t in (self._length_t, self._delta_t, self._active_t, self._slot_tokens)
        )
        self._lengths = [self._lengths[s] for s in sources] + [0] * (slots - len(sources))
        self._written = [min(self._written[s], width) for s in sources] + [0] * (slots - len(sources))
        self._column_ids = torch.arange(columns, dtype=torch.long, device=self._device)
        self._slots, self._columns = slots, columns

    def _buffer(self, slots: int, columns: int, device: Any) -> torch.Tensor:
        """(slots, H, columns, D) zeros on ``device``, not garbage: masked columns still enter the
        attention products, and 0 x NaN is NaN."""
        _, heads, head_dim = self._shape
        return torch.zeros((slots, heads, columns, head_dim), dtype=self._dtype, device=device)

    # ---- decode -------------------------------------------------------------------------------------

    def decode(self, model: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step for every row: feeds ``tokens``, writes each row's new column in place, returns the
        logits (B, V) in row order (into ``out`` when given: a (B, V) tensor of the head's dtype/device).
        With ``SlotConfig.graphs`` the decoder's forward is replayed from a CUDA graph (:meth:`_graphed`).
        Raises ValueError for an attention implementation that cannot take a 4-D mask (see
        :func:`attention_kind`) and RuntimeError once a failed reallocation lost the buffers."""
        self._check_usable()
        hi, width = self._step_span()
        self._slot_tokens.index_copy_(0, self._order_t, self._tokens)
        graphed = self._graphed(model, hi, width) if self._graphs and not _DecodeGraph.failed else None
        last = graphed if graphed is not None else self._forward(model, hi, width)
        if self.config.graphs:
            counts = self.config.graph_counts
            if graphed is not None:
                counts.graphed_steps += 1
            else:
                counts.eager_steps += 1
        head = model.get_output_embeddings()
        hidden = last.index_select(0, self._order_t.to(last.device)).to(head.weight.device)  # (B, hidden)
        logits = head(hidden) if out is None else torch.mm(hidden, head.weight.t(), out=out)
        self._length_t.add_(self._active_t)  # only now: a step that raised left the lengths as they were
        for slot in self._order:
            self._lengths[slot] += 1
        self._span.index = {}
        return logits

    def _forward(self, model: Any, hi: int, width: int) -> torch.Tensor:
        """The decoder over the slots [0, ``hi``) and columns [0, ``width``): each slot's new keys and values
        written at its length; returns the last hidden states (hi, hidden). Reads only device tensors that
        live as long as the buffers (what a CUDA graph of it needs)."""
        lengths = self._length_t[:hi]
        self._span.start(hi, width, lengths)
        pos = lengths[:, None]
        mrope = pos + self._delta_t[:hi, None]
        result = model.model(
            input_ids=self._slot_tokens[:hi],
            attention_mask=self._mask(model, lengths, width),
            position_ids=torch.stack([pos, mrope, mrope, mrope]),
            cache=self.cache,
            use_cache=True,
        )
        return result.last_hidden_state[:, -1]  # (hi, hidden), on the last layer's device

    def _graphed(self, model: Any, hi: int, width: int) -> torch.Tensor | None:
        """:meth:`_forward` replayed from the CUDA graph of this buffer shape, captured first when there is
        none (see the module docstring); None to decode eagerly: columns that are not whole blocks (a KV
        budget's cap lets them grow a column per step: a capture per step costs more than it saves), out of
        memory while capturing (graphs off for this batch) or a capture that failed (logged; off in this
        process: :attr:`_DecodeGraph.failed`)."""
        graph = self._graph
        if graph is not None and graph.shape == (hi, width):
            return graph.replay()
        if width % self.config.block:
            return None
        self._graph = None  # the old graph's memory goes back before the new capture
        try:
            forward = lambda: self._forward(model, hi, width)  # noqa: E731
            self._graph = _DecodeGraph.capture((hi, width), forward, torch.device(self._device))
        except torch.OutOfMemoryError:
            self.config.graph_counts.graph_capture_failures += 1
            self._graphs = False
            log.warning("out of memory capturing the decode step as a CUDA graph; this batch decodes eagerly")
            return None
        except Exception:
            self.config.graph_counts.graph_capture_failures += 1
            _DecodeGraph.failed = True
            log.exception("capturing the decode step as a CUDA graph failed; decoding eagerly from now on")
            return None
        self.config.graph_counts.graph_captures += 1
        return self._graph.replay()

    def _step_span(self) -> tuple[int, int]:
        """(hi, width) of the next step, growing the columns first when a row's new column needs it."""
        needed = max(self._lengths[s] for s in self._order) + 1
        if needed > self._columns:
            self._reallocate(self._slots, self.config.columns(needed, self._slots))
        if self.config.static:
            return self._slots, self._columns
        return max(self._order) + 1, needed

    def _mask(self, model: Any, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """(hi, 1, 1, width): column j is visible to slot s when j <= its length (its new column included);
        bool for sdpa, additive for eager attention."""
        if self._mask_kind is None:
            self._mask_kind = attention_kind(model)
        visible = (self._column_ids[:width][None, :] <= lengths[:, None])[:, None, None, :]
        if self._mask_kind == "sdpa":
            return visible
        dtype = model.dtype
        return torch.zeros(visible.shape, dtype=dtype, device=self._device).masked_fill_(
            ~visible, torch.finfo(dtype).min
        )

    # ---- undo a failed step -------------------------------------------------------------------------

    def snapshot(self) -> tuple[list[int], torch.Tensor]:
        """The lengths: all the state a decode step changes (its writes lie past them)."""
        return list(self._lengths), self._length_t.clone()

    def restore(self, saved: tuple[list[int], torch.Tensor]) -> None:
        """Put back the lengths of :meth:`snapshot` (taken since the last join or leave: a decode step may
        grow the columns, never the slots)."""
        lengths, tensor = saved
        self._lengths = list(lengths)
        self._length_t.copy_(tensor)


class _DecodeGraph:
    """One captured decode forward: the graph, the buffer shape (hi, width) it was captured at, the tensor
    its replays write the last hidden states (hi, hidden) into, and its CUDA device."""

    __slots__ = ("device", "graph", "out", "shape")
    failed = False  # a capture failed in this process: every batch decodes eagerly from then on

    def __init__(self, graph: Any, out: torch.Tensor, shape: tuple[int, int], device: Any = None) -> None:
        self.graph, self.out, self.shape, self.device = graph, out, shape, device

    def replay(self) -> torch.Tensor:
        """Replay on the graph's device (its current stream); returns :attr:`out`."""
        with _on(self.device):
            self.graph.replay()
        return self.out

    @classmethod
    def capture(cls, shape: tuple[int, int], forward: Any, device: torch.device) -> _DecodeGraph:
        """Capture ``forward`` on ``device`` (made the current CUDA device: captures and replays go to its
        streams, whatever device the thread's default is). ``forward`` first runs once on a side stream (lazy
        initialisations, e.g. cuBLAS workspaces, must not happen during capture); the capture runs nothing,
        so replay it. Unlike ``torch.cuda.graph`` this neither empties the allocator's cache (which would
        send the step's other tensors back to cudaMalloc after every capture) nor leaves the thread on the
        capture stream when capturing fails. ``capture_error_mode="thread_local"``: other threads' CUDA calls
        do not invalidate it.

        Raises:
            torch.OutOfMemoryError: while running or capturing ``forward``.
            RuntimeError: the capture failed (a host sync or an operation graphs cannot hold in
                ``forward``), or the graph came out empty (its work ran outside the capture stream).
        """
        with _on(device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            graph = torch.cuda.CUDAGraph()
            pool = torch.cuda.graph_pool_handle()
            try:
                with torch.cuda.stream(side):  # restored however the capture ends
                    forward()
                    torch.cuda.synchronize(device)  # as torch.cuda.graph does: no work in flight anywhere
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                        try:
                            out = forward()
                        except BaseException:  # its error is the one to report (out of memory, say)
                            with contextlib.suppress(Exception):
                                _end_capture(graph, device, pool)
                            raise
                        _end_capture(graph, device, pool)
            finally:  # the eager step that follows a failure must not overtake the warm-up's writes
                current.wait_stream(side)
        _reraise_warnings(caught)
        return cls(graph, out, shape, device)


def _on(device: Any) -> Any:
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op context (tests stand in on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _end_capture(graph: Any, device: Any, pool: Any) -> None:
    """End the capture. When that fails (the capture was invalidated), torch has not stopped routing the
    capture's allocations to its pool (``CUDAGraph::capture_end`` raises before it does): do that here, best
    effort, so that the allocator can free its cache again (out-of-memory retries, ``empty_cache``)."""
    try:
        graph.capture_end()
    except Exception:
        try:
            torch._C._cuda_endAllocateToPool(torch.device(device).index or 0, pool)
        except Exception:  # an internal API: the failure is already being reported
            log.debug("ending the failed capture's pool failed", exc_info=True)
        raise


def _reraise_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Raise RuntimeError for torch's "empty graph" warning (nothing was captured: a replay would do
    nothing while the lengths advance); pass the other warnings on."""
    for w in caught:
        if "empty" in str(w.message).lower() and "graph" in str(w.message).lower():
            raise RuntimeError(f"the captured decode graph is empty: {w.message}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _copy_rows(
    new: torch.Tensor, old: torch.Tensor, sources: list[int], index: torch.Tensor, width: int
) -> None:
    """Copy ``old``'s slots ``sources`` (``index`` the same on the state's device; columns [0, width)) into
    ``new``'s first slots. Kept apart so that no reference to ``old`` outlives the copy (its caller
    releases it next)."""
    n = len(sources)
    if not n:
        return
    if sources == list(range(n)):  # a grow: one slice copy, no gathered temporary
        new[:n, :, :width].copy_(old[:n, :, :width])
    else:
        new[:n, :, :width].copy_(old[:, :, :width].index_select(0, index.to(old.device)))


def _moved(t: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """A (rows, ...) tensor of zeros whose first rows are ``t``'s rows at ``index``."""
    moved = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    if index.numel():
        moved[: index.numel()].copy_(t.index_select(0, index))
    return moved


def reserved_shape(
    batch: SlotBatch | None, config: SlotConfig, new_rows: int, longest: int
) -> tuple[int, int]:
    """(S, C) the slot buffers may reach: ``batch`` (None: none yet) with ``new_rows`` more rows joining and
    every row growing to ``longest`` tokens (prompt + max_tokens). A join that grows S reallocates with the
    columns for the new S (:meth:`SlotConfig.columns`); otherwise C is at least what is allocated now."""
    if batch is None:
        high, slots, columns = new_rows, 0, 0
    else:
        high, (slots, columns) = batch.high_after(new_rows), batch.capacity
    if high == 0:
        return slots, columns
    if high > slots:  # the join grows S (as ``SlotBatch._target`` does: only past the slots held)
        need_slots = config.slots_for(min(high, config.max_slots), longest)
        return need_slots, config.columns(longest, need_slots)
    # S stays: never less than what is held, even when a shorter ``longest`` would pick a bucket now
    return slots, max(columns, config.columns(longest, slots))
