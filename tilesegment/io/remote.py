"""Remote images and outputs (``s3://``, ``gs://``, ``https://``...) through fsspec.

Everything remote goes through `fsspec <https://filesystem-spec.readthedocs.io>`_:
the protocol's package (s3fs, gcsfs, aiohttp for http) finds credentials and
endpoints the usual way (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``~/.aws``,
``GOOGLE_APPLICATION_CREDENTIALS``, fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>``
variables), and ``storage_options`` pass extra arguments to its filesystem.
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import InputError, UsageError

__all__ = ["is_url", "filesystem", "filesystem_options", "open_remote_file", "url_name", "join", "BLOCK_SIZE"]

#: Bytes fetched per range request of a remote TIFF when a read misses the cache: large
#: enough to take a run of tiles at once, small enough that reading a region of a slide
#: fetches a small part of it. ``storage_options={"block_size": N}`` changes it.
BLOCK_SIZE = 1 << 20

_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp",
             "https": "aiohttp", "az": "adlfs", "abfs": "adlfs"}


def is_url(value: Any) -> bool:
    """Whether `value` is a URL string such as ``s3://bucket/slide.svs`` (not a local path)."""
    return isinstance(value, str) and "://" in value


def url_name(url: str) -> str:
    """The last part of a URL's path: what to call it in messages and outputs.

    The query and fragment are dropped: a pre-signed URL's carries credentials,
    which must not end up in outputs or messages, and changes at each signing.
    """
    from urllib.parse import urlsplit

    return urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]


def filesystem_options(storage_options: Optional[dict]) -> dict:
    """`storage_options` as fsspec takes them: without ``block_size``, which is ours.

    ``block_size`` sizes the range requests of a remote TIFF (`open_remote_file`);
    fsspec filesystems would refuse it, or pass it on to their HTTP client.

    Parameters
    ----------
    storage_options : dict, optional
        The user's options (None: none).

    Returns
    -------
    dict
        A new dict; `storage_options` is not changed.
    """
    return {k: v for k, v in (storage_options or {}).items() if k != "block_size"}


def filesystem(url: str, storage_options: Optional[dict] = None, *, error=UsageError):
    """``(fsspec filesystem, path inside it)`` for `url`; a clear `error` when that fails.

    A missing protocol package is named with its pip command.
    """
    import fsspec

    options = filesystem_options(storage_options)
    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError:
        package = _PACKAGES.get(protocol, f"the fsspec implementation for {protocol}://")
        raise error(f"{url!r} needs {package}: pip install {package}") from None
    except ValueError as exc:
        raise error(f"{url!r}: {exc}") from None


def open_remote_file(url: str, storage_options: Optional[dict] = None):
    """Open `url` for reading in ranges: a seekable file that fetches only what is read.

    Reads that miss go out as range requests of ``block_size`` bytes
    (`BLOCK_SIZE` unless ``storage_options["block_size"]`` says otherwise).

    Raises
    ------
    InputError
        If the object does not exist, cannot be reached, or its protocol's
        package is missing.
    """
    block_size = int((storage_options or {}).get("block_size", BLOCK_SIZE))
    fs, path = filesystem(url, storage_options, error=InputError)
    try:
        return fs.open(path, "rb", block_size=block_size, cache_type="readahead")
    except FileNotFoundError:
        raise InputError(f"input {url!r} does not exist; check the URL") from None
    except PermissionError as exc:
        raise InputError(f"input {url!r} is not readable with these credentials ({exc}); set "
                         "them in the environment (e.g. AWS_PROFILE) or storage_options") from None
    except OSError as exc:
        raise InputError(f"cannot open {url!r} ({type(exc).__name__}: {exc}); check the URL, the "
                         "endpoint (AWS_ENDPOINT_URL) and the network") from None


def join(root: str, *parts: str) -> str:
    """`root` and `parts` joined with "/" (paths inside an fsspec filesystem)."""
    return "/".join([root.rstrip("/"), *parts])

