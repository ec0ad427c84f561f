"""Limits over HTTP against a real Redis: per number (verifications, sends), per number prefix,
per API key and per client IP. Each refusal is 429 with an integer ``Retry-After`` >= 1, and
nothing is sent for it.

The app runs on a FakeClock that stands still at a window boundary, so the fixed windows
never roll over in the middle of a test.
"""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from sip_config.clock import FakeClock
from tests.integration.conftest import OTHER_KEY, Answer, StartService
from tests.peers.sms_gateway import SmsGateway

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

WINDOW_START = 1_800_000_000.0  # a multiple of every window used here


def assert_limited(answer: Answer, what: str, window_s: int) -> None:
    body = answer.problem(429, "rate-limited")
    assert what in body["detail"], body
    header = answer.headers["Retry-After"]
    assert header.isdigit(), f"Retry-After must be an integer: {header!r}"
    assert 1 <= int(header) <= window_s, header
    assert body["retry_after"] == int(header)


async def test_per_number_verifications(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service(
        {"CLINIC_LIMIT_NUMBER_VERIFICATIONS": "2/600"}, clock=FakeClock(WINDOW_START)
    )
    for _ in range(2):
        assert (await api.create()).status == 201
    assert_limited(await api.create(), "verifications for this number", 600)
    other = await api.create(phone="+31687654321")
    assert other.status == 201, "another number has its own counter"
    await sms_gateway.wait_for(3)
    await asyncio.sleep(0.1)
    assert len(sms_gateway.received) == 3, "a refused verification must not send"


async def test_per_number_sends(start_service: StartService, sms_gateway: SmsGateway) -> None:
    api = await start_service(
        {"CLINIC_LIMIT_NUMBER_SENDS": "2/600", "CLINIC_LIMIT_NUMBER_VERIFICATIONS": "10/600"},
        clock=FakeClock(WINDOW_START),
    )
    for _ in range(2):
        assert (await api.create()).status == 201
    assert_limited(await api.create(), "sends to this number", 600)
    await sms_gateway.wait_for(2)
    await asyncio.sleep(0.1)
    assert len(sms_gateway.received) == 2


async def test_sends_per_number_slide_across_a_window_edge(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    # Fixed windows aligned to the clock let 2 sends just before an edge and 2 more just
    # after it: 4 in two seconds under "2 per 600 s". The limit holds in every 600 s.
    clock = FakeClock(WINDOW_START - 1)
    api = await start_service(
        {"CLINIC_LIMIT_NUMBER_SENDS": "2/600", "CLINIC_LIMIT_NUMBER_VERIFICATIONS": "10/600"},
        clock=clock,
    )
    assert (await api.create()).status == 201
    clock.advance(0.5)
    assert (await api.create()).status == 201
    clock.advance(1.5)  # past the clock's 600 s edge
    refused = await api.create()
    assert_limited(refused, "sends to this number", 600)
    assert refused.headers["Retry-After"] == "598", "until the first send is 600 s old"
    clock.advance(597)
    assert_limited(await api.create(), "sends to this number", 600)
    clock.advance(1)
    assert (await api.create()).status == 201, "the first send has left the window"
    await sms_gateway.wait_for(3)
    await asyncio.sleep(0.1)
    assert len(sms_gateway.received) == 3


async def test_a_clock_behind_another_never_waits_longer_than_the_window(
    start_service: StartService,
) -> None:
    # Two processes on one Redis, the second's clock 100 s behind the first's: the first's
    # send is "from the future" to the second, whose Retry-After must still be at most 600.
    env = {"CLINIC_LIMIT_NUMBER_SENDS": "1/600"}
    ahead = await start_service(env, clock=FakeClock(WINDOW_START))
    behind = await start_service(env, clock=FakeClock(WINDOW_START - 100))
    assert (await ahead.create()).status == 201
    refused = await behind.create()
    assert_limited(refused, "sends to this number", 600)
    assert refused.headers["Retry-After"] == "600"


async def test_per_prefix_sends(start_service: StartService, sms_gateway: SmsGateway) -> None:
    api = await start_service(
        {"CLINIC_LIMIT_PREFIX_SENDS": "2/600", "CLINIC_LIMIT_PREFIX_DIGITS": "4"},
        clock=FakeClock(WINDOW_START),
    )
    # +31 6123...: one prefix, three numbers (SMS pumping walks a range like this).
    assert (await api.create(phone="+31612345678")).status == 201
    assert (await api.create(phone="+31612340000")).status == 201
    assert_limited(await api.create(phone="+31612349999"), "sends to numbers with this prefix", 600)
    assert (await api.create(phone="+31687654321")).status == 201, "another prefix is free"
    await sms_gateway.wait_for(3)
    await asyncio.sleep(0.1)
    assert sorted(s.to for s in sms_gateway.received) == [
        "+31612340000",
        "+31612345678",
        "+31687654321",
    ]


async def test_per_api_key(start_service: StartService) -> None:
    api = await start_service({"CLINIC_LIMIT_KEY_REQUESTS": "3/60"}, clock=FakeClock(WINDOW_START))
    missing = f"/v1/verifications/{'A' * 32}"
    for _ in range(3):
        assert (await api.request("GET", missing)).status == 404
    assert_limited(await api.request("GET", missing), "requests for this API key", 60)
    assert_limited(await api.create(), "requests for this API key", 60)
    theirs = await api.request("GET", missing, key=OTHER_KEY)
    assert theirs.status == 404, "another key has its own counter"
    health = await api.request("GET", "/healthz", key=None)
    assert health.status == 200, "probes are not API requests"


async def test_retry_after_is_the_time_left_in_the_window(start_service: StartService) -> None:
    # Windows are aligned to the clock: a counter first hit 10 s before its window ends is
    # free again in 10 s, not a whole window later.
    clock = FakeClock(WINDOW_START + 50)
    api = await start_service({"CLINIC_LIMIT_KEY_REQUESTS": "1/60"}, clock=clock)
    missing = f"/v1/verifications/{'A' * 32}"
    assert (await api.request("GET", missing)).status == 404
    refused = await api.request("GET", missing)
    assert_limited(refused, "requests for this API key", 60)
    assert refused.headers["Retry-After"] == "10"
    clock.advance(10)
    assert (await api.request("GET", missing)).status == 404


async def test_per_client_ip(start_service: StartService) -> None:
    api = await start_service({"CLINIC_LIMIT_IP_REQUESTS": "3/60"}, clock=FakeClock(WINDOW_START))
    missing = f"/v1/verifications/{'A' * 32}"
    assert (await api.request("GET", missing)).status == 404
    assert (await api.request("GET", missing, key=OTHER_KEY)).status == 404
    assert (await api.request("GET", missing)).status == 404
    # Both keys come from 127.0.0.1: the address's counter is full for either.
    assert_limited(await api.request("GET", missing, key=OTHER_KEY), "from this address", 60)
    # X-Forwarded-For is not believed from an untrusted peer.
    spoofed = await api.request("GET", missing, headers={"X-Forwarded-For": "203.0.113.9"})
    assert_limited(spoofed, "from this address", 60)


async def test_per_client_ip_behind_a_trusted_proxy(start_service: StartService) -> None:
    api = await start_service(
        {"CLINIC_LIMIT_IP_REQUESTS": "2/60", "CLINIC_TRUSTED_PROXIES": "127.0.0.1"},
        clock=FakeClock(WINDOW_START),
    )
    missing = f"/v1/verifications/{'A' * 32}"
    alice = {"X-Forwarded-For": "203.0.113.9"}
    bob = {"X-Forwarded-For": "198.51.100.7, 127.0.0.1"}
    for _ in range(2):
        assert (await api.request("GET", missing, headers=alice)).status == 404
    assert_limited(await api.request("GET", missing, headers=alice), "from this address", 60)
    assert (await api.request("GET", missing, headers=bob)).status == 404
    # A client cannot escape by prepending hops: the last untrusted hop is the client.
    forged = {"X-Forwarded-For": "192.0.2.1, 203.0.113.9"}
    assert_limited(await api.request("GET", missing, headers=forged), "from this address", 60)
    # A proxy that adds the client's port: still the client, not the proxy.
    ported = {"X-Forwarded-For": "203.0.113.9:4711"}
    assert_limited(await api.request("GET", missing, headers=ported), "from this address", 60)
    # A forged line of its own before the proxy's: every line counts, the proxy's last.
    two_lines = CIMultiDict([("X-Forwarded-For", "192.0.2.77"), ("X-Forwarded-For", "203.0.113.9")])
    assert_limited(await api.request("GET", missing, headers=two_lines), "from this address", 60)
    assert (
        await api.request("GET", missing, headers={"X-Forwarded-For": "[2001:db8::9]:443"})
    ).status == 404


async def test_wrong_keys_lock_the_address_out_right_key_and_all(
    start_service: StartService,
) -> None:
    clock = FakeClock(WINDOW_START)
    api = await start_service(
        {"CLINIC_LIMIT_AUTH_FAILURES": "3/60", "CLINIC_TRUSTED_PROXIES": "127.0.0.1"},
        clock=clock,
    )
    missing = f"/v1/verifications/{'A' * 32}"
    guesser = {"X-Forwarded-For": "203.0.113.9"}
    neighbour = {"X-Forwarded-For": "198.51.100.7"}
    for _ in range(5):  # no key at all is not a guess
        (await api.request("GET", missing, headers=guesser, key=None)).problem(401, "unauthorized")
    for n in range(3):
        guess = await api.request("GET", missing, headers=guesser, key=f"guess-{n}")
        guess.problem(401, "unauthorized")
    over = await api.request("GET", missing, headers=guesser, key="guess-3")
    assert_limited(over, "wrong API keys from this address", 60)
    # Locked out with the right key too: otherwise a 429 would only mean "wrong guess".
    assert_limited(
        await api.request("GET", missing, headers=guesser), "wrong API keys from this address", 60
    )
    # On a path or method that is no route too: a 404 or 405 would tell the right key.
    for method, path in (("GET", "/v1/nothing-here"), ("PUT", "/v1/verifications")):
        locked = await api.request(method, path, headers=guesser)
        assert_limited(locked, "wrong API keys from this address", 60)
    assert (await api.request("GET", missing, headers=neighbour)).status == 404
    health = await api.request("GET", "/healthz", headers=guesser, key=None)
    assert health.status == 200, "probes are not API requests"
    clock.advance(60)  # the window ends
    assert (await api.request("GET", missing, headers=guesser)).status == 404
    assert (await api.request("GET", "/v1/nothing-here", headers=guesser)).status == 404


async def test_an_address_that_used_up_its_wrong_keys_is_refused_by_every_process(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    # Two processes on one Redis (as HTTP workers are): the second never saw a wrong key, and
    # must still refuse the right one, or it would answer the guess the first one refuses.
    env = {"CLINIC_LIMIT_AUTH_FAILURES": "3/60", "CLINIC_TRUSTED_PROXIES": "127.0.0.1"}
    clock = FakeClock(WINDOW_START)
    first = await start_service(env, clock=clock)
    second = await start_service(env, clock=clock)
    missing = f"/v1/verifications/{'A' * 32}"
    guesser = {"X-Forwarded-For": "203.0.113.9"}
    assert (await second.request("GET", missing, headers=guesser)).status == 404
    for n in range(3):
        guess = await first.request("GET", missing, headers=guesser, key=f"guess-{n}")
        guess.problem(401, "unauthorized")
    for api in (second, first):  # used up: no process serves the address, right key and all
        locked = await api.request("GET", missing, headers=guesser)
        assert_limited(locked, "wrong API keys from this address", 60)
        body = {"phone": "+31612345678"}
        made = await api.request("POST", "/v1/verifications", json_body=body, headers=guesser)
        assert_limited(made, "wrong API keys from this address", 60)
    assert (await second.request("GET", missing)).status == 404, "another address is served"
    await asyncio.sleep(0.2)
    assert sms_gateway.received == [], "a refused create sends nothing"
    clock.advance(60)  # the window ends
    assert (await second.request("GET", missing, headers=guesser)).status == 404


async def test_an_ipv6_client_is_one_address_across_its_64(start_service: StartService) -> None:
    # One site holds a whole /64: counted address by address, a guesser would take a new
    # address for every guess and never meet the limit.
    clock = FakeClock(WINDOW_START)
    api = await start_service(
        {
            "CLINIC_LIMIT_AUTH_FAILURES": "3/60",
            "CLINIC_LIMIT_IP_REQUESTS": "8/60",
            "CLINIC_TRUSTED_PROXIES": "127.0.0.1",
        },
        clock=clock,
    )
    missing = f"/v1/verifications/{'A' * 32}"

    def site(host: int, net: str = "2001:db8:77:1") -> dict[str, str]:
        return {"X-Forwarded-For": f"{net}:{host:x}:{host:x}:{host:x}:{host:x}"}

    for n in range(3):
        guess = await api.request("GET", missing, headers=site(n + 1), key=f"guess-{n}")
        guess.problem(401, "unauthorized")
    over = await api.request("GET", missing, headers=site(0xBEEF), key="guess-3")
    assert_limited(over, "wrong API keys from this address", 60)
    assert_limited(
        await api.request("GET", missing, headers=site(0xCAFE)),
        "wrong API keys from this address",
        60,
    )
    # The next /64 is another site, and an IPv4 client is not touched.
    assert (await api.request("GET", missing, headers=site(1, "2001:db8:77:2"))).status == 404
    assert (
        await api.request("GET", missing, headers={"X-Forwarded-For": "203.0.113.9"})
    ).status == 404
    clock.advance(60)
    # Requests per address are counted per /64 too.
    for n in range(8):
        assert (await api.request("GET", missing, headers=site(n + 1))).status == 404
    assert_limited(await api.request("GET", missing, headers=site(9)), "from this address", 60)


async def test_the_ipv6_network_counted_is_a_setting(start_service: StartService) -> None:
    # A host that hands each customer less than a /64 (a /124 of a shared /64, say): each
    # address is counted on its own, and a neighbour cannot lock the clinic's app out.
    api = await start_service(
        {
            "CLINIC_LIMIT_AUTH_FAILURES": "1/60",
            "CLINIC_LIMIT_IPV6_PREFIX": "128",
            "CLINIC_TRUSTED_PROXIES": "127.0.0.1",
        },
        clock=FakeClock(WINDOW_START),
    )
    missing = f"/v1/verifications/{'A' * 32}"
    neighbour = {"X-Forwarded-For": "2001:db8:77:1::1"}
    (await api.request("GET", missing, headers=neighbour, key="guess-0")).problem(
        401, "unauthorized"
    )
    assert_limited(
        await api.request("GET", missing, headers=neighbour, key="guess-1"),
        "wrong API keys from this address",
        60,
    )
    clinic = {"X-Forwarded-For": "2001:db8:77:1::2"}
    assert (await api.request("GET", missing, headers=clinic)).status == 404


async def test_a_refused_create_counts_nothing_with_or_without_idempotency_key(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    # Limits are counted in the create's own write: all or nothing. A refusal by the number's
    # limit must not use up the key's requests, and an Idempotency-Key refused once is free
    # for a later request (no reservation left behind).
    api = await start_service(
        {"CLINIC_LIMIT_NUMBER_VERIFICATIONS": "1/600", "CLINIC_LIMIT_KEY_REQUESTS": "4/600"},
        clock=FakeClock(WINDOW_START),
    )
    assert (await api.create()).status == 201  # key: 1 of 4
    for _ in range(5):
        assert_limited(await api.create(), "verifications for this number", 600)
    idem = {"Idempotency-Key": "retry-me"}
    body = {"phone": "+31612345678"}
    refused = await api.request("POST", "/v1/verifications", json_body=body, headers=idem)
    assert_limited(refused, "verifications for this number", 600)
    other = await api.create(phone="+31687654321")  # key: 2 of 4
    assert other.status == 201, "the refusals counted no request of the key"
    again = await api.request(
        "POST", "/v1/verifications", json_body={"phone": "+31655555555"}, headers=idem
    )
    assert again.status == 201, again.text  # key: 3 of 4
    replay = await api.request(
        "POST", "/v1/verifications", json_body={"phone": "+31655555555"}, headers=idem
    )
    assert replay.status == 201 and replay.json["id"] == again.json["id"]
    await sms_gateway.wait_for(3)
    await asyncio.sleep(0.1)
    assert len(sms_gateway.received) == 3


async def test_concurrent_retries_of_one_idempotent_create_count_once(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    # A probe sent 20 retries of one request at once: 3 got 422 "in progress", and the
    # retries used up the number's limit although one verification existed.
    api = await start_service(
        {"CLINIC_LIMIT_NUMBER_VERIFICATIONS": "2/600"}, clock=FakeClock(WINDOW_START)
    )
    body = {"phone": "+31612345692", "method": "sms"}
    idem = {"Idempotency-Key": "race-1"}
    answers = await asyncio.gather(
        *(api.request("POST", "/v1/verifications", json_body=body, headers=idem) for _ in range(20))
    )
    assert [a.status for a in answers] == [201] * 20, [a.text for a in answers if a.status != 201]
    assert len({a.json["id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 19
    # The same JSON in another key order and spacing is the same request.
    raw = '{ "method" : "sms",  "phone": "+31612345692" }'
    reordered = await api.request(
        "POST",
        "/v1/verifications",
        data=raw,
        headers={**idem, "Content-Type": "application/json"},
    )
    assert reordered.status == 201 and reordered.json["id"] == answers[0].json["id"]
    assert (await api.create(phone=body["phone"])).status == 201, "2 of 2: the retries counted 1"
    assert_limited(await api.create(phone=body["phone"]), "verifications for this number", 600)
    await sms_gateway.wait_for(2)
    await asyncio.sleep(0.2)
    assert len(sms_gateway.received) == 2, "one SMS per verification"


async def test_refused_requests_count_against_the_key_and_address(
    start_service: StartService,
) -> None:
    # A probe found that requests refused before any Redis work (422, 403, 404) were never
    # counted: an API key over its limit could still ask which type a number is.
    api = await start_service({"CLINIC_LIMIT_KEY_REQUESTS": "4/600"}, clock=FakeClock(WINDOW_START))
    create = "/v1/verifications"
    (
        await api.request("POST", create, data="{", headers={"Content-Type": "application/json"})
    ).problem(422, "invalid-request")
    (await api.request("POST", create, json_body={"phone": "+319001234567"})).problem(
        403, "number-refused"
    )
    (await api.request("GET", f"{create}/short")).problem(404, "not-found")
    (await api.request("POST", f"{create}/{'A' * 32}/check", json_body={"x": 1})).problem(
        422, "invalid-request"
    )
    for refused in (
        await api.request("POST", create, json_body={"phone": "+319001234567"}),
        await api.request("GET", f"{create}/short"),
        await api.create(),
    ):
        assert_limited(refused, "requests for this API key", 600)
