"""Piper's device: the CPU unless asked, and a plain error where CUDA was asked for and
onnxruntime's CUDA provider is missing (onnxruntime itself would fall back to the CPU with a
warning and the server would run on the CPU, unannounced)."""

from __future__ import annotations

import onnxruntime
import pytest

from live.settings import Settings
from live.speech import PiperEngine

NO_CUDA = "CUDAExecutionProvider" not in onnxruntime.get_available_providers()


@pytest.mark.skipif(not NO_CUDA, reason="onnxruntime-gpu is installed here")
def test_asked_for_cuda_without_its_provider_piper_says_so() -> None:
    with pytest.raises(RuntimeError, match=r"CUDA provider did not load.*onnxruntime-gpu"):
        PiperEngine(workers=1, use_cuda=True)


def test_piper_runs_on_the_cpu_unless_asked() -> None:
    settings = Settings.from_env({})
    assert settings.tts_device == "cpu"
    assert Settings.from_env({"LIVEVOICE_TTS_DEVICE": "cuda"}).tts_device == "cuda"
    engine = PiperEngine(workers=1)
    try:
        assert engine.device == "cpu"
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LIVEVOICE_TTS_DEVICE": "gpu"}, "LIVEVOICE_TTS_DEVICE"),
        ({"LIVEVOICE_DEVICE": "mps"}, "LIVEVOICE_DEVICE"),
    ],
)
def test_a_device_that_is_neither_cpu_nor_cuda_is_refused(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=f"{named}: expected cpu or cuda"):
        Settings.from_env(env)
