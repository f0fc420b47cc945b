"""Django settings for the interop token service (Django OAuth Toolkit).

Everything lives in the state directory named by ``PHANTOMD_DOT_STATE``
(a sqlite file); nothing here is fit for production: a fixed secret key and
a fast password hasher keep the test quick.
"""

import os

STATE = os.environ["PHANTOMD_DOT_STATE"]

SECRET_KEY = "interop-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "oauth2_provider",
]
MIDDLEWARE = []
ROOT_URLCONF = "dot_urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(STATE, "dot.sqlite3"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# DOT hashes client secrets with the password hasher; PBKDF2's default
# iterations would cost a second of CPU per introspection on a busy box.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

OAUTH2_PROVIDER = {
    "SCOPES": {
        "read": "Read",
        "write": "Write",
        "introspection": "Introspect tokens",
        "openid": "OpenID Connect",
    },
    "OIDC_ENABLED": True,
    "OIDC_RSA_PRIVATE_KEY": os.environ["PHANTOMD_DOT_OIDC_KEY"],
    "ACCESS_TOKEN_EXPIRE_SECONDS": 3600,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": True,
    "root": {"handlers": [], "level": "CRITICAL"},
}
