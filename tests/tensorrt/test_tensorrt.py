"""TensorRT: optimization profiles and engine compatibility as data, the engine commands' errors
where TensorRT is absent, the IOBinding ONNX Runtime backend, and (GPU only) a real engine
compared with ONNX Runtime."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fake_gpu import FakeCudart, drive, fake_tensorrt

from stlm.cli import cli
from stlm.errors import BackendUnavailableError, EngineCompatibilityError, InvalidArgumentError, PackageError
from stlm.export.engine import ENGINE_NAME, engine_extra
from stlm.package.config import ModelConfig, model_config_from_hf
from stlm.package.contract import ATTENTION_MASK, INPUT_IDS, LOGITS_INDEX, POSITION_IDS, decoder_contract, past_name
from stlm.package.manifest import read_manifest, write_manifest
from stlm.package.variant import Variant
from stlm.tensorrt.engine_manifest import REBUILD, check_engine_compat, version_key
from stlm.tensorrt.profiles import DECODE, PREFILL, Profile, engine_profiles, profile_shapes, select_profile

HF_BASE: dict[str, Any] = dict(
    model_type="stablelm",
    architectures=["StableLmForCausalLM"],
    vocab_size=50304,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    partial_rotary_factor=0.25,
)
CONFIGS = {
    "tiny": model_config_from_hf(
        {**HF_BASE, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 172}
    ),
    "stablelm-3b-4e1t": model_config_from_hf(
        {
            **HF_BASE,
            "hidden_size": 2560,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "intermediate_size": 6912,
        }
    ),
}


# -- optimization profiles ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "sizes",
    [
        dict(max_batch=1, max_seq_len=2),
        dict(max_batch=4, max_seq_len=None),
        dict(max_batch=8, max_seq_len=2048, opt_batch=2, opt_seq_len=1000),
        dict(max_batch=2, max_seq_len=64, prefill_chunk=64),
    ],
)
def test_profiles_cover_every_input_consistently(name: str, dtype: str, sizes: dict[str, Any]) -> None:
    cfg: ModelConfig = CONFIGS[name]
    contract = decoder_contract(cfg, Variant("tensorrt", "concat", "plugin", dtype, dtype, dtype))  # type: ignore[arg-type]
    profiles = engine_profiles(context_length=cfg.max_position_embeddings, **sizes)
    assert [p.name for p in profiles] == [DECODE, PREFILL]
    max_seq = sizes["max_seq_len"] or cfg.max_position_embeddings
    for profile in profiles:
        shapes = profile_shapes(contract, profile)
        assert set(shapes) == {s.name for s in contract.inputs}
        for name_, (lo, opt, hi) in shapes.items():
            assert len(lo) == len(opt) == len(hi) == len(next(s for s in contract.inputs if s.name == name_).axes)
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), (name_, lo, opt, hi)
        for k in range(3):  # kMIN, kOPT, kMAX must each satisfy the graph's shape constraints
            ids, mask, pos = shapes[INPUT_IDS][k], shapes[ATTENTION_MASK][k], shapes[POSITION_IDS][k]
            assert pos == ids
            for layer in range(cfg.num_layers):
                for kind in ("key", "value"):
                    kv = shapes[past_name(layer, kind)][k]
                    assert kv[0] == ids[0] == mask[0]
                    assert (kv[1], kv[3]) == (cfg.num_kv_heads, cfg.head_dim)
                    assert kv[2] + ids[1] == mask[1], "total must equal past + sequence"
        assert shapes[INPUT_IDS][2][0] == sizes["max_batch"]
        assert shapes[ATTENTION_MASK][2][1] == max_seq
    decode, prefill = (profile_shapes(contract, p) for p in profiles)
    chunk = sizes.get("prefill_chunk") or min(1024, max_seq)
    assert {s[1] for s in decode[INPUT_IDS]} == {1}
    assert decode[past_name(0, "value")][2][2] == max_seq - 1
    assert prefill[INPUT_IDS][2][1] == chunk
    assert prefill[past_name(0, "key")][0][2] == prefill[past_name(0, "key")][1][2] == 0  # tuned for a fresh prompt
    assert prefill[past_name(0, "key")][2][2] == max_seq - chunk
    assert decode[LOGITS_INDEX] == ((1, 1), (sizes.get("opt_batch", 1), 1), (sizes["max_batch"], 1))
    assert prefill[LOGITS_INDEX][2] == (sizes["max_batch"], chunk)  # every position of a chunk (perplexity)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(max_batch=0), "--max-batch 0"),
        (dict(max_batch=True), "--max-batch"),
        (dict(max_batch="4"), "'4'"),
        (dict(max_seq_len=5000), "--max-seq-len 5000"),
        (dict(max_seq_len=1), "--max-seq-len 1"),
        (dict(opt_batch=5), "--opt-batch 5"),
        (dict(opt_seq_len=300, max_seq_len=256), "--opt-seq-len 300"),
        (dict(opt_seq_len=0), "--opt-seq-len 0"),
        (dict(prefill_chunk=1), "--prefill-chunk 1"),
        (dict(prefill_chunk=2048, max_seq_len=1024), "--prefill-chunk 2048"),
    ],
)
def test_profile_arguments_are_validated(kwargs: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = dict(max_batch=4, max_seq_len=None, context_length=4096)
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError) as err:
        engine_profiles(**args)
    assert needle in str(err.value)
    assert "fix:" in str(err.value)


def test_runtime_picks_the_profile_for_each_step() -> None:
    profiles = engine_profiles(max_batch=2, max_seq_len=64, prefill_chunk=16, context_length=4096)
    assert select_profile(profiles, batch=2, sequence=1, past=0) == 0
    assert select_profile(profiles, batch=1, sequence=1, past=63) == 0
    assert select_profile(profiles, batch=2, sequence=16, past=0) == 1
    assert select_profile(profiles, batch=1, sequence=3, past=48) == 1  # a prompt chunk after a cached past
    assert select_profile(profiles, batch=1, sequence=17, past=0) is None  # longer prompts run in chunks
    assert select_profile(profiles, batch=1, sequence=3, past=49) is None  # then token by token
    assert select_profile(profiles, batch=3, sequence=1, past=0) is None
    assert select_profile(profiles, batch=1, sequence=1, past=64) is None
    assert [Profile.from_dict(json.loads(json.dumps(p.to_dict()))) for p in profiles] == list(profiles)


# -- engine compatibility ----------------------------------------------------------------------
def _extra(**overrides: Any) -> dict[str, Any]:
    profiles = engine_profiles(max_batch=2, max_seq_len=64, context_length=4096)
    record = engine_extra(
        trt_version="11.2.1.2",
        gpu_name="NVIDIA A100-SXM4-80GB",
        compute_capability=(8, 0),
        precision="fp16",
        kv_dtype="float16",
        profiles=profiles,
        hardware_compat="none",
        builder_optimization_level=3,
        source_package="/data/stablelm-onnx",
    )
    record.update(overrides)
    return json.loads(json.dumps(record))  # as read back from stlm.json


COMPAT_CASES = [
    # (extra overrides, TensorRT here, capability here, error needles or None)
    ({}, "11.2.1", (8, 0), None),
    ({}, "11.2.1.2", (8, 0), None),
    ({}, "11.3.0", (8, 0), ["TensorRT 11.2.1.2", "TensorRT 11.3.0"]),
    ({}, "10.15.1", (8, 0), ["11.2.1.2", "10.15.1"]),
    ({}, "11.2.1", (9, 0), ["compute capability 8.0", "compute capability 9.0", "A100", "--hardware-compat"]),
    ({}, "11.2.1", (8, 6), ["8.0", "8.6"]),
    ({"hardware_compat": "ampere_plus"}, "11.2.1", (9, 0), None),
    ({"hardware_compat": "ampere_plus"}, "11.2.1", (8, 6), None),
    ({"hardware_compat": "ampere_plus"}, "11.2.1", (7, 5), ["ampere_plus", "7.5"]),
    ({"hardware_compat": "ampere_plus"}, "11.4.0", (9, 0), ["11.2.1.2", "11.4.0"]),
]


@pytest.mark.parametrize("overrides, version, cc, needles", COMPAT_CASES)
def test_engine_compat(overrides: dict[str, Any], version: str, cc: tuple[int, int], needles: list[str] | None) -> None:
    extra = _extra(**overrides)
    if needles is None:
        check_engine_compat(extra, trt_version=version, compute_capability=cc, gpu_name="NVIDIA H100")
        return
    with pytest.raises(EngineCompatibilityError) as err:
        check_engine_compat(
            extra, trt_version=version, compute_capability=cc, gpu_name="NVIDIA H100", engine_dir="/data/engine"
        )
    message = str(err.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert "stlm build-engine /data/stablelm-onnx -o /data/engine" in message


def test_engine_compat_message_without_paths_shows_the_generic_command() -> None:
    extra = _extra(source_package=None)
    with pytest.raises(EngineCompatibilityError) as err:
        check_engine_compat(extra, trt_version="11.9.0", compute_capability=(8, 0))
    assert REBUILD in str(err.value)


@pytest.mark.parametrize(
    "broken", [{"tensorrt_version": None}, {"compute_capability": "eight"}, {"hardware_compat": "turing_plus"}]
)
def test_engine_compat_broken_record_is_a_package_error(broken: dict[str, Any]) -> None:
    extra = {k: v for k, v in _extra().items() if k not in broken or broken[k] is not None}
    extra.update({k: v for k, v in broken.items() if v is not None})
    with pytest.raises(PackageError):
        check_engine_compat(extra, trt_version="11.2.1", compute_capability=(8, 0))


def test_version_key() -> None:
    assert version_key("11.2.1.2") == version_key("11.2.1") == (11, 2, 1)
    assert version_key("10.0.1.post1") == (10, 0, 1)


# -- the commands where TensorRT / a GPU is missing ----------------------------------------------
def _tensorrt_here() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


needs_no_tensorrt = pytest.mark.skipif(_tensorrt_here(), reason="checks the message shown where TensorRT is absent")


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@needs_no_tensorrt
def test_build_engine_without_tensorrt_exits_2(package: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    code, output = run_cli(
        "build-engine",
        str(package),
        "-o",
        str(out),
        "--max-batch",
        "2",
        "--max-seq-len",
        "64",
        "--timing-cache",
        str(tmp_path / "t.cache"),
    )
    assert code == 2, output
    assert "Traceback" not in output
    assert "error: TensorRT is not installed" in output
    assert "stlm[gpu]" in output and "Dockerfile" in output
    assert not out.exists() and not (tmp_path / "t.cache").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--max-seq-len", "99999"], "--max-seq-len 99999"),
        (["--opt-batch", "9"], "--opt-batch 9"),
        (["--builder-optimization-level", "7"], "--builder-optimization-level 7"),
        (["--workspace-gib", "0"], "--workspace-gib 0"),
        (["--hardware-compat", "turing"], "turing"),
    ],
)
def test_build_engine_bad_arguments_exit_2(package: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    code, output = run_cli("build-engine", str(package), "-o", str(tmp_path / "engine"), *args)
    assert code == 2, output
    assert needle in output and "Traceback" not in output
    assert not (tmp_path / "engine").exists()


def test_build_engine_refuses_onnxruntime_only_packages(packages: dict[str, Path], tmp_path: Path) -> None:
    code, output = run_cli("build-engine", str(packages["hd16-inplace"]), "-o", str(tmp_path / "engine"))
    assert code == 2 and "kv_cache='inplace'" in output and "--target tensorrt" in output


def test_build_engine_refuses_non_empty_output(package: Path, tmp_path: Path) -> None:
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "keep.txt").write_text("x")
    code, output = run_cli("build-engine", str(package), "-o", str(tmp_path / "engine"))
    assert code == 2 and "already exists" in output and "--overwrite" in output


@needs_no_tensorrt
def test_build_engine_subprocess_has_no_traceback(package: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stlm", "build-engine", str(package), "-o", str(tmp_path / "e")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: TensorRT is not installed" in proc.stderr and "fix:" in proc.stderr
    assert proc.stdout == ""


def make_engine_folder(
    package: Path,
    out: Path,
    *,
    engine: bytes = b"not an engine",
    max_batch: int = 2,
    max_seq_len: int = 64,
    prefill_chunk: int | None = None,
) -> Path:
    """An engine-kind package made by hand from an ONNX package (its model.engine is no real engine)."""
    manifest = read_manifest(package)
    profiles = engine_profiles(
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        prefill_chunk=prefill_chunk,
        context_length=manifest.generation.context_length,
    )
    manifest = dataclasses.replace(
        manifest,
        kind="tensorrt",
        graph=ENGINE_NAME,
        generation=dataclasses.replace(manifest.generation, context_length=max_seq_len),
        extra=engine_extra(
            trt_version="11.2.1",
            gpu_name="NVIDIA A100",
            compute_capability=(8, 0),
            precision=manifest.dtype,
            kv_dtype=manifest.contract.kv_dtype,
            profiles=profiles,
            hardware_compat="none",
            builder_optimization_level=3,
            source_package=str(package),
        ),
    )
    out.mkdir()
    (out / ENGINE_NAME).write_bytes(engine)
    shutil.copyfile(package / manifest.tokenizer, out / manifest.tokenizer)
    write_manifest(out, manifest)
    return out


@needs_no_tensorrt
def test_generate_engine_package_without_tensorrt_exits_2(package: Path, tmp_path: Path) -> None:
    engine = make_engine_folder(package, tmp_path / "engine")
    assert read_manifest(engine).kind == "tensorrt"
    code, output = run_cli("generate", str(engine), "-p", "Hello", "-n", "2")
    assert code == 2, output
    assert "Traceback" not in output and "error: TensorRT is not installed" in output

    from stlm.runtime import Generator

    with pytest.raises(BackendUnavailableError):
        Generator.load(engine)


def test_tensorrt_backend_module_imports_without_torch_or_tensorrt() -> None:
    code = (
        "import sys, stlm.runtime.tensorrt_backend, stlm.runtime.onnxruntime_backend, stlm.export.engine; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'tensorrt')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- the TensorRT backend's own logic, on stand-ins for TensorRT and CUDA -------------------------
FAKE_BUILD = dict(max_batch=3, max_seq_len=64, prefill_chunk=8)


def _install_fake_gpu(
    monkeypatch: pytest.MonkeyPatch, onnx_package: Path, profiles: list[Profile] | None = None
) -> FakeCudart:
    """Replace cuda-python and TensorRT; the fake engine is "built" from ``onnx_package`` with
    ``profiles`` (by default what `stlm build-engine` makes for FAKE_BUILD), not read from a manifest."""
    import stlm.tensorrt.gpu as gpu

    cudart = FakeCudart()
    if profiles is None:
        context = read_manifest(onnx_package).generation.context_length
        profiles = engine_profiles(**FAKE_BUILD, context_length=context)  # type: ignore[arg-type]
    monkeypatch.setattr(gpu, "_cudart", cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(cudart, onnx_package, profiles))
    return cudart


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, package: Path, tmp_path: Path) -> tuple[Path, Any]:
    """An engine folder whose "engine" runs ``package`` with ONNX Runtime on host "device" memory."""
    engine = make_engine_folder(package, tmp_path / "engine", engine=b"fake engine", **FAKE_BUILD)
    return engine, _install_fake_gpu(monkeypatch, package)


def test_tensorrt_backend_matches_onnxruntime_on_fake_gpu(fake_gpu: tuple[Path, Any], package: Path) -> None:
    """Prompts longer than the prefill chunk, idle rows, rows released and restarted after a long
    past, and more steps than the cache has columns (so it is compacted on the "device")."""
    from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from stlm.runtime.tensorrt_backend import TensorRTBackend

    engine, cudart = fake_gpu
    trt_backend = TensorRTBackend(engine, read_manifest(engine))
    ort_backend = OnnxRuntimeBackend(package, read_manifest(package))
    assert read_manifest(package).variant.kv_cache == "concat" and read_manifest(package).dtype == "fp32"
    ort_cache, trt_cache = drive([ort_backend, trt_backend], batch=3, capacity=12, steps=60, seed=3, tol=1e-5)
    assert trt_cache.columns == 40 and trt_cache.width < 40 < ort_cache.mask.shape[1]
    assert set(trt_backend.engine.context.switches) == {0, 1}
    assert cudart.pending() == 0 and sys.modules["tensorrt"].errors == []


def test_tensorrt_generator_on_fake_gpu(fake_gpu: tuple[Path, Any], package: Path) -> None:
    from stlm.runtime import Generator

    engine, _ = fake_gpu
    prompts = ["The capital of France is a city that", "Once"]  # the first is longer than the chunk
    got = Generator.load(engine).complete(prompts, temperature=0, max_new_tokens=20)
    want = Generator.load(package).complete(prompts, temperature=0, max_new_tokens=20)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_tensorrt_backend_limits_on_fake_gpu(fake_gpu: tuple[Path, Any]) -> None:
    from stlm.runtime.tensorrt_backend import TensorRTBackend

    engine, _ = fake_gpu
    backend = TensorRTBackend(engine, read_manifest(engine))
    with pytest.raises(InvalidArgumentError, match="maximum of 3"):
        backend.new_cache(4, 10)
    with pytest.raises(InvalidArgumentError, match="maximum of 64"):
        backend.new_cache(1, 65)
    cache = backend.new_cache(2, 10)
    with pytest.raises(InvalidArgumentError, match="would hold 11 tokens"):
        backend.forward(cache, [list(range(11)), []])


def test_tensorrt_backend_refuses_other_tensorrt_version(fake_gpu: tuple[Path, Any]) -> None:
    from stlm.runtime.tensorrt_backend import TensorRTBackend

    engine, _ = fake_gpu
    sys.modules["tensorrt"].__version__ = "11.3.0"
    code, output = run_cli("generate", str(engine), "-p", "Hi", "-n", "2")
    assert code == 2 and "TensorRT 11.2.1" in output and "TensorRT 11.3.0" in output
    assert f"-o {engine}" in output and "Traceback" not in output
    with pytest.raises(EngineCompatibilityError):
        TensorRTBackend(engine, read_manifest(engine))


def test_fake_stream_work_completes_only_on_synchronize(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake is as lazy as a real stream: nothing queued is done before cudaStreamSynchronize."""
    import numpy as np

    import stlm.tensorrt.gpu as gpu

    cudart = FakeCudart()
    monkeypatch.setattr(gpu, "_cudart", cudart)
    stream, buf = gpu.Stream(), gpu.DeviceBuffer(1024)
    assert not isinstance(stream.stream, int) and isinstance(stream.handle, int)
    assert buf.ptr % 256 == 0
    host = np.arange(16, dtype=np.int64)
    stream.htod(buf.ptr, host)
    assert (cudart.view(buf.ptr, (16,), np.int64) != host).all()  # still the allocation's garbage
    back = np.zeros(16, dtype=np.int64)
    stream.dtoh(back, buf.ptr)
    host[:] = -1  # changed before the sync: what the copy sees, as with pinned memory
    assert not back.any() and cudart.pending() == 2
    stream.synchronize()
    assert (back == -1).all() and cudart.pending() == 0
    with pytest.raises(AssertionError, match="outside every allocation"):
        stream.htod(buf.ptr + 1000, host)


def test_fake_engine_is_strict_about_ranks_addresses_and_streams(
    monkeypatch: pytest.MonkeyPatch, package: Path
) -> None:
    import stlm.tensorrt.gpu as gpu

    cudart = _install_fake_gpu(monkeypatch, package)
    trt = sys.modules["tensorrt"]
    engine = trt.Runtime(None).deserialize_cuda_engine(b"fake engine")
    assert trt.Runtime(None).deserialize_cuda_engine(b"other bytes") is None
    context = engine.create_execution_context()
    stream = gpu.Stream()
    assert context.set_optimization_profile_async(0, stream.handle)
    assert not context.set_input_shape(INPUT_IDS, (1, 1, 1))  # rank 3 for a rank-2 input: refused, not truncated
    assert not context.set_input_shape(INPUT_IDS, (1,))
    assert not context.set_input_shape(INPUT_IDS, (1, 2))  # decode profile: one token
    assert context.set_input_shape(INPUT_IDS, (1, 1))
    assert not context.set_tensor_address(INPUT_IDS, gpu.DeviceBuffer(512).ptr + 8)  # unaligned
    with pytest.raises(TypeError, match="not an int"):
        context.execute_async_v3(stream.stream)  # the cudaStream_t object, not its handle
    with pytest.raises(TypeError):
        context.set_optimization_profile_async(1, stream.stream)
    assert not context.execute_async_v3(stream.handle)  # shapes and addresses missing
    assert engine.get_tensor_dtype(past_name(0, "key")) == trt.DataType.FLOAT
    assert engine.num_optimization_profiles == 2 and len(trt.errors) == 5
    assert cudart.pending() == 0


def test_tensorrt_backend_refuses_an_engine_whose_dtypes_differ_from_its_manifest(
    monkeypatch: pytest.MonkeyPatch, checkpoint: Path, package: Path, tmp_path: Path
) -> None:
    """The engine (built from an fp16 package) is asked for its tensor types: an fp32 manifest is refused."""
    from stlm.export.onnx_export import export_onnx
    from stlm.runtime.tensorrt_backend import TensorRTBackend

    fp16 = export_onnx(checkpoint, tmp_path / "fp16", dtype="fp16", kv_cache="concat")
    engine = make_engine_folder(package, tmp_path / "engine", engine=b"fake engine", **FAKE_BUILD)
    _install_fake_gpu(monkeypatch, fp16)
    with pytest.raises(PackageError, match="float16") as err:
        TensorRTBackend(engine, read_manifest(engine))
    assert "--overwrite" in str(err.value)


@pytest.mark.parametrize("build", [dict(max_batch=3, max_seq_len=64, prefill_chunk=16), "decode only"])
def test_tensorrt_backend_refuses_an_engine_with_other_profiles(
    monkeypatch: pytest.MonkeyPatch, package: Path, tmp_path: Path, build: Any
) -> None:
    """Profiles come from the engine: a manifest that records other ones is refused at load."""
    from stlm.runtime.tensorrt_backend import TensorRTBackend

    engine = make_engine_folder(package, tmp_path / "engine", engine=b"fake engine", **FAKE_BUILD)
    context = read_manifest(package).generation.context_length
    if build == "decode only":
        profiles = engine_profiles(**FAKE_BUILD, context_length=context)[:1]  # type: ignore[arg-type]
    else:
        profiles = engine_profiles(**build, context_length=context)
    _install_fake_gpu(monkeypatch, package, profiles)
    with pytest.raises(PackageError, match="optimization profile"):
        TensorRTBackend(engine, read_manifest(engine))


# -- on a GPU: a real engine ---------------------------------------------------------------------
def _require_gpu() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'stlm[gpu]')")
    from stlm.tensorrt.gpu import gpu_info

    try:
        gpu_info(0)
    except BackendUnavailableError as exc:
        pytest.skip(f"no CUDA GPU: {exc.problem}")


@pytest.fixture(scope="module")
def engine_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny `--target tensorrt` export of the session checkpoint, built into an engine."""
    _require_gpu()
    from stlm.export.engine import build_engine
    from stlm.export.onnx_export import export_onnx

    base = tmp_path_factory.mktemp("tensorrt")
    onnx_dir = export_onnx(checkpoint, base / "onnx", rotary="plugin", kv_cache="concat")
    return build_engine(
        onnx_dir,
        base / "engine",
        max_batch=3,
        max_seq_len=64,
        opt_seq_len=16,
        prefill_chunk=8,
        timing_cache=base / "timing.cache",
    )


@pytest.mark.gpu
def test_engine_package_records_its_build(engine_dir: Path) -> None:
    manifest = read_manifest(engine_dir)
    assert manifest.kind == "tensorrt" and (engine_dir / ENGINE_NAME).stat().st_size > 0
    extra = manifest.extra
    assert extra["precision"] == "fp32" and extra["hardware_compat"] == "none"
    assert [p["name"] for p in extra["profiles"]] == [DECODE, PREFILL]
    assert extra["plugin"]["id"] == "stlm::partial_rotary"
    assert manifest.generation.context_length == 64
    assert (engine_dir.parent / "timing.cache").stat().st_size > 0


@pytest.mark.gpu
def test_engine_logits_match_onnxruntime(engine_dir: Path, package: Path) -> None:
    """Ragged prompts longer than the prefill chunk, idle rows, released rows with new prompts
    after a cached past, and enough steps to force on-device compaction of the cache."""
    from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from stlm.runtime.tensorrt_backend import TensorRTBackend

    trt_backend = TensorRTBackend(engine_dir, read_manifest(engine_dir))
    ort_backend = OnnxRuntimeBackend(package, read_manifest(package))
    assert read_manifest(package).variant.kv_cache == "concat"
    # fp32 engine vs fp32 ONNX Runtime on the CPU: only summation order (and, unless the build clears
    # BuilderFlag.TF32, TF32 tensor-core matmuls) differ: the fp32 class of stlm.quality.tolerance.
    ort_cache, trt_cache = drive([ort_backend, trt_backend], batch=3, capacity=12, steps=60, seed=3, tol=1e-3)
    assert trt_cache.columns == 40 and ort_cache.mask.shape[1] > 60
    assert trt_cache.width < 40  # the cache was compacted on the device, more than once


@pytest.mark.gpu
def test_engine_greedy_tokens_match_onnxruntime(engine_dir: Path, package: Path) -> None:
    from stlm.runtime import Generator

    prompts = ["The capital of France is", "Once upon a time there was a little"]
    got = Generator.load(engine_dir).complete(prompts, temperature=0, max_new_tokens=12)
    want = Generator.load(package).complete(prompts, temperature=0, max_new_tokens=12)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


class _RecordingConfig:
    """What the builder config is told (a stand-in for IBuilderConfig's setters)."""

    def __init__(self) -> None:
        self.cleared: list[str] = []
        self.profiles = 0

    def clear_flag(self, flag: str) -> None:
        self.cleared.append(flag)

    def add_optimization_profile(self, profile: object) -> None:
        self.profiles += 1

    def create_timing_cache(self, data: bytes) -> object:
        return object()

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        return True


class _RecordingProfile:
    def set_shape(self, name: str, lo: object, opt: object, hi: object) -> None:
        pass


@pytest.mark.parametrize(("dtype", "tf32_cleared"), [("fp32", True), ("fp16", False)])
def test_builder_config_clears_tf32_for_fp32_packages(package: Path, dtype: str, tf32_cleared: bool) -> None:
    """TF32 (on by default) would round an fp32 package's matmul inputs to 10-bit mantissas."""
    from types import SimpleNamespace

    from stlm.export.engine import BuildOptions, _builder_config

    source = read_manifest(package)
    variant = dataclasses.replace(source.variant, weight_dtype=dtype, compute_dtype=dtype)
    source = dataclasses.replace(source, variant=variant)
    config = _RecordingConfig()
    builder = SimpleNamespace(create_builder_config=lambda: config, create_optimization_profile=_RecordingProfile)
    trt = SimpleNamespace(BuilderFlag=SimpleNamespace(TF32="TF32"))
    profiles = engine_profiles(max_batch=2, max_seq_len=64, context_length=source.generation.context_length)
    assert _builder_config(trt, builder, source, profiles, BuildOptions()) == (config, True)
    assert (config.cleared == ["TF32"]) is tf32_cleared and config.profiles == 2


class _CacheConfig:
    """IBuilderConfig's timing-cache calls: ``readable`` bytes parse, ``matching`` ones fit this GPU."""

    def __init__(self, readable: bool, matching: bool) -> None:
        self.readable, self.matching = readable, matching
        self.set: list[object] = []

    def create_timing_cache(self, data: bytes) -> object | None:
        return ("cache", data) if not data or self.readable else None

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        self.set.append(cache)
        return cache == ("cache", b"") or self.matching


@pytest.mark.parametrize(
    ("content", "readable", "matching", "replaceable"),
    [
        (None, True, True, True),
        (b"ours", True, True, True),
        (b"notes", False, False, False),
        (b"a100", True, False, False),
    ],
)
def test_timing_cache_replaced_only_when_read_as_ours(
    tmp_path: Path, content: bytes | None, readable: bool, matching: bool, replaceable: bool
) -> None:
    """A file that is no timing cache, or one for another GPU/TensorRT, is never overwritten."""
    from stlm.export.engine_build import load_timing_cache

    path = tmp_path / "gpu.timing"
    if content is not None:
        path.write_bytes(content)
    config = _CacheConfig(readable, matching)
    assert load_timing_cache(config, path) is replaceable
    assert config.set[-1] == ("cache", content or b"") if replaceable else config.set[-1] == ("cache", b"")
