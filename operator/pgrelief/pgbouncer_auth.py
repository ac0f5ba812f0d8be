"""auth_query without pgrelief storing anyone's password: the lookup function, its check.

With ``auth.authQuery`` PgBouncer logs in as a lookup role and asks the server for the client's
password secret through a SECURITY DEFINER function that a DBA installs once (reading
``pg_shadow`` needs a superuser, which pgrelief must not need to be). The function returns no
superuser and no expired password, so the pooler can never be used to log in as a superuser.

Until the function exists every login through the pooler would fail, so pgrelief checks for it
first (``observe.pgbouncer_auth_check`` fills ``AuthFunctionCheck``) and reports a missing one
as a condition carrying the SQL to create it (``auth_condition``), rendered from the same
``Statement`` descriptions that ``act.composed`` executes. The lookup role's password is never
in that SQL: the DBA sets it to the one in the policy's Secret.

Pure: statements and texts only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pgrelief.advice import fix_sql, quote_ident
from pgrelief.pgbouncer_ini import SETTING_SINCE, Version
from pgrelief.policy import AuthQuerySpec, Condition, PgBouncerSpec
from pgrelief.statements import Name, Statement

READY_CONDITION = "PgBouncerReady"
AUTH_FUNCTION_MISSING = "AuthFunctionMissing"

# Result columns PgBouncer reads from auth_query, in this order.
_BODY = (
    "SELECT s.usename, s.passwd FROM pg_catalog.pg_shadow s "
    "WHERE s.usename = p_usename AND NOT s.usesuper "
    "AND (s.valuntil IS NULL OR s.valuntil > pg_catalog.now())"
)


def auth_query_text(query: AuthQuerySpec) -> str:
    """The pgbouncer.ini ``auth_query``: the function, called with the client's user name."""
    # Names quoted by quote_ident; $1 is PgBouncer's own parameter, the client's user name.
    return (
        f"SELECT usename, passwd FROM {quote_ident(query.schema_name)}."  # noqa: S608
        f"{quote_ident(query.function)}($1)"
    )


def install_statements(query: AuthQuerySpec, *, create_role: bool = False) -> tuple[Statement, ...]:
    """What a superuser runs, in each database of ``auth_databases``, to install the function.

    Every statement is idempotent (IF NOT EXISTS, OR REPLACE, REVOKE/GRANT), so the whole text
    can be run again; ``create_role`` adds the lookup role itself (a login role, no password:
    the DBA sets the one in the Secret).
    """
    schema, function, role = Name(query.schema_name), Name(query.function), Name(query.user)
    statements = [Statement("CREATE ROLE {} LOGIN", (role,))] if create_role else []
    statements += [
        Statement("CREATE SCHEMA IF NOT EXISTS {}", (schema,)),
        Statement(
            "CREATE OR REPLACE FUNCTION {}.{}(p_usename TEXT) "
            "RETURNS TABLE (usename NAME, passwd TEXT) "
            "LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp "
            f"AS $$ {_BODY} $$",
            (schema, function),
        ),
        Statement("REVOKE ALL ON FUNCTION {}.{}(TEXT) FROM PUBLIC", (schema, function)),
        Statement("GRANT USAGE ON SCHEMA {} TO {}", (schema, role)),
        Statement("GRANT EXECUTE ON FUNCTION {}.{}(TEXT) TO {}", (schema, function, role)),
    ]
    return tuple(statements)


def install_sql(query: AuthQuerySpec, *, create_role: bool = False) -> str:
    """``install_statements`` as the text a DBA pastes into psql."""
    return fix_sql(*install_statements(query, create_role=create_role))


def auth_databases(spec: PgBouncerSpec, version: Version) -> tuple[str, ...]:
    """The databases the function must exist in: the ``auth_dbname`` one (PgBouncer 1.20+),
    else every database, because older PgBouncer runs auth_query where the client connects."""
    query = spec.auth.auth_query
    if query is None or not spec.databases:
        return ()
    if version >= SETTING_SINCE["auth_dbname"]:
        return (query.database or spec.databases[0],)
    return tuple(spec.databases)


@dataclass(frozen=True, slots=True)
class AuthFunctionCheck:
    """What one database says about the lookup role and function (``observe`` fills it)."""

    database: str
    role_exists: bool
    role_can_login: bool
    function_exists: bool
    security_definer: bool
    owner_is_superuser: bool
    executable: bool  # the lookup role has USAGE on the schema and EXECUTE on the function

    @property
    def ready(self) -> bool:
        return (
            self.role_can_login
            and self.function_exists
            and self.security_definer
            and self.owner_is_superuser
            and self.executable
        )

    def problems(self, query: AuthQuerySpec) -> list[str]:
        name = f"{quote_ident(query.schema_name)}.{quote_ident(query.function)}(text)"
        found = []
        if not self.role_exists:
            found.append(f"role {query.user!r} does not exist")
        elif not self.role_can_login:
            found.append(f"role {query.user!r} cannot log in")
        if not self.function_exists:
            found.append(f"function {name} does not exist")
        else:
            if not self.security_definer:
                found.append(f"function {name} is not SECURITY DEFINER")
            if not self.owner_is_superuser:
                found.append(f"function {name} is not owned by a superuser (pg_shadow needs one)")
            if not self.executable and self.role_exists:
                found.append(f"role {query.user!r} may not execute {name}")
        return found


def auth_condition(checks: Sequence[AuthFunctionCheck], query: AuthQuerySpec) -> Condition | None:
    """``PgBouncerReady=False`` with the SQL that fixes it, or None when every check is ready."""
    missing = [check for check in checks if not check.ready]
    if not missing:
        return None
    role_missing = any(not check.role_exists for check in missing)
    sql = install_sql(query, create_role=role_missing)
    problems = "; ".join(
        f"in database {check.database!r}: " + ", ".join(check.problems(query)) for check in missing
    )
    where = ", ".join(repr(check.database) for check in missing)
    message = (
        f"auth_query cannot log anyone in: {problems}. Run as a superuser in database(s) {where}:"
        f"\n{sql}\n-- then set role {query.user}'s password to the one in Secret "
        f"{query.password_secret.name!r} key {query.password_secret.key!r}"
    )
    return Condition(
        type=READY_CONDITION, status="False", reason=AUTH_FUNCTION_MISSING, message=message
    )
