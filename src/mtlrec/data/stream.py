"""Larger-than-memory interactions: Parquet read row group by row group, never whole (`data.stream`).

The interactions are a Parquet file or a folder of them. `ParquetLog` knows their row groups from
the files' footers; every pass reads row groups (only the columns it needs) one at a time, so
memory depends on the row-group and buffer sizes, never on the number of rows.

- **Split** (`StreamSplit`): a row's part is decided from the row alone, the same on every pass:
  `random` by a seeded hash of its global row number (the parts' sizes are binomial around the
  fractions, not the exact counts of the in-memory split); `time` by thresholds that a few
  passes over the timestamp column find exactly (the same rows as the in-memory time split).
- **Fit**: `Schema.fit_stream` over the training rows, one pass (vocabulary counts merged per
  row group, numeric moments accumulated).
- **Training** (`InteractionStream.epoch`): row groups are shuffled per epoch (seed, epoch); under
  several processes, the epoch's training rows in that order are cut into one contiguous range per
  rank (`share`), sized so that each rank holds its part of every global batch: every rank steps
  the same number of times (as DDP needs), the ranges are disjoint, and together they cover every
  training row exactly once. A rank reads only the row groups of its range (a group on the
  boundary of two ranges is read by both, each keeping its own rows). A rank's training rows are
  cut into buffers of `data.stream_buffer_rows` rows (rounded up to whole batches); each buffer
  is shuffled and cut into batches. A background thread reads and encodes the next buffer while
  the current one trains (pyarrow, pandas and numpy release the GIL for most of that work).
  `state_dict()` records the steps taken, so training resumes mid-epoch exactly.
- **Evaluation** (`InteractionStream.batches`): one part's rows in file order, for predictions;
  under several processes each rank predicts a contiguous run of row groups.
- **Retrieval tasks**: their log-Q correction needs each item's frequency among the positive
  training interactions before the first step; `InteractionStream` counts it in one pass over the
  item id and label columns when it is built (`item_log_q`), and every encoded chunk carries it.

Not streamable (the config refuses them): sequence features and the `leave_last_out` split,
which need each user's whole log in time order.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import torch

from mtlrec.config import Config
from mtlrec.data.batch import Batch
from mtlrec.data.dataset import EncodedData, SourceData
from mtlrec.data.sharding import check_rank, shard, shard_bounds
from mtlrec.data.split import PARTS, hash_parts, order_keys, time_parts, time_thresholds
from mtlrec.data.tables import Tables, load_tables, timestamps
from mtlrec.errors import ConfigError, DataError
from mtlrec.memory import release_freed_memory

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtlrec.data.schema import InteractionChunk, Schema

_PARQUET = (".parquet", ".pq")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# The files


@dataclass(frozen=True)
class RowGroup:
    """One row group: its file, its index in the file, its first global row number, its rows."""

    file: int
    index: int
    start: int
    rows: int


class ParquetLog:
    """The interactions as the row groups of one Parquet file or of a folder of them (sorted by name).

    Only the footers are read here. Global row numbers run over the files in order.

    Raises:
        ConfigError: the path is not Parquet.
        DataError: the path does not exist, holds no Parquet file, or a file cannot be read.
    """

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"data.interactions: '{self.path}' does not exist")
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.is_file() and p.name.lower().endswith(_PARQUET))
            if not self.files:
                raise DataError(f"data.interactions: the folder '{self.path}' holds no Parquet files "
                                f"({', '.join(_PARQUET)}); data.stream reads Parquet")
        elif self.path.name.lower().endswith(_PARQUET):
            self.files = [self.path]
        else:
            raise ConfigError(f"data.stream reads the interactions from Parquet, but data.interactions is "
                              f"'{self.path.name}'; convert it to Parquet (or a folder of Parquet files) "
                              "or set data.stream: false")
        self._metadata: list[pq.FileMetaData] = []
        self.groups: list[RowGroup] = []
        self.columns: list[str] = []
        start = 0
        for f, file in enumerate(self.files):
            try:
                meta = pq.read_metadata(file)
            except Exception as exc:  # pyarrow raises its own error types for damaged files
                raise DataError(f"data.interactions: cannot read '{file}' as Parquet: {exc}") from None
            self._metadata.append(meta)
            names = list(meta.schema.to_arrow_schema().names)
            if f == 0:
                self.columns = names
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    self.groups.append(RowGroup(f, g, start, rows))
                    start += rows
        self.num_rows = start
        if self.num_rows == 0:
            raise DataError(f"data.interactions: '{self.path}' has no rows")

    def require(self, columns: Iterable[str]) -> None:
        """Check that every file has `columns`; a DataError names the first file lacking one."""
        for file, meta in zip(self.files, self._metadata, strict=True):
            names = set(meta.schema.to_arrow_schema().names)
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(f"data.interactions: '{file.name}' lacks the columns {missing} that the config "
                                f"names; its columns are {sorted(names)}")

    def label(self, group: RowGroup) -> str:
        """How messages refer to a row group."""
        return f"'{self.files[group.file].name}' (row group {group.index})"

    def read_arrow(self, group: RowGroup, columns: list[str] | None) -> pa.Table:
        """One row group's `columns` (None: all) as an Arrow table."""
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(self.files[group.file], metadata=self._metadata[group.file])
            # One thread: the trainer's threads own the cores; this runs beside them.
            return handle.read_row_group(group.index, columns=columns, use_threads=False)
        except Exception as exc:  # pyarrow raises its own error types for damaged files
            raise DataError(f"data.interactions: cannot read {self.label(group)}: {exc}") from None

    def read(self, group: RowGroup, columns: list[str] | None) -> pd.DataFrame:
        """One row group's `columns` (None: all) as a DataFrame."""
        return self.read_arrow(group, columns).to_pandas(split_blocks=True)


# ---------------------------------------------------------------------------------------------
# The split


class StreamSplit:
    """Train / valid / test of every interaction row, decided row by row (see the module docstring).

    Args:
        log: the interactions.
        config: the run's config (`data.split`, `data.timestamp`).

    Attributes:
        counts: int64 [G, 3] rows of each part (train, valid, test) in each row group.
    """

    def __init__(self, log: ParquetLog, config: Config) -> None:
        cfg = config.data.split
        self.log = log
        self.method = cfg.method
        self.valid, self.test, self.seed = cfg.valid, cfg.test, cfg.seed
        self.timestamp = config.data.timestamp
        self.thresholds: tuple[int | None, int | None] = (None, None)
        if self.method == "time":
            if self.timestamp is None:
                raise ConfigError("data.split.method is 'time', which needs data.timestamp (the column to "
                                  "order by)")
            log.require([self.timestamp])
            self._key_kind: str | None = None
            self.thresholds = time_thresholds(self._key_passes, log.num_rows, self.valid, self.test)
        elif self.method != "random":
            raise ConfigError(f"data.split.method is '{self.method}', which data.stream cannot do; use 'random' "
                              "or 'time'")
        self.counts = np.zeros((len(log.groups), len(PARTS)), dtype=np.int64)
        for g, group in enumerate(log.groups):
            frame = self.log.read(group, self.columns) if self.columns else None
            self.counts[g] = np.bincount(self.parts(group, frame), minlength=len(PARTS))

    @property
    def columns(self) -> list[str]:
        """The columns that `parts` needs."""
        return [self.timestamp] if self.method == "time" and self.timestamp is not None else []

    def _keys(self, group: RowGroup, frame: pd.DataFrame) -> np.ndarray:
        assert self.timestamp is not None
        values = timestamps(frame, self.timestamp, self.log.label(group))
        kind = "f" if values.dtype.kind == "f" else "i"
        if self._key_kind is None:
            self._key_kind = kind
        elif kind != self._key_kind:
            raise DataError(f"data.timestamp: column '{self.timestamp}' of {self.log.label(group)} holds "
                            f"{'floats' if kind == 'f' else 'integers or dates'}, but earlier row groups hold "
                            f"{'floats' if self._key_kind == 'f' else 'integers or dates'}; give every file "
                            "the same type")
        return order_keys(values)

    def _key_passes(self) -> Iterator[np.ndarray]:
        assert self.timestamp is not None
        for group in self.log.groups:
            yield self._keys(group, self.log.read(group, [self.timestamp]))

    def parts(self, group: RowGroup, frame: pd.DataFrame | None) -> np.ndarray:
        """int8 [rows] part (0 train, 1 valid, 2 test) of each row of `group`; `frame` holds its
        `columns` (None for a random split)."""
        if self.method == "random":
            rows = np.arange(group.start, group.start + group.rows, dtype=np.int64)
            return hash_parts(rows, self.valid, self.test, self.seed)
        if frame is None:
            raise ValueError("a time split needs the row group's timestamps")
        return time_parts(self._keys(group, frame), self.thresholds)

    def sizes(self) -> dict[str, int]:
        """Rows of each part."""
        return {part: int(self.counts[:, i].sum()) for i, part in enumerate(PARTS)}


# ---------------------------------------------------------------------------------------------
# Reading ahead in a background thread


class _End:
    pass


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(make: Callable[[], Iterator[T]], depth: int = 1) -> Iterator[T]:
    """The items of `make()`, produced by a background thread up to `depth` items ahead.

    An error in the thread is raised here; closing this iterator early stops the thread.
    """
    ahead: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in make():
                if not put(item):
                    return
            put(_End())
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Failed(exc))

    thread = threading.Thread(target=produce, name="mtlrec-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------------------------
# Encoded batches


def _generator(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]))


_FIELDS = ("keys", "context", "labels", "masks")


class _Filling:
    """A buffer of `size` encoded rows, filled in place from chunks (numpy copies: one thread,
    beside training; no list of pieces and no concatenation, so one buffer's memory at a time)."""

    def __init__(self, first: SourceData, size: int) -> None:
        self.size = size
        self.filled = 0
        self.arrays = {name: {key: np.empty((size, *t.shape[1:]), dtype=t.numpy().dtype)
                              for key, t in getattr(first, name).items()} for name in _FIELDS}

    def add(self, chunk: SourceData, start: int, stop: int) -> None:
        end = self.filled + stop - start
        for name in _FIELDS:
            for key, t in getattr(chunk, name).items():
                self.arrays[name][key][self.filled:end] = t.numpy()[start:stop]
        self.filled = end

    def source(self) -> SourceData:
        out = SourceData(self.size)
        for name in _FIELDS:
            setattr(out, name, {key: torch.from_numpy(a) for key, a in self.arrays[name].items()})
        return out


def _take(source: SourceData, rows: torch.Tensor) -> SourceData:
    """Rows `rows` of `source` (every field)."""
    out = SourceData(len(rows))
    for name in _FIELDS:
        setattr(out, name, {key: t.index_select(0, rows) for key, t in getattr(source, name).items()})
    return out


def _concat(pieces: list[SourceData]) -> SourceData:
    """The rows of `pieces`, one after the other (every field)."""
    out = SourceData(sum(piece.num_rows for piece in pieces))
    for name in _FIELDS:
        fields = [getattr(piece, name) for piece in pieces]
        setattr(out, name, {key: torch.cat([f[key] for f in fields]) for key in fields[0]} if fields else {})
    return out


def _size(bounds: tuple[int, int]) -> int:
    return bounds[1] - bounds[0]


@dataclass(frozen=True)
class Share:
    """What one rank trains on in one epoch (`InteractionStream.share`).

    Attributes:
        segments: (row group, first, stop): runs of the row groups' training rows (positions among a
            group's training rows, in file order), in reading order.
        batch_size: the rank's part of a full global batch.
        rows: training rows of the rank in the epoch.
        steps: the epoch's global batches, the same on every rank.
    """

    segments: list[tuple[int, int, int]]
    batch_size: int
    rows: int
    steps: int

    def buffer_rows(self, wanted: int) -> int:
        """Rows of a shuffle buffer: `wanted` rounded up to whole batches of this rank."""
        return math.ceil(wanted / self.batch_size) * self.batch_size


@dataclass
class _Buffer:
    """One shuffled buffer: its encoded rows and the order to draw them in."""

    index: int
    data: EncodedData
    order: torch.Tensor


class InteractionStream:
    """Batches of the interactions read from Parquet, encoded with a fitted schema, per epoch.

    Args:
        log: the interactions.
        split: their parts.
        schema: the fitted schema.
        catalogue: `schema.encode_catalogue(...)`: the entity tables the batches point into.
        batch_size: training rows per batch.
        buffer_rows: rows shuffled together (rounded up to whole batches).
        seed: the run's seed (row-group order and buffer shuffles).

    Attributes:
        item_log_q: per retrieval task, float32 log q of every item entity row (`item_log_q` of
            `mtlrec.data.schema`), counted over the training rows when the stream is built.
    """

    def __init__(self, log: ParquetLog, split: StreamSplit, schema: Schema, catalogue: EncodedData,
                 batch_size: int, buffer_rows: int, seed: int) -> None:
        if batch_size < 1 or buffer_rows < 1:
            raise ValueError(f"batch_size and buffer_rows must be >= 1, got {batch_size} and {buffer_rows}")
        self.log = log
        self.split = split
        self.schema = schema
        self.catalogue = catalogue
        self.batch_size = batch_size
        self.buffer_rows = math.ceil(buffer_rows / batch_size) * batch_size
        self.seed = seed
        self.columns = stream_columns(schema.config, log)
        self._epoch = 0
        self._position = 0
        self._world_size = 1
        self.item_log_q = self._count_retrieval_items()

    # -- reading -------------------------------------------------------------------------------
    def chunk(self, group: RowGroup, part: int, columns: list[str] | None = None) -> pd.DataFrame:
        """The rows of `group` in part `part` (0 train, 1 valid, 2 test), `columns` (default: all needed)."""
        import pyarrow as pa

        wanted = self.columns if columns is None else columns
        split_columns = [c for c in self.split.columns if c not in wanted]
        table = self.log.read_arrow(group, wanted + split_columns)
        times = table.select(self.split.columns).to_pandas() if self.split.columns else None
        keep = self.split.parts(group, times) == part
        if not keep.all():  # filtered in Arrow, before any pandas copy
            table = table.filter(pa.array(keep))
        return table.select(wanted).to_pandas(split_blocks=True)

    def encoded(self, group: RowGroup, part: int) -> SourceData:
        """The rows of `group` in part `part`, encoded."""
        return self.schema.encode_interactions(self.chunk(group, part), self.catalogue, self.log.label(group),
                                               self.item_log_q)

    def _count_retrieval_items(self) -> dict[str, np.ndarray]:
        """Each retrieval task's log q per item entity row, from one pass over the training rows'
        ids and labels (the counts `Schema.encode` takes from the whole table in memory)."""
        from mtlrec.data.schema import item_log_q

        items = self.catalogue.items
        out: dict[str, np.ndarray] = {}
        for task in self.schema.config.tasks_of("retrieval"):
            assert items is not None  # the config requires ids for a retrieval task
            counts = np.zeros(items.num_rows, dtype=np.int64)
            for _, keys, positive in self.keys_and_labels("train", task.name):
                counts += np.bincount(keys[positive], minlength=items.num_rows)
            out[task.name] = item_log_q(counts)
        return out

    def positives(self, part: str, task: str, limit: int) -> EncodedData:
        """The first `limit` rows of `part`, in file order, that are positives of retrieval task
        `task`, encoded (retrieval metrics rank the catalogue for each)."""
        code = PARTS.index(part)
        pieces: list[SourceData] = []
        taken = 0
        for g, group in enumerate(self.log.groups):
            if taken >= limit:
                break
            if not self.split.counts[g, code]:
                continue
            source = self.encoded(group, code)
            rows = torch.from_numpy(np.flatnonzero(source.masks[task].numpy())[:limit - taken])
            if len(rows):
                pieces.append(_take(source, rows))
                taken += len(rows)
        return EncodedData(self.catalogue.spec, self.catalogue.users, self.catalogue.items,
                           {"interactions": _concat(pieces)})

    # -- training ------------------------------------------------------------------------------
    def group_order(self, epoch: int) -> np.ndarray:
        """Row groups (indices into `log.groups`) in the order epoch `epoch` reads them: a permutation
        drawn from (seed, epoch), the same on every rank."""
        return _generator(self.seed, epoch).permutation(len(self.log.groups))

    def num_rows(self, part: str = "train") -> int:
        """Rows of `part` (0 train, 1 valid, 2 test) over the whole log."""
        return int(self.split.counts[:, PARTS.index(part)].sum())

    def num_batches(self) -> int:
        """Training steps of an epoch: the global batches of its rows (the last may be short), the
        same on every rank."""
        return -(-self.num_rows("train") // self.batch_size)

    def share(self, epoch: int, rank: int = 0, world_size: int = 1) -> Share:
        """What `rank` of `world_size` trains on in `epoch` (see `Share`).

        The epoch's training rows, in `group_order`, are cut into one contiguous range per rank,
        sized so that every rank holds its part of every global batch: rank r's part of a batch of
        b rows is `shard_bounds(b, r, world_size)`, as for data held in memory. The ranges are
        disjoint and cover every training row once; all ranks step the same number of times.
        """
        check_rank(rank, world_size)
        steps = self.num_batches()
        total = self.num_rows("train")
        if total < world_size:
            raise DataError(f"data.interactions has {total} training rows, fewer than the {world_size} processes; "
                            "train with fewer processes")
        last = total - (steps - 1) * self.batch_size

        def rows(q: int) -> int:
            return (steps - 1) * _size(shard_bounds(self.batch_size, q, world_size)) + \
                _size(shard_bounds(last, q, world_size))

        first = sum(rows(q) for q in range(rank))
        stop = first + rows(rank)
        order = self.group_order(epoch)
        counts = self.split.counts[order, 0]
        ends = np.cumsum(counts)
        segments = []
        for g, count, end in zip(order, counts, ends, strict=True):
            lo, hi = max(first, int(end - count)), min(stop, int(end))
            if lo < hi:
                segments.append((int(g), lo - int(end - count), hi - int(end - count)))
        return Share(segments, _size(shard_bounds(self.batch_size, rank, world_size)), stop - first, steps)

    def _buffers(self, share: Share, epoch: int, rank: int, first: int) -> Iterator[_Buffer]:
        """Shuffled buffers `first`, `first` + 1, ... of the rank's training rows."""
        buffer_rows = share.buffer_rows(self.buffer_rows)
        sizes = np.array([hi - lo for _, lo, hi in share.segments], dtype=np.int64)
        ends = np.cumsum(sizes)
        row = first * buffer_rows  # first row of the buffer, in the rank's stream of training rows
        index = first
        filling: _Filling | None = None
        s = int(np.searchsorted(ends, row, side="right"))
        skip = row - (int(ends[s - 1]) if s > 0 else 0)
        for g, lo, hi in share.segments[s:]:
            group = self.log.groups[g]
            chunk = self.encoded(group, 0)
            if chunk.num_rows != self.split.counts[g, 0]:
                raise DataError(f"data.interactions: {self.log.label(group)} holds {chunk.num_rows} training rows, "
                                f"but held {self.split.counts[g, 0]} when the run started; the files changed while "
                                "training")
            at, skip = lo + skip, 0
            while at < hi:
                if filling is None:
                    filling = _Filling(chunk, min(buffer_rows, share.rows - row))
                take = min(hi - at, filling.size - filling.filled)
                filling.add(chunk, at, at + take)
                at += take
                if filling.filled == filling.size:
                    yield self._shuffled(filling.source(), epoch, rank, index)
                    row += filling.size
                    index += 1
                    filling = None
                    # Row groups' temporaries fragment this thread's heap; return it once a buffer,
                    # or the process's RSS drifts with the number of buffers read.
                    release_freed_memory(collect=False)
            del chunk

    def _shuffled(self, source: SourceData, epoch: int, rank: int, index: int) -> _Buffer:
        order = torch.from_numpy(_generator(self.seed, epoch, rank, index).permutation(source.num_rows))
        data = EncodedData(self.catalogue.spec, self.catalogue.users, self.catalogue.items,
                           {"interactions": source})
        return _Buffer(index, data, order)

    def epoch(self, epoch: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """`rank`'s training batches in pass `epoch`, shuffled (see the module docstring): its part of
        each of the epoch's `num_batches` global batches.

        A rank whose part of the last global batch is empty (fewer rows in it than ranks) steps on
        one row of its own with every label masked out (`Batch.unlabelled`). If the stream's state
        is inside this pass (after `load_state_dict`, or an interrupted loop), iteration resumes
        with the step that would have come next.
        """
        if epoch != self._epoch:
            self._epoch, self._position = epoch, 0
        if self._position and self._world_size != world_size:
            raise DataError(f"the stream's state is mid-epoch for {self._world_size} processes, not {world_size}; "
                            "resume with the same number of processes")
        self._world_size = world_size
        share = self.share(epoch, rank, world_size)
        per_buffer = share.buffer_rows(self.buffer_rows) // share.batch_size
        buffers = -(-share.rows // (per_buffer * share.batch_size))
        first = min(self._position // per_buffer, buffers - 1)
        skip = self._position - first * per_buffer
        last: _Buffer | None = None
        for buffer in prefetch(lambda: self._buffers(share, epoch, rank, first)):
            batches = -(-len(buffer.order) // share.batch_size)
            for j in range(skip if buffer.index == first else 0, batches):
                rows = buffer.order[j * share.batch_size:(j + 1) * share.batch_size]
                self._position += 1
                yield buffer.data.batch("interactions", rows)
            last = buffer
        assert last is not None
        while self._position < share.steps:
            self._position += 1
            yield last.data.batch("interactions", last.order[:1]).unlabelled()
        self._epoch, self._position = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Where training stands: {'epoch', 'position' (steps taken in it), 'world_size'} and the
        settings that must not change on resume. Every rank is at the same step, so rank 0's state
        resumes them all."""
        return {"epoch": self._epoch, "position": self._position, "world_size": self._world_size,
                "num_rows": self.num_rows("train"), "batch_size": self.batch_size,
                "buffer_rows": self.buffer_rows, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from `state_dict()`; the data, batch size, buffer and seed must be the same."""
        current = self.state_dict()
        for key in ("num_rows", "batch_size", "buffer_rows", "seed"):
            if key in state and int(state[key]) != current[key]:
                raise DataError(f"the checkpoint's stream has {key}={state[key]}, but this run has {current[key]}; "
                                "resume with the same data and settings")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._world_size = int(state.get("world_size", 1))

    # -- evaluation ----------------------------------------------------------------------------
    def batches(self, part: str, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """The rows of `part` in file order, in batches of at most `batch_size` (predictions).

        With several ranks, each takes a contiguous run of the row groups that hold rows of `part`
        (`shard`): their predictions, gathered in rank order, are in file order, and each row
        group is cut into the very batches one process cuts.
        """
        code = PARTS.index(part)
        groups = shard([g for g in range(len(self.log.groups)) if self.split.counts[g, code]], rank, world_size)

        def chunks() -> Iterator[EncodedData]:
            for g in groups:
                source = self.encoded(self.log.groups[g], code)
                yield EncodedData(self.catalogue.spec, self.catalogue.users, self.catalogue.items,
                                  {"interactions": source})
                release_freed_memory(collect=False)  # as in `_buffers`: no drift with the row groups read

        for data in prefetch(chunks):
            n = data.num_rows("interactions")
            for start in range(0, n, batch_size):
                yield data.batch("interactions", torch.arange(start, min(start + batch_size, n)))

    def keys_and_labels(self, part: str, task: str | None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(user key, item key, positive) int64/int64/bool [R] of every row of `part`, row group by row
        group; positive is True where binary task `task` has label 1 (`Schema.positive_mask`; all
        False without a task).

        Reads only the id and label columns (serving state, ranking report, retrieval's log q).
        """
        cfg = self.schema.config.data
        users, items = self.catalogue.users, self.catalogue.items
        if cfg.user_id is None or cfg.item_id is None or users is None or items is None:
            return
        chosen = next((t for t in self.schema.config.tasks if t.name == task), None) if task is not None else None
        label = chosen.label if chosen is not None else None
        columns = [cfg.user_id, cfg.item_id] + ([label] if label is not None and label in self.log.columns else [])
        code = PARTS.index(part)
        for g, group in enumerate(self.log.groups):
            if not self.split.counts[g, code]:
                continue
            frame = self.chunk(group, code, columns)
            positive = (self.schema.positive_mask(chosen, frame) if chosen is not None
                        else np.zeros(len(frame), dtype=bool))
            yield users.rows_of(frame[cfg.user_id]), items.rows_of(frame[cfg.item_id]), positive


# ---------------------------------------------------------------------------------------------
# Setting up


def stream_columns(config: Config, log: ParquetLog) -> list[str]:
    """The interaction columns a streamed run reads: ids, interaction features and labels present."""
    data = config.data
    wanted = [data.user_id, data.item_id]
    wanted += [f.source_column for f in config.features if f.table == "interactions" and f.type != "sequence"]
    labels = [t.label for t in config.tasks if t.table == "interactions"]
    wanted += [label for label in labels if label in log.columns]
    out: list[str] = []
    for column in wanted:
        if column is not None and column not in out:
            out.append(column)
    return out


def fit_chunks(log: ParquetLog, split: StreamSplit, config: Config) -> Iterator[InteractionChunk]:
    """Every row group in file order with the positions of its training rows (`Schema.fit_stream`),
    read one ahead in a background thread."""
    columns = stream_columns(config, log) + [c for c in split.columns if c not in stream_columns(config, log)]

    def chunks() -> Iterator[InteractionChunk]:
        for group in log.groups:
            frame = log.read(group, columns)
            for key, column in (("data.user_id", config.data.user_id), ("data.item_id", config.data.item_id)):
                if column is not None and frame[column].isna().any():
                    raise DataError(f"{key}: column '{column}' of {log.label(group)} has "
                                    f"{int(frame[column].isna().sum())} missing ids; drop or fill those rows")
            parts = split.parts(group, frame[split.columns] if split.columns else None)
            yield frame, np.flatnonzero(parts == 0)

    return prefetch(chunks)


def open_stream(config: Config, base_dir: Path, given: Mapping[str, Any] | None = None
                ) -> tuple[ParquetLog, Tables]:
    """Open the interactions of a streamed run and read the other tables (catalogue-sized) whole.

    The returned tables hold the first row group of the interactions as a sample: every check of
    `load_tables` (columns, types, labels that leak into features) runs on it and the other tables.

    Raises:
        ConfigError: the interactions are not Parquet (or were given as a DataFrame).
        DataError: a file is missing or unreadable, or a table does not fit the config.
    """
    given = dict(given or {})
    source = given.pop("interactions", None)
    if isinstance(source, pd.DataFrame):
        raise ConfigError("data.stream reads the interactions from Parquet row group by row group, but they were "
                          "given as a DataFrame; pass a path, or set data.stream: false")
    path = Path(source) if source is not None else base_dir / config.data.interactions
    log = ParquetLog(path)
    sample = log.read(log.groups[0], None)
    tables = load_tables(config, base_dir, {**given, "interactions": sample},
                         labels={"interactions": log.label(log.groups[0])})
    log.require(stream_columns(config, log))
    return log, tables
