"""The prepared GPU check (deploy/gpu/), run here on CPU as far as a CPU allows.

What needs the GPU itself (CUDA sessions, fp16 kernels, the H200 timings) stays unrun here;
the argument handling, the bundle's split and join, the bench plan, and the doctor and PyTorch
stages (``--device cpu``, on the tiny models) run for real.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "deploy" / "gpu"


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
                                 str(tmp_path / "o.json"), "--seqserve", "seqserve"])
    plans = gpu_check.plan_bench(args)
    assert [(p["model"], p["precision"]) for p in plans] == [
        (LSTM_NAME, "fp32"), (LSTM_NAME, "fp16"), (TRANSFORMER_NAME, "fp32"),
        (TRANSFORMER_NAME, "fp16")]
    first = plans[1]["command"]
    assert first[:2] == ["seqserve", "bench"]
    assert first[first.index("--serve-args") + 1] == "--device cuda --precision fp16"
    assert first[first.index("--texts") + 1] == "synthetic"  # no network for datasets there
    # A budget too small for one run skips them all, saying so.
    skipped = gpu_check.stage_bench(args, gpu_check.Budget(1.0))
    assert all(result["skipped"].startswith("budget") for result in skipped)


def test_doctor_and_pytorch_stages_on_cpu(tiny_repository: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "gpu_check.json"
    runs = tiny_repository.parent / f"{tiny_repository.name}-runs"  # where the fixture trained
    code = gpu_check.main(["--repository", str(tiny_repository), "--runs", str(runs), "--out",
                           str(out), "--device", "cpu", "--stages", "doctor,torch",
                           "--doctor-runs", "1", "--torch-runs", "1"])
    assert code == 0
    document = json.loads(out.read_text())
    doctor = document["stages"]["doctor"]
    assert doctor["exit_code"] == 0 and doctor["json"]["device_policy"] == "cpu"
    torch_results = {r["run"]: r for r in document["stages"]["torch"]}
    assert set(torch_results) == {LSTM_NAME, TRANSFORMER_NAME}
    for result in torch_results.values():
        assert result["model"].endswith("/1") and result["examples"] > 0
        assert 0.0 <= result["fp32"]["accuracy"] <= 1.0 and result["fp32"]["latency_ms"]
        for variant in ("fp16", "autocast_fp16"):  # CPU kernels may lack half support
            assert "agreement" in result[variant] or "error" in result[variant]
    assert "bench" not in document["stages"]


def test_the_shell_scripts_parse_and_refuse_unknown_flags() -> None:
    for script in ("prepare.sh", "check.sh"):
        assert subprocess.run(["bash", "-n", str(GPU / script)]).returncode == 0
    run = subprocess.run([str(GPU / "prepare.sh"), "--no-such-flag"], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 2 and "unknown argument" in run.stderr
    assert subprocess.run([sys.executable, str(GPU / "gpu_check.py"), "--help"],
                          capture_output=True, timeout=60).returncode == 0


FAKE_PIP = """\
import os, sys
args = sys.argv[1:]
if args[:3] != ["-m", "pip", "download"]:
    os.execv({real!r}, [{real!r}, *args])
dest = args[args.index("--dest") + 1]
os.makedirs(dest, exist_ok=True)
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(" ".join(args[3:]) + "\\n")
with open(os.path.join(dest, "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"),
          "wb") as wheel:
    wheel.write(os.urandom(3 << 20))  # incompressible: the parts must really split it
open(os.path.join(dest, "seqserve-0.1.0.tar.gz"), "wb").close()
"""


def test_prepare_bundles_models_runs_and_wheels_into_carryable_parts(
        tiny_repository: Path, tmp_path: Path) -> None:
    """The package index is the one thing replaced: a fake ``pip download`` writes a wheel."""
    import tarfile

    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_PIP.format(real=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "pip.log"
    runs = tiny_repository.parent / f"{tiny_repository.name}-runs"
    run = subprocess.run(
        [str(GPU / "prepare.sh"), "--repository", str(tiny_repository), "--runs", str(runs),
         "--part-mib", "1", "--parts", str(tmp_path / "parts")], capture_output=True,
        text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake),
                                     "FAKE_PIP_LOG": str(log), "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    parts = sorted((tmp_path / "parts").glob("bundle.tar.part-*"))
    assert len(parts) >= 3 and all(p.stat().st_size <= 1 << 20 for p in parts)
    assert "deploy/gpu/check.sh" in run.stdout and parts[-1].name in run.stdout
    tar = bundle.join(tmp_path / "parts", tmp_path / "bundle.tar")
    with tarfile.open(tar) as archive:
        names = set(archive.getnames())
    for name in (LSTM_NAME, TRANSFORMER_NAME):
        assert f"bundle/repository/{name}/1/manifest.json" in names
        assert f"bundle/repository/{name}/1/model.fp16.onnx" in names
        assert {f"bundle/runs/{name}/{file}" for file in (
            "config.json", "labels.json", "tokenizer.json", "model.pt")} <= names
    assert "bundle/wheels/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl" in names
    assert not any(n.startswith("bundle/wheels/seqserve-") for n in names)  # the tree travels
    asked = log.read_text()
    assert "onnxruntime-gpu==1.31.1" in asked and "--python-version 3.12" in asked
    assert str(ROOT) in asked and "transformers" not in asked  # no pretrained run here
