"""The exit handler's webhook, called inside the `notify` step's container (kfp-free, like
`components.support`: a step's body cannot import the modules that define components).

The webhook URL is a credential (whoever holds it can post into the channel): the pipeline takes it from a
Kubernetes Secret into NOTIFY_WEBHOOK_ENV (pipelines/options.py, notify_secret), never as a parameter, and
nothing here prints more of it than its host.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request

NOTIFY_WEBHOOK_ENV = "HEALNET_NOTIFY_WEBHOOK"


def post_to_webhook(message: dict) -> None:
    """POST `message` as JSON to the https:// webhook in $HEALNET_NOTIFY_WEBHOOK, when one is set.

    A webhook that is not https:// is refused with a log line and no error: a misconfigured notification
    must not turn a finished run into a failed one. A failed POST raises, so that a lost notification
    shows in the run."""
    webhook_url = os.environ.get(NOTIFY_WEBHOOK_ENV, "").strip()
    if not webhook_url:
        print(f"no notification: {NOTIFY_WEBHOOK_ENV} is not set")
        return
    webhook = urllib.parse.urlsplit(webhook_url)
    if webhook.scheme != "https" or not webhook.hostname:
        print(
            f"notification refused: {NOTIFY_WEBHOOK_ENV} is not an https:// URL (scheme {webhook.scheme!r},"
            f" host {webhook.hostname!r}); nothing was sent"
        )
        return
    request = urllib.request.Request(
        webhook_url,
        data=json.dumps(message).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(f"notified {webhook.hostname}: HTTP {response.status}")
    except OSError as failure:  # URLError and HTTPError are OSErrors; their text names no URL
        raise RuntimeError(f"notifying {webhook.hostname} failed: {failure}") from None
