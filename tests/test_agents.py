"""The voice-agent adapters against a real server on the tiny checkpoints: the Pipecat processor inside a real
Pipecat pipeline fed by espeak-ng speech (frame count, each frame's own 40 ms of audio, an interruption
that silences the avatar within one block, one error for audio at the wrong rate), and the LiveKit
`VideoGenerator` driven through livekit-agents' own types (`QueueAudioOutput` as the agent's audio output,
`rtc.AudioFrame`, `AudioSegmentEnd`, `clear_buffer`). No LiveKit server runs here: rooms, track publishing
and the `AvatarRunner` are not exercised."""
import asyncio

import numpy as np
import pytest

pytest.importorskip("fastapi")
pipecat = pytest.importorskip("pipecat")
pytest.importorskip("livekit.agents")

from pipecat.frames.frames import (EndFrame, InterruptionFrame, OutputAudioRawFrame, OutputImageRawFrame, TextFrame,
                                   TTSAudioRawFrame)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.workers.runner import WorkerRunner

from liveavatar.agents.pipecat import CommandTTS, LiveAvatarVideo
from liveavatar.serve.local import LocalServer
from liveavatar.serve.protocol import from_pcm16, to_pcm16
from liveavatar.serve.tts import synthesize
from test_serve_jobs import backend, tiny  # noqa: F401 (module fixtures)
from test_serve_live import LIVE, SMALL

SPEECH = "Hello there. I am your voice agent's face."


class Collect(FrameProcessor):
    """The end of the pipeline: what a transport would play."""

    def __init__(self):
        super().__init__()
        self.frames = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, (OutputImageRawFrame, OutputAudioRawFrame)):
            self.frames.append(frame)
        await self.push_frame(frame, direction)


@pytest.fixture
def server(backend, tiny):
    with LocalServer(backend, live_setting=LIVE) as running:
        yield running


def _run(server, media_dir, script):
    """Run TTS -> avatar -> collector with ``script(task, avatar)`` queueing the frames; returns (avatar, frames,
    errors)."""
    avatar = LiveAvatarVideo(url=server.ws_url, image=media_dir / "cyclops_baker.jpg", **SMALL)
    collect = Collect()
    task = PipelineWorker(Pipeline([CommandTTS(), avatar, collect]))
    errors = []

    @task.event_handler("on_pipeline_error")
    async def on_error(task, frame):
        errors.append(frame.error)

    async def main():
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(task)
        running = asyncio.create_task(runner.run())
        await script(task, avatar)
        await asyncio.wait_for(running, 60)

    asyncio.run(main())
    return avatar, collect.frames, errors


def test_pipecat_avatar_emits_each_frame_with_its_own_audio_for_espeak_speech(server, media_dir):
    async def script(task, avatar):
        await task.queue_frames([TextFrame(SPEECH), EndFrame()])

    avatar, frames, errors = _run(server, media_dir, script)
    assert errors == [] and avatar.session.events == []
    images = [f for f in frames if isinstance(f, OutputImageRawFrame)]
    sounds = [f for f in frames if isinstance(f, OutputAudioRawFrame)]
    assert len(images) == sum(len(b["timestamps"]) for b in avatar.blocks) == 12 * len(avatar.blocks) - 3
    assert [type(f) for f in frames] == [OutputImageRawFrame, OutputAudioRawFrame] * len(images)  # 25 fps, paired
    assert all(s.num_frames == 640 and s.sample_rate == 16000 for s in sounds) and images[0].size == (64, 64)
    assert all(b["audio_samples"] == 640 * len(b["timestamps"]) for b in avatar.blocks)
    spoken = [b["input_samples"] for b in avatar.blocks if b["input_samples"]]
    expected = from_pcm16(to_pcm16(synthesize(SPEECH)))
    assert spoken[0][0] == 0 and spoken[-1][1] == len(expected)  # every TTS sample shown, once, in order
    heard = np.concatenate([from_pcm16(s.audio) for s in sounds])
    start = avatar.blocks[0]["audio_start"]
    assert start == 0 and np.array_equal(heard[:len(expected)], expected)


def test_pipecat_interruption_silences_the_avatar_within_one_block_and_bad_audio_is_one_error(server, media_dir):
    sent_at = []

    async def script(task, avatar):
        await task.queue_frames([TextFrame(SPEECH + " " + SPEECH)])
        while len(avatar.blocks) < 2:
            await asyncio.sleep(0.01)
        sent_at.append(len(avatar.blocks))
        await task.queue_frame(InterruptionFrame())
        wrong = TTSAudioRawFrame(audio=bytes(960), sample_rate=24000, num_channels=1)
        await task.queue_frames([wrong, wrong, EndFrame()])

    avatar, frames, errors = _run(server, media_dir, script)
    assert errors == ["LiveAvatarVideo: audio at 24000 Hz with 1 channel; the avatar takes 16000 Hz mono PCM16 (set "
                      "the TTS's sample rate to 16000 and one channel)"]
    later = avatar.blocks[sent_at[0] + 2:]
    assert later and not any(b["speech"] for b in later)
    spoken = max(b["input_samples"][1] for b in avatar.blocks if b["input_samples"])
    assert spoken < len(synthesize(SPEECH))


def test_livekit_generator_driven_by_livekit_agents_types(server, media_dir):
    from livekit import rtc
    from livekit.agents.voice.avatar import AudioSegmentEnd, QueueAudioOutput

    from liveavatar.agents.livekit import LiveAvatarVideoGenerator

    speech = to_pcm16(synthesize("Hello from LiveKit."))
    answer = to_pcm16(synthesize(SPEECH + " " + SPEECH))

    async def main():
        generator = LiveAvatarVideoGenerator(url=server.ws_url, image=media_dir / "cyclops_baker.jpg", **SMALL)
        await generator.start()
        options = generator.avatar_options()
        assert (options.video_width, options.video_fps, options.audio_sample_rate) == (64, 25, 16000)
        output = QueueAudioOutput(sample_rate=16000)  # the agent side's audio output, as the avatar IO uses it
        output.on("clear_buffer", lambda: asyncio.ensure_future(generator.clear_buffer()))

        async def say(pcm):
            for offset in range(0, len(pcm), 640):  # 20 ms frames
                chunk = pcm[offset:offset + 640]
                await output.capture_frame(rtc.AudioFrame(chunk, 16000, 1, len(chunk) // 2))
            output.flush()

        async def forward():
            async for frame in output:
                await generator.push_audio(frame)

        frames = generator.__aiter__()
        received = []

        async def until(done):
            while not done():
                received.append(await frames.__anext__())

        pump = asyncio.create_task(forward())
        await say(speech)
        await asyncio.wait_for(until(lambda: received and isinstance(received[-1], AudioSegmentEnd)), 60)
        segment = list(received)
        await say(answer)
        spoken = lambda: sum(1 for b in generator.blocks if b["input_samples"] and b["input_samples"][1] > len(speech) // 2)
        await asyncio.wait_for(until(lambda: spoken() >= 2), 60)
        output.clear_buffer()  # the agent is interrupted: the runner calls clear_buffer
        cleared = len(generator.blocks)
        await asyncio.wait_for(until(lambda: len(generator.blocks) >= cleared + 4), 60)
        with pytest.raises(Exception, match="48000 Hz with 2 channels"):
            await generator.push_audio(rtc.AudioFrame(bytes(3840), 48000, 2, 960))
        pump.cancel()
        await generator.aclose()
        return segment, generator.blocks, cleared

    segment, blocks, cleared = asyncio.run(main())
    video = [f for f in segment if isinstance(f, rtc.VideoFrame)]
    audio = [f for f in segment if isinstance(f, rtc.AudioFrame)]
    assert len(video) == len(audio) and all(a.samples_per_channel == 640 for a in audio)
    assert video[0].width == 64 and video[0].type == rtc.VideoBufferType.RGBA
    heard = np.concatenate([np.frombuffer(bytes(a.data), "<i2") for a in audio])
    assert np.array_equal(heard[:len(speech) // 2], np.frombuffer(speech, "<i2"))  # the segment, then its end
    assert not any(b["speech"] for b in blocks[cleared + 2:])  # clear_buffer: silent within one block
