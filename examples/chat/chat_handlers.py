"""A chat room: the handler module of heartbeatd's example page (examples/chat/, docs/js-client.md).

``say`` checks a message and publishes it to the room's channel, ``chat.<room>``; the page
subscribes to that channel (with join and leave events, and recovery after a reconnect) and
asks for its presence.  Everything else is heartbeatd's built-in channels.
"""

import re

from heartbeatd import HandlerError

MAX_TEXT = 500
ROOM = re.compile(r"[A-Za-z0-9_-]{1,64}")


def register(registry):
    @registry.handler("say")
    def say(request):
        data = request.data if isinstance(request.data, dict) else {}
        room, nick, text = data.get("room"), data.get("nick"), data.get("text")
        if not isinstance(room, str) or not ROOM.fullmatch(room):
            raise HandlerError("bad_room", "a room name is 1-64 letters, digits, - or _")
        if not isinstance(text, str) or not text.strip():
            raise HandlerError("empty_message", "say something")
        if len(text) > MAX_TEXT:
            raise HandlerError("too_long", f"a message is at most {MAX_TEXT} characters")
        if not isinstance(nick, str) or not 0 < len(nick) <= 32:
            nick = "anonymous"
        # An authenticated session speaks under its identity, whatever nick it claims.
        author = request.session.identity or nick
        # Answers with the publication's offset (or the broker's error, e.g. unavailable).
        return request.server.publish(f"chat.{room}", {"from": author, "text": text.strip()})
