"""The fleet's second cache tier in Redis, under each process's local cache.

``SharedTier.wrap(introspector)`` has the introspector's interface and sits
between the coalescer and the real introspector: a local miss first looks in
Redis; on a Redis miss one process of the whole fleet (the holder of a lease
in Redis) introspects while the others wait for its answer on pub/sub and
then read it from Redis.  Whatever goes wrong with Redis (down, slow, full,
a forged or stale entry), the caller gets what the real introspector says:
Redis can make an answer faster, never make one up, and never fail a request.

What Redis holds (``FleetKeys``): keys are HMAC-SHA256 digests of the token
under a key derived from the fleet secret and the config identity; values
are AES-GCM sealed with a key derived (HKDF) from the fleet secret, the
identity and the token, the Redis key as associated data.  A dump of Redis
therefore holds neither tokens nor JWTs, and someone who can write to Redis
but lacks the secret cannot plant an answer for a token of their choosing,
nor move one token's answer under another token's key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from typing import Any, Callable, Optional, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from txredisapi import ResponseError

from phantomd.ops.logs import Throttle
from phantomd.token.outcomes import Active, Inactive
from phantomd.token.tokens import token_key

__all__ = ["FleetKeys", "SharedTier", "MIN_SECRET_BYTES"]

log = Logger()

MIN_SECRET_BYTES = 32
#: Rounds of "leased elsewhere: wait, look again" before introspecting
#: without the lease.
MAX_ROUNDS = 3
#: Lease waits at once in this process; past this a miss introspects
#: itself rather than wait (the coalescer already bounds this by
#: ``max_in_flight``, so it is a second line).
MAX_WAITERS = 10000
_VERSION = b"\x01"

Result = Union[Active, Inactive]

# One round trip for a miss: the answer if Redis has it, else try the lease.
_LOOKUP = b"""
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2}
end
return {0}
"""

# Store an answer (ttl 0: drop the key), index it by subject, give the lease
# back if it is still ours, and wake the waiters.
_STORE = b"""
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  if #KEYS >= 3 then
    redis.call('SADD', KEYS[3], KEYS[1])
    if redis.call('PTTL', KEYS[3]) < ttl then
      redis.call('PEXPIRE', KEYS[3], ttl)
    end
  end
else
  redis.call('DEL', KEYS[1])
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

_RELEASE = b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# Revoke every answer indexed under one subject.
_REVOKE_SUBJECT = b"""
local n = 0
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  n = n + redis.call('DEL', k)
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""

_REVOKE_TOKEN = b"""
local n = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""


def _hkdf(secret: bytes, salt: Optional[bytes], info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=info).derive(secret)


class FleetKeys:
    """Every name and key the fleet derives from its secret.

    ``identity`` is a digest of the config values that decide what an
    answer means (token service, answer format, minting key...): fleets, or
    one fleet before and after a reload, with different identities never
    read each other's answers, since both the key digest and the value key
    depend on it.  Revocation events and subject digests depend only on
    the secret, so a revocation reaches every process sharing it.
    """

    def __init__(self, secret: bytes, identity: bytes, prefix: str) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError("the fleet secret must be at least %d bytes"
                             % MIN_SECRET_BYTES)
        self._secret = secret
        self.identity = identity
        self.prefix = prefix.encode("utf-8")
        self._key_mac = _hkdf(secret, None, b"phantomd shared cache key\0"
                              + identity)
        self._value_salt = hashlib.sha256(
            b"phantomd shared cache value\0" + identity).digest()
        self._subject_mac = _hkdf(secret, None, b"phantomd subject\0")
        self._events = AESGCM(_hkdf(secret, None, b"phantomd events\0"))
        self.channel = self.prefix + b"events"

    def redis_key(self, token: str) -> bytes:
        return self.prefix + b"t:" + hmac.new(
            self._key_mac, token.encode("ascii"), hashlib.sha256
        ).hexdigest().encode("ascii")

    def lease_key(self, redis_key: bytes) -> bytes:
        return self.prefix + b"l:" + redis_key[len(self.prefix) + 2:]

    def subject_digest(self, subject: str) -> str:
        return hmac.new(self._subject_mac, subject.encode("utf-8"),
                        hashlib.sha256).hexdigest()

    def subject_set(self, digest: str) -> bytes:
        return self.prefix + b"s:" + digest.encode("ascii")

    def _value_key(self, token: str) -> AESGCM:
        return AESGCM(_hkdf(self._secret, self._value_salt,
                            b"phantomd shared cache value\0"
                            + token.encode("ascii")))

    def seal(self, token: str, redis_key: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._value_key(token).encrypt(
            nonce, plaintext, redis_key)

    def open(self, token: str, redis_key: bytes, value: bytes
             ) -> Optional[bytes]:
        """The plaintext, or None when ``value`` was not sealed by the
        fleet for this token under this key."""
        if not isinstance(value, bytes) or len(value) < 29 \
                or value[:1] != _VERSION:
            return None
        try:
            return self._value_key(token).decrypt(value[1:13], value[13:],
                                                  redis_key)
        except InvalidTag:
            return None

    def seal_event(self, event: dict) -> bytes:
        nonce = os.urandom(12)
        body = json.dumps(event, separators=(",", ":")).encode("ascii")
        return _VERSION + nonce + self._events.encrypt(nonce, body,
                                                       self.channel)

    def open_event(self, message: bytes) -> Optional[dict]:
        if not isinstance(message, bytes) or len(message) < 29 \
                or message[:1] != _VERSION:
            return None
        try:
            body = self._events.decrypt(message[1:13], message[13:],
                                        self.channel)
            event = json.loads(body)
        except (InvalidTag, ValueError):
            return None
        return event if isinstance(event, dict) else None


def encode_result(result: Result, until: float, at: float) -> bytes:
    doc: dict[str, Any] = {"u": until, "at": at}
    if isinstance(result, Active):
        doc.update(a=1, j=result.jwt, c=dict(result.claims))
    else:
        doc["a"] = 0
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def decode_result(plaintext: bytes, now: float
                  ) -> Optional[tuple[Result, float]]:
    """(answer with its remaining lifetime, when it was introspected), or
    None when it has expired or is not ours."""
    try:
        doc = json.loads(plaintext)
        until, at = float(doc["u"]), float(doc["at"])
        if not (math.isfinite(until) and math.isfinite(at)):
            return None
        if until <= now:
            return None
        if doc["a"] == 1:
            jwt, claims = doc["j"], doc["c"]
            if not isinstance(jwt, str) or not isinstance(claims, dict):
                return None
            return Active(jwt=jwt, claims=claims, lifetime=until - now), at
        if doc["a"] == 0:
            return Inactive(lifetime=until - now), at
    except (ValueError, KeyError, TypeError):
        return None
    return None


def subject_of(result: Result) -> Optional[str]:
    if isinstance(result, Active):
        sub = result.claims.get("sub")
        if isinstance(sub, str) and sub:
            return sub
    return None


class _Shared:
    """The introspector interface over ``SharedTier`` and a real one."""

    def __init__(self, tier: "SharedTier", inner: Any) -> None:
        self._tier = tier
        self.inner = inner

    def introspect(self, token: str) -> defer.Deferred:
        return defer.ensureDeferred(self._tier.introspect(token, self.inner))

    @property
    def last_success(self):
        return getattr(self.inner, "last_success", None)


class SharedTier:
    """Answers from Redis, one introspection per token per fleet.

    ``client`` is the command connection (``redisconn.RedisClient``),
    ``subscriber`` the pub/sub one (its messages go to ``message``).
    ``ttl(result)`` is the local cache's TTL rule, so Redis entries live
    exactly as long as local ones would.  ``lease_time`` (seconds) is how
    long a lease holder may take before another process takes over: the
    introspection timeout plus a margin.  ``revoked_after(digest)`` (set by
    the revocation side) is the clock time a subject was last revoked, so
    an answer introspected before it is refused; ``token_revoked_after(key)``
    the same for one token (cache key), so an entry the revocation deleted
    and someone wrote back is refused too.  ``on_event(event)`` gets
    the revocation events of other processes.
    """

    def __init__(self, reactor: Any, client: Any, subscriber: Any,
                 keys: FleetKeys, ttl: Callable[[Result], float],
                 metrics: Any, lease_time: float) -> None:
        self.reactor = reactor
        self.client = client
        self.subscriber = subscriber
        self.keys = keys
        self._ttl = ttl
        self.metrics = metrics
        self.lease_time = lease_time
        self.revoked_after: Callable[[str], Optional[float]] = \
            lambda digest: None
        self.token_revoked_after: Callable[[bytes], Optional[float]] = \
            lambda key: None
        self.on_event: Callable[[dict], None] = lambda event: None
        self._waiters: dict[bytes, list] = {}
        self._nwaiters = 0
        self._throttle = Throttle(reactor, 30.0, max_keys=8)

    def wrap(self, introspector: Any) -> _Shared:
        return _Shared(self, introspector)

    # -- the miss path ----------------------------------------------------------

    async def introspect(self, token: str, inner: Any) -> Result:
        keys, m = self.keys, self.metrics
        rkey = keys.redis_key(token)
        lease = keys.lease_key(rkey)
        owner = os.urandom(12).hex().encode("ascii")
        lease_ms = max(1, int(self.lease_time * 1000))
        held = False
        expired = False
        for _ in range(MAX_ROUNDS):
            # Listen before asking: the holder's message may arrive on the
            # subscriber connection before this lookup's answer does.  Once
            # a lease ran out without word from its holder, a lease found
            # held again is not waited for: a stuck holder or a Redis
            # writer renewing it would otherwise hold every process back
            # MAX_ROUNDS lease times for this token.
            waiter = (self._wait(rkey) if self.subscriber.connected
                      and self._nwaiters < MAX_WAITERS and not expired
                      else None)
            kind, value = await self._lookup(rkey, lease, owner, lease_ms)
            if kind != 0 or waiter is None:
                if waiter is not None:
                    waiter.cancel()
                if kind == 1:
                    found = self._open(token, rkey, value)
                    if found is not None:
                        m.shared_lookup["hit"].inc()
                        return found
                    m.shared_lookup["refused"].inc()
                elif kind == 2:
                    held = True
                    m.shared_lease["acquired"].inc()
                break
            m.shared_lease["waited"].inc()
            woke = await waiter
            if woke is False:
                m.shared_lease["expired"].inc()
                expired = True
            elif woke == "fail":
                # The holder's introspection failed: asking again at once
                # is what a client of this process would get without Redis
                # (and a slow token service must not cost MAX_ROUNDS
                # timeouts in a row).
                break
        else:
            log.debug("lease still held elsewhere after {n} rounds; "
                      "introspecting without it", n=MAX_ROUNDS)
        m.shared_lookup["miss"].inc()
        start = self.reactor.seconds()
        try:
            result = await inner.introspect(token)
        except BaseException:
            if held:
                self._release(lease, owner, rkey)
            raise
        await self._store(token, rkey, lease, owner if held else b"",
                          result, start)
        return result

    async def _lookup(self, rkey: bytes, lease: bytes, owner: bytes,
                      lease_ms: int) -> tuple[int, Any]:
        """(1, value): Redis has an answer; (2, None): this process holds
        the lease now; (0, None): another does; (-1, None): Redis failed."""
        try:
            reply = await self.client.call(b"EVAL", _LOOKUP, 2, rkey,
                                           lease, owner, lease_ms)
            return reply[0], (reply[1] if reply[0] == 1 else None)
        except ResponseError as e:
            # A full Redis (maxmemory, noeviction) refuses scripts that may
            # write: its answers can still be read.
            self._error(e)
            try:
                value = await self.client.call(b"GET", rkey)
            except Exception as e2:
                self._error(e2)
                return -1, None
            return (1, value) if value is not None else (-1, None)
        except Exception as e:
            self._error(e)
            return -1, None

    def _open(self, token: str, rkey: bytes, value: Any
              ) -> Optional[Result]:
        plaintext = self.keys.open(token, rkey, value)
        if plaintext is None:
            if self._throttle.admit("entry") is not None:
                log.warn("a Redis entry failed authentication (written "
                         "without the fleet secret, or under another key); "
                         "ignored")
            return None
        decoded = decode_result(plaintext, self.reactor.seconds())
        if decoded is None:
            return None
        result, at = decoded
        revoked = self.token_revoked_after(token_key(token))
        if revoked is not None and at <= revoked:
            return None  # e.g. the revoked entry, written back by hand
        sub = subject_of(result)
        if sub is not None:
            revoked = self.revoked_after(self.keys.subject_digest(sub))
            if revoked is not None and at <= revoked:
                return None
        return result

    async def _store(self, token: str, rkey: bytes, lease: bytes,
                     owner: bytes, result: Any, start: float) -> None:
        if not isinstance(result, (Active, Inactive)):
            return
        ttl = self._ttl(result)
        ttl_ms = int(ttl * 1000) if ttl > 0 else 0
        value = b""
        redis_keys = [rkey, lease]
        if ttl_ms > 0:
            now = self.reactor.seconds()
            value = self.keys.seal(token, rkey, encode_result(
                result, now + ttl_ms / 1000.0, start))
            sub = subject_of(result)
            if sub is not None:
                redis_keys.append(self.keys.subject_set(
                    self.keys.subject_digest(sub)))
        event = self.keys.seal_event({"t": "done", "r": rkey.decode()})
        try:
            await self.client.call(b"EVAL", _STORE, len(redis_keys),
                                   *redis_keys, value, ttl_ms, owner,
                                   self.keys.channel, event)
        except Exception as e:
            self._error(e)

    def _release(self, lease: bytes, owner: bytes, rkey: bytes) -> None:
        event = self.keys.seal_event({"t": "fail", "r": rkey.decode()})
        self.client.call(b"EVAL", _RELEASE, 1, lease, owner,
                         self.keys.channel, event).addErrback(
            lambda f: self._error(f.value))

    def _wait(self, rkey: bytes) -> defer.Deferred:
        """Fires True when the lease holder says it is done, ``"fail"``
        when its introspection failed, False after ``lease_time`` (it may
        have died)."""
        d: defer.Deferred = defer.Deferred(
            canceller=lambda d: self._forget(rkey, d))
        waiters = self._waiters.setdefault(rkey, [])
        waiters.append(d)
        self._nwaiters += 1

        def expire() -> None:
            if not d.called:
                self._forget(rkey, d)
                d.callback(False)
        timer = self.reactor.callLater(self.lease_time, expire)

        def done(woke):
            if timer.active():
                timer.cancel()
            if isinstance(woke, Failure):
                woke.trap(defer.CancelledError)  # not needed after all
                return None
            return woke
        return d.addBoth(done)

    def _forget(self, rkey: bytes, d: defer.Deferred) -> None:
        waiters = self._waiters.get(rkey)
        if waiters is not None and d in waiters:
            waiters.remove(d)
            self._nwaiters -= 1
            if not waiters:
                del self._waiters[rkey]

    # -- pub/sub ----------------------------------------------------------------

    def message(self, channel: bytes, message: bytes) -> None:
        event = self.keys.open_event(message)
        if event is None:
            self.metrics.shared_errors["refused"].inc()
            if self._throttle.admit("event") is not None:
                log.warn("a message on {channel} failed authentication; "
                         "ignored", channel=channel.decode("ascii", "replace"))
            return
        kind = event.get("t")
        if kind in ("done", "fail"):
            rkey = event.get("r")
            if isinstance(rkey, str):
                waiters = self._waiters.pop(rkey.encode(), [])
                self._nwaiters -= len(waiters)
                for d in waiters:
                    if not d.called:
                        d.callback(True if kind == "done" else "fail")
            return
        self.on_event(event)

    # -- revocation ---------------------------------------------------------

    def revoke_token(self, token: str, at: float) -> defer.Deferred:
        """Drop the token's answer from Redis and tell every process."""
        event = self.keys.seal_event({"t": "token",
                                      "k": token_key(token).hex(), "at": at})
        return self.client.call(b"EVAL", _REVOKE_TOKEN, 1,
                                self.keys.redis_key(token),
                                self.keys.channel, event)

    def revoke_subject(self, digest: str, at: float) -> defer.Deferred:
        event = self.keys.seal_event({"t": "sub", "s": digest, "at": at})
        return self.client.call(b"EVAL", _REVOKE_SUBJECT, 1,
                                self.keys.subject_set(digest),
                                self.keys.channel, event)

    def _error(self, e: BaseException) -> None:
        from phantomd.fleet.redisconn import Unavailable
        if isinstance(e, Unavailable):
            kind = "unavailable"
        elif isinstance(e, (defer.TimeoutError, defer.CancelledError)):
            kind = "timeout"
        else:
            kind = "error"
            if self._throttle.admit(type(e)) is not None:
                # Redis's own error text (OOM, READONLY...), never a value.
                log.warn("Redis call failed: {error}: {text}",
                         error=type(e).__name__, text=str(e)[:200])
        self.metrics.shared_errors[kind].inc()
