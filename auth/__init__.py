"""Who is calling and what they may do: API keys, roles, and the tenant a call is billed to.

- auth/roles.py: roles, permissions, and which permission each endpoint needs;
- auth/keys.py: the key format, keyed hashes and the key table in the ledger database;
- auth/secret.py: the server secret the hashes are keyed with (kept outside the database);
- auth/cache.py: each worker's short-lived copy of the key table (revocation bound);
- auth/throttle.py: slowing down peers that fail to authenticate;
- auth/authenticator.py: admitting a call (credential -> identity -> tenant), used by the
  metering core on every surface;
- auth/context.py: the identity of the call being served, for the HTTP routers;
- auth/api.py and auth/cli.py: key management over HTTP (admin keys) and the CLI.
"""
