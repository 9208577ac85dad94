/* lm-game: a Quake-3-like UDP game server.
 *
 * Clients join (and stay joined) by sending `!4sI` (b"LMGC", client id) at least every
 * 5 s. Every tick the server moves its entities, rewrites a slice of its world memory
 * (the dirtying that live migration has to chase) and sends each client a snapshot:
 * `!4sIQQI` (b"LMGS", client id, tick, server monotonic ns, entity count) followed by
 * the entities, 16 bytes each: `!Iiii` (entity id, x, y, z).
 *
 * Tick n is due at start + n / hz, an absolute deadline, so that the rate does not
 * drift with the time a tick takes. Between deadlines the server waits in ppoll() with
 * the time left until the deadline, so joins are taken as they arrive. A tick that is
 * already a whole period late (the VM was paused, or TCG fell behind) is skipped, not
 * sent in a burst: the tick number stays tied to the schedule and the gap shows. */
#include "lm_common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROG "game"
#define MAX_CLIENTS 64
#define CLIENT_TIMEOUT_NS (5 * LM_NSEC_PER_SEC)
#define N_ENTITIES 64
#define ENTITY_SIZE 16
#define SNAP_HEADER_SIZE 28 /* 4 + 4 + 8 + 8 + 4 */
#define SNAP_SIZE (SNAP_HEADER_SIZE + N_ENTITIES * ENTITY_SIZE)
#define JOIN_SIZE 8

_Static_assert(SNAP_SIZE < 1400, "a snapshot must fit one unfragmented datagram");

struct client {
    bool used;
    struct sockaddr_in addr;
    uint32_t id;
    uint64_t last_seen_ns;
};

struct entity {
    int32_t pos[3], vel[3];
};

static struct client clients[MAX_CLIENTS];
static struct entity entities[N_ENTITIES];
static volatile sig_atomic_t stop;

static void on_stop(int sig)
{
    (void)sig;
    stop = 1;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    v = htonl(v);
    memcpy(p, &v, 4);
}

static void put_u64(unsigned char *p, uint64_t v)
{
    put_u32(p, (uint32_t)(v >> 32));
    put_u32(p + 4, (uint32_t)v);
}

static unsigned count_clients(void)
{
    unsigned n = 0;
    for (int i = 0; i < MAX_CLIENTS; i++)
        n += clients[i].used;
    return n;
}

static void handle_join(const struct sockaddr_in *from, uint32_t id, uint64_t now)
{
    struct client *free_slot = NULL;
    for (int i = 0; i < MAX_CLIENTS; i++) {
        struct client *c = &clients[i];
        if (!c->used) {
            if (!free_slot)
                free_slot = c;
        } else if (c->addr.sin_addr.s_addr == from->sin_addr.s_addr &&
                   c->addr.sin_port == from->sin_port) {
            c->id = id;
            c->last_seen_ns = now;
            return;
        }
    }
    /* A full server ignores newcomers, like a real one; they may retry. */
    if (free_slot)
        *free_slot = (struct client){.used = true, .addr = *from, .id = id, .last_seen_ns = now};
}

/* Takes every queued datagram; anything but a well-formed join is ignored. */
static void drain_socket(int fd)
{
    for (;;) {
        unsigned char buf[JOIN_SIZE];
        struct sockaddr_in from;
        socklen_t from_len = sizeof from;
        /* MSG_TRUNC makes recvfrom report the real length, so longer datagrams that
         * merely start like a join are refused. */
        ssize_t n = recvfrom(fd, buf, sizeof buf, MSG_DONTWAIT | MSG_TRUNC,
                             (struct sockaddr *)&from, &from_len);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                perror("lm-game: recvfrom");
            return;
        }
        if (n != JOIN_SIZE || from_len != sizeof from || from.sin_family != AF_INET ||
            memcmp(buf, "LMGC", 4) != 0)
            continue;
        uint32_t id;
        memcpy(&id, buf + 4, 4);
        handle_join(&from, ntohl(id), lm_now_ns());
    }
}

/* Dirties kb KiB of the world per tick, cycling through it, so that the dirty rate the
 * migration sees is kb * hz KiB/s no matter how large the world is. */
static void rewrite_world(uint64_t *world, size_t words, size_t dirty_words, size_t *cursor,
                          uint64_t tick)
{
    uint64_t v = tick * 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < dirty_words; i++) {
        world[*cursor] = v ^ i;
        if (++*cursor == words)
            *cursor = 0;
    }
}

static void move_entities(void)
{
    for (int i = 0; i < N_ENTITIES; i++) {
        struct entity *e = &entities[i];
        for (int k = 0; k < 3; k++) {
            e->pos[k] += e->vel[k];
            /* Bounce off the walls of a 2^20 cube. */
            if (e->pos[k] < -(1 << 20) || e->pos[k] > (1 << 20))
                e->vel[k] = -e->vel[k];
        }
    }
}

static void send_snapshots(int fd, uint64_t tick, uint64_t now)
{
    unsigned char snap[SNAP_SIZE];
    memcpy(snap, "LMGS", 4);
    put_u64(snap + 8, tick);
    put_u64(snap + 16, now);
    put_u32(snap + 24, N_ENTITIES);
    for (int i = 0; i < N_ENTITIES; i++) {
        unsigned char *p = snap + SNAP_HEADER_SIZE + i * ENTITY_SIZE;
        put_u32(p, (uint32_t)i);
        for (int k = 0; k < 3; k++)
            put_u32(p + 4 + 4 * k, (uint32_t)entities[i].pos[k]);
    }

    for (int i = 0; i < MAX_CLIENTS; i++) {
        struct client *c = &clients[i];
        if (!c->used)
            continue;
        if (now - c->last_seen_ns > CLIENT_TIMEOUT_NS) {
            c->used = false;
            continue;
        }
        put_u32(snap + 4, c->id);
        /* A lost snapshot is what UDP games live with; the next tick sends another. */
        (void)sendto(fd, snap, sizeof snap, 0, (struct sockaddr *)&c->addr, sizeof c->addr);
    }
}

static void write_stats(uint64_t tick, unsigned hz, unsigned long world_kb)
{
    char json[256];
    int n = snprintf(json, sizeof json, "{\"clients\": %u, \"tick\": %llu, \"hz\": %u, "
                     "\"world_kb\": %lu}\n",
                     count_clients(), (unsigned long long)tick, hz, world_kb);
    lm_write_stats(PROG, json, (size_t)n);
}

static void usage(void)
{
    fprintf(stderr, "usage: lm-game [-p PORT] [-r HZ] [-w WORLD_KB] [-d DIRTY_KB_PER_TICK]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    unsigned port = 27960, hz = 20;
    unsigned long world_kb = 4096, dirty_kb = 64;
    int opt;
    while ((opt = getopt(argc, argv, "p:r:w:d:")) != -1) {
        switch (opt) {
        case 'p': port = (unsigned)lm_parse_ulong('p', optarg, 1, 65535); break;
        case 'r': hz = (unsigned)lm_parse_ulong('r', optarg, 1, 1000); break;
        case 'w': world_kb = lm_parse_ulong('w', optarg, 1, 1ul << 22); break;
        case 'd': dirty_kb = lm_parse_ulong('d', optarg, 0, 1ul << 22); break;
        default: usage();
        }
    }
    if (optind != argc)
        usage();
    if (dirty_kb > world_kb) {
        fprintf(stderr, "lm-game: -d %lu is more than the world (-w %lu)\n", dirty_kb, world_kb);
        exit(2);
    }

    struct sigaction sa = {.sa_handler = on_stop};
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0)
        lm_die("sigaction");

    lm_make_run_dirs();
    lm_write_pidfile(PROG);

    size_t words = world_kb * 1024 / 8, dirty_words = dirty_kb * 1024 / 8, cursor = 0;
    /* calloc'd pages stay unbacked until written; the first sweep brings them in. */
    uint64_t *world = calloc(words, sizeof *world);
    if (!world)
        lm_die("cannot allocate a %lu KiB world", world_kb);
    for (int i = 0; i < N_ENTITIES; i++)
        for (int k = 0; k < 3; k++) {
            entities[i].pos[k] = (i * 7919 + k * 104729) % (1 << 20);
            entities[i].vel[k] = 64 + (i * 31 + k * 17) % 1024;
        }

    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        lm_die("socket");
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        lm_die("bind UDP port %u", port);
    lm_touch_ready();

    uint64_t start = lm_now_ns(), tick = 0, next_stats = start;
    while (!stop) {
        uint64_t now = lm_now_ns();
        uint64_t deadline = start + tick * LM_NSEC_PER_SEC / hz;
        if (now >= deadline) {
            uint64_t late_ticks = (now - deadline) * hz / LM_NSEC_PER_SEC;
            tick += late_ticks;
            move_entities();
            rewrite_world(world, words, dirty_words, &cursor, tick);
            send_snapshots(fd, tick, now);
            if (now >= next_stats) {
                write_stats(tick, hz, world_kb);
                next_stats = now + LM_NSEC_PER_SEC;
            }
            tick++;
            continue;
        }
        uint64_t left = deadline - now;
        struct timespec timeout = {.tv_sec = (time_t)(left / LM_NSEC_PER_SEC),
                                   .tv_nsec = (long)(left % LM_NSEC_PER_SEC)};
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = ppoll(&pfd, 1, &timeout, NULL);
        if (r < 0 && errno != EINTR)
            lm_die("ppoll");
        if (r > 0)
            drain_socket(fd);
    }
    lm_remove_pidfile(PROG);
    return 0;
}
