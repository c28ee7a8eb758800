"""The one-screen text of ``seqserve doctor``: the verdict on CUDA first, then the evidence."""

from __future__ import annotations

from service.server.cuda_libraries import DRIVER_LIBRARY
from service.server.doctor import DoctorReport, ModelReport, PrecisionReport, describe_platform
from service.server.sessions import CUDA

_FIX_NO_PROVIDER = ("install the GPU build: pip install 'seqserve[gpu]' (onnxruntime-gpu "
                    "with CUDA 13 and cuDNN 9 from pip; Linux x86_64)")
_FIX_NO_DRIVER = ("run on a machine with an NVIDIA GPU and a driver for CUDA 13 (R580 or "
                  "newer); in a container, start it with the NVIDIA runtime (--gpus all)")
_FIX_LIBRARIES = ("pip install 'seqserve[gpu]' brings the CUDA 13 and cuDNN 9 libraries as "
                  "wheels (found in site-packages/nvidia/*/lib); or put them on the loader "
                  "path (ldconfig, LD_LIBRARY_PATH)")


def render(report: DoctorReport) -> str:
    lines = [f"seqserve doctor: --device {report.device_policy}, {describe_platform()}"]
    ort = report.onnxruntime
    built = f", built for CUDA {ort['built_for_cuda']}" if ort.get("built_for_cuda") else ""
    lines.append(f"{ort['package']} {ort['version']}{built}; providers: "
                 + ", ".join(p.removesuffix("ExecutionProvider") for p in ort["providers"]))
    lines.append(_gpu_line(report))
    lines.extend(_library_lines(report))
    lines.extend(_verdict(report))
    lines.append("")
    if not report.models:
        lines.append(f"Models: none in {report.repository}")
    else:
        lines.append(f"Models in {report.repository}:")
        for model in report.models:
            lines.extend(_model_lines(model))
    return "\n".join(lines)


def _gpu_line(report: DoctorReport) -> str:
    driver = report.driver
    if driver["nvidia_smi"]:
        seen = "; ".join(driver["nvidia_smi"])
        cuda = f", driver supports CUDA {driver['driver_cuda_version']}" if driver[
            "driver_cuda_version"] else ""
        return f"GPU: {seen}{cuda}"
    evidence = [driver["nvidia_smi_error"] or "nvidia-smi shows none",
                "no /dev/nvidia* device" if not driver["device_nodes"] else
                f"devices {', '.join(driver['device_nodes'])}"]
    if report.libraries is not None and report.libraries.driver_missing:
        evidence.append(f"{DRIVER_LIBRARY} not found")
    if driver["cuda_visible_devices"] is not None:
        evidence.append(f"CUDA_VISIBLE_DEVICES={driver['cuda_visible_devices']!r}")
    return "GPU: none seen (" + "; ".join(evidence) + ")"


def _library_lines(report: DoctorReport) -> list[str]:
    libraries = report.libraries
    if libraries is None:
        return [f"CUDA libraries: not looked for (this onnxruntime has no {CUDA})"]
    wheels = (f"searched {len(libraries.search_dirs)} pip wheel dir(s), then the loader path"
              if libraries.search_dirs else
              "no site-packages/nvidia/*/lib wheel dirs; searched the loader path")
    lines = [f"CUDA {libraries.cuda_major} libraries ({wheels}):"]
    for status in libraries.statuses:
        library = status.library
        if status.loaded:
            mark, where = "ok     ", f"{status.path} ({status.found_in})"
        else:
            mark = "MISSING" if library.required else "absent "
            where = f"{library.purpose}; from {library.source}"
            if status.error:
                where += f"; {status.error}"
        optional = "" if library.required else " (optional)"
        lines.append(f"  {mark} {library.soname:<18} {where}{optional}")
    return lines


def _verdict(report: DoctorReport) -> list[str]:
    if report.cuda_usable and report.device_policy != "cpu":
        ok = report.honoured
        return [f"CUDA is usable{'' if ok else ', but not for every model (see below)'}."]
    if report.device_policy == "cpu":
        return ["CUDA: not asked for (--device cpu); models run on CPU."]
    lines = [f"CUDA is not used: {report.cuda_reason}."]
    libraries = report.libraries
    if libraries is None:
        fix = _FIX_NO_PROVIDER
    elif libraries.driver_missing:
        fix = _FIX_NO_DRIVER
    elif libraries.missing:
        fix = _FIX_LIBRARIES
    else:
        fix = "see the driver line above"
    lines.append(f"  So models run on CPU in fp32 (fp16 pays only on a GPU). To use CUDA: {fix}.")
    if report.device_policy == "cuda":
        lines.append("  --device cuda cannot be honoured: `seqserve serve --device cuda` would "
                     "refuse every model.")
    return lines


def _model_lines(model: ModelReport) -> list[str]:
    if model.error:
        return [f"  {model.name}: UNREADABLE: {model.error}"]
    lines = [f"  {model.name} v{model.version} ({model.architecture}, <= {model.max_length} "
             f"tokens): serves {model.served}"]
    lines.extend(f"    would refuse under --device cuda: {problem}" for problem in model.problems)
    lines.extend(f"    warning: {warning}" for warning in model.warnings)
    for entry in model.precisions:
        lines.extend(_precision_lines(entry))
    return lines


def _precision_lines(entry: PrecisionReport) -> list[str]:
    gates = "" if entry.passed_export_gates else " (failed its export gates)"
    if entry.error and not entry.device:
        return [f"    {entry.precision}{gates}: {entry.error}"]
    head = f"    {entry.precision:<5} {entry.device:<7}{gates}"
    if entry.precision == "fp32" and not entry.error:
        head += " the reference the others are compared with"
    if entry.vs_fp32 is not None:
        c = entry.vs_fp32
        head += (f" vs fp32 here: agreement {c.agreement:.4f} over {c.examples} texts, "
                 f"accuracy {c.fp32_accuracy:.3f} -> {c.candidate_accuracy:.3f}, max diff "
                 f"{c.max_abs_diff:.1e}")
    if entry.error:
        head += f"; {entry.error}"
    detail = f"      {entry.placement.summary()}"
    if entry.latency_ms:
        detail += "; p50 ms " + " ".join(f"{shape}:{ms:g}" for shape, ms in
                                         entry.latency_ms.items())
    return [head, detail]
