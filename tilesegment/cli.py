"""The ``tilesegment`` command: one verb per job."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .errors import TileSegmentError

__all__ = ["main"]


def _size(text: str):
    if text == "auto":
        return text
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use N or H,W") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return tuple(parts)
    raise argparse.ArgumentTypeError(f"{text!r} has {len(parts)} numbers; use N or H,W")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilesegment",
        description="Exact overlap-tile segmentation of gigapixel images into OME-Zarr.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    seg = verbs.add_parser("segment", help="segment an image into an OME-Zarr", description=(
        "Segment INPUT tile by tile and write OUTPUT as OME-Zarr. The result equals "
        "whole-image inference for every valid tile size."))
    seg.add_argument("input", help="TIFF/SVS/OME-TIFF/NDPI file or zarr store")
    seg.add_argument("output", help="output OME-Zarr path (e.g. result.zarr)")
    seg.add_argument("--model", "-m", required=True,
                     help="checkpoint (.pt, from ts.save_model), TorchScript file, or package.module:factory")
    seg.add_argument("--tile-size", type=_size, default="auto", metavar="N",
                     help="written tile edge, a multiple of the network step (default: auto)")
    seg.add_argument("--batch-size", type=int, default=None, metavar="N", help="tiles per forward pass (default: auto)")
    seg.add_argument("--device", default="auto",
                     help="auto, cpu, cuda (all GPUs), cuda:N, or a list cuda:0,cuda:1 (default: auto)")
    seg.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="autocast precision; auto: bf16 on GPUs that support it, fp32 on CPU")
    seg.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    seg.add_argument("--mode", choices=("labels", "probabilities", "logits"), default="labels",
                     help="labels: uint8 argmax; probabilities: uint8 softmax*255; logits: float32")
    seg.add_argument("--level", type=int, default=0, help="pyramid level to segment (default: 0)")
    seg.add_argument("--axes", default=None, help="override the input's axes, e.g. YXS or CYX")
    seg.add_argument("--padding", default="reflect", choices=("reflect", "symmetric", "edge", "constant"),
                     help="pixels outside the image (default: reflect)")
    seg.add_argument("--chunk-size", type=_size, default=None, metavar="N",
                     help="output chunk edge; divides the tile size or is a multiple of it")
    seg.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    seg.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    seg.set_defaults(run=_segment)

    info = verbs.add_parser("info", help="describe an image (and a model's geometry)")
    info.add_argument("input", help="image file or zarr store")
    info.add_argument("--model", "-m", default=None, help="also show this model's geometry")
    info.set_defaults(run=_info)
    return parser


def _segment(args: argparse.Namespace) -> int:
    from .api import prepare

    device = args.device.split(",") if "," in args.device else args.device
    job = prepare(args.input, args.model, args.output, tile_size=args.tile_size,
                  batch_size=args.batch_size, device=device, mode=args.mode,
                  padding=args.padding, level=args.level, axes=args.axes,
                  chunk_size=args.chunk_size, overwrite=args.overwrite,
                  precision=args.precision, compile=args.compile)
    plan, source, geometry = job.plan, job.tiler.source, job.plan.geometry
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    say(f"input    {args.input}: {source.shape[0]} x {source.shape[1]} px, "
        f"{source.channels} channel(s), {source.dtype}")
    say(f"network  halo {geometry.halo[0]}, step {geometry.step[0]}; tile {plan.tile_size[0]}x"
        f"{plan.tile_size[1]} -> network input {plan.input_size[0]}x{plan.input_size[1]} "
        f"({plan.computed_fraction():.2f} computed px per written px)")
    devices = ", ".join(str(d) for d in job.devices)
    say(f"plan     {plan.n_tiles} tiles in {plan.n_blocks} blocks, batch {job.batch_size} on {devices}")
    _, run = job.run(progress=not args.quiet)
    say(f"done     {run.tiles} tiles in {run.seconds:.1f} s: "
        f"{run.megapixels_per_second:.2f} Mpx/s -> {args.output}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import tilesegment as ts

    source = ts.open_image(args.input)
    print(f"image      {args.input}")
    print(f"shape      {source.shape[0]} x {source.shape[1]} px (Y x X), axes {source.axes}, "
          f"{source.channels} channel(s), {source.dtype}")
    if source.pixel_size is not None:
        print(f"pixel size {source.pixel_size[0]:.4g} x {source.pixel_size[1]:.4g} um")
    if args.model:
        geometry = ts.Geometry.of(ts.load_model(args.model))
        step = geometry.step[0]
        tiles = [t for t in (256, 512, 1024, 2048) if t % step == 0] or [step * 32]
        print(f"network    halo {geometry.halo[0]}, step {step}, smallest input {geometry.min_input[0]}")
        print("tiles      " + ", ".join(f"{t} (input {geometry.input_size(t)[0]})" for t in tiles))
    source.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the exit status (0 ok, 1 runtime error, 2 usage error)."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except TileSegmentError as exc:
        if args.debug:
            raise
        print(f"tilesegment: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tilesegment: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure still gets one line
        if args.debug:
            raise
        print(f"tilesegment: error: {type(exc).__name__}: {exc} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
