/*
 * Peer: the physical-limit reference. An epoll echo server in C that only re-frames: it
 * returns every complete int32 frame it reads, byte for byte, without parsing the JSON.
 *
 *   c_echo PORT      prints {"port": N} once listening
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct {
    int fd;
    unsigned char *in, *out;
    size_t in_len, in_cap, out_len, out_cap;
} conn_t;

static void grow(unsigned char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 65536;
    while (c < need) c *= 2;
    *buf = realloc(*buf, c);
    if (!*buf) { perror("realloc"); exit(2); }
    *cap = c;
}

static void drop(int epfd, conn_t *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

static int flush(int epfd, conn_t *c) {
    while (c->out_len) {
        ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN) return -1;
            struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
            epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
            return 0;
        }
        memmove(c->out, c->out + n, c->out_len - (size_t)n);
        c->out_len -= (size_t)n;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    return 0;
}

int main(int argc, char **argv) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)(argc > 1 ? atoi(argv[1]) : 0))};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("listen");
        return 2;
    }
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    printf("{\"port\": %d}\n", ntohs(addr.sin_port));
    fflush(stdout);
    int epfd = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event events[1024];
    static unsigned char buf[262144];
    for (;;) {
        int n = epoll_wait(epfd, events, 1024, -1);
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if ((events[i].events & EPOLLOUT) && flush(epfd, c) < 0) { drop(epfd, c); continue; }
            if (!(events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            ssize_t got = recv(c->fd, buf, sizeof buf, 0);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN) continue;
                drop(epfd, c);
                continue;
            }
            grow(&c->in, &c->in_cap, c->in_len + (size_t)got);
            memcpy(c->in + c->in_len, buf, (size_t)got);
            c->in_len += (size_t)got;
            size_t off = 0;
            while (c->in_len - off >= 4) {
                uint32_t len;
                memcpy(&len, c->in + off, 4);
                len = ntohl(len);
                if (c->in_len - off - 4 < len) break;
                off += 4 + len;
            }
            if (off) {  /* every complete frame goes back as it came */
                grow(&c->out, &c->out_cap, c->out_len + off);
                memcpy(c->out + c->out_len, c->in, off);
                c->out_len += off;
                memmove(c->in, c->in + off, c->in_len - off);
                c->in_len -= off;
                if (flush(epfd, c) < 0) drop(epfd, c);
            }
        }
    }
}
