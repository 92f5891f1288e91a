"""A device's key from its stored secret (SPEC section 1), computed without kkachi's code.

`device_x25519(secret)` is what the other known-answer scripts import: the first seed
H("kkachi/device-seed/v1", secret, u8 i) whose Ed25519 public key has sign bit 0 is the
device's transport key; its X25519 secret is the Ed25519 secret scalar (SHA-512 of the
seed, first half), whose public key is the Montgomery form of the Ed25519 one. Run as a
script, prints the X25519 key and the transport peer id of the identity
`known_answer_peer_id` reads (Ed25519 seed 32 bytes of 7, device secret 32 bytes of 9).
Needs the `cryptography` package.
"""
import hashlib, struct
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives import serialization as s

raw = lambda k: k.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)

def h(label, parts):
    m = hashlib.blake2s(digest_size=32)
    m.update(struct.pack('>Q', len(label))); m.update(label.encode())
    for p in parts:
        m.update(struct.pack('>Q', len(p))); m.update(p)
    return m.digest()

def device_keys(secret):
    """(Ed25519 private key, X25519 private key) of the device made from `secret`."""
    for i in range(64):
        seed = h("kkachi/device-seed/v1", [secret, bytes([i])])
        ed = Ed25519PrivateKey.from_private_bytes(seed)
        if raw(ed)[31] & 0x80 == 0:
            return ed, X25519PrivateKey.from_private_bytes(hashlib.sha512(seed).digest()[:32])
    raise ValueError("no device key")

def device_x25519(secret):
    return device_keys(secret)[1]

B58 = '123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz'
def peer_id(ed_pub):
    # identity multihash of the protobuf-encoded Ed25519 public key
    proto = bytes([0x08, 0x01, 0x12, 0x20]) + ed_pub
    b = bytes([0x00, len(proto)]) + proto
    n = int.from_bytes(b, 'big'); out = ''
    while n: n, r = divmod(n, 58); out = B58[r] + out
    return '1' * (len(b) - len(b.lstrip(b'\0'))) + out

if __name__ == '__main__':
    ed, x = device_keys(bytes([9] * 32))
    print(raw(x).hex())
    print(peer_id(raw(ed)))
