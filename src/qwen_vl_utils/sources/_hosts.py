"""Hosts as the network reads them, for the fetch policy's ``allowed_hosts`` and ``denied_hosts``.

A resolver takes one address in many spellings (``2130706433``, ``0x7f.1``, ``0177.0.0.1`` and ``127.1`` are all
127.0.0.1, as are ``[::ffff:127.0.0.1]`` and, for a connection, ``0`` and ``[::]``), and a name in many forms
(``LOCALHOST.``, IDNA look-alikes such as ``loc\\u00aalhost``, which IDNA maps to ``localhost``). Hosts and
patterns are brought to one form before they are compared:

- an address, in any spelling ``inet_aton`` or ``ipaddress`` accepts, is the address;
- a name is lower-cased, without its trailing dot, through IDNA (nameprep, then punycode);
- a pattern is a name (``example.com``), a domain (``.example.com``: the name and its subdomains), an address
  or a CIDR range (``10.0.0.0/8``, ``fd00::/8``).

An address pattern matches every address the host reaches: an IPv6 address that embeds an IPv4 one (mapped,
NAT64, 6to4, Teredo) reaches that one too, and the unspecified address (``0.0.0.0``, ``::``) reaches this
machine, as loopback does. The name ``localhost`` (and ``*.localhost``, RFC 6761) is loopback: a pattern
``localhost`` matches loopback addresses, and a pattern ``127.0.0.1`` the name ``localhost``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import NamedTuple, Optional, Union

__all__ = [
    "Host",
    "address_matches",
    "check_pattern",
    "embedded_ipv4",
    "host_matches",
    "literal_address",
    "parse_host",
]

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_THIS_MACHINE = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_IPV4_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")


class Host(NamedTuple):
    name: str  # the normalised form: an address's canonical text, or the IDNA name
    address: Optional[Address]  # the address, when the host is one


def _ipv4_spelling(text: str) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address of ``inet_aton``'s forms: 1 to 4 dotted parts, each decimal, octal (0...) or hex (0x...),
    the last one filling the remaining bytes; None when ``text`` is not one."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.fullmatch(p) for p in parts):
        return None
    *head, last = [_ipv4_part(p) for p in parts]
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _ipv4_part(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    return int(part, 8 if part.startswith("0") else 10)


def literal_address(host: str) -> Optional[Address]:
    """The address ``host`` spells, in any form a resolver accepts (``[v6]`` too); None for a name."""
    text = host.strip().rstrip(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text.split("%")[0] if ":" in text else text)
    except ValueError:
        return _ipv4_spelling(text)


def _idna(name: str) -> str:
    labels = name.strip().rstrip(".").lower().split(".")
    if not all(labels):
        raise ValueError(f"{name!r} is not a valid host name (an empty label)")
    try:
        return ".".join(label.encode("idna").decode("ascii") for label in labels)
    except UnicodeError as exc:
        raise ValueError(f"{name!r} is not a valid host name ({exc})") from None


def parse_host(host: str) -> Host:
    """The host in its one form; ``ValueError`` for a name IDNA refuses (empty labels, a label over 63)."""
    address = literal_address(host)
    if address is not None:
        return Host(str(address), address)
    return Host(_idna(host), None)


def embedded_ipv4(addr: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 one reaches through a translation or a tunnel: mapped (::ffff:a.b.c.d), NAT64
    (64:ff9b::/96, 64:ff9b:1::/48), 6to4 (2002::/16), Teredo, IPv4-compatible (::a.b.c.d)."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if any(addr in net for net in _NAT64) or (addr in _IPV4_COMPATIBLE and int(addr) > 1):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def _reached(address: Address) -> set:
    """Every address a connection to ``address`` may end at."""
    out = {address}
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            out.add(inner)
    if any(a.is_unspecified or a.is_loopback for a in list(out)):
        out.update(_THIS_MACHINE)
    return out


class _Pattern(NamedTuple):
    name: Optional[str]  # a name or ".domain"
    networks: tuple  # the addresses it names (localhost: loopback)


def check_pattern(pattern: str) -> str:
    """A policy pattern, checked and in its one form (``ValueError`` for one that is neither)."""
    text = pattern.strip().lower()
    if "/" in text:
        return str(ipaddress.ip_network(text.strip("[]"), strict=False))
    address = literal_address(text)
    if address is not None:
        return str(address)
    return ("." if text.startswith(".") else "") + _idna(text.lstrip("."))


@functools.lru_cache(maxsize=256)
def _patterns(patterns: tuple) -> tuple:
    out = []
    for p in patterns:
        p = check_pattern(p)
        if "/" in p or literal_address(p) is not None:
            out.append(_Pattern(None, (ipaddress.ip_network(p),)))
        elif p in ("localhost", ".localhost"):
            out.append(_Pattern(p, _LOOPBACK))
        else:
            out.append(_Pattern(p, ()))
    return tuple(out)


def _name_matches(name: str, pattern: str) -> bool:
    return name == pattern or (pattern.startswith(".") and (name == pattern[1:] or name.endswith(pattern)))


def address_matches(address: Address, patterns: tuple) -> bool:
    """Does a pattern name an address ``address`` reaches (a resolved address, or an address host)?"""
    reached = _reached(address)
    networks = [net for p in _patterns(patterns) for net in p.networks]
    return any(a.version == net.version and a in net for net in networks for a in reached)


def host_matches(host: str, patterns: tuple) -> bool:
    """Does a pattern name ``host`` (any spelling of it: see the module's notes)?"""
    parsed = parse_host(host)
    if parsed.address is not None:
        return address_matches(parsed.address, patterns)
    is_localhost = parsed.name == "localhost" or parsed.name.endswith(".localhost")
    if is_localhost and address_matches(ipaddress.ip_address("127.0.0.1"), patterns):
        return True
    return any(p.name is not None and _name_matches(parsed.name, p.name) for p in _patterns(patterns))
