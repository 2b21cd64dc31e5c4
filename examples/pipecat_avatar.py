"""A Pipecat pipeline with a Live Avatar face: text -> espeak-ng (offline TTS) -> the avatar of a
``liveavatar serve`` -> an mp4 of what a transport would play (the avatar's frames and their audio).

    pip install "liveavatar[pipecat]"
    liveavatar serve --ckpt_dir ckpt/Wan2.2-S2V-14B            # on the GPU machine
    python examples/pipecat_avatar.py --url ws://gpu-box:7860/v1/live --image examples/cyclops_baker.jpg \
        --output avatar.mp4 "Hello there." "I am the face of your voice agent."

In a voice agent, put ``LiveAvatarVideo`` between the TTS service (at 16 kHz mono) and the transport's
output: ``Pipeline([transport.input(), stt, llm, tts, LiveAvatarVideo(...), transport.output()])``.
"""
import argparse
import asyncio
from pathlib import Path

import numpy as np
from pipecat.frames.frames import EndFrame, OutputAudioRawFrame, OutputImageRawFrame, TextFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.workers.runner import WorkerRunner

from liveavatar.agents.pipecat import CommandTTS, LiveAvatarVideo
from liveavatar.serve.fmp4 import FragmentedMp4Writer
from liveavatar.serve.protocol import from_pcm16


class Mp4Sink(FrameProcessor):
    """Writes each image with the 40 ms of audio after it, as a transport would play them."""

    def __init__(self, output: Path):
        super().__init__()
        self.output, self.writer, self.image = output, None, None

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputImageRawFrame):
            width, height = frame.size
            self.image = np.frombuffer(frame.image, np.uint8).reshape(height, width, 3)
            if self.writer is None:
                self.writer = FragmentedMp4Writer(self.output, width=width, height=height)
        elif isinstance(frame, OutputAudioRawFrame) and self.image is not None:
            self.writer.write(self.image[None], from_pcm16(frame.audio))
        if isinstance(frame, EndFrame) and self.writer is not None:
            self.writer.close()
        await self.push_frame(frame, direction)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:7860/v1/live")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--output", default=Path("avatar.mp4"), type=Path)
    parser.add_argument("--token")
    parser.add_argument("text", nargs="+", help="what the avatar says, one TextFrame each")
    args = parser.parse_args()
    worker = PipelineWorker(Pipeline([CommandTTS(), LiveAvatarVideo(url=args.url, image=args.image, token=args.token),
                                      Mp4Sink(args.output)]))
    runner = WorkerRunner()
    await runner.add_workers(worker)
    await worker.queue_frames([*(TextFrame(text) for text in args.text), EndFrame()])
    await runner.run()
    print(f"-> {args.output}")


if __name__ == "__main__":
    asyncio.run(main())
