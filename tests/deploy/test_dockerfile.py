"""The Dockerfile's GPU stage, read as data (no Docker engine here): what it installs and checks."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from stlm.support.gpu_env import CUDA_MAJOR, ONNXRUNTIME_GPU_PIN

ROOT = Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    kept = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(kept))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), re.sub(r"\s+", " ", rest).strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each stage (global ARGs before the first FROM are stage 0's prelude)."""
    found: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(text):
        if ins[0] == "FROM" and found[-1] and any(k == "FROM" for k, _ in found[-1]):
            found.append([])
        found[-1].append(ins)
    return found


@pytest.fixture(scope="module")
def gpu_stage() -> list[tuple[str, str]]:
    return stages((ROOT / "Dockerfile").read_text())[0]


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _runs(stage: list[tuple[str, str]]) -> str:
    return "\n".join(args for keyword, args in stage if keyword == "RUN")


def test_the_gpu_stage_comes_first_and_is_named(gpu_stage: list[tuple[str, str]]) -> None:
    froms = [args for keyword, args in instructions((ROOT / "Dockerfile").read_text()) if keyword == "FROM"]
    assert froms[0] == "${BASE_IMAGE} AS gpu"
    base = next(args for keyword, args in gpu_stage if keyword == "ARG" and args.startswith("BASE_IMAGE="))
    assert base.startswith("BASE_IMAGE=nvcr.io/nvidia/tensorrt:")


def test_venv_has_python3_venv(gpu_stage: list[tuple[str, str]]) -> None:
    runs = [args for keyword, args in gpu_stage if keyword == "RUN"]
    apt = next(i for i, r in enumerate(runs) if "apt-get install" in r)
    assert "python3-venv" in runs[apt].split("apt-get install", 1)[1].split("&&")[0]
    assert apt < next(i for i, r in enumerate(runs) if "python3 -m venv" in r)


def test_extras_installed_exist_and_include_serve(gpu_stage: list[tuple[str, str]]) -> None:
    extras = re.search(r'"\.\[([a-z,-]+)\]"', _runs(gpu_stage))
    assert extras is not None
    wanted = set(extras.group(1).split(","))
    assert {"gpu", "export", "plugins", "serve", "test"} <= wanted
    assert wanted <= set(_extras())


def test_constraints_come_from_installed_metadata_not_grep(gpu_stage: list[tuple[str, str]]) -> None:
    runs = _runs(gpu_stage)
    assert "scripts/pin_installed.py" in runs and "pip freeze" not in runs and "grep" not in runs
    assert re.search(r"pip install [^\n]*-c /opt/stlm/constraints\.txt [^\n]*\.\[gpu", runs)
    copies = [args for keyword, args in gpu_stage if keyword == "COPY"]
    assert any(c.startswith("scripts ") for c in copies)
    assert runs.index("pin_installed.py") < runs.index(".[gpu")


def test_onnxruntime_gpu_is_swapped_in_pinned_to_cuda_13(gpu_stage: list[tuple[str, str]]) -> None:
    runs = _runs(gpu_stage)
    pin = next(args for keyword, args in gpu_stage if keyword == "ARG" and args.startswith("ONNXRUNTIME_GPU="))
    assert pin == f"ONNXRUNTIME_GPU={ONNXRUNTIME_GPU_PIN}"
    swap = runs.index("pip uninstall -y onnxruntime")
    assert (
        swap > runs.index(".[gpu")
        and runs.index('pip install -c /opt/stlm/constraints.txt "${ONNXRUNTIME_GPU}"') > swap
    )
    assert "onnxruntime_conflict" in runs and "CUDAExecutionProvider" in runs
    gpu_extra = _extras()["gpu"]
    assert not any(r.startswith("onnxruntime") for r in gpu_extra), "the gpu extra must not pull a second ORT"


def test_torch_and_triton_are_the_cuda_13_builds(gpu_stage: list[tuple[str, str]]) -> None:
    index = next(args for keyword, args in gpu_stage if keyword == "ARG" and args.startswith("TORCH_INDEX="))
    assert index == f"TORCH_INDEX=https://download.pytorch.org/whl/cu{CUDA_MAJOR}0"
    runs = _runs(gpu_stage)
    assert '--extra-index-url "${TORCH_INDEX}"' in runs
    assert (
        "torch.version.cuda" in runs
        and f"startswith('{CUDA_MAJOR}')" in runs
        and "import onnxruntime, tensorrt, torch, triton" in runs
    )


def test_gpu_check_runs_inside_the_image(gpu_stage: list[tuple[str, str]]) -> None:
    copies = [args for keyword, args in gpu_stage if keyword == "COPY"]
    assert any(c.startswith("tests ") for c in copies) and any(c.startswith("scripts ") for c in copies)
    workdirs = [args for keyword, args in gpu_stage if keyword == "WORKDIR"]
    assert "/opt/stlm-src" in workdirs  # scripts/gpu_check.sh runs from the source tree copied there
    assert (ROOT / "scripts" / "gpu_check.sh").stat().st_mode & 0o111
    assert ("ENTRYPOINT", '["stlm"]') in gpu_stage


def test_pin_installed_reads_this_environment(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "pin_installed.py"
    proc = subprocess.run([sys.executable, str(script), "numpy|click"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"click=={metadata.version('click')}", f"numpy=={metadata.version('numpy')}"]
    none = subprocess.run([sys.executable, str(script), "tensorrt(-.*)?", "--require"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert none.returncode == (0 if none.stdout.strip() else 1)
    constraints = tmp_path / "c.txt"
    constraints.write_text(proc.stdout)
    check = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-c", str(constraints),
                            "numpy", "click"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert check.returncode == 0, check.stderr  # pip accepts the file as constraints


def test_pin_installed_matches_whole_normalized_names() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from pin_installed import normalize, pins
    finally:
        sys.path.pop(0)
    dists = {normalize(n): v for n, v in {"TensorRT_cu13": "11.4.0.106", "tensorrt": "11.4.0.106",
             "tensorrt-cu13-bindings": "11.4.0.106", "tensorrt-llm": "1.0", "polygraphy": "0.49.20",
             "nvidia-tensorrt-helper": "1"}.items()}  # fmt: skip
    assert pins("tensorrt(-.*)?|polygraphy", dists) == [
        "polygraphy==0.49.20", "tensorrt-cu13-bindings==11.4.0.106", "tensorrt-cu13==11.4.0.106",
        "tensorrt-llm==1.0", "tensorrt==11.4.0.106",
    ]  # fmt: skip
