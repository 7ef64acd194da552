"""The authenticator's cache of verified tokens decides exactly what a fresh verification would."""
import dataclasses
import time
from types import SimpleNamespace

import jwt
import pytest

from gateway import auth
from gateway.auth import AuthError, Authenticator, AuthSettings, mint_token

HS = AuthSettings(secret="a-test-secret-of-at-least-32-bytes!!", issuer="helpdesk-embedded",
                  audience="helpdesk-api", jwks_url=None, algorithms=("HS256",), leeway_seconds=0)


def bearer(token):
    return f"Bearer {token}"


def test_a_repeated_token_is_verified_once(monkeypatch):
    authenticator = Authenticator(HS)
    token = mint_token("alice", "requester", "acme", settings=HS)
    first = authenticator.authenticate(bearer(token))
    decodes = []
    monkeypatch.setattr(auth.jwt, "decode", lambda *a, **k: decodes.append(a) or pytest.fail("decoded again"))
    assert authenticator.authenticate(bearer(token)) == first
    assert authenticator.authenticate(f"bearer   {token}  ") == first
    assert decodes == []


def test_a_cached_token_still_expires(monkeypatch):
    authenticator = Authenticator(HS)
    token = mint_token("alice", "requester", settings=HS, ttl_seconds=60)
    authenticator.authenticate(bearer(token))
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: exp - 0.5))
    authenticator.authenticate(bearer(token))
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: float(exp)))  # PyJWT: exp <= now
    with pytest.raises(AuthError, match="expired"):
        authenticator.authenticate(bearer(token))


def test_leeway_applies_to_cached_tokens_as_to_fresh_ones(monkeypatch):
    settings = dataclasses.replace(HS, leeway_seconds=30)
    authenticator = Authenticator(settings)
    token = mint_token("alice", "requester", settings=settings, ttl_seconds=60)
    authenticator.authenticate(bearer(token))
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: exp + 29.5))
    authenticator.authenticate(bearer(token))
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: exp + 30.0))
    with pytest.raises(AuthError, match="expired"):
        authenticator.authenticate(bearer(token))


def test_a_cached_token_is_verified_again_when_the_key_changes():
    authenticator = Authenticator(HS)
    token = mint_token("alice", "requester", settings=HS)
    authenticator.authenticate(bearer(token))
    authenticator.settings = dataclasses.replace(HS, secret="another-secret-of-at-least-32-bytes!")
    with pytest.raises(AuthError, match="invalid token"):
        authenticator.authenticate(bearer(token))


def test_refused_tokens_are_not_cached():
    authenticator = Authenticator(HS)
    token = jwt.encode({"sub": "alice", "role": "root", "iss": HS.issuer, "aud": HS.audience,
                        "exp": int(time.time()) + 60}, HS.secret)
    for _ in range(2):
        with pytest.raises(AuthError, match="role must be one of"):
            authenticator.authenticate(bearer(token))
    assert len(authenticator._verified) == 0


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(auth, "VERIFIED_TOKENS_CACHED", 3)
    authenticator = Authenticator(HS)
    tokens = [mint_token(f"user-{i}", "requester", settings=HS) for i in range(5)]
    for token in tokens:
        authenticator.authenticate(bearer(token))
    assert list(authenticator._verified) == tokens[-3:]
