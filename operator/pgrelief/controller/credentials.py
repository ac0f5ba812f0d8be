"""The libpq connection string of a policy, with the login from its Secret.

The Secret is read again at every (re)connect, so a rotated password is used as soon as the
old session is gone, without restarting the operator. The password only ever travels inside
the connection string handed to libpq: errors name the Secret and the key, never a value.
"""

from __future__ import annotations

import base64
import binascii

from psycopg.conninfo import make_conninfo

from pgrelief.controller.kube import Kube, NotFoundError
from pgrelief.errors import PgreliefError
from pgrelief.policy import ConnectionPolicy


class CredentialsError(PgreliefError):
    """The Secret or one of its keys is missing or unreadable."""


def policy_conninfo(kube: Kube, policy: ConnectionPolicy) -> str:
    """Connection parameters from ``spec.postgres`` and, if named, its credentials Secret."""
    postgres = policy.spec.postgres
    namespace = policy.metadata.namespace or "default"
    if postgres.host is None:
        raise CredentialsError("spec.postgres.host is not set: the operator needs the server")
    params: dict[str, str | int] = {
        "host": postgres.host,
        "port": postgres.port,
        "dbname": postgres.database,
        "sslmode": postgres.ssl_mode,
    }
    if postgres.user:
        params["user"] = postgres.user
    secret = postgres.credentials_secret
    if secret is not None:
        try:
            data = kube.read_secret_data(namespace, secret.name)
        except NotFoundError:
            raise CredentialsError(
                f"Secret {namespace}/{secret.name} (spec.postgres.credentialsSecret) does not exist"
            ) from None
        params["user"] = _value(data, secret.username_key, namespace, secret.name)
        params["password"] = _value(data, secret.password_key, namespace, secret.name)
    return make_conninfo("", **params)


def _value(data: dict[str, str], key: str, namespace: str, name: str) -> str:
    encoded = data.get(key)
    where = f"Secret {namespace}/{name}"
    if encoded is None:
        raise CredentialsError(f"{where} has no key {key!r} (spec.postgres.credentialsSecret)")
    try:
        return base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise CredentialsError(f"{where}: the value of {key!r} is not UTF-8 text") from None
