"""Resumable sessions in Redis: what any node needs to continue a session (docs/cluster.md).

Keys, for a session id ``S`` (``P`` is ``cluster.namespace``):

* ``P:s:S`` hash: ``k`` SHA-256 of the key (hex; the key itself is never stored), ``u`` the
  identity (``""`` for none), ``x`` expiry seconds, ``e`` the epoch, ``o`` the last server
  seq, ``a`` the last seq the client acknowledged, ``w`` the client high-water mark, ``n``/``c``
  the node and connection holding it, ``i`` the process of that node (its incarnation: a
  process restarted under the same node id detaches what an earlier one held, see
  ``HEARTBEAT`` in heartbeatd.cluster.redis);
* ``P:s:S:o`` list: the numbered messages ``a+1 .. o``, oldest first (trimmed on ack);
* ``P:s:S:i`` hash: client seq -> request (``{"t","i","d"}``) received but not yet answered;
* ``P:s:S:c`` hash: channel -> ``"epoch offset join_leave"``, the subscriptions;
* ``P:s:S:g`` string: why a session that ended early ended (``overflow``), for an hour; while
  it lives, ``expired``, outliving its keys by ``sessions.max_expiry`` (set whenever their
  TTL is: a resume after Redis expired them answers ``expired``, not ``unknown_session``);
* ``P:s:u:I`` set: the sessions of identity ``I`` (``sessions.max_per_identity`` is counted
  here, across the cluster; members whose keys expired are dropped when it is next counted);
  ``P:s:a:A`` the same for the sessions of clients without an identity from address ``A``
  (the hash's ``l`` names the set a session counts in: ``u:I`` or ``a:A``).
* ``P:s:all`` sorted set: every session, scored by when its keys expire (ms, Redis clock;
  set by ``CREATE``, ``CLAIM``, ``DETACH``, ``REFRESH``, removed by ``END`` and overflow):
  ``sessions.max_sessions`` is counted here, across the cluster, after ``CREATE`` trims
  the members whose time passed.
* ``P:s:d`` sorted set: the detached sessions, scored by when they expire (ms, Redis clock);
  ``P:node:N:s`` set: the sessions node ``N`` holds (the reaper moves a dead node's to
  ``P:s:d``).  A push to a session no live node carries, and a broadcast, are numbered into
  its ``:o`` here (``PUSH``, ``BROADCAST``), bounded like the daemon's buffer (``b`` in the
  hash counts its bytes): past the bound the session ends, ``overflow``.

Every write names the epoch the writer holds: a script that finds another one writes nothing
and answers -1 (the fence: a node whose session was resumed elsewhere learns it on its next
write, and never writes to its connection what Redis did not take).  ``OUT`` answers -2 when
the epoch is the writer's but Redis numbered messages meanwhile (pushes and broadcasts kept
while the node's lease had run out): the client resumes to get them in order.  ``REATTACH``
makes a node's sessions its own again when it writes its clients back after a reconnect.

Keys live ``expiry`` seconds once detached; while attached they are refreshed (``REFRESH``)
by their node, so a node that dies leaves its sessions to expire like detached ones.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.defer import Deferred

__all__ = ["RedisSessionStore"]

_KEYS = """
local h = P..':s:'..sid
local function ttl(t)
  redis.call('EXPIRE', h, t)
  redis.call('EXPIRE', h..':o', t)
  redis.call('EXPIRE', h..':i', t)
  redis.call('EXPIRE', h..':c', t)
end
"""

# The session's keys got TTL ``t``: the tombstone (``:g``, read by CLAIM when they are gone)
# and its identity's set outlive them by ``tomb`` seconds.
_MARK = """
local function mark(P, h, t, tomb)
  redis.call('SET', h..':g', 'expired', 'EX', t + tomb)
  local l = redis.call('HGET', h, 'l')
  if l and l ~= '' then
    local uk = P..':s:'..l
    if redis.call('TTL', uk) < t + tomb then redis.call('EXPIRE', uk, t + tomb) end
  end
end
"""

_FENCE = """
if redis.call('HGET', h, 'e') ~= epoch then return -1 end
"""

_NOW = """
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
"""

# Drop the numbered messages the client acknowledged (up to ``upto``), and their bytes.
_TRIM = """
local function trim(h, a, upto)
  local gone, n = redis.call('LRANGE', h..':o', 0, upto - a - 1), 0
  for _, v in ipairs(gone) do n = n + #v end
  redis.call('LTRIM', h..':o', upto - a, -1)
  redis.call('HSET', h, 'a', upto)
  redis.call('HINCRBY', h, 'b', -n)
end
"""

# Number ``body`` into a session no connection carries (kept for its replay; answering client
# request ``cseq`` when not '0'); past the bounds the session ends ``overflow``.  The seq, or 0.
_APPEND = """
local function append(P, sid, h, body, cseq, maxn, maxb)
  local f = redis.call('HMGET', h, 'o', 'a', 'b', 'w')
  local seq, a, b = tonumber(f[1]) + 1, tonumber(f[2]), tonumber(f[3] or '0') or 0
  local head = '{"seq":'..seq..','
  if cseq ~= '0' then head = '{"seq":'..seq..',"ack":'..f[4]..',' end
  local numbered = head..string.sub(body, 2)
  if seq - a > maxn or b + #numbered > maxb then
    redis.call('DEL', h, h..':o', h..':i', h..':c')
    redis.call('SET', h..':g', 'overflow', 'EX', 3600)
    redis.call('ZREM', P..':s:d', sid)
    redis.call('ZREM', P..':s:all', sid)
    return 0
  end
  redis.call('RPUSH', h..':o', numbered)
  local t = redis.call('PTTL', h)
  if t > 0 then redis.call('PEXPIRE', h..':o', t) end
  redis.call('HSET', h, 'o', seq, 'b', b + #numbered)
  if cseq ~= '0' then redis.call('HDEL', h..':i', cseq) end
  return seq
end
"""

CREATE = (
    "local P, sid = ARGV[1], ARGV[2]\n"
    + _KEYS
    + _NOW
    + _MARK
    + """
local limit, group = tonumber(ARGV[9]), ARGV[12]
if limit > 0 and group ~= '' then
  -- sessions.max_per_identity (an identity, or an address without one), across the cluster
  local uk, held = P..':s:'..group, 0
  for _, other in ipairs(redis.call('SMEMBERS', uk)) do
    if redis.call('EXISTS', P..':s:'..other) == 1 then held = held + 1
    else redis.call('SREM', uk, other) end
  end
  if held >= limit then return 0 end
end
local all, total = P..':s:all', tonumber(ARGV[11])
if total > 0 then
  -- sessions.max_sessions, across the cluster: those whose keys expired stop counting
  redis.call('ZREMRANGEBYSCORE', all, '-inf', now)
  if redis.call('ZCARD', all) >= total then return 2 end
end
if group ~= '' then redis.call('SADD', P..':s:'..group, sid) end
redis.call('ZADD', all, now + tonumber(ARGV[8]) * 1000, sid)
redis.call('DEL', h, h..':o', h..':i', h..':c', h..':g')
redis.call('HSET', h, 'k', ARGV[3], 'u', ARGV[4], 'x', ARGV[5], 'e', 1, 'o', 0, 'a', 0,
  'w', 0, 'b', 0, 'n', ARGV[6], 'c', ARGV[7], 'l', group, 'i', ARGV[13])
redis.call('SADD', P..':node:'..ARGV[6]..':s', sid)
ttl(tonumber(ARGV[8]))
mark(P, h, tonumber(ARGV[8]), tonumber(ARGV[10]))
return 1
"""
)

RECV = (
    "local P, sid, epoch = ARGV[1], ARGV[2], ARGV[3]\n"
    + _KEYS
    + _FENCE
    + """
redis.call('HSET', h..':i', ARGV[4], ARGV[5])
redis.call('HSET', h, 'w', ARGV[4])
ttl(tonumber(ARGV[6]))
return 1
"""
)

OUT = (
    "local P, sid, epoch = ARGV[1], ARGV[2], ARGV[3]\n"
    + _KEYS
    + _FENCE
    + """
-- numbered here only while no one else numbers (a push stored while this node looked dead:
-- -2, the session is the client's still, to resume; -1 is for a session resumed elsewhere)
if tonumber(redis.call('HGET', h, 'o')) + 1 ~= tonumber(ARGV[4]) then return -2 end
redis.call('RPUSH', h..':o', ARGV[5])
redis.call('HSET', h, 'o', ARGV[4])
redis.call('HINCRBY', h, 'b', #ARGV[5])
if ARGV[6] ~= '0' then redis.call('HDEL', h..':i', ARGV[6]) end
if ARGV[8] == 'set' then
  redis.call('HSET', h..':c', ARGV[9], ARGV[10])
elseif ARGV[8] == 'del' then
  redis.call('HDEL', h..':c', ARGV[9])
end
ttl(tonumber(ARGV[7]))
return 1
"""
)

DONE = (
    "local P, sid, epoch = ARGV[1], ARGV[2], ARGV[3]\n"
    + _KEYS
    + _FENCE
    + """
redis.call('HDEL', h..':i', ARGV[4])
return 1
"""
)

ACK = (
    "local P, sid, epoch = ARGV[1], ARGV[2], ARGV[3]\n"
    + _KEYS
    + _TRIM
    + _FENCE
    + """
local a, upto = tonumber(redis.call('HGET', h, 'a')), tonumber(ARGV[4])
if upto > a then trim(h, a, upto) end
return 1
"""
)

CLAIM = (
    "local P, sid = ARGV[1], ARGV[2]\n"
    + _KEYS
    + _NOW
    + _TRIM
    + _MARK
    + """
if redis.call('EXISTS', h) == 0 then
  return {redis.call('GET', h..':g') or 'unknown_session'}
end
local f = redis.call('HMGET', h, 'k', 'u', 'x', 'e', 'o', 'a', 'w', 'n', 'c')
if f[1] ~= ARGV[3] then return {'bad_key'} end
if f[2] ~= ARGV[4] then return {'forbidden'} end
local o, a, ack = tonumber(f[5]), tonumber(f[6]), tonumber(ARGV[5])
if ack > o then return {'bad_ack', tostring(o)} end
if ack > a then
  trim(h, a, ack)
  a = ack
end
local e = redis.call('HINCRBY', h, 'e', 1)
if f[8] then redis.call('SREM', P..':node:'..f[8]..':s', sid) end
redis.call('ZREM', P..':s:d', sid)
redis.call('SADD', P..':node:'..ARGV[6]..':s', sid)
redis.call('HSET', h, 'n', ARGV[6], 'c', ARGV[7], 'i', ARGV[10])
ttl(tonumber(f[3]) + tonumber(ARGV[8]))
redis.call('ZADD', P..':s:all', now + (tonumber(f[3]) + tonumber(ARGV[8])) * 1000, sid)
mark(P, h, tonumber(f[3]) + tonumber(ARGV[8]), tonumber(ARGV[9]))
return {'ok', tostring(e), tostring(o), tostring(a), f[7], f[3], f[8] or '', f[9] or '',
  redis.call('LRANGE', h..':o', 0, -1), redis.call('HGETALL', h..':i'),
  redis.call('HGETALL', h..':c')}
"""
)

DETACH = (
    "local P, sid, epoch = ARGV[1], ARGV[2], ARGV[3]\n"
    + _KEYS
    + _NOW
    + _MARK
    + _FENCE
    + """
if ARGV[6] == '1' then
  redis.call('DEL', h..':c')
  for i = 7, #ARGV, 2 do redis.call('HSET', h..':c', ARGV[i], ARGV[i + 1]) end
end
redis.call('HSET', h, 'c', '')
redis.call('SREM', P..':node:'..redis.call('HGET', h, 'n')..':s', sid)
redis.call('ZREMRANGEBYSCORE', P..':s:d', '-inf', now)
redis.call('ZADD', P..':s:d', now + tonumber(ARGV[4]) * 1000, sid)
redis.call('ZADD', P..':s:all', now + tonumber(ARGV[4]) * 1000, sid)
ttl(tonumber(ARGV[4]))
mark(P, h, tonumber(ARGV[4]), tonumber(ARGV[5]))
return 1
"""
)

END = (
    "local P, sid, epoch = ARGV[1], ARGV[2], ARGV[3]\n"
    + _KEYS
    + _FENCE
    + """
local f = redis.call('HMGET', h, 'n', 'l')
if f[1] then redis.call('SREM', P..':node:'..f[1]..':s', sid) end
if f[2] and f[2] ~= '' then redis.call('SREM', P..':s:'..f[2], sid) end
redis.call('ZREM', P..':s:d', sid)
redis.call('ZREM', P..':s:all', sid)
redis.call('DEL', h, h..':o', h..':i', h..':c', h..':g')
if ARGV[4] ~= 'ended' then redis.call('SET', h..':g', ARGV[4], 'EX', 3600) end
return 1
"""
)

# A session held by a node whose lease ran out is as good as detached (nobody numbers it).
_HELD = """
local function held_by_live_node(P, n, c)
  if not c or c == '' then return false end
  local score = redis.call('ZSCORE', P..':nodes', n)
  return score ~= false and tonumber(score) > now
end
"""

# A push to session ARGV[2]: to its live node's connection when one carries it (that node
# numbers it: one numberer at a time), else numbered into Redis for its replay.
PUSH = (
    "local P, sid, body, maxn, maxb = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), "
    "tonumber(ARGV[5])\n"
    "local hops, me = tonumber(ARGV[6]), ARGV[7]\n"
    + _NOW
    + _HELD
    + _APPEND
    + """
local h = P..':s:'..sid
if redis.call('EXISTS', h) == 0 then return 'gone' end
local f = redis.call('HMGET', h, 'n', 'c')
if held_by_live_node(P, f[1], f[2]) then
  if f[1] == me then return 'here' end
  if hops >= 3 then return 'lost' end
  redis.call('PUBLISH', P..':node:'..f[1], cjson.encode({s = f[2], t = 'session_push',
    d = {session = sid, body = body, hops = hops + 1}}))
  return 'forwarded'
end
if append(P, sid, h, body, '0', maxn, maxb) == 0 then return 'overflow' end
return 'stored'
"""
)

# A reply finished by a node after its session detached (epoch-fenced): numbered in Redis.
KEEP = (
    "local P, sid, epoch = ARGV[1], ARGV[2], ARGV[3]\n"
    + _KEYS
    + _FENCE
    + _APPEND
    + """
return append(P, sid, h, ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]))
"""
)

# A broadcast, for the sessions no live node carries (ARGV[5]: only those last held by that
# node, for one node's broadcast; '' for all).  Live nodes write it to their connections.
BROADCAST = (
    "local P, body, maxn, maxb, only = ARGV[1], ARGV[2], tonumber(ARGV[3]), "
    "tonumber(ARGV[4]), ARGV[5]\n"
    + _NOW
    + _APPEND
    + """
redis.call('ZREMRANGEBYSCORE', P..':s:d', '-inf', now)
local count = 0
local function each(sid)
  local h = P..':s:'..sid
  local f = redis.call('HMGET', h, 'n', 'c')
  if f[1] and (only == '' or f[1] == only) then
    if append(P, sid, h, body, '0', maxn, maxb) > 0 then count = count + 1 end
  end
end
for _, sid in ipairs(redis.call('ZRANGE', P..':s:d', 0, -1)) do each(sid) end
if only == '' then
  -- killed nodes not reaped yet: their sessions wait for a resume elsewhere
  for _, n in ipairs(redis.call('ZRANGEBYSCORE', P..':nodes', '-inf', now)) do
    for _, sid in ipairs(redis.call('SMEMBERS', P..':node:'..n..':s')) do each(sid) end
  end
end
return count
"""
)

CHECK = "local P, sid, epoch = ARGV[1], ARGV[2], ARGV[3]\n" + _KEYS + _FENCE + "return 1\n"

REFRESH = (
    _MARK
    + _NOW
    + """
local P, extra, tomb = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = 0
for i = 4, #ARGV, 2 do
  local h = P..':s:'..ARGV[i]
  local f = redis.call('HMGET', h, 'e', 'x')
  if f[1] == ARGV[i + 1] then
    local t = tonumber(f[2]) + extra
    redis.call('EXPIRE', h, t)
    redis.call('EXPIRE', h..':o', t)
    redis.call('EXPIRE', h..':i', t)
    redis.call('EXPIRE', h..':c', t)
    redis.call('ZADD', P..':s:all', now + t * 1000, ARGV[i])
    mark(P, h, t, tomb)
    n = n + 1
  end
end
return n
"""
)

# A node wrote its clients back (a reconnect, or after the others reaped it): the sessions
# its connections still carry are its own again, unless one was resumed elsewhere or ended
# (another epoch: answered 'lost'; its key gone, Redis restarted empty or a replica without
# it: 'gone') or numbered in Redis meanwhile (its ``o`` moved: 'moved', the client is to
# resume).  ARGV: P, node, incarnation, tomb, then (sid, epoch, o,
# conn, ttl)...  Answers {sid, why, ...} for those it did not take back.
REATTACH = (
    _MARK
    + _NOW
    + """
local P, n, inc, tomb = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local out = {}
for i = 5, #ARGV, 5 do
  local sid, t = ARGV[i], tonumber(ARGV[i + 4])
  local h = P..':s:'..sid
  local f = redis.call('HMGET', h, 'e', 'o', 'n')
  if f[1] == ARGV[i + 1] and f[2] == ARGV[i + 2] then
    if f[3] and f[3] ~= n then redis.call('SREM', P..':node:'..f[3]..':s', sid) end
    redis.call('HSET', h, 'n', n, 'c', ARGV[i + 3], 'i', inc)
    redis.call('SADD', P..':node:'..n..':s', sid)
    redis.call('ZREM', P..':s:d', sid)
    redis.call('EXPIRE', h, t)
    redis.call('EXPIRE', h..':o', t)
    redis.call('EXPIRE', h..':i', t)
    redis.call('EXPIRE', h..':c', t)
    redis.call('ZADD', P..':s:all', now + t * 1000, sid)
    mark(P, h, t, tomb)
  else
    out[#out + 1] = sid
    if not f[1] then out[#out + 1] = 'gone'
    elseif f[1] == ARGV[i + 1] then out[#out + 1] = 'moved'
    else out[#out + 1] = 'lost' end
  end
end
return out
"""
)

_SCRIPTS = {
    "CREATE": CREATE,
    "RECV": RECV,
    "OUT": OUT,
    "DONE": DONE,
    "ACK": ACK,
    "CLAIM": CLAIM,
    "DETACH": DETACH,
    "END": END,
    "CHECK": CHECK,
    "PUSH": PUSH,
    "KEEP": KEEP,
    "BROADCAST": BROADCAST,
    "REFRESH": REFRESH,
    "REATTACH": REATTACH,
}
_SHAS = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in _SCRIPTS.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisSessionStore:
    """Session state in Redis, through the cluster broker's command link (module docstring).

    Every method returns a Deferred; writes fire with 1, or -1 when fenced (the session's
    epoch is not the one given), and fail with ``BrokerUnavailable`` when Redis is not
    reachable.  Commands go out on one connection, so Redis applies them in call order.
    """

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.node_id = broker.node_id
        #: The process holding the sessions this node starts or resumes (``i`` in the hash).
        self.incarnation = broker.incarnation

    def _run(self, name: str, *args: Any) -> Deferred[Any]:
        return self.broker.run_script(_SHAS[name], _SCRIPTS[name], *args)

    def create(
        self,
        sid: str,
        digest: str,
        identity: str,
        expiry: int,
        conn: str,
        ttl: int,
        limit: int = 0,
        tomb: int = 0,
        total: int = 0,
        group: str = "",
    ) -> Deferred[Any]:
        """Write a new session: 1, 0 when ``identity`` already holds ``limit`` sessions
        in the cluster, or 2 when the cluster holds ``total`` sessions (0: no limit).
        ``tomb``: how long its tombstone outlives it.  ``group``: what ``limit`` counts,
        ``u:<identity>`` or ``a:<address>`` for a client without one ('': nothing)."""
        return self._run(
            "CREATE",
            sid,
            digest,
            identity,
            expiry,
            self.node_id,
            conn,
            ttl,
            limit,
            tomb,
            total,
            group,
            self.incarnation,
        )

    def received(self, sid: str, epoch: int, seq: int, request: str, ttl: int) -> Deferred[Any]:
        return self._run("RECV", sid, epoch, seq, request, ttl)

    def out(
        self,
        sid: str,
        epoch: int,
        seq: int,
        body: bytes,
        answered: int,
        ttl: int,
        sub: tuple[str, str, str] = ("", "", ""),
    ) -> Deferred[Any]:
        op, channel, value = sub
        return self._run("OUT", sid, epoch, seq, body, answered, ttl, op, channel, value)

    def done(self, sid: str, epoch: int, seq: int) -> Deferred[Any]:
        return self._run("DONE", sid, epoch, seq)

    def ack(self, sid: str, epoch: int, upto: int) -> Deferred[Any]:
        return self._run("ACK", sid, epoch, upto)

    def claim(
        self,
        sid: str,
        digest: str,
        identity: str,
        ack: int,
        conn: str,
        extra_ttl: int,
        tomb: int = 0,
    ) -> Deferred[dict[str, Any] | str]:
        """Take the session for ``conn`` (the epoch goes up: its former holder is fenced):
        its state, or why not (``unknown_session``, ``bad_key``, ``forbidden``, ``overflow``,
        ``bad_ack``)."""
        d = self._run(
            "CLAIM",
            sid,
            digest,
            identity,
            ack,
            self.node_id,
            conn,
            extra_ttl,
            tomb,
            self.incarnation,
        )

        def parsed(r: list[Any]) -> dict[str, Any] | str:
            status = _text(r[0])
            if status != "ok":
                return status
            inflight = [_text(v) for v in r[9] or []]
            subs = [_text(v) for v in r[10] or []]
            return {
                "epoch": int(r[1]),
                "out_seq": int(r[2]),
                "acked": int(r[3]),
                "in_hwm": int(r[4]),
                "expiry": int(r[5]),
                "node": _text(r[6]),
                "conn": _text(r[7]),
                "unacked": [v if isinstance(v, bytes) else str(v).encode() for v in r[8] or []],
                "inflight": {int(inflight[i]): inflight[i + 1] for i in range(0, len(inflight), 2)},
                "subs": {subs[i]: subs[i + 1] for i in range(0, len(subs), 2)},
            }

        return d.addCallback(parsed)

    def detach(
        self, sid: str, epoch: int, expiry: int, subs: dict[str, str] | None, tomb: int = 0
    ) -> Deferred[Any]:
        """The session's connection is gone: it lives ``expiry`` seconds, with ``subs`` as
        its subscriptions (None: those Redis recorded as its messages were numbered)."""
        flat: list[str] = ["0" if subs is None else "1"]
        for channel, value in (subs or {}).items():
            flat += [channel, value]
        return self._run("DETACH", sid, epoch, expiry, tomb, *flat)

    def end(self, sid: str, epoch: int, reason: str) -> Deferred[Any]:
        return self._run("END", sid, epoch, reason)

    def check(self, sid: str, epoch: int) -> Deferred[Any]:
        return self._run("CHECK", sid, epoch)

    def push(
        self, sid: str, body: bytes, max_messages: int, max_bytes: int, hops: int = 0
    ) -> Deferred[str]:
        """A push to a session this node does not hold: ``forwarded`` (to the live node
        holding it), ``stored`` (numbered into Redis), ``here`` (Redis says this node holds
        it), ``gone``, ``overflow`` (the session ended) or ``lost`` (it kept moving)."""
        d = self._run("PUSH", sid, body, max_messages, max_bytes, hops, self.node_id)
        return d.addCallback(_text)

    def keep(
        self, sid: str, epoch: int, body: bytes, cseq: int, max_messages: int, max_bytes: int
    ) -> Deferred[Any]:
        """Number a message of a detached session in Redis: its seq, 0 (overflow: ended) or
        -1 (fenced)."""
        return self._run("KEEP", sid, epoch, body, cseq, max_messages, max_bytes)

    def broadcast(
        self, body: bytes, max_messages: int, max_bytes: int, only: str = ""
    ) -> Deferred[Any]:
        """Number a broadcast into every session no live node carries (``only``: those last
        held by that node); how many took it."""
        return self._run("BROADCAST", body, max_messages, max_bytes, only)

    def reattach(self, held: list[tuple[str, int, int, str, int]], tomb: int = 0) -> Deferred[Any]:
        """Record (sid, epoch, last seq, connection, ttl) as this node's again, each only if
        Redis still has that epoch and last seq; fires with {sid: why} for the others
        (``lost``: resumed elsewhere; ``gone``: no longer in Redis; ``moved``: numbered in
        Redis meanwhile)."""
        flat: list[Any] = []
        for entry in held:
            flat += list(entry)
        d = self._run("REATTACH", self.node_id, self.incarnation, tomb, *flat)

        def parsed(r: list[Any]) -> dict[str, str]:
            texts = [_text(v) for v in r or []]
            return {texts[i]: texts[i + 1] for i in range(0, len(texts) - 1, 2)}

        return d.addCallback(parsed)

    def refresh(self, held: list[tuple[str, int]], extra_ttl: int, tomb: int = 0) -> Deferred[Any]:
        flat: list[Any] = []
        for sid, epoch in held:
            flat += [sid, epoch]
        return self._run("REFRESH", extra_ttl, tomb, *flat)
