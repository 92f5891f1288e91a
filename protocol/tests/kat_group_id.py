"""Known answers for group operations (SPEC section 14.1), computed without kkachi's code.

The founder is `person(1)` of protocol/src/group/tests.rs: Ed25519 seed 32 bytes of 1,
device secret 32 bytes of 101 (its X25519 key made as
kat_device_key.py says). Prints the creation's hash and the group id that
`known_answer_group_id` expects. Needs the `cryptography` package.
"""
import hashlib, struct
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives import serialization as s
from kat_device_key import device_x25519
raw=lambda k: k.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
ed=Ed25519PrivateKey.from_private_bytes(bytes([1]*32)); x=device_x25519(bytes([101]*32))
edp, xp = raw(ed), raw(x)
def sign(label,msg): return ed.sign(bytes([len(label)])+label.encode()+msg)
def h(label,parts):
    m=hashlib.blake2s(digest_size=32); m.update(struct.pack('>Q',len(label))); m.update(label.encode())
    for p in parts: m.update(struct.pack('>Q',len(p))); m.update(p)
    return m.hexdigest()
pub = edp+xp+sign("kkachi/x25519-binding/v2", xp)
b8=lambda t: bytes([len(t)])+t
body = bytes([5]*16)+b8(b"Family")+bytes([0])+pub+b8(b"Founder")
signed = bytes([1])+bytes(32)+edp+struct.pack('>QQI',1,1,0)+bytes([1])+struct.pack('>H',len(body))+body
enc = signed+sign("kkachi/group-op/v1", signed)
print(h("kkachi/group-op/v1",[enc])); print(h("kkachi/group-id/v1",[enc]))
