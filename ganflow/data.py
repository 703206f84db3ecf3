"""Real images: the sources, the albumentations transforms, the prepared dataset format, the loader.

Sources (``data.source``), each turned into uint8 (H, W, C) images with C = ``data.channels``:
  digits  scikit-learn's bundled 1,797 labelled 8x8 digits (no download)
  folder  an image folder; first-level subfolders name the classes, a flat folder is unlabelled
  npz     a .npz file with ``images`` (uint8, NHWC or NHW) and optional ``labels``/``class_names``

The prepared dataset is a directory of image shards ``images-00000.npy``, ... (uint8, n x S x S x C,
at most ``data.shard_mb`` each, in source order), ``labels.npy`` (int64, N; -1 when unlabelled),
``split.npy`` (uint8, N: 0 = train, 1 = validation, 2 = test) and ``manifest.json`` (the shards, their
counts and the sha256 of every file). A small dataset is one shard. The shards are written as the
source is decoded, so preparing needs memory for one shard, not for the dataset; a reader
streams them (Ray Data) or reads single images from them (``PreparedDataset``). The split is made once, here: the GAN and the encoder train on the train part
only; the validation part chooses (the exported epoch, the sweep, the champion) and the test part
only reports (the evaluate stage is its one reader). It is written to a temporary sibling and
renamed into place, so an interrupted prepare never leaves half a dataset, and the same input
and params give byte-identical files.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from ganflow.artifacts import FORMAT, LABELS, MANIFEST, PARTS, SHARD_NAME, SPLIT, TEST, TRAIN, VALIDATION
from ganflow.atomic import atomic_dir, file_sha256, sha256_hex, write_bytes
from ganflow.config import Config, DataConfig
from ganflow.errors import DataError, first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# the data.* keys that decide the prepared bytes; dvc.yaml's prepare stage lists exactly these
PREPARE_KEYS = (
    "source",
    "path",
    "image_size",
    "channels",
    "resize",
    "max_bad_fraction",
    "max_image_pixels",
    "validation_fraction",
    "test_fraction",
    "shard_mb",
)
SPLIT_SEED = 20200  # fixed: the split is part of the data, not of a run


@dataclass
class RawSource:
    """Images read from a source: each uint8 (H, W, C), C = data.channels; already at the
    training shape when ``resized`` (the folder source resizes as it decodes)."""

    # iterated once, by prepare; a folder's generator fills labels, content_hash and skipped as it
    # goes and raises DataError at its end when too many files failed
    images: Iterable[np.ndarray]
    labels: np.ndarray | None  # int64 (N,) indices into class_names, or None when unlabelled
    class_names: list[str]
    content_hash: str  # sha256 over the source's bytes
    files_total: int = 0  # files seen (folder source)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file": ..., "reason": ...}
    resized: bool = False
    # a folder writes its own shards (decoded in parallel, each shard by the process that decoded
    # it) into the folder given: [{"file", "count", "sha256"}] in order; ``images`` is then empty
    write_shards: Callable[[Path], list[dict[str, Any]]] | None = None


# ---------------------------------------------------------------------------------------------
# pixels


def to_channels(image: Image.Image, channels: int) -> np.ndarray:
    """Any PIL image -> uint8 (H, W, channels). Transparency is composited onto black."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit grayscale: scale the used range to 8 bits instead of clipping at 255
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max() if arr.size and arr.max() > 0 else 1.0
        image = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba).convert("RGB")
    if channels == 1:
        return np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def array_to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, H, W, C in {1, 3, 4}) -> uint8 (N, H, W, channels), as to_channels does per image."""
    n, h, w, c = images.shape
    if c == channels:
        return images
    out = np.empty((n, h, w, channels), dtype=np.uint8)
    for i in range(n):
        pixels = images[i, :, :, 0] if c == 1 else images[i]
        out[i] = to_channels(Image.fromarray(np.ascontiguousarray(pixels)), channels)  # L, RGB or RGBA
    return out


def decode_image(data: bytes, channels: int, max_pixels: int) -> np.ndarray:
    """Bytes of one image file -> uint8 (H, W, channels). Raises ValueError with a short reason."""
    if not data:
        raise ValueError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # Pillow refuses from the header alone, before our own limit can name the size
            limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
            raise ValueError(f"more than {limit} pixels (data.max_image_pixels, or Pillow's own limit)") from None
        except (OSError, SyntaxError, ValueError):
            raise ValueError("not a readable image") from None
        w, h = image.size
        if w * h > max_pixels:
            raise ValueError(f"{w}x{h} is more than data.max_image_pixels={max_pixels}")
        if w == 0 or h == 0:
            raise ValueError("image has no pixels")
        try:
            image.load()  # decodes all pixel data: a truncated file fails here
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"corrupt image ({first_line(exc)})") from None
    return to_channels(image, channels)


# ---------------------------------------------------------------------------------------------
# sources


def load_digits_source(data: DataConfig) -> RawSource:
    """scikit-learn's bundled 8x8 digits, values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    images = array_to_channels(gray[:, :, :, None], data.channels)
    labels = digits.target.astype(np.int64)
    content_hash = sha256_hex(b"sklearn-digits", gray.tobytes(), labels.tobytes())
    return RawSource(
        images=images,
        labels=labels,
        class_names=[str(i) for i in range(10)],
        content_hash=content_hash,
        files_total=0,
    )


def _folder_files(root: Path) -> list[str]:
    """Every non-hidden file under root, as a posix path relative to it, in a stable order
    (strings, not Path objects: a folder of a million files is listed in well under 100 MB)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        files.extend(prefix + f for f in filenames if not f.startswith("."))
    return sorted(files)


def _is_image(rel: str) -> bool:
    return os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS


def load_folder_source(data: DataConfig) -> RawSource:
    root = data.path
    if not root.exists():
        raise DataError(f"data.path: folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data.path: not a folder: {root} (use data.source: npz for a .npz file)")
    files = _folder_files(root)
    if not files:
        raise DataError(f"data.path: folder is empty: {root}")

    image_files = [f for f in files if _is_image(f)]
    if not image_files:
        raise DataError(
            f"data.path: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {root} ({len(files)} other files)"
        )
    top_level = [f for f in image_files if "/" not in f]
    nested = [f for f in image_files if "/" in f]
    labelled = bool(nested)
    if labelled and top_level:
        raise DataError(
            f"data.path: {root} mixes class subfolders with {len(top_level)} images at the top "
            f"(e.g. {top_level[0]}): move them into a class folder or remove the subfolders"
        )
    class_names = sorted({f.split("/")[0] for f in nested}) if labelled else []
    class_index = {name: i for i, name in enumerate(class_names)}

    raw = RawSource(
        images=[], labels=None, class_names=class_names, content_hash="", files_total=len(files), resized=True
    )
    raw.write_shards = functools.partial(
        _write_folder_shards, raw, root, files, class_index if labelled else None, data
    )
    return raw


FILES_PER_SHARD = 1024  # a folder's shard: the usable images of at most this many consecutive files


def shard_ranges(files: int, data: DataConfig) -> list[tuple[int, int]]:
    """The folder's files cut into consecutive ranges, one shard each (the unit of parallel work):
    at most FILES_PER_SHARD files, and no more than a shard of data.shard_mb holds. Depends on
    the file count and the params only, so the shards are the same however many processes decode."""
    step = max(1, min(FILES_PER_SHARD, images_per_shard(data)))
    return [(i, min(i + step, files)) for i in range(0, files, step)]


def _write_folder_shards(
    raw: RawSource, root: Path, files: list[str], class_index: dict[str, int] | None, data: DataConfig, folder: Path
) -> list[dict[str, Any]]:
    """Decode the folder's usable images to the training shape and write them into ``folder`` as
    shards (one per shard_ranges range that has any), in parallel; fills ``raw``'s labels, content
    hash and skipped-file report, and refuses the folder at the end when too many image files
    could not be read (prepare then keeps nothing of what was written). What comes back per file
    is its 32-byte sha256 (and a reason for a skipped one), so the stage's memory hardly grows
    with the folder."""
    ranges = shard_ranges(len(files), data)
    tasks = [(str(root), files[a:b], str(folder / f".part-{k:05d}.npy")) for k, (a, b) in enumerate(ranges)]
    bar = tqdm(total=len(files), desc="prepare: reading images", unit="file", disable=None, file=sys.stderr)
    try:
        results = _run_shard_tasks(tasks, data, lambda k: bar.update(ranges[k][1] - ranges[k][0]))
    finally:
        bar.close()

    digest = hashlib.sha256(b"folder")
    labels: list[int] = []
    shards: list[dict[str, Any]] = []
    used = 0
    for (a, b), (_, _, part), (digests, skipped, shard) in zip(ranges, tasks, results):
        reasons = dict(skipped)
        for i in range(b - a):
            rel = files[a + i]
            digest.update(rel.encode() + b"\0" + digests[32 * i : 32 * (i + 1)])
            if i in reasons:
                raw.skipped.append({"file": rel, "reason": reasons[i]})
                continue
            used += 1
            if class_index is not None:
                labels.append(class_index[rel.split("/")[0]])
        if shard is not None:  # named in order: a range without a usable image leaves no gap
            name = SHARD_NAME.format(len(shards))
            os.replace(part, folder / name)
            shards.append({"file": name, **shard})

    images_total = sum(map(_is_image, files))
    bad = images_total - used
    unreadable = [s for s in raw.skipped if s["reason"] != "not an image file"]
    examples = ", ".join(f"{s['file']} ({s['reason']})" for s in unreadable[:3])
    if not used:
        raise DataError(f"data.path: no usable images in {root}: all {bad} image files failed: {examples}")
    if bad / images_total > data.max_bad_fraction:
        raise DataError(
            f"data.path: {bad} of {images_total} image files in {root} could not be read, "
            f"more than data.max_bad_fraction={data.max_bad_fraction:g}: {examples}"
        )
    raw.labels = np.asarray(labels, dtype=np.int64) if class_index is not None else None
    raw.content_hash = digest.hexdigest()
    return shards


def _decode_shard(
    root: str, files: list[str], data: DataConfig
) -> tuple[bytes, list[tuple[int, str]], np.ndarray | None]:
    """Read, hash, decode and resize one range of files (paths relative to ``root``). Returns the
    files' sha256s (32 bytes each, concatenated), (index, reason) per skipped file, and the usable
    images as one (N, H, W, C) uint8 array (None when no file was usable)."""
    resize = build_resize_transform(data)
    shape = (data.image_size, data.image_size, data.channels)
    digests, skipped, images = bytearray(), [], []
    for i, rel in enumerate(files):
        payload = (Path(root) / rel).read_bytes()
        digests += hashlib.sha256(payload).digest()
        try:
            if not _is_image(rel):
                raise ValueError("not an image file")
            image = decode_image(payload, data.channels, data.max_image_pixels)
        except ValueError as exc:
            skipped.append((i, str(exc)))
            continue
        images.append(resize(image=image)["image"].reshape(shape))
    return bytes(digests), skipped, np.stack(images) if images else None


def _shard_result(
    digests: bytes, skipped: list[tuple[int, str]], images: np.ndarray | None, out: str
) -> tuple[bytes, list[tuple[int, str]], dict[str, Any] | None]:
    """A decoded range written to ``out`` as one .npy shard (nothing when it has no usable image):
    (sha256s, skipped, {"count", "sha256"} of the shard or None)."""
    if images is None:
        return digests, skipped, None
    return digests, skipped, {"count": len(images), "sha256": _save_npy(Path(out), images)}


def _write_shard(
    root: str, files: list[str], out: str, data: DataConfig
) -> tuple[bytes, list[tuple[int, str]], dict[str, Any] | None]:
    """_decode_shard, then the shard written to ``out`` by the process that decoded it."""
    return _shard_result(*_decode_shard(root, files, data), out)


def prepare_processes(data: DataConfig, tasks: int) -> int:
    """Processes that decode an image folder of ``tasks`` shards beside the stage's own, which
    decodes too (0: the stage alone). auto: one per core but the stage's."""
    wanted = (os.cpu_count() or 1) - 1 if data.prepare_workers == "auto" else data.prepare_workers
    return 0 if wanted < 1 or tasks <= 1 else min(wanted, tasks - 1)


def _decoder_context():
    """fork where there is one: a forked decoder starts at once, while a spawned one first imports
    torch, albumentations and cv2 again (seconds on a loaded 2-core machine: the whole job at 10k
    images). Safe here: the pool starts before this process has run any torch or cv2 work of its
    own in the stage, the stage's other threads only wait on signals and pipes, and
    _decoder_started resets what a child inherits. Elsewhere (macOS, Windows) spawn."""
    import multiprocessing

    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _decoder_started() -> None:
    """In each decoding process: the default signal handling (the stage's handlers and its wakeup
    pipe belong to the stage; the stage stops its pool itself) and single-threaded cv2 (the
    processes are the parallelism; a forked copy of the parent's cv2 thread pool has no threads)."""
    import signal

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the stage decides
    cv2.setNumThreads(0)


def _run_shard_tasks(
    tasks: list[tuple[str, list[str], str]], data: DataConfig, progress: Callable[[int], None]
) -> list[Any]:
    """_write_shard over every task; results in task order. The worker processes take tasks from
    the front while this process takes them from the back, and the two ends meet without a long
    tail. Each worker has one task at a time, and a finished one is replaced at once from the
    pool's own thread (a few ms). Refilled only between this process's own tasks, a worker sat
    idle for up to one task's time (0.27 s of a 1.9 s prepare of 10,000 images); a second task
    queued per worker left one more task's imbalance at the end."""
    from ganflow.raycluster import on_ray_cluster

    if on_ray_cluster():
        return _run_shard_tasks_on_ray(tasks, data, progress)
    results: list[Any] = [None] * len(tasks)
    processes = prepare_processes(data, len(tasks))
    if processes == 0:
        for k, task in enumerate(tasks):
            results[k] = _write_shard(*task, data)
            progress(k)
        return results

    import concurrent.futures
    import threading

    pool = concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=_decoder_context(), initializer=_decoder_started
    )
    lock = threading.Lock()
    ends = {"front": 0, "back": len(tasks), "open": True}  # tasks front..back-1 are not taken yet
    submitted: dict[concurrent.futures.Future, int] = {}
    reported: set[int] = set()

    def submit_front(_: object = None) -> None:  # also the done-callback: runs in the pool's thread
        with lock:
            if not ends["open"] or ends["front"] >= ends["back"]:
                return
            k = ends["front"]
            ends["front"] += 1
            future = pool.submit(_write_shard, *tasks[k], data)
            submitted[future] = k
        future.add_done_callback(submit_front)

    def take_back() -> int | None:
        with lock:
            if ends["front"] >= ends["back"]:
                return None
            ends["back"] -= 1
            return ends["back"]

    def collect(wait: bool) -> None:
        with lock:
            pending = [f for f, k in submitted.items() if k not in reported]
        if wait:
            concurrent.futures.wait(pending)
        for future in pending:
            if future.done():
                results[submitted[future]] = future.result()  # a worker's error is raised here
                reported.add(submitted[future])
                progress(submitted[future])

    try:
        for _ in range(processes):
            submit_front()
        while (k := take_back()) is not None:
            results[k] = _write_shard(*tasks[k], data)
            progress(k)
            collect(wait=False)
        collect(wait=True)  # every task is taken: the submitted ones are all there is
        return results
    finally:
        with lock:
            ends["open"] = False
        pool.shutdown(cancel_futures=True)


NO_CPU_NOTICE_S = 30.0  # no shard decoded for this long on a cluster without CPUs: say what it waits for


def _run_shard_tasks_on_ray(
    tasks: list[tuple[str, list[str], str]], data: DataConfig, progress: Callable[[int], None]
) -> list[Any]:
    """The shard tasks as Ray tasks on the cluster this process joins (RAY_ADDRESS: set by hand,
    or by Ray for a job's driver, which is how prepare runs when cluster.address is set;
    data.prepare_workers does not apply: the cluster's CPUs are the workers), one
    CPU each, spread over the nodes; every node must see data.path at the same path. Each task
    returns its decoded range and this process writes the shard, so the output is the same bytes
    as a local prepare's. At most two tasks per cluster CPU are in flight: the object store holds
    a few shards at a time, never the data set."""
    import ray

    from ganflow.raycluster import init_ray

    init_ray()
    decode = ray.remote(num_cpus=1, scheduling_strategy="SPREAD", max_retries=2)(_decode_shard_on_node)
    data_ref = ray.put(data)
    results: list[Any] = [None] * len(tasks)
    inflight: dict[Any, int] = {}
    nodes: set[str] = set()
    queued = 0
    said_no_cpu = False
    try:
        while queued < len(tasks) or inflight:
            # the cluster's CPUs now (an autoscaler may have added nodes since the last refill)
            limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 0)))
            while queued < len(tasks) and len(inflight) < limit:
                root, files, _ = tasks[queued]
                inflight[decode.remote(root, files, data_ref)] = queued
                queued += 1
            # fetch_local=False: a result comes to this node only when it is written, one at a time
            ready, _ = ray.wait(list(inflight), num_returns=1, fetch_local=False, timeout=NO_CPU_NOTICE_S)
            if not ready:
                if not said_no_cpu and not ray.cluster_resources().get("CPU", 0):
                    # e.g. a head with num-cpus 0 (infra/ray) before the autoscaler adds a worker
                    print(
                        "prepare: the Ray cluster has no CPU for the decoding tasks yet; waiting for a node "
                        "to join (an autoscaler adds one; without one, add a node or stop the job)",
                        file=sys.stderr,
                        flush=True,
                    )
                    said_no_cpu = True
                continue
            (done,) = ready
            k = inflight.pop(done)
            try:
                node, digests, skipped, images = ray.get(done)
            except ray.exceptions.RayError as exc:
                cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
                hint = " (every node must see data.path at the same path)" if isinstance(cause, OSError) else ""
                raise DataError(
                    f"data.path: decoding {tasks[k][0]} on the Ray cluster failed: {first_line(cause)}{hint}"
                ) from None
            nodes.add(node)
            results[k] = _shard_result(digests, skipped, images, tasks[k][2])
            del done, images
            progress(k)
    finally:
        for ref in inflight:
            ray.cancel(ref, force=True)
    print(
        f"prepare: decoded {len(tasks)} shards with Ray tasks on {len(nodes)} node(s) of the cluster",
        file=sys.stderr,
        flush=True,
    )
    return results


def _decode_shard_on_node(
    root: str, files: list[str], data: DataConfig
) -> tuple[str, bytes, list[tuple[int, str]], np.ndarray | None]:
    """_decode_shard in a Ray task, with the id of the node it ran on."""
    import ray

    cv2.setNumThreads(0)  # the tasks are the parallelism
    return (ray.get_runtime_context().get_node_id(), *_decode_shard(root, files, data))


def load_npz_source(data: DataConfig) -> RawSource:
    path = data.path
    if not path.is_file():
        raise DataError(f"data.path: .npz file not found: {path}")
    raw = path.read_bytes()
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"data.path: {path}: not a readable .npz file ({exc})") from None
    if "images" not in arrays:
        raise DataError(f"data.path: {path}: no 'images' array (found: {', '.join(arrays) or 'none'})")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise DataError(f"data.path: {path}: 'images' must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, :, :, None]  # (N, H, W) grayscale -> (N, H, W, 1)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] == 0:
        raise DataError(
            f"data.path: {path}: 'images' must be (N, H, W) or (N, H, W, C) with C in 1, 3, 4 "
            f"and N > 0, got shape {images.shape}"
        )
    labels = class_names = None
    if "labels" in arrays:
        labels = arrays["labels"]
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"data.path: {path}: 'labels' must be integers of shape ({images.shape[0]},), "
                f"got {labels.dtype} {labels.shape}"
            )
        values = sorted(int(v) for v in np.unique(labels))
        if "class_names" in arrays:
            class_names = [str(n) for n in arrays["class_names"]]
            if values[0] < 0 or values[-1] >= len(class_names):
                raise DataError(f"data.path: {path}: labels must index class_names (0..{len(class_names) - 1})")
            labels = labels.astype(np.int64)
        else:
            class_names = [str(v) for v in values]
            remap = {v: i for i, v in enumerate(values)}
            labels = np.asarray([remap[int(v)] for v in labels], dtype=np.int64)
    converted = array_to_channels(np.ascontiguousarray(images), data.channels)
    return RawSource(
        images=converted,
        labels=labels,
        class_names=class_names or [],
        content_hash=sha256_hex(b"npz", raw),
    )


# A choice is a small dict a reader can grep.
SOURCES: dict[str, Callable[[DataConfig], RawSource]] = {
    "digits": load_digits_source,
    "folder": load_folder_source,
    "npz": load_npz_source,
}


# ---------------------------------------------------------------------------------------------
# transforms


def build_resize_transform(data: DataConfig) -> A.Compose:
    """Deterministic: any (H, W, C) uint8 image -> (S, S, C), S = data.image_size."""
    size = data.image_size
    interp = cv2.INTER_LINEAR
    steps: dict[str, list[A.BasicTransform]] = {
        "crop": [
            A.SmallestMaxSize(max_size=size, interpolation=interp, area_for_downscale="image"),
            A.CenterCrop(height=size, width=size),
        ],
        "pad": [
            A.LongestMaxSize(max_size=size, interpolation=interp, area_for_downscale="image"),
            A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=0),
        ],
        "stretch": [A.Resize(height=size, width=size, interpolation=interp, area_for_downscale="image")],
    }
    return A.Compose(steps[data.resize], seed=0)


# ---------------------------------------------------------------------------------------------
# the prepare stage


@dataclass
class PrepareSummary:
    path: Path
    count: int
    shape: tuple[int, int, int]
    class_names: list[str]
    skipped: int
    source_hash: str


def prepare(cfg: Config) -> PrepareSummary:
    """Read ``data.source``, bring every image to the training shape, write the prepared dataset
    shard by shard into a temporary sibling of ``paths.prepared``, then swap it into place."""
    data = cfg.data
    raw = SOURCES[data.source](data)
    resize = build_resize_transform(data)
    shape = (data.image_size, data.image_size, data.channels)
    with atomic_dir(cfg.paths.prepared) as tmp:
        if raw.write_shards is not None:
            shards = raw.write_shards(tmp)
        else:
            writer = ShardWriter(tmp, shape, images_per_shard(data))
            for image in raw.images:
                writer.add(image if raw.resized else resize(image=image)["image"].reshape(shape))
            shards = writer.close()
        count = sum(shard["count"] for shard in shards)
        labels = raw.labels if raw.labels is not None else np.full(count, -1, dtype=np.int64)
        split = three_way_split(labels, data.validation_fraction, data.test_fraction)
        _save_npy(tmp / LABELS, labels)
        _save_npy(tmp / SPLIT, split)

        params = {key: getattr(data, key) for key in PREPARE_KEYS}
        params["path"] = cfg.relative(data.path) if data.source != "digits" else None
        files = {shard["file"]: shard["sha256"] for shard in shards}
        files.update({n: file_sha256(tmp / n) for n in (LABELS, SPLIT)})
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "source": data.source,
            "source_hash": raw.content_hash,
            "count": int(count),
            "shape": list(shape),  # (H, W, C)
            "shards": [{"file": shard["file"], "count": shard["count"]} for shard in shards],
            "images_sha256": images_digest(shards),
            "files": files,
            "labelled": raw.labels is not None,
            "class_names": raw.class_names,
            "class_counts": {name: int((labels == i).sum()) for i, name in enumerate(raw.class_names)},
            "files_total": raw.files_total,
            "skipped_count": len(raw.skipped),
            "skipped": raw.skipped,
            "params": params,
            "split": split_summary(split, labels, raw.class_names, data),
        }
        write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return PrepareSummary(
        path=cfg.paths.prepared,
        count=count,
        shape=shape,
        class_names=raw.class_names,
        skipped=len(raw.skipped),
        source_hash=raw.content_hash,
    )


def images_per_shard(data: DataConfig) -> int:
    """Images per shard: as many as fit in ``data.shard_mb`` (at least one)."""
    per_image = data.image_size * data.image_size * data.channels
    return max(1, int(data.shard_mb * 2**20) // per_image)


class ShardWriter:
    """Collects images at the training shape and writes every ``per_shard`` of them as one
    ``images-NNNNN.npy``: one shard in memory at a time."""

    def __init__(self, folder: Path, shape: tuple[int, int, int], per_shard: int):
        self.folder, self.shape, self.per_shard = folder, shape, per_shard
        self.buffer = np.empty((per_shard, *shape), dtype=np.uint8)
        self.filled = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, image: np.ndarray) -> None:
        self.buffer[self.filled] = image
        self.filled += 1
        if self.filled == self.per_shard:
            self._flush()

    def _flush(self) -> None:
        name = SHARD_NAME.format(len(self.shards))
        sha = _save_npy(self.folder / name, self.buffer[: self.filled])
        self.shards.append({"file": name, "count": self.filled, "sha256": sha})
        self.filled = 0

    def close(self) -> list[dict[str, Any]]:
        """{"file", "count", "sha256"} per shard written. Refuses an empty source."""
        if self.filled:
            self._flush()
        if not self.shards:
            raise DataError("the data source gave no images")
        return self.shards


def images_digest(shards: list[dict[str, Any]]) -> str:
    """One hash for all the prepared images: over the shards' names, counts and sha256s."""
    return sha256_hex(*(f"{s['file']}\0{s['count']}\0{s['sha256']}\n".encode() for s in shards))


def three_way_split(labels: np.ndarray, validation: float, test: float) -> np.ndarray:
    """uint8 (N,): per class (all images when unlabelled, labels -1), round(validation * n)
    images VALIDATION, round(test * n) TEST, the rest TRAIN; a class of three or more images keeps
    at least one in each part. Stratified and deterministic: the same labels and fractions give
    the same split."""
    rng = np.random.default_rng(SPLIT_SEED)
    split = np.full(len(labels), TRAIN, dtype=np.uint8)
    for value in np.unique(labels):  # sorted: the same order every run
        members = rng.permutation(np.flatnonzero(labels == value))
        n_val, n_test = int(round(validation * len(members))), int(round(test * len(members)))
        if len(members) >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
            while n_val + n_test > len(members) - 1:  # the train part keeps one
                if n_val >= n_test:
                    n_val -= 1
                else:
                    n_test -= 1
        split[members[:n_val]] = VALIDATION
        split[members[n_val : n_val + n_test]] = TEST
    return split


def split_summary(split: np.ndarray, labels: np.ndarray, class_names: list[str], data: DataConfig) -> dict[str, Any]:
    """The manifest's record of the split: fractions, sizes and class counts per part."""
    out: dict[str, Any] = {"validation_fraction": data.validation_fraction, "test_fraction": data.test_fraction}
    for part in ("train", "validation", "test"):
        inside = split == PARTS[part]
        out[part] = int(inside.sum())
        out[f"{part}_class_counts"] = {name: int(((labels == i) & inside).sum()) for i, name in enumerate(class_names)}
    return out


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as .npy; returns the sha256 of the file's bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(path, buf.getvalue())
    return hashlib.sha256(buf.getbuffer()).hexdigest()
