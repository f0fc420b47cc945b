"""Run Django OAuth Toolkit as a throwaway token service on loopback.

``python run_dot.py STATE_DIR`` creates a sqlite database in STATE_DIR, runs
the migrations, registers the clients below, binds 127.0.0.1 on a port the
kernel picks, prints one JSON line (the port and the credentials) on stdout
and serves until stdin closes or it gets SIGTERM.  The test that starts it
keeps stdin open, so a crashed test run cannot leave the server behind.
"""

import json
import os
import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

#: The gateway authenticates to the introspection endpoint with this client.
GATEWAY = {"client_id": "phantomd-gateway", "client_secret": "gateway-secret"}
#: A gateway client whose secret form encoding changes ('!', '+'): DOT
#: form-decodes Basic credentials (RFC 6749 section 2.3.1), so it needs
#: basic_auth_encoding = form; raw reaches it as "Secr3t! tail".
SPECIAL = {"client_id": "phantomd-special", "client_secret": "Secr3t!+tail"}
#: The application that obtains tokens (password grant, so tokens have a user).
WEBAPP = {"client_id": "interop-webapp", "client_secret": "webapp-secret"}
USER = {"username": "alice", "password": "alice-password"}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def _oidc_key():
    """A fresh RSA key for DOT's id_tokens and its published JWKS."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode("ascii")


def _setup(state):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ["PHANTOMD_DOT_STATE"] = state
    os.environ["DJANGO_SETTINGS_MODULE"] = "dot_settings"
    os.environ["PHANTOMD_DOT_OIDC_KEY"] = _oidc_key()
    import django
    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from oauth2_provider.models import get_application_model

    call_command("migrate", verbosity=0, interactive=False)
    Application = get_application_model()
    user = get_user_model().objects.create_user(**USER)
    Application.objects.create(
        name="phantomd", user=user,
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_CLIENT_CREDENTIALS,
        **GATEWAY)
    Application.objects.create(
        name="phantomd-special", user=user,
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_CLIENT_CREDENTIALS,
        **SPECIAL)
    Application.objects.create(
        name="webapp", user=user,
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_PASSWORD,
        algorithm=Application.RS256_ALGORITHM, **WEBAPP)
    from django.core.wsgi import get_wsgi_application
    return get_wsgi_application()


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: run_dot.py STATE_DIR\n")
        return 2
    app = _setup(argv[1])
    server = make_server("127.0.0.1", 0, app, server_class=_Server,
                         handler_class=_QuietHandler)
    import django
    import oauth2_provider
    print(json.dumps({
        "port": server.server_address[1],
        "gateway": GATEWAY, "special": SPECIAL, "webapp": WEBAPP,
        "user": USER,
        "versions": {"django": django.get_version(),
                     "django-oauth-toolkit": oauth2_provider.__version__},
    }), flush=True)

    def stop_when_stdin_closes():
        sys.stdin.buffer.read()
        server.shutdown()

    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
