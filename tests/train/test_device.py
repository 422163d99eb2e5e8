"""Precision by capability: auto is bf16 only where the CPU computes bf16 natively, fp32 (with a reason) elsewhere."""

import warnings

import pytest
import torch

from fastmae.train import device as dev
from tests.helpers.cli import make_fmnist

CPU = torch.device("cpu")


@pytest.fixture
def native(monkeypatch):
    """Set what the CPU capability check answers."""
    def set_native(value: bool) -> None:
        monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: value)
        dev.warn_emulated_bf16.cache_clear()
    return set_native


def test_auto_is_bf16_on_a_cpu_with_native_bf16(native):
    native(True)
    p = dev.resolve_precision("auto", CPU)
    assert p.name == "bf16" and str(p) == "bf16"


def test_auto_falls_back_to_fp32_and_says_why(native):
    native(False)
    p = dev.resolve_precision("auto", CPU)
    assert p.name == "fp32"
    assert str(p) == "fp32 (no native bf16 on this CPU)"


def test_explicit_bf16_without_native_bf16_works_but_warns_once(native):
    native(False)
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert dev.resolve_precision("bf16", CPU).name == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert dev.resolve_precision("bf16", CPU).name == "bf16"


def test_explicit_bf16_with_native_bf16_is_silent(native):
    native(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dev.resolve_precision("bf16", CPU).name == "bf16"


def test_fp16_on_cpu_and_unknown_names_are_clear_errors(native):
    native(True)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        dev.resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="auto, bf16, fp16, fp32"):
        dev.resolve_precision("int8", CPU)
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        dev.resolve_device("tpu")


def test_capability_check_answers_a_bool():
    dev.cpu_has_native_bf16.cache_clear()
    assert isinstance(dev.cpu_has_native_bf16(), bool)


def test_pretrain_startup_line_names_the_fallback(tmp_path, native, capsys):
    from fastmae.cli import main

    native(False)
    fmnist_dir = make_fmnist(tmp_path, 64, 16)
    code = main(["pretrain", "--data.path", str(fmnist_dir), "--data.limit", "64", "--optim.epochs", "1",
                 "--optim.batch_size", "32", "--run.output_dir", str(tmp_path / "run"), "--run.no_progress",
                 "--figure_every", "0", "--knn_every", "-1"])
    assert code == 0
    assert "fp32 (no native bf16 on this CPU) on cpu" in capsys.readouterr().out
