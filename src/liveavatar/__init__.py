"""liveavatar: streaming inference engine for Live Avatar (Wan2.2-S2V-14B + Live-Avatar LoRA).

``from liveavatar import LiveAvatarPipeline`` gives the Python API; it is imported on first use, so that
``liveavatar --help`` and the input checks never load torch.
"""

__version__ = "0.1.0"
__all__ = ["LiveAvatarPipeline", "LiveAudio", "RequestOptions", "resolve_request"]


def __getattr__(name: str):
    if name == "LiveAvatarPipeline":
        from liveavatar.api import LiveAvatarPipeline

        return LiveAvatarPipeline
    if name == "LiveAudio":
        from liveavatar.runtime.live_audio import LiveAudio

        return LiveAudio
    if name == "resolve_request":
        from liveavatar.request import resolve_request

        return resolve_request
    if name == "RequestOptions":
        from liveavatar.options import RequestOptions

        return RequestOptions
    raise AttributeError(f"module 'liveavatar' has no attribute {name!r}")
