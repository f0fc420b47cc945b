// node oidc-provider as a throwaway token service on loopback, for
// tests/test_interop_oidc_provider.py.  Binds 127.0.0.1 on a port the
// kernel picks, prints one JSON line (port, issuer, credentials, version)
// and serves until stdin closes.  Nothing here is fit for production.
//
// argv[2]: the public JWK (JSON) of the private_key_jwt gateway client.
import http from 'node:http';
import { createRequire } from 'node:module';
import Provider from 'oidc-provider';

const version = createRequire(import.meta.url)('oidc-provider/package.json').version;
const GATEWAY = { client_id: 'phantomd-gateway', client_secret: 'Secr3t!+tail' };
const JWT_GATEWAY = { client_id: 'phantomd-jwt' };
const WEBAPP = { client_id: 'interop-webapp', client_secret: 'webapp-secret' };
const publicJwk = JSON.parse(process.argv[2]);

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: [
      { ...GATEWAY, grant_types: [], response_types: [], redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic' },
      { ...JWT_GATEWAY, grant_types: [], response_types: [], redirect_uris: [],
        token_endpoint_auth_method: 'private_key_jwt',
        jwks: { keys: [publicJwk] } },
      { ...WEBAPP, grant_types: ['client_credentials'], response_types: [],
        redirect_uris: [], scope: 'read write' },
    ],
    scopes: ['read', 'write'],
    features: {
      clientCredentials: { enabled: true },
      introspection: { enabled: true, allowedPolicy: async () => true },
      revocation: { enabled: true },
      devInteractions: { enabled: false },
    },
  });
  server.on('request', provider.callback());
  process.stdout.write(JSON.stringify({
    port, issuer, gateway: GATEWAY, jwt_gateway: JWT_GATEWAY, webapp: WEBAPP,
    versions: { 'oidc-provider': version, node: process.version },
  }) + '\n');
});

process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
