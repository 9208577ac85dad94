/* lm-echo: the echo service (RFC 862) on UDP and TCP port 7.
 *
 * UDP: every datagram goes back to its sender, unchanged; the downtime probe times its
 * round trips through it. TCP: every byte received on a connection goes back on it;
 * the TCP-flow probe keeps one connection open across a migration and measures the
 * longest stall, which is where a lost segment's retransmission timeout shows.
 *
 * It is a base service rather than a workload: it leaves `ready` and the stats
 * directory to whichever workload runs beside it. */
#include "lm_common.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_TCP_CLIENTS 32

static void usage(void)
{
    fprintf(stderr, "usage: lm-echo [-p PORT]\n");
    exit(2);
}

static int bound_socket(int type, unsigned port)
{
    int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
    if (fd < 0)
        lm_die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        lm_die("bind %s port %u", type == SOCK_DGRAM ? "UDP" : "TCP", port);
    return fd;
}

/* Large enough for any UDP payload, so nothing is ever echoed truncated. */
static char buf[65536];

static void echo_udp(int fd)
{
    struct sockaddr_storage peer;
    socklen_t peer_len = sizeof peer;
    ssize_t n = recvfrom(fd, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&peer, &peer_len);
    if (n < 0) {
        if (errno != EINTR && errno != EAGAIN) {
            /* Nothing in the guest would restart us, so outlive transient errors
             * (ENOMEM, ENOBUFS) without flooding the console. */
            perror("lm-echo: recvfrom");
            lm_sleep_ns(100 * 1000 * 1000);
        }
        return;
    }
    /* A failed send (full queue, no route yet after a migration) loses one echo,
     * which the probe counts as loss; it must not stop the server. */
    (void)sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, peer_len);
}

/* Returns 0 when the connection is over. Blocking writes: a TCP client that stops
 * reading stalls only its own echo, and the probe reads everything it sends. */
static int echo_tcp(int fd)
{
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0)
        return n < 0 && errno == EINTR;
    for (ssize_t off = 0; off < n;) {
        ssize_t w = write(fd, buf + off, (size_t)(n - off));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return 0;
        }
        off += w;
    }
    return 1;
}

int main(int argc, char **argv)
{
    unsigned port = 7;
    int opt;
    while ((opt = getopt(argc, argv, "p:")) != -1) {
        if (opt == 'p')
            port = (unsigned)lm_parse_ulong('p', optarg, 1, 65535);
        else
            usage();
    }
    if (optind != argc)
        usage();

    /* A TCP client that reset the connection while we still echo to it (a probe
     * killed, a flow cut by a migration) gives EPIPE, and with it SIGPIPE, whose
     * default ends the whole server: every later probe would be refused. */
    signal(SIGPIPE, SIG_IGN);
    struct pollfd fds[2 + MAX_TCP_CLIENTS];
    fds[0] = (struct pollfd){.fd = bound_socket(SOCK_DGRAM, port), .events = POLLIN};
    fds[1] = (struct pollfd){.fd = bound_socket(SOCK_STREAM, port), .events = POLLIN};
    if (listen(fds[1].fd, 16) < 0)
        lm_die("listen TCP port %u", port);
    nfds_t n = 2;
    for (;;) {
        if (poll(fds, n, -1) < 0) {
            if (errno != EINTR)
                lm_die("poll");
            continue;
        }
        if (fds[0].revents & POLLIN)
            echo_udp(fds[0].fd);
        if (fds[1].revents & POLLIN) {
            int c = accept4(fds[1].fd, NULL, NULL, SOCK_CLOEXEC);
            if (c >= 0 && n < 2 + MAX_TCP_CLIENTS)
                fds[n++] = (struct pollfd){.fd = c, .events = POLLIN};
            else if (c >= 0)
                close(c); /* full: the client sees the connection closed at once */
        }
        for (nfds_t i = 2; i < n; i++) {
            if (fds[i].revents && !echo_tcp(fds[i].fd)) {
                close(fds[i].fd);
                fds[i--] = fds[--n];
            }
        }
    }
}
