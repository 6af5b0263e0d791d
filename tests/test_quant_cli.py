"""Launcher flags for quantization and LoRA: TGI's names, env vars, early errors, Triton parameters."""
from __future__ import annotations

import pytest

from tgi_backend.config import EngineConfig
from tgi_backend.launcher import cli


def test_quantize_and_lora_flags_reach_the_engine_config(tmp_path):
    args = cli.parse_args(["serve", "--quantize", "bitsandbytes-nf4", "--lora-adapters", "a=/x/a,org/b",
                           "--lora-root", str(tmp_path), "--max-loras", "3"], environ={})
    config = cli.engine_config(args)
    assert (config.quantize, config.lora_adapters, config.lora_root, config.max_loras) == (
        "bitsandbytes-nf4", "a=/x/a,org/b", str(tmp_path), 3)
    back = EngineConfig.from_strings(config.to_strings())  # through the Triton model-config parameters
    assert (back.quantize, back.lora_adapters, back.lora_root, back.max_loras) == (
        config.quantize, config.lora_adapters, config.lora_root, 3)
    assert cli.engine_config(cli.parse_args(["serve"], environ={"QUANTIZE": "eetq"})).quantize == "eetq"
    assert EngineConfig.from_strings({"model_id": "m"}).quantize is None


@pytest.mark.parametrize("argv,message", [
    (["--quantize", "int3"], "--quantize must be one of"),
    (["--lora-adapters", "a=/x,a=/y"], "given twice"),
    (["--lora-root", "/no/such/folder"], "is not a folder"),
])
def test_bad_flags_fail_before_the_server_starts(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.engine_config(cli.parse_args(["serve", *argv], environ={}))
