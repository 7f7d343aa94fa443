/*
 * loadgen: an int32-framed JSON load generator for heartbeatd and its peers.
 *
 * One thread, epoll, N connections, each keeping DEPTH echo requests in flight.  Requests are
 * pre-built ({"type":"echo","id":1,"data":"xxx..."}); replies are matched in order per
 * connection (every server under test answers in order), so a ring of send times gives each
 * reply's latency.  Frames a heartbeatd server sends on its own ({"type":"hello"...},
 * {"type":"ping"...}) are not replies: pings are answered with a pong.
 *
 * Modes:
 *   echo  measure msgs/s, MB/s and latency percentiles for DURATION seconds after WARMUP.
 *   idle  open N connections that never send; report when each got its first ping after
 *         SETTLE seconds (once every connection is open), so the spread of one heartbeat
 *         sweep is measured from the client side. Stops when all got one, or after DURATION.
 *
 * Output: one JSON object on stdout ("unanswered": requests still without a reply when the
 * run ended after draining for up to half a second; 0 for a correct server).
 *
 *   loadgen --port P [--host 127.0.0.1] [--conns 50] [--depth 1] [--size 64]
 *           [--duration 5] [--warmup 1] [--mode echo|idle]
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES (8u * 1000u * 1000u)

typedef struct {
    int fd;
    unsigned char *in;     /* receive buffer */
    size_t in_len, in_cap;
    uint64_t *sent_at;     /* ring of send times, DEPTH long */
    unsigned head, inflight;
    unsigned char *out;    /* pending bytes that did not fit in the socket */
    size_t out_len, out_cap;
    double first_ping;     /* idle mode: seconds since start, or -1 */
    int want_writable;
    int connected;
} conn_t;

static const char *host = "127.0.0.1";
static int port, nconns = 50, depth = 1, size = 64, idle_mode;
static double duration = 5, warmup = 1, settle = 0;
static unsigned char *frame;   /* one pre-built request frame */
static size_t frame_len;
static unsigned char *batch;   /* DEPTH frames back to back, to refill in one write */
static uint32_t *samples;      /* latencies in units of 100 ns */
static size_t nsamples;
static int epfd;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int compare_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void grow(unsigned char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 4096;
    while (c < need) c *= 2;
    *buf = realloc(*buf, c);
    if (!*buf) die("realloc");
    *cap = c;
}

static void watch(conn_t *c, int writable) {
    if (c->want_writable == writable) return;
    struct epoll_event ev = {.events = EPOLLIN | (writable ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
    c->want_writable = writable;
}

/* Write what we can now; keep the rest for EPOLLOUT. */
static void send_bytes(conn_t *c, const unsigned char *data, size_t len) {
    if (c->out_len == 0) {
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN) die("send");
            n = 0;
        }
        data += n;
        len -= (size_t)n;
    }
    if (len) {
        grow(&c->out, &c->out_cap, c->out_len + len);
        memcpy(c->out + c->out_len, data, len);
        c->out_len += len;
        watch(c, 1);
    }
}

static void flush_out(conn_t *c) {
    ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
    if (n < 0) {
        if (errno == EAGAIN) return;
        die("send");
    }
    memmove(c->out, c->out + n, c->out_len - (size_t)n);
    c->out_len -= (size_t)n;
    if (c->out_len == 0) watch(c, 0);
}

static unsigned long long requests_sent = 0;  /* warm-up included: were requests out at all */

static void send_requests(conn_t *c, unsigned count) {
    uint64_t t = now_ns();
    requests_sent += count;
    for (unsigned i = 0; i < count; i++) {
        c->sent_at[(c->head + c->inflight) % (unsigned)depth] = t;
        c->inflight++;
    }
    send_bytes(c, batch, frame_len * count);
}

static int starts_with(const unsigned char *body, size_t len, const char *prefix) {
    size_t p = strlen(prefix);
    return len >= p && memcmp(body, prefix, p) == 0;
}

/* Connect every connection without blocking, at most CONNECT_WINDOW at a time, so a burst
 * of thousands never overflows the server's accept queue (dropped SYNs would stall a blocking
 * connect() for seconds of retransmission backoff). Returns how many are connected. */
#define CONNECT_WINDOW 256
static int open_all(conn_t *conns, struct sockaddr_in *addr) {
    int started = 0, done = 0, pending = 0, one = 1;
    struct epoll_event events[CONNECT_WINDOW];
    while (done < nconns) {
        while (pending < CONNECT_WINDOW && started < nconns) {
            conn_t *c = &conns[started];
            c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (c->fd < 0) return done;  /* out of descriptors: report what we have */
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (connect(c->fd, (struct sockaddr *)addr, sizeof *addr) < 0 && errno != EINPROGRESS)
                die("connect");
            c->sent_at = calloc((size_t)depth, sizeof(uint64_t));
            c->first_ping = -1;
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
            if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
            started++;
            pending++;
        }
        int n = epoll_wait(epfd, events, CONNECT_WINDOW, 30000);
        if (n == 0) { fprintf(stderr, "connect timed out\n"); exit(3); }
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            /* Only a pending connect's writability counts; an open socket may already be
             * readable (a server's hello) and is read later, in the main loop. */
            if (c->connected || !(events[e].events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) continue;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) { errno = err; die("connect"); }
            c->connected = 1;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
            pending--;
            done++;
        }
    }
    return done;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) break;
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--conns")) nconns = atoi(v);
        else if (!strcmp(a, "--depth")) depth = atoi(v);
        else if (!strcmp(a, "--size")) size = atoi(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--mode")) idle_mode = !strcmp(v, "idle");
        else if (!strcmp(a, "--settle")) settle = atof(v);
        else { fprintf(stderr, "unknown option %s\n", a); return 2; }
        i++;
    }
    if (!port || nconns < 1 || depth < 1 || size < 0) {
        fprintf(stderr, "usage: loadgen --port P [--conns N] [--depth D] [--size S] ...\n");
        return 2;
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;  /* as many sockets as the hard limit allows */
    setrlimit(RLIMIT_NOFILE, &rl);

    /* The request: {"type":"echo","id":1,"data":"xxx"} with SIZE bytes of data. */
    const char *head = "{\"type\":\"echo\",\"id\":1,\"data\":\"", *tail = "\"}";
    size_t body_len = strlen(head) + (size_t)size + strlen(tail);
    frame_len = 4 + body_len;
    frame = malloc(frame_len);
    uint32_t be = htonl((uint32_t)body_len);
    memcpy(frame, &be, 4);
    memcpy(frame + 4, head, strlen(head));
    memset(frame + 4 + strlen(head), 'x', (size_t)size);
    memcpy(frame + 4 + strlen(head) + size, tail, strlen(tail));
    batch = malloc(frame_len * (size_t)depth);
    for (int i = 0; i < depth; i++) memcpy(batch + frame_len * (size_t)i, frame, frame_len);
    static const unsigned char pong[] = "\0\0\0\017{\"type\":\"pong\"}";
    samples = malloc(sizeof(uint32_t) * MAX_SAMPLES);

    epfd = epoll_create1(0);
    conn_t *conns = calloc((size_t)nconns, sizeof(conn_t));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    int opened = open_all(conns, &addr);
    uint64_t start = now_ns();  /* idle mode measures from here: every connection is open */
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9);
    uint64_t stop_at = measure_from + (uint64_t)(duration * 1e9);
    if (!idle_mode)
        for (int i = 0; i < opened; i++) send_requests(&conns[i], (unsigned)depth);

    uint64_t replies = 0, reply_bytes = 0, pings = 0;
    int stopping = 0, pinged = 0;
    struct epoll_event events[1024];
    unsigned char rbuf[262144];
    for (;;) {
        uint64_t t = now_ns();
        if (t >= stop_at) {
            if (idle_mode || stopping) break;
            stopping = 1;  /* stop sending; drain what is in flight for a moment */
            stop_at = t + 500000000ull;
        }
        int n = epoll_wait(epfd, events, 1024, 50);
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            if (events[e].events & EPOLLOUT) flush_out(c);
            if (!(events[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            ssize_t got = recv(c->fd, rbuf, sizeof rbuf, 0);
            if (got == 0) { fprintf(stderr, "server closed a connection\n"); return 3; }
            if (got < 0) { if (errno == EAGAIN) continue; die("recv"); }
            grow(&c->in, &c->in_cap, c->in_len + (size_t)got);
            memcpy(c->in + c->in_len, rbuf, (size_t)got);
            c->in_len += (size_t)got;
            size_t off = 0;
            unsigned answered = 0;
            uint64_t arrived = now_ns();
            while (c->in_len - off >= 4) {
                uint32_t len;
                memcpy(&len, c->in + off, 4);
                len = ntohl(len);
                if (c->in_len - off - 4 < len) break;
                unsigned char *body = c->in + off + 4;
                off += 4 + len;
                if (starts_with(body, len, "{\"type\":\"hello\"")) continue;
                if (starts_with(body, len, "{\"type\":\"ping\"")) {
                    pings++;
                    double at = (double)(arrived - start) / 1e9;
                    if (!idle_mode) {
                        send_bytes(c, pong, sizeof pong - 1);
                    } else if (c->first_ping < 0 && at >= settle) {
                        c->first_ping = at;
                        pinged++;
                    }
                    continue;
                }
                if (!c->inflight) { fprintf(stderr, "unexpected frame\n"); return 3; }
                uint64_t sent = c->sent_at[c->head];
                c->head = (c->head + 1) % (unsigned)depth;
                c->inflight--;
                answered++;
                if (sent >= measure_from && arrived <= stop_at && !stopping) {
                    replies++;
                    reply_bytes += 4 + len;
                    if (nsamples < MAX_SAMPLES) samples[nsamples++] = (uint32_t)((arrived - sent) / 100);
                }
            }
            memmove(c->in, c->in + off, c->in_len - off);
            c->in_len -= off;
            if (answered && !stopping) send_requests(c, answered);
        }
        if (idle_mode && pinged == opened && opened > 0) break;  /* everyone got a ping */
        if (stopping) {  /* draining: done once every request has its reply */
            int busy = 0;
            for (int i = 0; i < opened && !busy; i++) busy = conns[i].inflight != 0;
            if (!busy) break;
        }
    }
    unsigned long long unanswered = 0;
    for (int i = 0; i < opened; i++) unanswered += conns[i].inflight;

    if (idle_mode) {
        double first = 1e18, last = 0;
        for (int i = 0; i < opened; i++) {
            if (conns[i].first_ping < 0) continue;
            if (conns[i].first_ping < first) first = conns[i].first_ping;
            if (conns[i].first_ping > last) last = conns[i].first_ping;
        }
        printf("{\"mode\":\"idle\",\"connections\":%d,\"pinged\":%d,\"pings\":%llu,"
               "\"first_ping_s\":%.6f,\"ping_spread_s\":%.6f}\n",
               opened, pinged, (unsigned long long)pings, pinged ? first : -1.0,
               pinged ? last - first : -1.0);
        return 0;
    }
    qsort(samples, nsamples, sizeof(uint32_t), compare_u32);
#define PCT(p) (nsamples ? samples[(size_t)((double)(nsamples - 1) * (p))] / 1e4 : -1.0)
    printf("{\"mode\":\"echo\",\"connections\":%d,\"depth\":%d,\"size\":%d,\"seconds\":%.3f,"
           "\"replies\":%llu,\"msgs_per_s\":%.1f,\"mb_per_s\":%.3f,"
           "\"p50_ms\":%.4f,\"p99_ms\":%.4f,\"p999_ms\":%.4f,\"unanswered\":%llu,\"sent\":%llu}\n",
           opened, depth, size, duration, (unsigned long long)replies, replies / duration,
           reply_bytes / duration / 1e6, PCT(0.5), PCT(0.99), PCT(0.999), unanswered,
           requests_sent);
    return 0;
}
