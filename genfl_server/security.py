"""The server side of :mod:`genfl_shared.security` (TLS, tokens), and the documented entry point of
its tools: ``python -m genfl_server.security make-tokens --clients K --out DIR`` and ``hash-token``.
"""

from genfl_shared.security import (SecurityError, TokenAuthenticator, bearer_token, check_token, cli,
                                   hash_token, load_tokens, main, make_tokens, server_credentials)

__all__ = ["SecurityError", "TokenAuthenticator", "bearer_token", "check_token", "cli", "hash_token",
           "load_tokens", "main", "make_tokens", "server_credentials"]

if __name__ == "__main__":
    main()
