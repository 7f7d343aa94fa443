/*
 * fanout_sub: N int32-framed subscribers of one channel, for bench/fanout.py.
 *
 * One thread, epoll.  Opens N connections, subscribes each to CHANNEL, prints {"ready": N}
 * once every subscribe was answered, then counts publications.  A publication's data is the
 * publisher's CLOCK_MONOTONIC send time in nanoseconds (Python's time.monotonic_ns() reads the
 * same clock), so per offset it keeps: how many subscribers got it, when the last one did, and
 * when it was sent.  A line "stop N" on stdin stops it once it has counted N deliveries (or
 * after 10 s without one); "stop" or the end of stdin at once.  It then prints one JSON object
 *   {"deliveries": D, "out_of_order": O, "offsets": [[offset, count, sent_ns, last_ns], ...]}
 * ("out_of_order": a subscriber saw an offset not above its previous one: 0 for a correct
 * server).  Pings from the server ({"type":"ping"}) are answered with a pong.
 *
 * A push {"type":"bcast","data":{"offset":K,"data":SENT_NS}} (a broadcast to every connection)
 * counts like a publication at offset K (the bench numbers broadcasts above its publications).
 *
 * With --proto nats it speaks NATS instead (SUB CHANNEL, then PING: the PONG means subscribed)
 * and a message's payload is "SEQ SENT_NS": SEQ stands for the offset.
 * With --proto ws the same envelope goes in WebSocket text messages (one per message; client
 * frames masked with a zero key, which leaves the payload as it is), after an HTTP upgrade to
 * --path.  With --proto sio it speaks socket.io 4 over engine.io's WebSocket transport
 * (/socket.io/?EIO=4&transport=websocket): open, "40" (connect), then the event
 * subscribe(CHANNEL) with an ack; events "publication" and "bcast" carry {offset, data};
 * engine.io pings ("2") are answered ("3").
 *
 *   fanout_sub --port P [--host 127.0.0.1] [--conns 1000] [--channel bench]
 *              [--proto int32|nats|ws|sio] [--path /]
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_OFFSETS 200000

typedef struct {
    int fd;
    unsigned char *in;
    size_t in_len, in_cap;
    long long last_offset;
    int subscribed;
    int upgraded; /* ws, sio: the HTTP 101 was read */
    int sio_stage; /* sio: 0 waiting for open, 1 for the connect, 2 for the subscribe ack */
} conn_t;

static uint32_t counts[MAX_OFFSETS];
static uint64_t sent_at[MAX_OFFSETS], last_at[MAX_OFFSETS];
static uint64_t deliveries, out_of_order;
static int nats, ws, sio;
static const char *channel_name = "bench";
static uint64_t now_ns(void);

static void record(conn_t *c, long long offset, uint64_t sent) {
    if (offset <= c->last_offset) out_of_order++;
    c->last_offset = offset;
    deliveries++;
    if (offset >= 0 && offset < MAX_OFFSETS) {
        counts[offset]++;
        sent_at[offset] = sent;
        last_at[offset] = now_ns();
    }
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void write_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            return;
        }
        p += n;
        len -= (size_t)n;
    }
}

/* One message: int32-framed, or a masked WebSocket text frame (zero mask key). */
static void send_frame(int fd, const char *body) {
    size_t len = strlen(body), h = 0;
    unsigned char buf[600];
    if (len > 500) return;
    if (ws || sio) {
        buf[h++] = 0x81;
        if (len < 126) {
            buf[h++] = 0x80 | (unsigned char)len;
        } else {
            buf[h++] = 0x80 | 126;
            buf[h++] = (unsigned char)(len >> 8);
            buf[h++] = (unsigned char)len;
        }
        memset(buf + h, 0, 4);
        h += 4;
    } else {
        buf[0] = len >> 24; buf[1] = len >> 16; buf[2] = len >> 8; buf[3] = len;
        h = 4;
    }
    memcpy(buf + h, body, len);
    write_all(fd, buf, len + h);
}

static void record_push(conn_t *c, char *o) {
    long long offset = strtoll(o + 9, NULL, 10);
    char *d = strstr(o, "\"data\":");
    record(c, offset, d ? strtoull(d + 7, NULL, 10) : 0);
}

/* One socket.io text message (an engine.io packet); returns 1 when subscribed by it. */
static int on_sio(conn_t *c, char *body, size_t len) {
    char saved = body[len];
    body[len] = 0;
    int subscribed = 0;
    if (body[0] == '4' && body[1] == '2') {
        char *o = strstr(body, "\"offset\":");
        if (o && (!strncmp(body + 2, "[\"publication\"", 14) || !strncmp(body + 2, "[\"bcast\"", 8)))
            record_push(c, o);
    } else if (body[0] == '2' && len == 1) {
        send_frame(c->fd, "3");
    } else if (body[0] == '0' && c->sio_stage == 0) {
        c->sio_stage = 1;
        send_frame(c->fd, "40");
    } else if (body[0] == '4' && body[1] == '0' && c->sio_stage == 1) {
        char sub[256];
        snprintf(sub, sizeof sub, "420[\"subscribe\",\"%s\"]", channel_name);
        c->sio_stage = 2;
        send_frame(c->fd, sub);
    } else if (!strncmp(body, "430", 3) && c->sio_stage == 2) {
        c->sio_stage = 3;
        subscribed = !c->subscribed;
        c->subscribed = 1;
    }
    body[len] = saved;
    return subscribed;
}

/* One frame's body (not NUL-terminated; `len` bytes). */
static int on_frame(conn_t *c, char *body, size_t len) {
    char saved = body[len];
    body[len] = 0;
    int subscribed = 0;
    if (strstr(body, "\"type\":\"publication\"") || strstr(body, "\"type\":\"bcast\"")) {
        char *o = strstr(body, "\"offset\":");
        if (o) record_push(c, o);
    } else if (strstr(body, "\"type\":\"subscribe\"")) {
        if (!c->subscribed) subscribed = 1;
        c->subscribed = 1;
    } else if (strstr(body, "\"type\":\"ping\"") && !strstr(body, "\"id\"")) {
        send_frame(c->fd, "{\"type\":\"pong\"}");
    }
    body[len] = saved;
    return subscribed;
}

/* NATS: consume what is complete in c->in from `at`; returns the new `at`. */
static size_t nats_parse(conn_t *c, size_t at, int *ready) {
    for (;;) {
        char *line = (char *)c->in + at;
        char *end = memmem(line, c->in_len - at, "\r\n", 2);
        if (!end) return at;
        size_t line_len = (size_t)(end - line) + 2;
        if (!strncmp(line, "MSG ", 4)) {
            char *space = end;
            while (space > line && space[-1] != ' ') space--;
            size_t n = strtoul(space, NULL, 10);
            if (c->in_len - at < line_len + n + 2) return at;
            char *payload = line + line_len;
            char saved = payload[n];
            payload[n] = 0;
            char *rest;
            long long seq = strtoll(payload, &rest, 10);
            record(c, seq, strtoull(rest, NULL, 10));
            payload[n] = saved;
            at += line_len + n + 2;
            continue;
        }
        if (!strncmp(line, "PONG", 4)) {
            if (!c->subscribed) (*ready)++;
            c->subscribed = 1;
        } else if (!strncmp(line, "PING", 4)) {
            write_all(c->fd, "PONG\r\n", 6);
        }
        at += line_len;
    }
}

/* WebSocket frames from the server (unmasked): consume what is complete from `at`. */
static size_t ws_parse(conn_t *c, size_t at, int *ready) {
    for (;;) {
        unsigned char *h = c->in + at;
        size_t have = c->in_len - at, head = 2, len;
        if (have < 2) return at;
        len = h[1] & 0x7f;
        if (len == 126) {
            if (have < 4) return at;
            len = ((size_t)h[2] << 8) | h[3];
            head = 4;
        } else if (len == 127) {
            if (have < 10) return at;
            len = 0;
            for (int i = 0; i < 8; i++) len = (len << 8) | h[2 + i];
            head = 10;
        }
        if (have < head + len) return at;
        int opcode = h[0] & 0x0f;
        char *body = (char *)h + head;
        if (opcode == 1) {
            *ready += sio ? on_sio(c, body, len) : on_frame(c, body, len);
        } else if (opcode == 9 && len < 120) {
            unsigned char pong[130] = {0x8a, 0x80 | (unsigned char)len, 0, 0, 0, 0};
            memcpy(pong + 6, body, len);
            write_all(c->fd, pong, len + 6);
        }
        at += head + len;
    }
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *channel = "bench", *path = "/";
    int port = 0, nconns = 1000;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--conns")) nconns = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--channel")) channel = argv[i + 1];
        else if (!strcmp(argv[i], "--path")) path = argv[i + 1];
        else if (!strcmp(argv[i], "--proto")) {
            nats = !strcmp(argv[i + 1], "nats");
            ws = !strcmp(argv[i + 1], "ws");
            sio = !strcmp(argv[i + 1], "sio");
        }
    }
    channel_name = channel;
    if (sio) path = "/socket.io/?EIO=4&transport=websocket";
    char upgrade[512];
    snprintf(upgrade, sizeof upgrade,
             "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n\r\n",
             path, host);
    struct rlimit rl;
    signal(SIGPIPE, SIG_IGN); /* a peer gone mid-write is an error return, not a kill */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    int ep = epoll_create1(0);
    conn_t *conns = calloc((size_t)nconns, sizeof(conn_t));
    char subscribe[256];
    snprintf(subscribe, sizeof subscribe,
             "{\"type\":\"subscribe\",\"id\":1,\"data\":{\"channel\":\"%s\"}}", channel);
    for (int i = 0; i < nconns; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            fprintf(stderr, "connect %d: %s\n", i, strerror(errno));
            return 1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns[i].fd = fd;
        conns[i].last_offset = -1;
        if (nats) {
            char sub[256];
            int n = snprintf(sub, sizeof sub,
                             "CONNECT {\"verbose\":false,\"pedantic\":false}\r\n"
                             "SUB %s 1\r\nPING\r\n",
                             channel);
            write_all(fd, sub, (size_t)n);
        } else if (ws || sio) {
            write_all(fd, upgrade, strlen(upgrade));
        } else {
            send_frame(fd, subscribe);
        }
        fcntl(fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    int ready = 0, running = 1;
    struct epoll_event events[256];
    uint64_t target = 0, last_progress = 0, seen = 0;
    while (running) {
        int n = epoll_wait(ep, events, 256, 1000);
        if (target) {
            if (deliveries != seen) {
                seen = deliveries;
                last_progress = now_ns();
            }
            if (deliveries >= target || now_ns() - last_progress > 10000000000ull) break;
        }
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            if (c == NULL) {
                /* "stop N": stop once N deliveries are counted (or after 10 s without one);
                 * a bare "stop" or the end of stdin: now. */
                char line[64] = "";
                ssize_t got = read(0, line, sizeof line - 1);
                long long want = got > 5 ? strtoll(line + 5, NULL, 10) : 0;
                if (want > 0 && deliveries < (uint64_t)want) {
                    target = (uint64_t)want;
                    epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
                    last_progress = now_ns();
                } else {
                    running = 0;
                }
                continue;
            }
            for (;;) {
                if (c->in_cap - c->in_len < 65536) {
                    c->in_cap = c->in_cap ? c->in_cap * 2 : 131072;
                    c->in = realloc(c->in, c->in_cap + 1);
                }
                ssize_t got = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
                if (got <= 0) {
                    if (got == 0) {
                        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    }
                    break;
                }
                c->in_len += (size_t)got;
                size_t at = 0;
                if (nats) at = nats_parse(c, 0, &ready);
                if ((ws || sio) && !c->upgraded) {
                    char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
                    if (end) {
                        if (strncmp((char *)c->in, "HTTP/1.1 101", 12)) {
                            fprintf(stderr, "upgrade refused: %.40s\n", (char *)c->in);
                            return 1;
                        }
                        c->upgraded = 1;
                        at = (size_t)(end - (char *)c->in) + 4;
                        if (ws) send_frame(c->fd, subscribe);
                    } else {
                        at = c->in_len + 1; /* marker: header incomplete */
                    }
                }
                if (at > c->in_len) {
                    at = 0;
                } else if (ws || sio) {
                    at = ws_parse(c, at, &ready);
                }
                while (!nats && !ws && !sio && c->in_len - at >= 4) {
                    unsigned char *h = c->in + at;
                    size_t len = ((size_t)h[0] << 24) | ((size_t)h[1] << 16) |
                                 ((size_t)h[2] << 8) | h[3];
                    if (c->in_len - at - 4 < len) break;
                    ready += on_frame(c, (char *)h + 4, len);
                    at += 4 + len;
                }
                memmove(c->in, c->in + at, c->in_len - at);
                c->in_len -= at;
                if (ready == nconns) {
                    printf("{\"ready\": %d}\n", ready);
                    fflush(stdout);
                    ready = -1;
                }
                if ((size_t)got < c->in_cap - c->in_len) break;
            }
        }
    }
    printf("{\"deliveries\": %" PRIu64 ", \"out_of_order\": %" PRIu64 ", \"offsets\": [",
           deliveries, out_of_order);
    int first = 1;
    for (int i = 0; i < MAX_OFFSETS; i++) {
        if (!counts[i]) continue;
        printf("%s[%d, %u, %" PRIu64 ", %" PRIu64 "]", first ? "" : ", ", i, counts[i],
               sent_at[i], last_at[i]);
        first = 0;
    }
    printf("]}\n");
    return 0;
}
