/* lm-echo: sends every UDP datagram back to its sender, unchanged.
 *
 * The downtime probe times its round trips through this, so the loop does nothing
 * else. It is a base service rather than a workload: it leaves `ready` and the stats
 * directory to whichever workload runs beside it. */
#include "lm_common.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static void usage(void)
{
    fprintf(stderr, "usage: lm-echo [-p PORT]\n");
    exit(2);
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

    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        lm_die("socket");
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        lm_die("bind UDP port %u", port);

    /* Large enough for any UDP payload, so nothing is ever echoed truncated. */
    static char buf[65536];
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof peer;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &peer_len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* Nothing in the guest would restart us, so outlive transient errors
             * (ENOMEM, ENOBUFS) without flooding the console. */
            perror("lm-echo: recvfrom");
            lm_sleep_ns(100 * 1000 * 1000);
            continue;
        }
        /* A failed send (full queue, no route yet after a migration) loses one echo,
         * which the probe counts as loss; it must not stop the server. */
        (void)sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, peer_len);
    }
}
