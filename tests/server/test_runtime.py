"""Device and precision selection, session options and settings, on a machine without a GPU.

The GPU is the only thing faked here (``harness.fake_gpu``): a session factory whose CUDA
sessions run the real model on CPU and report what a real onnxruntime-gpu reports. The CUDA
failure paths in detail are in ``test_device_selection.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from harness.fake_gpu import FakeCudaFactory, FakeCudaSession, library_report
from harness.server import server_settings
from harness.tiny_models import LSTM_NAME

from service.cli.exit_codes import CommandError
from service.cli.serve import add_serve_command, settings_from_args
from service.repo.layout import latest_version
from service.repo.manifest import Manifest
from service.repo.serving_config import ServingConfig
from service.repo.tokenization import TextTokenizer
from service.server import ort_logging
from service.server.cuda_libraries import probe
from service.server.planning import plan_attempts
from service.server.runtime import (
    CPU,
    CUDA,
    LoadError,
    ModelSession,
    SessionBuilder,
    length_buckets,
    load_version,
    session_options,
)
from service.server.sessions import (
    FALLBACK_REASONS,
    TF32_OVERRIDE,
    cuda_provider_options,
    pin_tf32_override,
    providers_for,
)
from service.server.settings import ServeSettings, ShadowRule
from service.server.threads import choose_threads


def _build(repo: Path, cuda: str, available=(CUDA, CPU), **settings: Any):
    factory = FakeCudaFactory(cuda)
    # The precision policy under test, not the harness's fp32 pin.
    builder = SessionBuilder(server_settings(repo, **({"precision": "auto"} | settings)),
                             factory, list(available),
                             probe_libraries=library_report)
    model = latest_version(repo, LSTM_NAME)
    manifest = model.load_manifest()
    spec = manifest.tokenizer
    tokenizer = TextTokenizer.from_file(model.directory / spec.file, spec.max_length)
    return builder, factory, model, manifest, tokenizer


def test_auto_uses_cuda_and_fp16_when_cuda_really_starts(tiny_repository: Path) -> None:
    builder, factory, model, manifest, tokenizer = _build(tiny_repository, "works",
                                                          device="auto")
    session = builder.create(model, manifest, tokenizer)
    assert (session.device, session.precision) == ("cuda:0", "fp16")
    # fp16 is re-gated against fp32 on the same device before it is served.
    assert factory.calls == [("cuda", "model.fp16.onnx"), ("cuda", "model.fp32.onnx")]
    assert session.selection.fallback_reason == ""


@pytest.mark.parametrize("cuda, tried", [
    ("cpu", ["fp16"]),  # the machine's fault: CUDA fp32 is not tried
    ("raises", ["fp16", "fp32"]),  # this model's: CUDA fp32 is, before CPU
], ids=["silent-cpu-fallback", "raises"])
def test_auto_falls_back_to_cpu_fp32_when_cuda_does_not_start(tiny_repository: Path,
                                                              cuda: str,
                                                              tried: list[str]) -> None:
    builder, factory, model, manifest, tokenizer = _build(tiny_repository, cuda, device="auto")
    session = builder.create(model, manifest, tokenizer)
    assert (session.device, session.precision) == ("cpu", "fp32")
    assert factory.calls == [("cuda", f"model.{p}.onnx") for p in tried] + [
        ("cpu", "model.fp32.onnx")]
    assert session.selection.fallback_reason and session.fell_back_from_cuda
    # Each CUDA step that failed is named, in order.
    assert re.findall(r"(?:^|; )(fp\d+): ", session.selection.fallback_reason) == tried


def test_a_machine_whose_cuda_cannot_start_is_not_tried_again(tiny_repository: Path) -> None:
    builder, factory, model, manifest, tokenizer = _build(tiny_repository, "cpu", device="auto")
    builder.create(model, manifest, tokenizer)
    builder.create(model, manifest, tokenizer)  # the next model does not try CUDA again
    assert factory.calls[2:] == [("cpu", "model.fp32.onnx")]
    builder.retry_cuda()  # SIGHUP: it does
    builder.create(model, manifest, tokenizer)
    assert factory.calls[3:] == [("cuda", "model.fp16.onnx"), ("cpu", "model.fp32.onnx")]


def test_explicit_cuda_fails_the_load_when_cuda_does_not_start(tiny_repository: Path) -> None:
    builder, _, model, manifest, tokenizer = _build(tiny_repository, "cpu", device="cuda")
    with pytest.raises(LoadError, match="onnxruntime created a CPU session"):
        builder.create(model, manifest, tokenizer)
    builder, _, model, manifest, tokenizer = _build(tiny_repository, "works", available=(CPU,),
                                                    device="cuda")
    with pytest.raises(LoadError, match="no CUDAExecutionProvider"):
        builder.create(model, manifest, tokenizer)


def test_cpu_never_tries_cuda(tiny_repository: Path) -> None:
    builder, factory, model, manifest, tokenizer = _build(tiny_repository, "works",
                                                          device="cpu")
    session = builder.create(model, manifest, tokenizer)
    assert session.device == "cpu" and session.selection.fallback_reason == ""
    assert factory.calls == [("cpu", "model.fp32.onnx")]


def _gated(manifest: Manifest, fp32: bool, fp16: bool, int8: bool = True) -> Manifest:
    passed = {"fp32": fp32, "fp16": fp16, "int8": int8}
    artifacts = [a.model_copy(update={"passed_gates": passed[a.precision]})
                 for a in manifest.artifacts]
    return manifest.model_copy(update={"artifacts": artifacts})


def _plan(manifest: Manifest, available: list[str], **settings: Any) -> list[tuple[str, str]]:
    plan = plan_attempts(manifest, server_settings(Path("."), **({"precision": "auto"}
                                                                | settings)), available)
    return [(a.device, a.artifact.precision) for a in plan]


def test_only_artifacts_that_passed_their_gates_are_served_unless_forced(
        tiny_repository: Path) -> None:
    manifest = latest_version(tiny_repository, LSTM_NAME).load_manifest()
    cuda = [CUDA, CPU]
    assert _plan(_gated(manifest, True, False), cuda, device="auto") == [
        ("cuda", "fp32"), ("cpu", "fp32")]
    with pytest.raises(LoadError, match="force --precision"):
        _plan(_gated(manifest, False, False, False), cuda, device="auto")
    assert _plan(_gated(manifest, False, False), cuda, device="cpu", precision="fp16") == [
        ("cpu", "fp16")]


def test_auto_plans_cuda_fp16_then_cuda_fp32_then_cpu(tiny_repository: Path) -> None:
    manifest = latest_version(tiny_repository, LSTM_NAME).load_manifest()
    cuda = [CUDA, CPU]
    assert _plan(manifest, cuda, device="auto") == [
        ("cuda", "fp16"), ("cuda", "fp32"), ("cpu", "fp32")]
    plan = plan_attempts(manifest, server_settings(Path("."), device="auto", precision="auto"),
                         cuda)
    assert [a.after_cuda_failure for a in plan] == [False, True, False]
    assert _plan(manifest, cuda, device="cuda") == [("cuda", "fp16"), ("cuda", "fp32")]
    # Forced precisions are not substituted; a fp32 that failed its gates is no fallback.
    assert _plan(manifest, cuda, device="auto", precision="fp16") == [
        ("cuda", "fp16"), ("cpu", "fp16")]
    assert _plan(_gated(manifest, False, True), cuda, device="cuda") == [("cuda", "fp16")]


def test_cuda_sessions_run_through_the_plain_run_path(tiny_repository: Path) -> None:
    """No IOBinding: a CUDA session is run exactly like a CPU one (see sessions.py)."""
    model = latest_version(tiny_repository, LSTM_NAME)
    fake = FakeCudaSession(str(model.directory / "model.fp16.onnx"))
    logits = ModelSession(fake, "cuda:1", "fp16").run(np.ones((2, 3), np.int64),
                                                      np.ones((2, 3), np.int64))
    assert logits.dtype == np.float32 and logits.shape == (2, 2) and fake.runs == 1


def test_real_onnxruntime_on_this_machine(tiny_repository: Path,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    """Real providers, and the outcome predicted from the machine before loading: with no GPU
    device node (CI), auto lands on CPU + fp32 even where onnxruntime-gpu lists CUDA, and ORT,
    at its own WARNING level, prints nothing: no CUDA session is attempted without libraries."""
    gpu_present = any(Path("/dev").glob("nvidia[0-9]*"))
    settings = server_settings(tiny_repository, device="auto", precision="auto")
    builder = SessionBuilder(settings)
    previous = ort_logging.set_severity(2)
    try:
        capfd.readouterr()
        loaded = load_version(latest_version(tiny_repository, LSTM_NAME), settings, builder)
        printed = capfd.readouterr()
    finally:
        ort_logging.set_severity(previous)
    if not gpu_present:
        assert "onnxruntime" not in printed.err + printed.out
    expected = ("cuda:0", "fp16") if gpu_present else ("cpu", "fp32")
    assert (loaded.session.device, loaded.session.precision) == expected
    if not gpu_present:
        assert loaded.session.providers == [CPU]
        assert builder.cuda_failed == (CUDA in ort.get_available_providers())
    if not gpu_present and CUDA in ort.get_available_providers():
        # The reason is the probe's, naming what this machine lacks (here: libcuda.so.1).
        report = probe()
        assert not report.usable
        assert loaded.session.selection.fallback_reason == report.reason()
        assert loaded.session.selection.fallback_kind in FALLBACK_REASONS


def test_the_library_probe_names_what_this_machine_lacks() -> None:
    report = probe()
    for status in report.statuses:
        if status.loaded:
            assert Path(status.path).name.startswith(status.library.soname)
        else:
            assert status.library.soname in status.describe()
    if not report.usable:
        missing = [s.library.soname for s in report.missing]
        assert missing or report.driver_problem()
        assert all(name in report.reason() for name in missing)


def test_session_options_follow_the_settings(tiny_repository: Path) -> None:
    options = session_options(server_settings(
        tiny_repository, inter_op_threads=2, allow_spinning=False), threads=3)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    spinning = session_options(server_settings(tiny_repository, allow_spinning=True), threads=1)
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.record_ep_graph_assignment_info") == "1"


def test_cpu_arena_modes(tiny_repository: Path) -> None:
    shared = session_options(server_settings(tiny_repository), threads=1)  # the default
    assert shared.get_session_config_entry("session.use_env_allocators") == "1"
    assert shared.enable_cpu_mem_arena
    own = session_options(server_settings(tiny_repository, cpu_arena="session"), threads=1)
    assert own.enable_cpu_mem_arena
    with pytest.raises(RuntimeError, match="use_env_allocators"):  # never set
        own.get_session_config_entry("session.use_env_allocators")
    assert not session_options(server_settings(tiny_repository, cpu_arena="off"),
                               threads=1).enable_cpu_mem_arena
    # Sessions on the shared arena load and run.
    loaded = load_version(latest_version(tiny_repository, LSTM_NAME),
                          server_settings(tiny_repository), SessionBuilder(server_settings(
                              tiny_repository)))
    assert loaded.session.run(np.ones((2, 5), np.int64), np.ones((2, 5), np.int64)).shape == (
        2, 2)


def test_cuda_sessions_get_one_thread_no_tf32_and_the_arena_settings(
        tiny_repository: Path) -> None:
    settings = server_settings(tiny_repository, intra_op_threads=0, cuda_device_id=1,
                               cuda_mem_limit_bytes=2 << 30)
    manifest = latest_version(tiny_repository, LSTM_NAME).load_manifest()
    assert choose_threads(manifest, setting=0, config=ServingConfig(),
                          cuda=True).threads == 1
    # On CPU a light model gets every core this process may use but one (the event loop's).
    cores = len(os.sched_getaffinity(0))
    assert choose_threads(manifest, setting=0, config=ServingConfig()).threads == max(
        1, cores - 1)
    assert choose_threads(manifest, setting=4, config=ServingConfig(),
                          cuda=True).threads == 4  # an explicit value wins
    assert session_options(settings, threads=4).intra_op_num_threads == 4
    # Strict SkipLayerNormalization on every CUDA session: fp32 accumulation in fp16 graphs.
    assert cuda_provider_options(settings) == {
        "device_id": "1", "use_tf32": "0", "arena_extend_strategy": "kSameAsRequested",
        "enable_skip_layer_norm_strict_mode": "1", "gpu_mem_limit": str(2 << 30)}
    tf32 = cuda_provider_options(server_settings(tiny_repository, cuda_use_tf32=True,
                                                 cuda_arena_extend_strategy="kNextPowerOfTwo"))
    assert tf32 == {"device_id": "0", "use_tf32": "1", "arena_extend_strategy": "kNextPowerOfTwo",
                    "enable_skip_layer_norm_strict_mode": "1"}
    assert providers_for("cuda", settings)[0] == (CUDA, cuda_provider_options(settings))
    assert providers_for("cpu", settings) == [CPU]


def _without_tf32_override(monkeypatch: pytest.MonkeyPatch) -> None:
    # Set, then deleted: monkeypatch restores the process's own value (or its absence) after.
    monkeypatch.setenv(TF32_OVERRIDE, "placeholder")
    monkeypatch.delenv(TF32_OVERRIDE)


def test_tf32_off_sets_the_override_unless_the_environment_has_one(
        tiny_repository: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    off = server_settings(tiny_repository)
    on = server_settings(tiny_repository, cuda_use_tf32=True)
    _without_tf32_override(monkeypatch)
    with caplog.at_level(logging.INFO, logger="service.server.sessions"):
        assert pin_tf32_override(on) == "" and TF32_OVERRIDE not in os.environ
        assert "NVIDIA_TF32_OVERRIDE=0 set" in pin_tf32_override(off)
    assert os.environ[TF32_OVERRIDE] == "0"
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert pin_tf32_override(off) == ""  # already 0: nothing more to say
    assert "overriding cuda_use_tf32" in pin_tf32_override(on)  # 0 wins over the setting
    monkeypatch.setenv(TF32_OVERRIDE, "1")  # the operator's own value is kept
    assert "kept from the environment" in pin_tf32_override(off)
    assert os.environ[TF32_OVERRIDE] == "1"


def test_the_builder_pins_tf32_before_the_cuda_libraries_load(
        tiny_repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _without_tf32_override(monkeypatch)
    seen: list[str | None] = []

    def probe() -> Any:
        seen.append(os.environ.get(TF32_OVERRIDE))
        return library_report()

    builder, factory, model, manifest, tokenizer = _build(tiny_repository, "works",
                                                          device="auto")
    builder.probe_libraries = probe
    builder.create(model, manifest, tokenizer)
    assert seen == ["0"]
    for _, providers in factory.options:  # and every CUDA session is strict
        assert providers[0][1]["enable_skip_layer_norm_strict_mode"] == "1"
    cpu, *_ = _build(tiny_repository, "works", device="cpu", cuda_use_tf32=False)
    monkeypatch.delenv(TF32_OVERRIDE)
    assert not cpu.cuda_may_start() and TF32_OVERRIDE not in os.environ  # no CUDA, no pin


def test_length_buckets() -> None:
    assert length_buckets(64) == [8, 16, 32, 64]
    assert length_buckets(100) == [8, 16, 32, 64, 100]
    assert length_buckets(5) == [5]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    return parser.parse_args(argv)


def test_flags_override_environment_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQSERVE_MAX_BATCH_TEXTS", "4")
    monkeypatch.setenv("SEQSERVE_PORT", "6000")
    monkeypatch.setenv("SEQSERVE_MODEL_VERSIONS", "a=2,b=5")
    args = _parse(["serve", "--max-batch-texts", "8", "--model-version", "c=3", "--shadow",
                   "a=b:0.25", "--allow-spinning", "--device", "cpu"])
    settings, overridden = settings_from_args(args)
    assert settings.max_batch_texts == 8 and settings.port == 6000
    assert settings.model_versions == {"c": 3}
    assert settings.shadow == [ShadowRule(primary="a", shadow="b", fraction=0.25)]
    assert settings.allow_spinning and settings.device == "cpu"
    assert settings.graph_optimization == "extended"  # the default
    described = dict(line.split("=", 1) for line in settings.describe(overridden))
    assert described["port"] == "6000 (env)" and described["max_batch_texts"] == "8 (flag)"
    assert ServeSettings().model_versions == {"a": 2, "b": 5}


@pytest.mark.parametrize("argv", [["serve", "--shadow", "a=a:0.5"],
                                  ["serve", "--shadow", "a=b:1.5"],
                                  ["serve", "--model-version", "a=x"]])
def test_bad_settings_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(CommandError) as caught:
        settings_from_args(_parse(argv))
    assert caught.value.code == 2


def test_channel_options_carry_limits_keepalive_and_connection_age(tiny_repository) -> None:
    from service.server.app import channel_options

    options = dict(channel_options(server_settings(
        tiny_repository, max_receive_message_bytes=2048, max_connection_age_s=30,
        max_connection_age_grace_s=5, keepalive_time_s=15)))
    assert options["grpc.max_receive_message_length"] == 2048
    assert options["grpc.max_connection_age_ms"] == 30_000
    assert options["grpc.max_connection_age_grace_ms"] == 5_000
    assert options["grpc.keepalive_time_ms"] == 15_000
    assert "grpc.max_connection_age_ms" not in dict(channel_options(server_settings(
        tiny_repository)))
