#!/usr/bin/env python3
"""Reference implementation of StemeDB's canonical signing bytes (docs/signatures.md), independent
of the server code. Signs the documented test vector with the test key (32 bytes of 0x01) and
prints the canonical bytes, the public key (the agent_id) and the signature, all hex.

Needs the `cryptography` package: pip install cryptography
Usage: python3 docs/examples/sign_assertion.py [SECRET_KEY_HEX]
"""
import json
import struct
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization


def field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def canonical_json(value) -> str:
    # Keys sorted by their UTF-8 bytes, no whitespace, non-ASCII kept as UTF-8.
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0].encode())
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + canonical_json(v) for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def assertion_bytes(a: dict) -> bytes:
    out = b"stemedb:assert:v1\x00"
    out += field(a["concept_path"].encode())
    out += field(a["predicate"].encode())
    out += field(canonical_json(a["value"]).encode())
    out += field(a["agent_id"].encode())
    out += field(struct.pack(">d", float(a.get("confidence", 1.0))))
    out += field(",".join(a.get("supersedes", [])).encode())
    out += field(canonical_json(a["source"]).encode() if "source" in a else b"")
    out += field(a.get("request_id", "").encode())
    return out


def vote_bytes(assertion_id: str, agent_id: str, value: int) -> bytes:
    return b"stemedb:vote:v1\x00" + field(assertion_id.encode()) + field(agent_id.encode()) + field(bytes([value & 0xFF]))


def main():
    secret = bytes.fromhex(sys.argv[1]) if len(sys.argv) > 1 else bytes([1] * 32)
    key = Ed25519PrivateKey.from_private_bytes(secret)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    assertion = {
        "concept_path": "test/disk",
        "predicate": "space_ok",
        "value": {"free_gb": 12, "ok": True},
        "agent_id": public,
        "confidence": 0.9,
    }
    message = assertion_bytes(assertion)
    assertion["signature"] = key.sign(message).hex()
    print("agent_id (public key):", public)
    print("canonical bytes:", message.hex())
    print("signature:", assertion["signature"])
    vote = vote_bytes("01JDTESTTESTTESTTESTTESTTE", public, -1)
    print("vote bytes:", vote.hex())
    print("vote signature:", key.sign(vote).hex())
    print("request body:", json.dumps(assertion))


if __name__ == "__main__":
    main()
