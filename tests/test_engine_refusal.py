"""Accelerate engines other than DDP are refused at start, with one line naming the engine and what is supported,
before any data is read or any output is written: through the commands in-process and through a real
``accelerate launch`` with an accelerate config that asks for FSDP."""

import sys

import pytest

from conftest import run_cli
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.commands import search as search_command

COMMANDS = {"nasiam-pretrain": pretrain_command.main, "nasiam-search": search_command.main}
ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
           "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_auto_wrap_policy: NO_WRAP
mixed_precision: 'no'
num_machines: 1
num_processes: 1
use_cpu: true
"""


def refusal_line(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("variable", ENGINES)
@pytest.mark.parametrize("command", COMMANDS)
def test_unsupported_engine_is_refused_before_any_data(command, variable, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(variable, "true")
    missing = tmp_path / "not-there.parquet"  # reading the data first would fail on this file instead
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command](["--train_file", str(missing), "--output_dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = refusal_line(err)
    assert len(lines) == 1 and err.strip() == lines[0]
    assert f"{ENGINES[variable]} was requested ({variable}=true" in lines[0]
    assert "supports DDP" in lines[0] and "alpha step" in lines[0]
    assert "not-there" not in err and not out.exists()


def test_false_values_leave_the_engine_alone(tmp_path, monkeypatch, capsys):
    """Accelerate writes ACCELERATE_USE_FSDP=false for a DDP config: that is not a request."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    with pytest.raises(SystemExit) as exit_info:
        pretrain_command.main(["--train_file", str(tmp_path / "not-there.parquet"), "--output_dir",
                               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "not-there" in err and "FSDP" not in err  # it went on to the data


def test_accelerate_launch_with_an_fsdp_config_is_refused(tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    out = tmp_path / "out"
    result = run_cli([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                      "training/search.py", "--train_file", str(tmp_path / "not-there.parquet"), "--output_dir",
                      str(out)], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    log = result.stdout + result.stderr
    lines = refusal_line(log)
    # accelerate starts FSDP runs through torchrun: the script exits 2, the launcher reports it and exits 1
    assert result.returncode != 0 and "exitcode: 2" in log.replace("  ", " ").replace(" :", ":")
    assert len(lines) == 1 and "FSDP was requested (ACCELERATE_USE_FSDP=true" in lines[0], log[-3000:]
    assert "not-there" not in log and not out.exists()
