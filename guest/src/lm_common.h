/* Helpers shared by the guest programs: the run-time directory described in
 * docs/guest-protocols.md, pid and stats files, time, and option parsing. */
#ifndef LM_COMMON_H
#define LM_COMMON_H

#include <stddef.h>
#include <stdint.h>

#define LM_RUN_DIR_DEFAULT "/run/lm"
#define LM_NSEC_PER_SEC 1000000000ull

/* $LM_RUN_DIR, or /run/lm. */
const char *lm_run_dir(void);

/* Writes "<run dir>/<rel>" into buf; -1 (ENAMETOOLONG) if it does not fit. */
int lm_run_path(char *buf, size_t size, const char *rel);

/* Creates the run directory and its stats/ subdirectory if missing; exits on failure,
 * since a workload that cannot report is useless to the host. */
void lm_make_run_dirs(void);

/* Replaces <run dir>/<rel> with data, through <rel>.tmp and rename(), so that a reader
 * never sees half a file. Returns 0, or -1 with errno set. */
int lm_write_file_atomic(const char *rel, const char *data, size_t len);

/* Writes stats/<prog>.json; warns once on failure and carries on, because a full
 * tmpfs must not stop the workload the host is measuring. */
void lm_write_stats(const char *prog, const char *json, size_t len);

/* <prog>.pid; exits on failure, since the agent could not signal us. */
void lm_write_pidfile(const char *prog);
void lm_remove_pidfile(const char *prog);

/* Creates <run dir>/ready; exits on failure, since the host would wait forever. */
void lm_touch_ready(void);

/* Reads at most size-1 bytes of path and NUL-terminates them. Returns the length,
 * or -1 with errno set. */
long lm_read_file(const char *path, char *buf, size_t size);

uint64_t lm_now_ns(void); /* CLOCK_MONOTONIC */
void lm_sleep_ns(uint64_t ns);

/* Parses a decimal option argument in [min, max] or exits with a usage message. */
unsigned long lm_parse_ulong(char opt, const char *arg, unsigned long min, unsigned long max);

/* Prints "<program>: <message>: <strerror(errno)>" and exits 1. */
__attribute__((noreturn, format(printf, 1, 2))) void lm_die(const char *fmt, ...);

#endif
