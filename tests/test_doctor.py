"""``reid-tune doctor``: its CPU run (GPU checks skipped, exit 0), a check made to fail (exit 1), a run over
a search-space file, the search's places (cluster, tracking, storage), and on a GPU its GPU checks.

The command, YAML and the helpers are imported inside the tests that use them: the GPU tests also run
where only torch is installed, as the doctor does."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_tune import gpu_data
from reid_tune.config import TrainConfig
from reid_tune.datasets import ReidDataset
from reid_tune.doctor import machine, run_doctor
from reid_tune.doctor.checks import compare_steps
from reid_tune.doctor.report import FAIL, PASS, SKIPPED
from reid_tune.doctor.target import Target
from reid_tune.steps import build_step

SMALL = ["--network", "lunet_small", "--batch-p", "4", "--batch-k", "2"]


@pytest.fixture(autouse=True)
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty folder, with no tracking server or Ray cluster named by the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def doctor(*args: str) -> int:
    """``reid-tune doctor ARGS`` in this process; its exit status (the CLI needs click, which a bare GPU
    machine may lack)."""
    pytest.importorskip("click")
    from reid_tune.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["doctor", *args])
    return stopped.value.code


def status_of(output: str, name: str) -> str:
    """The status the report gives the check ``name``."""
    found = re.search(rf"^  (PASS|FAIL|SKIPPED) +{re.escape(name)}  ", output, re.MULTILINE)
    assert found, f"no result for {name!r} in:\n{output}"
    return found.group(1)


def test_cpu_run_passes_and_skips_the_gpu_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor(*SMALL, "--device", "cpu", "--steps", "1") == 0
    out = capsys.readouterr().out
    for section in ("Versions", "Devices", "Search", "Checks", "Throughput"):
        assert re.search(rf"^{section}", out, re.MULTILINE), section
    assert status_of(out, "decoded-cache batches = DataLoader batches") == PASS
    assert status_of(out, "eager step") == PASS
    for gpu_only in (
        "CUDA-graph step = eager step",
        "2-process DDP step = 1 process (global mining)",
        "CUDA-graph step",
        "trials per GPU",
    ):
        assert status_of(out, gpu_only) == SKIPPED
    assert "needs a CUDA GPU" in out and "needs 2 CUDA GPUs" in out
    assert status_of(out, "bf16 autocast forward = fp32 forward") == SKIPPED  # fp32 is the CPU's precision
    assert re.search(r"^doctor: \d+ PASS, 0 FAIL, \d+ SKIPPED$", out, re.MULTILINE)


def test_a_failing_check_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The device path made to shift its pixels: the comparison with the DataLoader path fails."""
    real = gpu_data.batch_train_augment
    monkeypatch.setattr(gpu_data, "batch_train_augment", lambda *a, **k: real(*a, **k) + 0.01)
    assert doctor(*SMALL, "--device", "cpu", "--quick") == 1
    out = capsys.readouterr().out
    assert status_of(out, "decoded-cache batches = DataLoader batches") == FAIL
    assert "largest pixel difference 1.0e-02" in out and "FAIL: decoded-cache batches" in out
    assert "Throughput" not in out


def test_a_crashing_check_fails_and_the_others_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(gpu_data, "batch_train_augment", broken)
    assert run_doctor(None, overrides={"batch_p": 4, "batch_k": 2}, device="cpu", quick=True) == 1


def test_compare_steps_tells_equal_steps_from_different_ones(tiny_config: TrainConfig) -> None:
    cpu = torch.device("cpu")
    images, labels = torch.randn(8, 3, 64, 32), torch.arange(4).repeat_interleave(2)
    status, detail = compare_steps(
        build_step(tiny_config, cpu), build_step(tiny_config, cpu), images, labels, lr=1e-3, rtol=1e-6
    )
    assert status == PASS and "losses within 0.0e+00" in detail
    other = build_step(tiny_config.replace(seed=1), cpu)  # other initial weights
    status, _ = compare_steps(build_step(tiny_config, cpu), other, images, labels, lr=1e-3, rtol=1e-2)
    assert status == FAIL


def test_space_file_run_checks_its_storage_data_and_trial(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No start point: the trial is the middle of the space (P 2-8: 5, K 2-4: 3)."""
    from helpers import write_space

    space = write_space(
        tmp_path,
        demo_data,
        "doc",
        tracking_uri=None,
        space={"batch_p": {"int": [2, 8]}},
        search={"start_points": []},
    )
    (tmp_path / "ray_results").mkdir()
    assert doctor(str(space), "--device", "cpu", "--quick") == 0
    out = capsys.readouterr().out
    assert f"{space}: lunet_small + fc1024, P=5 K=3 (15 images) at 64x32, fp32 (precision fp32) on cpu" in out
    assert status_of(out, "storage") == PASS and "wrote, read back and removed a probe file" in out
    assert status_of(out, "data") == PASS and "train 48 images of 12 identities" in out
    assert status_of(out, "tracking") == PASS and "made by the first search" in out
    assert not list((tmp_path / "ray_results").iterdir()) and not (tmp_path / "mlflow.db").exists()


def test_a_bad_space_file_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor("missing.yaml") == 2
    assert capsys.readouterr().err == "error: missing.yaml: search-space file not found\n"


def _target(spec: object = None) -> Target:
    one = np.array(["a"])
    return Target(TrainConfig(), ReidDataset(one, one, "test"), spec, "test")


def test_places_that_do_not_answer_fail_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import free_port

    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    result = machine.cluster(_target())
    assert result.status == FAIL and result.detail.startswith(address)
    result = machine.tracking(_target(), f"http://{address}")
    assert result.status == FAIL and "does not answer" in result.detail


@pytest.mark.slow
def test_a_ray_cluster_reports_its_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        result = machine.cluster(_target())
    finally:
        cluster.shutdown()
    assert result.status == PASS and "1 node: 1 CPUs (1 free), 0 GPUs (0 free)" in result.detail


# ---------------------------------------------------------------- GPU only


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_checks_and_throughput_pass_on_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_doctor(None, device="cuda", steps=2) == 0
    out = capsys.readouterr().out
    for name in (
        "CUDA-graph step = eager step",
        "decoded-cache batches = DataLoader batches",
        "bf16 autocast forward = fp32 forward",
        "CUDA-graph step",
        "trials per GPU",
    ):
        assert status_of(out, name) == PASS


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_ddp_check_passes_on_two_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_doctor(None, device="cuda", quick=True) == 0
    assert status_of(capsys.readouterr().out, "2-process DDP step = 1 process (global mining)") == PASS
