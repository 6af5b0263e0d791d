"""The launcher without a running server: flags, env vars, repository rendering, finding tritonserver."""
from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
import sysconfig
from pathlib import Path

import pytest

from tgi_backend.config import EngineConfig
from tgi_backend.launcher import cli, repository, tritonserver


def _pbtxt_params(text: str) -> dict[str, str]:
    pairs = re.findall(r'key: "([^"]+)"\s*value: \{ string_value: "((?:[^"\\]|\\.)*)" \}', text)
    return {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in pairs}


def test_defaults_follow_tgi_and_triton():
    args = cli.parse_args(["serve"], environ={})
    config = cli.engine_config(args)
    assert config.model_id == "demo" and config.max_concurrent_requests == 128
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    assert args.model_repository is None and args.tritonserver is None


def test_flags_map_onto_engine_config():
    args = cli.parse_args(
        ["serve", "--model-id", "org/m", "--revision", "v2", "--dtype", "float32", "--max-input-tokens", "30",
         "--max-total-tokens", "64", "--max-batch-prefill-tokens", "128", "--max-batch-total-tokens", "1024",
         "--max-concurrent-requests", "4", "--http-port", "1234"],
        environ={},
    )
    config = cli.engine_config(args)
    assert config == EngineConfig(
        model_id="org/m", revision="v2", dtype="float32", max_input_tokens=30, max_total_tokens=64,
        max_batch_prefill_tokens=128, max_batch_total_tokens=1024, max_concurrent_requests=4,
    )
    assert args.http_port == 1234


def test_env_vars_are_read_and_flags_win():
    env = {"MODEL_ID": "from-env", "MAX_TOTAL_TOKENS": "77", "GRPC_PORT": "9001",
           "TGI_TRITON_SERVER": "/x/tritonserver", "MODEL_REPOSITORY": "/tmp/r"}
    args = cli.parse_args(["serve", "--max-total-tokens", "99"], environ=env)
    assert args.model_id == "from-env" and args.max_total_tokens == 99 and args.grpc_port == 9001
    assert args.tritonserver == "/x/tritonserver" and args.model_repository == "/tmp/r"


def test_bad_env_value_and_missing_repository_fail_clearly():
    with pytest.raises(SystemExit):
        cli.parse_args(["serve"], environ={"MAX_TOTAL_TOKENS": "many"})
    with pytest.raises(SystemExit):
        cli.parse_args(["build-repo"], environ={})
    assert cli.parse_args(["build-repo"], environ={"MODEL_REPOSITORY": "/r"}).model_repository == "/r"
    with pytest.raises(SystemExit):
        cli.engine_config(cli.parse_args(["serve", "--dtype", "int3"], environ={}))


def test_render_writes_every_model_with_engine_parameters(tmp_path: Path):
    config = EngineConfig(model_id='/models/a "quoted" \\ dir', max_total_tokens=64, max_concurrent_requests=3)
    repository.render_repository(tmp_path, config)
    for name in repository.MODELS:
        assert (tmp_path / name / "config.pbtxt").is_file() and (tmp_path / name / "1").is_dir()
    llm = (tmp_path / "tgi_llm" / "config.pbtxt").read_text()
    assert "decoupled: true" in llm and "max_batch_size: 0" in llm and "KIND_CPU" in llm
    assert EngineConfig.from_strings(_pbtxt_params(llm)) == config
    pre = _pbtxt_params((tmp_path / "preprocessing" / "config.pbtxt").read_text())
    assert pre == {"model_id": config.model_id}
    assert (tmp_path / "tgi_llm" / "1" / "model.py").read_text().count("import") == 1
    assert "{{PARAMETERS}}" not in (tmp_path / "ensemble" / "config.pbtxt").read_text()


def test_render_replaces_our_models_and_keeps_others(tmp_path: Path):
    (tmp_path / "tgi_llm").mkdir()
    (tmp_path / "tgi_llm" / "stale.txt").write_text("x")
    (tmp_path / "other_model").mkdir()
    repository.render_repository(tmp_path, EngineConfig(model_id="m"))
    assert not (tmp_path / "tgi_llm" / "stale.txt").exists() and (tmp_path / "other_model").is_dir()


def test_build_repo_resolves_local_folders_and_passes_hub_ids_through(tmp_path: Path, monkeypatch):
    local = tmp_path / "model"
    local.mkdir()
    monkeypatch.chdir(tmp_path)
    config = repository.resolve_model_for_render(EngineConfig(model_id="model"), download=False)
    assert config.model_id == str(local)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = repository.resolve_model_for_render(EngineConfig(model_id="no-such-org/no-such-model"), download=False)
    assert hub.model_id == "no-such-org/no-such-model"


def test_build_repo_command(tmp_path: Path, capsys):
    out = tmp_path / "repo"
    assert cli.main(["build-repo", "--model-id", str(tmp_path), "--model-repository", str(out),
                     "--max-total-tokens", "48"]) == 0
    params = _pbtxt_params((out / "tgi_llm" / "config.pbtxt").read_text())
    assert params["model_id"] == str(tmp_path) and params["max_total_tokens"] == "48"
    assert "tritonserver --model-repository" in capsys.readouterr().out


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_explicit_then_path_then_bundle(tmp_path: Path):
    explicit = _executable(tmp_path / "opt" / "bin" / "tritonserver")
    (tmp_path / "opt" / "backends").mkdir()
    found = tritonserver.find_tritonserver(str(explicit))
    assert found.path == str(explicit) and found.backend_dir == str(tmp_path / "opt" / "backends")
    with pytest.raises(FileNotFoundError):
        tritonserver.find_tritonserver(str(tmp_path / "missing"))
    on_path = tritonserver.find_tritonserver(None, search_path=str(explicit.parent))
    assert on_path.path == str(explicit) and not on_path.bundled
    bundled = tritonserver.find_tritonserver(None, search_path=str(tmp_path / "empty"))
    assert bundled.bundled and bundled.path.endswith("bin/tritonserver")


def test_prepare_bundle_copies_the_matching_stub(tmp_path: Path):
    bundle = tritonserver.pytriton_bundle()
    assert bundle is not None
    prepared = tritonserver.prepare_bundle(bundle, str(tmp_path))
    stub = Path(prepared.backend_dir) / "python" / "triton_python_backend_stub"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    expected = bundle / "python_backend_stubs" / version / "triton_python_backend_stub"
    assert stub.read_bytes() == expected.read_bytes() and os.access(prepared.path, os.X_OK)
    assert not (tmp_path / "tritonserver" / "python_backend_stubs").exists()


def test_server_env_and_command(tmp_path: Path):
    env = tritonserver.server_env(True, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/keep"})
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert sysconfig.get_config_var("LIBDIR") in libs and libs[-1] == "/keep"
    assert any(p.endswith("nvidia_pytriton.libs") for p in libs)
    assert tritonserver.server_env(False, {"LD_LIBRARY_PATH": "/ngc"})["LD_LIBRARY_PATH"] == "/ngc"
    options = cli.server_options(cli.parse_args(["serve", "--http-port", "1", "--grpc-port", "2",
                                                 "--metrics-port", "3"], environ={}))
    binary = tritonserver.TritonBinary("/bin/tritonserver", "/b")
    cmd = tritonserver.server_command(binary, "/repo", options, "pfx_")
    assert {"--http-port=1", "--grpc-port=2", "--metrics-port=3", "--model-repository=/repo",
            "--backend-directory=/b", "--backend-config=python,shm-region-prefix-name=pfx_"} <= set(cmd)


def test_remove_shm_regions_only_touches_the_prefix(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(tritonserver, "SHM_DIR", str(tmp_path))
    (tmp_path / "run1_a").write_text("")
    (tmp_path / "run2_a").write_text("")
    assert len(tritonserver.remove_shm_regions("run1_")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run2_a"]


def test_prefix_caching_is_on_by_default_and_can_be_switched_off():
    from tgi_backend.launcher.cli import engine_config, parse_args

    assert engine_config(parse_args(["build-repo", "--model-repository", "r"], environ={})).enable_prefix_caching
    off = parse_args(["build-repo", "--model-repository", "r", "--no-enable-prefix-caching"], environ={})
    assert engine_config(off).enable_prefix_caching is False
    env = parse_args(["build-repo", "--model-repository", "r"], environ={"ENABLE_PREFIX_CACHING": "0"})
    assert engine_config(env).enable_prefix_caching is False


def test_stream_coalescing_is_off_by_default_and_reaches_the_model_config():
    from tgi_backend.config import EngineConfig
    from tgi_backend.launcher.cli import engine_config, parse_args

    assert engine_config(parse_args(["build-repo", "--model-repository", "r"], environ={})).stream_coalescing is False
    on = engine_config(parse_args(["build-repo", "--model-repository", "r", "--stream-coalescing"], environ={}))
    assert on.stream_coalescing is True
    assert EngineConfig.from_strings(on.to_strings()).stream_coalescing is True  # what tgi_llm reads back
    assert engine_config(parse_args(["build-repo", "--model-repository", "r"], environ={})).stream_interval == 1
    grouped = engine_config(parse_args(["build-repo", "--model-repository", "r", "--stream-interval", "4"], environ={}))
    assert EngineConfig.from_strings(grouped.to_strings()).stream_interval == 4
    with pytest.raises(ValueError, match="stream_interval"):
        dataclasses.replace(grouped, stream_interval=0).resolve(2048)
