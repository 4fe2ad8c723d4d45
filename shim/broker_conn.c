/*
 * broker_conn.c: connections to graft-broker and the request/reply round
 * trip (see broker_conn.h and the wire format in graft_wire.h).
 *
 * Idle connections wait in an fdpool (fdpool.h), a connection in use is
 * lent out of it. A fresh connection is registered in the pool as lent, so
 * that a fork child closes every broker connection it inherited, in use by
 * a parent thread at the time or not. A vfork/CLONE_VM child finds the pool
 * not its own and uses an unpooled connection rather than the parent's.
 *
 * Callers hold the fork guard (forkguard.h). A round trip releases it only
 * to wait for the broker (connect, send, the reply's arrival) and only on a
 * pooled connection, which a fork child closes; the reply, and any fd it
 * carries, is received inside the guard, without blocking, so a fork
 * never falls between the fds' arrival and the caller's use of them.
 */
#define _GNU_SOURCE
#include "broker_conn.h"

#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "fdpool.h"
#include "forkguard.h"
#include "log.h"
#include "real.h"

#define MAX_ERRNO 4095 /* the kernel's bound on errno values */
/* Room for one fd more than any reply may carry, so that an excess shows. */
#define CTL_BYTES CMSG_SPACE(sizeof(int) * (GRAFT_PREISSUE_MAX + 1))
/* Every fd the kernel can put in that room (alignment adds some), so none escapes being closed. */
#define MAX_RECV_FDS ((int)((CTL_BYTES - CMSG_LEN(0)) / sizeof(int)))

#define STR_(x) #x
#define STR(x) STR_(x)

static struct fdpool pool;

static struct sockaddr_un broker_addr;
static socklen_t broker_addr_len;
static int broker_addr_err; /* ENAMETOOLONG if the path does not fit sun_path */
static char broker_path_str[256];

struct conn {
    int fd;
    int slot; /* -1: not in the pool */
};

/* ---- pool ---- */

/* Returns a healthy connection to the pool; closes anything else. */
static void put_back(const struct conn *c, bool healthy)
{
    if (c->slot >= 0 && healthy) {
        fdpool_give_back(&pool, c->slot);
        return;
    }
    if (c->slot >= 0)
        fdpool_remove(&pool, c->slot);
    graft_real.close(c->fd);
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
    fdpool_init(&pool);
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

/* Bounds the connect to the broker and the send; the reply's wait is a poll (await_reply). */
static int set_send_timeout(int fd)
{
    struct timeval tv = {.tv_sec = BROKER_TIMEOUT_SEC, .tv_usec = 0};
    if (graft_real.setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        return errno;
    return 0;
}

/*
 * Around each wait for the broker: the fork guard is released if c is
 * pooled. An unpooled connection (a full pool, a vfork child) would reach
 * a fork child with nothing there to close it, so it keeps the guard.
 */
static void wait_begin(const struct conn *c, struct forkguard *g)
{
    if (c->slot >= 0)
        forkguard_leave(g);
}

static void wait_end(const struct conn *c, struct forkguard *g)
{
    if (c->slot >= 0)
        forkguard_enter(g);
}

/* A new connection, lent to the caller from the pool before anything can block. */
static int open_conn(struct conn *c, struct forkguard *g)
{
    if (broker_addr_err != 0)
        return broker_addr_err;
    for (;;) {
        c->fd = graft_real.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (c->fd < 0)
            return errno;
        c->slot = fdpool_lend_new(&pool, c->fd);
        int err = set_send_timeout(c->fd);
        if (err == 0) {
            wait_begin(c, g);
            if (graft_real.connect(c->fd, (const struct sockaddr *)&broker_addr, broker_addr_len) < 0)
                err = errno;
            wait_end(c, g);
        }
        if (err == 0)
            return 0;
        put_back(c, false);
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

/*
 * 0 if the reply is well-formed and carries the fds its verdict calls for:
 * one host socket for a connect or bind, 1..GRAFT_PREISSUE_MAX unconnected
 * ones (and no connect error) for a PREISSUE, which has no container
 * verdict, and none (and no error) for a GRANT, whose socket the app holds
 * already, or a RESOLVER, which asks for no socket. receive_reply closes whatever fds came with a reply refused here.
 */
static int check_reply(uint16_t op, const struct graft_reply *rep, ssize_t len, int msg_flags,
                       int nfds)
{
    bool preissue = op == GRAFT_OP_PREISSUE;
    bool fd_less = op == GRAFT_OP_GRANT || op == GRAFT_OP_RESOLVER;
    if ((msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || len != (ssize_t)sizeof *rep)
        return EPROTO;
    if (rep->magic != GRAFT_WIRE_MAGIC || rep->version != GRAFT_WIRE_VERSION ||
        rep->addr_len > GRAFT_ADDR_MAX)
        return EPROTO;
    switch (rep->verdict) {
    case GRAFT_V_GRAFT:
        if (preissue)
            return nfds >= 1 && nfds <= GRAFT_PREISSUE_MAX && rep->error == 0 ? 0 : EPROTO;
        if (fd_less)
            return nfds == 0 && rep->error == 0 ? 0 : EPROTO;
        return nfds == 1 && error_in_range(rep->error, 0) ? 0 : EPROTO;
    case GRAFT_V_CONTAINER:
        return nfds == 0 && !preissue ? 0 : EPROTO;
    case GRAFT_V_DENY:
    case GRAFT_V_ERROR:
        return nfds == 0 && error_in_range(rep->error, 1) ? 0 : EPROTO;
    default:
        return EPROTO;
    }
}

/* What a round trip brought back besides the reply. */
struct received {
    int fds[GRAFT_PREISSUE_MAX];
    int nfds;
};

static int receive_reply(int fd, uint16_t op, struct graft_reply *rep, struct received *got)
{
    union {
        struct cmsghdr align;
        char buf[CTL_BYTES];
    } ctl;
    struct iovec iov;
    struct msghdr msg;
    ssize_t n;

    do {
        iov = (struct iovec){.iov_base = rep, .iov_len = sizeof *rep};
        msg = (struct msghdr){.msg_iov = &iov, .msg_iovlen = 1,
                              .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf};
        n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT); /* after await_reply, or a collect that does not wait */
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return io_error(errno);

    /* The kernel closes what does not fit in ctl and says so: MSG_CTRUNC. */
    int fds[MAX_RECV_FDS];
    int nfds = collect_fds(&msg, fds);
    int err = n == 0 ? ECONNRESET : check_reply(op, rep, n, msg.msg_flags, nfds);
    if (err != 0) {
        for (int i = 0; i < nfds; i++)
            graft_real.close(fds[i]);
        return err;
    }
    memcpy(got->fds, fds, sizeof fds[0] * (size_t)nfds);
    got->nfds = nfds;
    return 0;
}

static int send_request(int fd, const struct graft_request *req)
{
    ssize_t n;
    do
        n = send(fd, req, sizeof *req, MSG_NOSIGNAL); /* a dead broker must not SIGPIPE the app */
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return io_error(errno);
    return n == (ssize_t)sizeof *req ? 0 : EPROTO;
}

/* The reply (or EOF, or an error) is there to receive; ETIMEDOUT after BROKER_TIMEOUT_SEC. */
static int await_reply(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n;
    do
        n = poll(&p, 1, BROKER_TIMEOUT_SEC * 1000);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno;
    return n == 0 ? ETIMEDOUT : 0;
}

static int exchange(const struct conn *c, const struct graft_request *req, struct graft_reply *rep,
                    struct received *got, struct forkguard *g)
{
    wait_begin(c, g);
    int err = send_request(c->fd, req);
    if (err == 0)
        err = await_reply(c->fd);
    wait_end(c, g);
    return err != 0 ? err : receive_reply(c->fd, req->op, rep, got);
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

/*
 * The broker closes its end after a V_ERROR for a request it could not
 * parse (an old broker: any PREISSUE), so such a connection is not pooled:
 * the next request would only find it dead and pay for the retry.
 */
static int exchange_on(struct conn *c, const struct graft_request *req, struct graft_reply *rep,
                       struct received *got, struct forkguard *g)
{
    int err = exchange(c, req, rep, got, g);
    put_back(c, err == 0 && rep->verdict != GRAFT_V_ERROR);
    return err;
}

static int roundtrip(const struct graft_request *req, struct graft_reply *rep,
                     struct received *got, struct forkguard *g)
{
    struct conn c;
    int err;

    got->nfds = 0;
    c.fd = fdpool_borrow(&pool, &c.slot);
    if (c.fd >= 0) {
        err = exchange_on(&c, req, rep, got, g);
        if (err == 0 || !worth_retry(err))
            return err;
    }

    err = open_conn(&c, g);
    if (err != 0)
        return err;
    return exchange_on(&c, req, rep, got, g);
}

int broker_roundtrip(const struct graft_request *req, struct graft_reply *rep, int *hostfd,
                     struct forkguard *g)
{
    struct received got;
    int err = roundtrip(req, rep, &got, g);
    *hostfd = got.nfds == 1 ? got.fds[0] : -1;
    return err;
}

/* A request that names no address and carries no options: PREISSUE, RESOLVER. */
static void bare_request(struct graft_request *req, uint16_t op, int family, int type, int protocol)
{
    memset(req, 0, sizeof *req);
    req->magic = GRAFT_WIRE_MAGIC;
    req->version = GRAFT_WIRE_VERSION;
    req->op = op;
    req->family = family;
    req->type = type;
    req->protocol = protocol;
}

static void preissue_request(struct graft_request *req, int family, int protocol, int want)
{
    bare_request(req, GRAFT_OP_PREISSUE, family, SOCK_STREAM, protocol);
    req->flags = (uint32_t)want << GRAFT_PREISSUE_WANT_SHIFT & GRAFT_PREISSUE_WANT_MASK;
}

/* A PREISSUE's reply, received: the sockets, or *refused the errno of a DENY or ERROR verdict. */
static int preissue_outcome(const struct graft_reply *rep, const struct received *got, int fds[GRAFT_PREISSUE_MAX],
                            int *nfds, int *refused)
{
    if (rep->verdict != GRAFT_V_GRAFT) {
        *refused = rep->error; /* DENY or ERROR: >= 1, checked */
        return 0;
    }
    memcpy(fds, got->fds, sizeof fds[0] * (size_t)got->nfds);
    *nfds = got->nfds;
    return 0;
}

int broker_preissue(int family, int protocol, int want, int fds[GRAFT_PREISSUE_MAX], int *nfds, int *refused,
                    struct forkguard *g)
{
    struct graft_request req;
    struct graft_reply rep;
    struct received got;

    preissue_request(&req, family, protocol, want);
    *nfds = 0;
    *refused = 0;
    int err = roundtrip(&req, &rep, &got, g);
    return err != 0 ? err : preissue_outcome(&rep, &got, fds, nfds, refused);
}

/* Sends req on c; a failure closes c. */
static int send_on(struct conn *c, const struct graft_request *req, struct forkguard *g)
{
    wait_begin(c, g);
    int err = send_request(c->fd, req);
    wait_end(c, g);
    if (err != 0)
        put_back(c, false);
    return err;
}

int broker_preissue_send(int family, int protocol, int want, struct broker_pending *pending, struct forkguard *g)
{
    struct graft_request req;
    struct conn c;

    preissue_request(&req, family, protocol, want);
    /* A pooled connection if there is one (the broker then accepts none), else a fresh one, as roundtrip does. */
    c.fd = fdpool_borrow(&pool, &c.slot);
    int err = c.fd >= 0 ? send_on(&c, &req, g) : ECONNRESET;
    if (err != 0) {
        err = open_conn(&c, g);
        if (err != 0)
            return err;
        if (c.slot < 0) { /* unpooled (a full pool): a fork child could not close it while the reply is awaited */
            put_back(&c, false);
            return EAGAIN;
        }
        err = send_on(&c, &req, g);
        if (err != 0)
            return err;
    }
    pending->fd = c.fd; /* lent from the pool meanwhile: a fork child closes it */
    pending->slot = c.slot;
    return 0;
}

int broker_preissue_collect(const struct broker_pending *pending, bool wait, int fds[GRAFT_PREISSUE_MAX], int *nfds,
                            int *refused, struct forkguard *g)
{
    struct conn c = {.fd = pending->fd, .slot = pending->slot};
    struct graft_reply rep;
    struct received got = {.nfds = 0};
    *nfds = 0;
    *refused = 0;
    int err;
    if (!wait) {
        /* One recvmsg, no poll first: it is made at every take while a request is on its way. */
        err = receive_reply(c.fd, GRAFT_OP_PREISSUE, &rep, &got);
        if (err == ETIMEDOUT) /* io_error's name for EAGAIN: not there yet, the request stays pending */
            return EAGAIN;
    } else {
        wait_begin(&c, g);
        err = await_reply(c.fd);
        wait_end(&c, g);
        if (err == 0)
            err = receive_reply(c.fd, GRAFT_OP_PREISSUE, &rep, &got);
    }
    put_back(&c, err == 0 && rep.verdict != GRAFT_V_ERROR); /* back to the pool, as after a round trip */
    return err != 0 ? err : preissue_outcome(&rep, &got, fds, nfds, refused);
}

void broker_pending_drop(const struct broker_pending *pending)
{
    struct conn c = {.fd = pending->fd, .slot = pending->slot};
    put_back(&c, false);
}

int broker_announce(struct graft_reply *rep, bool wait, struct forkguard *g)
{
    struct graft_request req;
    struct received got;
    struct conn c;

    bare_request(&req, GRAFT_OP_RESOLVER, AF_INET, SOCK_DGRAM, 0);
    int err = open_conn(&c, g);
    if (err != 0)
        return err;
    got.nfds = 0;
    if (wait) {
        err = exchange(&c, &req, rep, &got, g);
    } else {
        wait_begin(&c, g);
        err = send_request(c.fd, &req); /* read by the broker after this end has closed, all the same */
        wait_end(&c, g);
    }
    put_back(&c, false); /* a process that never grafts must not hold one of the tenant's connections */
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
