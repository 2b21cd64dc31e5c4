"""The live audio source's catch-up policy on a fake clock, the live setting's choice from a speed model, and
the TTS command's failures (each one line)."""
import numpy as np
import pytest

from liveavatar.errors import InputError
from liveavatar.geometry import ClipGeometry
from liveavatar.models.audio_features import AudioFeatureExtractor
from liveavatar.runtime.live_audio import LiveAudio
from liveavatar.serve.live_setting import choose_live_setting, describe
from liveavatar.serve.tts import synthesize


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def extractor(fixtures_dir) -> AudioFeatureExtractor:
    return AudioFeatureExtractor.from_pretrained(fixtures_dir / "weights" / "wav2vec2", device="cpu")


def test_audio_pushed_ahead_is_not_lag_and_past_the_bound_silence_goes_first_then_the_oldest_speech(extractor):
    clock = FakeClock()
    audio = LiveAudio(lag_bound_s=1.0, clock=clock)
    lags = []
    audio.on_lag = lambda lag_s, dropped_s, policy: lags.append((lag_s, dropped_s, policy))
    audio.block_features(extractor, ClipGeometry(64, 64, 48))
    tone = 0.2 * np.sin(np.arange(40000) * 2 * np.pi * 220 / 16000).astype(np.float32)
    audio.push(np.zeros(16000, np.float32))  # a burst at t = 0: 1 s of silence, then 2.5 s of speech
    audio.push(tone)
    assert audio.queued_seconds == 3.5 and audio.lag_seconds() == 0.0  # ahead of time, as a TTS pushes
    clock.now = 3.0  # nothing was consumed for 3 s: the queued audio will end 3 s late
    assert audio.lag_seconds() == 3.0
    audio.block(0, 0)
    assert lags == [(3.0, 2.0, "dropped the oldest queued speech")]  # 1 s of silence, then 1 s of speech
    assert audio.dropped == 32000 and audio.take_output(0, 9).input_range == (32000, 32000 + 9 * 640)


def test_the_live_setting_is_the_largest_ladder_size_and_most_steps_at_1_15x_real_time():
    rates = {("704*384", 4): 0.49, ("704*384", 3): 0.59, ("688*368", 4): 0.55, ("688*368", 3): 0.66,
             ("384*256", 4): 1.38, ("384*256", 3): 1.62}  # the speed model's H100 FP8 figures
    areas = {704 * 384: "704*384", 688 * 368: "688*368", 384 * 256: "384*256"}
    setting = choose_live_setting(lambda area, steps: rates[areas[area], steps], max_area=704 * 384, max_steps=4)
    assert setting.info() == {"size": "384*256", "sample_steps": 4, "predicted_rtf": 1.38, "policy": "auto"}
    assert setting.check("384*256", 3) == (1.62, None)
    rtf, warning = setting.check("704*384", 4)
    assert rtf == 0.49 and "falls 31 s further behind per minute" in warning
    faster = choose_live_setting(lambda area, steps: 2 * rates[areas[area], steps], max_area=704 * 384, max_steps=4)
    assert (faster.size, faster.sample_steps) == ("704*384", 3)  # 4 steps: 0.98x, 3 steps: 1.18x
    cpu = choose_live_setting(None, max_area=704 * 384, max_steps=4)
    assert (cpu.size, cpu.sample_steps, cpu.predicted_rtf) == ("384*256", 3, None)
    assert describe(cpu) == ("live setting: 384*256, 3 steps (no speed model on the CPU: the smallest size (give "
                             "--live-size / --live-steps to choose); --live auto)")
    with pytest.raises(InputError, match="--live strict refuses it"):
        choose_live_setting(lambda area, steps: rates[areas[area], steps], max_area=704 * 384, max_steps=4,
                            policy="strict").check("704*384", 4)


@pytest.mark.parametrize("command, message", [
    ("false", "say: the TTS command 'false' failed (exit 1: no message)"),
    ("no-such-tts-command", "say: the TTS command 'no-such-tts-command' is not installed (--tts-command names "
                            "another; Debian: apt install espeak-ng)"),
    ("cat", "say: the TTS command 'cat' did not write a WAV file on stdout"),
])
def test_a_failing_tts_command_is_one_line(command, message):
    with pytest.raises(InputError) as raised:
        synthesize("hello", command)
    assert str(raised.value) == message
