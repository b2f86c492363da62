"""Reaching the Hugging Face hub, or failing fast when it is out of reach.

huggingface_hub and datasets retry a dead connection for half a minute or more before they give
up with a long traceback; a socket probe of the hub's host answers in seconds. Kept free of torch
so that fineweb.py, which streams datasets, does not pay for importing it.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from core.errors import UserError


def require_hub_reachable(what: str, advice: str) -> None:
    """Raise a UserError naming `what` could not be fetched, and `advice`, when the hub (the host of
    HF_ENDPOINT, huggingface.co by default) cannot be reached or offline mode is set."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot fetch {what}: HF_HUB_OFFLINE is set. {advice}")
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    if getproxies().get(url.scheme) and not proxy_bypass(url.hostname):
        return  # behind a proxy the host need not be reachable directly: let the download try
    try:
        socket.create_connection((url.hostname, port), timeout=10).close()
    except OSError as error:
        raise UserError(f"the Hugging Face hub at {url.hostname}:{port} is unreachable ({error.strerror or error}), "
                        f"so {what} cannot be fetched. {advice}") from None
