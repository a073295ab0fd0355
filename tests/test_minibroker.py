"""The demo's embedded broker speaks enough MQTT for aiomqtt: publish, retain, wildcards, Will."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from gateway.minibroker import MiniBroker, topic_matches


@pytest.mark.parametrize(
    ("pattern", "topic", "match"),
    [
        ("a/#", "a/b/c", True), ("a/+/c", "a/b/c", True), ("a/+", "a/b/c", False), ("#", "a", True),
        ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/+/+", "a/b", False), ("a/b/#", "a/b", True),
    ],
)
def test_topic_matching(pattern: str, topic: str, match: bool) -> None:
    assert topic_matches(pattern, topic) is match


async def test_publish_retain_and_will() -> None:
    broker = MiniBroker()
    await broker.start()
    try:
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="pub") as pub:
            await pub.publish("p/s/retained", b"r", qos=1, retain=True)
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="sub") as sub:
            await sub.subscribe("p/#", qos=1)
            got: list[tuple[str, bytes]] = []

            async def listen() -> None:
                async for m in sub.messages:
                    assert isinstance(m.payload, bytes)
                    got.append((str(m.topic), m.payload))

            task = asyncio.create_task(listen())
            will = aiomqtt.Will("p/s/status", b"offline", qos=1, retain=True)
            dying = aiomqtt.Client("127.0.0.1", broker.port, identifier="dying", will=will)
            await dying.__aenter__()
            await dying.publish("p/s/live", b"1", qos=1)
            dying._client.socket().close()  # vanish without DISCONNECT: the broker sends the Will
            async with asyncio.timeout(5):
                while ("p/s/status", b"offline") not in got:
                    await asyncio.sleep(0.02)
            task.cancel()
        assert got[0] == ("p/s/retained", b"r")
        assert ("p/s/live", b"1") in got
        assert broker.retained["p/s/status"] == b"offline"
    finally:
        await broker.stop()
