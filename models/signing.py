"""Ed25519 keys in PEM files, as the install bundle and model exports sign and check them.

Make a pair with ``openssl genpkey -algorithm ed25519 -out signing.pem`` and
``openssl pkey -in signing.pem -pubout -out signing.pub``. What is signed is a SHA256SUMS file;
its signature is the raw 64 bytes in SHA256SUMS.sig, which openssl 3 checks with
``pkeyutl -verify -rawin`` on a box without Python.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class SigningError(ValueError):
    """A key that cannot be used, or a signature that does not hold; the message says which file."""


def load_private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return _load(path, lambda data: load_pem_private_key(data, password=None), Ed25519PrivateKey, "private",
                 "openssl genpkey -algorithm ed25519 -out signing.pem")


def load_public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return _load(path, load_pem_public_key, Ed25519PublicKey, "public",
                 "openssl pkey -in signing.pem -pubout -out signing.pub")


def _load(path: Path, parse, kind: type, which: str, make: str):
    try:
        key = parse(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not a readable PEM {which} key ({exc})") from None
    if not isinstance(key, kind):
        raise SigningError(f"{path} is not an Ed25519 {which} key: make one with {make}")
    return key


def fingerprint(public_key) -> str:
    """sha256 of the raw 32-byte public key; install.sh prints the same from the .pub PEM."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def verify(public_key, data: bytes, signature: bytes, what: str) -> None:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        raise SigningError(f"the signature of {what} does not match the public key "
                           f"(sha256 {fingerprint(public_key)}): it was changed, or signed with another key") from None
