"""`RedisBroker`: channels, history, presence and node-to-node messages shared through Redis.

Imported only when ``cluster.redis`` is set.  What lives in Redis (``P`` is
``cluster.namespace``; docs/cluster.md has the full picture):

* ``P:ch:{c}:m`` hash ``{e: epoch, s: latest offset, k: seconds kept for sessions}`` and
  ``P:ch:{c}:x`` stream (entry id ``{offset}-0``, field ``d`` = the publication's JSON),
  trimmed with ``MAXLEN ~ history_size`` and expiring ``history_ttl`` after the last
  publication.  One Lua script increments the
  offset, appends to the stream and PUBLISHes to ``P:ch:{c}``, atomically, so every node
  receives a channel's publications in offset order.
* fan-out: Redis pub/sub.  A node SUBSCRIBEs to ``P:ch:{c}`` only while it has a local
  subscriber of ``c`` (nothing is polled), plus ``P:node:{id}`` (send) and ``P:all``
  (broadcast).
* presence: ``P:ch:{c}:p`` hash session -> info; nodes in the sorted set ``P:nodes`` scored by
  the Redis-clock time at which they count as dead; a node's clients in ``P:node:{id}:clients``
  and the session -> node map ``P:sessions``.  Every node reaps dead nodes (an atomic script,
  so exactly one reaper publishes each ``leave``).

Pub/sub loses what is published while a node's link is down; the hub notices the gap by offset
(or by the link coming back) and fills it from the stream, or tells the client it cannot.

Redis with Sentinel (``cluster.sentinel``): both connections ask the sentinels where the
master is at every attempt (`heartbeatd.cluster.sentinel`).  A failover can lose the last
writes the old master had not yet replicated, so offsets could be handed out twice; to make
that impossible, the first node to reach a server whose replication id differs from the one
recorded in ``P:replid`` bumps ``P:gen``, and every channel whose meta hash carries an older
generation starts a new epoch when next used (subscribers get ``resync``).

Every command has a deadline (``cluster.command_timeout``): one timer per connection, for its
oldest unanswered command; past it the connection is reset, failing what waited on it
(``unavailable``), so a blackholed link is noticed within that time.

txredisapi is the client (native Twisted; see docs/cluster.md for the comparison).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from heartbeatd._logging import LogLimiter, get_logger
from heartbeatd.cluster.broker import (
    BadBrokerMessage,
    BrokerListener,
    BrokerUnavailable,
    History,
    Position,
    checked_data,
    checked_epoch,
    checked_presence,
    checked_push,
    new_epoch,
)
from heartbeatd.config import ChannelsConfig, ClusterConfig

try:  # hiredis encodes commands in C (3 us instead of txredisapi's 30 us per publish)
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - hiredis is part of heartbeatd[cluster]
    _pack_command = None

__all__ = ["RedisBroker", "parse_redis_url"]

log = get_logger(__name__)

#: Most seconds between reconnect attempts to Redis (loopback or LAN: retry fast).
RECONNECT_MAX_DELAY = 1.0

# -- Lua scripts (atomic on the Redis side; keys are built from ARGV[1], the namespace) -------

# A channel's epoch and offset; a new epoch when the meta hash is missing or was written in an
# older generation of the data (before a failover: see FENCE).
_INIT = """
local m, x = P..':ch:'..c..':m', P..':ch:'..c..':x'
local g = redis.call('GET', P..':gen') or '0'
local meta = redis.call('HMGET', m, 'e', 's', 'g')
local e, s = meta[1], 0
if not e or (meta[3] or '0') ~= g then
  e = cand
  redis.call('DEL', x)
  redis.call('HSET', m, 'e', e, 's', 0, 'g', g)
  -- bounded until someone joins (JOIN persists it) or publishes (the history's TTL)
  redis.call('EXPIRE', m, 3600)
else
  s = tonumber(meta[2])
end
"""

PUBLISH = (
    "local P, c, data, cand = ARGV[1], ARGV[2], ARGV[3], ARGV[4]\n"
    + _INIT
    + """
s = redis.call('HINCRBY', m, 's', 1)
local size, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
if size > 0 then
  redis.call('XADD', x, 'MAXLEN', '~', size, s .. '-0', 'd', data)
  if ttl > 0 then redis.call('EXPIRE', x, ttl) end
end
if ttl > 0 and redis.call('EXISTS', P..':ch:'..c..':p') == 0 then
  redis.call('EXPIRE', m, ttl)  -- nobody subscribed: the stream's record goes with its history
end
redis.call('PUBLISH', P..':ch:'..c, 'p'..e..' '..s..' '..data)
return {e, s}
"""
)

POSITION = "local P, c, cand = ARGV[1], ARGV[2], ARGV[3]\n" + _INIT + "return {e, s}\n"

HISTORY = (
    "local P, c, cand = ARGV[1], ARGV[2], ARGV[3]\n"
    + _INIT
    + """
local since, limit = tonumber(ARGV[5]), tonumber(ARGV[6])
if e ~= ARGV[4] or since > s or s - since > limit then return {e, s, 0} end
if since == s then return {e, s, 1} end
local entries = redis.call('XRANGE', x, string.format('%d', since + 1), string.format('%d', s))
if #entries ~= s - since then return {e, s, 0} end
local out = {e, s, 1}
for _, entry in ipairs(entries) do out[#out + 1] = entry[2][2] end
return out
"""
)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

JOIN = """
local P, c, n, s, info = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local m, keep = P..':ch:'..c..':m', tonumber(ARGV[6]) or 0
redis.call('HSET', P..':ch:'..c..':p', s, info)
redis.call('PERSIST', m)
if keep > tonumber(redis.call('HGET', m, 'k') or '0') then redis.call('HSET', m, 'k', keep) end
redis.call('SADD', P..':node:'..n..':channels', c)
redis.call('PUBLISH', P..':ch:'..c, 'j'..info)
return 1
"""

# When a channel's last member leaves, its offset record (``:m``) goes with its history:
# at once when there is none, else when the history expires (Redis never keeps a record per
# channel name anyone ever subscribed to; issue 22).  A resumable session that joined counts
# on the record (its epoch and offset) until it may come back: ``k`` in ``:m`` is the longest
# such wait, in seconds (the session's expiry and the store's slack, so bounded by
# ``sessions.max_expiry``), and the record lives at least that long after the last leave.
# Without it, a detached session's subscription to a channel with no publication yet found
# a new epoch on resume, and was told ``history_lost`` though nothing was missed.
_TIDY = """
local function tidy(P, c, keep)
  if redis.call('EXISTS', P..':ch:'..c..':p') == 0 then
    local m, left = P..':ch:'..c..':m', redis.call('PTTL', P..':ch:'..c..':x')
    local k = math.max(tonumber(redis.call('HGET', m, 'k') or '0') or 0, keep) * 1000
    if left == -2 then left = 0 end
    if left >= 0 then
      if k > left then left = k end
      if left == 0 then redis.call('DEL', m) else redis.call('PEXPIRE', m, left) end
    end
  end
end
"""

LEAVE = (
    _TIDY
    + """
local P, c, s, n, last = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local p = P..':ch:'..c..':p'
local info = redis.call('HGET', p, s)
if info then
  redis.call('HDEL', p, s)
  redis.call('PUBLISH', P..':ch:'..c, 'l'..info)
end
if last == '1' then redis.call('SREM', P..':node:'..n..':channels', c) end
tidy(P, c, tonumber(ARGV[6]) or 0)
return 1
"""
)

PRESENCE = (
    "local P, c = ARGV[1], ARGV[2]\n"
    + _NOW
    + """
local all = redis.call('HGETALL', P..':ch:'..c..':p')
local alive, out = {}, {}
for i = 1, #all, 2 do
  local ok, info = pcall(cjson.decode, all[i + 1])
  if ok then
    local n = info['node']
    if alive[n] == nil then
      local score = redis.call('ZSCORE', P..':nodes', n)
      alive[n] = score ~= false and tonumber(score) > now
    end
    if alive[n] then out[#out + 1] = all[i + 1] end
  end
end
return out
"""
)

# Renew node ``n``'s lease, for the process (incarnation ``inc``) that holds it now.
# ``P:node:{n}:i`` names that process.  A process new under this node id (a restart after
# kill -9 renews its predecessor's lease before it runs out, so the reaper never sees it
# dead) takes the lease over in its first beat, which runs before anything else it sends
# to Redis: the resumable sessions an earlier process held (``P:node:{n}:s``, recorded with
# another incarnation ``i``) are detached here, as the reaper would have (pushes and
# broadcasts to them then wait in Redis for their replay).  A record naming another
# process after this one's first beat means two live processes share the node id (a
# configuration mistake): nothing is taken back (they would take turns detaching each
# other's sessions), the answer says so and the node logs it.
# Answers {added (ZADD), 'ok'} | {added, 'adopted', detached, previous} | {added, 'other', it}.
HEARTBEAT = (
    "local P, n, expire, inc, first = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]\n"
    + _NOW
    + """
local added = redis.call('ZADD', P..':nodes', now + expire, n)
local ik = P..':node:'..n..':i'
local was = redis.call('GET', ik)
if was == inc then return {added, 'ok'} end
if was and first ~= '1' then return {added, 'other', was} end
redis.call('SET', ik, inc)
local ss, count = P..':node:'..n..':s', 0
for _, sid in ipairs(redis.call('SMEMBERS', ss)) do
  local h = P..':s:'..sid
  local f = redis.call('HMGET', h, 'n', 'i')
  if f[1] ~= n then
    redis.call('SREM', ss, sid)  -- its keys expired
  elseif f[2] ~= inc then
    local left = redis.call('PTTL', h)
    if left > 0 then
      redis.call('HSET', h, 'c', '')
      redis.call('ZADD', P..':s:d', now + left, sid)
      count = count + 1
    end
    redis.call('SREM', ss, sid)
  end
end
return {added, 'adopted', count, was or ''}
"""
)

#: Each identity's sessions, in a set kept beside the clients (``{P}:id:{identity}``): the
#: cluster-wide per-identity count and ``DELETE /identities/{identity}`` read it.  Empty sets
#: disappear by themselves, so it holds nothing for identities no longer connected.
_IDENTITY_INDEX = """
local function index(P, s, info, op)
  if not info then return end
  local ok, v = pcall(cjson.decode, info)
  if ok and type(v) == 'table' and type(v['identity']) == 'string' then
    redis.call(op, P..':id:'..v['identity'], s)
  end
end
"""

REAP = (
    _TIDY
    + _IDENTITY_INDEX
    + "local P = ARGV[1]\n"
    + _NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', P..':nodes', '-inf', now)
for _, n in ipairs(dead) do
  local chk = P..':node:'..n..':channels'
  for _, c in ipairs(redis.call('SMEMBERS', chk)) do
    local p = P..':ch:'..c..':p'
    local all = redis.call('HGETALL', p)
    for i = 1, #all, 2 do
      local ok, info = pcall(cjson.decode, all[i + 1])
      if ok and info['node'] == n then
        redis.call('HDEL', p, all[i])
        redis.call('PUBLISH', P..':ch:'..c, 'l'..all[i + 1])
      end
    end
    tidy(P, c, 0)
  end
  redis.call('DEL', chk)
  local ck = P..':node:'..n..':clients'
  for _, s in ipairs(redis.call('HKEYS', ck)) do
    index(P, s, redis.call('HGET', ck, s), 'SREM')
    if redis.call('HGET', P..':sessions', s) == n then redis.call('HDEL', P..':sessions', s) end
  end
  redis.call('DEL', ck)
  -- its resumable sessions are detached now (heartbeatd.cluster.sessions: P:s:d)
  local ss = P..':node:'..n..':s'
  for _, sid in ipairs(redis.call('SMEMBERS', ss)) do
    local left = redis.call('PTTL', P..':s:'..sid)
    if left > 0 and redis.call('HGET', P..':s:'..sid, 'n') == n then
      redis.call('HSET', P..':s:'..sid, 'c', '')
      redis.call('ZADD', P..':s:d', now + left, sid)
    end
  end
  redis.call('DEL', ss)
  redis.call('DEL', P..':node:'..n..':i')
  redis.call('ZREM', P..':nodes', n)
end
return dead
"""
)

# Make Redis match this node's own record of its clients and presence (after a reconnect,
# or after other nodes reaped us while we were cut off): stale entries leave, missing join.
REGISTER = (
    _IDENTITY_INDEX
    + """
local P, n = ARGV[1], ARGV[2]
local clients, pres = cjson.decode(ARGV[3]), cjson.decode(ARGV[4])
local ck = P..':node:'..n..':clients'
for _, s in ipairs(redis.call('HKEYS', ck)) do
  if clients[s] == nil then
    index(P, s, redis.call('HGET', ck, s), 'SREM')
    redis.call('HDEL', ck, s)
    if redis.call('HGET', P..':sessions', s) == n then redis.call('HDEL', P..':sessions', s) end
  end
end
for s, info in pairs(clients) do
  index(P, s, redis.call('HGET', ck, s), 'SREM')
  redis.call('HSET', ck, s, info)
  index(P, s, info, 'SADD')
  redis.call('HSET', P..':sessions', s, n)
end
local chk = P..':node:'..n..':channels'
for _, c in ipairs(redis.call('SMEMBERS', chk)) do
  local p = P..':ch:'..c..':p'
  local want = pres[c] or {}
  local all = redis.call('HGETALL', p)
  for i = 1, #all, 2 do
    local ok, info = pcall(cjson.decode, all[i + 1])
    if ok and info['node'] == n and want[all[i]] == nil then
      redis.call('HDEL', p, all[i])
      redis.call('PUBLISH', P..':ch:'..c, 'l'..all[i + 1])
    end
  end
  if next(want) == nil then redis.call('SREM', chk, c) end
end
for c, members in pairs(pres) do
  local p = P..':ch:'..c..':p'
  redis.call('SADD', chk, c)
  for s, info in pairs(members) do
    if redis.call('HSET', p, s, info) == 1 then redis.call('PUBLISH', P..':ch:'..c, 'j'..info) end
  end
end
return 1
"""
)

# The server's replication id differs from the last one recorded: its data may lack writes the
# previous server acknowledged (a failover, or a restart from an older snapshot), so every
# channel starts a new epoch when next used.  Idempotent: the first node to see the new id
# bumps the generation, the others find it recorded.  No id recorded: a new or empty data set.
FENCE = """
local P, id = ARGV[1], ARGV[2]
local seen = redis.call('GET', P..':replid')
if seen == id then return 0 end
redis.call('SET', P..':replid', id)
if not seen then return 0 end
return redis.call('INCR', P..':gen')
"""

# Clients that connected (session, info) or left (session, "") since the last batch, in order.
CLIENTS_UPDATE = (
    _IDENTITY_INDEX
    + """
local P, n = ARGV[1], ARGV[2]
local ck = P..':node:'..n..':clients'
for i = 3, #ARGV, 2 do
  local s, info = ARGV[i], ARGV[i + 1]
  index(P, s, redis.call('HGET', ck, s), 'SREM')
  if info == '' then
    redis.call('HDEL', ck, s)
    if redis.call('HGET', P..':sessions', s) == n then redis.call('HDEL', P..':sessions', s) end
  else
    redis.call('HSET', ck, s, info)
    index(P, s, info, 'SADD')
    redis.call('HSET', P..':sessions', s, n)
  end
end
return 1
"""
)

SEND = (
    "local P, s, payload = ARGV[1], ARGV[2], ARGV[3]\n"
    + _NOW
    + """
local n = redis.call('HGET', P..':sessions', s)
if not n then return 0 end
local score = redis.call('ZSCORE', P..':nodes', n)
if score == false or tonumber(score) <= now then return 0 end
return redis.call('PUBLISH', P..':node:'..n, payload)
"""
)

CLIENTS = (
    "local P = ARGV[1]\n"
    + _NOW
    + """
local out = {}
for _, n in ipairs(redis.call('ZRANGEBYSCORE', P..':nodes', '(' .. now, '+inf')) do
  for _, info in ipairs(redis.call('HVALS', P..':node:'..n..':clients')) do
    out[#out + 1] = info
  end
end
return out
"""
)


def parse_redis_url(url: str) -> tuple[str, int, int, str | None]:
    """``redis://[:password@]host:port/db`` -> (host, port, db, password); port 6379, db 0."""
    parts = urlsplit(url)
    db = parts.path.strip("/")
    password = unquote(parts.password) if parts.password else None
    return parts.hostname or "127.0.0.1", parts.port or 6379, int(db) if db else 0, password


def default_node_id() -> str:
    """Host name plus a random suffix: a restarted daemon is a new node."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())
    return f"{host[:40]}-{os.urandom(3).hex()}"


class _FastEncoding:
    """Encode commands with hiredis when it is installed (replies already parse with it)."""

    if _pack_command is not None:

        def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
            return _pack_command(args)  # type: ignore[misc]


class _Deadlines:
    """Every command gets its answer within ``broker.command_timeout`` or the link is reset.

    Redis answers in order, so one timer per connection, set for the oldest unanswered
    command, covers them all (a timer per command would cost a callLater per publish).
    """

    broker: RedisBroker
    transport: Any
    _sent: deque[float]
    _deadline: Any = None

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = super().execute_command(*args, **kwargs)  # type: ignore[misc]
        broker = self.broker
        self._sent.append(broker.reactor.seconds())
        if self._deadline is None:
            self._deadline = broker.reactor.callLater(broker.command_timeout, self._overdue)
        return d.addBoth(self._answered)

    def _answered(self, result: Any) -> Any:
        if self._sent:
            self._sent.popleft()
        return result

    def _overdue(self) -> None:
        self._deadline = None
        if not self._sent:
            return
        broker = self.broker
        left = self._sent[0] + broker.command_timeout - broker.reactor.seconds()
        if left > 0:
            self._deadline = broker.reactor.callLater(left, self._overdue)
            return
        broker.timeouts += 1
        log.warn(
            "Redis did not answer within {timeout:g}s (cluster.command_timeout); reconnecting",
            timeout=broker.command_timeout,
        )
        if self.transport is not None:
            self.transport.abortConnection()

    def _forget_deadline(self) -> None:
        call, self._deadline = self._deadline, None
        if call is not None and call.active():
            call.cancel()


class _Commands(_Deadlines, _FastEncoding, txredisapi.RedisProtocol):
    def connectionLost(self, why: Failure) -> None:
        self._forget_deadline()
        super().connectionLost(why)
        self.broker._lost(self)


class _Subscriber(_Deadlines, _FastEncoding, txredisapi.SubscriberProtocol):
    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        """Pub/sub messages go straight to the broker; every other reply the usual way.

        txredisapi passes each reply through its number conversion and transaction
        bookkeeping before its pub/sub dispatch (a few microseconds per message, on every
        node, for every publication); a message needs neither.
        """
        reader = getattr(self, "_reader", None)
        if reader is None or self.inTransaction:  # pragma: no cover - without hiredis
            super().dataReceived(data, unpause)
            return
        if data:
            reader.feed(data)
        deliver = self.broker._message
        while (reply := reader.gets()) is not False:
            if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                try:
                    deliver(reply[1].decode(), reply[2].decode())
                except UnicodeDecodeError:
                    self.broker._bad_message("not UTF-8")
                continue
            if isinstance(reply, (str, bytes, list)):
                reply = self.tryConvertData(reply)
            self.replyReceived(reply)

    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        self.broker._message(channel, message)

    def connectionLost(self, why: Failure) -> None:
        self._forget_deadline()
        super().connectionLost(why)
        self.broker._lost(self)


class _ProtocolFactory(Factory):
    noisy = False  # ClientService logs each retry already; no start/stop lines per attempt

    def __init__(self, broker: RedisBroker, cls: type, dbid: int, password: str | None) -> None:
        self.broker = broker
        self.cls = cls
        self.dbid = dbid
        self.password = password

    def buildProtocol(self, addr: Any) -> Any:
        # No per-command reply timeout (a timer per publish): the heartbeat's watchdog
        # aborts a connection that stops answering, which fails every waiting command.
        proto = self.cls(
            charset="utf-8",
            dbid=self.dbid or None,
            password=self.password,
            convertNumbers=False,
        )
        proto.factory = self
        proto.broker = self.broker
        proto._sent = deque()
        return proto

    # txredisapi calls these when AUTH/SELECT fail; ClientService keeps retrying instead.
    def stopTrying(self) -> None:
        pass

    def connectionError(self, message: str) -> None:
        log.error("Redis: {message}", message=message)

    isLazy = False


class RedisBroker:
    """The `Broker` of a cluster: see the module docstring."""

    clustered = True

    def __init__(self, reactor: Any, cluster: ClusterConfig, channels: ChannelsConfig) -> None:
        self.reactor = reactor
        self.node_id = cluster.node_id or default_node_id()
        #: This process, among those that ever ran as ``node_id`` (see HEARTBEAT): sessions it
        #: starts or resumes are recorded with it, so a successor knows they are not its own.
        self.incarnation = os.urandom(8).hex()
        #: False until a heartbeat took the node id over for this process (HEARTBEAT).
        self._adopted = False
        #: Heartbeats that found another live process using this node id.
        self.duplicates = 0
        self._duplicate = ("", 0.0)  # the other process last logged, and when
        self.prefix = cluster.namespace
        self.node_timeout = cluster.node_timeout
        self.configure_history(channels.history_size, channels.history_ttl)
        self.listener: BrokerListener | None = None
        self.command_timeout = timeout = cluster.command_timeout
        self.sentinel: Any = None
        if cluster.sentinel.addresses:
            from heartbeatd.cluster.sentinel import MasterEndpoint

            self.sentinel = MasterEndpoint(reactor, cluster.sentinel, timeout)
            db, password = cluster.sentinel.db, cluster.sentinel.password or None
            endpoint: Any = self.sentinel
        else:
            host, port, db, password = parse_redis_url(cluster.redis)
            self.url = f"redis://{host}:{port}/{db}"  # for logs: never the password
            endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        self.history_of: Callable[[str], tuple[int, float]] | None = None
        self._cmd: _Commands | None = None
        self._sub: _Subscriber | None = None
        #: Channels with local subscribers, and those whose SUBSCRIBE Redis acknowledged.
        self._wanted: set[str] = set()
        self._acked: set[str] = set()
        self._waiters: dict[str, list[Deferred[None]]] = {}
        #: channel -> number of the SUBSCRIBE its waiters wait for; channels whose pending
        #: SUBSCRIBE an UNSUBSCRIBE voided (see `subscribe`).
        self._pending_subscribe: dict[str, int] = {}
        self._subscribes = 0
        self._void: set[str] = set()
        # Client arrivals (session -> info JSON) and departures (session -> None) not yet
        # sent to Redis: one CLIENTS_UPDATE per reactor turn carries them all.  The clients
        # themselves are not recorded here: re-registration asks the listener for them.
        self._client_updates: dict[str, str | None] = {}
        self._client_flush: Any = None
        self._presence: dict[str, dict[str, str]] = {}
        self.up = False
        self.link_changes = 0
        #: Set by `stop`: the links closing then are ours, not an outage (nothing is logged).
        self.stopping = False
        self.reaped = 0
        #: Commands not answered within command_timeout (each reset its connection).
        self.timeouts = 0
        #: Times this node found a new replication id (a failover, or Redis restarted).
        self.fences = 0
        self._replid: str | None = None
        self._shas = {
            name: hashlib.sha1(text.encode()).hexdigest() for name, text in _SCRIPTS.items()
        }
        policy = backoffPolicy(initialDelay=0.05, maxDelay=RECONNECT_MAX_DELAY, factor=2.0)
        self._services = [
            ClientService(
                endpoint,
                _ProtocolFactory(self, cls, db, password),
                retryPolicy=policy,
                clock=reactor,
                prepareConnection=prepare,
            )
            for cls, prepare in (
                (_Commands, self._prepare_commands),
                (_Subscriber, self._prepare_sub),
            )
        ]
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = reactor
        #: Bad pub/sub messages are logged a few times per window, never once each.
        self.log_limiter = LogLimiter(reactor)
        self.bad_messages = 0

    @property
    def url(self) -> str:
        """Where Redis is, for logs (never with a password)."""
        return self.sentinel.describe() if self.sentinel is not None else self._url

    @url.setter
    def url(self, value: str) -> None:
        self._url = value

    def configure_history(self, size: int, ttl: float) -> None:
        """Applies from the next publication (XADD trims with the new size)."""
        self.history_size = size
        self.history_ttl = int(ttl + 0.999) if ttl else 0  # EXPIRE takes whole seconds

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        log.info("Cluster node {node} joining through {url}", node=self.node_id, url=self.url)
        for service in self._services:
            service.startService()
        self._beat.start(self.node_timeout / 4, now=False)
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Leave the cluster cleanly (our entries go at once, not after node_timeout)."""
        self.stopping = True
        if self._beat.running:
            self._beat.stop()
        d: Deferred[Any] = succeed(None)
        self._cancel_client_flush()
        self._client_updates.clear()
        if self._cmd is not None and self._cmd.connected:
            self._presence.clear()
            d = self._register(leaving=True).addCallback(
                lambda _: self._eval("HEARTBEAT", self.node_id, -10_000_000, self.incarnation, 0)
            )
            d.addCallback(lambda _: self._eval("REAP"))
            d.addErrback(lambda f: log.warn("Leaving the cluster: {why}", why=f.getErrorMessage()))

        def stop_services(_: object) -> Deferred[Any]:
            stopping = [s.stopService() for s in self._services]
            if self.sentinel is not None:
                stopping.append(self.sentinel.stop())
            return gatherResults(stopping)

        return d.addCallback(stop_services).addCallback(lambda _: None)

    # ClientService hands prepareConnection a proxy of the protocol; txredisapi's whenConnected
    # fires with the protocol itself, which is what connectionLost will report.

    def _prepare_commands(self, proxy: Any) -> Deferred[Any]:
        def ready(proto: _Commands) -> Deferred[Any]:
            d = self._check_master(proto)
            d.addCallback(lambda _: self._fence(proto))
            d.addCallback(lambda _: setattr(self, "_cmd", proto))
            d.addCallback(lambda _: self._heartbeat_now())
            d.addCallback(lambda _: self._register())
            return d.addCallback(lambda _: self._load_scripts(proto))

        d = proxy.whenConnected().addCallback(ready).addCallback(lambda _: self._link())
        return d.addErrback(self._prepare_failed, "commands")

    def _prepare_failed(self, failure: Failure, which: str) -> Failure:
        log.warn(
            "Redis {which} connection set-up failed: {why}",
            which=which,
            why=failure.getErrorMessage(),
        )
        return failure

    def _prepare_sub(self, proxy: Any) -> Deferred[Any]:
        def ready(proto: _Subscriber) -> Deferred[Any]:
            return self._check_master(proto).addCallback(lambda _: subscribe(proto))

        def subscribe(proto: _Subscriber) -> Deferred[Any]:
            self._sub = proto
            self._acked.clear()
            names = [self._node_channel(self.node_id), f"{self.prefix}:all"]
            names += [self._channel_key(c) for c in sorted(self._wanted)]
            # One SUBSCRIBE per channel: txredisapi matches each acknowledgement to one
            # waiting command, so a many-channel SUBSCRIBE would leave stray acknowledgements
            # that a later command (a PING, another SUBSCRIBE) would take for its own answer.
            return gatherResults([proto.subscribe(name) for name in names])

        def subscribed(_: object) -> None:
            self._acked = set(self._wanted)
            for channel in list(self._acked):
                self._fire_waiters(channel, None)

        d = proxy.whenConnected().addCallback(ready).addCallback(subscribed)
        return d.addCallback(lambda _: self._link()).addErrback(self._prepare_failed, "pub/sub")

    def _check_master(self, proto: Any) -> Deferred[Any]:
        """With Sentinel: keep a connection only to the server that says it is the master."""
        if self.sentinel is None:
            return succeed(None)
        from heartbeatd.cluster.sentinel import check_master

        return check_master(proto)

    def _load_scripts(self, proto: _Commands) -> None:
        """Load every script on a new connection (a new master after a failover has none), so
        the first publications do not each fall back from EVALSHA to EVAL.

        Not waited for: the link is up at once, and what this node sends next queues behind
        the loads on the same connection, so it finds them loaded.  (The set-up's own scripts
        take the ``NOSCRIPT`` fallback: loading all thirteen first costs Redis a few
        milliseconds of compiling before the node could serve.)
        """
        for text in _SCRIPTS.values():
            proto.execute_command("SCRIPT", "LOAD", text).addErrback(_ignore)

    def _fence(self, proto: _Commands) -> Deferred[Any]:
        """Run FENCE with the server's replication id before this node writes anything."""

        def replid(info: Any) -> Deferred[Any] | None:
            for line in str(info).splitlines():
                if line.startswith("master_replid:"):
                    self._replid = line.split(":", 1)[1].strip()
                    break
            else:
                return None  # a server without replication ids: nothing to compare
            return self._eval_on(proto, "FENCE", self._replid).addCallback(fenced)

        def fenced(generation: Any) -> None:
            if int(generation or 0):
                self.fences += 1
                log.warn(
                    "Redis has a new replication id (failover or restart): data generation "
                    "{generation}; every channel starts a new epoch (subscribers resync)",
                    generation=generation,
                )

        return proto.execute_command("INFO", "replication").addCallback(replid)

    def _link(self) -> None:
        up = (
            self._cmd is not None
            and self._cmd.connected
            and self._sub is not None
            and self._sub.connected
        )
        if up == self.up:
            return
        self.up = up
        if self.stopping:
            return  # an orderly stop closes the links: no outage to report or recover from
        self.link_changes += 1
        if up:
            log.info("Redis link up ({url})", url=self.url)
        if self.listener is not None:
            self.listener.on_link(up)

    def _lost(self, proto: Any) -> None:
        if proto is self._cmd:
            self._cmd = None
        elif proto is self._sub:
            self._sub = None
            self._acked.clear()
            for channel in list(self._waiters):
                self._fire_waiters(channel, BrokerUnavailable("the Redis link was lost"))
        else:
            return
        if self.up and not self.stopping:
            log.warn("Redis link down ({url}); reconnecting", url=self.url)
        self._link()

    # -- commands ---------------------------------------------------------------------------

    def _eval(self, name: str, *args: Any) -> Deferred[Any]:
        proto = self._cmd
        if proto is None or not proto.connected:
            return fail(BrokerUnavailable("Redis is unreachable"))
        return self._eval_on(proto, name, *args)

    def _eval_on(self, proto: _Commands, name: str, *args: Any) -> Deferred[Any]:
        argv = [self.prefix, *args]

        def evalsha() -> Deferred[Any]:
            return proto.execute_command("EVALSHA", self._shas[name], 0, *argv)

        def retry(failure: Failure) -> Any:
            if "NOSCRIPT" in str(failure.value):
                return proto.execute_command("EVAL", _SCRIPTS[name], 0, *argv)
            return failure

        d = maybeDeferred(evalsha).addErrback(retry)
        return d.addErrback(self._refused, proto)

    def run_script(self, sha: str, text: str, *args: Any) -> Deferred[Any]:
        """Run a Lua script of another module (``sha``: its SHA-1) with ARGV = namespace,
        ``args``; fails with `BrokerUnavailable` like the broker's own commands."""
        proto = self._cmd
        if proto is None or not proto.connected:
            return fail(BrokerUnavailable("Redis is unreachable"))
        argv = [self.prefix, *args]

        def retry(failure: Failure) -> Any:
            if "NOSCRIPT" in str(failure.value):
                return proto.execute_command("EVAL", text, 0, *argv)
            return failure

        d = maybeDeferred(proto.execute_command, "EVALSHA", sha, 0, *argv).addErrback(retry)
        return d.addErrback(self._refused, proto)

    def session_store(self) -> Any:
        """Where resumable sessions live in this cluster (`heartbeatd.cluster.sessions`)."""
        from heartbeatd.cluster.sessions import RedisSessionStore

        return RedisSessionStore(self)

    def _refused(self, failure: Failure, proto: Any) -> Failure:
        """A command failed: ``unavailable``; a replica's READONLY means the master moved."""
        if failure.check(txredisapi.ResponseError) and str(failure.value).startswith("READONLY"):
            self._master_moved(proto)
        return _unavailable(failure, self.log_limiter)

    def _master_moved(self, proto: Any) -> None:
        """The server we write to is no longer the master: reconnect both links (to the master
        the sentinels name now)."""
        if self.log_limiter.allow("master_moved"):
            log.warn("Redis answered READONLY: the master moved; reconnecting")
        for link in {proto, self._cmd, self._sub}:
            if link is not None and link.transport is not None:
                link.transport.abortConnection()

    def _heartbeat_now(self) -> Deferred[Any]:
        expire_ms = int(self.node_timeout * 1000 / 2)
        first = 0 if self._adopted else 1
        d = self._eval("HEARTBEAT", self.node_id, expire_ms, self.incarnation, first)

        def beat(answer: Any) -> Any:
            added, status = int(answer[0]), _text(answer[1])
            if status == "adopted":
                self._adopted = True
                detached, previous = int(answer[2]), _text(answer[3])
                if previous or detached:
                    log.warn(
                        "Cluster node {node}: this process replaces an earlier one of the same "
                        "node id; {n} resumable sessions it held are detached",
                        node=self.node_id,
                        n=detached,
                    )
            elif status == "other":
                self.duplicates += 1
                # Logged when another process shows up, then once a minute while both run.
                other, now = _text(answer[2]), self.reactor.seconds()
                if other != self._duplicate[0] or now - self._duplicate[1] >= 60:
                    self._duplicate = (other, now)
                    log.error(
                        "Cluster node id {node} is used by another live process too: give "
                        "every daemon its own cluster.node_id (sessions, clients and presence "
                        "of this node id are unreliable while both run)",
                        node=self.node_id,
                    )
            if added == 1 and self._cmd is not None:
                log.info("Cluster node {node} registered", node=self.node_id)
                return self._register()
            return None

        return d.addCallback(beat)

    def _heartbeat(self) -> None:
        """Every node_timeout/4: renew our lease, and reap nodes whose lease ran out."""
        if self._cmd is None:
            return

        def reaped(dead: Any) -> None:
            if dead:
                self.reaped += len(dead)
                log.warn("Cluster nodes gone (their sessions left): {nodes}", nodes=dead)

        d = self._heartbeat_now().addCallback(lambda _: self._eval("REAP")).addCallback(reaped)
        d.addErrback(lambda f: log.debug("Cluster heartbeat failed: {why}", why=f))
        sub = self._sub
        if sub is not None and sub.connected:
            # A half-open pub/sub link is found here too: the PING has a deadline.
            maybeDeferred(sub.execute_command, "PING").addErrback(_ignore)
            if self.sentinel is not None and _peer(sub) != _peer(self._cmd):
                # After a failover the two links can land on different servers for a moment
                # (a demoted master still serves pub/sub): follow the commands link.
                log.info("Redis pub/sub link is not on the master; reconnecting it")
                sub.transport.abortConnection()

    def _register(self, leaving: bool = False) -> Deferred[Any]:
        """Make Redis hold exactly this node's clients and presence (none when leaving)."""
        clients: dict[str, str] = {}
        if not leaving and self.listener is not None:
            # Built now from the live connections (the updates queued before are included).
            self._client_updates.clear()
            self._cancel_client_flush()
            clients = {s: json.dumps(info) for s, info in self.listener.local_clients().items()}
        presence = {c: dict(members) for c, members in self._presence.items()}
        d = self._eval("REGISTER", self.node_id, json.dumps(clients), json.dumps(presence))
        on_register = getattr(self.listener, "on_register", None)
        if not leaving and on_register is not None:
            on_register()  # its resumable sessions, right behind REGISTER on the same link
        return d

    # -- channels -------------------------------------------------------------------------------

    def _channel_key(self, channel: str) -> str:
        return f"{self.prefix}:ch:{channel}"

    def _node_channel(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    def _history(self, channel: str) -> tuple[int, int]:
        policy = self.history_of
        if policy is None:
            return self.history_size, self.history_ttl
        size, ttl = policy(channel)
        return size, int(ttl + 0.999) if ttl else 0  # EXPIRE takes whole seconds

    def publish(self, channel: str, data: str) -> Deferred[Position]:
        size, ttl = self._history(channel)
        d = self._eval("PUBLISH", channel, data, new_epoch(), size, ttl)
        return d.addCallback(lambda r: Position(r[0], int(r[1])))

    def position(self, channel: str) -> Deferred[Position]:
        d = self._eval("POSITION", channel, new_epoch())
        return d.addCallback(lambda r: Position(r[0], int(r[1])))

    def history(self, channel: str, epoch: str, since: int) -> Deferred[History]:
        d = self._eval("HISTORY", channel, new_epoch(), epoch, since, self._history(channel)[0])

        def parsed(r: list[Any]) -> History:
            position = Position(checked_epoch(r[0]), int(r[1]))
            entries = [checked_data(e) for e in r[3:]] if int(r[2]) == 1 else None
            return History(position, entries)

        return d.addCallback(parsed)

    def subscribe(self, channel: str) -> Deferred[None]:
        self._wanted.add(channel)
        if channel in self._acked:
            return succeed(None)
        proto = self._sub
        if proto is None or not proto.connected:
            return fail(BrokerUnavailable("Redis is unreachable"))
        waiter: Deferred[None] = Deferred()
        # A SUBSCRIBE still unanswered when the channel was unsubscribed is void (Redis
        # applies the UNSUBSCRIBE after it): a new one is sent, and only its answer counts.
        first = channel not in self._waiters or channel in self._void
        self._waiters.setdefault(channel, []).append(waiter)
        if first:
            self._void.discard(channel)
            self._subscribes += 1
            generation = self._pending_subscribe[channel] = self._subscribes

            def acked(_: object) -> None:
                if self._pending_subscribe.get(channel) != generation:
                    return  # a later SUBSCRIBE answers for the waiters
                if channel in self._wanted and self._sub is proto:
                    self._acked.add(channel)
                    self._fire_waiters(channel, None)

            def failed(failure: Failure) -> None:
                if self._pending_subscribe.get(channel) == generation:
                    self._fire_waiters(channel, BrokerUnavailable(failure.getErrorMessage()))

            maybeDeferred(proto.subscribe, self._channel_key(channel)).addCallbacks(acked, failed)
        return waiter

    def _fire_waiters(self, channel: str, error: Exception | None) -> None:
        self._pending_subscribe.pop(channel, None)
        self._void.discard(channel)
        for waiter in self._waiters.pop(channel, []):
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(error)

    def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        self._acked.discard(channel)
        if channel in self._waiters:
            self._void.add(channel)
        proto = self._sub
        if proto is not None and proto.connected:
            proto.unsubscribe(self._channel_key(channel)).addErrback(lambda f: None)

    def _message(self, key: str, message: str) -> None:
        listener = self.listener
        if listener is None:
            return
        try:
            prefix = f"{self.prefix}:ch:"
            # Nothing from Redis is trusted (a shared Redis, docs/security.md): every field
            # is checked, and data spliced into frames must be exactly one JSON value.
            if key.startswith(prefix):
                channel, kind = key[len(prefix) :], message[:1]
                if kind == "p":
                    epoch, offset, data = message[1:].split(" ", 2)
                    number = int(offset)
                    if number < 1 or not offset.isdigit():
                        raise BadBrokerMessage("bad offset")
                    listener.on_publication(
                        channel, checked_epoch(epoch), number, checked_data(data)
                    )
                elif kind in ("j", "l"):
                    info = checked_presence(json.loads(message[1:]))
                    listener.on_presence(channel, "join" if kind == "j" else "leave", info)
                else:
                    raise BadBrokerMessage(f"unknown channel message kind {kind!r}")
            elif key == f"{self.prefix}:all":
                body = json.loads(message)
                listener.on_broadcast(checked_push(body["t"]), body.get("d"))
            else:
                body = json.loads(message)
                if not isinstance(body["s"], str):
                    raise BadBrokerMessage("bad session")
                if "k" in body:  # a kick, not a message
                    listener.on_kick(body["s"])
                else:
                    listener.on_message(body["s"], checked_push(body["t"]), body.get("d"))
        except BadBrokerMessage as e:
            self.bad_messages += 1
            if self.log_limiter.allow("bad_cluster_message"):
                log.warn("Dropped a bad cluster message on {key}: {why}", key=key, why=e)
        except Exception:
            self.bad_messages += 1
            if self.log_limiter.allow("bad_cluster_message"):
                log.failure("Bad cluster message on {key}", key=key)

    def _bad_message(self, why: str) -> None:
        self.bad_messages += 1
        if self.log_limiter.allow("bad_cluster_message"):
            log.warn("Dropped a bad cluster message: {why}", why=why)

    # -- presence and clients -------------------------------------------------------------------

    def join(self, channel: str, info: dict[str, Any], keep: int = 0) -> Deferred[None]:
        text = json.dumps(info)
        self._presence.setdefault(channel, {})[info["session"]] = text
        return self._eval("JOIN", channel, self.node_id, info["session"], text, keep)

    def leave(self, channel: str, session: str, keep: int = 0) -> Deferred[None]:
        members = self._presence.get(channel)
        if members is not None:
            members.pop(session, None)
            if not members:
                del self._presence[channel]
        last = "0" if self._presence.get(channel) else "1"  # drop it from our channel set
        return self._eval("LEAVE", channel, session, self.node_id, last, keep)

    def presence(self, channel: str) -> Deferred[list[dict[str, Any]]]:
        d = self._eval("PRESENCE", channel)
        return d.addCallback(lambda items: [json.loads(i) for i in items or ()])

    #: Most arrivals and departures in one CLIENTS_UPDATE (Redis runs a script alone: a
    #: bounded batch keeps it from stalling other commands).
    CLIENT_BATCH = 512

    def client_connected(self, session: str, info: dict[str, Any]) -> None:
        self._queue_client(session, json.dumps(info))

    def client_disconnected(self, session: str) -> None:
        self._queue_client(session, None)

    def _queue_client(self, session: str, info: str | None) -> None:
        """Queue an arrival or departure for this turn's CLIENTS_UPDATE.

        Batched because a ramp of thousands of connections a second would otherwise cost a
        script call (and a Deferred, kept until Redis answers) each, and per turn because a
        command this process sends to Redis later (``clients``, ``send``, another node's
        request answered after ours) must see them.
        """
        if self._cmd is None:
            return  # the registration after the link returns reads the live clients
        updates = self._client_updates
        updates[session] = info
        if len(updates) >= self.CLIENT_BATCH:
            self._flush_clients()
        elif self._client_flush is None:
            self._client_flush = self.reactor.callLater(0, self._flush_clients)

    def _cancel_client_flush(self) -> None:
        call, self._client_flush = self._client_flush, None
        if call is not None and call.active():
            call.cancel()

    def _flush_clients(self) -> None:
        self._cancel_client_flush()
        updates, self._client_updates = self._client_updates, {}
        if not updates or self._cmd is None:
            return  # down: the registration after the link returns reads the live clients
        argv: list[str] = []
        for session, info in updates.items():
            argv += (session, info or "")
        self._eval("CLIENTS_UPDATE", self.node_id, *argv).addErrback(_ignore)

    def clients(self) -> Deferred[list[dict[str, Any]]]:
        self._flush_clients()  # our own latest arrivals are listed too
        d = self._eval("CLIENTS")
        return d.addCallback(lambda items: [json.loads(i) for i in items or ()])

    def identity_sessions(self, identity: str) -> Deferred[list[str]]:
        """The sessions registered under ``identity`` (our own latest arrivals included)."""
        self._flush_clients()
        proto = self._cmd
        if proto is None or not proto.connected:
            return fail(BrokerUnavailable("Redis is unreachable"))
        d = maybeDeferred(proto.execute_command, "SMEMBERS", f"{self.prefix}:id:{identity}")
        return d.addCallbacks(
            lambda members: sorted(str(m) for m in members or ()),
            _unavailable,
            errbackArgs=(self.log_limiter,),
        )

    def send(self, session: str, type: str, data: Any) -> Deferred[bool]:
        self._flush_clients()
        payload = json.dumps({"s": session, "t": type, "d": data})
        return self._eval("SEND", session, payload).addCallback(lambda n: int(n) > 0)

    def kick(self, session: str) -> Deferred[bool]:
        """Through the holder's node channel, as `send`: its node disconnects it."""
        self._flush_clients()
        payload = json.dumps({"s": session, "k": 1})
        return self._eval("SEND", session, payload).addCallback(lambda n: int(n) > 0)

    def broadcast(self, type: str, data: Any) -> Deferred[int]:
        proto = self._cmd
        if proto is None or not proto.connected:
            return fail(BrokerUnavailable("Redis is unreachable"))
        payload = json.dumps({"t": type, "d": data})
        d = maybeDeferred(proto.execute_command, "PUBLISH", f"{self.prefix}:all", payload)
        return d.addCallbacks(int, _unavailable, errbackArgs=(self.log_limiter,))


_SCRIPTS = {
    "PUBLISH": PUBLISH,
    "POSITION": POSITION,
    "HISTORY": HISTORY,
    "JOIN": JOIN,
    "LEAVE": LEAVE,
    "PRESENCE": PRESENCE,
    "HEARTBEAT": HEARTBEAT,
    "REAP": REAP,
    "REGISTER": REGISTER,
    "CLIENTS_UPDATE": CLIENTS_UPDATE,
    "SEND": SEND,
    "CLIENTS": CLIENTS,
    "FENCE": FENCE,
}


def _unavailable(failure: Failure, limiter: LogLimiter | None = None) -> Failure:
    """A failed command as `BrokerUnavailable`.  A refusal (out of memory, a failed save)
    is logged, through ``limiter`` when given: every command fails alike then."""
    if failure.check(BrokerUnavailable):
        return failure
    if failure.check(txredisapi.ConnectionError, ConnectionError, txredisapi.TimeoutError):
        return Failure(BrokerUnavailable(f"Redis: {failure.getErrorMessage()}"))
    if failure.check(txredisapi.ResponseError):
        if limiter is None or limiter.allow("redis_refused"):
            log.error("Redis refused a command: {why}", why=failure.getErrorMessage())
        return Failure(BrokerUnavailable(f"Redis: {failure.getErrorMessage()}"))
    return failure


def _peer(proto: Any) -> tuple[str, int] | None:
    transport = getattr(proto, "transport", None)
    if transport is None:
        return None
    peer = transport.getPeer()
    return (getattr(peer, "host", ""), getattr(peer, "port", 0))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ignore(failure: Failure) -> None:
    log.debug("Redis write failed (repaired on reconnect): {why}", why=failure.getErrorMessage())
