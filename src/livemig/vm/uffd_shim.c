/*
 * livemig's preload shim for QEMU: turns on the kernel's dirty log over the guest's RAM.
 *
 * QEMU is started with LD_PRELOAD of this library (see livemig.vm.dirtylog). We wrap
 * mmap/mmap64; when QEMU maps the VM's RAM file MAP_SHARED (a /dev/shm/livemig-...ram
 * file, named by livemig.paths.ram_file), we register that range with userfaultfd in
 * write-protect mode, with asynchronous write faults (UFFD_FEATURE_WP_ASYNC). From then
 * on the kernel itself keeps a "written since last re-armed" bit per page in QEMU's page
 * tables, which livemig reads and re-arms from outside with the PAGEMAP_SCAN ioctl on
 * /proc/PID/pagemap. No fault ever reaches user space, so nothing here needs a thread.
 *
 * Why a preload shim and not a patch or a helper: userfaultfd registration only works
 * from inside the process that owns the mapping, and we run Debian's QEMU unchanged.
 *
 * Failure policy: this code runs inside the VM. Whatever goes wrong here (an old
 * kernel, no permission, an unexpected mapping) must not stop QEMU: we print one line
 * on stderr and carry on unregistered. livemig then finds no dirty log on the mapping
 * (its scan with PM_SCAN_CHECK_WPASYNC fails) and falls back to the shadow compare.
 *
 * The userfaultfd stays open for QEMU's whole life, on purpose: closing it would
 * unregister the range and drop the write protection, and with it the dirty log.
 *
 * QEMU's own postcopy registers the RAM with a userfaultfd of its own on the destination,
 * and a range can belong to one userfaultfd only: its UFFDIO_REGISTER would fail with
 * EBUSY and the migration with it. So we also wrap ioctl(), and when QEMU registers a
 * range that overlaps ours, ours yields first (one line on stderr). QEMU's own migration
 * is a baseline we measure against; it must work exactly as without us.
 *
 * One more duty, at load: QEMU is made non-dumpable. It starts as its unprivileged user
 * (livemig.vm.qemu), so nothing else would: a process that changed its uids is
 * non-dumpable by the kernel's rule, one exec'd as the user is not. Every QEMU runs as
 * the same user, and a dumpable one could be ptraced (its memory, its descriptors) by
 * any other QEMU a guest broke out into. Root (livemig reading /proc/PID/pagemap) still
 * may, with CAP_SYS_PTRACE.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

/* Debian 12's kernel headers (6.1) predate these; the values are the kernel's ABI. */
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

/* WP_ASYNC: a write to a protected page just unprotects it (that is the log), nobody
 * has to answer a fault. WP_HUGETLBFS_SHMEM: the RAM is shmem, which write protection
 * supports only with it. WP_UNPOPULATED: protection also holds where no page is mapped
 * yet (shmem keeps such markers anyway; anonymous memory only with this). A page QEMU
 * maps for the first time gets an unprotected entry, so the next scan reports it. */
#define LIVEMIG_FEATURES \
    (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED)

#define RAM_PREFIX "/dev/shm/livemig-"
#define RAM_SUFFIX ".ram"

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);
typedef int (*ioctl_fn)(int, unsigned long, ...);

static mmap_fn real_mmap;
static mmap_fn real_mmap64;
static ioctl_fn real_ioctl;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int uffd = -1;      /* one userfaultfd serves every registered range */
static int uffd_broken;    /* set once: no point retrying (and logging) at every mmap */

/* What we registered, to find it again when QEMU wants the range for itself. QEMU maps
 * its RAM file once; a few slots are plenty, and a range that finds no slot is simply
 * never given back (QEMU's register then fails as it would have anyway). */
#define MAX_RANGES 16
static struct { uintptr_t start, end; } ranges[MAX_RANGES];

static int call_ioctl(int fd, unsigned long request, void *arg)
{
    if (real_ioctl == NULL)
        real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    if (real_ioctl != NULL)
        return real_ioctl(fd, request, arg);
    return (int)syscall(SYS_ioctl, fd, request, arg);
}

static void complain(const char *what, const char *path, int err)
{
    /* One line, with a fixed prefix so that a person reading QEMU's stderr log knows
     * whose line it is and what it costs: tracking falls back to the slower compare. */
    fprintf(stderr, "livemig-shim: %s on %s failed: %s; livemig falls back to the shadow compare\n",
            what, path, strerror(err));
}

static int is_ram_file(int fd, char *path, size_t size)
{
    char link[64];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, size - 1);
    if (n <= 0)
        return 0;
    path[n] = '\0';
    size_t prefix = sizeof(RAM_PREFIX) - 1, suffix = sizeof(RAM_SUFFIX) - 1;
    /* An unlinked file reads as "... (deleted)" and fails the suffix test: nobody could
     * migrate that VM anyway. */
    return (size_t)n > prefix + suffix && strncmp(path, RAM_PREFIX, prefix) == 0 &&
           strcmp(path + n - suffix, RAM_SUFFIX) == 0;
}

/* Caller holds the lock. Returns 0, or an errno value. */
static int open_uffd(const char **what)
{
    /* Try with kernel-mode faults first. The async write-protect path never reaches
     * handle_userfault(), so UFFD_USER_MODE_ONLY would change nothing for us; it only
     * matters because vm.unprivileged_userfaultfd=0 lets an unprivileged QEMU open a
     * userfaultfd with that flag and no other way. */
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && errno == EPERM)
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0) {
        *what = "userfaultfd()";
        return errno;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = LIVEMIG_FEATURES};
    if (call_ioctl(fd, UFFDIO_API, &api) < 0) {
        int err = errno;
        close(fd);
        *what = "UFFDIO_API with WP_ASYNC|WP_HUGETLBFS_SHMEM|WP_UNPOPULATED";
        return err;
    }
    uffd = fd;
    return 0;
}

static void maybe_register(void *addr, size_t len, int flags, int fd)
{
    char path[4096];
    int type = flags & MAP_TYPE;
    /* MAP_SHARED_VALIDATE is how QEMU asks for MAP_SYNC; it is still a shared mapping. */
    if (fd < 0 || (type != MAP_SHARED && type != MAP_SHARED_VALIDATE))
        return;
    if (!is_ram_file(fd, path, sizeof(path)))
        return;

    int saved_errno = errno; /* the caller of mmap() must see mmap's errno, not ours */
    pthread_mutex_lock(&lock);
    const char *what = "UFFDIO_REGISTER in write-protect mode";
    int err = 0;
    if (uffd_broken) {
        pthread_mutex_unlock(&lock);
        errno = saved_errno;
        return;
    }
    if (uffd < 0)
        err = open_uffd(&what);
    if (err == 0) {
        /* QEMU maps whole pages; round anyway, the kernel refuses unaligned lengths. */
        long page = sysconf(_SC_PAGESIZE);
        struct uffdio_register reg = {
            .range = {.start = (uintptr_t)addr,
                      .len = (len + (size_t)page - 1) & ~((size_t)page - 1)},
            .mode = UFFDIO_REGISTER_MODE_WP,
        };
        if (call_ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
            what = "UFFDIO_REGISTER in write-protect mode";
            err = errno;
        } else {
            for (int i = 0; i < MAX_RANGES; i++) {
                if (ranges[i].end == 0) {
                    ranges[i].start = reg.range.start;
                    ranges[i].end = reg.range.start + reg.range.len;
                    break;
                }
            }
        }
    } else {
        uffd_broken = 1;
    }
    pthread_mutex_unlock(&lock);
    if (err)
        complain(what, path, err);
    errno = saved_errno;
}

static void *call_mmap(mmap_fn *slot, const char *name, void *addr, size_t len, int prot,
                       int flags, int fd, off_t off)
{
    if (*slot == NULL)
        *slot = (mmap_fn)dlsym(RTLD_NEXT, name);
    if (*slot != NULL)
        return (*slot)(addr, len, prot, flags, fd, off);
    /* dlsym can only fail if libc is odd; the raw syscall is what glibc does on x86-64. */
    long ret = syscall(SYS_mmap, addr, len, prot, flags, fd, off);
    return (void *)ret;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    void *p = call_mmap(&real_mmap, "mmap", addr, len, prot, flags, fd, off);
    if (p != MAP_FAILED)
        maybe_register(p, len, flags, fd);
    return p;
}

/* On x86-64 glibc, mmap64 is the same function under a second name; QEMU may bind to
 * either, so both must be ours. */
void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    void *p = call_mmap(&real_mmap64, "mmap64", addr, len, prot, flags, fd, off);
    if (p != MAP_FAILED)
        maybe_register(p, len, flags, fd);
    return p;
}

/* Give up our registration of whatever overlaps a range QEMU registers itself. */
static void yield_to(const struct uffdio_register *theirs)
{
    uintptr_t start = theirs->range.start, end = start + theirs->range.len;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_RANGES; i++) {
        if (ranges[i].end == 0 || ranges[i].end <= start || end <= ranges[i].start)
            continue;
        struct uffdio_range ours = {.start = ranges[i].start,
                                    .len = ranges[i].end - ranges[i].start};
        int failed = call_ioctl(uffd, UFFDIO_UNREGISTER, &ours) < 0;
        int err = errno;
        ranges[i].start = ranges[i].end = 0;
        if (failed)
            complain("UFFDIO_UNREGISTER (QEMU registers the RAM itself)", "guest RAM", err);
        else
            fprintf(stderr, "livemig-shim: QEMU registers its own userfaultfd on the guest "
                            "RAM (postcopy?); livemig's dirty log gives way to it\n");
    }
    pthread_mutex_unlock(&lock);
}

int ioctl(int fd, unsigned long request, ...)
{
    /* Every ioctl argument we care about is one pointer; the kernel ABI passes one
     * machine word in any case, so forwarding it as a pointer is exact. */
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (request == UFFDIO_REGISTER && fd != uffd && arg != NULL) {
        int saved_errno = errno;
        yield_to((const struct uffdio_register *)arg);
        errno = saved_errno;
    }
    return call_ioctl(fd, request, arg);
}

__attribute__((constructor)) static void resolve(void)
{
    /* Resolve before any thread exists, so that the lazy paths above are only fallbacks. */
    real_mmap = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
    real_mmap64 = (mmap_fn)dlsym(RTLD_NEXT, "mmap64");
    real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    /* Before QEMU runs any code of its own, let alone a guest. It cannot fail for a
     * valid argument, and if it did, QEMU would still be worth starting. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
        complain("prctl(PR_SET_DUMPABLE, 0)", "QEMU", errno);
}
