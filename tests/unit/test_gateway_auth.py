"""Bearer JWT verification: the embedded HS256 secret and a JWKS identity provider."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth import AuthError, Authenticator, AuthSettings, mint_token

HS = AuthSettings(secret="a-test-secret-of-at-least-32-bytes!!", issuer="helpdesk-embedded", audience="helpdesk-api", jwks_url=None,
                  algorithms=("HS256",), leeway_seconds=0)


def claims(**overrides):
    now = int(time.time())
    base = {"sub": "alice", "role": "requester", "org": "acme", "iss": "helpdesk-embedded",
            "aud": "helpdesk-api", "iat": now, "exp": now + 3600}  # built at collection time
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token):
    return f"Bearer {token}"


def test_minted_token_authenticates_as_its_identity():
    identity = Authenticator(HS).authenticate(bearer(mint_token("alice", "requester", "acme", True, settings=HS)))
    assert (identity.sub, identity.role, identity.organization_id, identity.org_wide) == (
        "alice", "requester", "acme", True)
    assert identity.as_actor() == {"id": "alice", "role": "requester", "organization_id": "acme", "org_wide": True}


def test_org_wide_is_ignored_for_staff_tokens():
    identity = Authenticator(HS).authenticate(bearer(jwt.encode(claims(role="agent", org_wide=True), HS.secret)))
    assert identity.org_wide is False


@pytest.mark.parametrize("header, message", [
    (None, "missing bearer token"),
    ("", "missing bearer token"),
    ("Basic YWxpY2U6eA==", "must be 'Bearer <token>'"),
    ("Bearer ", "must be 'Bearer <token>'"),
    ("Bearer not.a.jwt", "invalid token"),
])
def test_malformed_authorization_is_refused(header, message):
    with pytest.raises(AuthError, match=message):
        Authenticator(HS).authenticate(header)


@pytest.mark.parametrize("token_claims, key, message", [
    (claims(exp=int(time.time()) - 10), HS.secret, "expired"),
    (claims(), "another-secret-of-at-least-32-bytes", "invalid token"),
    (claims(iss="someone-else"), HS.secret, "invalid token"),
    (claims(aud="another-api"), HS.secret, "invalid token"),
    (claims(role="root"), HS.secret, "role must be one of"),
    (claims(role=None), HS.secret, "role must be one of"),
    (claims(sub=""), HS.secret, "sub"),
    (claims(org=""), HS.secret, "org must be"),
    (claims(exp=None), HS.secret, "invalid token"),
])
def test_untrustworthy_tokens_are_refused(token_claims, key, message):
    with pytest.raises(AuthError, match=message):
        Authenticator(HS).authenticate(bearer(jwt.encode(token_claims, key, algorithm="HS256")))


def test_alg_none_is_refused():
    token = jwt.encode(claims(), None, algorithm="none")
    with pytest.raises(AuthError):
        Authenticator(HS).authenticate(bearer(token))


def test_mint_token_refuses_unknown_roles():
    with pytest.raises(ValueError):
        mint_token("alice", "root", settings=HS)


# --- JWKS (production identity providers) ---------------------------------------------------

@pytest.fixture(scope="module")
def identity_provider():
    """A JWKS endpoint on loopback with one RSA and one EC key."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, key, alg in (("rsa-1", rsa_key, "RS256"), ("ec-1", ec_key, "ES256")):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
        jwk.update(kid=kid, alg=alg, use="sig")
        keys.append(jwk)
    body = json.dumps({"keys": keys}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings = AuthSettings(secret="unused", issuer="https-idp", audience="helpdesk-api",
                            jwks_url=f"http://127.0.0.1:{server.server_address[1]}/jwks.json",
                            algorithms=("RS256", "ES256"), leeway_seconds=0)
    yield settings, {"RS256": ("rsa-1", rsa_key), "ES256": ("ec-1", ec_key)}
    server.shutdown()


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_jwks_signed_tokens_are_verified(identity_provider, alg):
    settings, keys = identity_provider
    kid, key = keys[alg]
    token = jwt.encode(claims(iss="https-idp", role="agent"), key, algorithm=alg, headers={"kid": kid})
    identity = Authenticator(settings).authenticate(bearer(token))
    assert (identity.sub, identity.role) == ("alice", "agent")


def test_jwks_token_with_unknown_key_id_is_refused(identity_provider):
    settings, _ = identity_provider
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(iss="https-idp"), stranger, algorithm="RS256", headers={"kid": "who"})
    with pytest.raises(AuthError, match="signing key"):
        Authenticator(settings).authenticate(bearer(token))


def test_jwks_mode_refuses_hs256_tokens_signed_with_the_public_key_trick(identity_provider):
    settings, _ = identity_provider
    token = jwt.encode(claims(iss="https-idp"), "unused", algorithm="HS256", headers={"kid": "rsa-1"})
    with pytest.raises(AuthError):
        Authenticator(settings).authenticate(bearer(token))


def test_jwks_token_from_another_issuer_is_refused(identity_provider):
    settings, keys = identity_provider
    kid, key = keys["RS256"]
    token = jwt.encode(claims(iss="evil-idp"), key, algorithm="RS256", headers={"kid": kid})
    with pytest.raises(AuthError, match="invalid token"):
        Authenticator(settings).authenticate(bearer(token))


@pytest.mark.parametrize("value", ["false", "0", 1, "true"])
def test_only_a_literal_true_org_wide_claim_widens_visibility(value):
    identity = Authenticator(HS).authenticate(bearer(jwt.encode(claims(org_wide=value), HS.secret)))
    assert identity.org_wide is False


def test_unreachable_jwks_is_an_outage_not_a_bad_token():
    from gateway.auth import IdentityProviderUnavailable

    settings = AuthSettings(secret="unused", issuer="https-idp", audience="helpdesk-api",
                            jwks_url="http://127.0.0.1:9/jwks.json", algorithms=("RS256",), leeway_seconds=0)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(iss="https-idp"), key, algorithm="RS256", headers={"kid": "k"})
    with pytest.raises(IdentityProviderUnavailable):
        Authenticator(settings).authenticate(bearer(token))
