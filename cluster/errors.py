"""What can go wrong reaching a Ray cluster. Both are bad input to the CLI (one line, exit 2): the
address or the credentials the user gave do not get them in. Single-argument classes, like every
error in ``modelstock.errors``, so they pickle across Ray processes."""

from __future__ import annotations

from modelstock.errors import InputError


class ClusterAccessDenied(InputError):
    """The cluster refused this client: Ray token authentication is on and the token is missing or
    not the cluster's."""


class ClusterUnreachable(InputError):
    """No Ray cluster answered at the address given (``--address``, ``RAY_ADDRESS``)."""
