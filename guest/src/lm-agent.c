/* lm-agent: answers the host on the virtio-serial port named org.livemig.agent.
 *
 * One request per line (at most 256 bytes), one reply per line, `ok <text>` or
 * `err <text>`. Requests are matched whole, never parsed further, and a reply never
 * contains a newline, so a confused host cannot desynchronise the stream.
 *
 * A virtio-serial port with no host on the other end polls as POLLHUP and reads
 * end-of-file at once (a pty whose master is closed reads EIO). Neither is a reason to
 * exit, since the host reconnects after every migration: the agent sleeps 10 ms and
 * tries again. */
#include "lm_common.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define PORT_NAME "org.livemig.agent"
#define VPORT_SYSFS "/sys/class/virtio-ports"
#define MAX_LINE 256
#define MAX_REPLY 16384
#define MAX_STATS_FILE 4096
#define RETRY_NS (10 * 1000 * 1000)
#define WRITE_TIMEOUT_MS 1000
#define VERIFY_POLL_NS (50 * 1000 * 1000)
#define VERIFY_TIMEOUT_NS (10 * LM_NSEC_PER_SEC)
#define ARPING_TIMEOUT_NS (2 * LM_NSEC_PER_SEC) /* two of them fit the host's 5 s */

static const char *iface = "eth0";

/* A bounded string builder: appends past the end are dropped and remembered, so one
 * check at the end covers every step. One byte stays free for the reply's newline. */
struct buf {
    char data[MAX_REPLY];
    size_t len;
    bool overflow;
};

__attribute__((format(printf, 2, 3))) static void buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    size_t room = sizeof b->data - 1 - b->len;
    int n = vsnprintf(b->data + b->len, room, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= room)
        b->overflow = true;
    else
        b->len += (size_t)n;
}

static void buf_json_string(struct buf *b, const char *s)
{
    buf_printf(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            buf_printf(b, "\\%c", c);
        else if (c < 0x20)
            buf_printf(b, "\\u%04x", c);
        else
            buf_printf(b, "%c", c);
    }
    buf_printf(b, "\"");
}

static void strip_trailing_space(char *s)
{
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' '))
        s[--n] = '\0';
}

/* Reads <run dir>/<rel> into buf, without trailing newline; -1 if absent. */
static long read_run_file(const char *rel, char *buf, size_t size)
{
    char path[4096];
    if (lm_run_path(path, sizeof path, rel) < 0 || lm_read_file(path, buf, size) < 0)
        return -1;
    strip_trailing_space(buf);
    return (long)strlen(buf);
}

/* Splices stats/<name> in verbatim. The workloads write one JSON object, but a custom
 * workload might not: anything that does not even look like an object becomes null,
 * and line breaks turn into spaces, so that the reply stays one line of JSON. */
static void append_stats_file(struct buf *b, const char *name)
{
    char rel[512], text[MAX_STATS_FILE];
    snprintf(rel, sizeof rel, "stats/%s", name);
    long n = read_run_file(rel, text, sizeof text);
    if (n < 2 || text[0] != '{' || text[n - 1] != '}') {
        buf_printf(b, "null");
        return;
    }
    for (char *p = text; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    buf_printf(b, "%s", text);
}

static void build_status(struct buf *b)
{
    char text[512], path[4096];

    bool ready = lm_run_path(path, sizeof path, "ready") == 0 && access(path, F_OK) == 0;
    if (read_run_file("workload", text, sizeof text) < 0)
        text[0] = '\0';
    double uptime = 0;
    char up[128];
    if (lm_read_file("/proc/uptime", up, sizeof up) > 0)
        uptime = strtod(up, NULL);
    buf_printf(b, "{\"ready\": %s, \"workload\": ", ready ? "true" : "false");
    buf_json_string(b, text);
    buf_printf(b, ", \"uptime_s\": %.2f, \"stats\": {", uptime);

    bool first = true;
    if (lm_run_path(path, sizeof path, "stats") == 0) {
        DIR *dir = opendir(path);
        struct dirent *de;
        while (dir && (de = readdir(dir))) {
            size_t len = strlen(de->d_name);
            /* Skips dot files and the .json.tmp files of a write in progress. */
            if (de->d_name[0] == '.' || len <= 5 || strcmp(de->d_name + len - 5, ".json") != 0)
                continue;
            buf_printf(b, "%s", first ? "" : ", ");
            first = false;
            char prog[256];
            snprintf(prog, sizeof prog, "%.*s", (int)(len - 5), de->d_name);
            buf_json_string(b, prog);
            buf_printf(b, ": ");
            append_stats_file(b, de->d_name);
        }
        if (dir)
            closedir(dir);
    }
    buf_printf(b, "}}");
}

static void reply_status(struct buf *out)
{
    buf_printf(out, "ok ");
    build_status(out);
    if (out->overflow) {
        out->len = 0;
        out->overflow = false;
        buf_printf(out, "err status too large");
    }
}

/* full_verifies from stats/mmuncher.json, or -1. The file is our own fixed format,
 * so looking for the quoted key is parse enough. */
static long long read_full_verifies(void)
{
    char text[MAX_STATS_FILE];
    if (read_run_file("stats/mmuncher.json", text, sizeof text) < 0)
        return -1;
    const char *p = strstr(text, "\"full_verifies\":");
    return p ? strtoll(p + strlen("\"full_verifies\":"), NULL, 10) : -1;
}

static pid_t read_mmuncher_pid(void)
{
    char text[32];
    if (read_run_file("mmuncher.pid", text, sizeof text) <= 0)
        return -1;
    char *end;
    long pid = strtol(text, &end, 10);
    if (*end || pid <= 1)
        return -1;
    /* The pid file may outlive an mmuncher that was killed outright. */
    return kill((pid_t)pid, 0) == 0 ? (pid_t)pid : -1;
}

static void do_verify(struct buf *out)
{
    pid_t pid = read_mmuncher_pid();
    if (pid < 0) {
        buf_printf(out, "err no mmuncher");
        return;
    }
    /* Stats not written yet (mmuncher still initialising) count as 0 verifies done. */
    long long before = read_full_verifies();
    if (before < 0)
        before = 0;
    if (kill(pid, SIGUSR1) < 0) {
        buf_printf(out, "err no mmuncher");
        return;
    }
    uint64_t deadline = lm_now_ns() + VERIFY_TIMEOUT_NS;
    while (read_full_verifies() <= before) {
        if (lm_now_ns() >= deadline) {
            buf_printf(out, "err verify timed out");
            return;
        }
        if (kill(pid, 0) < 0) {
            buf_printf(out, "err no mmuncher");
            return;
        }
        lm_sleep_ns(VERIFY_POLL_NS);
    }
    reply_status(out);
}

/* Runs arping with args after "arping"; returns its exit status, or -1 with why set. */
static int run_arping(const char *mode, const char *ip, char *why, size_t why_size)
{
    char *argv[] = {"arping", "-q", (char *)mode, "-c", "1", "-I", (char *)iface, (char *)ip, NULL};
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(why, why_size, "fork: %s", strerror(errno));
        return -1;
    }
    if (pid == 0) {
        execvp("arping", argv);
        /* An initramfs may have busybox without the applet links. */
        char *bb_argv[] = {"busybox", "arping", "-q", (char *)mode, "-c", "1", "-I",
                           (char *)iface, (char *)ip, NULL};
        execvp("busybox", bb_argv);
        _exit(127);
    }
    /* arping should be done in a blink; one that hangs must not hang the agent. */
    uint64_t deadline = lm_now_ns() + ARPING_TIMEOUT_NS;
    for (;;) {
        int status;
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) {
            if (WIFEXITED(status))
                return WEXITSTATUS(status);
            snprintf(why, why_size, "%s killed by signal %d", mode, WTERMSIG(status));
            return -1;
        }
        if (r < 0 && errno != EINTR) {
            snprintf(why, why_size, "waitpid: %s", strerror(errno));
            return -1;
        }
        if (lm_now_ns() >= deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            snprintf(why, why_size, "%s timed out", mode);
            return -1;
        }
        lm_sleep_ns(RETRY_NS);
    }
}

static void do_announce(struct buf *out)
{
    char ip[64], why[128];
    struct in_addr addr;
    /* The address goes onto a command line: only a dotted quad is let through. */
    if (read_run_file("ip", ip, sizeof ip) < 0 || inet_pton(AF_INET, ip, &addr) != 1) {
        buf_printf(out, "err arping failed: no valid address in %s/ip", lm_run_dir());
        return;
    }
    /* Gratuitous request first (updates caches that ignore replies), then reply. */
    const char *modes[] = {"-U", "-A"};
    for (int i = 0; i < 2; i++) {
        int rc = run_arping(modes[i], ip, why, sizeof why);
        if (rc < 0) {
            buf_printf(out, "err arping failed: %s", why);
            return;
        }
        if (rc != 0) {
            buf_printf(out, "err arping failed: %s exited %d", modes[i], rc);
            return;
        }
    }
    buf_printf(out, "ok announced");
}

static int is_token(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static void handle_request(const char *line, size_t len, struct buf *out)
{
#define IS(cmd) (len == sizeof(cmd) - 1 && memcmp(line, cmd, len) == 0)
    if (IS("ping"))
        buf_printf(out, "ok pong");
    else if (len > 5 && len <= 69 && memcmp(line, "ping ", 5) == 0 && is_token(line + 5, len - 5))
        /* The host's resynchronisation after a timeout: a fresh token tells this pong
         * apart from the replies to requests the host has given up on. */
        buf_printf(out, "ok pong %.*s", (int)(len - 5), line + 5);
    else if (IS("status"))
        reply_status(out);
    else if (IS("verify"))
        do_verify(out);
    else if (IS("announce"))
        do_announce(out);
    else
        buf_printf(out, "err unknown request");
#undef IS
}

/* Best effort: with no host on the port a blocking write would wait for one forever,
 * so the fd is non-blocking and a reply nobody takes within a second is dropped. */
static void send_reply(int fd, struct buf *out)
{
    out->data[out->len++] = '\n';
    const char *p = out->data;
    size_t left = out->len;
    while (left > 0) {
        ssize_t n = write(fd, p, left);
        if (n > 0) {
            p += n;
            left -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return;
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        if (poll(&pfd, 1, WRITE_TIMEOUT_MS) <= 0 || (pfd.revents & (POLLHUP | POLLERR)))
            return;
    }
}

static bool find_port(char *dev, size_t size)
{
    DIR *dir = opendir(VPORT_SYSFS);
    if (!dir)
        return false;
    bool found = false;
    struct dirent *de;
    while (!found && (de = readdir(dir))) {
        char path[512], name[128];
        if (de->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, VPORT_SYSFS "/%s/name", de->d_name);
        if (lm_read_file(path, name, sizeof name) < 0)
            continue;
        strip_trailing_space(name);
        if (strcmp(name, PORT_NAME) == 0) {
            snprintf(dev, size, "/dev/%s", de->d_name);
            found = true;
        }
    }
    closedir(dir);
    return found;
}

static int open_port(const char *override)
{
    char dev[300];
    bool said = false;
    for (;;) {
        if (override)
            snprintf(dev, sizeof dev, "%s", override);
        if (override || find_port(dev, sizeof dev)) {
            int fd = open(dev, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
            if (fd >= 0) {
                fprintf(stderr, "lm-agent: serving on %s\n", dev);
                return fd;
            }
            if (!said)
                fprintf(stderr, "lm-agent: cannot open %s: %s; retrying\n", dev, strerror(errno));
        } else if (!said) {
            fprintf(stderr, "lm-agent: no virtio port named " PORT_NAME " yet; retrying\n");
        }
        /* The device may still be probing at boot; there is nothing else to do. */
        said = true;
        lm_sleep_ns(100 * 1000 * 1000);
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: lm-agent [-p PORT_PATH] [-i IFACE]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *port_path = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "p:i:")) != -1) {
        switch (opt) {
        case 'p': port_path = optarg; break;
        case 'i': iface = optarg; break;
        default: usage();
        }
    }
    if (optind != argc)
        usage();

    signal(SIGPIPE, SIG_IGN);
    /* The kernel starts init with no PATH, and execvp's fallback lacks the sbin
     * directories where arping lives. */
    if (!getenv("PATH"))
        setenv("PATH", "/sbin:/usr/sbin:/bin:/usr/bin", 1);

    int fd = open_port(port_path);
    /* A pty (host tests) would echo requests back and turn \n into \r\n. */
    struct termios tio;
    if (tcgetattr(fd, &tio) == 0) {
        cfmakeraw(&tio);
        if (tcsetattr(fd, TCSANOW, &tio) < 0)
            lm_die("cannot make the port raw");
    }

    char line[MAX_LINE];
    size_t len = 0;
    bool overlong = false;
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            lm_die("poll");
        }
        char chunk[512];
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            continue;
        if (n <= 0) {
            /* No host (EOF, or EIO on a pty). A half line from the host that left
             * must not prefix the next host's first request. */
            len = 0;
            overlong = false;
            lm_sleep_ns(RETRY_NS);
            continue;
        }
        for (ssize_t i = 0; i < n; i++) {
            char c = chunk[i];
            if (c != '\n') {
                if (len == sizeof line)
                    overlong = true;
                else if (!overlong)
                    line[len++] = c;
                continue;
            }
            struct buf *out = calloc(1, sizeof *out);
            if (!out)
                lm_die("calloc");
            if (overlong)
                buf_printf(out, "err line too long");
            else
                handle_request(line, len > 0 && line[len - 1] == '\r' ? len - 1 : len, out);
            send_reply(fd, out);
            free(out);
            len = 0;
            overlong = false;
        }
    }
}
