"""The Ed25519 key that signs the audit chain, and checking its signatures."""

from __future__ import annotations

from pathlib import Path

from appliance.files import write_new_file

KEY_FILE = "audit-key.pem"
PUBLIC_KEY_FILE = "audit-key.pub"


class AuditKey:
    """The Ed25519 key that signs checkpoints; created on first use, private part readable by its owner only."""

    def __init__(self, private_key):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._key = private_key
        # The raw public key in hex: what checkpoints and heads record and ``logs verify --public-key`` takes.
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    @classmethod
    def load_or_create(cls, home: Path) -> "AuditKey":
        """The service's key: made on its first start."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = cls.load(home)
        if key is not None:
            return key
        key = cls(Ed25519PrivateKey.generate())
        try:
            key._write(Path(home) / KEY_FILE)
        except FileExistsError:  # another process of the box made it just now
            return cls.load(home)
        return key

    @classmethod
    def load(cls, home: Path) -> "AuditKey | None":
        """The key where this user may read it; None where it is not (another user's, or not made yet)."""
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            return cls(load_pem_private_key((Path(home) / KEY_FILE).read_bytes(), password=None))
        except (FileNotFoundError, PermissionError):
            return None

    def _write(self, path: Path) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        path.parent.mkdir(parents=True, exist_ok=True)
        write_new_file(path, self._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), mode=0o600)
        (path.parent / PUBLIC_KEY_FILE).write_text(self.public_key + "\n")

    def sign(self, payload: bytes) -> str:
        return self._key.sign(payload).hex()


def signature_valid(public_key: str, payload: bytes, signature: str | None) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key)).verify(bytes.fromhex(signature or ""), payload)
        return True
    except (InvalidSignature, ValueError):
        return False


def trusted_public_key(home: Path) -> str | None:
    """The box's own checkpoint key, from its public key file (the private one may not be readable)."""
    path = Path(home) / PUBLIC_KEY_FILE
    return path.read_text().strip() if path.exists() else None
