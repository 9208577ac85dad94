#include "lm_common.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

const char *lm_run_dir(void)
{
    const char *dir = getenv("LM_RUN_DIR");
    return dir && *dir ? dir : LM_RUN_DIR_DEFAULT;
}

int lm_run_path(char *buf, size_t size, const char *rel)
{
    int n = snprintf(buf, size, "%s/%s", lm_run_dir(), rel);
    if (n < 0 || (size_t)n >= size) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

void lm_die(const char *fmt, ...)
{
    int saved = errno;
    va_list ap;
    fprintf(stderr, "%s: ", program_invocation_short_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, ": %s\n", strerror(saved));
    exit(1);
}

void lm_make_run_dirs(void)
{
    char path[4096];
    if (mkdir(lm_run_dir(), 0755) < 0 && errno != EEXIST)
        lm_die("mkdir %s", lm_run_dir());
    if (lm_run_path(path, sizeof path, "stats") < 0 || (mkdir(path, 0755) < 0 && errno != EEXIST))
        lm_die("mkdir %s/stats", lm_run_dir());
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

int lm_write_file_atomic(const char *rel, const char *data, size_t len)
{
    char path[4096], tmp[4096 + 8];
    if (lm_run_path(path, sizeof path, rel) < 0)
        return -1;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);

    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    /* No fsync: the files live on tmpfs, and readers only need never to see a torn
     * file, which rename() alone guarantees. */
    if (write_all(fd, data, len) < 0) {
        int saved = errno;
        close(fd);
        unlink(tmp);
        errno = saved;
        return -1;
    }
    if (close(fd) < 0 || rename(tmp, path) < 0) {
        int saved = errno;
        unlink(tmp);
        errno = saved;
        return -1;
    }
    return 0;
}

void lm_write_stats(const char *prog, const char *json, size_t len)
{
    static bool warned;
    char rel[256];
    snprintf(rel, sizeof rel, "stats/%s.json", prog);
    if (lm_write_file_atomic(rel, json, len) < 0 && !warned) {
        fprintf(stderr, "%s: cannot write %s/%s: %s\n", program_invocation_short_name,
                lm_run_dir(), rel, strerror(errno));
        warned = true;
    }
}

void lm_write_pidfile(const char *prog)
{
    char rel[256], text[32];
    snprintf(rel, sizeof rel, "%s.pid", prog);
    int n = snprintf(text, sizeof text, "%ld\n", (long)getpid());
    if (lm_write_file_atomic(rel, text, (size_t)n) < 0)
        lm_die("cannot write %s/%s", lm_run_dir(), rel);
}

void lm_remove_pidfile(const char *prog)
{
    char rel[256], path[4096];
    snprintf(rel, sizeof rel, "%s.pid", prog);
    if (lm_run_path(path, sizeof path, rel) == 0)
        unlink(path);
}

void lm_touch_ready(void)
{
    char path[4096];
    if (lm_run_path(path, sizeof path, "ready") < 0)
        lm_die("%s/ready", lm_run_dir());
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 || close(fd) < 0)
        lm_die("cannot create %s", path);
}

long lm_read_file(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = 0;
    while (len + 1 < size) {
        ssize_t n = read(fd, buf + len, size - 1 - len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    return (long)len;
}

uint64_t lm_now_ns(void)
{
    struct timespec ts;
    /* Cannot fail with a valid clock id and pointer. */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * LM_NSEC_PER_SEC + (uint64_t)ts.tv_nsec;
}

void lm_sleep_ns(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / LM_NSEC_PER_SEC),
                          .tv_nsec = (long)(ns % LM_NSEC_PER_SEC)};
    /* An interrupted sleep is fine: every caller re-checks its state and time. */
    nanosleep(&ts, NULL);
}

unsigned long lm_parse_ulong(char opt, const char *arg, unsigned long min, unsigned long max)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(arg, &end, 10);
    /* strtoul skips blanks and wraps "-1" around; accept only plain digits. */
    if (!isdigit((unsigned char)arg[0]) || errno || *end || v < min || v > max) {
        fprintf(stderr, "%s: -%c wants an integer in [%lu, %lu], not '%s'\n",
                program_invocation_short_name, opt, min, max, arg);
        exit(2);
    }
    return v;
}
