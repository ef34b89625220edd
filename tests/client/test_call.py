"""A real WebRTC call between two aiortc peers, signalled only through m.call.* events.

The offer and answer travel in m.call.invite / m.call.answer with their ICE
candidates stripped out; every candidate travels in m.call.candidates. No STUN
or TURN servers; aioice is restricted to 127.0.0.1 (it skips loopback by
default). The test passes only if data flows over the resulting connection.
"""

import asyncio
from contextlib import ExitStack
from unittest import mock

import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp
from nio import AsyncClient

from tests.support.clients import close, create, register, start_e2e_server

CALL_ID = "call-1"
VERSION = "1"


def split_sdp(sdp: str) -> tuple[str, list[dict]]:
    """The SDP without candidate lines, and the candidates in Matrix's shape."""
    lines, candidates, mid, index = [], [], None, -1
    for line in sdp.splitlines():
        if line.startswith("m="):
            index += 1
        if line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        if line.startswith("a=candidate:"):
            candidates.append({"candidate": line[2:], "sdpMid": mid, "sdpMLineIndex": index})
        elif line != "a=end-of-candidates":
            lines.append(line)
    return "\r\n".join(lines) + "\r\n", candidates


async def add_candidates(pc: RTCPeerConnection, candidates: list[dict]) -> None:
    for c in candidates:
        candidate = candidate_from_sdp(c["candidate"].split(":", 1)[1])
        candidate.sdpMid = c["sdpMid"]
        candidate.sdpMLineIndex = c["sdpMLineIndex"]
        await pc.addIceCandidate(candidate)
    await pc.addIceCandidate(None)  # end of candidates


class CallEvents:
    """Reads m.call.* events of one room from a client's incremental syncs."""

    def __init__(self, client: AsyncClient, room_id: str, since: str) -> None:
        self.client, self.room_id, self.since = client, room_id, since
        self.pending: list[dict] = []

    async def next(self, event_type: str) -> dict:
        while True:
            for i, event in enumerate(self.pending):
                if event["type"] == event_type:
                    return self.pending.pop(i)
            sync = await self.client.sync(timeout=10000, since=self.since)
            self.since = sync.next_batch
            room = sync.rooms.join.get(self.room_id)
            if room is not None:
                self.pending += [e.source for e in room.timeline.events
                                 if e.source["type"].startswith("m.call.")
                                 and e.source["sender"] != self.client.user_id]


async def send(client: AsyncClient, room_id: str, event_type: str, content: dict) -> None:
    response = await client.room_send(room_id, event_type, {
        "call_id": CALL_ID, "party_id": client.device_id, "version": VERSION, **content})
    assert hasattr(response, "event_id"), response


async def caller_side(client, room_id, since, received: asyncio.Future) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("chat")

    @channel.on("open")
    def on_open() -> None:
        channel.send("ping")

    @channel.on("message")
    def on_message(message: str) -> None:
        if not received.done():
            received.set_result(message)

    await pc.setLocalDescription(await pc.createOffer())
    sdp, candidates = split_sdp(pc.localDescription.sdp)
    await send(client, room_id, "m.call.invite",
               {"lifetime": 60000, "offer": {"type": "offer", "sdp": sdp}})
    await send(client, room_id, "m.call.candidates", {"candidates": candidates})
    events = CallEvents(client, room_id, since)
    answer = await events.next("m.call.answer")
    await send(client, room_id, "m.call.select_answer",
               {"selected_party_id": answer["content"]["party_id"]})
    await pc.setRemoteDescription(RTCSessionDescription(**answer["content"]["answer"]))
    remote = await events.next("m.call.candidates")
    await add_candidates(pc, remote["content"]["candidates"])
    try:
        await asyncio.wait_for(asyncio.shield(received), 20)
    finally:
        await send(client, room_id, "m.call.hangup", {"reason": "user_hangup"})
        await pc.close()


async def callee_side(client, room_id, since, done: asyncio.Future) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    @pc.on("datachannel")
    def on_datachannel(channel) -> None:
        @channel.on("message")
        def on_message(message: str) -> None:
            channel.send("pong" if message == "ping" else "?")

    events = CallEvents(client, room_id, since)
    invite = await events.next("m.call.invite")
    assert invite["content"]["lifetime"] == 60000 and invite["unsigned"]["age"] < 60000
    await pc.setRemoteDescription(RTCSessionDescription(**invite["content"]["offer"]))
    offered = await events.next("m.call.candidates")
    await add_candidates(pc, offered["content"]["candidates"])
    await pc.setLocalDescription(await pc.createAnswer())
    sdp, candidates = split_sdp(pc.localDescription.sdp)
    await send(client, room_id, "m.call.answer", {"answer": {"type": "answer", "sdp": sdp}})
    await send(client, room_id, "m.call.candidates", {"candidates": candidates})
    await events.next("m.call.select_answer")
    hangup = await events.next("m.call.hangup")
    assert hangup["content"]["reason"] == "user_hangup"
    await pc.close()
    done.set_result(True)


def test_aiortc_call_through_the_server(tmp_path):
    async def go(server):
        caller, callee = await register(server), await register(server)
        room_id = await create(caller, preset="trusted_private_chat", is_direct=True,
                               invite=[callee.user_id])
        await callee.join(room_id)
        since_caller = (await caller.sync(timeout=0)).next_batch
        since_callee = (await callee.sync(timeout=0)).next_batch
        loop = asyncio.get_running_loop()
        received, done = loop.create_future(), loop.create_future()
        await asyncio.wait_for(asyncio.gather(
            caller_side(caller, room_id, since_caller, received),
            callee_side(callee, room_id, since_callee, done),
        ), 60)
        assert received.result() == "pong"  # data crossed the peer connection
        assert done.result() is True
        await close(caller, callee)

    with ExitStack() as stack, mock.patch.object(
        aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    ):
        asyncio.run(go(start_e2e_server(stack, tmp_path, "sqlite3")))
