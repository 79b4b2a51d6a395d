"""The machine and the search's places: library versions, devices, and whether the Ray cluster, the
tracking store, the storage and the data set answer. Ray, MLflow and pyarrow are imported only by the
checks that use them, and a check whose library is not installed is skipped, saying so."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import torch

from reid_tune.datasets import load_csv, load_image
from reid_tune.doctor.report import FAIL, PASS, SKIPPED, Result
from reid_tune.doctor.target import Target
from reid_tune.errors import ReidTuneError
from reid_tune.vocabulary import one_line

GIB = 2**30
IMAGES_SAMPLED = 16  # per list, spread evenly over it
CONNECT_TIMEOUT_S = 5.0
FRAMEWORKS = (("Ray", "ray"), ("Optuna", "optuna"), ("MLflow", "mlflow"), ("pyarrow", "pyarrow"))


# ---------------------------------------------------------------- versions and devices


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> list[tuple[str, str]]:
    """Python, torch with its CUDA and cuDNN, torchvision, and the search's frameworks (read from their
    metadata: nothing is imported)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rows = [
        ("Python", platform.python_version()),
        ("reid-tune", _version("reid-tune")),
        ("torch", torch.__version__),
        (
            "CUDA",
            f"{torch.version.cuda} (torch's build)" if torch.version.cuda else "none (torch's CPU build)",
        ),
        ("cuDNN", f"{cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}" if cudnn else "none"),
        ("torchvision", _version("torchvision")),
    ]
    return rows + [(name, _version(distribution)) for name, distribution in FRAMEWORKS]


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def devices(target: Target) -> list[tuple[str, str]]:
    """The CPU (model, cores this process may use, memory), each visible GPU, the device of the checks."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    rows = [("cpu", f"{_cpu_name()}, {len(os.sched_getaffinity(0))} cores, {memory:.1f} GiB memory")]
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        rows.append(
            (
                f"cuda:{index}",
                f"{torch.cuda.get_device_name(index)}, {total / GIB:.1f} GiB "
                f"({free / GIB:.1f} GiB free), compute capability {major}.{minor}",
            )
        )
    if not torch.cuda.is_available():
        rows.append(("GPU", "none visible to torch"))
    return rows + [("checks run on", target.cfg.device)]


# ---------------------------------------------------------------- the search's places


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cluster(target: Target) -> Result:
    """The Ray cluster of ``resources.address`` or ``RAY_ADDRESS``: its nodes and resources, free and all."""
    address = (target.spec.resources.address if target.spec else None) or os.environ.get("RAY_ADDRESS")
    if not _installed("ray"):
        return Result("Ray cluster", SKIPPED, "Ray not installed")
    if not address:
        return Result(
            "Ray cluster",
            SKIPPED,
            "no resources.address or RAY_ADDRESS: a search starts a local Ray instance on this machine",
        )
    try:
        _reachable(address)
        return Result("Ray cluster", PASS, f"{address}: {_cluster_resources(address)}")
    except (ConnectionError, OSError, RuntimeError) as err:
        return Result("Ray cluster", FAIL, f"{address}: {one_line(err)}")


def _reachable(address: str) -> None:
    """Fail fast when nothing listens at a ``host:port`` address (Ray itself retries for minutes)."""
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if parts.hostname and parts.port:
        socket.create_connection((parts.hostname, parts.port), timeout=CONNECT_TIMEOUT_S).close()


def _cluster_resources(address: str) -> str:
    """Joins the cluster for a moment: ``N nodes: C CPUs (c free), G GPUs (g free), M GiB memory``."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        nodes = sum(node["Alive"] for node in ray.nodes())
    finally:
        ray.shutdown()
    amounts = ", ".join(f"{total.get(key, 0):g} {key}s ({free.get(key, 0):g} free)" for key in ("CPU", "GPU"))
    return f"{nodes} node{'s' * (nodes != 1)}: {amounts}, {total.get('memory', 0) / GIB:.0f} GiB memory"


def tracking(target: Target, uri: str | None) -> Result:
    """The MLflow tracking store a search would write: a server that answers, or a SQLite file that exists or
    can be created."""
    if not _installed("mlflow"):
        return Result("tracking", SKIPPED, "MLflow not installed")
    from reid_tune.tracking.store import check_tracking, resolve_tracking_uri

    uri = resolve_tracking_uri(uri or (target.spec.mlflow.tracking_uri if target.spec else None))
    try:
        check_tracking(uri)
    except ReidTuneError as err:
        return Result("tracking", FAIL, str(err))
    if uri.startswith(("http://", "https://")):
        return Result("tracking", PASS, f"{uri}: the MLflow server answers")
    if uri.startswith("sqlite:///"):
        return _sqlite(uri, Path(uri.removeprefix("sqlite:///")))
    return Result("tracking", SKIPPED, f"{uri}: not checked (only http(s):// and sqlite:/// are)")


def _sqlite(uri: str, path: Path) -> Result:
    if path.is_file():
        return Result("tracking", PASS, f"{uri}: the database exists")
    folder = _existing_folder(path.parent)
    if os.access(folder, os.W_OK):
        return Result("tracking", PASS, f"{uri}: made by the first search ({folder} is writable)")
    return Result("tracking", FAIL, f"{uri}: no database, and {folder} is not writable")


def _existing_folder(path: Path) -> Path:
    """``path`` or its nearest existing parent folder."""
    return next(folder for folder in (path, *path.parents) if folder.is_dir())


def storage(target: Target) -> Result:
    """The search's storage: a probe file written, read back and removed (a local folder that does not exist
    yet: its nearest existing parent is writable)."""
    if target.spec is None:
        return Result("storage", SKIPPED, "no search-space file: its storage is checked when given one")
    if not _installed("pyarrow"):
        return Result("storage", SKIPPED, "pyarrow not installed")
    location = target.spec.storage
    if "://" not in location and not Path(location).exists():
        folder = _existing_folder(Path(location))
        status = PASS if os.access(folder, os.W_OK) else FAIL
        return Result(
            "storage",
            status,
            f"{location}: made by the first search ({folder} is {'' if status == PASS else 'not '}writable)",
        )
    try:
        _probe(location)
    except (ReidTuneError, OSError) as err:  # pyarrow's errors are OSErrors
        return Result("storage", FAIL, f"{location}: {one_line(err)}")
    return Result("storage", PASS, f"{location}: wrote, read back and removed a probe file")


def _probe(location: str) -> None:
    from reid_tune.search.storage import file_system, join, read_text, write_text

    probe, token = join(location, f".reid-tune-doctor-{uuid.uuid4().hex}"), uuid.uuid4().hex
    write_text(probe, token)
    try:
        if read_text(probe) != token:
            raise ReidTuneError("the probe file read back differs from what was written")
    finally:
        fs, path = file_system(probe)
        fs.delete_file(path)


def data(target: Target) -> Result:
    """The search's lists load, and an even sample of each list's images decodes."""
    if target.spec is None:
        return Result("data", SKIPPED, "no search-space file: the checks use a generated set")
    lists = {key: getattr(target.spec.data, key) for key in ("train", "test_query", "test_gallery")}
    counts = []
    try:
        for key, csv in lists.items():
            if csv:
                counts.append(f"{key} {_sampled(csv, target.spec.data.image_root)}")
    except ReidTuneError as err:
        return Result("data", FAIL, str(err))
    return Result("data", PASS, f"{'; '.join(counts)}; {IMAGES_SAMPLED} sampled images of each decode")


def _sampled(csv: str, image_root: str) -> str:
    """``N images of M identities`` of the list ``csv``, once a sample of its images decoded."""
    dataset = load_csv(csv)
    step = max(1, len(dataset) // IMAGES_SAMPLED)
    for fid in dataset.fids[::step][:IMAGES_SAMPLED]:
        load_image(Path(image_root) / fid)
    return f"{len(dataset):,} images of {len(set(dataset.pids.tolist())):,} identities"


def setup(target: Target, tracking_uri: str | None) -> list[Result]:
    """The cluster, the tracking store, the storage and the data, in that order."""
    return [cluster(target), tracking(target, tracking_uri), storage(target), data(target)]
