"""Kubernetes' string formats (names, label values, quantities), declared once.

Each `StringFormat` is checked by the model (a short message with an example) and
written into the CRD as `pattern` and `maxLength` (iterdpo/crd.py), so a bad claim
name or memory size is refused by `iterdpo validate`, `iterdpo render` and the API
server alike, before any manifest is built. The patterns are valid in Python and in
RE2 (Go, the API server's engine). What a pattern cannot say (the name part of a
qualified name is at most 63 characters) `extra` checks, in the model only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import AfterValidator

from iterdpo.yamlfile import short

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NAME_PART = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"


@dataclass(frozen=True)
class StringFormat:
    name: str  # a short name, for the docs' type column
    what: str  # what the value must be, in words, with an example
    pattern: str  # anchored; Python and RE2
    max_length: int
    extra: Callable[[str], str | None] = field(default=lambda value: None)  # a problem the pattern misses

    def check(self, value: str) -> str:
        if len(value) > self.max_length:
            problem = f"{len(value)} characters, at most {self.max_length}"
        elif not re.fullmatch(self.pattern, value):
            problem = ""
        else:
            problem = self.extra(value)
            if problem is None:
                return value
        raise ValueError((f"{problem}: " if problem else "") + f"must be {self.what} (got {short(value, 40)})")

    def annotated(self) -> object:
        return Annotated[str, self, AfterValidator(self.check)]


def _qualified(value: str) -> str | None:
    prefix, _, name = value.rpartition("/")
    if len(name) > 63:
        return f"the name after '/' is {len(name)} characters, at most 63"
    if len(prefix) > 253:
        return f"the prefix before '/' is {len(prefix)} characters, at most 253"
    return None


def _no_dot_parts(value: str) -> str | None:
    if any(part in (".", "..") for part in value.split("/")):
        return "no '.' or '..' parts"
    return None


DNS_SUBDOMAIN = StringFormat(
    "object name",
    "a Kubernetes object name: lowercase letters, digits, '-' and '.', starting and ending with a letter "
    "or digit, such as 'iterdpo-data'",
    rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$",
    253,
)
DNS_LABEL = StringFormat(
    "namespace name",
    "a namespace name: lowercase letters, digits and '-', starting and ending with a letter or digit, "
    "at most 63 characters",
    rf"^{_DNS_LABEL}$",
    63,
)
SECRET_KEY = StringFormat("Secret key", "a Secret key: letters, digits, '-', '_' and '.', such as 'token'", r"^[-._a-zA-Z0-9]+$", 253)
QUALIFIED_NAME = StringFormat(
    "label key",
    "a label key such as 'nvidia.com/gpu.product': an optional DNS prefix and '/', then letters, digits, "
    "'-', '_' and '.'",
    rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_NAME_PART}$",
    317,
    _qualified,
)
LABEL_VALUE = StringFormat(
    "label value",
    "a label value: empty, or letters, digits, '-', '_' and '.' starting and ending with a letter or "
    "digit, at most 63 characters",
    rf"^({_NAME_PART})?$",
    63,
)
# Kubernetes' resource.Quantity: a non-negative decimal, then a binary (Ki..Ei), decimal (n..E)
# or exponent suffix.
QUANTITY = StringFormat(
    "quantity",
    "a Kubernetes quantity such as '8', '500m', '64Gi' or '1e3'",
    r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$",
    64,
)
IMAGE = StringFormat(
    "image reference",
    "a container image reference such as 'registry.example.com/iterdpo:0.1.0' (no spaces)",
    r"^[A-Za-z0-9][-A-Za-z0-9._/:@+]*$",
    512,
)
ABSOLUTE_PATH = StringFormat(
    "absolute path",
    "an absolute path in the pod such as '/iterdpo', without ':'",
    r"^/[^:]*$",
    1024,
    _no_dot_parts,
)

DnsSubdomain = DNS_SUBDOMAIN.annotated()
DnsLabel = DNS_LABEL.annotated()
SecretKey = SECRET_KEY.annotated()
QualifiedName = QUALIFIED_NAME.annotated()
LabelValue = LABEL_VALUE.annotated()
Quantity = QUANTITY.annotated()
Image = IMAGE.annotated()
AbsolutePath = ABSOLUTE_PATH.annotated()
