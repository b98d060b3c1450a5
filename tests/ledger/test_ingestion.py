"""Events from Kafka, in both CloudEvents modes and from two client libraries, reach the
projections; poison messages are quarantined and the fold goes on."""

from __future__ import annotations

import asyncio
import base64
import json

import asyncpg
import pytest

from services.settings import Settings
from tests.builders import (
    binary,
    cloud_event,
    produce,
    produce_raw,
    recharge,
    structured,
    usage,
    wait_for_position,
    wait_for_rejected,
)
from tests.conftest import ADMIN_TOKEN
from tests.ledger.ledger_app import running_ledger

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_aiokafka_events_reach_projections(
    settings: Settings, pool: asyncpg.Pool, mode: str
) -> None:
    events = [
        cloud_event("quota.account.opened", "acct_a", {"role": "admin", "group": "vip"}),
        recharge("acct_a", 1000),
        usage("acct_a", 300),
        recharge("acct_b", 50),
    ]
    async with running_ledger(settings) as (_, client):
        await produce(settings.kafka_bootstrap, settings.topic, events, mode=mode)
        await wait_for_position(pool, 4)
        response = await client.get("/accounts/acct_a", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["balance"] == 700
    assert body["available"] == 700
    assert body["held"] == 0
    assert body["role"] == "admin"
    assert body["group"] == "vip"
    assert body["status"] == "active"
    assert 1 <= body["position"] <= 4


@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_confluent_kafka_events_reach_projections(
    settings: Settings, pool: asyncpg.Pool, mode: str
) -> None:
    from confluent_kafka import Producer

    events = [recharge("acct_c", 500), usage("acct_c", 120)]
    async with running_ledger(settings) as (_, client):
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        for event in events:
            if mode == "binary":
                headers, value = binary(event)
                producer.produce(settings.topic, key=b"acct_c", value=value, headers=list(headers))
            else:
                producer.produce(settings.topic, key=b"acct_c", value=structured(event))
        remaining = await asyncio.to_thread(producer.flush, 30)
        assert remaining == 0
        await wait_for_position(pool, 2)
        response = await client.get("/accounts/acct_c", headers=AUTH)
    assert response.json()["balance"] == 380


async def test_poison_messages_are_quarantined_and_the_fold_goes_on(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    first = recharge("acct_p", 100, event_id="evt-1")
    conflicting = recharge("acct_p", 999, event_id="evt-1")
    poison: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
        (b"acct_p", b"{not json", []),
        (b"acct_p", json.dumps({"hello": "world"}).encode(), []),
        (b"acct_p", structured(cloud_event("quota.account.teleported", "acct_p", {})), []),
        (b"acct_p", structured(recharge("acct_p", -5)), []),
        (b"acct_p", structured(cloud_event("quota.account.recharged", "acct_p", {})), []),
        (b"acct_p", b"\xff\xfe\x00binary", []),
        # U+0000 cannot be stored in PostgreSQL text: in a subject, in data, in a header.
        (b"acct_p", structured(recharge("acct_p\x00", 5)), []),
        (
            b"acct_p",
            structured(cloud_event("quota.account.suspended", "acct_p", {"reason": "nul\x00"})),
            [],
        ),
        (
            b"acct_p",
            json.dumps({"amount": 5}).encode(),
            [
                ("ce_specversion", b"1.0"),
                ("ce_id", b"evt-nul"),
                ("ce_source", b"test"),
                ("ce_type", b"quota.account.recharged"),
                ("ce_subject", b"acct\x00p"),
                ("content-type", b"application/json"),
            ],
        ),
    ]
    async with running_ledger(settings) as (_, client):
        await produce(settings.kafka_bootstrap, settings.topic, [first])
        await wait_for_position(pool, 1)
        await produce_raw(settings.kafka_bootstrap, settings.topic, poison)
        await produce(settings.kafka_bootstrap, settings.topic, [conflicting, first])
        await produce(settings.kafka_bootstrap, settings.topic, [usage("acct_p", 30)])
        await wait_for_position(pool, 2)
        await wait_for_rejected(pool, len(poison) + 1)
        account = (await client.get("/accounts/acct_p", headers=AUTH)).json()
        listing = (await client.get("/audit/rejected", headers=AUTH)).json()
    assert account["balance"] == 70
    codes = sorted(item["code"] for item in listing["items"])
    assert codes == sorted(
        ["invalid_json", "not_cloudevent", "unknown_type", "bad_data", "bad_data",
         "invalid_json", "bad_data", "bad_data", "bad_data", "id_conflict"]
    )  # fmt: skip
    for item in listing["items"]:
        assert item["topic"] == settings.topic
        assert item["partition"] >= 0
        assert item["offset"] >= 0
        assert item["reason"].startswith(item["code"])
        assert item["received_at"]
    raws = {item["raw"] for item in listing["items"]}
    assert "{not json" in raws
    binary_item = next(i for i in listing["items"] if i["raw_encoding"] == "base64")
    assert binary_item["code"] == "invalid_json"
    nul = [i for i in listing["items"] if "U+0000" in i["reason"]]
    assert len(nul) == 3
    headers = next(i["headers"] for i in nul if i["headers"])
    assert ["ce_subject", "base64:" + base64.b64encode(b"acct\x00p").decode()] in headers
    async with pool.acquire() as conn:
        duplicates = await conn.fetchval("SELECT duplicates FROM ledger_head")
    assert duplicates == 1
