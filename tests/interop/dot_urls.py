"""The token service's endpoints under /o/ (token, revoke_token, introspect)."""

from django.urls import include, path

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
]
