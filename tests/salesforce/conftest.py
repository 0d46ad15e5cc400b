"""Fixtures of the Salesforce connector tests: a local HTTPS Salesforce (sf_fake.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sf_fake import FakeOrg, FakeSalesforce, make_rsa_key


@pytest.fixture(scope="session")
def sf_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """One RSA key pair for JWT bearer logins: (private key file, public key PEM)."""
    d = tmp_path_factory.mktemp("sf-keys")
    pub = make_rsa_key(d / "jwt.key")
    return d / "jwt.key", pub


@pytest.fixture
def fake_sf(tmp_path: Path, sf_keys: tuple[Path, bytes]) -> Iterator[FakeSalesforce]:
    """A fresh org behind HTTPS on 127.0.0.1; `.key_file` is the JWT key it trusts."""
    key, pub = sf_keys
    with FakeSalesforce(FakeOrg(jwt_public_key=pub), tmp_path / "tls") as srv:
        srv.key_file = key
        yield srv
