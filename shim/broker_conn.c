/*
 * broker_conn.c: connections to graft-broker and the request/reply round
 * trip (see broker_conn.h and the wire format in graft_wire.h).
 *
 * The pool is an array of atomic slots, each empty or holding one
 * connection's fd with a busy bit. Taking and returning a connection is a
 * compare-and-swap, so there is no mutex to keep consistent across fork()
 * and nothing that a signal handler calling connect() could deadlock on.
 * Fresh connections are registered in a free slot while in use, so the
 * fork-child handler can close every broker connection the child inherited,
 * in use by a parent thread at the time or not. The pool records the pid
 * that owns it: a vfork/CLONE_VM child (no fork handlers run, memory shared
 * with the parent) sees another pid and uses an unpooled connection of its
 * own rather than the parent's.
 */
#define _GNU_SOURCE
#include "broker_conn.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"
#include "real.h"

#define POOL_SLOTS 16
#define SLOT_BUSY 1u
#define MAX_RECV_FDS 8 /* room to receive, and close, fds a misbehaving broker sends */
#define MAX_ERRNO 4095 /* the kernel's bound on errno values */

#define STR_(x) #x
#define STR(x) STR_(x)

/* Slot value: 0 when empty, else (fd + 1) << 1 | busy. fds are < 2^30. */
static atomic_uint pool[POOL_SLOTS];
/* Identity of each slot's socket, written by the thread that fills the slot. */
static dev_t pool_dev[POOL_SLOTS];
static ino_t pool_ino[POOL_SLOTS];
static _Atomic pid_t pool_pid;

static struct sockaddr_un broker_addr;
static socklen_t broker_addr_len;
static int broker_addr_err; /* ENAMETOOLONG if the path does not fit sun_path */
static char broker_path_str[256];

struct conn {
    int fd;
    int slot; /* -1: not in the pool */
};

/* ---- pool ---- */

static unsigned int slot_pack(int fd, bool busy)
{
    return ((unsigned int)fd + 1) << 1 | (busy ? SLOT_BUSY : 0);
}

static int slot_fd(unsigned int v)
{
    return (int)(v >> 1) - 1;
}

static bool pool_owned(void)
{
    return getpid() == atomic_load_explicit(&pool_pid, memory_order_relaxed);
}

/*
 * Whether a pooled fd still is our broker connection. The application may
 * have closed the number behind our back (daemons closing "all" fds) and
 * reused it; we must then neither write to it nor close it.
 */
static bool still_ours(int slot, int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_dev == pool_dev[slot] && st.st_ino == pool_ino[slot];
}

static bool take_idle(struct conn *c)
{
    for (int i = 0; i < POOL_SLOTS; i++) {
        unsigned int v = atomic_load_explicit(&pool[i], memory_order_relaxed);
        if (v == 0 || (v & SLOT_BUSY))
            continue;
        if (!atomic_compare_exchange_strong_explicit(&pool[i], &v, v | SLOT_BUSY,
                                                     memory_order_acquire, memory_order_relaxed))
            continue;
        if (!still_ours(i, slot_fd(v))) {
            atomic_store_explicit(&pool[i], 0, memory_order_release);
            continue;
        }
        c->fd = slot_fd(v);
        c->slot = i;
        return true;
    }
    return false;
}

/* Registers a fresh connection in a free slot, marked busy, if there is one. */
static void pool_register(struct conn *c)
{
    struct stat st;
    c->slot = -1;
    if (fstat(c->fd, &st) < 0)
        return;
    for (int i = 0; i < POOL_SLOTS; i++) {
        unsigned int expected = 0;
        /* Claim the slot busy first, so no one reads the identity we write. */
        if (atomic_compare_exchange_strong_explicit(&pool[i], &expected, SLOT_BUSY,
                                                    memory_order_acquire, memory_order_relaxed)) {
            pool_dev[i] = st.st_dev;
            pool_ino[i] = st.st_ino;
            atomic_store_explicit(&pool[i], slot_pack(c->fd, true), memory_order_release);
            c->slot = i;
            return;
        }
    }
}

/* Returns a healthy connection to the pool; closes anything else. */
static void put_back(const struct conn *c, bool healthy)
{
    if (c->slot >= 0 && healthy) {
        atomic_store_explicit(&pool[c->slot], slot_pack(c->fd, false), memory_order_release);
        return;
    }
    if (c->slot >= 0)
        atomic_store_explicit(&pool[c->slot], 0, memory_order_release);
    graft_real.close(c->fd);
}

/* A fork child must not share the parent's connections: drop the copies. */
static void fork_child(void)
{
    for (int i = 0; i < POOL_SLOTS; i++) {
        unsigned int v = atomic_exchange_explicit(&pool[i], 0, memory_order_relaxed);
        if (v != 0 && v != SLOT_BUSY)
            graft_real.close(slot_fd(v));
    }
    atomic_store_explicit(&pool_pid, getpid(), memory_order_relaxed);
}

void broker_init(const char *path)
{
    snprintf(broker_path_str, sizeof broker_path_str, "%s", path);
    size_t len = strlen(path);
    if (len >= sizeof broker_addr.sun_path) {
        broker_addr_err = ENAMETOOLONG;
    } else {
        broker_addr.sun_family = AF_UNIX;
        memcpy(broker_addr.sun_path, path, len + 1);
        broker_addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
    }
    atomic_store_explicit(&pool_pid, getpid(), memory_order_relaxed);
    pthread_atfork(NULL, NULL, fork_child);
}

const char *broker_path(void)
{
    return broker_path_str;
}

/* ---- one connection ---- */

/* A timeout shows up as EAGAIN; name it for what it is. */
static int io_error(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK ? ETIMEDOUT : err;
}

static int set_timeouts(int fd)
{
    struct timeval tv = {.tv_sec = BROKER_TIMEOUT_SEC, .tv_usec = 0};
    if (graft_real.setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
        graft_real.setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        return errno;
    return 0;
}

static int open_conn(int *out)
{
    if (broker_addr_err != 0)
        return broker_addr_err;
    for (;;) {
        int fd = graft_real.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return errno;
        int err = set_timeouts(fd);
        if (err == 0 &&
            graft_real.connect(fd, (const struct sockaddr *)&broker_addr, broker_addr_len) < 0)
            err = errno;
        if (err == 0) {
            *out = fd;
            return 0;
        }
        graft_real.close(fd);
        if (err != EINTR) /* a signal: start over rather than fail the app's call */
            return io_error(err);
    }
}

static int collect_fds(struct msghdr *msg, int *fds)
{
    int n = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count && n < MAX_RECV_FDS; i++)
            memcpy(&fds[n++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    return n;
}

static bool error_in_range(int32_t err, int32_t min)
{
    return err >= min && err <= MAX_ERRNO;
}

/* 0 if the reply is well-formed and carries the fds its verdict calls for. */
static int check_reply(const struct graft_reply *rep, ssize_t len, int msg_flags, int nfds)
{
    if ((msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || len != (ssize_t)sizeof *rep)
        return EPROTO;
    if (rep->magic != GRAFT_WIRE_MAGIC || rep->version != GRAFT_WIRE_VERSION ||
        rep->addr_len > GRAFT_ADDR_MAX)
        return EPROTO;
    switch (rep->verdict) {
    case GRAFT_V_GRAFT:
        return nfds == 1 && error_in_range(rep->error, 0) ? 0 : EPROTO;
    case GRAFT_V_CONTAINER:
        return nfds == 0 ? 0 : EPROTO;
    case GRAFT_V_DENY:
    case GRAFT_V_ERROR:
        return nfds == 0 && error_in_range(rep->error, 1) ? 0 : EPROTO;
    default:
        return EPROTO;
    }
}

static int receive_reply(int fd, struct graft_reply *rep, int *hostfd)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * MAX_RECV_FDS)];
    } ctl;
    struct iovec iov;
    struct msghdr msg;
    ssize_t n;

    do {
        iov = (struct iovec){.iov_base = rep, .iov_len = sizeof *rep};
        msg = (struct msghdr){.msg_iov = &iov, .msg_iovlen = 1,
                              .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf};
        n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return io_error(errno);

    int fds[MAX_RECV_FDS];
    int nfds = collect_fds(&msg, fds);
    int err = n == 0 ? ECONNRESET : check_reply(rep, n, msg.msg_flags, nfds);
    if (err != 0) {
        for (int i = 0; i < nfds; i++)
            graft_real.close(fds[i]);
        return err;
    }
    *hostfd = nfds == 1 ? fds[0] : -1;
    return 0;
}

static int exchange(int fd, const struct graft_request *req, struct graft_reply *rep, int *hostfd)
{
    ssize_t n;
    do
        n = send(fd, req, sizeof *req, MSG_NOSIGNAL); /* a dead broker must not SIGPIPE the app */
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return io_error(errno);
    if (n != (ssize_t)sizeof *req)
        return EPROTO;
    return receive_reply(fd, rep, hostfd);
}

/*
 * An error on a connection that sat in the pool usually means the broker
 * restarted since: one fresh try is worthwhile. Not after a timeout (that
 * would double the wait on a wedged broker) nor after an invalid reply (a
 * new connection gets the same broker).
 */
static bool worth_retry(int err)
{
    return err != ETIMEDOUT && err != EPROTO;
}

int broker_roundtrip(const struct graft_request *req, struct graft_reply *rep, int *hostfd)
{
    bool owned = pool_owned();
    struct conn c;
    int err;

    *hostfd = -1;
    if (owned && take_idle(&c)) {
        err = exchange(c.fd, req, rep, hostfd);
        put_back(&c, err == 0);
        if (err == 0 || !worth_retry(err))
            return err;
    }

    err = open_conn(&c.fd);
    if (err != 0)
        return err;
    c.slot = -1;
    if (owned)
        pool_register(&c);
    err = exchange(c.fd, req, rep, hostfd);
    put_back(&c, err == 0);
    return err;
}

const char *broker_strerror(int err)
{
    switch (err) {
    case EPROTO:
        return "invalid reply";
    case ECONNRESET:
        return "connection closed by the broker";
    case ETIMEDOUT:
        return "no answer within " STR(BROKER_TIMEOUT_SEC) " s";
    default:
        return log_errstr(err);
    }
}
