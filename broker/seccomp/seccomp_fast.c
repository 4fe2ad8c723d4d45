/*
 * The seccomp agent's per-call loop, in C: the part of seccomp mode that
 * runs on every stopped call, where a round trip through the broker's
 * Python would cost hundreds of microseconds (docs/benchmarks.md).
 *
 * The broker (seccomp/agent.py) runs graft_fast_serve on a thread of its own for
 * each notify fd. The loop receives every notification and answers those
 * whose answer needs no policy decision:
 *
 *   - a call naming no inet address, or on a socket that is not inet;
 *   - a call on a host socket, which the kernel's confinement judges
 *     itself (it carries a mark), and a TCP sendto (the container's stack,
 *     as the broker would answer);
 *   - a grafted UDP socket's datagram to a destination its tenant's UDP
 *     grants already cover;
 *   - a TCP connect to a destination the broker has granted the tenant:
 *     a pre-issued host socket (unconnected, marked for the tenant's grants,
 *     issued by the broker) replaces the app's socket on its own fd number,
 *     and the app's connect runs on it. The kernel's connect program checks
 *     the grant again, locks the socket to that destination and writes the
 *     audit record, exactly as for the shim's fast path.
 *
 * Everything else goes to the broker (HANDOFF), which decides with the same
 * code as for a shim. The loop never decides: a grant is a verdict the
 * broker already made, and the kernel enforces it whatever the loop does.
 * When a pool runs low the loop asks the broker for more (REFILL); a refused
 * refill holds further requests off for 1 s, doubling to 64 s.
 */
#define _GNU_SOURCE
#include "seccomp_fast.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL /* Linux 6.9 */
#endif
#ifndef SO_BUF_LOCK
#define SO_BUF_LOCK 72
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

_Static_assert(sizeof(struct seccomp_notif) == GRAFT_FAST_NOTIF_SIZE, "struct seccomp_notif changed size");

enum {
    POOL_CAP = 2 * GRAFT_FAST_POOL_MAX,
    /* Ask for another batch when a pool is down to one: the reply has a batch of connects to come in
     * (at 4, most replies came after the pool was dry, and those connects went to the broker). */
    LOW_WATER = GRAFT_FAST_POOL_MAX,
    MAX_OPTS = GRAFT_FAST_MAX_OPTS,
    OPT_MAX_SIZE = 16,
};
static const int64_t HOLDOFF_MIN_NS = 1000000000LL, HOLDOFF_MAX_NS = 64000000000LL;
static const int64_t REFILL_TIMEOUT_NS = 5000000000LL; /* the broker answers a refill in ms */

/* After a refused refill, that uid waits before it asks again (from HOLDOFF_MIN_NS, doubling): a
 * refusal is audited, and a process the policy's uids leave out would otherwise ask at every
 * connect. Kept per uid, so that it never holds back the uids the broker does issue sockets to;
 * a few slots, the one that frees soonest reused. */
enum { HOLDOFF_SLOTS = 4 };
struct holdoff {
    uint32_t uid;
    int64_t until; /* CLOCK_MONOTONIC ns */
    int64_t ns;    /* 0: a free slot */
};

/* Pre-issued TCP sockets of one family, all issued for one uid and grant id. */
struct pool {
    int family;
    int fds[POOL_CAP];
    unsigned n;
    uint32_t uid, grant_id;
    bool filled_once;      /* grant_id and uid are known */
    bool refilling;        /* a REFILL is out and unanswered... */
    int64_t refill_sent;   /* ...since then (a lost answer must not stop refills for good) */
    struct holdoff holdoffs[HOLDOFF_SLOTS];
    /* A fresh socket's value of each allowlisted option (read from the first socket used). */
    bool have_defaults;
    bool has_default[MAX_OPTS];
    socklen_t default_len[MAX_OPTS];
    uint8_t defaults[MAX_OPTS][OPT_MAX_SIZE];
};

/* Files the loop keeps open between calls, by two numbers: opening them costs more than using them. */
enum { CACHE_SIZE = 16 };
struct cache {
    struct {
        uint32_t a, b;
        int fd; /* -1: empty */
    } e[CACHE_SIZE];
    unsigned next; /* the entry replaced next (round robin) */
};

static void cache_init(struct cache *c) {
    for (unsigned i = 0; i < CACHE_SIZE; i++)
        c->e[i].fd = -1;
}

static int cache_find(const struct cache *c, uint32_t a, uint32_t b) {
    for (unsigned i = 0; i < CACHE_SIZE; i++)
        if (c->e[i].fd >= 0 && c->e[i].a == a && c->e[i].b == b)
            return c->e[i].fd;
    return -1;
}

static void cache_put(struct cache *c, uint32_t a, uint32_t b, int fd) {
    unsigned i = 0;
    while (i < CACHE_SIZE && c->e[i].fd >= 0)
        i++;
    if (i == CACHE_SIZE) { /* full: replace round robin */
        i = c->next++ % CACHE_SIZE;
        close(c->e[i].fd);
    }
    c->e[i].a = a;
    c->e[i].b = b;
    c->e[i].fd = fd;
}

static void cache_drop(struct cache *c, int fd) {
    for (unsigned i = 0; i < CACHE_SIZE; i++)
        if (c->e[i].fd == fd) {
            close(fd);
            c->e[i].fd = -1;
        }
}

static void cache_clear(struct cache *c) {
    for (unsigned i = 0; i < CACHE_SIZE; i++)
        if (c->e[i].fd >= 0)
            close(c->e[i].fd);
    cache_init(c);
}

/* Host TCP sockets seen on a thread's fd, by socket cookie: every later connect or sendto on one
 * goes on (the kernel judges it), so a program that names the address on every send (sockperf does,
 * on TCP) costs a getfd and one getsockopt per call, not the address, three getsockopts and the mark. */
enum { KNOWN_SIZE = 16 };
struct known {
    uint32_t tid;
    int fd;
    uint64_t cookie; /* 0: empty */
};

struct loop {
    const struct graft_fast_config *cfg;
    struct graft_fast_stats *stats;
    struct pool pools[2]; /* AF_INET, AF_INET6 */
    uint32_t inner_id;    /* the tenant grant map last looked up, by map id, and an fd of it */
    int inner_fd;
    struct known known[KNOWN_SIZE];
    unsigned known_next;
    struct cache pidfds;  /* thread id -> its pidfd */
    struct cache fdinfos; /* (thread id, fd) -> /proc/<tid>/fdinfo/<fd> */
};

/* What answering a call found out besides the answer: a pool to refill. */
struct refill {
    struct pool *pool;
    uint32_t uid;
    uint32_t pid;
};

enum outcome { ANSWERED, HANDOFF };

static void count(uint64_t *counter) { __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void close_keep_errno(int fd) {
    int saved = errno;
    close(fd);
    errno = saved;
}

/* ---- the kernel maps ---------------------------------------------------------------- */

static int map_lookup(int map_fd, const void *key, void *value) {
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_fd = (uint32_t)map_fd;
    a.key = (uintptr_t)key;
    a.value = (uintptr_t)value;
    return syscall(SYS_bpf, BPF_MAP_LOOKUP_ELEM, &a, sizeof a) < 0 ? -errno : 0;
}

/* The grants key the kernel's programs build (maps.grant_key). */
static void grant_key(struct graft_grant_key *k, uint32_t grant_id, int type, const struct sockaddr_storage *sa) {
    memset(k, 0, sizeof *k);
    uint32_t family = sa->ss_family;
    k->tenant = grant_id;
    if (family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        k->port = in->sin_port;
        memcpy(k->addr, &in->sin_addr, 4);
    } else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        k->port = in6->sin6_port;
        if (type == SOCK_DGRAM && IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            family = AF_INET; /* a datagram to a v4-mapped address runs the IPv4 hook */
            memcpy(k->addr, &in6->sin6_addr.s6_addr[12], 4);
        } else {
            memcpy(k->addr, &in6->sin6_addr, 16);
        }
    }
    k->kind = (uint32_t)type << 16 | family;
}

/* CLOCK_MONOTONIC in whole seconds: the clock a grant's expires is in (bpf_ktime_get_ns). */
static uint64_t monotonic_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec;
}

/* 1: granted, 0: not, -ENOENT: the grant id has no map (retired by a reload), -errno otherwise. */
static int granted(struct loop *l, uint32_t grant_id, int type, const struct sockaddr_storage *sa) {
    uint32_t id;
    int r = map_lookup(l->cfg->grants_fd, &grant_id, &id); /* a map of maps gives the inner map's id */
    if (r < 0)
        return r;
    if (l->inner_fd < 0 || id != l->inner_id) {
        /* A reload swaps a tenant's map for an empty one: follow the id, never a stale fd. */
        if (l->inner_fd >= 0)
            close(l->inner_fd);
        union bpf_attr a;
        memset(&a, 0, sizeof a);
        a.map_id = id;
        a.open_flags = BPF_F_RDONLY;
        l->inner_fd = (int)syscall(SYS_bpf, BPF_MAP_GET_FD_BY_ID, &a, sizeof a);
        if (l->inner_fd < 0) /* swapped again since the lookup: not retired, only changing (-EAGAIN) */
            return errno == ENOENT ? -EAGAIN : -errno;
        l->inner_id = id;
    }
    struct graft_grant_key key;
    struct graft_grant_value value;
    grant_key(&key, grant_id, type, sa);
    r = map_lookup(l->inner_fd, &key, &value);
    if (r != 0)
        return r == -ENOENT ? 0 : r;
    return value.expires == 0 || monotonic_seconds() < value.expires; /* lapsed: as the kernel's programs judge */
}

/* ---- the stopped thread --------------------------------------------------------------- */

/* A pidfd of the stopped thread, or -1; fresh: not one kept from an earlier call. */
static int thread_pidfd(struct loop *l, uint32_t tid, bool fresh) {
    int fd = cache_find(&l->pidfds, tid, 0);
    if (fd >= 0 && !fresh)
        return fd;
    if (fd >= 0)
        cache_drop(&l->pidfds, fd);
    /* Before Linux 6.9 (EINVAL) only a process has one: the broker finds the thread's process. */
    fd = (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
    if (fd >= 0)
        cache_put(&l->pidfds, tid, 0, fd);
    return fd;
}

/* A copy of the app's fd (the call's first argument), or -1. A kept pidfd may be of a thread that
 * has exited since, whose id the caller now has (ESRCH): then a fresh one. */
static int take_fd(struct loop *l, uint32_t tid, int fd, int *pidfd) {
    for (int fresh = 0; fresh < 2; fresh++) {
        if ((*pidfd = thread_pidfd(l, tid, fresh)) < 0)
            return -1;
        int copy = (int)syscall(SYS_pidfd_getfd, *pidfd, fd, 0);
        if (copy >= 0 || errno != ESRCH)
            return copy;
    }
    return -1;
}

/* A small /proc file of the thread, NUL-terminated; length or -1. */
static ssize_t read_proc(uint32_t tid, const char *what, char *buf, size_t size) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%u/%s", tid, what);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = 0;
    return n;
}

/* <linux/pidfd.h> of Linux 6.13 (PIDFD_INFO_SIZE_VER0), which this machine's headers may predate. */
struct pidfd_info_v0 {
    uint64_t mask;
    uint64_t cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
    int32_t exit_code;
};
#define PIDFD_GET_INFO_V0 _IOWR(0xFF, 11, struct pidfd_info_v0)
#define PIDFD_INFO_CREDS_BIT 2

/* The thread's effective uid: from its pidfd (Linux 6.13), else from /proc/<tid>/status as the broker
 * reads it (not the /proc directory's owner, which is root for a non-dumpable process). */
static int effective_uid(int pidfd, uint32_t tid, uint32_t *uid) {
    struct pidfd_info_v0 info = {.mask = PIDFD_INFO_CREDS_BIT};
    if (ioctl(pidfd, PIDFD_GET_INFO_V0, &info) == 0 && (info.mask & PIDFD_INFO_CREDS_BIT)) {
        *uid = info.euid;
        return 0;
    }
    char buf[4096];
    if (read_proc(tid, "status", buf, sizeof buf) < 0)
        return -1;
    const char *line = strstr(buf, "\nUid:");
    unsigned real, effective;
    if (line == NULL || sscanf(line + 5, "%u %u", &real, &effective) != 2)
        return -1;
    *uid = effective;
    return 0;
}

/* Whether the app's fd is close-on-exec, in the calling thread's own fd table (fdinfo's flags): the
 * host socket keeps that. The thread's, not its process's: the main thread may have exited, or this
 * one may have a table of its own (unshare(CLONE_FILES)). An fdinfo file kept open shows the fd as
 * it is when read, whatever file has the number by then. */
static bool cloexec(struct loop *l, uint32_t tid, int fd) {
    char buf[512];
    for (int attempt = 0; attempt < 2; attempt++) {
        int f = cache_find(&l->fdinfos, tid, (uint32_t)fd);
        if (f < 0) {
            char path[64];
            snprintf(path, sizeof path, "/proc/%u/fdinfo/%d", tid, fd);
            if ((f = open(path, O_RDONLY | O_CLOEXEC)) < 0)
                return false;
            cache_put(&l->fdinfos, tid, (uint32_t)fd, f);
        }
        ssize_t n = pread(f, buf, sizeof buf - 1, 0);
        if (n < 0) { /* of a thread that has exited (its id may be another's now) */
            cache_drop(&l->fdinfos, f);
            continue;
        }
        buf[n] = 0;
        const char *line = strstr(buf, "flags:");
        unsigned flags;
        return line != NULL && sscanf(line + 6, "%o", &flags) == 1 && (flags & O_CLOEXEC);
    }
    return false;
}

/* ---- answers ------------------------------------------------------------------------- */

static uint64_t cookie_of(int sock) {
    uint64_t cookie = 0;
    socklen_t len = sizeof cookie;
    return getsockopt(sock, SOL_SOCKET, SO_COOKIE, &cookie, &len) == 0 ? cookie : 0;
}

static struct known *known_slot(struct loop *l, uint32_t tid, int fd) {
    for (unsigned i = 0; i < KNOWN_SIZE; i++)
        if (l->known[i].cookie && l->known[i].tid == tid && l->known[i].fd == fd)
            return &l->known[i];
    return NULL;
}

static void remember_host_tcp(struct loop *l, uint32_t tid, int fd, int sock) {
    struct known *k = known_slot(l, tid, fd);
    if (k == NULL)
        k = &l->known[l->known_next++ % KNOWN_SIZE];
    *k = (struct known){tid, fd, cookie_of(sock)};
}

/* Whether the call's fd still holds the host TCP socket seen there before (the number may have been
 * closed and reused, or dup2'ed over, since). */
static bool still_host_tcp(struct loop *l, uint32_t tid, int fd) {
    struct known *k = known_slot(l, tid, fd);
    if (k == NULL)
        return false;
    int pidfd, sock = take_fd(l, tid, fd, &pidfd);
    uint64_t cookie = sock >= 0 ? cookie_of(sock) : 0;
    if (sock >= 0)
        close(sock);
    if (cookie != 0 && cookie == k->cookie)
        return true;
    k->cookie = 0;
    return false;
}

static void respond_continue(struct loop *l, const struct seccomp_notif *req) {
    struct seccomp_notif_resp resp = {.id = req->id, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE};
    /* ENOENT: the thread is gone or its call was interrupted; nothing to answer. */
    ioctl(l->cfg->notify_fd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
}

/* The call goes on as it was: nothing of it is the broker's to change. */
static enum outcome go_on(struct loop *l, const struct seccomp_notif *req) {
    respond_continue(l, req);
    count(&l->stats->continued);
    return ANSWERED;
}

/* The app's allowlisted options on the host socket (sockopts.copy_options, which says why). */
static void copy_options(struct loop *l, struct pool *p, int src, int dst) {
    const struct graft_fast_config *c = l->cfg;
    uint32_t n = c->n_opts < MAX_OPTS ? c->n_opts : MAX_OPTS;
    if (!p->have_defaults) { /* dst is fresh: nothing was set on it */
        for (uint32_t i = 0; i < n; i++) {
            socklen_t len = (socklen_t)c->opts[i].size;
            p->has_default[i] = len <= OPT_MAX_SIZE &&
                                getsockopt(dst, c->opts[i].level, c->opts[i].name, p->defaults[i], &len) == 0;
            p->default_len[i] = len;
        }
        p->have_defaults = true;
    }
    int locks = 0;
    socklen_t locks_len = sizeof locks;
    if (getsockopt(src, SOL_SOCKET, SO_BUF_LOCK, &locks, &locks_len) < 0)
        locks = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct graft_fast_opt *o = &c->opts[i];
        if (!p->has_default[i] || (o->lock_bit && !(locks & o->lock_bit)))
            continue;
        uint8_t value[OPT_MAX_SIZE];
        socklen_t len = p->default_len[i];
        if (getsockopt(src, o->level, o->name, value, &len) < 0)
            continue;
        if (o->lock_bit) {
            int size;
            memcpy(&size, value, sizeof size);
            size /= 2; /* getsockopt reports twice what was set */
            memcpy(value, &size, sizeof size);
        } else if (len == p->default_len[i] && memcmp(value, p->defaults[i], len) == 0) {
            continue;
        }
        setsockopt(dst, o->level, o->name, value, len); /* refused: as the broker, go on without it */
    }
}

static void flush(struct pool *p) {
    while (p->n > 0)
        close(p->fds[--p->n]);
}

static struct holdoff *holdoff_of(struct pool *p, uint32_t uid) {
    for (unsigned i = 0; i < HOLDOFF_SLOTS; i++)
        if (p->holdoffs[i].ns && p->holdoffs[i].uid == uid)
            return &p->holdoffs[i];
    return NULL;
}

/* The broker refused the refill it was asked for: that uid waits, twice as long as last time. */
static void hold_off(struct pool *p, uint32_t uid) {
    struct holdoff *h = holdoff_of(p, uid);
    if (h == NULL) {
        h = &p->holdoffs[0];
        for (unsigned i = 1; i < HOLDOFF_SLOTS && h->ns; i++)
            if (!p->holdoffs[i].ns || p->holdoffs[i].until < h->until)
                h = &p->holdoffs[i];
        *h = (struct holdoff){.uid = uid};
    }
    h->ns = h->ns ? h->ns * 2 : HOLDOFF_MIN_NS;
    if (h->ns > HOLDOFF_MAX_NS)
        h->ns = HOLDOFF_MAX_NS;
    h->until = now_ns() + h->ns;
}

static void want_refill(struct pool *p, uint32_t uid, uint32_t pid, struct refill *out) {
    int64_t now = now_ns();
    if (p->refilling && now - p->refill_sent < REFILL_TIMEOUT_NS)
        return;
    struct holdoff *h = holdoff_of(p, uid);
    if (h != NULL && now < h->until)
        return;
    p->refilling = true;
    p->refill_sent = now;
    *out = (struct refill){p, uid, pid};
}

/* A TCP connect from the container: a pre-issued host socket if the destination is granted. */
static enum outcome connect_fast(struct loop *l, const struct seccomp_notif *req, int pidfd, int app, int family,
                                 const struct sockaddr_storage *sa, struct refill *refill) {
    struct pool *p = &l->pools[family == AF_INET6];
    uint32_t uid;
    if (effective_uid(pidfd, req->pid, &uid) < 0)
        return HANDOFF;
    if (p->n == 0) {
        /* Also the first connect: the pool's grant id is not known before the broker issues it. */
        want_refill(p, uid, req->pid, refill);
        return HANDOFF;
    }
    if (uid != p->uid)
        return HANDOFF; /* issued for another uid, which the broker judged; this one it has not */
    int g = granted(l, p->grant_id, SOCK_STREAM, sa);
    if (g == -ENOENT) { /* a reload retired the pool's grant id: its sockets can connect nowhere */
        flush(p);
        want_refill(p, uid, req->pid, refill);
        return HANDOFF;
    }
    if (g != 1)
        return HANDOFF;
    /* The pid, fd and uid read above are this call's only if it is still pending. */
    if (ioctl(l->cfg->notify_fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id) < 0)
        return ANSWERED;
    int host = p->fds[--p->n];
    if (p->n <= LOW_WATER)
        want_refill(p, uid, req->pid, refill);
    copy_options(l, p, app, host);
    int app_flags = fcntl(app, F_GETFL), host_flags = fcntl(host, F_GETFL);
    if (app_flags >= 0 && host_flags >= 0)
        fcntl(host, F_SETFL, (host_flags & ~O_NONBLOCK) | (app_flags & O_NONBLOCK));
    int fd = (int)(uint32_t)req->data.args[0];
    struct seccomp_notif_addfd add = {
        .id = req->id,
        .flags = SECCOMP_ADDFD_FLAG_SETFD,
        .srcfd = (uint32_t)host,
        .newfd = (uint32_t)fd,
        .newfd_flags = cloexec(l, req->pid, fd) ? O_CLOEXEC : 0,
    };
    int r = ioctl(l->cfg->notify_fd, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
    close_keep_errno(host); /* the app has its own now (or, if it failed, nobody: the kernel counts the close) */
    if (r < 0)
        return errno == ENOENT || errno == ESRCH ? ANSWERED : HANDOFF;
    respond_continue(l, req); /* the app's own connect, judged by the kernel against the grant */
    count(&l->stats->installed);
    return ANSWERED;
}

/* The call, with a copy of the socket it is on: answer it, or leave it to the broker. */
static enum outcome on_socket(struct loop *l, const struct seccomp_notif *req, int pidfd, int sock, bool is_connect,
                              const struct sockaddr_storage *sa, struct refill *refill) {
    int domain, type, protocol;
    socklen_t len = sizeof(int);
    if (getsockopt(sock, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0 ||
        getsockopt(sock, SOL_SOCKET, SO_TYPE, &type, &len) < 0 ||
        getsockopt(sock, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) < 0)
        return HANDOFF; /* not a socket: the broker says what the kernel would */
    if ((domain != AF_INET && domain != AF_INET6) || (type != SOCK_STREAM && type != SOCK_DGRAM) ||
        sa->ss_family != domain)
        return go_on(l, req);
    bool tcp = type == SOCK_STREAM && protocol == IPPROTO_TCP, udp = type == SOCK_DGRAM && protocol == IPPROTO_UDP;
    if (!tcp && !udp)
        return HANDOFF; /* SCTP, MPTCP, UDP-Lite...: the broker's */
    struct graft_mark mark;
    int r = map_lookup(l->cfg->marks_fd, &sock, &mark);
    if (r == 0 && tcp && (mark.flags & (GRAFT_MARK_PREISSUED | GRAFT_MARK_HAS_DEST)) == GRAFT_MARK_PREISSUED) {
        /* Pre-issued by this loop, its connect refused by the kernel (the grant went between the
         * lookup and the connect): connected nowhere yet, and judged again unless granted now. */
        return is_connect && granted(l, mark.tenant, SOCK_STREAM, sa) == 1 ? go_on(l, req) : HANDOFF;
    }
    if (r == 0) { /* a host socket: the kernel holds it to what the broker judged */
        if (tcp)
            remember_host_tcp(l, req->pid, (int)(uint32_t)req->data.args[0], sock);
        if (tcp || mark.flags & GRAFT_MARK_ANY_PEER || !mark.tenant)
            return go_on(l, req);
        /* A UDP datagram or connect (which names where later sends go), as the kernel judges both. */
        return granted(l, mark.tenant, SOCK_DGRAM, sa) == 1 ? go_on(l, req) : HANDOFF;
    }
    if (r != -ENOENT || udp)
        return HANDOFF; /* a UDP socket's first destination is the broker's to judge */
    if (!is_connect)
        return go_on(l, req); /* a TCP sendto stays in the container's stack */
    return connect_fast(l, req, pidfd, sock, domain, sa, refill);
}

static enum outcome answer(struct loop *l, const struct seccomp_notif *req, struct refill *refill) {
    const struct seccomp_data *d = &req->data;
    bool is_connect = d->nr == l->cfg->nr_connect, is_sendto = d->nr == l->cfg->nr_sendto;
    if (d->arch != l->cfg->arch || !(is_connect || is_sendto))
        return HANDOFF;
    uint64_t ptr = is_connect ? d->args[1] : d->args[4];
    uint32_t len = (uint32_t)(is_connect ? d->args[2] : d->args[5]);
    if (ptr == 0 || len == 0)
        return go_on(l, req); /* names no address: nothing to judge */
    if (still_host_tcp(l, req->pid, (int)(uint32_t)d->args[0]))
        return go_on(l, req); /* whatever the address: as on_socket would answer */
    struct sockaddr_storage sa;
    memset(&sa, 0, sizeof sa);
    size_t want = len < sizeof(struct sockaddr_in6) ? len : sizeof(struct sockaddr_in6);
    struct iovec local = {&sa, want}, remote = {(void *)(uintptr_t)ptr, want};
    ssize_t got = process_vm_readv((pid_t)req->pid, &local, 1, &remote, 1, 0);
    if (got < (ssize_t)sizeof(sa.ss_family))
        return HANDOFF;
    if (sa.ss_family != AF_INET && sa.ss_family != AF_INET6)
        return go_on(l, req); /* nothing to judge */
    if (got < (ssize_t)(sa.ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6)))
        return HANDOFF;
    int pidfd;
    int sock = take_fd(l, req->pid, (int)(uint32_t)d->args[0], &pidfd);
    if (sock < 0)
        return HANDOFF; /* not an open fd: the broker lets the kernel answer */
    enum outcome o = on_socket(l, req, pidfd, sock, is_connect, &sa, refill);
    close(sock);
    return o;
}

/* ---- the control socket ----------------------------------------------------------------- */

static int send_msg(struct loop *l, const struct graft_fast_msg *m) {
    /* Blocks while the broker is behind: back-pressure, not loss. */
    return send(l->cfg->ctl_fd, m, sizeof *m, MSG_NOSIGNAL) == (ssize_t)sizeof *m ? 0 : -1;
}

/* A message from the broker; 0 when the control socket has closed. */
static int receive_pool(struct loop *l) {
    struct graft_fast_msg m;
    union {
        char buf[CMSG_SPACE(sizeof(int) * GRAFT_FAST_POOL_MAX)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {&m, sizeof m};
    struct msghdr h = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                       .msg_controllen = sizeof control.buf};
    ssize_t n = recvmsg(l->cfg->ctl_fd, &h, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0)
        return errno == EAGAIN || errno == EINTR;
    if (n == 0 && h.msg_controllen == 0)
        return 0;
    int fds[GRAFT_FAST_POOL_MAX];
    unsigned k = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&h); c != NULL; c = CMSG_NXTHDR(&h, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        unsigned count_here = (unsigned)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (unsigned i = 0; i < count_here; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (k < GRAFT_FAST_POOL_MAX)
                fds[k++] = fd;
            else
                close(fd);
        }
    }
    if (n != (ssize_t)sizeof m || m.kind != GRAFT_FAST_POOL || (m.family != AF_INET && m.family != AF_INET6)) {
        while (k > 0)
            close(fds[--k]); /* not from this broker's seccomp/agent.py */
        return 1;
    }
    struct pool *p = &l->pools[m.family == AF_INET6];
    p->refilling = false;
    if (k == 0 && (m.flags & GRAFT_FAST_POOL_AGAIN))
        return 1; /* not refused (the asking thread was gone): the next caller may ask */
    /* m.uid, not the uid the loop asked for: the broker judges the uid the process has when it
     * reads the request (a setuid since the connect that asked changes it), and that is the one
     * refused or issued for. */
    if (k == 0) { /* refused: max_sockets, max_rate, uids, no fast path */
        hold_off(p, m.uid);
        return 1;
    }
    struct holdoff *held = holdoff_of(p, m.uid);
    if (held != NULL)
        held->ns = 0; /* issued: this uid's next refusal waits the shortest time again */
    if (!p->filled_once || p->grant_id != m.grant_id || p->uid != m.uid) {
        flush(p); /* for another uid, or a grant id a reload has retired */
        if (p->grant_id != m.grant_id)
            p->have_defaults = false; /* perhaps another namespace, with other sysctls */
        p->grant_id = m.grant_id;
        p->uid = m.uid;
        p->filled_once = true;
    }
    for (unsigned i = 0; i < k; i++) {
        if (p->n < POOL_CAP)
            p->fds[p->n++] = fds[i];
        else
            close(fds[i]);
    }
    return 1;
}

/* One notification; -errno when the notify fd fails. */
static int serve_one(struct loop *l) {
    struct seccomp_notif req;
    memset(&req, 0, sizeof req); /* the kernel refuses anything else */
    if (ioctl(l->cfg->notify_fd, SECCOMP_IOCTL_NOTIF_RECV, &req) < 0)
        return errno == ENOENT || errno == EINTR ? 0 : -errno; /* ENOENT: the caller went away first */
    struct refill refill = {0};
    if (answer(l, &req, &refill) == HANDOFF) {
        struct graft_fast_msg m = {.kind = GRAFT_FAST_HANDOFF};
        memcpy(m.notif, &req, sizeof req);
        count(&l->stats->handed_off);
        if (send_msg(l, &m) < 0)
            return 0; /* the broker's end is closed: the loop ends at the next poll */
    }
    if (refill.pool != NULL) {
        struct graft_fast_msg m = {.kind = GRAFT_FAST_REFILL, .family = (uint32_t)refill.pool->family,
                                   .uid = refill.uid, .pid = refill.pid};
        if (send_msg(l, &m) < 0)
            refill.pool->refilling = false;
    }
    return 0;
}

EXPORT int graft_fast_serve(const struct graft_fast_config *cfg, struct graft_fast_stats *stats) {
    struct loop l = {.cfg = cfg, .stats = stats, .inner_fd = -1};
    cache_init(&l.pidfds);
    cache_init(&l.fdinfos);
    l.pools[0].family = AF_INET;
    l.pools[1].family = AF_INET6;
    /* Signals are the main thread's business (Python handles them there). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    struct pollfd fds[2] = {{.fd = cfg->notify_fd, .events = POLLIN}, {.fd = cfg->ctl_fd, .events = POLLIN}};
    int ret = 0;
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            ret = -errno;
            break;
        }
        if (fds[1].revents && !receive_pool(&l))
            break; /* the broker closed its end: the tenant or the broker is stopping */
        if (fds[0].revents & POLLIN) {
            /* RECV blocks when nothing is pending: only after poll said so. */
            if ((ret = serve_one(&l)) < 0)
                break;
        } else if (fds[0].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            break; /* every process of the filter has exited */
        }
    }
    flush(&l.pools[0]);
    flush(&l.pools[1]);
    if (l.inner_fd >= 0)
        close(l.inner_fd);
    cache_clear(&l.pidfds);
    cache_clear(&l.fdinfos);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return ret;
}
