"""The prepared GPU check (deploy/gpu/), run here on CPU as far as a CPU allows.

What needs the GPU itself (CUDA sessions, fp16 kernels, the GPU's timings) stays unrun here;
the argument handling, the bundle (wheels unpacked and slimmed, xz, split, join, the printed
plan of calls), check.sh joining what one call carried, and the stages (``--device cpu``, on
the tiny models) run for real, as does the smoke stage's stop on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "deploy" / "gpu"


sys.path.insert(0, str(GPU))  # the check's modules import each other, as check.sh runs them


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bundle = _script("bundle")
gpu_check = _script("gpu_check")


def test_the_gpu_extra_is_the_pinned_pip_route_to_cuda() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["gpu"] == ["onnxruntime-gpu[cuda,cudnn]==1.31.1; sys_platform == 'linux' "
                             "and platform_machine == 'x86_64'"]


def test_split_and_join_give_back_the_same_bytes(tmp_path: Path) -> None:
    source = tmp_path / "bundle.tar"
    source.write_bytes(bytes(range(256)) * (10 * 1024 + 3))  # 2.5 MiB and a bit
    parts = bundle.split(source, tmp_path / "parts", part_mib=1)
    assert [p.name for p in parts] == [f"bundle.tar.part-00{i}" for i in range(3)]
    assert all(p.stat().st_size <= 1 << 20 for p in parts)
    joined = bundle.join(tmp_path / "parts", tmp_path / "out" / "bundle.tar")
    assert joined.read_bytes() == source.read_bytes()
    parts[1].write_bytes(parts[1].read_bytes()[:-1] + b"\x00")  # a corrupt part
    with pytest.raises(ValueError, match="sha256"):
        bundle.join(tmp_path / "parts", tmp_path / "out" / "again.tar")
    parts[1].unlink()  # a part that was never carried
    with pytest.raises(ValueError, match="one is missing"):
        bundle.join(tmp_path / "parts", tmp_path / "out" / "again.tar")
    assert bundle.main(["join", str(tmp_path / "nowhere"), "--into", str(tmp_path / "x")]) == 1


@pytest.mark.parametrize("argv, message", [
    (["--stages", "doctor,gpu"], "unknown ['gpu']"),
    (["--budget-s", "0"], "--budget-s must be > 0"),
    (["--bench-duration", "-1"], "--bench-duration must be > 0"),
])
def test_bad_arguments_are_usage_errors(tiny_repository: Path, tmp_path: Path, argv: list[str],
                                        message: str, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    with pytest.raises(SystemExit) as caught:
        gpu_check.parse_args(["--repository", str(tiny_repository), "--out",
                              str(tmp_path / "o.json"), *argv])
    assert caught.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--repository", str(tmp_path / "none"), "--out", "o.json"])


def test_the_bench_plan_covers_every_model_in_fp32_and_fp16_on_the_gpu(
        tiny_repository: Path, tmp_path: Path) -> None:
    args = gpu_check.parse_args(["--repository", str(tiny_repository), "--out",
                                 str(tmp_path / "out"), "--seqserve", "seqserve"])
    plans = gpu_check.plan_bench(args)
    assert [(p["model"], p["precision"]) for p in plans] == [
        (LSTM_NAME, "fp32"), (LSTM_NAME, "fp16"), (TRANSFORMER_NAME, "fp32"),
        (TRANSFORMER_NAME, "fp16")]
    command = plans[1]["command"]
    assert command[:2] == ["seqserve", "bench"]
    assert command[command.index("--serve-args") + 1] == "--device cuda"
    assert command[command.index("--precisions") + 1] == "fp16"
    assert command[command.index("--lengths") + 1] == "16,256"
    # Cells end by time, not by a request count that a GPU runs through in a second.
    assert float(command[command.index("--duration") + 1]) == args.bench_duration
    assert int(command[command.index("--requests") + 1]) >= 100_000
    assert command[command.index("--texts") + 1] == "synthetic"  # no network for datasets there
    # A budget too small for one run skips them all, saying so.
    skipped = gpu_check.stage_bench(args, gpu_check.Budget(1.0))
    assert all(result["skipped"].startswith("budget") for result in skipped)


def test_every_stage_on_cpu_writes_its_file_and_the_summary(tiny_repository: Path,
                                                            tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "out"
    runs = tiny_repository.parent / f"{tiny_repository.name}-runs"  # where the fixture trained
    code = gpu_check.main(["--repository", str(tiny_repository), "--runs", str(runs), "--out",
                           str(out), "--device", "cpu", "--stages", "smoke,doctor,serve,torch",
                           "--doctor-runs", "1", "--torch-runs", "1"])
    assert code == 0
    assert sorted(p.name for p in out.glob("stage-*.json")) == [
        "stage-1-smoke.json", "stage-2-doctor.json", "stage-3-serve.json", "stage-4-torch.json"]
    document = json.loads((out / "gpu_check.json").read_text())
    smoke = document["stages"]["smoke"]
    assert smoke["failure"] == "" and smoke["unmet_requirements"] == []
    assert smoke["fp32"]["providers"][0] == "CPUExecutionProvider"
    assert smoke["fp32"]["placement"]["nodes"]  # the assignment was recorded
    doctors = {r["model"]: r for r in document["stages"]["doctor"]}
    assert set(doctors) == {LSTM_NAME, TRANSFORMER_NAME}  # one run per model
    for name, doctor in doctors.items():
        assert doctor["exit_code"] == 0 and [m["name"] for m in doctor["json"]["models"]] == [
            name]
    serve = document["stages"]["serve"]
    assert serve["flags"] == ["--device", "auto", "--precision", "auto"]
    served = {m["name"]: m for m in serve["models"]}
    assert set(served) == {LSTM_NAME, TRANSFORMER_NAME} and serve["exit_code"] == 0
    for model in served.values():  # auto on a machine without a GPU: CPU, and why
        assert model["device"] == "cpu" and model["precision_reason"]
        assert len(model["classified"]) == 2
    torch_stage = document["stages"]["torch"]
    assert torch_stage["tf32"]["now"] == {"matmul": False, "cudnn": False}
    torch_results = {r["run"]: r for r in torch_stage["runs"]}
    assert set(torch_results) == {LSTM_NAME, TRANSFORMER_NAME}
    for result in torch_results.values():
        assert result["model"].endswith("/1") and result["examples"] > 0
        assert 0.0 <= result["fp32"]["accuracy"] <= 1.0 and result["fp32"]["latency_ms"]
        for variant in ("fp16", "autocast_fp16"):  # CPU kernels may lack half support
            assert "agreement" in result[variant] or "error" in result[variant]
    assert "bench" not in document["stages"]
    summary = (out / "summary.txt").read_text()
    for expected in ("smoke:", "doctor", f"{LSTM_NAME}: cpu", "torch (fp32 with TF32 off"):
        assert expected in summary, summary


def test_the_smoke_stage_stops_the_check_where_cuda_cannot_run(tiny_repository: Path,
                                                               tmp_path: Path) -> None:
    """This machine has no GPU: asked for CUDA, the tiny graph's session is not on CUDA (or
    this onnxruntime has no CUDA at all), and nothing after the smoke stage runs."""
    out = tmp_path / "out"
    code = gpu_check.main(["--repository", str(tiny_repository), "--out", str(out),
                           "--device", "cuda"])
    assert code == gpu_check.SMOKE_FAILED
    assert [p.name for p in out.glob("stage-*.json")] == ["stage-1-smoke.json"]
    smoke = json.loads((out / "stage-1-smoke.json").read_text())
    assert "CUDA" in smoke["failure"] and "\n" not in smoke["failure"]
    assert "FAILED: " + smoke["failure"] in (out / "summary.txt").read_text()


def test_requirements_the_image_lacks_are_named(tmp_path: Path) -> None:
    smoke = _script("gpu_smoke")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["numpy>=1", "no-such-dist-here>=1",'
                         ' "numpy<1", "pytest; sys_platform == \'nowhere\'"]\n')
    unmet = smoke.unmet_requirements(pyproject)
    assert len(unmet) == 2
    assert unmet[0].startswith("no-such-dist-here: not installed")
    assert unmet[1].startswith("numpy ") and "<1" in unmet[1]


def test_the_shell_scripts_parse_and_refuse_unknown_flags() -> None:
    for script in ("prepare.sh", "check.sh"):
        assert subprocess.run(["bash", "-n", str(GPU / script)]).returncode == 0
    run = subprocess.run([str(GPU / "prepare.sh"), "--no-such-flag"], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 2 and "unknown argument" in run.stderr
    assert subprocess.run([sys.executable, str(GPU / "gpu_check.py"), "--help"],
                          capture_output=True, timeout=60).returncode == 0


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_unpack_lays_wheels_out_as_pip_target_would_without_what_the_check_never_loads(
        tmp_path: Path) -> None:
    ort = _wheel(tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl", {
        "onnxruntime/capi/libonnxruntime_providers_cuda.so": b"cuda",
        "onnxruntime/capi/libonnxruntime_providers_tensorrt.so": b"trt",
        "onnxruntime/transformers/float16.py": b"", "onnxruntime/tools/x.py": b"",
        "onnxruntime_gpu-1.31.1.dist-info/METADATA": b"Name: onnxruntime-gpu"})
    data = _wheel(tmp_path / "withdata-1.0-py3-none-any.whl", {
        "withdata-1.0.data/purelib/withdata/__init__.py": b"x = 1",
        "withdata-1.0.data/scripts/tool": b"#!/bin/sh"})
    site = tmp_path / "site"
    skipped = bundle.unpack([ort, data], site)
    assert (site / "onnxruntime/capi/libonnxruntime_providers_cuda.so").read_bytes() == b"cuda"
    assert (site / "onnxruntime_gpu-1.31.1.dist-info/METADATA").is_file()  # ORT reads it
    assert (site / "withdata/__init__.py").read_text() == "x = 1"
    assert sorted(skipped) == ["onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
                               "onnxruntime/tools/x.py", "onnxruntime/transformers/float16.py"]
    assert not (site / "tool").exists() and not (site / "onnxruntime/tools").exists()
    evil = _wheel(tmp_path / "evil-1.0-py3-none-any.whl", {"../outside.py": b""})
    with pytest.raises(ValueError, match="unsafe path"):
        bundle.unpack([evil], site)


FAKE_PIP = """\
import os, sys, zipfile
args = sys.argv[1:]
if args[:3] != ["-m", "pip", "download"]:
    os.execv({real!r}, [{real!r}, *args])
dest = args[args.index("--dest") + 1]
os.makedirs(dest, exist_ok=True)
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(" ".join(args[3:]) + "\\n")
def wheel(name, files):
    with zipfile.ZipFile(os.path.join(dest, name), "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
# Incompressible, so that xz cannot shrink it below several parts. No __init__.py anywhere:
# a directory without one never shadows the real package later on the path (PEP 420).
wheel("onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl", {{
    "onnxruntime/capi/libonnxruntime_providers_cuda.so": os.urandom(3 << 20),
    "onnxruntime/capi/libonnxruntime_providers_tensorrt.so": os.urandom(1 << 20)}})
wheel("pydantic_core-2.0-cp312-cp312-manylinux_2_17_x86_64.whl", {{"pydantic_core/x": b"1"}})
wheel("grpcio-1.81.1-cp312-cp312-manylinux_2_17_x86_64.whl", {{"grpc/x": b"1"}})
wheel("numpy-2.0-cp312-cp312-manylinux_2_17_x86_64.whl", {{"numpy/x": b"1"}})
wheel("seqserve-0.1.0-py3-none-any.whl", {{"service/x": b"1"}})
"""


def _prepare(tiny_repository: Path, scratch: Path, *flags: str
             ) -> tuple[subprocess.CompletedProcess[str], str]:
    """prepare.sh with the package index the one thing replaced: a fake ``pip download``."""
    fake = scratch / "python"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_PIP.format(real=sys.executable))
    fake.chmod(0o755)
    log = scratch / "pip.log"
    log.touch()
    runs = tiny_repository.parent / f"{tiny_repository.name}-runs"
    run = subprocess.run(
        [str(GPU / "prepare.sh"), "--repository", str(tiny_repository), "--runs", str(runs),
         "--parts", str(scratch / "parts"), *flags], capture_output=True, text=True,
        timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake),
                          "FAKE_PIP_LOG": str(log), "HOME": str(scratch)})
    return run, log.read_text()


@pytest.fixture(scope="module")
def prepared(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Any]:
    scratch = tmp_path_factory.mktemp("prepare")
    run, log = _prepare(tiny_repository, scratch, "--part-mib", "1")
    assert run.returncode == 0, run.stderr
    return {"scratch": scratch, "run": run, "log": log,
            "parts": sorted((scratch / "parts" / "core").glob("bundle-core.tar.xz.part-*"))}


def test_prepare_bundles_what_the_image_lacks_into_parts_and_prints_the_plan(
        prepared: dict[str, Any]) -> None:
    import tarfile

    parts, stdout = prepared["parts"], prepared["run"].stdout
    assert len(parts) >= 3 and all(p.stat().st_size <= 1 << 20 for p in parts)
    # One call per part; the last part and SHA256SUMS ride with the check itself.
    calls = [line for line in stdout.splitlines() if line.strip().startswith("run(")]
    assert len(calls) == len(parts)
    assert all('command="true"' in call for call in calls[:-1])
    assert parts[-1].name in calls[-1] and "core/SHA256SUMS" in calls[-1]
    assert 'command="deploy/gpu/check.sh"' in calls[-1]
    assert f"{len(parts)} call(s)" in stdout
    work = prepared["scratch"] / "joined"
    tar = bundle.join(parts[0].parent, work / "bundle.tar.xz")
    with tarfile.open(tar) as archive:
        names = set(archive.getnames())
    for name in (LSTM_NAME, TRANSFORMER_NAME):
        assert f"bundle-core/repository/{name}/1/manifest.json" in names
        assert f"bundle-core/repository/{name}/1/model.fp16.onnx" in names
        assert {f"bundle-core/runs/{name}/{file}" for file in (
            "config.json", "labels.json", "tokenizer.json", "model.pt")} <= names
    site = "bundle-core/site/"
    assert site + "onnxruntime/capi/libonnxruntime_providers_cuda.so" in names
    assert site + "onnxruntime/capi/libonnxruntime_providers_tensorrt.so" not in names
    assert site + "pydantic_core/x" in names and site + "grpc/x" in names  # grpcio: pinned
    assert site + "numpy/x" not in names  # the image has it (host-packages.txt)
    assert not any(n.startswith(site + "service") for n in names)  # the tree travels itself
    asked = prepared["log"]
    assert "onnxruntime-gpu==1.31.1" in asked and "--python-version 3.12" in asked
    assert "manylinux_2_34_x86_64" in asked and str(ROOT) in asked


def test_prepare_sizes_parts_to_what_the_working_tree_leaves(tiny_repository: Path,
                                                             tmp_path: Path) -> None:
    """Without --part-mib: the 64 MiB a call carries less the tree that travels with it and a
    MiB of margin; the tiny bundle then fits one part, carried by the check's own call."""
    tree = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                           "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    tree_mib = -(-sum((ROOT / name).stat().st_size for name in
                      tree.stdout.decode().split("\0") if name and (ROOT / name).is_file())
                 // (1 << 20))
    run, _ = _prepare(tiny_repository, tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"parts of {64 - 1 - tree_mib} MiB" in run.stdout
    calls = [line for line in run.stdout.splitlines() if line.strip().startswith("run(")]
    assert len(calls) == 1 and "deploy/gpu/check.sh" in calls[0]


@pytest.mark.parametrize("flags, code, message", [
    (("--set", "elsewhere"), 2, "--set core or pretrained"),
    (("--set", "pretrained"), 3, "no pretrained model"),  # the tiny repository has none
])
def test_prepare_refuses_an_unknown_or_empty_set(tiny_repository: Path, tmp_path: Path,
                                                 flags: tuple[str, ...], code: int,
                                                 message: str) -> None:
    run, _ = _prepare(tiny_repository, tmp_path, *flags)
    assert run.returncode == code and message in run.stderr, run.stderr


def test_check_joins_and_verifies_the_parts_one_call_carried(prepared: dict[str, Any],
                                                             tmp_path: Path) -> None:
    """check.sh as the last call runs it: parts carried earlier and the last one with
    SHA256SUMS in deploy/gpu/parts/core/; a missing or corrupt part is exit 3, before any
    stage; a whole bundle is unpacked and the smoke stage runs against it."""
    import shutil

    parts_dir = tmp_path / "parts"
    shutil.copytree(prepared["parts"][0].parent, parts_dir / "core")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path),
           "SEQSERVE_GPU_PARTS": str(parts_dir), "SEQSERVE_GPU_WORK": str(tmp_path / "work")}

    def check(out: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(GPU / "check.sh"), "--device", "cpu", "--stages", "smoke"],
                              capture_output=True, text=True, timeout=300,
                              env={**env, "OUT": str(tmp_path / out)})

    middle = sorted((parts_dir / "core").glob("*.part-*"))[1]
    kept = middle.read_bytes()
    middle.unlink()  # a part that was never carried
    missing = check("missing")
    assert missing.returncode == 3 and "one is missing" in missing.stdout + missing.stderr
    middle.write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))  # a corrupt part
    corrupt = check("corrupt")
    assert corrupt.returncode == 3 and "sha256" in corrupt.stdout + corrupt.stderr
    middle.write_bytes(kept)
    whole = check("whole")
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    smoke = json.loads((tmp_path / "whole" / "stage-1-smoke.json").read_text())
    assert smoke["failure"] == ""
    assert smoke["torch"].get("NVIDIA_TF32_OVERRIDE") == "0"  # set before CUDA could start
    assert (tmp_path / "whole" / "summary.txt").is_file()
    assert "set core" in (tmp_path / "whole" / "check.log").read_text()
    assert (tmp_path / "work" / "repository" / LSTM_NAME / "1" / "manifest.json").is_file()
