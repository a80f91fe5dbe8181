"""TLS and mutual TLS with certificates made here (the ``cryptography`` package)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ingest.errors import UnavailableError
from ingest.store.base import GraphStore
from service.client import CircuitsClient, ClientTls, RetryPolicy
from service.config import ServerConfig, TlsConfig
from service.server import serve_in_background
from tests.service.conftest import TOKEN

pytestmark = pytest.mark.integration
NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass
class Pem:
    cert: bytes
    key: bytes


def _issue(subject: str, issuer: Pem | None, *, ca: bool, server: bool = False) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    if issuer is None:
        issuer_name, signing_key = name, key
    else:
        issuer_name = x509.load_pem_x509_certificate(issuer.cert).subject
        signing_key = serialization.load_pem_private_key(issuer.key, None)  # type: ignore[assignment]
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(signing_key, hashes.SHA256())
    return Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@pytest.fixture(scope="module")
def pki() -> dict[str, Pem]:
    ca = _issue("circuitscope test CA", None, ca=True)
    return {
        "ca": ca,
        "server": _issue("localhost", ca, ca=False, server=True),
        "client": _issue("test client", ca, ca=False),
        "rogue": _issue("rogue client", _issue("rogue CA", None, ca=True), ca=False),
    }


def test_tls_serves_trusting_clients_and_refuses_plaintext(
    store: GraphStore, pki: dict[str, Pem]
) -> None:
    tls = TlsConfig(pki["server"].cert, pki["server"].key)
    config = ServerConfig(port=0, tokens=frozenset({TOKEN}), tls=tls)
    with serve_in_background(config, store) as running:
        target = f"localhost:{running.port}"
        with CircuitsClient(target, token=TOKEN, tls=ClientTls(root_ca=pki["ca"].cert)) as c:
            assert c.health() == "SERVING"
            assert c.get_graph("g-alpha").metadata.prompt == "alpha beta"
        plain = CircuitsClient(target, token=TOKEN, retry=NO_RETRY, timeout_s=5)
        with plain, pytest.raises(UnavailableError):
            plain.health()
        untrusting = ClientTls(root_ca=pki["rogue"].cert)
        wary = CircuitsClient(target, tls=untrusting, retry=NO_RETRY, timeout_s=5)
        with wary, pytest.raises(UnavailableError):
            wary.health()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    store: GraphStore, pki: dict[str, Pem]
) -> None:
    tls = TlsConfig(pki["server"].cert, pki["server"].key, client_ca=pki["ca"].cert)
    config = ServerConfig(port=0, tokens=frozenset({TOKEN}), tls=tls)
    with serve_in_background(config, store) as running:
        target = f"localhost:{running.port}"
        good = ClientTls(pki["ca"].cert, pki["client"].cert, pki["client"].key)
        with CircuitsClient(target, token=TOKEN, tls=good) as c:
            assert c.list_graphs(page_size=1).items
        for tls_option, hint in (
            (ClientTls(root_ca=pki["ca"].cert), "pass --tls-cert and --tls-key"),
            (
                ClientTls(pki["ca"].cert, pki["rogue"].cert, pki["rogue"].key),
                "its CA did not sign: check --tls-cert",
            ),
        ):
            with (
                CircuitsClient(
                    target, token=TOKEN, tls=tls_option, retry=NO_RETRY, timeout_s=5
                ) as c,
                pytest.raises(UnavailableError) as refused,
            ):
                c.list_graphs()
            assert hint in str(refused.value)
