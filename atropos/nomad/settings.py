"""How to reach Nomad: the standard `NOMAD_*` variables, or explicit values."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["NomadSettings"]

_TRUE = {"1", "true", "yes", "on"}


class NomadSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str = "http://127.0.0.1:4646"
    token: SecretStr | None = None
    namespace: str | None = None
    region: str | None = None
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    skip_verify: bool = False
    timeout: float = Field(default=10.0, gt=0, description="seconds per request (plus `wait` when blocking)")
    attempts: int = Field(default=4, ge=1, description="tries per request on connection errors and 5xx")
    backoff: float = Field(default=0.25, gt=0, description="first retry delay, doubled each time")
    max_backoff: float = Field(default=4.0, gt=0)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> NomadSettings:
        """Settings from NOMAD_ADDR, NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_REGION, NOMAD_CACERT,
        NOMAD_CLIENT_CERT, NOMAD_CLIENT_KEY, NOMAD_SKIP_VERIFY; `overrides` win over the environment."""
        environ = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field, var in (
            ("address", "NOMAD_ADDR"),
            ("token", "NOMAD_TOKEN"),
            ("namespace", "NOMAD_NAMESPACE"),
            ("region", "NOMAD_REGION"),
            ("ca_cert", "NOMAD_CACERT"),
            ("client_cert", "NOMAD_CLIENT_CERT"),
            ("client_key", "NOMAD_CLIENT_KEY"),
        ):
            if environ.get(var):
                values[field] = environ[var]
        if environ.get("NOMAD_SKIP_VERIFY"):
            values["skip_verify"] = environ["NOMAD_SKIP_VERIFY"].strip().lower() in _TRUE
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def base_url(self) -> str:
        address = self.address.rstrip("/")
        return address if "://" in address else f"http://{address}"

    @property
    def verify(self) -> bool | str:
        """What TLS verification uses: False, a CA bundle path, or the system store (True)."""
        if self.skip_verify:
            return False
        return self.ca_cert or True

    @property
    def cert(self) -> tuple[str, str] | None:
        if self.client_cert and self.client_key:
            return (self.client_cert, self.client_key)
        return None

    def headers(self) -> dict[str, str]:
        return {"X-Nomad-Token": self.token.get_secret_value()} if self.token else {}

    def scope(self) -> dict[str, str]:
        """`namespace`/`region` query parameters for job-scoped endpoints."""
        params = {}
        if self.namespace:
            params["namespace"] = self.namespace
        if self.region:
            params["region"] = self.region
        return params
