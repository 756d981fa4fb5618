"""SlotPoolConfig's backend and driver: one model per kind, and the flat keys written before them."""

from __future__ import annotations

import warnings

import pytest
from pydantic import ValidationError

from atropos.backends import LocalBackendConfig, NomadBackend, NomadBackendConfig
from atropos.drivers import DockerDriver, ProcessDriver, SingularityDriver
from atropos.slots import SlotPoolConfig


def test_nested_kinds_build_their_backend() -> None:
    config = SlotPoolConfig(
        backend={"type": "nomad", "address": "http://127.0.0.1:4646", "cpu": 500},
        driver={"type": "docker", "image": "atropos-sandbox:ci", "container_port": 9000},
    )
    assert isinstance(config.backend, NomadBackendConfig) and config.backend.cpu == 500
    assert config.driver == DockerDriver(image="atropos-sandbox:ci", container_port=9000)
    backend = config.backend.build(config.server_spec())
    assert isinstance(backend, NomadBackend) and backend.spec.settings.slots == config.slots_per_container
    assert SlotPoolConfig().backend == LocalBackendConfig() and SlotPoolConfig().driver == ProcessDriver()


def test_flat_keys_still_work_and_say_they_are_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="flat driver keys pull_policy, singularity_image"):
        config = SlotPoolConfig(driver="singularity", singularity_image="docker://python:3.11", pull_policy="never")
    assert config.driver == SingularityDriver(image="docker://python:3.11", pull_policy="never")
    with pytest.warns(DeprecationWarning, match="flat nomad keys"):
        config = SlotPoolConfig(backend="nomad", nomad_address="http://127.0.0.1:4646", job_id="mine")
    assert isinstance(config.backend, NomadBackendConfig)
    assert (config.backend.address, config.backend.job_id) == ("http://127.0.0.1:4646", "mine")


def test_the_kinds_names_alone_are_no_deprecated_form() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SlotPoolConfig(backend="nomad", driver="process").backend.type == "nomad"


def test_command_line_flags_map_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = SlotPoolConfig.from_flags(backend="nomad", driver="docker", image="x:1", nomad_address=None)
    assert config.driver == DockerDriver(image="x:1") and config.backend == NomadBackendConfig()


def test_a_nomad_setting_on_the_local_backend_is_refused() -> None:
    with pytest.raises(ValidationError, match="settings of backend 'nomad'"):
        SlotPoolConfig(nomad_address="http://127.0.0.1:4646")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"driver": {"type": "docker"}}, "needs `image`"),
        ({"driver": {"type": "singularity", "image": "/nope/x.sif"}}, "does not exist"),
        ({"driver": {"type": "podman"}}, "does not match any of the expected tags"),
        ({"backend": {"type": "kubernetes"}}, "does not match any of the expected tags"),
        ({"backend": {"type": "nomad", "adress": "x"}}, "adress"),
    ],
)
def test_bad_kinds_are_refused_with_a_reason(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SlotPoolConfig.model_validate(values)
