"""Our image readers, one module per format family; importing this registers them.

`tilesegment.registry.readers` imports this package on its first lookup.
Each module holds one `tilesegment.contracts.Reader` and registers it:

- `openslide`: MRXS, VMS/VMU, BIF, SVSLIDE through OpenSlide, the extra
  ``tilesegment[openslide]`` (8: before tifffile, which would misread a BIF);
- `tiff`: the TIFF family through tifffile (priority 10);
- `dicom`: DICOM WSI through wsidicom, the extra ``tilesegment[dicom]`` (15);
- `zarr`: zarr arrays and OME-Zarr images (20);
- `czi`: Zeiss CZI through pylibCZIrw, the extra ``tilesegment[czi]`` (25);
- `plain`: PNG, JPEG, BMP, WebP and GIF through Pillow, read whole (30);
- `array`: arrays in memory, the catch-all (100).

A reader in another package registers through an entry point in the
``tilesegment.readers`` group instead (see docs/io.md, "Readers").
"""

from . import array, czi, dicom, openslide, plain, tiff, zarr

__all__ = ["array", "czi", "dicom", "openslide", "plain", "tiff", "zarr"]
