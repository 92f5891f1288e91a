"""Known answer for a device set (SPEC section 15), computed without kkachi's code.

The account is `person(1)` of protocol/src/device/tests.rs: Ed25519 seed 32 bytes of 1,
device secret 32 bytes of 101 (its X25519 key made as
kat_device_key.py says). Builds the set of `known_answer` (the first device
"laptop" at 1000, "phone" [7; 32] at 1001, "old tablet" [8; 32] added at 1002 and
removed at 1003) and prints the BLAKE3 hash of its encoding. Needs the `cryptography`
and `blake3` packages.
"""
import struct
from blake3 import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives import serialization as s
from kat_device_key import device_x25519
raw=lambda k: k.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
ed=Ed25519PrivateKey.from_private_bytes(bytes([1]*32)); x=device_x25519(bytes([101]*32))
def sign(label,msg): return ed.sign(bytes([len(label)])+label.encode()+msg)
def device(key,at,name):
    body=key+struct.pack('>Q',at)+bytes([len(name)])+name
    return body+sign("kkachi/device/v1",body)
def removal(key,at):
    body=key+struct.pack('>Q',at)
    return body+sign("kkachi/device-removal/v1",body)
devices=sorted([(raw(x),1000,b"laptop"),(bytes([7]*32),1001,b"phone")])
enc=bytes([1,len(devices)])+b"".join(device(*d) for d in devices)+bytes([1])+removal(bytes([8]*32),1003)
print(blake3(enc).hexdigest())
