"""The contracts every stage is written against: what an implementation must do, in one place.

tilesegment's pipeline is ``Source -> Tiler -> Model (in an Executor) ->
Stitcher -> Sink``, and after it ``ChunkStep``\\ s over the written map. Each
arrow is one of the protocols below; the engine never asks an implementation
for anything its protocol does not list. To extend tilesegment, implement one
protocol in one module and register it (`tilesegment.registry`), from this
package or another one through an entry point. docs/architecture.md walks
through each case with its test.

The protocols are `typing.Protocol`\\ s: an implementation need not inherit
from them (ours mostly do not), and ``isinstance(x, Source)`` checks the
names, not the behaviour. The behaviour is in the docstrings, and the tests
of each implementation check it.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Source", "Reader", "Model", "ModelLoader", "Mode", "Sink", "Reporter", "ChunkStep", "Region"]

#: A box of an array: one slice per axis.
Region = tuple[slice, ...]


@runtime_checkable
class Source(Protocol):
    """An image or volume, read region by region without loading it.

    Requirements:

    - **Axes.** `plan_axes` are those of ``T``, ``Z``, ``Y``, ``X`` the image
      has (``"YX"``, ``"ZYX"``...), in that order whatever the file's order.
      Every read returns ``(*plan_axes, C)``: channels last, `channels` of
      them, in `dtype`.
    - **Reads are exact and thread-safe.** `read_region` and `read_chunk` may
      be called from several reader threads at once and return the file's
      pixels, never resampled unless the source says so (`levels`).
    - **Native grid.** `chunk_shape` is the unit the file is stored and
      decoded in (TIFF tile, zarr chunk), or None for data in memory. The
      tiler decodes each such chunk once and gathers tiles from it, so a
      reader that has a grid must expose it and `read_chunk` must decode one
      unit, clipped to the image. Regions a format leaves out (sparse tiles)
      come back as the fill value.
    - **Reopenable.** `close` releases files; `reopen` returns an equivalent
      open source (same pixels, same options), so a `Job` can run twice and
      a dask worker can open its own copy.
    """

    name: str
    format: str
    axes: str
    pixel_size: Optional[tuple[float, ...]]
    levels: tuple

    @property
    def plan_axes(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    @property
    def channels(self) -> int: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def chunk_shape(self) -> Optional[tuple[int, ...]]: ...

    def read_region(self, start: Sequence[int], stop: Sequence[int], step: int = 1) -> np.ndarray: ...

    def read_chunk(self, *index: int) -> np.ndarray: ...

    def overview(self, max_edge: int = 2048) -> np.ndarray:
        """A small ``(y, x, C)`` picture of the whole (2-D) image, from the cheapest stored one
        (a pyramid level or thumbnail); used for tissue detection."""

    def reopen(self) -> "Source": ...

    def close(self) -> None: ...


@runtime_checkable
class Reader(Protocol):
    """A file format: decides from the target whether it is one of its files, and opens it.

    Requirements:

    - `can_open` is cheap (a suffix, a magic number, a directory entry) and
      never raises: False means "not mine", and the next reader is asked.
    - `open` returns a `tilesegment.io.sources.ImageSource` (over any
      array-like, with a `tilesegment.io.sources.Backend` for levels, a chunk
      decoder, thumbnails and files to close: `open_image` applies channels,
      axes and resampling to it), or raises `tilesegment.InputError` with one
      line that says what was wrong and what to do (a missing optional
      dependency names the extra to install).
    - `priority`: readers are asked lowest first; specific formats use 10-40,
      catch-alls (arrays) 100.
    - `formats`: what it reads, in words ("TIFF, SVS, OME-TIFF"), for the
      message that lists what is supported when no reader takes a file.
    """

    name: str
    priority: int
    formats: str

    def can_open(self, target: Any) -> bool: ...

    def open(self, target: Any, *, axes: Optional[str], level: int, series: int,
             storage_options: Optional[dict], ndim: int) -> Any: ...


@runtime_checkable
class Model(Protocol):
    """A network the executor can run on tiles: a `torch.nn.Module` with these facts.

    `tilesegment.models.describe` gives every module these attributes (our
    UNet, TorchScript, ONNX, bioimage.io, a user's module); a backend that
    has them natively is used as is. Requirements:

    - **Valid convolutions, fixed geometry.** ``forward((N, C, *in)) ->
      (N, K, *out)`` with ``out = in - 2 * halo`` per axis, for every input
      ``geometry.input_size(tile)``. `geometry` says halo and step.
    - **Meta tensors.** ``forward`` of a tensor on the ``meta`` device
      returns a meta tensor of the right shape without computing: the
      engine plans memory and counts operations that way. Backends that are
      not torch code (ONNX) answer from their geometry.
    - `normalization`: how integer images map to floats (None: divide by
      the dtype's range). `in_channels` / `num_classes`: C and K, or None
      when the model cannot say. `metadata`: JSON-like facts (``classes``:
      class names).
    - `replicate(device)`: an independent copy on `device` (one per GPU
      executor); the caller's model is never moved.
    - `identity()`: a short hash of the weights, stable across processes,
      that resume compares.
    - Optional: ``activation_bytes(input_size)``, the bytes of one tile's
      activations when the model knows them better than a trace; and
      ``torch_memory = False`` for a runtime with its own device allocator
      (onnxruntime), whose peak torch cannot measure.
    """

    geometry: Any
    normalization: Optional[dict]
    in_channels: Optional[int]
    num_classes: Optional[int]
    metadata: dict

    def __call__(self, x: Any) -> Any: ...

    def replicate(self, device: Any) -> Any: ...

    def identity(self) -> str: ...


@runtime_checkable
class ModelLoader(Protocol):
    """A way to name a model (a file type, a URL scheme, a zoo): `load_model` asks each in turn.

    `can_load(spec)` is cheap and never raises; `load(spec)` returns an
    ``nn.Module`` in eval mode or raises `tilesegment.ModelError` in one line.
    """

    name: str
    priority: int

    def can_load(self, spec: Any) -> bool: ...

    def load(self, spec: Any) -> Any: ...


@runtime_checkable
class Mode(Protocol):
    """What is written per pixel (`tilesegment.modes`): labels, probabilities, logits...

    Requirements: `dtype` and `shape` of the output; `kernel`, the numba
    crop-and-reduce on the host, and `reduce`, its torch twin on a device,
    which must agree exactly; `fill`, the background of skipped tiles;
    `label_count` (not None for label images: nearest pyramid, NGFF
    image-label); `compression`, the expected compressed share (disk checks).
    """

    name: str
    dtype: np.dtype
    per_class: bool
    compression: float

    @property
    def kernel(self) -> Any: ...

    def reduce(self, logits: Any) -> Any: ...

    def fill(self, window: np.ndarray) -> None: ...

    def shape(self, spatial: tuple[int, ...], num_classes: int) -> tuple[int, ...]: ...

    def label_count(self, num_classes: int) -> Optional[int]: ...


@runtime_checkable
class Sink(Protocol):
    """Where the stitcher writes: numpy, a local or remote OME-Zarr, a worker's share of one.

    Requirements: `buffer(region)` gives an array to crop the tiles of one
    output block into; `commit` stores a whole block (each chunk written
    once) and, for resumable sinks, records it done only after its chunks
    are stored; `close` finishes and returns the result; `abort` leaves
    nothing that looks finished.
    """

    def buffer(self, region: Region) -> np.ndarray: ...

    def commit(self, region: Region, buffer: np.ndarray, block: Optional[int] = None,
               failed: Optional[list] = None) -> None: ...

    def close(self) -> Any: ...

    def abort(self) -> None: ...


@runtime_checkable
class Reporter(Protocol):
    """Progress of a long run, and whether to go on.

    ``start(total, what)`` is called once, before any work; ``advance(n)``
    after every `n` units done (tiles, or chunks for objects), from the
    calling thread; ``cancelled()`` between batches, where True stops the
    run (within one batch) with `Cancelled`; ``close()`` once at the end,
    whatever happened. tqdm's bar (`tilesegment.report.TqdmReporter`) is one
    implementation; a GUI's progress bar with a cancel button is another.
    """

    def start(self, total: int, what: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def cancelled(self) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class ChunkStep(Protocol):
    """Post-processing over a label (or class) map, run chunk by chunk with an overlap.

    Requirements:

    - `halo`: pixels of context each side that the result of one pixel may
      depend on. The runner reads each chunk with that much of its
      neighbours (less at the map's edge) and keeps only the chunk's own
      part of the answer, so the result is the same for every chunking:
      exactly the whole-map result, when `apply` depends on nothing farther.
    - ``apply(block, core)``: `block` is the chunk with its halo, `core`
      the slices of the chunk inside it; return the result for ``block[core]``
      (same shape), in `dtype`. Pure: no state between calls, safe in threads
      and on dask workers (it must pickle).
    """

    name: str
    halo: int
    dtype: np.dtype

    def apply(self, block: np.ndarray, core: Region) -> np.ndarray: ...
