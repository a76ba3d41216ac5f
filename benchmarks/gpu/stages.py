"""The GPU suite's stages: one function per stage, each returning its figures as a dict.

    python benchmarks/gpu/stages.py STAGE --out DIR [--dry-run]   # one stage -> DIR/STAGE.json
    python benchmarks/gpu/stages.py summary --out DIR             # DIR/gpu.json and a table

`run.sh` runs each stage in its own process under its own time limit, so a
stage that hangs or crashes costs its own figures only. A stage that cannot
run here raises `Skip` with the reason; a part of a stage that cannot run
records ``{"skipped": reason}`` in its place. ``--dry-run`` shrinks every size
so that the whole suite runs on a CPU in under a minute (tests/test_gpu_suite.py).
See docs/gpu.md for what each figure means and the goals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import tilesegment as ts

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("environment", "cuda_tests", "exactness", "model_only", "model_compiled", "end_to_end",
          "host_ceiling", "jpeg_decode", "onnx")


class Skip(Exception):
    """The stage (or part) cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class Sizes:
    """Every size the stages use: the real run's, or the dry run's toys."""

    matmul: int
    paper_base: int
    exact_image: int
    exact_tiles: tuple[int, ...]
    he_image: int
    model_tiles: tuple[int, ...]
    model_batches: tuple[int, ...]
    model_seconds: float
    slide: int
    e2e_tile: int
    host_size: int
    host_readers: tuple[int, ...]
    decode_slide: int
    decode_threads: tuple[int, ...]
    decode_batches: tuple[int, ...]
    onnx_image: int


REAL = Sizes(matmul=8192, paper_base=64, exact_image=2600, exact_tiles=(512, 1024, 2048), he_image=2048,
             model_tiles=(1024, 2048), model_batches=(1, 2, 4, 8, 16, 32), model_seconds=1.0,
             slide=16384, e2e_tile=1024, host_size=8192, host_readers=(2, 4, 8, 15),
             decode_slide=8192, decode_threads=(1, 4, 8, 15), decode_batches=(64, 256, 1024), onnx_image=2048)
DRY = Sizes(matmul=256, paper_base=2, exact_image=300, exact_tiles=(64, 128), he_image=256,
            model_tiles=(64,), model_batches=(1, 2), model_seconds=0.05, slide=512, e2e_tile=128,
            host_size=512, host_readers=(2,), decode_slide=512, decode_threads=(1, 2), decode_batches=(4,), onnx_image=256)


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def paper_unet(sizes: Sizes) -> torch.nn.Module:
    """The paper's U-Net (base 64, depth 4; base shrinks in the dry run), random weights."""
    torch.manual_seed(0)
    return ts.UNet(3, 3, base_channels=sizes.paper_base, depth=4).eval()


def part(fn, *args) -> dict:
    """Run one part of a stage; a `Skip` becomes ``{"skipped": reason}``."""
    try:
        return fn(*args)
    except Skip as reason:
        return {"skipped": str(reason)}


# -- environment ------------------------------------------------------------------------


def environment(sizes: Sizes, out: Path) -> dict:
    """Versions, the device, and the measured matmul ceiling: the denominator of every share of peak."""
    import platform

    dev = device()
    figures = {"python": platform.python_version(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "cpus": os.cpu_count(), "device": str(dev)}
    if dev.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(dev)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        figures["driver"] = smi.stdout.strip() or smi.stderr.strip()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = sizes.matmul
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(10):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    figures.update(matmul_n=n, matmul_dtype=str(dtype).removeprefix("torch."),
                   matmul_tflops=round(2 * n**3 / statistics.median(times) / 1e12, 3))
    return figures


# -- CUDA tests -------------------------------------------------------------------------


def cuda_tests(sizes: Sizes, out: Path) -> dict:
    """The suite's CUDA-only tests (tests/test_gpu.py); without CUDA they skip, and say so."""
    import xml.etree.ElementTree as ET

    report = out / "cuda_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q",
                           "-p", "no:cacheprovider", f"--junitxml={report}"],
                          cwd=ROOT, capture_output=True, text=True)
    (out / "cuda_tests_pytest.log").write_text(proc.stdout + proc.stderr)  # cuda_tests.log is run.sh's
    if not report.exists():
        raise Skip(f"pytest wrote no report (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "exit_code": proc.returncode}


# -- exactness --------------------------------------------------------------------------


class OnDevice(torch.nn.Module):
    """A network run on `dev` for host inputs: `whole_image_logits` on the GPU."""

    def __init__(self, net: torch.nn.Module, dev: torch.device) -> None:
        super().__init__()
        self.net, self.dev = net.to(dev), dev
        self.geometry = net.geometry
        self.normalization = getattr(net, "normalization", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.dev)).cpu()


def exactness(sizes: Sizes, out: Path) -> dict:
    """fp32 tiled vs whole image (paper U-Net), bf16/fp16 labels (demo model), uint8 vs float32 input."""
    from tilesegment.testing import relative_error, whole_image_logits

    dev = device()
    figures = {}
    net = paper_unet(sizes)
    image = np.random.default_rng(0).integers(0, 256, (sizes.exact_image,) * 2 + (3,), dtype=np.uint8)
    with ts.exact_fp32():
        whole = whole_image_logits(image, OnDevice(net, dev), geometry=net.geometry)
        for tile in sizes.exact_tiles:
            tiled = ts.segment(image, net, tile_size=tile, mode="logits", device=dev, precision="fp32",
                               progress=False)
            figures[f"fp32_tile{tile}_rel_error"] = float(relative_error(tiled, whole))
    figures["fp32_exact"] = all(v <= 1e-5 for k, v in figures.items() if k.endswith("rel_error"))
    figures["reduced_precision"] = part(reduced_precision, sizes, dev)
    figures["uint8_upload"] = part(uint8_upload, dev)
    return figures


def reduced_precision(sizes: Sizes, dev: torch.device) -> dict:
    """Share of bf16 and fp16 labels equal to fp32's on an H&E-like slide (goal >= 0.999)."""
    if dev.type != "cuda":
        raise Skip("bf16/fp16 are the GPU's precisions; the CPU runs fp32")
    from tilesegment.he import synthetic_slide

    demo = ts.load_model("demo")
    he = synthetic_slide((sizes.he_image,) * 2, seed=3)[0]
    with ts.exact_fp32():
        fp32 = ts.segment(he, demo, tile_size=512, device=dev, precision="fp32", progress=False)
    return {p: float((ts.segment(he, demo, tile_size=512, device=dev, precision=p, progress=False) == fp32).mean())
            for p in ("bf16", "fp16")}


def uint8_upload(dev: torch.device) -> dict:
    """The raw uint8 upload normalized on the device equals the host's float32 gather, bit for bit."""
    from tilesegment.testing import normalized_on_device_and_host

    on_device, host = normalized_on_device_and_host(dev)
    return {"equal_bits": bool(np.array_equal(on_device.view(np.uint32), host.view(np.uint32)))}


# -- model-only throughput --------------------------------------------------------------


def model_only(sizes: Sizes, out: Path) -> dict:
    """Paper U-Net, bf16 (fp32 on CPU), channels-last, eager: output Mpx/s per tile x batch."""
    net = paper_unet(sizes)
    rows = [row for tile in sizes.model_tiles for row in model_rows(net, tile, sizes.model_batches, False, sizes)]
    return {"rows": rows, "best": best_row(rows)}


def model_compiled(sizes: Sizes, out: Path) -> dict:
    """The same with CUDA graphs (``compile="reduce-overhead"``), at each tile's best eager batch
    (from model_only's record; batch 8 without one). A stage of its own: compilation takes long."""
    if not torch.cuda.is_available():
        raise Skip("CUDA graphs need CUDA")
    eager = out / "model_only.json"
    rows = json.loads(eager.read_text()).get("figures", {}).get("rows", []) if eager.exists() else []
    net = paper_unet(sizes)
    found = []
    for tile in sizes.model_tiles:
        best = best_row([r for r in rows if r["tile"] == tile]) or {"batch": 8}
        found += model_rows(net, tile, (best["batch"],), "reduce-overhead", sizes)
    return {"rows": found, "best": best_row(found)}


def best_row(rows: list[dict]) -> dict | None:
    return max((r for r in rows if "mpx_s" in r), key=lambda r: r["mpx_s"], default=None)


def model_rows(net: torch.nn.Module, tile: int, batches: tuple[int, ...], compile_mode: bool | str,
               sizes: Sizes) -> list[dict]:
    """One row per batch: the network alone on device-resident inputs, about
    ``sizes.model_seconds`` per cell; batches past the device's memory say so and end the sweep."""
    from tilesegment.bench import bare_model_seconds, flops_per_pixel
    from tilesegment.executor import Executor

    n_in = net.geometry.input_size((tile, tile))
    fpp = flops_per_pixel(net, 3, net.geometry, (tile, tile))
    rows = []
    for batch in batches:
        executor = Executor(net, device(), compile=compile_mode, tile_size=(tile, tile))
        shape = (batch, 3, *n_in)
        try:
            bare_model_seconds(executor, 2, shape)  # compilation, autotuning, graph capture
            n = max(3, int(sizes.model_seconds / max(bare_model_seconds(executor, 1, shape), 1e-6)))
            seconds = bare_model_seconds(executor, n, shape)
        except torch.OutOfMemoryError:
            rows.append({"tile": tile, "batch": batch, "compile": compile_mode, "skipped": "out of memory"})
            del executor
            torch.cuda.empty_cache()
            break
        mpx_s = n * batch * tile * tile / seconds / 1e6
        rows.append({"tile": tile, "batch": batch, "compile": compile_mode, "precision": executor.precision,
                     "mpx_s": round(mpx_s, 2), "tflops": round(fpp * mpx_s * 1e6 / 1e12, 3)})
        del executor
    return rows


# -- end to end -------------------------------------------------------------------------


def pyramidal_jpeg_tiff(path: Path, size: int) -> Path:
    """A ``size``² RGB TIFF of 256-px JPEG tiles with one 4x-smaller level, like a slide."""
    import tifffile

    from tilesegment.he import synthetic_slide

    tile = 512
    block = synthetic_slide((tile * 2, tile * 2), seed=1)[0]  # H&E-like texture, repeated
    image = np.tile(block, (-(-size // block.shape[0]), -(-size // block.shape[1]), 1))[:size, :size]
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = dict(tile=(256, 256), photometric="rgb", compression="jpeg", maxworkers=os.cpu_count())
        tif.write(image, subifds=1, **options)
        tif.write(image[::4, ::4].copy(), subfiletype=1, **options)
    return path


class BusySampler:
    """The GPU's utilization (nvidia-smi, every 100 ms) while the block runs."""

    def __enter__(self) -> "BusySampler":
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True)
            if smi.returncode == 0:
                self.samples.append(float(smi.stdout.split()[0]) / 100)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def share(self) -> float | None:
        return round(statistics.mean(self.samples), 3) if self.samples else None


def end_to_end(sizes: Sizes, out: Path) -> dict:
    """`segment()` from a JPEG-tiled pyramidal TIFF to a labels OME-Zarr: Mpx/s, pipeline
    efficiency against the model alone at the same tile and batch, GPU busy share, host CPU."""
    from tilesegment.bench import bare_model_seconds

    dev = device()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        slide = pyramidal_jpeg_tiff(Path(tmp) / "slide.tif", sizes.slide)
        figures["generate_s"] = round(time.perf_counter() - start, 2)
        for name, net in (("paper_unet", paper_unet(sizes)), ("demo", ts.load_model("demo"))):
            job = ts.prepare(slide, net, Path(tmp) / f"{name}_warm.zarr", tile_size=sizes.e2e_tile, device=dev)
            with job:
                job.run(progress=False)  # kernels, cuDNN plans, page cache
            job = ts.prepare(slide, net, Path(tmp) / f"{name}.zarr", tile_size=sizes.e2e_tile, device=dev)
            cpu = time.process_time()
            with job, BusySampler() if dev.type == "cuda" else contextlib.nullcontext() as busy:
                _, stats = job.run(progress=False)
            cpu = time.process_time() - cpu
            executor = job.executors()[0]
            n_batches = -(-job.plan.n_tiles // job.batch_size)
            model_s = bare_model_seconds(executor, n_batches, (job.batch_size, 3, *job.plan.input_size))
            figures[name] = {
                "precision": executor.precision, "tile": sizes.e2e_tile, "batch": job.batch_size,
                "readers": job.readers, "seconds": round(stats.seconds, 3),
                "mpx_s": round(stats.pixels / 1e6 / stats.seconds, 2),
                "model_only_mpx_s": round(stats.pixels / 1e6 / model_s, 2),
                "pipeline_efficiency": round(model_s / stats.seconds, 4),
                "gpu_busy_share": getattr(busy, "share", None),
                "host_cores_busy": round(cpu / stats.seconds, 2),
            }
    return figures


# -- host ceiling -----------------------------------------------------------------------


def host_ceiling(sizes: Sizes, out: Path) -> dict:
    """benchmarks/host_ceiling.py (the free stand-in network) at each reader count."""
    # Its files are named apart from this stage's record and log, which run.sh writes.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_ceiling.py"),
                           "--size", str(sizes.host_size), "--tile-size", str(sizes.e2e_tile),
                           "--workers", *map(str, sizes.host_readers), "--results", str(out),
                           "--name", "host_ceiling_rows", "--no-plot"], capture_output=True, text=True)
    (out / "host_ceiling_script.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"host_ceiling.py failed: {proc.stderr.strip()[-500:]}")
    rows = json.loads((out / "host_ceiling_rows.json").read_text())["rows"]
    return {f"{r['stage']}_{r['source']}_mpx_s": r["mpx_per_s"] for r in rows}


# -- GPU JPEG decode --------------------------------------------------------------------


def jpeg_tiles(size: int) -> tuple[list[bytes], np.ndarray]:
    """A generated slide's JPEG tiles made SVS-style (tables and colour marker stripped, as libtiff
    writes them) and back to self-contained streams, as the pipeline would hand a GPU decoder;
    and tifffile's decode of the slide."""
    import tifffile

    from tilesegment.io.jpeg import abbreviate, self_contained

    with tempfile.TemporaryDirectory() as tmp:
        path = pyramidal_jpeg_tiff(Path(tmp) / "slide.tif", size)
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            streams = []
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                tif.filehandle.seek(offset)
                stream = tif.filehandle.read(count)
                if page.jpegtables is None:
                    tables, stream = abbreviate(stream)
                else:
                    tables = page.jpegtables
                streams.append(self_contained(stream, tables, page.photometric))
            return streams, page.asarray()


def jpeg_decode(sizes: Sizes, out: Path) -> dict:
    """Decode the same tiles with imagecodecs on N threads and with nvJPEG (torchvision on CUDA);
    Mpx/s and agreement with tifffile's decode."""
    from concurrent.futures import ThreadPoolExecutor

    import imagecodecs

    streams, reference = jpeg_tiles(sizes.decode_slide)
    tile, across = 256, reference.shape[1] // 256
    mpx = len(streams) * tile * tile / 1e6

    def agreement(tiles) -> dict:
        got = np.stack([np.asarray(t) for t in tiles])
        want = reference.reshape(-1, tile, across, tile, 3).swapaxes(1, 2).reshape(got.shape)
        diff = np.abs(got.astype(np.int16) - want)
        return {"max_abs_diff": int(diff.max()), "equal_share": round(float((diff == 0).mean()), 6)}

    figures = {"tiles": len(streams)}
    for threads in sizes.decode_threads:
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            tiles = list(pool.map(imagecodecs.jpeg8_decode, streams))
            seconds = time.perf_counter() - start
        figures[f"imagecodecs_t{threads}"] = {"mpx_s": round(mpx / seconds, 2), **agreement(tiles)}
    figures["nvjpeg"] = part(nvjpeg, streams, sizes, mpx, agreement)
    return figures


def nvjpeg(streams: list[bytes], sizes: Sizes, mpx: float, agreement) -> dict:
    if not torch.cuda.is_available():
        raise Skip("torchvision's decode_jpeg on the device needs CUDA")
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        raise Skip("torchvision is not installed") from None
    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    figures = {}
    for batch in sizes.decode_batches:
        decode_jpeg(data[:batch], device="cuda")
        sync()
        start = time.perf_counter()
        tiles = []
        for i in range(0, len(data), batch):
            tiles.extend(decode_jpeg(data[i:i + batch], device="cuda"))
        sync()
        figures[f"batch{batch}_mpx_s"] = round(mpx / (time.perf_counter() - start), 2)
    figures.update(agreement(t.permute(1, 2, 0).cpu().numpy() for t in tiles))
    return figures


# -- ONNX -------------------------------------------------------------------------------


def onnx(sizes: Sizes, out: Path) -> dict:
    """The paper U-Net exported to ONNX, run by onnxruntime's CUDA provider (CPU in the dry run):
    exactness against torch and Mpx/s."""
    try:
        import onnxruntime
    except ImportError:
        raise Skip("onnxruntime is not installed") from None
    from tilesegment.models.onnx import OnnxModel, export_onnx
    from tilesegment.testing import relative_error

    dev = device()
    if dev.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise Skip(f"onnxruntime has no CUDA provider: {onnxruntime.get_available_providers()}")
    try:
        import onnx as _  # noqa: F401  export_onnx writes the geometry into the file with it
    except ImportError:
        raise Skip("the onnx package is missing (fetch-wheels.sh carries it)") from None
    net = paper_unet(sizes)
    image = np.random.default_rng(0).integers(0, 256, (sizes.onnx_image,) * 2 + (3,), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        model = OnnxModel(export_onnx(net, Path(tmp) / "unet.onnx"))
        run = dict(tile_size=512 if dev.type == "cuda" else 128, mode="logits", device=dev, precision="fp32",
                   progress=False)
        with ts.exact_fp32():
            reference = ts.segment(image, net, **run)
            ts.segment(image, model, **run)  # session creation
            start = time.perf_counter()
            got = ts.segment(image, model, **run)
            seconds = time.perf_counter() - start
    return {"provider": "CUDAExecutionProvider" if dev.type == "cuda" else "CPUExecutionProvider",
            "rel_error_vs_torch": float(relative_error(got, reference)),
            "mpx_s": round(image.shape[0] * image.shape[1] / 1e6 / seconds, 2)}


# -- driver -----------------------------------------------------------------------------


def run_stage(name: str, sizes: Sizes, out: Path) -> dict:
    """Run one stage and write ``out/<name>.json``: its figures, or why it was skipped or failed."""
    start = time.perf_counter()
    try:
        record = {"status": "ok", "figures": globals()[name](sizes, out)}
    except Skip as reason:
        record = {"status": "skipped", "reason": str(reason)}
    record["seconds"] = round(time.perf_counter() - start, 2)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    return record


def summary(out: Path, dry_run: bool) -> dict:
    """Gather the stages' records into ``out/gpu.json``; a stage with no record timed out or crashed."""
    stages = {}
    for name in STAGES:
        path = out / f"{name}.json"
        stages[name] = (json.loads(path.read_text()) if path.exists()
                        else {"status": "failed", "reason": f"no record: timed out or crashed (see {name}.log)"})
    result = {"dry_run": dry_run, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": stages}
    (out / "gpu.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def headline(name: str, record: dict) -> str:
    """One line per stage for the table printed last."""
    if record["status"] != "ok":
        return record.get("reason", "")[:70]
    f = record["figures"]
    lines = {
        "environment": lambda: f"{f.get('gpu', f['device'])}: {f['matmul_tflops']} TFLOP/s {f['matmul_dtype']}",
        "cuda_tests": lambda: f"{f['passed']} passed, {f['failures'] + f['errors']} failed, {f['skipped']} skipped",
        "exactness": lambda: f"fp32 exact: {f['fp32_exact']}; bf16/fp16: {f['reduced_precision']}",
        "model_only": lambda: best_line(f["best"]),
        "model_compiled": lambda: best_line(f["best"]),
        "end_to_end": lambda: "; ".join(f"{k}: {v['mpx_s']} Mpx/s, eff {v['pipeline_efficiency']}"
                                        for k, v in f.items() if isinstance(v, dict)),
        "host_ceiling": lambda: ", ".join(f"{k.split('_')[2]}: {v}" for k, v in f.items()
                                          if k.startswith("read_gather") and "tiff" in k) + " Mpx/s",
        "jpeg_decode": lambda: ", ".join(f"{k}: {v['mpx_s']}" for k, v in f.items() if k.startswith("imagecodecs"))
                               + f"; nvjpeg: {f['nvjpeg']}",
        "onnx": lambda: f"{f['provider']}: {f['mpx_s']} Mpx/s, rel err {f['rel_error_vs_torch']:.1e}",
    }
    return lines[name]()[:110]


def best_line(row: dict | None) -> str:
    return "no batch fitted" if row is None else f"best {row['mpx_s']} Mpx/s (tile {row['tile']}, batch {row['batch']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=(*STAGES, "summary"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes, on the CPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage != "summary":
        run_stage(args.stage, DRY if args.dry_run else REAL, args.out)
        return
    result = summary(args.out, args.dry_run)
    for name, record in result["stages"].items():
        print(f"{name:>14} {record['status']:>8} {record.get('seconds', '-'):>7}s  {headline(name, record)}")


if __name__ == "__main__":
    main()
