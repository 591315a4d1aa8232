import subprocess
import sys


def test_import_is_light():
    """`import evomerge` (and the CLI module) load no torch, transformers, ray or vllm."""
    code = ("import sys, evomerge, evomerge.cli, evomerge.fitness.backends; "
            "heavy = [m for m in ('torch', 'transformers', 'ray', 'vllm', 'datasets') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "evomerge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "merge" in out.stdout


def test_zoo_build_command_is_wired():
    out = subprocess.run([sys.executable, "-m", "evomerge", "zoo", "build", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--quick" in out.stdout
