// The example chat page: heartbeatd-client in a browser, over ws://.
//
// It subscribes to the room's channel (join/leave events, recovery after a reconnect), sends
// with the `say` handler of chat_handlers.py, and shows the server's errors.  Query
// parameters: ws (the daemon's WebSocket url, default ws://<this host>:9001/), room, nick.
// In the browser console, `chat` is this page's state: chat.say('hi'), chat.events, ...

import { Client } from '/js/index.js';

const params = new URLSearchParams(location.search);
const url = params.get('ws') ?? `ws://${location.hostname}:9001/`;
const room = params.get('room') ?? 'lobby';
const nick = params.get('nick') ?? `guest-${Math.floor(Math.random() * 10_000)}`;
const channel = `chat.${room}`;

const $ = (selector) => document.querySelector(selector);
$('#room').textContent = room;

/** What happened, in order (the browser test reads it), and promises waiting for it. */
const events = [];
const waiters = [];

function record(kind, detail = {}) {
  events.push({ kind, at: Date.now(), ...detail });
  for (const waiter of [...waiters]) {
    if (events.filter((e) => e.kind === waiter.kind).length >= waiter.count) {
      waiters.splice(waiters.indexOf(waiter), 1);
      clearTimeout(waiter.timer);
      waiter.resolve(events.filter((e) => e.kind === waiter.kind));
    }
  }
}

/** Resolves with the events of `kind` once there are `count` of them. */
function when(kind, count = 1, timeout = 20_000) {
  const seen = events.filter((e) => e.kind === kind);
  if (seen.length >= count) return Promise.resolve(seen);
  return new Promise((resolve, reject) => {
    const waiter = { kind, count, resolve };
    waiter.timer = setTimeout(() => {
      waiters.splice(waiters.indexOf(waiter), 1);
      reject(new Error(`only ${events.filter((e) => e.kind === kind).length} ${kind} events after ${timeout} ms`));
    }, timeout);
    waiters.push(waiter);
  });
}

function show(text, className, from) {
  const item = document.createElement('li');
  if (className) item.className = className;
  if (from) {
    const who = document.createElement('span');
    who.className = 'from';
    who.textContent = from;
    item.append(who);
  }
  item.append(document.createTextNode(text));
  $('#messages').append(item);
  item.scrollIntoView({ block: 'end' });
}

function setStatus(state, detail) {
  $('#status').className = state;
  $('#status').textContent = detail ? `${state}: ${detail}` : state;
}

const client = new Client(url, { minReconnectDelay: 200, maxReconnectDelay: 5000 });
client.on('connecting', ({ attempt }) => setStatus('connecting', attempt > 1 ? `attempt ${attempt}` : ''));
client.on('connected', ({ hello }) => {
  setStatus('connected');
  record('connected', { session: hello.session });
});
client.on('disconnected', ({ reason, goaway }) => {
  setStatus('disconnected', reason);
  show(goaway ? 'The server is restarting; back in a moment.' : `Connection lost (${reason}); reconnecting.`, 'notice');
  record('disconnected', { reason, goaway });
});

async function refreshPeople() {
  try {
    const people = await client.presence(channel);
    $('#people').replaceChildren(
      ...people.map((p) => Object.assign(document.createElement('li'), { textContent: p.identity ?? p.session.slice(0, 6) })),
    );
  } catch {
    // Disconnected: the next subscribe refreshes it.
  }
}

const subscription = client.subscribe(channel, {
  joinLeave: true,
  onPublication: ({ offset, data }) => {
    show(data.text, '', data.from);
    record('publication', { offset, from: data.from, text: data.text });
  },
  onSubscribed: ({ recovered, wasRecovering, epoch, offset }) => {
    if (wasRecovering) {
      show(recovered ? 'Reconnected; nothing was lost.' : 'Reconnected, but some messages were lost.', 'notice');
    }
    record('subscribed', { recovered, wasRecovering, epoch, offset });
    refreshPeople();
  },
  onResync: ({ reason }) => {
    show(`Some messages were lost (${reason}).`, 'notice');
    record('resync', { reason });
  },
  onJoin: refreshPeople,
  onLeave: refreshPeople,
});

/** Say `text` in the room; resolves with its offset, rejects with the server's error. */
async function say(text) {
  try {
    return await client.request('say', { room, nick, text });
  } catch (error) {
    show(`${error.code ?? error.name}: ${error.message}`, 'error');
    record('error', { name: error.name, code: error.code, message: error.message });
    throw error;
  }
}

$('#say').addEventListener('submit', (event) => {
  event.preventDefault();
  const input = $('#text');
  say(input.value).then(() => {
    input.value = '';
  }, () => {});
});

client.open();
window.chat = { client, subscription, events, when, say, room, nick };
