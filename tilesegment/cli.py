"""The ``tilesegment`` command: one verb per job."""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import OutputBusyError, TileSegmentError, UsageError
from .geometry import compact
from .modes import mode_names
from .options import COMPILE_MODES

__all__ = ["main"]


def _size(text: str):
    if text == "auto":
        return text
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use N, H,W or D,H,W") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) <= 4:
        return tuple(parts)
    raise argparse.ArgumentTypeError(f"{text!r} has {len(parts)} numbers; use N, H,W or D,H,W")


def _by_axis(sizes, axes: str, sep: str = " x ") -> str:
    """``2967 x 2220`` for images (joined by `sep`); ``z 64 x y 512 x x 512`` where a third
    axis joins."""
    if len(sizes) == 2:
        return sep.join(map(str, sizes))
    return " x ".join(f"{a} {n}" for a, n in zip(axes, sizes))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilesegment",
        description="Overlap-tile segmentation of gigapixel images into OME-Zarr, exact in fp32.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    seg = verbs.add_parser("segment", help="segment an image into an OME-Zarr", description=(
        "Segment INPUT tile by tile and write OUTPUT as OME-Zarr. In fp32 (the default on CPU; "
        "--precision fp32 on GPUs) the result equals whole-image inference for every valid tile "
        "size; bf16, the GPU default, changes labels where the top two classes nearly tie."))
    seg.add_argument("paths", nargs="+", metavar="INPUT ... OUTPUT",
                     help="image(s) (TIFF/SVS/OME-TIFF/NDPI/zarr; a quoted glob such as 'slides/*.svs' "
                          "works) and the output: an OME-Zarr path for one image, a folder for several "
                          "(one <name>.zarr each; finished ones are skipped)")
    seg.add_argument("--model", "-m", default=None,
                     help="'demo' (bundled H&E model: background, tissue, nuclei; the default), a "
                          "checkpoint (.pt, from ts.save_model), a TorchScript file, an ONNX file (.onnx), "
                          "a bioimage.io package (rdf.yaml or .zip), or package.module:factory")
    seg.add_argument("--tile-size", type=_size, default="auto", metavar="N",
                     help="written tile edge, a multiple of the network step; one per axis for "
                          "volumes, e.g. 32,256,256 (default: auto)")
    seg.add_argument("--batch-size", type=int, default=None, metavar="N", help="tiles per forward pass (default: auto)")
    seg.add_argument("--device", default="auto",
                     help="auto, cpu, cuda (all GPUs), cuda:N, or a list cuda:0,cuda:1 (default: auto)")
    seg.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="autocast precision; auto: bf16 on GPUs that support it (not exact), fp32 on "
                          "CPU; fp32 is exact everywhere")
    seg.add_argument("--compile", nargs="?", const=True, default=False, choices=[True, *COMPILE_MODES],
                     metavar="MODE", help="run the model through torch.compile; MODE reduce-overhead "
                     "replays CUDA graphs (one launch per batch)")
    seg.add_argument("--mode", choices=mode_names(), default="labels",
                     help="labels: uint8 argmax; probabilities: uint8 softmax*255; logits: float32")
    seg.add_argument("--level", type=int, default=0, help="pyramid level to segment (default: 0)")
    seg.add_argument("--mpp", type=float, default=None,
                     help="segment at this pixel size in um/px (best level + area resampling)")
    seg.add_argument("--series", type=int, default=0, help="series of a multi-series TIFF (default: 0)")
    seg.add_argument("--channels", default=None, metavar="I,J,K",
                     help="image channels to feed the model, in its order, e.g. 2,0,1")
    seg.add_argument("--tissue-mask", default=None, metavar="auto|PATH",
                     help="compute only tiles with tissue: 'auto' (Otsu on saturation) or a mask image")
    seg.add_argument("--axes", default=None,
                     help="override the input's axes, e.g. YXS, CYX, or ZYX for a Z stack held as a 3-d array")
    seg.add_argument("--padding", default="reflect", choices=("reflect", "symmetric", "edge", "constant"),
                     help="pixels outside the image (default: reflect)")
    seg.add_argument("--chunk-size", type=_size, default=None, metavar="N",
                     help="output chunk edge; divides the tile size or is a multiple of it")
    seg.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                     help="fsspec options for s3:// gs:// https:// inputs and outputs, e.g. "
                          "'{\"anon\": true}' (default: the AWS/fsspec environment)")
    seg.add_argument("--ngff", choices=("0.5", "0.4"), default="0.5",
                     help="OME-Zarr version of OUTPUT: 0.5 (zarr v3, default) or 0.4 (zarr v2, for "
                          "QuPath and older napari-ome-zarr)")
    seg.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    seg.add_argument("--resume", action="store_true",
                     help="continue an OUTPUT that a stopped run left (same settings required)")
    seg.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                     help="a tile that cannot be read: stop (default), or fill it and record it")
    seg.add_argument("--scheduler", default=None, metavar="ADDRESS|local:N",
                     help="run blocks on a dask.distributed cluster: a scheduler address, or local:N "
                          "for N local worker processes, one GPU each on a GPU host (paths must be "
                          "shared with the workers; each worker uses its own device)")
    seg.add_argument("--objects", action="store_true",
                     help="also find whole objects (the model's instance recipe, else every class but 0): "
                          "labels/objects in OUTPUT, and OUTPUT's name + .objects.csv and .geojson.gz "
                          "beside it (see `objects`)")
    recipe = seg.add_argument_group("instance recipe", "how objects are made (for models that do not name "
                                                       "it, e.g. ONNX or bioimage.io); recorded in OUTPUT")
    _recipe_arguments(recipe)
    seg.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    seg.set_defaults(run=_segment)

    obj = verbs.add_parser("objects", help="whole objects of a segmented image: instance labels, table, GeoJSON",
                           description="Find the connected components of each class of a segment output "
                                       "across its chunks (equal to whole-image connected components), "
                                       "write them as the NGFF label image INPUT/labels/objects, and "
                                       "optionally a table (CSV/Parquet) and a QuPath GeoJSON.")
    obj.add_argument("input", metavar="INPUT.zarr", help="OME-Zarr written by tilesegment segment")
    _recipe_arguments(obj, default="the recipe INPUT recorded, else every class but 0")
    obj.add_argument("--connectivity", type=int, default=1, metavar="N",
                     help="1: face neighbours (default); 2 (3 in 3-D): diagonal neighbours too")
    obj.add_argument("--output", "-o", default=None, metavar="OBJECTS.zarr",
                     help="write the instance labels here (default: labels/objects inside INPUT, "
                          "which must be a tilesegment segment output)")
    obj.add_argument("--table", default=None, metavar="PATH", help="write the table: .csv, .csv.gz or .parquet")
    obj.add_argument("--geojson", default=None, metavar="PATH",
                     help="write outlines for QuPath: .geojson, or .geojson.gz (gzipped)")
    obj.add_argument("--overwrite", action="store_true", help="replace earlier objects, table or GeoJSON")
    obj.add_argument("--scheduler", default=None, metavar="ADDRESS|local:N",
                     help="label chunks on a dask.distributed cluster (paths shared with the workers)")
    obj.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    obj.set_defaults(run=_objects)

    check = verbs.add_parser("verify", help="check a segment output: complete, every chunk readable, metadata",
                             description="Check an OME-Zarr that segment wrote, without changing it: the "
                                         "run finished, every chunk of every array and pyramid level is "
                                         "present and decodes, shapes and dtypes agree across levels, the "
                                         "OME metadata holds together, and labels/ matches the image. One "
                                         "line per problem; exit 0 when there is none, 1 otherwise.")
    check.add_argument("output", metavar="OUTPUT.zarr", help="the output folder (local)")
    check.add_argument("--quiet", "-q", action="store_true", help="print problems only, not the summary")
    check.set_defaults(run=_verify)

    demo = verbs.add_parser("demo", help="segment a generated H&E slide with the bundled model",
                            description="Generate a synthetic H&E slide, segment it with the bundled "
                                        "demo model, find its objects, write OME-Zarr, a table, QuPath "
                                        "GeoJSON and an overview picture.")
    demo.add_argument("out_dir", nargs="?", default="tilesegment-demo", help="output folder (default: tilesegment-demo)")
    demo.add_argument("--size", type=int, default=3072, help="edge of the generated slide in px (default: 3072)")
    demo.add_argument("--image", default=None, help="segment this H&E slide instead of a generated one")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo output")
    demo.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    bench = verbs.add_parser("bench", help="measure throughput for tile sizes x batch sizes",
                             description="Sweep tile size x batch size end to end and model-only; "
                                         "write bench.csv, bench.json and bench.png; recommend a setting.")
    bench.add_argument("input", nargs="?", default=None, help="image to use (default: random RGB of --size)")
    bench.add_argument("--model", "-m", default="demo", help="model spec (default: demo)")
    bench.add_argument("--tile-sizes", default="auto",
                       help="comma-separated, or auto (128..2048; for a 3-d network y/x edges 32..256)")
    bench.add_argument("--batch-sizes", default="1,2", help="comma-separated (default: 1,2)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    bench.add_argument("--size", type=int, default=2048, help="edge of the random image (default: 2048)")
    bench.add_argument("--repeats", type=int, default=1, help="best of N runs per cell (default: 1)")
    bench.add_argument("--out", default="tilesegment-bench", help="output folder (default: tilesegment-bench)")
    bench.set_defaults(run=_bench)

    info = verbs.add_parser("info", help="describe an image (and a model's geometry)")
    info.add_argument("input", help="image file or zarr store")
    info.add_argument("--model", "-m", default=None, help="also show this model's geometry")
    info.add_argument("--axes", default=None, help="override the input's axes, e.g. ZYX")
    info.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                      help="fsspec options for a remote INPUT (s3://, gs://, https://)")
    info.set_defaults(run=_info)
    return parser


def _segment(args: argparse.Namespace) -> int:
    if args.model is None:
        args.model = "demo"
        if not args.quiet:
            print("note     no --model given: using the bundled demo model (H&E: background, "
                  "tissue, nuclei)", file=sys.stderr)
    if len(args.paths) < 2:
        raise UsageError("segment needs an INPUT and an OUTPUT, e.g. tilesegment segment slide.svs slide.zarr")
    *inputs, output = args.paths
    if args.objects and not args.resume and len(inputs) == 1 and not any(c in inputs[0] for c in "*?["):
        _check_objects_outputs(output, args.overwrite)  # resuming, they are this run's to redo
    with _client(args.scheduler) as client:
        if len(inputs) == 1 and not any(c in inputs[0] for c in "*?["):
            return _segment_one(args, inputs[0], output, client)
        if "://" in output:
            raise UsageError(f"several inputs are written into a local folder, not {output!r}; "
                             "segment remote outputs one input at a time")
        return _segment_many(args, _expand(inputs), Path(output), client)


def _expand(patterns: list[str]) -> list[str]:
    import glob

    found = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise UsageError(f"no file matches {pattern!r}; check the pattern")
        found.extend(matches)
    return found


_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".svs", ".ndpi", ".qptiff",
             ".scn", ".bif", ".zarr")


def _output_name(image: str) -> str:
    name = Path(image).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] + ".zarr"
    return name + ".zarr"


def _segment_many(args, inputs: list[str], folder: Path, client) -> int:
    """Batch mode: one OME-Zarr per input in `folder`.

    Outputs finished by a run with the same model and mode are skipped;
    unfinished ones (a manifest is present) are resumed.
    """
    from .io.manifest import Manifest

    outputs = [folder / _output_name(image) for image in inputs]
    clashes = sorted({o.name for o in outputs if outputs.count(o) > 1})
    if clashes:
        raise UsageError(f"several inputs would write {', '.join(clashes)}; segment them into "
                         "different folders or rename them")
    folder.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[str, str]] = []
    for i, (image, out) in enumerate(zip(inputs, outputs), 1):
        print(f"[{i}/{len(inputs)}] {image} -> {out}", file=sys.stderr)
        try:
            resume = args.resume or Manifest(out).exists
            if out.exists() and not args.overwrite and not Manifest(out).exists:
                if not _finished_earlier(args, out):
                    raise UsageError(f"{out} exists from another run (other model or mode, or not ours); "
                                     "--overwrite replaces it")
                if not args.objects or _objects_done(str(out)):
                    print("         finished earlier: skipped", file=sys.stderr)
                    continue
                resume = True  # finished, but not its objects: `_segment_one` makes them
            _segment_one(args, image, str(out), client, resume=resume and not args.overwrite)
        except KeyboardInterrupt:
            raise  # stop the batch; what is saved is resumable (`main` says so)
        except Exception as exc:  # one slide's failure, whatever it is, never stops the others
            if args.debug:
                import traceback

                traceback.print_exc()
            reason = _one_line(_for_the_cli(str(exc), _parser()) if isinstance(exc, TileSegmentError)
                               else f"{type(exc).__name__}: {exc}")
            print(f"tilesegment: error: {reason}", file=sys.stderr)
            failed.append((image, reason or type(exc).__name__))
    if failed:
        print(f"tilesegment: {len(failed)} of {len(inputs)} inputs failed (rerun the same command with "
              "--resume to redo only those and any unfinished):", file=sys.stderr)
        for image, reason in failed:
            print(f"  {image}: {reason}", file=sys.stderr)
        return 1
    return 0


def _finished_earlier(args, out: Path) -> bool:
    """Whether `out` is a finished output of this model in this mode: the same pixels
    whatever the tile, batch or device (the exactness rule), so nothing is left to do."""
    import zarr

    from .io.manifest import Manifest

    if Manifest(out).exists:  # stopped while finishing (pyramid, metadata, markers): resume it
        return False
    try:
        record = zarr.open_group(out, mode="r").attrs.get("tilesegment", {})
    except Exception:
        return False
    return bool(record.get("complete")) and record.get("mode") == args.mode and (
        record.get("model") == _model_identity(args.model))


@functools.lru_cache(maxsize=4)
def _model_identity(spec: str) -> str:
    """The model hash a run records, computed once per model however many outputs are checked."""
    from .io.manifest import model_hash
    from .models.load import load_model

    return model_hash(load_model(spec))


class _client:
    """A dask.distributed client for --scheduler, closed afterwards (None without it)."""

    def __init__(self, scheduler):
        self.scheduler, self.client, self.cluster = scheduler, None, None

    def __enter__(self):
        if self.scheduler is None:
            return None
        try:
            from distributed import Client
        except ImportError:
            raise UsageError("--scheduler needs dask.distributed: pip install distributed") from None
        if self.scheduler.startswith("local:"):
            try:
                n = int(self.scheduler.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"--scheduler {self.scheduler!r}: use local:N with N workers") from None
            self.cluster = _local_cluster(n)
            self.client = Client(self.cluster)
        else:
            self.client = Client(self.scheduler)
        return self.client

    def __exit__(self, *exc):
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _local_cluster(n: int):
    """`n` local worker processes; on a GPU host each gets a GPU of its own.

    Every worker would otherwise see all GPUs and run on the first. Each gets
    one in ``CUDA_VISIBLE_DEVICES`` and declares a ``GPU`` resource, as
    dask-cuda's ``LocalCUDACluster`` does; more workers than GPUs are refused.
    """
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    gpus = _visible_gpus()
    if not gpus:
        return LocalCluster(n_workers=n, threads_per_worker=1, dashboard_address=":0")
    if n > len(gpus):
        raise UsageError(f"--scheduler local:{n} asks for more workers than the {len(gpus)} GPU(s) of this "
                         f"host, which would share GPUs; use local:{len(gpus)} or fewer")
    workers = {i: {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                              "env": {"CUDA_VISIBLE_DEVICES": gpus[i]}}}
               for i in range(n)}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})


def _visible_gpus() -> list[str]:
    """This process's GPUs, named as ``CUDA_VISIBLE_DEVICES`` names them to a child process."""
    import os

    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [v.strip() for v in visible.split(",")][:count] if visible else [str(i) for i in range(count)]


def _return_large_buffers(client) -> None:
    """Volume runs free tens of MB per tile; the CLI owns its process (and its workers'), so it
    makes glibc return such buffers (`tilesegment.process`). Library callers decide for themselves."""
    from .process import return_large_buffers

    return_large_buffers()
    if client is not None:
        client.run(return_large_buffers)


def _segment_one(args, image: str, output: str, client, resume: Optional[bool] = None) -> int:
    from .api import prepare
    from .process import cudnn_autotune, exact_fp32

    resume = args.resume if resume is None else resume
    if resume and not args.overwrite and "://" not in output and Path(output).is_dir() and _finished_earlier(
            args, Path(output)):
        if args.objects and not _objects_done(output):  # a run stopped in its objects pass
            if not args.quiet:
                print(f"done     {output} was finished earlier with this model and mode; its objects "
                      "were not: finding them", file=sys.stderr)
            return _segment_objects(args, output, resume=True, client=client)
        if not args.quiet:
            print(f"done     {output} was finished earlier with this model and mode: nothing to do",
                  file=sys.stderr)
        return 0
    device = args.device.split(",") if "," in args.device else args.device
    job = prepare(image, args.model, output, tile_size=args.tile_size,
                  batch_size=args.batch_size, device=device, client=client, mode=args.mode,
                  padding=args.padding, level=args.level, axes=args.axes,
                  chunk_size=args.chunk_size, overwrite=args.overwrite,
                  precision=args.precision, compile=args.compile, mpp=args.mpp,
                  series=args.series, channels=_channels(args.channels),
                  tissue_mask=args.tissue_mask, resume=resume, on_error=args.on_error,
                  ngff=args.ngff, storage_options=args.storage_options, instances=_recipe(args))
    plan, source, geometry = job.plan, job.tiler.source, job.plan.geometry
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    say(f"input    {image}: {_by_axis(source.shape, plan.axes)} px, "
        f"{source.channels} channel(s), {source.dtype}")
    say(f"network  halo {compact(geometry.halo)}, step {compact(geometry.step)}; tile "
        f"{_by_axis(plan.tile_size, plan.axes, 'x')} -> network input {_by_axis(plan.input_size, plan.axes, 'x')} "
        f"({plan.computed_fraction():.2f} computed px per written px)")
    where = "a dask cluster" if client is not None else ", ".join(str(d) for d in job.devices)
    say(f"plan     {plan.n_tiles} tiles in {plan.n_blocks} blocks, batch {job.batch_size} on {where} "
        f"in {_precision(job.compute.precision)}")
    if plan.geometry.ndim > 2:
        _return_large_buffers(client)
    if job.tissue is not None:
        say(f"tissue   {len(job.skipped)} of {plan.n_tiles} tiles have no tissue and are written "
            f"as background ({len(job.skipped) / plan.n_tiles:.0%} skipped)")
    if job.resume:
        say(f"resume   {len(job.done_blocks)} of {plan.n_blocks} blocks were finished by an earlier run")
    try:
        with exact_fp32(), cudnn_autotune():  # the command owns its process (tilesegment.process)
            _, run = job.run(progress=not args.quiet, client=client)
    except OutputBusyError:
        raise  # the blocks saved there are the other run's, still being written
    except BaseException:
        if not args.overwrite:  # an overwrite run writes beside the old output: nothing to resume
            _say_resumable(output, plan.n_blocks, args.storage_options, _resume_command(args))
        raise
    finally:
        job.close()
    unit = "Mpx/s" if len(plan.shape) == 2 else "Mvox/s"
    say(f"done     {run.computed} tiles computed in {run.seconds:.1f} s: "
        f"{run.megapixels_per_second:.2f} {unit} -> {output}")
    if args.objects:
        return _segment_objects(args, output, resume, client, ndim=len(plan.shape))
    return 0


def _segment_objects(args, output: str, resume: bool, client, ndim: Optional[int] = None) -> int:
    """The objects pass of ``segment --objects``: labels/objects in OUTPUT, the table and the
    GeoJSON beside it. Resuming, whatever a stopped pass left of them is made again."""
    from .objects.export import files_beside

    table, geojson = files_beside(output)
    ndim = _stored_ndim(output) if ndim is None else ndim
    geojson = str(geojson) if ndim == 2 else None  # QuPath GeoJSON is 2-d
    try:
        return _find_objects(output, None, 1, str(table), geojson, args.overwrite or resume, args.quiet, client)
    except KeyboardInterrupt:
        print(f"tilesegment: {output} is segmented, its objects are not finished; to finish them, run: "
              f"{_resume_command(args)}", file=sys.stderr)
        raise


def _stored_ndim(output: str) -> int:
    """Spatial axes of a segment output (2 for images, 3 for volumes), from its OME axes."""
    import zarr

    from .io.ngff import read_ome

    multiscales = read_ome(zarr.open_group(output, mode="r")).get("multiscales", [{}])
    return sum(axis.get("type") == "space" for axis in multiscales[0].get("axes", [])) or 2


def _objects_done(output: str) -> bool:
    """Whether ``segment --objects`` finished the objects of `output`: labels/objects complete,
    then the table, then (2-D) the GeoJSON, each written whole (so the last one present
    means the ones before are complete)."""
    import zarr

    from .objects.export import files_beside

    try:
        objects = zarr.open_group(Path(output) / "labels" / "objects", mode="r")
    except Exception:
        return False
    if not objects.attrs.get("tilesegment", {}).get("complete"):
        return False
    table, geojson = files_beside(output)
    return table.is_file() and (geojson.is_file() or _stored_ndim(output) != 2)


def _precision(precision: str) -> str:
    """The precision a run computes in, as the plan line says it: reduced ones are not exact.

    >>> _precision("fp32"), _precision("bf16")
    ('fp32', 'bf16 (not exact)')
    """
    return precision if precision == "fp32" else f"{precision} (not exact)"


def _check_objects_outputs(output: str, overwrite: bool) -> None:
    from .errors import OutputExistsError
    from .objects.export import files_beside

    for path in files_beside(output):
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{str(path)!r} exists (objects of an earlier run); pass --overwrite or "
                                    "another OUTPUT")


def _recipe_arguments(parser: Any, default: str = "the model's recipe, else every class but 0") -> None:
    parser.add_argument("--classes", default=None, metavar="K,L",
                        help=f"classes whose components are objects (seeds), e.g. 2 (default: {default})")
    parser.add_argument("--grow", type=float, default=None, metavar="K",
                        help="grow the objects by up to K pixels into the --grow-into classes (nearest "
                             "object wins; exact across chunks)")
    parser.add_argument("--grow-into", default=None, metavar="K,L",
                        help="classes the objects grow into, e.g. 3 (a boundary class); with --grow")


def _recipe(args: argparse.Namespace) -> Optional[dict]:
    """The instance recipe the flags give (None: none of them given)."""
    if args.classes is None and args.grow is None and args.grow_into is None:
        return None
    if args.classes is None:
        raise UsageError("--grow and --grow-into need --classes, the seed classes, e.g. --classes 2")
    return {"classes": _classes(args.classes), "grow": args.grow or 0,
            "grow_into": [] if args.grow_into is None else _classes(args.grow_into, "--grow-into")}


def _objects(args: argparse.Namespace) -> int:
    classes = None if args.classes is None else _classes(args.classes)
    into = None if args.grow_into is None else _classes(args.grow_into, "--grow-into")
    with _client(args.scheduler) as client:
        return _find_objects(args.input, classes, args.connectivity, args.table, args.geojson,
                             args.overwrite, args.quiet, client, output=args.output, grow=args.grow or 0,
                             grow_into=into)


def _classes(text: str, flag: str = "--classes") -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of class numbers, e.g. 2 or 1,2") from None


def _find_objects(image: str, classes, connectivity: int, table: Optional[str], geojson: Optional[str],
                  overwrite: bool, quiet: bool, client, output: Optional[str] = None, grow: float = 0,
                  grow_into: Optional[list] = None) -> int:
    """Label the objects of a segment output; write the table and GeoJSON when asked."""
    import time

    from .errors import OutputExistsError
    from .objects import label_objects

    for path in (table, geojson):  # fail before the work, not after it
        if path is not None and Path(path).exists() and not overwrite:
            raise OutputExistsError(f"{path!r} exists; pass --overwrite or another path")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    start = time.perf_counter()
    objs = label_objects(image, output, classes=classes, connectivity=connectivity, overwrite=overwrite,
                         progress=not quiet, client=client, grow=grow, grow_into=grow_into)
    if objs.recipe is not None:
        say(f"recipe   {objs.recipe.describe()} (recorded in {image})")
    counts = objs.table["class_name"].value_counts(sort=False)
    summary = ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "none"
    stored = Path(output) if output is not None else Path(image) / "labels" / "objects"
    where = stored if stored.is_dir() else "not stored (INPUT is an array: pass --output OBJECTS.zarr)"
    say(f"objects  {len(objs)} ({summary}) in {time.perf_counter() - start:.1f} s -> {where}")
    if table is not None:
        say(f"table    {objs.to_table(table, overwrite=overwrite)}")
    if geojson is not None:
        if objs.ndim != 2:
            raise UsageError("--geojson is for 2-D images; a 3-D map gets labels and a table only")
        say(f"geojson  {objs.to_geojson(geojson, overwrite=overwrite, progress=not quiet)}  "
            "(QuPath: File > Import objects, or drag it onto the slide)")
    return 0


def _say_resumable(output: str, n_blocks: int, storage_options: Optional[dict] = None,
                   command: str = "") -> None:
    from .io.output import Output

    saved = Output(output, storage_options=storage_options).saved_blocks()
    if saved:
        how = f": {command}" if command else ""
        print(f"tilesegment: {saved} of {n_blocks} blocks are saved in {output}; "
              f"run the same command with --resume to continue{how}", file=sys.stderr)


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: the one given, with ``--resume``.

    >>> _resume_command(argparse.Namespace(argv=["segment", "a b.svs", "o.zarr", "-q"]))
    "tilesegment segment 'a b.svs' o.zarr -q --resume"
    """
    import shlex

    argv = list(getattr(args, "argv", None) or [])
    if not argv:
        return ""
    return shlex.join(["tilesegment", *argv, *([] if "--resume" in argv else ["--resume"])])


def _verify(args: argparse.Namespace) -> int:
    from .io.verify import verify_output

    if "://" in args.output:
        raise UsageError(f"verify reads local outputs; {args.output!r} is a URL: copy it or mount it first")
    found = verify_output(args.output)
    for problem in found.problems:
        print(f"problem  {problem}")
    if found.ok:
        if not args.quiet:
            print(f"ok       {found.summary()}")
        return 0
    print(f"tilesegment: {len(found.problems)} problem(s) in {args.output}", file=sys.stderr)
    return 1


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out_dir, size=args.size, image=args.image, device=args.device,
                      overwrite=args.overwrite, progress=not args.quiet)
    print(f"slide       {result.slide}")
    print(f"labels      {result.output}  (OME-Zarr: 0 background, 1 tissue, 2 nucleus, 3 nucleus boundary; "
          f"{result.seconds:.1f} s)")
    print(f"objects     {result.objects} nuclei in {result.output}/labels/objects; table {result.table}; "
          f"QuPath {result.geojson}")
    print(f"overview    {result.overview}  (left: slide, right: outlines of tissue green, nuclei yellow)")
    if result.scores:
        dice = ", ".join(f"{k[5:]} {v:.3f}" for k, v in result.scores.items() if k.startswith("dice_"))
        print(f"agreement   Dice with the generated truth: {dice}; nuclei F1 (IoU 0.5) "
              f"{result.scores['nuclei_f1']:.3f}, PQ {result.scores['nuclei_pq']:.3f}")
    print(f"open it     napari --plugin napari-ome-zarr {result.output}   "
          f"(pip install 'napari[all]' napari-ome-zarr; tick the eye of the labels layer)")
    return 0


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{name} {text!r} is not a comma-separated list of integers, e.g. 256,512") from None
    if min(values) < 1:
        raise UsageError(f"{name} {text!r} must be positive")
    return values


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench, recommend, write_results

    tiles = "auto" if args.tile_sizes == "auto" else _ints(args.tile_sizes, "--tile-sizes")
    rows = bench(args.input, args.model, tiles, _ints(args.batch_sizes, "--batch-sizes"),
                 device=args.device, precision=args.precision, size=args.size, repeats=args.repeats)
    paths = write_results(rows, args.out)
    columns = [("tile", "tile")] if "tile" in rows[0] else [("tile_size", "tile")]
    columns += [("input_size", "input"), ("batch_size", "batch"),
               ("end_to_end_mpx_s", "e2e Mpx/s"), ("model_only_mpx_s", "model Mpx/s"),
               ("halo_overhead", "halo x"), ("batch_latency_ms", "ms/batch"), ("peak_host_mb", "host MB"),
               ("peak_device_mb", "dev MB")]
    print("  ".join(f"{title:>11}" for _, title in columns))
    for row in rows:
        print("  ".join(f"{'-' if row[key] is None else row[key]:>11}" for key, _ in columns))
    best = recommend(rows)
    tile = best["tile"].replace("x", ",") if "tile" in best else best["tile_size"]
    print(f"recommended: --tile-size {tile} --batch-size {best['batch_size']} "
          f"({best['end_to_end_mpx_s']:.2f} Mpx/s end to end on {best['device']})")
    print("wrote " + ", ".join(str(p) for p in paths))
    if not any(p.suffix == ".png" for p in paths):
        print("(pip install matplotlib for bench.png)")
    return 0


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object, e.g. '{{\"anon\": true}}'")
    return value


def _channels(text):
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise UsageError(f"--channels {text!r} is not a list of channel numbers; use e.g. 2,0,1") from None


def _info(args: argparse.Namespace) -> int:
    import tilesegment as ts

    model = ts.load_model(args.model) if args.model else None
    geometry = ts.Geometry.of(model) if model is not None else None
    # Opened as segment would open it for this model (a 3-d network reads arrays as volumes).
    source = ts.open_image(args.input, axes=args.axes, storage_options=args.storage_options,
                           ndim=geometry.ndim if geometry is not None else 2)
    print(f"image      {args.input} ({source.format})")
    print(f"reader     {_reader_of(args.input)}")
    letters = " x ".join(source.plan_axes)
    print(f"shape      {' x '.join(map(str, source.shape))} px ({letters}), axes {source.axes}, "
          f"{source.channels} channel(s), {source.dtype}")
    if source.pixel_size is not None:
        print(f"pixel size {' x '.join(f'{p:.4g}' for p in source.pixel_size)} um")
    for i, lv in enumerate(source.levels):
        size = "" if lv.pixel_size is None else f", {lv.pixel_size[-1]:.4g} um/px"
        print(f"level {i:<4} {' x '.join(map(str, lv.shape))} px{size}")
    if model is not None:
        if hasattr(model, "test_tensors"):  # a bioimage.io package
            from .models.bioimageio import check_test_tensors

            print(f"bioimage.io {model.name!r}, {model.weights_format} weights; note: "
                  "loading a package runs its code (architecture), after checking its SHA-256s")
            print(f"test       its test input reproduces its test output (max abs difference "
                  f"{check_test_tensors(model):.2g})")
        print(f"network    halo {compact(geometry.halo)}, step {compact(geometry.step)}, "
              f"smallest input {compact(geometry.min_input)}")
        if geometry.ndim == 2:
            step = geometry.step[0]
            tiles = [t for t in (256, 512, 1024, 2048) if t % step == 0] or [step * 32]
            print("tiles      " + ", ".join(f"{t} (input {geometry.input_size(t)[0]})" for t in tiles))
        else:
            from .api import volume_tile

            shape = source.shape[-geometry.ndim:]
            tiles = sorted({volume_tile(edge, geometry, shape) for edge in (32, 64, 128, 256)})
            print("tiles      " + ", ".join(f"{_by_axis(t, 'zyx', 'x')} (input "
                                            f"{_by_axis(geometry.input_size(t), 'zyx', 'x')})" for t in tiles))
    source.close()
    return 0


def _reader_of(image: str) -> str:
    """Which reader `open_image` chose for `image`, and why: readers are asked in priority order,
    and the first whose ``can_open`` accepts the file (by its bytes, name or layout) opens it."""
    from .registry import readers

    asked = []
    for reader in readers:
        if reader.can_open(image):
            passed = f"; {', '.join(asked)} declined" if asked else ""
            return (f"{reader.name} (priority {reader.priority}, reads {reader.formats}: "
                    f"the first to accept it{passed})")
        asked.append(reader.name)
    return "none"


def _for_the_cli(message: str, parser: argparse.ArgumentParser) -> str:
    """An error message in the CLI's words: ``overwrite=True`` becomes ``--overwrite``.

    Messages are written for the Python API, some with the flag beside the
    keyword (``pass overwrite=True (CLI: --overwrite)``); on the command line
    only the flag is meant. Keywords that name a flag of `parser` are
    rewritten; others are left as they are.

    Examples
    --------
    >>> p = argparse.ArgumentParser()
    >>> _ = p.add_argument("--axes"); _ = p.add_argument("--overwrite", action="store_true")
    >>> _for_the_cli("pass overwrite=True (CLI: --overwrite) or axes='CYX', or axes= per axis", p)
    'pass --overwrite or --axes CYX, or --axes per axis'
    """
    message = re.sub(r"\b[a-z_]+=\S* \(CLI: ([^)]*)\)", r"\1", message)
    flags = {option[2:].replace("-", "_"): option for action in _actions(parser)
             for option in action.option_strings if option.startswith("--")}
    for name, flag in flags.items():
        message = re.sub(rf"\b{name}=True\b", flag, message)
        message = re.sub(rf"\b{name}='([^']*)'", rf"{flag} \1", message)
        message = re.sub(rf"\b{name}=(?=[\s,.;:)]|$)", flag, message)
    return message


def _actions(parser: argparse.ArgumentParser) -> list:
    """Every argument of `parser` and of its sub-commands."""
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions += _actions(sub)
    return actions


@contextlib.contextmanager
def _notes():
    """Print a taken-over stale lock (`StaleLockWarning`, `tilesegment.io.lock`) as one note line."""
    import warnings

    from .errors import StaleLockWarning

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, StaleLockWarning):
                print(f"tilesegment: note: {message}", file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


class _StopOnSigterm:
    """While the command runs, SIGTERM (``kill``, a batch scheduler's time limit, a container
    stop) stops it as Ctrl-C does: a KeyboardInterrupt in the main thread, so the blocks being
    written finish, the output stays resumable and the command says how to continue."""

    def __init__(self) -> None:
        self.received, self._installed = False, False
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        if self.received:
            return  # a repeated SIGTERM must not break off the clean stop the first one began
        self.received = True
        raise KeyboardInterrupt

    def __enter__(self) -> "_StopOnSigterm":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread (main() called from a thread): leave SIGTERM be
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the exit status (0 ok, 1 runtime error, 2 usage error)."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # for the command that resumes a stopped run
    stop = _StopOnSigterm()
    try:
        with _notes(), stop, _library_warnings(shown=args.debug):
            return args.run(args)
    except TileSegmentError as exc:
        if args.debug:
            raise
        print(f"tilesegment: error: {_one_line(_for_the_cli(str(exc), parser))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tilesegment: {'stopped by SIGTERM' if stop.received else 'interrupted'}", file=sys.stderr)
        return 128 + signal.SIGTERM if stop.received else 130
    except Exception as exc:  # an unexpected failure still gets one line
        if args.debug:
            raise
        print(f"tilesegment: error: {_one_line(f'{type(exc).__name__}: {exc}')} (rerun with --debug for "
              "the traceback)", file=sys.stderr)
        return 1


def _one_line(message: str) -> str:
    """`message` on one line: the CLI's contract is one line per error.

    >>> _one_line("bad tag\\n  details")
    'bad tag details'
    """
    return " ".join(message.split())


@contextlib.contextmanager
def _library_warnings(shown: bool):
    """Keep format libraries' log lines and warnings off stderr unless `shown` (``--debug``).

    tifffile logs a warning or an error for every odd tag of a damaged file
    it still reads, and several before one it cannot; what stops the run
    reaches us as an exception, so the error line (or the finished run) says
    what matters, and ``--debug`` shows the log.
    """
    import logging
    import warnings

    logger = logging.getLogger("tifffile")
    level = logger.level
    with warnings.catch_warnings():
        if not shown:
            logger.setLevel(logging.CRITICAL)
            # bioimageio.spec warns about fields of a damaged description it then refuses anyway.
            warnings.filterwarnings("ignore", module="bioimageio")
        try:
            yield
        finally:
            logger.setLevel(level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
