/*
 * Peer: the one-core limit for fan-out (bench/fanout.py).  A single-threaded epoll server in C
 * speaking heartbeatd's int32-framed envelope, as little as a channel server can do:
 *
 *   subscribe {"channel": C}      -> joins C; answers {channel, epoch, offset}
 *   publish {"channel": C, "data": D}
 *                                 -> offset += 1; the publication
 *                                    {"type":"publication","data":{"channel","offset","data"}}
 *                                    is encoded ONCE and written to every subscriber of C;
 *                                    answers {channel, offset}
 *   broadcast D                   -> {"type":"bcast","data":D} to every connection; answers
 *                                    {"sent": N}
 *   ping                          -> pong
 *
 * Writes go straight to the socket; what the kernel does not take is kept per connection and
 * written on EPOLLOUT, so a slow subscriber never blocks the others.  The JSON is not parsed
 * beyond finding the fields (the bench's clients send them in a fixed shape).  One channel
 * table of up to 64 names.
 *
 *   c_fanout PORT      prints {"port": N} once listening
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
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
#include <unistd.h>

#define MAX_CHANNELS 64

typedef struct conn {
    int fd, ep, alive;
    unsigned char *in, *out;
    size_t in_len, in_cap, out_len, out_cap;
    uint64_t subs; /* bit i: subscribed to channel i */
} conn_t;

typedef struct {
    char name[128];
    long long offset;
    conn_t **subs;
    size_t len, cap;
} channel_t;

static channel_t channels[MAX_CHANNELS];
static int nchannels;
static conn_t **all;
static size_t nall, capall;
static int epfd;

static void grow(unsigned char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 4096;
    while (c < need) c *= 2;
    *buf = realloc(*buf, c);
    if (!*buf) { perror("realloc"); exit(2); }
    *cap = c;
}

static void send_bytes(conn_t *c, const unsigned char *data, size_t len) {
    if (!c->alive) return;
    if (c->out_len == 0) {
        ssize_t n = write(c->fd, data, len);
        if (n == (ssize_t)len) return;
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) { c->alive = 0; return; }
            n = 0;
        }
        data += n;
        len -= (size_t)n;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
    grow(&c->out, &c->out_cap, c->out_len + len);
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
}

static void flush_out(conn_t *c) {
    while (c->out_len) {
        ssize_t n = write(c->fd, c->out, c->out_len);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            c->alive = 0;
            return;
        }
        memmove(c->out, c->out + n, c->out_len - (size_t)n);
        c->out_len -= (size_t)n;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* A frame with header: `body` of `len` bytes (the result is malloc'd; *size is set). */
static unsigned char *framed(const char *body, size_t len, size_t *size) {
    unsigned char *out = malloc(len + 4);
    out[0] = len >> 24; out[1] = len >> 16; out[2] = len >> 8; out[3] = len;
    memcpy(out + 4, body, len);
    *size = len + 4;
    return out;
}

static void reply(conn_t *c, const char *body) {
    size_t size;
    unsigned char *f = framed(body, strlen(body), &size);
    send_bytes(c, f, size);
    free(f);
}

/* The string value after `"key":"` in body, copied to out (no escapes in the bench's names). */
static int str_field(const char *body, const char *key, char *out, size_t cap) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    const char *p = strstr(body, pat);
    if (!p) return 0;
    p += strlen(pat);
    const char *q = strchr(p, '"');
    if (!q || (size_t)(q - p) >= cap) return 0;
    memcpy(out, p, (size_t)(q - p));
    out[q - p] = 0;
    return 1;
}

/* The raw JSON value after `"key":` starting at `from`, up to the brace closing it. */
static const char *raw_value(const char *from, const char *key, size_t *len) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(from, pat);
    if (!p) return NULL;
    p += strlen(pat);
    int depth = 0, in_str = 0;
    const char *q = p;
    for (; *q; q++) {
        if (in_str) {
            if (*q == '\\' && q[1]) q++;
            else if (*q == '"') in_str = 0;
        } else if (*q == '"') in_str = 1;
        else if (*q == '{' || *q == '[') depth++;
        else if (*q == '}' || *q == ']') {
            if (depth == 0) break;
            depth--;
        } else if (*q == ',' && depth == 0) break;
    }
    *len = (size_t)(q - p);
    return p;
}

static channel_t *channel(const char *name) {
    for (int i = 0; i < nchannels; i++)
        if (!strcmp(channels[i].name, name)) return &channels[i];
    if (nchannels == MAX_CHANNELS) return NULL;
    channel_t *ch = &channels[nchannels++];
    snprintf(ch->name, sizeof ch->name, "%s", name);
    return ch;
}

static void on_frame(conn_t *c, char *body) {
    char type[32] = "", name[128] = "", out[512];
    long long id = 0;
    str_field(body, "type", type, sizeof type);
    const char *idp = strstr(body, "\"id\":");
    if (idp) id = strtoll(idp + 5, NULL, 10);
    if (!strcmp(type, "ping")) {
        snprintf(out, sizeof out, "{\"type\":\"pong\",\"id\":%lld}", id);
        reply(c, out);
    } else if (!strcmp(type, "subscribe") && str_field(body, "channel", name, sizeof name)) {
        channel_t *ch = channel(name);
        if (!ch) return;
        int index = (int)(ch - channels);
        if (!(c->subs & (1ull << index))) {
            c->subs |= 1ull << index;
            if (ch->len == ch->cap) {
                ch->cap = ch->cap ? ch->cap * 2 : 1024;
                ch->subs = realloc(ch->subs, ch->cap * sizeof *ch->subs);
            }
            ch->subs[ch->len++] = c;
        }
        snprintf(out, sizeof out,
                 "{\"type\":\"subscribe\",\"id\":%lld,\"data\":{\"channel\":\"%s\","
                 "\"epoch\":\"c\",\"offset\":%lld}}",
                 id, name, ch->offset);
        reply(c, out);
    } else if (!strcmp(type, "publish") && str_field(body, "channel", name, sizeof name)) {
        channel_t *ch = channel(name);
        const char *inner = strstr(body, "\"channel\":");
        size_t dlen = 0;
        const char *data = inner ? raw_value(inner, "data", &dlen) : NULL;
        if (!ch || !data) return;
        ch->offset++;
        size_t blen = dlen + strlen(name) + 96, size;
        char *pub = malloc(blen);
        int n = snprintf(pub, blen,
                         "{\"type\":\"publication\",\"data\":{\"channel\":\"%s\",\"offset\":%lld,"
                         "\"data\":%.*s}}",
                         name, ch->offset, (int)dlen, data);
        unsigned char *f = framed(pub, (size_t)n, &size); /* encoded once */
        free(pub);
        for (size_t i = 0; i < ch->len; i++) send_bytes(ch->subs[i], f, size);
        free(f);
        snprintf(out, sizeof out,
                 "{\"type\":\"publish\",\"id\":%lld,\"data\":{\"channel\":\"%s\",\"offset\":%lld}}",
                 id, name, ch->offset);
        reply(c, out);
    } else if (!strcmp(type, "broadcast")) {
        size_t dlen = 0, size;
        const char *data = raw_value(body, "data", &dlen);
        if (!data) return;
        char *msg = malloc(dlen + 64);
        int n = snprintf(msg, dlen + 64, "{\"type\":\"bcast\",\"data\":%.*s}", (int)dlen, data);
        unsigned char *f = framed(msg, (size_t)n, &size);
        free(msg);
        for (size_t i = 0; i < nall; i++) send_bytes(all[i], f, size);
        free(f);
        snprintf(out, sizeof out, "{\"type\":\"broadcast\",\"id\":%lld,\"data\":{\"sent\":%zu}}",
                 id, nall);
        reply(c, out);
    } else {
        snprintf(out, sizeof out,
                 "{\"type\":\"error\",\"id\":%lld,\"error\":{\"code\":\"unknown_type\"}}", id);
        reply(c, out);
    }
}

static void forget(conn_t *c) {
    for (int i = 0; i < nchannels; i++) {
        if (!(c->subs & (1ull << i))) continue;
        channel_t *ch = &channels[i];
        for (size_t j = 0; j < ch->len; j++)
            if (ch->subs[j] == c) { ch->subs[j] = ch->subs[--ch->len]; break; }
    }
    for (size_t j = 0; j < nall; j++)
        if (all[j] == c) { all[j] = all[--nall]; break; }
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

static void on_readable(conn_t *c) {
    for (;;) {
        grow(&c->in, &c->in_cap, c->in_len + 65536 + 1);
        ssize_t n = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len - 1);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) { c->alive = 0; return; }
        if (n < 0) return;
        c->in_len += (size_t)n;
        size_t at = 0;
        while (c->in_len - at >= 4) {
            unsigned char *h = c->in + at;
            size_t len = ((size_t)h[0] << 24) | ((size_t)h[1] << 16) | ((size_t)h[2] << 8) | h[3];
            if (len > (1u << 20)) { c->alive = 0; return; }
            if (c->in_len - at - 4 < len) break;
            char saved = (char)h[4 + len];
            h[4 + len] = 0;
            on_frame(c, (char *)h + 4);
            h[4 + len] = (unsigned char)saved;
            at += 4 + len;
        }
        memmove(c->in, c->in + at, c->in_len - at);
        c->in_len -= at;
    }
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    signal(SIGPIPE, SIG_IGN); /* a peer gone mid-write is an error return, not a kill */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 4096)) {
        perror("listen");
        return 1;
    }
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    printf("{\"port\": %d}\n", ntohs(addr.sin_port));
    fflush(stdout);
    epfd = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event events[512];
    for (;;) {
        int n = epoll_wait(epfd, events, 512, -1);
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    nc->alive = 1;
                    if (nall == capall) {
                        capall = capall ? capall * 2 : 1024;
                        all = realloc(all, capall * sizeof *all);
                    }
                    all[nall++] = nc;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (events[e].events & EPOLLOUT) flush_out(c);
            if (c->alive && (events[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_readable(c);
            if (!c->alive) forget(c);
        }
    }
}
