"""Bearer JWT authentication.

Embedded default: HS256 with a shared secret (``make token`` mints tokens). Production: set
``HELPDESK_GATEWAY_JWKS_URL`` to the identity provider's JWKS; RS256/ES256 tokens are verified
against its keys. Issuer and audience are always checked.

Claims used: ``sub`` (user id), ``role`` (requester|agent|supervisor|admin|viewer), ``org``
(organization id, optional), ``org_wide`` (a requester sees their organization's tickets).
"""
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from contracts.tickets import ROLES, STAFF_ROLES

EMBEDDED_SECRET = "helpdesk-embedded-development-secret-change-me"
EMBEDDED_ISSUER = "helpdesk-embedded"
EMBEDDED_AUDIENCE = "helpdesk-api"


class AuthError(Exception):
    """The request is not authenticated (HTTP 401)."""


class IdentityProviderUnavailable(Exception):
    """The JWKS could not be fetched: not the caller's fault (HTTP 503)."""


@dataclass(frozen=True)
class Identity:
    sub: str
    role: str
    organization_id: str | None
    org_wide: bool
    token_id: str  # what rate limits key on

    def is_staff(self) -> bool:
        return self.role in STAFF_ROLES

    def as_actor(self) -> dict:
        return {"id": self.sub, "role": self.role, "organization_id": self.organization_id,
                "org_wide": self.org_wide}


@dataclass(frozen=True)
class AuthSettings:
    secret: str
    issuer: str
    audience: str
    jwks_url: str | None
    algorithms: tuple[str, ...]
    leeway_seconds: int

    @classmethod
    def load(cls) -> "AuthSettings":
        jwks_url = os.environ.get("HELPDESK_GATEWAY_JWKS_URL") or None
        default_algorithms = "RS256,ES256" if jwks_url else "HS256"
        return cls(
            secret=os.environ.get("HELPDESK_GATEWAY_JWT_SECRET", EMBEDDED_SECRET),
            issuer=os.environ.get("HELPDESK_GATEWAY_JWT_ISSUER", EMBEDDED_ISSUER),
            audience=os.environ.get("HELPDESK_GATEWAY_JWT_AUDIENCE", EMBEDDED_AUDIENCE),
            jwks_url=jwks_url,
            algorithms=tuple(a.strip() for a in os.environ.get(
                "HELPDESK_GATEWAY_JWT_ALGORITHMS", default_algorithms).split(",") if a.strip()),
            leeway_seconds=int(os.environ.get("HELPDESK_GATEWAY_JWT_LEEWAY_SECONDS", 30)),
        )


# Tokens verified recently: a client sends the same token with every request, and checking its
# signature and claims again was the gateway's largest own cost per request. An entry is used only
# while the token still resolves to the very key object that verified it (the secret, or the JWKS
# key currently cached for its kid), and its expiry is checked on every use exactly as PyJWT
# checks it; everything else a verification decides cannot change for the same token and key.
VERIFIED_TOKENS_CACHED = 4096


class Authenticator:
    def __init__(self, settings: AuthSettings):
        self.settings = settings
        self._jwks = jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300) if settings.jwks_url else None
        self._verified: OrderedDict[str, tuple[object, int, Identity]] = OrderedDict()

    def authenticate(self, authorization_header: str | None) -> Identity:
        if not authorization_header:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization_header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the Authorization header must be 'Bearer <token>'")
        token = token.strip()
        try:
            key = self._jwks.get_signing_key_from_jwt(token).key if self._jwks else self.settings.secret
            cached = self._verified.get(token)
            if cached is not None and cached[0] is key:
                if cached[1] <= time.time() - self.settings.leeway_seconds:  # PyJWT's exp rule
                    self._verified.pop(token, None)
                    raise jwt.ExpiredSignatureError("Signature has expired")
                self._verified.move_to_end(token)
                return cached[2]
            claims = jwt.decode(
                token, key, algorithms=list(self.settings.algorithms),
                audience=self.settings.audience, issuer=self.settings.issuer,
                leeway=self.settings.leeway_seconds,
                options={"require": ["sub", "exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the token has expired")
        except jwt.PyJWKClientConnectionError as exc:  # a subclass of PyJWKClientError: first
            raise IdentityProviderUnavailable(f"the identity provider's keys are unreachable: {exc}")
        except jwt.PyJWKClientError as exc:
            raise AuthError(f"the token's signing key is unknown: {exc}")
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}")
        role = claims.get("role")
        if role not in ROLES:
            raise AuthError(f"the token's role must be one of {', '.join(ROLES)}")
        sub = claims["sub"]
        org = claims.get("org")
        if not isinstance(sub, str) or not sub or len(sub) > 200:
            raise AuthError("the token's sub must be a non-empty string")
        if org is not None and (not isinstance(org, str) or not org or len(org) > 200):
            raise AuthError("the token's org must be a non-empty string")
        identity = Identity(sub=sub, role=role, organization_id=org,
                            org_wide=claims.get("org_wide") is True and role == "requester",  # "false" is truthy
                            token_id=claims.get("jti") or f"{sub}:{role}")
        self._verified[token] = (key, int(claims["exp"]), identity)
        if len(self._verified) > VERIFIED_TOKENS_CACHED:
            self._verified.popitem(last=False)
        return identity


def mint_token(sub: str, role: str, org: str | None = None, org_wide: bool = False,
               ttl_seconds: int = 86400, settings: AuthSettings | None = None) -> str:
    """An HS256 token for the embedded secret (development, tests, the README tour)."""
    settings = settings or AuthSettings.load()
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    now = int(time.time())
    claims = {"sub": sub, "role": role, "iss": settings.issuer, "aud": settings.audience,
              "iat": now, "exp": now + ttl_seconds}
    if org:
        claims["org"] = org
    if org_wide:
        claims["org_wide"] = True
    return jwt.encode(claims, settings.secret, algorithm="HS256")
