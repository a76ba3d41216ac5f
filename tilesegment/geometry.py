"""Size arithmetic of a network: halo, step, valid input sizes.

Nothing here knows about files or devices. A `Geometry` is a frozen value
that the plan, the loader and the stitcher share.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence, Union

from .errors import InvalidTileSize, ModelError

__all__ = ["Geometry", "Shape", "ShapeLike", "as_shape", "axis_names", "compact"]

#: Sizes over the spatial axes: ``(y, x)`` for images, ``(z, y, x)`` for volumes.
Shape = tuple[int, ...]
#: One int for every axis, or one per axis.
ShapeLike = Union[int, Sequence[int]]


def axis_names(ndim: int) -> str:
    """Letters of `ndim` axes, slowest first: ``"yx"``, ``"zyx"`` or ``"tzyx"``."""
    if not 1 <= ndim <= 4:
        raise ModelError(f"{ndim} spatial axes are not supported; images and volumes have 2 to 4 (t, z, y, x)")
    return "tzyx"[-ndim:]


def compact(values: Sequence[int]) -> str:
    """Per-axis sizes for messages: ``512`` when every axis agrees, else ``(16, 128, 128)``."""
    return str(values[0]) if len(set(values)) == 1 else str(tuple(values))


def as_shape(value: ShapeLike, ndim: int, name: str = "value") -> Shape:
    """Return one int per spatial axis from an int (every axis) or `ndim` ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),) * ndim
    try:
        values = tuple(int(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        values = ()
    if len(values) != ndim:
        example = ", ".join(["512"] * (ndim - 1) + ["256"])
        raise InvalidTileSize(
            f"{name} {value!r} is not an int or {ndim} ints ({', '.join(axis_names(ndim))}); "
            f"pass e.g. 512 or ({example})"
        )
    return values



@dataclass(frozen=True)
class Geometry:
    """Size arithmetic of a segmentation network, per spatial axis: ``(y, x)``, or
    ``(z, y, x)`` for a volume network.

    The number of axes comes from the longest of `halo`, `step`, `min_input`
    and `shrink` given as sequences (an int applies to every axis; all ints
    mean 2-D), or from `ndim`.

    Parameters
    ----------
    halo : int or (int, ...)
        Context the network needs on each side of an output pixel, in input
        pixels. For a valid-convolution network this is what it loses per side.
    step : int or (int, ...)
        Valid input sizes and tile origins are spaced by ``step`` (``2**depth``
        for a U-Net): tile origins on multiples of it keep the pooling grid in
        phase with whole-image inference.
    min_input : int or (int, ...), optional
        Smallest valid network input. Valid inputs are ``min_input + k * step``.
        Defaults to the smallest multiple of ``step`` that is at least
        ``2 * halo + 1`` (right for "same"-padded networks).
    shrink : int or (int, ...), optional
        Network input size minus output size: ``2 * halo`` for valid
        convolutions, 0 (the default) for "same"-padded networks, whose border
        effect is then pushed outside the written area but not removed.
    ndim : int, optional
        Number of spatial axes, when every other parameter is an int.

    Examples
    --------
    >>> import tilesegment as ts
    >>> geom = ts.Geometry.of(ts.UNet(3, 2, base_channels=64, depth=4))
    >>> geom.halo, geom.step
    ((92, 92), (16, 16))
    >>> geom.output_size(572)
    (388, 388)
    >>> geom.input_size(512)
    (700, 700)
    >>> ts.Geometry(halo=(4, 20, 20), step=(2, 8, 8)).input_size(64)
    (72, 104, 104)
    """

    halo: Shape
    step: Shape
    min_input: Shape = None  # type: ignore[assignment]
    shrink: Shape = None  # type: ignore[assignment]
    ndim: int = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        given = [v for v in (self.halo, self.step, self.min_input, self.shrink) if v is not None]
        lengths = {len(v) for v in given if not isinstance(v, int)}
        if len(lengths) > 1 or (self.ndim is not None and lengths and lengths != {self.ndim}):
            raise ModelError(
                f"geometry axes disagree: halo={self.halo}, step={self.step}, "
                f"min_input={self.min_input}, shrink={self.shrink}, ndim={self.ndim}; give one "
                "value per spatial axis everywhere"
            )
        ndim = self.ndim or (lengths.pop() if lengths else 2)
        halo = as_shape(self.halo, ndim, "halo")
        step = as_shape(self.step, ndim, "step")
        shrink = as_shape(0 if self.shrink is None else self.shrink, ndim, "shrink")
        if min(halo) < 0 or min(step) < 1 or min(shrink) < 0:
            raise ModelError(
                f"geometry needs halo >= 0, step >= 1, shrink >= 0; got halo={halo}, "
                f"step={step}, shrink={shrink}"
            )
        if any(s > 2 * h for s, h in zip(shrink, halo)):
            raise ModelError(
                f"shrink {shrink} exceeds 2 * halo {halo}: the network loses more context "
                "than declared; declare a halo of at least shrink / 2"
            )
        if self.min_input is None:
            min_input = tuple(
                max(st, math.ceil((2 * h + 1) / st) * st) for h, st in zip(halo, step)
            )
        else:
            min_input = as_shape(self.min_input, ndim, "min_input")
        if any(m - s < 1 for m, s in zip(min_input, shrink)):
            raise ModelError(f"min_input {min_input} leaves no output after shrink {shrink}")
        object.__setattr__(self, "halo", halo)
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "shrink", shrink)
        object.__setattr__(self, "min_input", min_input)
        object.__setattr__(self, "ndim", ndim)

    # -- construction ---------------------------------------------------------------

    @classmethod
    def of(cls, model: object, in_channels: int | None = None) -> "Geometry":
        """Return the geometry of `model`.

        Declared by the model (`tilesegment.models.describe`): analytic for the
        built-in `UNet`, read from the file for ONNX and bioimage.io models, a
        ``geometry`` attribute a module sets; any other ``torch.nn.Module`` is
        probed by shape inference on the ``meta`` device, which computes
        nothing and allocates nothing.

        Parameters
        ----------
        model : torch.nn.Module or Geometry
            The network.
        in_channels : int, optional
            Input channels for the probe; found from the first convolution when
            omitted.

        Raises
        ------
        ModelError
            If `model` is not a module, or its output size does not grow one
            for one with its input, so that no halo/step describes it.
        """
        if isinstance(model, Geometry):
            return model
        from .models.base import describe

        return describe(model, in_channels).geometry

    @property
    def stack_axes(self) -> int:
        """Leading axes along which the network sees one plane at a time (halo 0, step 1,
        no shrink): those `stacked` added, at most all but the last two."""
        n = 0
        while (n < self.ndim - 2 and self.halo[n] == 0 and self.step[n] == 1
               and self.min_input[n] == 1 and self.shrink[n] == 0):
            n += 1
        return n

    def stacked(self, n: int) -> "Geometry":
        """This geometry with `n` leading stack axes: a 2-d network run plane by plane
        over Z or T sees no context across planes (halo 0) and takes any
        number of them (step 1).

        Examples
        --------
        >>> Geometry(halo=4, step=8).stacked(1).halo
        (0, 4, 4)
        """
        if n == 0:
            return self
        return Geometry(halo=(0,) * n + self.halo, step=(1,) * n + self.step,
                        min_input=(1,) * n + self.min_input, shrink=(0,) * n + self.shrink)

    # -- arithmetic -----------------------------------------------------------------

    @property
    def crop(self) -> Shape:
        """Index in the network output of the tile's first pixel (0 for valid nets)."""
        return tuple(h - s // 2 for h, s in zip(self.halo, self.shrink))  # type: ignore[return-value]

    def is_valid_input(self, n_in: ShapeLike) -> bool:
        """Whether the network accepts an input of size `n_in` exactly."""
        return all(
            n >= m and (n - m) % st == 0
            for n, m, st in zip(as_shape(n_in, self.ndim), self.min_input, self.step)
        )

    def output_size(self, n_in: ShapeLike) -> Shape:
        """Network output size for a valid input size `n_in`.

        Raises
        ------
        InvalidTileSize
            If `n_in` is not a valid input size; the message names the nearest ones.
        """
        n_in = as_shape(n_in, self.ndim, "input size")
        for axis, (n, m, st) in enumerate(zip(n_in, self.min_input, self.step)):
            if n < m or (n - m) % st:
                below = m + max(0, (n - m) // st) * st
                options = sorted({v for v in (below, below + st) if v >= m})
                raise InvalidTileSize(
                    f"network input size {n} is not valid on axis {axis_names(self.ndim)[axis]} "
                    f"(valid: {m} + k * {st}); nearest valid: "
                    + " or ".join(str(v) for v in options)
                )
        return tuple(n - s for n, s in zip(n_in, self.shrink))  # type: ignore[return-value]

    def input_size(self, n_out: ShapeLike) -> Shape:
        """Smallest valid network input whose output covers a tile of `n_out` pixels.

        The input spans the tile plus `halo` on both sides, rounded up to a
        valid size; the tile keeps the first `n_out` output pixels.
        """
        n_out = as_shape(n_out, self.ndim, "tile size")
        if min(n_out) < 1:
            raise InvalidTileSize(f"tile size {n_out} must be at least 1 pixel")
        sizes = []
        for n, h, m, st in zip(n_out, self.halo, self.min_input, self.step):
            need = n + 2 * h
            sizes.append(m + max(0, math.ceil((need - m) / st)) * st)
        return tuple(sizes)  # type: ignore[return-value]

    def valid_input_sizes(self, stop: int = 2048) -> tuple[range, ...]:
        """Valid network input sizes below `stop`, per axis."""
        return tuple(range(m, stop, st) for m, st in zip(self.min_input, self.step))  # type: ignore[return-value]

    def check_tile_size(self, tile_size: ShapeLike) -> Shape:
        """Return `tile_size` per axis if every edge is a positive multiple of the step.

        Raises
        ------
        InvalidTileSize
            Naming the nearest valid tile sizes, e.g. ``tile_size 100 is not a
            multiple of the network step 16; nearest valid: 96 or 112``.
        """
        pair = as_shape(tile_size, self.ndim, "tile_size")
        for axis, t, st in zip(axis_names(self.ndim), pair, self.step):
            where = f" along {axis}" if self.ndim > 2 else ""
            if t <= 0:
                raise InvalidTileSize(
                    f"tile_size {t}{where} must be positive; use a multiple of the network step {st}, "
                    f"e.g. {st * max(1, 512 // st)}"
                )
            if t % st:
                low, high = (t // st) * st, (t // st + 1) * st
                options = " or ".join(str(v) for v in (low, high) if v > 0)
                raise InvalidTileSize(
                    f"tile_size {t}{where} is not a multiple of the network step {st}; "
                    f"nearest valid: {options}"
                )
        return pair
