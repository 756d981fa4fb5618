"""Image references and the SIF file names they map to."""

from __future__ import annotations

import re

import pytest

from atropos.images.references import is_reference, normalize_reference, reference_scheme, sif_name_for


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("python:3.11", "docker://python:3.11"),
        ("python", "docker://python:latest"),
        ("docker://python", "docker://python:latest"),
        ("ghcr.io/org/img:v1", "docker://ghcr.io/org/img:v1"),
        ("localhost:5000/team/img", "docker://localhost:5000/team/img:latest"),
        ("library://alpine:3.19", "library://alpine:3.19"),
        ("oras://ghcr.io/org/img:1", "oras://ghcr.io/org/img:1"),
        ("docker-daemon:atropos-sandbox:local", "docker-daemon://atropos-sandbox:local"),
        ("docker-daemon://atropos-sandbox:local", "docker-daemon://atropos-sandbox:local"),
    ],
)
def test_normalize(value: str, normalized: str) -> None:
    assert is_reference(value)
    assert normalize_reference(value) == normalized


@pytest.mark.parametrize("value", ["./img.sif", "/abs/img.sif", "has space", "UPPER/Case", "docker://", ""])
def test_not_references(value: str) -> None:
    assert not is_reference(value)
    with pytest.raises(ValueError, match="not an image reference"):
        normalize_reference(value)


def test_scheme_only_for_known_transports() -> None:
    assert reference_scheme("python:3.11") is None
    assert reference_scheme("docker://x") == "docker"
    assert reference_scheme("oci-archive:/tmp/x.tar") == "oci-archive"


def test_names_are_readable_safe_and_do_not_collide() -> None:
    a = sif_name_for("a/b:c")
    b = sif_name_for("a_b:c")
    assert a != b
    assert a.startswith("a_b_c-") and b.startswith("a_b_c-")
    for name in (a, b, sif_name_for("ghcr.io/org/img@sha256:" + "f" * 64)):
        assert re.fullmatch(r"[A-Za-z0-9._-]+\.sif", name), name
        assert not name.startswith(".")


def test_equivalent_spellings_share_one_file() -> None:
    assert sif_name_for("python") == sif_name_for("docker://python:latest") == sif_name_for("python:latest")
    assert sif_name_for("python:3.11") != sif_name_for("library://python:3.11")


def test_long_references_give_bounded_names() -> None:
    long_ref = "registry.example.org/" + "/".join(["deep"] * 60) + ":tag"
    assert len(sif_name_for(long_ref)) < 120
    assert sif_name_for(long_ref) != sif_name_for(long_ref.replace(":tag", ":tag2"))
