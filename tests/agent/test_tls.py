"""Shipping over HTTPS: the collector's certificate is verified (the system's
CAs, or ``collector.ca_file``), and ``verify_tls: false`` is the only way
around a certificate the agent cannot verify."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.configfile import ConfigInvalid
from tests.agent.conftest import agent_config, eventually, write_lines
from tests.agent.ingest_stub import IngestStub


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 it signed: (ca.pem, server.pem, server.key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("logferry test CA")).issuer_name(_name("logferry test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem, cert_pem, key_pem = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return ca_pem, cert_pem, key_pem


@pytest.fixture
def tls_stub(tmp_path: Path) -> Iterator[tuple[IngestStub, Path]]:
    ca_pem, cert_pem, key_pem = _certificates(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_pem, key_pem)
    stub = IngestStub().start(tls=server)
    assert stub.url.startswith("https://")
    yield stub, ca_pem
    stub.stop()


def _source(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "logs").mkdir()
    write_lines(tmp_path / "logs" / "a.log", [json.dumps({"msg": f"over tls {i}"}) for i in range(20)])
    return {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "json"}


async def test_a_collector_certificate_signed_by_ca_file_is_verified_and_used(tmp_path, tls_stub,
                                                                              start_agent) -> None:
    stub, ca_pem = tls_stub
    await start_agent(agent_config(tmp_path, stub.url, [_source(tmp_path)], collector={"ca_file": str(ca_pem)}))
    await eventually(lambda: len(stub.messages()) == 20, what="every line over HTTPS")
    assert sorted(stub.messages()) == sorted(f"over tls {i}" for i in range(20))


async def test_an_unverifiable_certificate_is_refused_and_retried(tmp_path, tls_stub, start_agent) -> None:
    stub, _ = tls_stub
    running = await start_agent(agent_config(tmp_path, stub.url, [_source(tmp_path)]))
    await eventually(lambda: running.agent.metrics.retries >= 2, what="retries on a certificate it cannot verify")
    assert stub.messages() == [] and stub.posts == 0


async def test_verify_tls_false_ships_to_any_certificate(tmp_path, tls_stub, start_agent) -> None:
    stub, _ = tls_stub
    await start_agent(agent_config(tmp_path, stub.url, [_source(tmp_path)], collector={"verify_tls": False}))
    await eventually(lambda: len(stub.messages()) == 20, what="every line over unverified HTTPS")


def test_a_missing_ca_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigInvalid) as info:
        agent_config(tmp_path, "https://127.0.0.1:1", [], collector={"ca_file": str(tmp_path / "nope.pem")})
    assert "collector" in str(info.value) and "ca_file" in str(info.value)
