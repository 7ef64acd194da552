"""Every HTTP error path answers with the right status and an application/problem+json body;
request ids, ETags, idempotent creates and rate limits behave as documented."""
import json
import re
import uuid

import pytest

from gateway.auth import AuthSettings
from tests.e2e.conftest import MAX_BODY_BYTES, assert_problem, token_for

pytestmark = pytest.mark.e2e

MISSING_ID = "5b1e3f4c-9d2a-4c1e-8f00-000000000000"


@pytest.fixture(scope="module")
def ticket(api):
    return api.create_ticket("alice", subject="the contract ticket")


# --- bodies -------------------------------------------------------------------------------------

def test_malformed_json_is_400(api):
    response = api.post("/v1/tickets", as_="alice", data='{"subject": "x", ',
                        headers={"Content-Type": "application/json"})
    assert_problem(response, 400)


@pytest.mark.parametrize("body", ["[1, 2]", '"text"', "42", "null"])
def test_body_that_is_not_an_object_is_400(api, body):
    response = api.post("/v1/tickets", as_="alice", data=body, headers={"Content-Type": "application/json"})
    assert_problem(response, 400)


def test_empty_body_is_400(api):
    response = api.post("/v1/tickets", as_="alice", data=b"", headers={"Content-Type": "application/json"})
    assert_problem(response, 400)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_that_is_not_json_is_415(api, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = api.post("/v1/tickets", as_="alice", data=json.dumps({"subject": "s", "description": "d"}),
                        headers=headers)
    assert_problem(response, 415, "content-type")


@pytest.mark.parametrize("body, field", [
    ({"subject": 5, "description": "d"}, "subject"),
    ({"subject": "s", "description": ["d"]}, "description"),
    ({"subject": "s", "description": "d", "tags": "vpn"}, "tags"),
    ({"subject": "s", "description": "d", "priority": "urgent"}, "priority"),
    ({"subject": "s", "description": "d", "channel": "fax"}, "channel"),
    ({"subject": "   ", "description": "d"}, "subject"),
    ({"description": "d"}, "subject"),
    ({"subject": "s", "description": "d", "tags": ["Not A Tag!"]}, "tags"),
])
def test_wrong_types_and_values_are_422_naming_the_field(api, body, field):
    assert_problem(api.post("/v1/tickets", as_="alice", json=body), 422, field)


def test_unknown_fields_are_422_naming_them(api, ticket):
    response = api.post("/v1/tickets", as_="agent", json={"subject": "s", "description": "d", "colour": "red"})
    assert_problem(response, 422, "colour")
    response = api.patch(f"/v1/tickets/{ticket['id']}", as_="agent", json={"colour": "red"},
                         headers={"If-Match": "*"})
    assert_problem(response, 422, "colour")
    response = api.post(f"/v1/tickets/{ticket['id']}/comments", as_="agent", json={"body": "b", "colour": "red"})
    assert_problem(response, 422, "colour")


def test_empty_update_is_422(api, ticket):
    response = api.patch(f"/v1/tickets/{ticket['id']}", as_="agent", json={}, headers={"If-Match": "*"})
    assert_problem(response, 422)


def test_body_over_the_limit_is_413(api):
    huge = {"subject": "s", "description": "x" * (MAX_BODY_BYTES + 10)}
    assert_problem(api.post("/v1/tickets", as_="alice", json=huge), 413)


def test_chunked_json_body_is_read(api):
    def chunks():
        yield b'{"subject": "streamed", '
        yield b'"description": "sent without Content-Length"}'

    response = api.post("/v1/tickets", as_="alice", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 201, response.text
    assert response.json()["subject"] == "streamed"


def test_chunked_body_over_the_limit_is_413(api):
    def chunks():
        yield b'{"subject": "s", "description": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    response = api.post("/v1/tickets", as_="alice", data=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(response, 413)


# --- authentication -----------------------------------------------------------------------------

def _other_secret_token():
    settings = AuthSettings.load()
    from dataclasses import replace
    from gateway.auth import mint_token
    return mint_token("alice@acme", "requester", "acme", settings=replace(settings, secret="not-the-secret-but-long-enough-for-hs256"))


@pytest.mark.parametrize("authorization", [
    None,
    "Bearer",
    "Bearer not-a-jwt",
    "Basic YWxpY2U6c2VjcmV0",
    "Bearer " + token_for("alice", ttl_seconds=-3600),
    "Bearer " + _other_secret_token(),
], ids=["missing", "empty", "garbage", "basic", "expired", "wrong-secret"])
def test_bad_credentials_are_401_with_www_authenticate(api, ticket, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in (("GET", "/v1/tickets"), ("GET", f"/v1/tickets/{ticket['id']}"),
                         ("POST", "/v1/tickets")):
        response = api.request(method, path, headers=headers, json={"subject": "s", "description": "d"})
        assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_expired_token_says_so(api):
    response = api.get("/v1/tickets", token=token_for("alice", ttl_seconds=-3600))
    assert "expired" in assert_problem(response, 401)["detail"]


# --- ids, routes, methods -----------------------------------------------------------------------

@pytest.mark.parametrize("ticket_id", [MISSING_ID, "not-a-uuid", "1042", "%20"])
def test_unknown_or_malformed_ticket_ids_are_404(api, ticket_id):
    path = f"/v1/tickets/{ticket_id}"
    assert_problem(api.get(path, as_="agent"), 404)
    assert_problem(api.patch(path, as_="agent", json={"priority": "low"}, headers={"If-Match": '"1"'}), 404)
    assert_problem(api.post(f"{path}/comments", as_="agent", json={"body": "b"}), 404)
    assert_problem(api.get(f"{path}/comments", as_="agent"), 404)
    assert_problem(api.get(f"{path}/history", as_="agent"), 404)


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/tickets/x/y/z", "/v2/tickets", "/"])
def test_unknown_routes_are_404(api, path):
    assert_problem(api.get(path, as_="agent"), 404)
    assert_problem(api.get(path), 404)  # no token needed to learn a route does not exist


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", "/v1/tickets/{id}", {"GET", "PATCH"}),
    ("PUT", "/v1/tickets/{id}", {"GET", "PATCH"}),
    ("PUT", "/v1/tickets", {"GET", "POST"}),
    ("DELETE", "/v1/tickets/{id}/comments", {"GET", "POST"}),
    ("POST", "/v1/tickets/{id}/history", {"GET"}),
    ("POST", "/healthz", {"GET"}),
])
def test_wrong_method_is_405_with_allow(api, ticket, method, path, allowed):
    response = api.request(method, path.format(id=ticket["id"]), as_="agent")
    assert_problem(response, 405)
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}
    assert method not in response.headers["Allow"]


# --- lifecycle and preconditions ----------------------------------------------------------------

def test_illegal_transition_is_409_naming_status(api):
    fresh = api.create_ticket("alice")
    response = api.patch(f"/v1/tickets/{fresh['id']}", as_="agent", json={"status": "closed"},
                         headers={"If-Match": f'"{fresh["version"]}"'})
    body = assert_problem(response, 409, "status")
    assert "new" in body["detail"] and "closed" in body["detail"]
    assert api.get(f"/v1/tickets/{fresh['id']}", as_="agent").json()["status"] == "new"


def test_stale_if_match_is_412_and_changes_nothing(api):
    fresh = api.create_ticket("alice")
    path = f"/v1/tickets/{fresh['id']}"
    stale = f'"{fresh["version"]}"'
    api.update_ticket(fresh["id"], "agent", priority="high")
    assert_problem(api.patch(path, as_="agent", json={"priority": "low"}, headers={"If-Match": stale}), 412)
    assert_problem(api.patch(path, as_="agent", json={"priority": "low"}, headers={"If-Match": "garbage"}), 412)
    assert api.get(path, as_="agent").json()["priority"] == "high"


def test_missing_if_match_is_428(api, ticket):
    response = api.patch(f"/v1/tickets/{ticket['id']}", as_="agent", json={"priority": "low"})
    assert_problem(response, 428)


# --- queries ------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, field", [
    ({"status": "bogus"}, "status"),
    ({"priority": "urgent"}, "priority"),
    ({"limit": "0"}, "limit"),
    ({"limit": "101"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"sort": "colour"}, "sort"),
    ({"colour": "red"}, "colour"),
    ({"created_after": "yesterday"}, "created_after"),
    ({"created_after": "2024-01-01T00:00:00"}, "created_after"),  # no offset: ambiguous
    ({"unassigned": "perhaps"}, "unassigned"),
    ({"limit": ["1", "2"]}, "limit"),
])
def test_bad_query_parameters_are_400_naming_them(api, params, field):
    assert_problem(api.get("/v1/tickets", as_="agent", params=params), 400, field)


@pytest.mark.parametrize("cursor", ["garbage", "eyJ4IjoxfQ", "!!!", "eyJzIjoibnVtYmVyIiwidiI6Im5vIiwibiI6MX0"])
def test_bad_cursor_is_400(api, cursor):
    assert_problem(api.get("/v1/tickets", as_="agent", params={"cursor": cursor}), 400, "cursor")


def test_cursor_of_another_sort_is_400(api, tag):
    for _ in range(2):
        api.create_ticket("alice", tags=[tag])
    page = api.get("/v1/tickets", as_="agent", params={"tag": tag, "limit": 1, "sort": "number"}).json()
    assert page["next_cursor"]
    response = api.get("/v1/tickets", as_="agent",
                       params={"tag": tag, "limit": 1, "sort": "-number", "cursor": page["next_cursor"]})
    assert_problem(response, 400, "cursor")


# --- request ids and ETags ----------------------------------------------------------------------

def test_request_id_is_echoed_or_minted(api, ticket):
    mine = f"e2e-{uuid.uuid4().hex}"
    for method, path, kwargs in (("GET", f"/v1/tickets/{ticket['id']}", {}),
                                 ("GET", f"/v1/tickets/{MISSING_ID}", {}),
                                 ("POST", "/v1/tickets", {"data": "{"}),
                                 ("GET", "/healthz", {})):
        response = api.request(method, path, as_="alice", headers={"X-Request-ID": mine,
                                                                   "Content-Type": "application/json"}, **kwargs)
        assert response.headers["X-Request-ID"] == mine, (method, path)
    minted = {api.get(f"/v1/tickets/{ticket['id']}", as_="alice").headers["X-Request-ID"] for _ in range(3)}
    assert len(minted) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in minted)
    # an unusable id (too long, odd characters) is replaced rather than logged and propagated
    for bad in ("x" * 500, "has spaces in it", "semi;colon"):
        echoed = api.get(f"/v1/tickets/{ticket['id']}", as_="alice", headers={"X-Request-ID": bad})
        assert echoed.status_code == 200
        assert echoed.headers["X-Request-ID"] != bad
        assert re.fullmatch(r"[0-9a-f]{32}", echoed.headers["X-Request-ID"])
    assert_problem(api.get(f"/v1/tickets/{MISSING_ID}", as_="alice", headers={"X-Request-ID": mine}), 404)


def test_if_none_match_answers_304_until_the_ticket_changes(api):
    fresh = api.create_ticket("alice")
    path = f"/v1/tickets/{fresh['id']}"
    first = api.get(path, as_="alice")
    etag = first.headers["ETag"]
    cached = api.get(path, as_="alice", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    assert cached.headers["ETag"] == etag
    assert api.get(path, as_="alice", headers={"If-None-Match": f'"999", {etag}'}).status_code == 304
    assert api.get(path, as_="alice", headers={"If-None-Match": "*"}).status_code == 304
    api.update_ticket(fresh["id"], "alice", subject="changed")
    changed = api.get(path, as_="alice", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["subject"] == "changed"
    assert changed.headers["ETag"] != etag
    # a 304 never leaks a ticket's existence or version to someone who may not see it
    assert_problem(api.get(path, as_="carol", headers={"If-None-Match": "*"}), 404)


# --- idempotent creates -------------------------------------------------------------------------

def test_idempotency_key_replays_the_first_create(api, tag):
    key = f"key-{uuid.uuid4().hex}"
    body = {"subject": "Replay me", "description": "once", "tags": [tag]}
    first = api.post("/v1/tickets", as_="alice", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = api.post("/v1/tickets", as_="alice", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 201, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Location"] == first.headers["Location"]

    other = api.post("/v1/tickets", as_="alice", json={**body, "description": "twice"},
                     headers={"Idempotency-Key": key})
    assert_problem(other, 422, "idempotency_key")

    # keys belong to their caller: carol's same key is a new ticket
    carols = api.post("/v1/tickets", as_="carol", json=body, headers={"Idempotency-Key": key})
    assert carols.status_code == 201 and carols.json()["id"] != first.json()["id"]
    assert "Idempotent-Replayed" not in carols.headers

    listed = api.get("/v1/tickets", as_="agent", params={"tag": tag}).json()["items"]
    assert sorted(t["requester_id"] for t in listed) == ["alice@acme", "carol@globex"]


def test_idempotency_key_replays_a_comment(api, ticket):
    key = f"key-{uuid.uuid4().hex}"
    path = f"/v1/tickets/{ticket['id']}/comments"
    first = api.post(path, as_="agent", json={"body": "once"}, headers={"Idempotency-Key": key})
    again = api.post(path, as_="agent", json={"body": "once"}, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true" and again.json()["id"] == first.json()["id"]
    assert_problem(api.post(path, as_="agent", json={"body": "twice"}, headers={"Idempotency-Key": key}),
                   422, "idempotency_key")


@pytest.mark.parametrize("key", ["", "x" * 201, "tab\there"])
def test_unusable_idempotency_key_is_400(api, key):
    response = api.post("/v1/tickets", as_="alice", json={"subject": "s", "description": "d"},
                        headers={"Idempotency-Key": key})
    assert_problem(response, 400, "idempotency-key")


# --- rate limit ---------------------------------------------------------------------------------

def test_burst_over_the_rate_limit_is_429_with_retry_after(stack, api):
    import requests

    base_url = stack.start_extra_gateway(rate_limit_per_second=1, rate_limit_burst=5)
    tight = requests.Session()

    def hit(token):
        return tight.get(base_url + "/v1/tickets", params={"limit": 1},
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)

    statuses = [hit(token_for("alice")).status_code for _ in range(8)]
    assert statuses[:5] == [200] * 5 and set(statuses[5:]) <= {200, 429} and 429 in statuses
    limited = hit(token_for("alice"))
    assert_problem(limited, 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 2
    # per identity: carol still has her whole burst on this gateway, alice on the main one
    assert hit(token_for("carol")).status_code == 200
    assert api.get("/v1/tickets", as_="alice", params={"limit": 1}).status_code == 200
    # and the bucket refills
    wait = int(limited.headers["Retry-After"])
    import time
    time.sleep(wait + 0.2)
    assert hit(token_for("alice")).status_code == 200
    tight.close()
