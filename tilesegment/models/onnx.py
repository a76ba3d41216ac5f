"""ONNX models run through onnxruntime, wrapped as a ``torch.nn.Module``.

The wrapper lets an ONNX network go everywhere a torch module goes (executor,
geometry, manifest, distributed tasks) without those stages knowing about
onnxruntime: ``forward`` takes and returns torch tensors. Its `geometry`
is declared, from the model's own metadata (written by
``save_model(..., format="onnx")``) or found once by running the network on
small inputs, so the meta-device probe never needs to look inside it.

onnxruntime is an optional dependency (the ``onnx`` extra: ``pip install -e ".[onnx]"``);
it is imported only when an ONNX model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..geometry import Geometry
from .base import ModelBase, describe

__all__ = ["OnnxModel", "export_onnx", "GEOMETRY_KEY", "NORMALIZATION_KEY"]

#: Keys of the ONNX ``metadata_props`` that carry what tilesegment needs.
GEOMETRY_KEY = "tilesegment.geometry"
NORMALIZATION_KEY = "tilesegment.normalization"


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(
            "ONNX models need onnxruntime: pip install onnxruntime onnx (or onnxruntime-gpu "
            "on a CUDA machine)"
        ) from None
    return onnxruntime


class OnnxModel(ModelBase):
    """An ONNX segmentation network, run by onnxruntime, usable as a torch module.

    Parameters
    ----------
    model : path or bytes
        The ``.onnx`` file (or its bytes). Its first input must be
        ``(N, C, H, W)`` with dynamic H and W; the first output is used.
        Weights in external data files (``net.onnx.data``, as
        ``torch.onnx.export`` writes them since torch 2.9) are read from
        beside the file, and are part of the model's identity for resume.
    geometry : Geometry, optional
        Declare the network's halo and step (needed for "same"-padded
        networks, whose output is as large as their input). By default it
        is read from the model's ``tilesegment.geometry`` metadata, or found
        by running the network on growing small inputs (once, at load).
    providers : sequence, optional
        onnxruntime execution providers for CUDA devices, each a name or a
        ``(name, options)`` pair, e.g.
        ``["TensorrtExecutionProvider", "CUDAExecutionProvider"]``. Default:
        CUDA when onnxruntime-gpu offers it. tilesegment adds the options
        that make the run's precision hold (fp32: ``use_tf32=0``) and bound
        the arena by the memory budget (``gpu_mem_limit``); options given
        here win over those, except ``device_id``, which is each session's
        device. CPU inputs always use the CPU provider.
    threads : int, optional
        Intra-op threads of the CPU session (default: ``torch.get_num_threads()``,
        so torch and ONNX models share the cores alike).

    Notes
    -----
    On CUDA inputs the network reads the torch tensor in place and writes
    into a torch tensor (onnxruntime IO binding): no copy through the host.
    Autocast does not reach inside onnxruntime; the executor's precision
    (the autocast in force) picks the providers' options instead, and
    `execution_providers` records what ran. A GPU provider that onnxruntime
    cannot load is an error, not a silent run on the CPU.

    Raises
    ------
    ModelError
        When onnxruntime is missing, the file is not ONNX, an external data
        file is missing, the input is not
        4-d, its channel axis is not fixed, or its spatial axes are fixed
        (tiles of other sizes could not run).
    """

    torch_memory = False  # onnxruntime's arena: the executor keeps the graph's estimate

    def __init__(
        self,
        model: Union[str, os.PathLike, bytes],
        *,
        geometry: Optional[Geometry] = None,
        providers: Optional[Sequence[Any]] = None,
        threads: Optional[int] = None,
    ) -> None:
        super().__init__()
        _import_ort()
        if isinstance(model, (bytes, bytearray)):
            data, self.name, self._path = bytes(model), "ONNX model", None
        else:
            self._path = Path(model).resolve()
            data, self.name = self._path.read_bytes(), self._path.name
        self._data = data
        # torch >= 2.9 exports weights into a file beside the model (`net.onnx.data`); sessions
        # are built from the path so that onnxruntime finds it there, whatever the working folder.
        external = [] if self._path is None else external_data_files(self._path, data)
        missing = [f for f in external if not f.is_file()]
        if missing:
            raise ModelError(
                f"{self.name} keeps its weights in the external data file {missing[0].name}, which is "
                f"missing from {missing[0].parent}; copy it there together with the .onnx file"
            )
        self._providers = None if providers is None else list(providers)
        self._threads = threads
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._shapes: dict[tuple[int, int], tuple[int, ...]] = {}
        self._activations: dict[tuple[int, int], int] = {}
        # The hash of the file and its external data as a buffer: `identity()` (the state dict's
        # hash) then tells ONNX files apart, and so does that of any module holding this one
        # (a bioimage.io package with ONNX weights).
        self.register_buffer("onnx_sha256", torch.tensor(list(_digest(data, external)), dtype=torch.uint8))
        try:
            session = self._session("cpu")
        except Exception as exc:
            raise ModelError(f"{self.name} is not a readable ONNX model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        node = session.get_inputs()[0]
        self._input_name, self._output_name = node.name, session.get_outputs()[0].name
        self._input_type = np.float16 if node.type == "tensor(float16)" else np.float32
        shape = list(node.shape)
        if len(shape) != 4:
            raise ModelError(f"{self.name}: input {node.name!r} has shape {shape}; tilesegment "
                             "runs 2-d networks with (N, C, H, W) inputs")
        if not isinstance(shape[1], int):
            raise ModelError(f"{self.name}: the channel axis of input {node.name!r} is dynamic "
                             f"({shape[1]!r}); export the model with a fixed number of channels")
        if isinstance(shape[2], int) or isinstance(shape[3], int):
            raise ModelError(
                f"{self.name}: input {node.name!r} has fixed spatial axes {tuple(shape[2:])}, so "
                "tiles of other sizes cannot run; re-export with dynamic height and width, e.g. "
                "torch.onnx.export(..., dynamic_axes={'input': {0: 'n', 2: 'h', 3: 'w'}}) or "
                "ts.save_model(model, 'net.onnx', format='onnx')"
            )
        self.in_channels = int(shape[1])
        self._fixed_batch = shape[0] if isinstance(shape[0], int) else None
        meta = session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.normalization = _normalization(meta.get(NORMALIZATION_KEY), self.name)
        if geometry is None and GEOMETRY_KEY in meta:
            try:
                geometry = Geometry(**json.loads(meta[GEOMETRY_KEY]))
            except Exception as exc:
                raise ModelError(f"{self.name}: metadata {GEOMETRY_KEY} is invalid ({exc})") from None
        self.num_classes: Optional[int] = None
        self.geometry: Geometry = geometry if geometry is not None else self._probe()
        self.num_classes = int(self._output_shape(self.geometry.min_input)[1])

    # -- geometry ------------------------------------------------------------------------

    def _probe(self) -> Geometry:
        from .._probe import probe_geometry

        # The probe calls forward() on meta tensors; while `geometry` is unset those run the
        # network on zeros of that size (small sizes fail or finish fast).
        self.geometry = None  # type: ignore[assignment]
        geometry = probe_geometry(self, self.in_channels)
        if geometry.shrink == (0, 0):
            raise ModelError(
                f"{self.name} pads internally (its output is as large as its input), so its "
                "halo cannot be measured; declare it: OnnxModel(path, geometry=ts.Geometry(halo=..., "
                f"step={geometry.step[0]})), or store it with ts.save_model(..., format='onnx')"
            )
        return geometry

    def _output_shape(self, size: Sequence[int], batch: int = 1) -> tuple[int, ...]:
        """Output shape for an input of spatial `size`: from the geometry, or one real run."""
        size = (int(size[0]), int(size[1]))
        geometry = getattr(self, "geometry", None)
        classes = getattr(self, "num_classes", None)
        if geometry is not None and classes is not None and geometry.is_valid_input(size):
            return (batch, classes, *geometry.output_size(size))
        if size not in self._shapes:
            x = np.zeros((1, self.in_channels, *size), dtype=self._input_type)
            self._shapes[size] = tuple(int(s) for s in self._run_cpu(x).shape)
        return (batch, *self._shapes[size][1:])

    def activation_bytes(self, input_size: Sequence[int]) -> int:  # type: ignore[override]
        """Bytes of every intermediate tensor of the graph for one input of `input_size`.

        onnxruntime's layers are invisible to the meta-device trace that
        `tilesegment.executor.estimate_bytes_per_tile` runs for torch modules
        (it would count the output alone), so the ONNX graph gives the same
        sum: its shapes are inferred for this input (the ``onnx`` package's
        shape inference) and every tensor a node writes is counted, as the
        trace counts every layer's output. Tensors whose shape the inference
        cannot tell (crops computed from shapes at run time) are left out,
        as the trace leaves out torch functions that are not modules. Without
        the ``onnx`` package the bound is 64 float32 maps of the input, the
        count `estimate_bytes_per_tile` takes for a TorchScript part.
        """
        size = (int(input_size[0]), int(input_size[1]))
        if size not in self._activations:
            batch = self._fixed_batch or 1
            shape = (batch, self.in_channels, *size)
            self._activations[size] = _graph_activation_bytes(self._data, self._input_name, shape) // batch
        return self._activations[size]

    # -- sessions ------------------------------------------------------------------------

    def _session(self, device: str, precision: str = "fp32"):
        key = device if device == "cpu" else f"{device}/{precision}"
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = self._new_session(device, precision)
            return session

    def _new_session(self, device: str, precision: str):
        ort = _import_ort()
        options = ort.SessionOptions()
        options.log_severity_level = 4  # invalid sizes while probing are expected, not news
        if device == "cpu":
            options.intra_op_num_threads = self._threads or torch.get_num_threads()
            # Idle onnxruntime threads spin by default, taking the cores that the reader
            # and writer threads need between batches.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            providers: list[Any] = ["CPUExecutionProvider"]
        else:
            providers = self._gpu_providers(ort, device, precision)
        # Unpickled on a machine without the file, the bytes still serve models without external data.
        model = str(self._path) if self._path is not None and self._path.is_file() else self._data
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
        if device != "cpu":
            # onnxruntime falls back to the CPU, silently, when a provider's libraries fail to load.
            _check_loaded(self.name, device, [_provider_name(p) for p in providers], session.get_providers(),
                          ort.get_available_providers())
        return session

    def _gpu_providers(self, ort: Any, device: str, precision: str) -> list[Any]:
        """The providers to ask for on `device`, with the options that make `precision` hold."""
        from ..executor import default_budget

        index = int(device.split(":")[1]) if ":" in device else 0
        available = ort.get_available_providers()
        wanted = [p for p in self._providers or ["CUDAExecutionProvider"] if _provider_name(p) in available]
        if not wanted:
            raise ModelError(
                f"{self.name}: this onnxruntime has no CUDA provider (it has {', '.join(available)}); "
                "pip install onnxruntime-gpu instead of onnxruntime, or run on device='cpu'"
            )
        names = [_provider_name(p) for p in wanted]
        if precision == "fp32" and "CUDAExecutionProvider" in names and _version(ort) < (1, 18):
            raise ModelError(f"onnxruntime {ort.__version__} cannot run CUDA convolutions in true fp32 "
                             "(use_tf32 came with 1.18); pip install -U onnxruntime-gpu, or use precision='bf16'")
        if (precision == "fp32" and "TensorrtExecutionProvider" in names
                and os.environ.get("NVIDIA_TF32_OVERRIDE") != "0"):
            warnings.warn("TensorRT runs fp32 layers in TF32 and onnxruntime has no option to turn that off; "
                          "set NVIDIA_TF32_OVERRIDE=0 in the environment for true fp32", RuntimeWarning,
                          stacklevel=2)
        limit = default_budget(torch.device(device), "plan")
        providers: list[Any] = []
        for p in wanted:
            name = _provider_name(p)
            own = dict(p[1]) if isinstance(p, (tuple, list)) else {}
            # The caller's options win, but not over the device: each executor's session has its own.
            providers.append((name, {**_provider_options(name, precision, limit), **own, "device_id": str(index)}))
        return providers + ["CPUExecutionProvider"]

    @property
    def execution_providers(self) -> dict[str, dict[str, dict[str, str]]]:
        """What onnxruntime runs, per session made so far: providers and their options.

        Keys are ``"cpu"`` and ``"<device>/<precision>"`` (``"cuda:0/fp32"``);
        values map each provider that loaded to the options it runs with, as
        onnxruntime reports them (``use_tf32``, ``gpu_mem_limit``...). The
        sessions, and so this record, are shared with the model's replicas.
        """
        with self._lock:
            return {key: session.get_provider_options() for key, session in self._sessions.items()}

    # -- running -------------------------------------------------------------------------

    def _run_cpu(self, x: np.ndarray) -> np.ndarray:
        session = self._session("cpu")
        b, n = self._fixed_batch, len(x)
        if b is not None and n != b:
            # A model exported without a dynamic batch axis: run groups of its batch size,
            # the last one padded with zeros, and keep the outputs of the real inputs.
            x = np.concatenate([x, np.zeros((-n % b, *x.shape[1:]), x.dtype)])
            parts = [session.run([self._output_name], {self._input_name: x[i : i + b]})[0]
                     for i in range(0, len(x), b)]
            return np.concatenate(parts)[:n]
        return session.run([self._output_name], {self._input_name: x})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network on ``(N, C, H, W)``; returns ``(N, K, h, w)`` float32 logits."""
        if x.device.type == "meta":
            return torch.empty(self._output_shape(tuple(x.shape[-2:]), x.shape[0]), device="meta")
        if x.device.type == "cuda":
            return self._run_cuda(x)
        data = x.detach().to(torch.float32).contiguous().numpy()  # NCHW, as ONNX expects
        y = torch.from_numpy(self._run_cpu(data.astype(self._input_type, copy=False)))
        return y.float()

    def _run_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """IO binding: onnxruntime reads `x` and writes the result in device memory."""
        device = x.device
        session = self._session(f"cuda:{device.index or 0}", _autocast_precision(device.type))
        dtype = torch.float16 if self._input_type == np.float16 else torch.float32
        x = x.detach().to(dtype).contiguous()  # NCHW: channels-last strides are not ONNX's
        shape = self._output_shape(tuple(x.shape[-2:]), x.shape[0])
        b, n = self._fixed_batch, x.shape[0]
        if b is not None and n != b:  # groups of the fixed batch size, as on CPU
            x = torch.cat([x, x.new_zeros((-n % b, *x.shape[1:]))])
            return torch.cat([self._run_cuda(x[i : i + b]) for i in range(0, len(x), b)])[:n]
        out_dtype = torch.float16 if session.get_outputs()[0].type == "tensor(float16)" else torch.float32
        y = torch.empty(shape, dtype=out_dtype, device=device)
        binding = session.io_binding()
        binding.bind_input(self._input_name, "cuda", device.index or 0,
                           np.float16 if dtype == torch.float16 else np.float32,
                           tuple(x.shape), x.data_ptr())
        binding.bind_output(self._output_name, "cuda", device.index or 0,
                            np.float16 if out_dtype == torch.float16 else np.float32,
                            tuple(y.shape), y.data_ptr())
        # `x` was written on torch's stream and onnxruntime runs on its own: wait for the
        # upload first. Run() returns after onnxruntime's stream is synchronized, so `y` is
        # complete for any torch stream afterwards.
        torch.cuda.current_stream(device).synchronize()
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:
            if _is_out_of_memory(str(exc)):
                # Worded so the executor's out-of-memory handling halves the batch.
                raise RuntimeError(f"CUDA out of memory in onnxruntime: {exc}") from exc
            raise
        return y.float()

    # -- copies and pickling -------------------------------------------------------------

    def __deepcopy__(self, memo: dict) -> "OnnxModel":
        # Sessions cannot be copied; they are thread-safe and shared by the copies
        # (`replicate` deep-copies the model for each executor).
        new = self.__class__.__new__(self.__class__)
        for key, value in self.__dict__.items():
            # Module bookkeeping (hooks, buffers, shape cache) is copied; sessions are shared.
            new.__dict__[key] = value.copy() if isinstance(value, dict) and key != "_sessions" else value
        new._buffers = {k: v.clone() for k, v in self._buffers.items()}
        memo[id(self)] = new
        return new

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_sessions"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def extra_repr(self) -> str:
        return f"{self.name}, in_channels={self.in_channels}, geometry={self.geometry}"


#: Initializers with more elements than this are weights, which shape inference needs only the
#: shapes of; smaller ones may be shapes, axes or scales that it reads.
_SHAPE_DATA_ELEMENTS = 64


def _graph_activation_bytes(data: bytes, input_name: str, input_shape: Sequence[int]) -> int:
    """Sum of the bytes of every tensor the nodes of the ONNX model `data` write, for one input shape."""
    try:
        import onnx
    except ImportError:
        warnings.warn("without the onnx package an ONNX model's memory is estimated as 64 maps of its "
                      "input; pip install onnx for an estimate from its graph", RuntimeWarning, stacklevel=3)
        return 64 * 4 * math.prod(input_shape)
    proto = onnx.load_model_from_string(data)
    graph = proto.graph
    # Weights become typed inputs: shape inference copies the model, and needs only their shapes.
    inputs = {value.name for value in graph.input}
    weights = [t for t in graph.initializer if math.prod(t.dims) > _SHAPE_DATA_ELEMENTS]
    kept = [t for t in graph.initializer if math.prod(t.dims) <= _SHAPE_DATA_ELEMENTS]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                       for t in weights if t.name not in inputs)
    for value in graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            for dim, n in zip(dims, input_shape):
                dim.Clear()
                dim.dim_value = int(n)
    # Shapes stored by the exporter are symbolic ("h_out"); inferred afresh they are numbers.
    del graph.value_info[:]
    for value in graph.output:
        value.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True).graph
    constants = {name for node in inferred.node if node.op_type == "Constant" for name in node.output}
    total = 0
    for value in (*inferred.value_info, *inferred.output):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if value.name in constants or not tensor.HasField("shape") or None in dims:
            continue
        total += math.prod(dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
    return total


#: onnxruntime's out-of-memory errors, in lower case: its arena (BFCArena::AllocateRawInternal,
#: also when `gpu_mem_limit` is reached), CUDA's error 2 ("CUDA failure 2: out of memory",
#: TensorRT's "Cuda Error in allocate: 2 (out of memory)"), cuDNN's and cuBLAS's workspaces.
#: Narrow on purpose: device descriptions ("MemoryType:0") appear in errors of every kind.
_OUT_OF_MEMORY = ("failed to allocate memory", "out of memory", "cudnn_status_alloc_failed",
                  "cublas_status_alloc_failed")


def _is_out_of_memory(message: str) -> bool:
    """Whether an onnxruntime error `message` says that the device ran out of memory."""
    message = message.lower()
    return any(text in message for text in _OUT_OF_MEMORY)


def _provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else provider


def _version(ort: Any) -> tuple[int, ...]:
    return tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())


def _autocast_precision(device_type: str) -> str:
    """The precision the executor runs at: autocast's, or fp32 outside autocast.

    Autocast cannot reach inside onnxruntime; the providers' options carry it there.
    """
    if not torch.is_autocast_enabled(device_type):
        return "fp32"
    return "fp16" if torch.get_autocast_dtype(device_type) == torch.float16 else "bf16"


def _provider_options(name: str, precision: str, memory_limit: Optional[int]) -> dict[str, str]:
    """onnxruntime options of the GPU provider `name` for a run at `precision`.

    Parameters
    ----------
    name : str
        ``"CUDAExecutionProvider"`` or ``"TensorrtExecutionProvider"`` (others get none).
    precision : {"fp32", "bf16", "fp16"}
        fp32 turns TF32 off (onnxruntime's CUDA provider has it on by default),
        so that fp32 means IEEE fp32 as it does for torch models; bf16 and fp16
        allow TF32, and fp16 lets TensorRT build fp16 kernels.
    memory_limit : int, optional
        Bytes the CUDA provider's arena may grow to; it then grows by what each
        allocation needs rather than to the next power of two.

    Returns
    -------
    dict
        Option names to values, as strings (as onnxruntime reports them back).
    """
    if name == "CUDAExecutionProvider":
        options = {"use_tf32": "0" if precision == "fp32" else "1"}
        if memory_limit is not None:
            options.update(gpu_mem_limit=str(int(memory_limit)), arena_extend_strategy="kSameAsRequested")
        return options
    if name == "TensorrtExecutionProvider":
        return {"trt_fp16_enable": "1" if precision == "fp16" else "0"}
    return {}


def _check_loaded(model: str, device: str, requested: Sequence[str], loaded: Sequence[str],
                  available: Sequence[str]) -> None:
    """Refuse a session in which no requested GPU provider loaded; warn when only some did.

    onnxruntime lists a provider as available when it was built with it, and
    then, when the provider's libraries (CUDA, cuDNN, TensorRT) do not load,
    runs on the CPU with no more than a log line.

    Raises
    ------
    ModelError
        No GPU provider in `requested` is among the session's `loaded` ones.
    """
    gpu = [name for name in requested if name != "CPUExecutionProvider"]
    missing = [name for name in gpu if name not in loaded]
    if missing and len(missing) == len(gpu):
        raise ModelError(
            f"{model}: onnxruntime could not load {' or '.join(missing)} on {device} (its libraries are "
            "missing: onnxruntime-gpu needs CUDA 12 and cuDNN 9, e.g. pip install 'onnxruntime-gpu[cuda,cudnn]', "
            f"and TensorRT 10 for TensorRT) and would run on the CPU; available: {', '.join(available)}"
        )
    if missing:
        warnings.warn(f"{model}: onnxruntime could not load {', '.join(missing)} on {device}; running with "
                      f"{', '.join(name for name in gpu if name in loaded)}", RuntimeWarning, stacklevel=3)


def external_data_files(path: Path, data: bytes) -> list[Path]:
    """The external data files that the ONNX model `data`, stored at `path`, reads its weights from.

    The locations come from the model's tensors (the ``onnx`` package parses
    them). Without ``onnx``, the files beside the model whose names the
    model's bytes contain stand in: the locations are stored there verbatim.
    """
    if b"location" not in data:  # the key of every external data entry; spares parsing large models
        return []
    try:
        from onnx import load_model_from_string
        from onnx.external_data_helper import _get_all_tensors, uses_external_data
    except ImportError:
        return sorted(f for f in path.parent.iterdir()
                      if f != path and f.is_file() and f.name.encode() in data)
    try:
        proto = load_model_from_string(data)
    except Exception:
        return []  # not a protobuf: onnxruntime's own error says so when the session is made
    locations = {entry.value for tensor in _get_all_tensors(proto) if uses_external_data(tensor)
                 for entry in tensor.external_data if entry.key == "location"}
    return sorted(path.parent / location for location in locations)


def _digest(data: bytes, external: Sequence[Path]) -> bytes:
    """SHA-256 of a model and its external data files, so that a changed weights file is another model."""
    digest = hashlib.sha256(data)
    for f in external:
        digest.update(f.name.encode())
        with open(f, "rb") as stream:
            while block := stream.read(1 << 24):
                digest.update(block)
    return digest.digest()


def _normalization(text: Optional[str], name: str):
    if not text:
        return None
    try:
        mean, std = json.loads(text)
        return (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    except Exception as exc:
        raise ModelError(f"{name}: metadata {NORMALIZATION_KEY} is invalid ({exc})") from None


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    in_channels: Optional[int] = None,
    geometry: Optional[Geometry] = None,
    opset: Optional[int] = None,
    dynamo: bool = False,
    **metadata: Any,
) -> Path:
    """Export `model` to ONNX with dynamic batch and spatial axes and its geometry inside.

    Parameters
    ----------
    model : torch.nn.Module
        The network (any module; its geometry and normalization from
        `tilesegment.models.describe`).
    path : str or path-like
        Destination ``*.onnx`` file.
    in_channels : int, optional
        Input channels (default: the model's, `tilesegment.models.describe`).
    geometry : Geometry, optional
        Stored in the file's metadata (default: ``Geometry.of(model)``), so
        loading needs no probe.
    opset : int, optional
        ONNX opset (default: the exporter's).
    dynamo : bool
        Use torch's ``torch.export``-based exporter (needs ``onnxscript``)
        instead of the TorchScript-based one (the default here: no extra
        dependency, and it exports a U-Net in under a second).
    **metadata
        Extra facts stored as JSON strings in the model's ``metadata_props``.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    try:
        import onnx
    except ImportError:
        raise ModelError("exporting ONNX needs the onnx package: pip install onnx") from None
    path = Path(path)
    facts = describe(model.eval())
    geometry = facts.geometry if geometry is None else geometry
    in_channels = in_channels or facts.in_channels
    if in_channels is None:
        raise ModelError("cannot tell the model's input channels; pass in_channels=")
    example = torch.zeros(1, in_channels, *geometry.min_input)
    kwargs: dict[str, Any] = dict(input_names=["input"], output_names=["output"])
    if opset is not None:
        kwargs["opset_version"] = opset
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        if dynamo:
            n, h, w = (torch.export.Dim(name) for name in ("n", "h", "w"))
            torch.onnx.export(model, (example,), str(path), dynamo=True,
                              dynamic_shapes={next(iter(_forward_args(model))): {0: n, 2: h, 3: w}},
                              **kwargs)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False,
                              dynamic_axes={"input": {0: "n", 2: "h", 3: "w"},
                                            "output": {0: "n", 2: "h_out", 3: "w_out"}}, **kwargs)
    proto = onnx.load(str(path))
    props = {GEOMETRY_KEY: json.dumps({"halo": list(geometry.halo), "step": list(geometry.step),
                                       "min_input": list(geometry.min_input),
                                       "shrink": list(geometry.shrink)})}
    normalization = facts.normalization
    if normalization is not None:
        props[NORMALIZATION_KEY] = json.dumps([list(normalization[0]), list(normalization[1])])
    props.update({f"tilesegment.{k}": json.dumps(v) for k, v in metadata.items()})
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def _forward_args(model: nn.Module):
    import inspect

    return inspect.signature(model.forward).parameters
