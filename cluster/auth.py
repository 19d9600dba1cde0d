"""How a client proves itself to a Ray cluster with token authentication: Ray's own rules, read from
Ray 2.60's source, restated here so refusals can say what to fix. We never read, hold or print the
token; Ray does, from the same places, when it connects.

Ray's rules (``src/ray/rpc/authentication/authentication_token_loader.cc``,
``ray/_private/authentication/*``):

- A client sends a token only when ``RAY_AUTH_MODE=token`` is in its environment. Unset means
  disabled for a client given an explicit address (``ray.init(address=...)``, ``ray job submit``).
- The token is the first of: ``RAY_AUTH_TOKEN`` (if non-empty); the first line of the file named by
  ``RAY_AUTH_TOKEN_PATH`` (set but unreadable or empty is an error, with no fallback); the
  Kubernetes service-account token when ``RAY_ENABLE_K8S_TOKEN_AUTH`` is on; the first line of
  ``~/.ray/auth_token``. Surrounding whitespace is stripped.
- HTTP (job API) sends ``Authorization: Bearer <token>``: 401 when missing, 403 when wrong. The GCS
  answers gRPC calls without the right token with UNAUTHENTICATED; ``ray.init`` retries that for
  its whole connect window (~20 s) and then raises a plain ``ConnectionError``.
- Ray reads the mode and the token once per process and caches both: ``use_current_credentials``
  makes it read them again, as a fresh process would.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.errors import ClusterAccessDenied

AUTH_MODE_VAR = "RAY_AUTH_MODE"
TOKEN_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"
K8S_TOKEN_AUTH_VAR = "RAY_ENABLE_K8S_TOKEN_AUTH"
K8S_SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
HOW_TO_SEND = (f"set {AUTH_MODE_VAR}=token and the cluster's token in {TOKEN_PATH_VAR} (a file), "
               f"{TOKEN_VAR} or {DEFAULT_TOKEN_FILE}")


@dataclass(frozen=True)
class ClientCredentials:
    """What this process would send, as Ray decides it. ``source`` names where the token would
    come from (never the token); ``problem`` is set when Ray would fail before sending anything."""

    mode: str
    source: str | None
    problem: str | None = None


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            return file.readline().strip()
    except OSError:
        return ""


def client_credentials(environ: Mapping[str, str] | None = None) -> ClientCredentials:
    """Where Ray would find this process's token, following Ray's precedence."""
    environ = os.environ if environ is None else environ
    mode = environ.get(AUTH_MODE_VAR, "").strip().lower() or "unset"
    if environ.get(TOKEN_VAR, "").strip():
        return ClientCredentials(mode, TOKEN_VAR)
    token_path = environ.get(TOKEN_PATH_VAR, "")
    if token_path:
        source = f"{TOKEN_PATH_VAR}={token_path}"
        if not _first_line(Path(token_path).expanduser()):
            return ClientCredentials(mode, source, f"{source} cannot be read or is empty")
        return ClientCredentials(mode, source)
    if environ.get(K8S_TOKEN_AUTH_VAR, "").lower() in {"1", "true"} and _first_line(K8S_SERVICE_ACCOUNT_TOKEN):
        return ClientCredentials(mode, "the Kubernetes service-account token")
    home = environ.get("HOME", "")
    if home and _first_line(Path(home) / ".ray" / "auth_token"):
        return ClientCredentials(mode, DEFAULT_TOKEN_FILE)
    return ClientCredentials(mode, None)


def _denied(message: str) -> ClusterAccessDenied:
    # Imported when needed: the error derives from modelstock's, and importing modelstock loads
    # torch (~3 s), which a session that is let in never needs.
    from cluster.errors import ClusterAccessDenied

    return ClusterAccessDenied(message)


def _missing_token(credentials: ClientCredentials) -> str | None:
    """Why a client in token mode has nothing to send, or None."""
    if credentials.problem:
        return credentials.problem
    if credentials.source is None:
        return f"{AUTH_MODE_VAR}=token but no token was found"
    return None


def check_before_connecting(address: str, credentials: ClientCredentials) -> None:
    """In token mode without a usable token, fail now in one line, before any connection (Ray
    fails too, with a paragraph, or aborts on an unreadable token file)."""
    missing = _missing_token(credentials) if credentials.mode == "token" else None
    if missing:
        raise _denied(f"{address}: cannot send a Ray token: {missing}; {HOW_TO_SEND}")


def access_denied(address: str, credentials: ClientCredentials) -> ClusterAccessDenied:
    """The one-line error for a cluster that refused this client, saying what to fix."""
    if credentials.mode != "token":
        reason = f"the cluster requires a Ray token and {AUTH_MODE_VAR} is {credentials.mode}"
    else:
        reason = _missing_token(credentials) or ""
    if not reason:
        return _denied(f"{address} refused the Ray token from {credentials.source}: it is not this cluster's token")
    return _denied(f"{address} refused this client: {reason}; {HOW_TO_SEND}")


def job_api_headers(credentials: ClientCredentials) -> dict[str, str]:
    """The ``Authorization`` header ``ray job submit`` would send now (none unless
    ``RAY_AUTH_MODE=token``), loaded by Ray's own token loader from the current environment. Given
    explicitly, it does not depend on the mode Ray cached when this process first used it, so it
    works even beside a connected driver, where that cache cannot be refreshed."""
    if credentials.mode != "token":
        return {}
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    return dict(loader.get_token_for_http_header(ignore_auth_mode=True))


def use_current_credentials() -> None:
    """Make Ray in this process re-read ``RAY_AUTH_MODE`` and the token from the environment.

    Ray caches both on first use (the mode in its C++ config, the token in its loader), so a
    notebook or test that changes them between sessions would otherwise send the old ones. Only
    call while no Ray connection is open: re-initialising the config resets it to defaults.
    """
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
