"""``/v1/live`` at the cluster's ingress: a pipe to the replica that runs the session. The session itself
(start message, queueing, pacing, every message it sends) is the single-process `serve_live`, run on the
replica (`replica.RelayedSocket`); here the WebSocket is joined to one streaming call to the engine
deployment, which stays on the replica that took it for the session's life, and the client's messages
follow it there by name (`routing.PinnedOrShortestQueue`), in order, one batch in flight at a time, from
the call's first item on (the replica's "taken": a push sent before the call has started on the replica
was seen to hang).

Past the global cap on waiting work the client gets ``{"type": "busy", "retry_after_s"}`` and close code
1013 (try again later) at once. When the replica dies, or sends nothing for ``WATCHDOG_S`` (it sends a
keep-alive every second), the client gets an ``error`` message and close code 1011 within that time.
"""
from __future__ import annotations

import asyncio
import base64
import json
import secrets

from starlette.websockets import WebSocket, WebSocketDisconnect

from liveavatar.serve.cluster.dispatch import ASSIGN_TIMEOUT_S, WATCHDOG_S, ReplicaLost, cause_line
from liveavatar.serve.jobs import QueueFull, ServerBusy, error_line
from liveavatar.serve.live import BAD_INPUT_CLOSE

TRY_AGAIN_LATER_CLOSE = 1013
INTERNAL_CLOSE = 1011
PUSH_TIMEOUT_S = 5.0


async def relay_live(websocket: WebSocket, server) -> None:
    await websocket.accept()
    queue = server.queue
    first = await websocket.receive()  # the start message: the busy answer comes after it, as any answer
    if first["type"] == "websocket.disconnect":
        return
    client = websocket.client.host if websocket.client else "?"
    try:
        queue.open_live(client)
    except ServerBusy as error:
        await _close(websocket, {"type": "busy", "message": str(error), "retry_after_s": error.retry_after_s},
                     TRY_AGAIN_LATER_CLOSE)
        return
    except QueueFull as error:
        await _close(websocket, {"type": "error", "message": error_line(error)}, BAD_INPUT_CLOSE)
        return
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait(_with_image(first, server))
    reader = asyncio.create_task(_read_client(websocket, inbox))
    session_id = secrets.token_hex(8)
    queue.live_waiting += 1
    waiting = True
    call = forwarder = replica = None
    try:
        replica = await queue.take_replica()
        call = queue.engine.options(stream=True).live.remote(session_id, client, replica=replica)
        first = True
        while True:
            following = asyncio.ensure_future(call.__anext__())
            watched = {following, reader} | ({forwarder} if forwarder is not None else set())
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED,
                                         timeout=ASSIGN_TIMEOUT_S if first else WATCHDOG_S)
            if following not in done:
                following.cancel()
                if not done:
                    raise asyncio.TimeoutError()
                if reader in done:
                    return  # the client went away: leaving the call stops the session on the replica
                raise ReplicaLost(forwarder.result())
            item, first = following.result(), False
            if forwarder is None:  # the replica took the session (its first item): the client's messages follow
                forwarder = asyncio.create_task(_forward(queue.engine, session_id, replica, inbox))
            if item[0] == "bytes":
                await websocket.send_bytes(item[1])
            elif item[0] == "text":
                if waiting and json.loads(item[1]).get("type") in ("ready", "done", "error"):
                    waiting = False
                    queue.live_waiting -= 1
                await websocket.send_text(item[1])
            elif item[0] == "close":
                await websocket.close(code=item[1], reason=item[2])
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
        queue.close_live(client)
        for task in (reader, forwarder):
            if task is not None:
                task.cancel()
        if call is not None:
            call.cancel()
        if replica is not None:
            queue.release(replica)


async def _read_client(websocket: WebSocket, inbox: asyncio.Queue) -> None:
    """The client's messages into ``inbox`` as they come, until it disconnects."""
    while True:
        message = await websocket.receive()
        inbox.put_nowait(message)
        if message["type"] == "websocket.disconnect":
            return


def _with_image(message: dict, server) -> dict:
    """The start message, with the bytes of the upload its ``image_id`` names (an upload to this ingress) in
    its place; anything else as it is (the session refuses it with the single-process server's message)."""
    try:
        start = json.loads(message.get("text") or "")
        path = server.images.get(str(start["image_id"])) if isinstance(start, dict) and start.get("image_id") else None
    except ValueError:
        return message
    if path is None:
        return message
    del start["image_id"]
    start["image"] = base64.b64encode(path.read_bytes()).decode()
    return {**message, "text": json.dumps(start)}


async def _forward(engine, session_id: str, replica: str, inbox: asyncio.Queue) -> str:
    """Everything the client sent, in order, to the session's replica; the reason it stopped taking them."""
    while True:
        batch = [await inbox.get()]
        while not inbox.empty():
            batch.append(inbox.get_nowait())
        try:
            problem = await asyncio.wait_for(engine.push.remote(session_id, batch, replica=replica), PUSH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return f"it did not take the session's audio within {PUSH_TIMEOUT_S:g} s"
        if problem is not None:
            return problem


async def _close(websocket: WebSocket, message: dict, code: int) -> None:
    try:
        await websocket.send_json(message)
        await websocket.close(code=code, reason=str(message.get("message", ""))[:120])
    except (WebSocketDisconnect, RuntimeError):
        pass
