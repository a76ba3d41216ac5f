"""The stitcher stage: crop each network output into its block, write complete blocks."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np

from ._kernels import crop_copy, crop_nd
from .errors import ModelOutputError, TileSegmentError, UsageError
from .modes import Mode, get_mode
from .io.ngff import storage_order
from .io.output import Output
from .io.sinks import MemorySink, Sink
from .plan import TilePlan

__all__ = ["Stitcher"]


class Stitcher:
    """Assemble network outputs of a `TilePlan` into one image, block by block.

    Each output is cropped to the pixels its tile owns (the first
    ``tile_size`` pixels after ``geometry.crop``, clipped at the image edge)
    and reduced on the fly: ``"labels"`` takes the argmax (uint8, ``logit > 0``
    for one class), ``"probabilities"`` the softmax scaled to uint8
    (``round(p * 255)``, sigmoid for one class), ``"logits"`` keeps float32.
    A block is handed to the sink the moment its last tile arrives, so every
    chunk is written once, whole, and memory holds only unfinished blocks.

    Parameters
    ----------
    plan : TilePlan
        The plan the tiles come from (``tiler.plan``).
    output : None, path, zarr store or Output
        None keeps the result in memory (a numpy array); a path or store gets
        an OME-Zarr image group whose full-resolution array is ``"0"``. An
        `tilesegment.io.output.Output` says how to write it: overwrite,
        resume, OME-Zarr version, storage options, pixel size, class names,
        the run record for resume, writer threads.
    mode : {"labels", "probabilities", "logits"} or Mode
        What to write per pixel (see `tilesegment.modes`).
    num_classes : int, optional
        Output channels; taken from the first output when omitted. Needed for
        a file output of labels that arrive reduced (``add(..., reduced=True)``)
        or are filled first, whose metadata names the label values.
    done_blocks : array of int, optional
        Blocks already written (from the manifest), or written by others.
    sink : Sink, optional
        The sink to write into, instead of one made from `output`: any
        `tilesegment.contracts.Sink`, e.g. a `MemorySink`, or the `BlockSink`
        with which each task of a distributed run writes its own blocks into
        the output the client created.

    Examples
    --------
    >>> import numpy as np, tilesegment as ts
    >>> tiler = ts.Tiler(np.random.rand(50, 40), ts.Geometry(halo=2, step=4), tile_size=16)
    >>> with ts.Stitcher(tiler.plan, mode="logits") as stitcher:
    ...     for batch in tiler.batches(4):
    ...         stitcher.add(batch, batch.data)   # identity "network", same padding
    >>> np.allclose(stitcher.result[0], tiler.source.read(0, 50, 0, 40)[..., 0])
    True
    """

    def __init__(
        self,
        plan: TilePlan,
        output: Union[None, str, os.PathLike, Any] = None,
        mode: Union[str, Mode] = "labels",
        *,
        num_classes: Optional[int] = None,
        done_blocks: Optional[np.ndarray] = None,
        sink: Optional[Sink] = None,
    ) -> None:
        self.plan = plan
        self.mode: Mode = get_mode(mode)
        if output is not None and not isinstance(output, Output):
            output = Output(output)
        self._output: Optional[Output] = output
        if output is not None and not output.resume:
            output.check()
        self._sink: Optional[Sink] = sink
        self._num_classes = num_classes
        # Blocks are cropped into in (class, *plan axes) order; the output stores its axes
        # in NGFF order (time before the class axis), and buffers are views between the two.
        names = ("c",) * self.mode.per_class + tuple(plan.axes)
        self._order = storage_order(names)
        self._names = tuple(names[i] for i in self._order)
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._block_of = plan.tile_blocks()
        self._missing = np.diff(plan.block_tiles).astype(np.int64)
        self._seen = np.zeros(plan.n_tiles, dtype=bool)
        if done_blocks is not None:
            self.mark_written(done_blocks)
        self._closed = False
        self.result: Any = None
        #: Tiles that could not be read and were filled (``on_error="skip"``).
        self.failed_tiles: list[dict] = []
        self._failed_in: dict[int, list[dict]] = {}  # per block, until it is committed
        if num_classes is not None and sink is None:
            self._open(num_classes)

    # -- setup -----------------------------------------------------------------------

    def _open(self, num_classes: Optional[int]) -> None:
        """Make the sink; `num_classes` None: not known yet (a label map, reduced or filled first)."""
        if num_classes is None and self._output is not None:
            raise UsageError(
                f"mode {self.mode.name!r} outputs that arrive reduced (or filled first) do not say how many "
                "classes the network has, which the output's label metadata names; "
                "pass Stitcher(..., num_classes=K)")
        self._num_classes = num_classes
        mode = self.mode
        shape, dtype = self._stored(mode.shape(self.plan.shape, num_classes or 1)), mode.dtype
        if self._output is None:
            self._sink = MemorySink(shape, dtype)
        else:
            chunks = self._stored(mode.shape(self.plan.chunk_size, num_classes))
            self._sink = self._output.sink(shape, dtype, chunks, names=self._names,
                                           labels=mode.label_count(num_classes))

    def _stored(self, values: tuple) -> tuple:
        """Per-axis `values` in (class, *plan axes) order, put in the output's axis order."""
        return tuple(values[i] for i in self._order)

    # -- adding outputs -------------------------------------------------------------

    def add(self, tiles: Any, outputs: Any, reduced: bool = False) -> None:
        """Crop and store the network `outputs` of `tiles`.

        Parameters
        ----------
        tiles : Batch or sequence of int
            The batch the outputs belong to, or its plan indices.
        outputs : array-like or torch.Tensor
            Network outputs, shape ``(N, K, h_out, w_out)`` (``(N, K, d_out,
            h_out, w_out)`` for volumes and stacks), at least
            ``geometry.crop + tile_size`` along each axis.
        reduced : bool
            The outputs are already cropped to ``tile_size`` and reduced to
            what the mode writes (``(N, 1, *tile_size)`` labels, ``(N, K, *tile_size)``
            uint8 probabilities or float32 logits), as a GPU executor
            returns them; they are copied as they are.
        """
        if self._closed:
            raise UsageError("stitcher is closed; create a new one to add more tiles")
        indices = np.asarray(getattr(tiles, "indices", tiles), dtype=np.int64).reshape(-1)
        outputs = _as_numpy(outputs)
        self._check(indices, outputs, reduced)
        if self._sink is None:  # reduced labels have one channel, whatever the classes
            self._open(outputs.shape[1] if self.mode.per_class or not reduced else None)
        kernel = crop_copy if reduced else self.mode.kernel
        crop = (0,) * len(self.plan.shape) if reduced else self.plan.geometry.crop
        for index, out in zip(indices, outputs):
            buffer, offset, size = self._target(int(index))
            dest = buffer[None] if reduced and not self.mode.per_class else buffer
            if not crop_nd(kernel, out, crop, size, dest, offset):
                self.raise_nonfinite(int(index))
            self._tile_done(int(index))

    def raise_nonfinite(self, index: int) -> None:
        """Stop with the position of tile `index`, whose network output has NaN or Inf."""
        raise ModelOutputError(
            f"model output has NaN or Inf in tile {index} at {self.plan.position(index)}; check the model "
            "and the input's normalization (integers are scaled to [0, 1], floats pass through)"
        )

    def fill(self, tiles: Any, failed: bool = False) -> None:
        """Write background for tiles that are not computed (e.g. no tissue).

        Labels get 0; probabilities 255 for class 0 and 0 for the others;
        logits 0 for every class. Needs `num_classes` (given, or seen in an
        earlier output) for the probability and logit modes. ``failed=True``
        records the tiles as unreadable in the output's metadata.
        """
        if self._closed:
            raise UsageError("stitcher is closed; create a new one to add more tiles")
        if self._sink is None:
            if self.mode.per_class:
                raise UsageError("fill() before any output needs Stitcher(..., num_classes=K)")
            self._open(None)
        for index in np.asarray(getattr(tiles, "indices", tiles), dtype=np.int64).reshape(-1):
            if failed:
                entry = {"tile": int(index), "origin": [int(v) for v in self.plan.origins[index]]}
                self.failed_tiles.append(entry)
                self._failed_in.setdefault(int(self._block_of[index]), []).append(entry)
            buffer, offset, size = self._target(int(index))
            self.mode.fill(buffer[(..., *(slice(o, o + n) for o, n in zip(offset, size)))])
            self._tile_done(int(index))

    def mark_written(self, blocks: Any) -> None:
        """Count `blocks` as complete: written by an earlier run or by another process."""
        blocks = np.asarray(blocks, dtype=np.int64)
        self._seen |= self.plan.tiles_in(blocks)
        self._missing[blocks] = 0

    def _target(self, index: int) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
        """Buffer, offset in it and clipped size of tile `index`; marks the tile seen."""
        if not 0 <= index < self.plan.n_tiles:
            raise UsageError(f"tile index {index} is not in [0, {self.plan.n_tiles})")
        if self._seen[index]:
            raise UsageError(f"tile {index} was added twice; each tile goes in once")
        self._seen[index] = True
        block = int(self._block_of[index])
        if block not in self._buffers:
            stored = self._sink.buffer(self._region(block))
            self._buffers[block] = (stored, stored.transpose(np.argsort(self._order)))
        buffer = self._buffers[block][1]
        origin, start = self.plan.origins[index], self.plan.block_origins[block]
        size = tuple(int(min(t, n - o)) for t, n, o in zip(self.plan.tile_size, self.plan.shape, origin))
        return buffer, tuple(int(o - s) for o, s in zip(origin, start)), size

    def _tile_done(self, index: int) -> None:
        block = int(self._block_of[index])
        self._missing[block] -= 1
        if self._missing[block] == 0:
            failed = self._failed_in.pop(block, None)
            self._sink.commit(self._region(block), self._buffers.pop(block)[0], block, failed)

    def _region(self, block: int) -> tuple[slice, ...]:
        """Where `block` goes in the output: one slice per output axis."""
        b = self.plan.block(block)
        return self._stored((slice(None),) * self.mode.per_class
                            + tuple(slice(a, z) for a, z in zip(b.start, b.stop)))

    def _check(self, indices: np.ndarray, outputs: np.ndarray, reduced: bool) -> None:
        ndim = len(self.plan.shape)
        if outputs.ndim != 2 + ndim or outputs.shape[0] != len(indices):
            names = ", ".join(self.plan.axes)
            raise UsageError(
                f"outputs of shape {outputs.shape} do not match {len(indices)} tiles; "
                f"expected (N, classes, {names})"
            )
        if reduced:
            mode = self.mode
            if outputs.dtype != mode.dtype or (not mode.per_class and outputs.shape[1] != 1):
                raise UsageError(
                    f"reduced outputs for mode {mode.name!r} must be {mode.dtype}"
                    f"{'' if mode.per_class else ' with one channel'}; got {outputs.dtype}, "
                    f"shape {outputs.shape}"
                )
            if outputs.shape[2:] != self.plan.tile_size:
                raise UsageError(
                    f"outputs cropped to {outputs.shape[2:]} do not match tile_size "
                    f"{self.plan.tile_size}; is the geometry right for this model?"
                )
            return
        need = tuple(c + t for c, t in zip(self.plan.geometry.crop, self.plan.tile_size))
        if any(n < m for n, m in zip(outputs.shape[2:], need)):
            raise UsageError(
                f"network output {outputs.shape[2:]} is smaller than crop + tile_size {need}; "
                "is the geometry right for this model?"
            )
        if self._num_classes is not None and outputs.shape[1] != self._num_classes:
            raise UsageError(f"outputs have {outputs.shape[1]} classes, expected {self._num_classes}")
        self.mode.check_classes(outputs.shape[1])

    # -- finishing -------------------------------------------------------------------

    @property
    def sink(self) -> Optional[Sink]:
        """Where blocks go (None until the number of classes is known)."""
        return self._sink

    @property
    def tiles_done(self) -> int:
        """Tiles added so far."""
        return int(self._seen.sum())

    def close(self) -> Any:
        """Write what remains, finish the output and return it (numpy or zarr array).

        Raises
        ------
        TileSegmentError
            If some tiles were never added (the output would have holes).
        """
        if self._closed:
            return self.result
        self._closed = True
        if self._sink is None:
            raise TileSegmentError("no tile was added; nothing to write")
        missing = self.plan.n_tiles - self.tiles_done
        if missing:
            self._sink.abort()
            raise TileSegmentError(
                f"{missing} of {self.plan.n_tiles} tiles were never added "
                f"(first: {int(np.flatnonzero(~self._seen)[0])}); the output is incomplete"
            )
        if self.failed_tiles and hasattr(self._sink, "failed_tiles"):
            self._sink.failed_tiles = self.failed_tiles
        self.result = self._sink.close()
        return self.result

    def __enter__(self) -> "Stitcher":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            if self._sink is not None:
                self._sink.abort()


def _as_numpy(outputs: Any) -> np.ndarray:
    if hasattr(outputs, "detach"):  # torch.Tensor on any device
        outputs = outputs.detach()
        if not outputs.dtype.is_floating_point or outputs.dtype.itemsize >= 4:
            return outputs.cpu().numpy()
        outputs = outputs.float().cpu().numpy()  # numpy has no bfloat16
    return np.asarray(outputs)
