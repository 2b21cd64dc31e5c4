"""A LiveKit Agents avatar worker: joins the room the agent dispatches it to, receives the agent's TTS audio
over LiveKit data streams and publishes the Live Avatar video and audio that a ``liveavatar serve`` makes.

    pip install "liveavatar[livekit]"
    liveavatar serve --ckpt_dir ckpt/Wan2.2-S2V-14B            # on the GPU machine
    LIVEAVATAR_URL=ws://gpu-box:7860/v1/live LIVEAVATAR_IMAGE=portrait.jpg \
        python examples/livekit_avatar_worker.py start            # LIVEKIT_URL / _API_KEY / _API_SECRET set

On the agent's side, send its audio to this worker with
``session.output.audio = DataStreamAudioOutput(room, destination_identity="liveavatar")``.
Not tested here (no LiveKit server can be installed); the generator itself is (tests/test_agents.py).
"""
import os

from livekit.agents import AgentServer, JobContext, cli
from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioReceiver

from liveavatar.agents.livekit import LiveAvatarVideoGenerator

server = AgentServer()


@server.rtc_session(agent_name="liveavatar")
async def avatar(ctx: JobContext) -> None:
    await ctx.connect()
    generator = LiveAvatarVideoGenerator(url=os.environ.get("LIVEAVATAR_URL", "ws://127.0.0.1:7860/v1/live"),
                                         image=os.environ["LIVEAVATAR_IMAGE"],
                                         token=os.environ.get("LIVEAVATAR_TOKEN"))
    await generator.start()
    runner = AvatarRunner(ctx.room, audio_recv=DataStreamAudioReceiver(ctx.room), video_gen=generator,
                          options=generator.avatar_options())
    ctx.add_shutdown_callback(runner.aclose)
    ctx.add_shutdown_callback(generator.aclose)
    await runner.start()
    await runner.wait_for_complete()


if __name__ == "__main__":
    cli.run_app(server)
