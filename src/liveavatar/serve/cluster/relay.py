"""``/v1/live`` at the cluster's ingress: the start message is checked here (the same `parse_start` as the
single-process server), then the session is one streaming call to the engine deployment, which stays on
the replica that took it for the session's life; the client's audio and controls follow it there by name
(`routing.PinnedOrShortestQueue`), in order, one batch in flight at a time.

Past the global cap on waiting work the client gets ``{"type": "busy", "retry_after_s"}`` and close code
1013 (try again later) at once. When the replica dies, or sends nothing for ``WATCHDOG_S`` (it sends a
keep-alive every second), the client gets an ``error`` message and close code 1011 within that time.
"""
from __future__ import annotations

import asyncio
import json
import secrets

from starlette.websockets import WebSocket, WebSocketDisconnect

from liveavatar.errors import InputError
from liveavatar.serve.cluster.dispatch import ASSIGN_TIMEOUT_S, WATCHDOG_S, cause_line
from liveavatar.serve.jobs import ServerBusy, error_line
from liveavatar.serve.live import BAD_INPUT_CLOSE, INTERNAL_CLOSE, parse_start
from liveavatar.serve.protocol import CONTROL_TYPES

TRY_AGAIN_LATER_CLOSE = 1013
PUSH_TIMEOUT_S = 5.0


async def relay_live(websocket: WebSocket, server) -> None:
    await websocket.accept()
    try:
        start = json.loads(await websocket.receive_text())
        if not isinstance(start, dict) or start.get("type") != "start":
            raise InputError('the first message must be {"type": "start", ...} (see the README\'s live protocol)')
        spec, options = await asyncio.to_thread(parse_start, start, server)
    except (InputError, ValueError) as error:
        await _close(websocket, {"type": "error", "message": error_line(error)}, BAD_INPUT_CLOSE)
        return
    except WebSocketDisconnect:
        return
    queue = server.queue
    try:
        queue.admit()
    except ServerBusy as error:
        await _close(websocket, {"type": "busy", "message": str(error), "retry_after_s": error.retry_after_s},
                     TRY_AGAIN_LATER_CLOSE)
        return
    session_id = secrets.token_hex(8)
    queue.live_waiting += 1
    waiting = True
    inbox: asyncio.Queue = asyncio.Queue()
    reader = asyncio.create_task(_read_client(websocket, inbox))
    forwarder = call = replica = None
    try:
        replica = await queue.take_replica()
        call = queue.engine.options(stream=True).live.remote(session_id, spec, options, replica=replica)
        first = True
        position = None
        while True:
            following = asyncio.ensure_future(call.__anext__())
            watched = {following, reader} | ({forwarder} if forwarder else set())
            done, _ = await asyncio.wait(watched, timeout=ASSIGN_TIMEOUT_S if first else WATCHDOG_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if following not in done:
                following.cancel()
                if not done:
                    raise asyncio.TimeoutError()
                problem = (reader if reader in done else forwarder).result()
                if problem is not None:
                    await _close(websocket, {"type": "error", "message": problem}, BAD_INPUT_CLOSE)
                return  # the client went away, or sent something wrong
            event = following.result()
            first = False
            if isinstance(event, bytes):
                await websocket.send_bytes(event)
                continue
            kind = event["type"]
            if kind == "assigned":
                forwarder = asyncio.create_task(_forward(queue.engine, session_id, replica, inbox))
            if kind in ("assigned", "alive"):
                if event["position"] and event["position"] != position:
                    await websocket.send_json({"type": "queued", "position": event["position"]})
                position = event["position"]
                continue
            if waiting and kind in ("ready", "done", "error"):
                waiting = False
                queue.live_waiting -= 1
            await websocket.send_json(event)
            if kind == "done":
                await websocket.close()
                return
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away mid-send
    except Exception as error:
        if replica is not None:
            queue.replicas.forget(replica)
        await _close(websocket, {"type": "error", "message": f"the engine replica serving this session stopped "
                                                             f"({cause_line(error)}); start a new session"},
                     INTERNAL_CLOSE)
    finally:
        if waiting:
            queue.live_waiting -= 1
        for task in (reader, forwarder):
            if task is not None:
                task.cancel()
        if call is not None:
            call.cancel()
        if replica is not None:
            queue.release(replica)


async def _read_client(websocket: WebSocket, inbox: asyncio.Queue) -> str | None:
    """The client's messages into ``inbox`` (bytes, "end", "interrupt"); returns a message for a protocol
    error, None on disconnect."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("bytes") is not None:
                inbox.put_nowait(message["bytes"])
                continue
            try:
                kind = json.loads(message.get("text") or "").get("type")
            except (ValueError, AttributeError):
                kind = None
            if kind not in CONTROL_TYPES:
                return (f"unexpected message {(message.get('text') or '')[:60]!r} after start; send binary "
                        f"PCM16 audio or one of {', '.join(CONTROL_TYPES)} as {{\"type\": ...}}")
            inbox.put_nowait(kind)
    except WebSocketDisconnect:
        return None


async def _forward(engine, session_id: str, replica: str, inbox: asyncio.Queue) -> str | None:
    """Everything the client sent, in order, to the session's replica; the replica's reason to end, if any."""
    while True:
        batch = [await inbox.get()]
        while not inbox.empty():
            batch.append(inbox.get_nowait())
        try:
            problem = await asyncio.wait_for(engine.push.remote(session_id, batch, replica=replica), PUSH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return f"the engine replica serving this session did not take its audio within {PUSH_TIMEOUT_S:g} s"
        if problem is not None:
            return problem


async def _close(websocket: WebSocket, message: dict, code: int) -> None:
    try:
        await websocket.send_json(message)
        await websocket.close(code=code, reason=str(message.get("message", ""))[:120])
    except (WebSocketDisconnect, RuntimeError):
        pass
