"""Personal data at rest: authenticated encryption plus keyed hashes for lookups.

The spec: "Encrypt email addresses at rest; hash phone numbers for lookups."
Values are sealed with AES-256-GCM under a key derived (HKDF) from the
collector's ``secret_key``; lookups go through an HMAC-SHA256 of the
normalised value under a second derived key, so equal addresses match without
the table holding them in the clear, and the hashes are useless without the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_PREFIX = "v1:"


def _derive(secret: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"logferry-pii", info=purpose).derive(secret.encode())


def normalise_email(address: str) -> str:
    return address.strip().lower()


def normalise_phone(number: str) -> str:
    """Digits with a leading + kept: ``+1 (555) 010-9999`` → ``+15550109999``."""
    number = number.strip()
    digits = re.sub(r"\D", "", number)
    return ("+" if number.startswith("+") else "") + digits


class PiiCipher:
    def __init__(self, secret_key: str):
        self._aead = AESGCM(_derive(secret_key, b"encrypt"))
        self._hash_key = _derive(secret_key, b"lookup-hash")

    def encrypt(self, value: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, value.encode("utf-8"), None)
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, value: str) -> str:
        if not value.startswith(_PREFIX):
            raise ValueError("not an encrypted value")
        raw = base64.urlsafe_b64decode(value[len(_PREFIX):])
        return self._aead.decrypt(raw[:12], raw[12:], None).decode("utf-8")

    def lookup_hash(self, value: str) -> str:
        """A keyed hash of an already-normalised value."""
        return hmac.new(self._hash_key, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def email_hash(self, address: str) -> str:
        return self.lookup_hash(normalise_email(address))

    def phone_hash(self, number: str) -> str:
        return self.lookup_hash(normalise_phone(number))
