"""Settings from the standard NOMAD_* variables, and job ownership."""

from __future__ import annotations

import os
import ssl
import subprocess
from dataclasses import replace

from atropos.nomad import NomadSettings, OwnerMeta, owner_state
from atropos.nomad.client import _ssl_context


def test_settings_come_from_the_standard_variables() -> None:
    settings = NomadSettings.from_env(
        {
            "NOMAD_ADDR": "https://nomad.example:4646",
            "NOMAD_TOKEN": "t0k",
            "NOMAD_NAMESPACE": "rl",
            "NOMAD_REGION": "eu",
            "NOMAD_CACERT": "/etc/ca.pem",
            "NOMAD_CLIENT_CERT": "/etc/c.pem",
            "NOMAD_CLIENT_KEY": "/etc/k.pem",
            "NOMAD_SKIP_VERIFY": "true",
        }
    )
    assert settings.base_url == "https://nomad.example:4646"
    assert settings.headers() == {"X-Nomad-Token": "t0k"}
    assert settings.scope() == {"namespace": "rl", "region": "eu"}
    assert settings.cert == ("/etc/c.pem", "/etc/k.pem")
    assert settings.verify is False
    assert "t0k" not in repr(settings)


def test_defaults_and_overrides() -> None:
    settings = NomadSettings.from_env({}, namespace="batch")
    assert settings.base_url == "http://127.0.0.1:4646"
    assert settings.headers() == {} and settings.scope() == {"namespace": "batch"}
    assert NomadSettings.from_env({"NOMAD_ADDR": "10.0.0.1:4646"}).base_url == "http://10.0.0.1:4646"
    assert NomadSettings.from_env({"NOMAD_CACERT": "/ca.pem"}).verify == "/ca.pem"


def test_tls_skip_verify_disables_checks_only_when_asked() -> None:
    context = _ssl_context(NomadSettings(address="https://n:4646", skip_verify=True))
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_NONE
    strict = _ssl_context(NomadSettings(address="https://n:4646"))
    assert isinstance(strict, ssl.SSLContext) and strict.verify_mode == ssl.CERT_REQUIRED


def test_owner_state_tells_dead_from_alive_from_unknown() -> None:
    me = OwnerMeta.current()
    assert owner_state(me.to_meta()) == "alive"
    finished = subprocess.Popen(["true"])
    finished.wait()
    assert owner_state(replace(me, pid=finished.pid).to_meta()) == "dead"
    assert owner_state(replace(me, started=(me.started or 0) - 3600).to_meta()) == "dead"  # pid reused
    assert owner_state(replace(me, boot_id="another-boot").to_meta()) == "dead"
    assert owner_state(replace(me, host="elsewhere").to_meta()) == "unknown"
    assert owner_state({"atropos_kind": "sandbox"}) == "unknown"
    assert OwnerMeta.from_meta(me.to_meta()) == replace(me, started=round(me.started or 0, 2))
    assert me.pid == os.getpid()
