"""Who is calling: the identity the gateway verified, as every service receives it with each RPC
(``contracts.tickets.ActorSchema`` on the wire)."""
from dataclasses import dataclass

from contracts.tickets import STAFF_ROLES


@dataclass(frozen=True)
class Actor:
    id: str
    role: str
    organization_id: str | None = None
    # a requester whose token grants it sees every ticket of their organization
    org_wide: bool = False

    @property
    def is_staff(self) -> bool:
        return self.role in STAFF_ROLES

    @classmethod
    def from_dict(cls, data: dict) -> "Actor":
        return cls(data["id"], data["role"], data.get("organization_id"), bool(data.get("org_wide")))

    def as_dict(self) -> dict:
        return {"id": self.id, "role": self.role, "organization_id": self.organization_id,
                "org_wide": self.org_wide}
