"""Our image readers, one module per format family; importing this registers them.

`tilesegment.registry.readers` imports this package on its first lookup.
Each module holds one `tilesegment.contracts.Reader` and registers it:

- `tiff`: the TIFF family through tifffile (priority 10);
- `zarr`: zarr arrays and OME-Zarr images (20);
- `array`: arrays in memory, the catch-all (100).

A reader in another package registers through an entry point in the
``tilesegment.readers`` group instead (see docs/io.md, "Readers").
"""

from . import array, tiff, zarr

__all__ = ["array", "tiff", "zarr"]
