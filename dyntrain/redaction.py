"""Secrets never leave the process: the one redaction of URIs, config values and text.

What is hidden (``***``):

- the user-info of a URL (``http://alice:pw@host/`` -> ``http://***@host/``);
- the value of every query parameter whose name looks secret (``token``, ``password``, ``secret``,
  ``key``, ``sig``, ``signature``, ``credential``, ``auth``, ``session``: ``?token=abc`` ->
  ``?token=***``; ``X-Amz-Signature``, ``X-Amz-Credential`` and Azure's ``sig`` included);
- a config value whose dotted key looks secret (``password``, ``secret``, ``token``, ``credential``,
  ``api_key``, ``access_key``).

``redact_uri`` handles one URL, ``redact_text`` every URL inside a line (the log format and
``error:`` lines run through it), ``redact`` one config value under its key, ``redact_config`` a
whole config dict (the ``config.yaml`` artifact, the config inside checkpoints, MLflow params).
``mlflow_uri`` hands the credentials of an MLflow URI to MLflow's own environment variables
(``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ``MLFLOW_TRACKING_TOKEN``) and returns the URI without
them, so MLflow's own messages (``View run ... at: http://...``) carry none.
"""
from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit


MASK = "***"
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|credential|api_?key|access_?key)", re.I)
_SECRET_PARAM = re.compile(r"(pass|pwd|secret|token|key|sig|credential|auth|session)", re.I)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")


def _redact_query(query: str) -> str:
    out = []
    for item in query.split("&"):
        name, eq, _value = item.partition("=")
        out.append(f"{name}={MASK}" if eq and _SECRET_PARAM.search(unquote(name)) else item)
    return "&".join(out)


def redact_uri(uri: str) -> str:
    """``uri`` without user-info and with secret-looking query values masked; other text unchanged."""
    if "://" not in uri or ("@" not in uri and "?" not in uri and "#" not in uri):
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # not parseable as a URL: mask everything after the scheme
        return uri.split("://", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query, fragment = _redact_query(parts.query), _redact_query(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` through ``redact_uri`` (for log and error lines)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_uri(m.group(0)), text)


def redact(key: str, value: Any) -> Any:
    """Config value ``value`` under dotted ``key``: ``***`` for a secret-looking key, URLs redacted
    inside strings, lists and dicts."""
    if _SECRET_KEY.search(key.rsplit(".", 1)[-1] if key else ""):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, (list, tuple)):
        return [redact(key, v) for v in value]
    if isinstance(value, dict):
        return {k: redact(f"{key}.{k}" if key else str(k), v) for k, v in value.items()}
    return value


def redact_config(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict (``Config.to_dict()``) safe to write anywhere."""
    return redact("", data)


def mlflow_uri(uri: str) -> str:
    """``uri`` for MLflow: the user-info of an ``http(s)://`` URI goes to ``MLFLOW_TRACKING_USERNAME``
    / ``MLFLOW_TRACKING_PASSWORD`` and a ``token=`` query value to ``MLFLOW_TRACKING_TOKEN`` (in this
    process's environment, where MLflow reads them); the URI comes back without them (other secret
    query values masked). Other URIs (``sqlite:``, ``databricks``) come back unchanged. Idempotent."""
    if not uri.startswith(("http://", "https://")):
        return uri
    parts = urlsplit(uri)
    if parts.username is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    kept = []
    for item in parts.query.split("&") if parts.query else ():
        name, eq, value = item.partition("=")
        if eq and unquote(name).lower() in ("token", "access_token"):
            os.environ["MLFLOW_TRACKING_TOKEN"] = unquote(value)
        else:
            kept.append(item)
    clean = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "&".join(kept), parts.fragment))
    return redact_uri(clean)
