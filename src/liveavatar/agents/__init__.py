"""Voice-agent adapters over the live session protocol (each works against any ``liveavatar serve``):
`liveavatar.agents.pipecat` (``pip install "liveavatar[pipecat]"``) and `liveavatar.agents.livekit`
(``pip install "liveavatar[livekit]"``), both built on `liveavatar.agents.session`."""
