"""The value codec between the sandboxed program and the trusted test harness (JSON with type tags).

This file is also sent verbatim into the sandbox (rewards/sandbox.py), so it imports only `json`.
Decoding builds nothing but builtin values, so a hostile program can only hand back plain data: it cannot
smuggle an object with a lying __eq__ into the harness, which is what makes the verdict trustworthy.
"""

import json

_TAGS = {tuple: "t", set: "s", frozenset: "f"}
_UNTAG = {"t": tuple, "s": set, "f": frozenset}


class Opaque:
    """A value that could not cross the wire (a function, a custom object): equal to nothing."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<opaque {self.type_name}>"


def enc(v: object) -> object:
    """A Python value -> a JSON-able tree."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [enc(x) for x in v]
    for typ, tag in _TAGS.items():
        if isinstance(v, typ):
            return {tag: [enc(x) for x in v]}
    if isinstance(v, dict):
        return {"d": [[enc(k), enc(x)] for k, x in v.items()]}
    if isinstance(v, (bytes, bytearray)):
        return {"b": bytes(v).hex()}
    if isinstance(v, complex):
        return {"c": [v.real, v.imag]}
    return {"x": type(v).__name__}


def dec(j: object) -> object:
    """A JSON-able tree -> builtin values only."""
    if isinstance(j, list):
        return [dec(x) for x in j]
    if not isinstance(j, dict):
        return j
    (tag, body), = j.items()
    if tag in _UNTAG:
        return _UNTAG[tag](dec(x) for x in body)
    if tag == "d":
        return {dec(k): dec(x) for k, x in body}
    if tag == "b":
        return bytes.fromhex(body)
    if tag == "c":
        return complex(*body)
    return Opaque(str(body))


def dumps(v: object) -> bytes:
    return json.dumps(enc(v)).encode() + b"\n"


def loads(line: bytes) -> object:
    return dec(json.loads(line))
