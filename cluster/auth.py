"""Ray token authentication for processes that talk to an ftune cluster.

Ray 2.60 turns token auth on for a cluster started with a token in ``~/.ray/auth_token``, but a
client connecting to an explicit address only sends the token when ``RAY_AUTH_MODE=token`` is set
(``ray._private.worker.init``: "an explicit address never [auto-enables auth]"). Every ftune
process that starts nodes or calls the GCS goes through :func:`enable_token_auth` so auth is
always on and never silently off.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ftune.compat import ray_private
from ftune.errors import UserError

AUTH_MODE_ENV = "RAY_AUTH_MODE"


class AuthSetupError(UserError):
    """Token auth cannot be turned on (auth disabled by the user, or no token can be made)."""


def enable_token_auth() -> None:
    """Make this process (and the processes it starts) use Ray token auth.

    Creates the token with ``ray get-auth-token --generate`` if none exists yet.

    Raises:
        AuthSetupError: ``RAY_AUTH_MODE`` is set to something other than ``token``, or no token
            could be created.
    """
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.lower() != "token":
        raise AuthSetupError(
            f"{AUTH_MODE_ENV}={mode!r}, but ftune clusters always use Ray token auth. "
            f"Unset {AUTH_MODE_ENV} or set it to 'token'."
        )
    if not ray_private.auth_token_present():
        done = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
            capture_output=True,
            text=True,
            check=False,
        )
        ray_private.forget_auth_token()
        if done.returncode != 0 or not ray_private.auth_token_present():
            raise AuthSetupError(
                "no Ray auth token found and `ray get-auth-token --generate` failed: "
                f"{done.stderr.strip()[-500:]}. Create one with `ray get-auth-token --generate`."
            )
    if not ray_private.token_auth_on():
        os.environ[AUTH_MODE_ENV] = "token"
        ray_private.reload_ray_config()  # Ray caches its config (auth mode included) in C++
