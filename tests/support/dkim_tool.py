#!/usr/bin/env python3
"""DKIM keys and an independent verifier for hikyaku's end-to-end tests.

hikyaku signs with mail-auth; this checks the signatures with dkimpy, a separate
implementation, against a DNS record the test supplies (no DNS lookup).

    dkim_tool.py keygen rsa|rsa-pkcs8|ed25519 KEY_FILE RECORD_FILE
        writes the private key as hikyaku reads it (RSA: PKCS#1 PEM, or
        PKCS#8 PEM with rsa-pkcs8; Ed25519: PKCS#8 PEM) and the TXT record
        value of its public key.
    dkim_tool.py verify RECORD_FILE MESSAGE_FILE
        exits 0 and prints the signed header list when the message's
        DKIM-Signature verifies against the record, exits 1 otherwise.
"""
import base64
import re
import sys

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


def keygen(kind, key_file, record_file):
    if kind in ("rsa", "rsa-pkcs8"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        form = (serialization.PrivateFormat.TraditionalOpenSSL if kind == "rsa"
                else serialization.PrivateFormat.PKCS8)
        pem = key.private_bytes(serialization.Encoding.PEM, form,
                                serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        record = "v=DKIM1; k=ed25519; p=" + base64.b64encode(public).decode()
    else:
        sys.exit(f"unknown key kind {kind!r}")
    with open(key_file, "wb") as f:
        f.write(pem)
    with open(record_file, "w") as f:
        f.write(record)


def verify(record_file, message_file):
    record = open(record_file, "rb").read()
    message = open(message_file, "rb").read()

    def dns(name, timeout=5):
        return record

    ok = dkim.verify(message, dnsfunc=dns)
    header = re.search(rb"(?ims)^DKIM-Signature:(.*?)\r?\n(?![ \t])", message)
    signed = re.search(rb"h=([^;]*)", header.group(1)).group(1) if header else b""
    print(re.sub(rb"\s+", b"", signed).decode())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "keygen":
        keygen(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "verify":
        verify(*sys.argv[2:])
    else:
        sys.exit(__doc__)
