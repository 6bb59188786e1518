"""Credentials out of URIs before they are shown or stored.

A tracking URI (``http://user:password@host``), a storage URI (``s3://KEY:SECRET@bucket``,
``s3://bucket/x?access_key=...&secret_key=...``) or a database URI may carry credentials.
clusterlab *uses* such a URI as given, but what leaves the process toward a person or a store
(MLflow params, tags and ``config.yaml`` artifacts, checkpoints, printed lines, error
messages) goes through :func:`redact_uri` / :func:`redact_text` first:

- userinfo: ``user:password@`` becomes ``user:***@``, a bare ``token@`` becomes ``***@``;
- query parameters whose name looks like a credential (``access_key``, ``secret_key``,
  ``session_token``, ``password``, ``token``, ``sig``, ``signature``, ``key``,
  ``X-Amz-Credential`` / ``-Signature`` / ``-Security-Token``, and any name containing
  ``secret``, ``password``, ``token``, ``signature`` or ``credential``; case-insensitive) keep
  their name, their value becomes ``***``.

Everything else (scheme, host, port, path, other query parameters such as
``endpoint_override``) is kept byte for byte; a string that is not a URI is returned as is.
This module imports nothing heavy (config.py uses it).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

MASK = "***"

# Query parameter names whose value is a credential (compared lower-cased, percent-decoded).
SECRET_PARAMS = frozenset({
    "access_key", "secret_key", "session_token", "password", "passwd", "pwd", "token", "sig", "signature", "key",
    "x-amz-credential", "x-amz-signature", "x-amz-security-token", "x-goog-credential", "x-goog-signature",
    "api_key", "apikey", "access_token", "refresh_token", "client_secret", "auth",
})
_SECRET_WORDS = ("secret", "password", "token", "signature", "credential")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A URI inside free text (an error message, a repr): scheme:// up to whitespace, a quote or a bracket.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`()\[\]{}]+")


def is_secret_param(name: str) -> bool:
    key = unquote(name).strip().lower()
    return key in SECRET_PARAMS or any(word in key for word in _SECRET_WORDS)


def _redact_userinfo(rest: str) -> str:
    """``rest`` is the URI after ``scheme://``: mask the userinfo of its authority, if any."""
    end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if i != -1:
            end = min(end, i)
    authority = rest[:end]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        return (f"{user}:{MASK}" if colon else MASK) + "@" + host + rest[end:]
    # An unencoded '/', '?' or '#' in a password (AWS secret keys hold '/') ends the authority
    # early; such a URI does not parse anywhere, but it is still shown and logged: a colon not
    # followed by a port, and an '@' further on, mean "user:pass...@host".
    user, colon, after = authority.partition(":")
    at = rest.find("@", end)
    if colon and not after.isdigit() and not authority.startswith("[") and at != -1:
        return f"{user}:{MASK}@" + rest[at + 1:]
    return rest


def _redact_query(query: str) -> str:
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        parts.append(f"{name}={MASK}" if eq and is_secret_param(name) else part)
    return "&".join(parts)


def redact_uri(uri: str) -> str:
    """``uri`` with the credentials it carries replaced by ``***`` (see the module docstring);
    anything that is not a ``scheme://`` URI is returned unchanged."""
    if not isinstance(uri, str) or not _SCHEME.match(uri):
        return uri
    scheme, rest = uri.split("://", 1)
    rest = _redact_userinfo(rest)
    head, q, query = rest.partition("?")
    if q:
        query, hash_, fragment = query.partition("#")
        rest = head + "?" + _redact_query(query) + hash_ + fragment
    return f"{scheme}://{rest}"


def redact_text(text: str) -> str:
    """Every URI inside ``text`` (a message, a YAML document) passed through :func:`redact_uri`."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def redact_values(value: Any) -> Any:
    """A copy of a JSON-like structure (dicts, lists, strings) with every string that is a URI
    redacted: a config's ``model_dump(mode="json")`` before it is logged or written."""
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return redact_uri(value) if isinstance(value, str) else value
