/* lm-mmuncher: dirties memory at a chosen rate and checks that every write survives.
 *
 * This is the workload that catches a migration losing or corrupting guest memory.
 * Each 4 KiB page holds, as native 64-bit words:
 *
 *   word 0      magic (low 32 bits) | page index << 32
 *   word 1      sequence number of the last write
 *   word 2      checksum of every other word of the page
 *   word 3..511 payload, a xorshift64 stream seeded from (index, sequence)
 *
 * The sequence number each page should hold is kept in a separate array, so a page
 * that reverts to an older, self-consistent version (a lost write) is caught as well
 * as one whose bytes changed (a bad checksum). Before the sweep rewrites a page it
 * verifies it; SIGUSR1 asks for a pass that verifies every page. A bad page is
 * rewritten once reported, so that one fault is counted once. */
#include "lm_common.h"

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PROG "mmuncher"
#define PAGE_BYTES 4096
#define PAGE_WORDS (PAGE_BYTES / 8)
#define PAGES_PER_MIB (1024 * 1024 / PAGE_BYTES)
#define MAGIC 0x554d4d4cu /* "LMMU" in memory on a little-endian guest */
#define W_HEADER 0
#define W_SEQ 1
#define W_CHECKSUM 2
#define W_PAYLOAD 3
#define MAX_PRINTED_ERRORS 20
#define PACE_SLICE_NS (10 * 1000 * 1000)
/* Further behind schedule than this (the VM was paused, or TCG is too slow for the
 * rate) we forget the debt instead of writing flat out to repay it. */
#define PACE_MAX_LAG_NS (100 * 1000 * 1000)

static volatile sig_atomic_t verify_requested, stop;

static struct {
    unsigned long size_mib, rate_mibps;
    uint64_t pages_written, passes, errors, full_verifies, last_full_verify_errors;
    char first_error[160];
} st;

static void on_usr1(int sig)
{
    (void)sig;
    verify_requested = 1;
}

static void on_stop(int sig)
{
    (void)sig;
    stop = 1;
}

/* One multiply and one shift per word: TCG makes every guest instruction dear. Both
 * steps are bijections of h, so any change to a single word changes the result. */
static inline uint64_t mix(uint64_t h, uint64_t w)
{
    h = (h ^ w) * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 32);
}

static uint64_t page_checksum(const uint64_t *p)
{
    uint64_t h = mix(0x6c6d6d756e636872ull, p[W_HEADER]);
    h = mix(h, p[W_SEQ]);
    for (int i = W_PAYLOAD; i < PAGE_WORDS; i++)
        h = mix(h, p[i]);
    return h;
}

static void write_page(uint64_t *p, uint32_t index, uint64_t seq)
{
    /* splitmix64's finaliser spreads (index, seq) over the whole seed; xorshift64 needs
     * a nonzero one. */
    uint64_t x = ((uint64_t)index << 32 ^ seq) + 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x = (x ^ (x >> 31)) | 1;

    p[W_HEADER] = (uint64_t)index << 32 | MAGIC;
    p[W_SEQ] = seq;
    uint64_t h = mix(mix(0x6c6d6d756e636872ull, p[W_HEADER]), seq);
    for (int i = W_PAYLOAD; i < PAGE_WORDS; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = x;
        h = mix(h, x);
    }
    p[W_CHECKSUM] = h;
}

/* Returns true if the page is what we last wrote; otherwise reports it. */
static bool check_page(const uint64_t *p, uint32_t index, uint64_t want_seq)
{
    char why[128];
    uint64_t sum = page_checksum(p);
    if (sum != p[W_CHECKSUM])
        snprintf(why, sizeof why, "corrupted: checksum %016llx, computed %016llx",
                 (unsigned long long)p[W_CHECKSUM], (unsigned long long)sum);
    else if (p[W_HEADER] != ((uint64_t)index << 32 | MAGIC))
        snprintf(why, sizeof why, "misplaced: header %016llx",
                 (unsigned long long)p[W_HEADER]);
    else if (p[W_SEQ] != want_seq)
        snprintf(why, sizeof why, "lost write: seq %llu, expected %llu",
                 (unsigned long long)p[W_SEQ], (unsigned long long)want_seq);
    else
        return true;

    st.errors++;
    /* The text is ours, built from numbers only, so it needs no JSON escaping. */
    if (!st.first_error[0])
        snprintf(st.first_error, sizeof st.first_error, "page %u: %s", index, why);
    /* A wholesale failure would flood a serial console for minutes; the count in the
     * stats stays exact. */
    if (st.errors <= MAX_PRINTED_ERRORS)
        printf("mmuncher: INTEGRITY ERROR page %u: %s\n", index, why);
    if (st.errors == MAX_PRINTED_ERRORS)
        printf("mmuncher: further integrity errors are counted, not printed\n");
    return false;
}

static void write_stats(void)
{
    char json[512];
    int n = snprintf(json, sizeof json,
                     "{\"size_mib\": %lu, \"rate_mibps\": %lu, \"pages_written\": %llu, "
                     "\"passes\": %llu, \"errors\": %llu, \"full_verifies\": %llu, "
                     "\"last_full_verify_errors\": %llu, \"first_error\": \"%s\"}\n",
                     st.size_mib, st.rate_mibps, (unsigned long long)st.pages_written,
                     (unsigned long long)st.passes, (unsigned long long)st.errors,
                     (unsigned long long)st.full_verifies,
                     (unsigned long long)st.last_full_verify_errors, st.first_error);
    lm_write_stats(PROG, json, (size_t)n);
}

static void usage(void)
{
    fprintf(stderr, "usage: lm-mmuncher [-s SIZE_MIB] [-r RATE_MIBPS (0 = flat out)]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    unsigned long size_mib = 64, rate_mibps = 0;
    int opt;
    while ((opt = getopt(argc, argv, "s:r:")) != -1) {
        switch (opt) {
        case 's': size_mib = lm_parse_ulong('s', optarg, 1, 1ul << 20); break;
        case 'r': rate_mibps = lm_parse_ulong('r', optarg, 0, 1ul << 20); break;
        default: usage();
        }
    }
    if (optind != argc)
        usage();
    st.size_mib = size_mib;
    st.rate_mibps = rate_mibps;

    /* stdout is the console in the guest but may be a file or pipe elsewhere; an
     * integrity error must show at once either way. */
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* Handlers go in before the pid file exists: a SIGUSR1 from the agent must never
     * meet the default action, which is to die. */
    struct sigaction sa = {.sa_handler = on_usr1};
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) < 0)
        lm_die("sigaction");
    sa.sa_handler = on_stop;
    if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0)
        lm_die("sigaction");

    lm_make_run_dirs();
    lm_write_pidfile(PROG);

    uint32_t npages = (uint32_t)(size_mib * PAGES_PER_MIB);
    /* A mapping of its own keeps the region page-aligned and easy to find in
     * /proc/PID/maps. */
    uint64_t *region = mmap(NULL, (size_t)npages * PAGE_BYTES, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        lm_die("cannot map %lu MiB", size_mib);
    uint64_t *expected_seq = calloc(npages, sizeof *expected_seq);
    if (!expected_seq)
        lm_die("calloc");

    for (uint32_t i = 0; i < npages; i++) {
        write_page(region + (size_t)i * PAGE_WORDS, i, 1);
        expected_seq[i] = 1;
    }
    write_stats();
    lm_touch_ready();

    /* Flat out, a batch is just the stride between checks of the clock and flags. */
    uint64_t pages_per_s = (uint64_t)rate_mibps * PAGES_PER_MIB;
    uint32_t batch = rate_mibps ? (uint32_t)(pages_per_s * PACE_SLICE_NS / LM_NSEC_PER_SEC) : 64;
    if (batch == 0)
        batch = 1;
    uint64_t pace_start = lm_now_ns(), pace_pages = 0, next_stats = pace_start + LM_NSEC_PER_SEC;
    uint32_t cur = 0;

    while (!stop) {
        if (verify_requested) {
            verify_requested = 0;
            uint64_t before = st.errors;
            for (uint32_t i = 0; i < npages; i++) {
                uint64_t *p = region + (size_t)i * PAGE_WORDS;
                if (!check_page(p, i, expected_seq[i])) {
                    write_page(p, i, ++expected_seq[i]);
                    st.pages_written++;
                }
            }
            /* Both fields land in the same atomic write, so a reader that sees
             * full_verifies go up also sees this pass's error count. */
            st.last_full_verify_errors = st.errors - before;
            st.full_verifies++;
            write_stats();
        }

        for (uint32_t k = 0; k < batch; k++) {
            uint64_t *p = region + (size_t)cur * PAGE_WORDS;
            check_page(p, cur, expected_seq[cur]);
            write_page(p, cur, ++expected_seq[cur]);
            st.pages_written++;
            if (++cur == npages) {
                cur = 0;
                st.passes++;
            }
        }

        uint64_t now = lm_now_ns();
        if (rate_mibps) {
            /* Page n of this pacing run is due at pace_start + n / pages_per_s: timed
             * from one start, short sleeps and late wake-ups average out. */
            pace_pages += batch;
            if (pace_pages >= pages_per_s) { /* moves the start by exactly 1 s; no overflow */
                pace_start += LM_NSEC_PER_SEC;
                pace_pages -= pages_per_s;
            }
            uint64_t due = pace_start + pace_pages * LM_NSEC_PER_SEC / pages_per_s;
            if (now > due + PACE_MAX_LAG_NS) {
                pace_start = now;
                pace_pages = 0;
            } else if (due > now) {
                struct timespec ts = {.tv_sec = (time_t)(due / LM_NSEC_PER_SEC),
                                      .tv_nsec = (long)(due % LM_NSEC_PER_SEC)};
                /* EINTR (SIGUSR1) just ends the sleep early; the schedule catches up. */
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                now = lm_now_ns();
            }
        }
        if (now >= next_stats) {
            write_stats();
            next_stats = now + LM_NSEC_PER_SEC;
        }
    }
    lm_remove_pidfile(PROG);
    return 0;
}
