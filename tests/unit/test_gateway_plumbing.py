"""Gateway plumbing without a broker: rate limits, ETags, bodies, problems."""
import io
import json

import pytest
from hypothesis import given, strategies as st
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from contracts.errors import NotFound
from gateway import http as web
from gateway.problems import ApiProblem, from_domain_error
from gateway.ratelimit import TokenBuckets


def test_bucket_allows_the_burst_then_refuses_with_retry_after():
    buckets = TokenBuckets(rate_per_second=2, burst=3)
    decisions = [buckets.take("t", now=100.0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[-1].retry_after_seconds == 1


def test_bucket_refills_at_the_configured_rate():
    buckets = TokenBuckets(rate_per_second=2, burst=3)
    for _ in range(3):
        buckets.take("t", now=100.0)
    assert not buckets.take("t", now=100.1).allowed
    assert buckets.take("t", now=100.6).allowed


def test_buckets_are_per_identity():
    buckets = TokenBuckets(rate_per_second=1, burst=1)
    assert buckets.take("a", now=0).allowed
    assert buckets.take("b", now=0).allowed
    assert not buckets.take("a", now=0).allowed


def test_bucket_memory_is_bounded():
    buckets = TokenBuckets(rate_per_second=1, burst=1, max_keys=100)
    for i in range(1000):
        buckets.take(f"id-{i}", now=float(i))
    assert len(buckets._buckets) <= 100


@given(st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=50))
def test_bucket_never_allows_more_than_burst_plus_refill(gaps):
    buckets = TokenBuckets(rate_per_second=5, burst=4)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        allowed += buckets.take("t", now=now).allowed
    assert allowed <= 4 + 5 * now + 1e-9


def request(body=b"", content_type="application/json", headers=None):
    builder = EnvironBuilder(method="POST", data=body, content_type=content_type, headers=headers or {})
    return Request(builder.get_environ())


def test_json_body_is_read():
    assert web.read_json_body(request(b'{"a": 1}'), 100) == {"a": 1}


@pytest.mark.parametrize("body, content_type, status", [
    (b'{"a": 1}', "text/plain", 415),
    (b"", "application/json", 400),
    (b"{", "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (b"\xff\xfe", "application/json", 400),
    (b'{"a": "' + b"x" * 200 + b'"}', "application/json", 413),
])
def test_bad_bodies_get_clear_errors(body, content_type, status):
    with pytest.raises(ApiProblem) as caught:
        web.read_json_body(request(body, content_type), 100)
    assert caught.value.status == status


def test_chunked_body_over_the_limit_is_refused_without_reading_it_all():
    environ = EnvironBuilder(method="POST", content_type="application/json").get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = io.BytesIO(b'{"a": "' + b"x" * 10_000 + b'"}')
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    with pytest.raises(ApiProblem) as caught:
        web.read_json_body(Request(environ), 100)
    assert caught.value.status == 413


@pytest.mark.parametrize("header, expected", [('"3"', 3), ('W/"3"', 3), ("*", None), (' "12" ', 12)])
def test_if_match_names_a_version(header, expected):
    assert web.expected_version(request(headers={"If-Match": header})) == expected


def test_missing_if_match_is_428():
    with pytest.raises(ApiProblem) as caught:
        web.expected_version(request())
    assert caught.value.status == 428


@pytest.mark.parametrize("header", ['"abc"', '"1", "2"', "garbage"])
def test_unusable_if_match_is_412(header):
    with pytest.raises(ApiProblem) as caught:
        web.expected_version(request(headers={"If-Match": header}))
    assert caught.value.status == 412


def test_if_none_match_detects_the_current_version():
    assert web.not_modified(request(headers={"If-None-Match": '"4"'}), 4)
    assert not web.not_modified(request(headers={"If-None-Match": '"3"'}), 4)
    assert not web.not_modified(request(), 4)


def test_domain_errors_become_problem_documents():
    response = from_domain_error(NotFound("ticket not found"), "rid-1")
    body = json.loads(response.get_data())
    assert response.status_code == 404
    assert response.content_type == "application/problem+json"
    assert body == {"type": "urn:helpdesk:problem:not_found", "title": "Not found", "status": 404,
                    "detail": "ticket not found", "request_id": "rid-1"}


@pytest.mark.parametrize("header", ['"²"', '"١٢"'])
def test_if_match_with_non_ascii_digits_is_412_not_a_crash(header):
    with pytest.raises(ApiProblem) as caught:
        web.expected_version(request(headers={"If-Match": header}))
    assert caught.value.status == 412


def test_deeply_nested_json_is_malformed_not_a_crash():
    with pytest.raises(ApiProblem) as caught:
        web.read_json_body(request(b"[" * 200_000), 1024 * 1024)
    assert caught.value.status == 400


def test_idle_identities_are_forgotten_first_when_the_table_is_full():
    buckets = TokenBuckets(rate_per_second=1, burst=2, max_keys=3)
    for key in ("a", "b", "c"):
        buckets.take(key, now=0)
        buckets.take(key, now=0)  # drained
    buckets.take("a", now=1)      # a is recent again
    buckets.take("d", now=2)      # evicts b, the least recently seen
    assert list(buckets._buckets) == ["c", "a", "d"]
