/*
 * libgraft.c: the interposers of libgraft.so and the graft logic.
 *
 * The library is preloaded into unmodified programs in a container.
 * socket() registers each TCP/UDP socket as a placeholder (fdtable.c). The
 * first connect(), bind() or listen() on a placeholder asks graft-broker
 * (broker_conn.c), which answers with a host socket (the shim puts it on the
 * application's fd number with dup3), with "run it in the container", or
 * with a denial. A TCP connect to a destination the broker granted before
 * may skip the round trip: it connects a host socket the broker issued
 * ahead of time, which the kernel lets connect only where the broker has
 * granted (preissue.h). Once such sockets come, socket() itself takes one
 * for a new TCP socket, so that its connect connects it in place, and a
 * container socket is put under the fd only if it is used otherwise (see
 * socket_on_host). From then on the fd is an ordinary socket: the data
 * path never enters the shim.
 *
 * UDP adds a fourth first use: a sendto/sendmsg/sendmmsg with a
 * destination on an unbound, unconnected placeholder. These functions are
 * on the data path, so their interposers cost one lock-free table lookup
 * when the fd is anything but a placeholder, and nothing more unless the
 * kernel refuses a grafted UDP socket's destination: the broker is then
 * asked to grant it, and the send (or a connect, which for UDP only names
 * where later sends go) is made again. dup/dup3/fcntl(F_DUPFD*)
 * keep duplicates of a placeholder together (fdtable.h), and getsockname
 * shows the app the address it bound when a bind rule published it
 * elsewhere.
 *
 * Towards the caller each interposer behaves like the libc function: on
 * success errno is what it was on entry, on failure it is exactly the errno
 * the design documents for that case, and whenever the shim does not graft,
 * the real function runs with the caller's own arguments so that the kernel
 * produces the native result.
 */

/*
 * Deliberately not _GNU_SOURCE: with it glibc declares the sockaddr
 * parameters of connect() and bind() as transparent unions, and the
 * definitions below implement the plain POSIX prototypes.
 */
#define _DEFAULT_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/close_range.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "broker_conn.h"
#include "fdtable.h"
#include "forkguard.h"
#include "graft_wire.h"
#include "grants.h"
#include "log.h"
#include "preissue.h"
#include "real.h"

#define EXPORT __attribute__((visibility("default")))

#define DEFAULT_SOCKET "/run/graft/graft.sock"

/* Internal return value: "run the real function on the placeholder". */
#define GO_NATIVE INT_MIN

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71 /* Linux 5.14 */
#endif

/* An application's IPv4 or IPv6 address, copied once out of its memory. */
union inet_sockaddr {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
};

_Static_assert(sizeof(union inet_sockaddr) <= GRAFT_ADDR_MAX,
               "sockaddr_in and sockaddr_in6 must fit the wire's address field");
_Static_assert(sizeof(struct timeval) <= GRAFT_OPT_VAL_MAX,
               "SO_RCVTIMEO/SO_SNDTIMEO values must be recordable options");
_Static_assert(sizeof(struct linger) <= GRAFT_OPT_VAL_MAX, "SO_LINGER must be a recordable option");

/* ---- configuration, read once ---- */

static bool fallback_container; /* GRAFT_FALLBACK=container */
static _Atomic pid_t fallback_warned;
static _Atomic pid_t unreachable_warned;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void read_fallback(void)
{
    const char *v = getenv("GRAFT_FALLBACK");
    if (v == NULL || *v == '\0' || strcmp(v, "fail") == 0)
        return;
    if (strcmp(v, "container") == 0) {
        fallback_container = true;
        return;
    }
    log_once(&fallback_warned,
             "unrecognised GRAFT_FALLBACK=\"%s\" (expected \"fail\" or \"container\"); using fail", v);
}

static void init(void)
{
    graft_real_init();
    const char *debug = getenv("GRAFT_DEBUG");
    log_init(debug != NULL && strcmp(debug, "1") == 0);
    const char *path = getenv("GRAFT_SOCKET");
    broker_init(path != NULL && *path != '\0' ? path : DEFAULT_SOCKET);
    read_fallback();
    fdt_init();
    preissue_init();
    forkguard_init();
}

/*
 * The constructor runs init before main() and, normally, before any thread
 * exists; every interposer calls graft_init too, for calls made by other
 * libraries' constructors that run before ours. init itself must not call
 * an interposed function (pthread_once would deadlock on itself).
 */
static void graft_init(void)
{
    pthread_once(&init_once, init);
}

static void announce(void);

__attribute__((constructor)) static void graft_ctor(void)
{
    graft_init();
    announce();
}

/* ---- small helpers ---- */

static int fail(int err)
{
    errno = err;
    return -1;
}

static int succeed(int saved_errno)
{
    errno = saved_errno;
    return 0;
}

/*
 * The sockets the policy can speak about: TCP and UDP. Other protocols on
 * the same socket types (ping sockets are SOCK_DGRAM/IPPROTO_ICMP; SCTP,
 * MPTCP) are never tracked and stay in the container's stack.
 */
static bool graftable(int domain, int type, int protocol)
{
    if (domain != AF_INET && domain != AF_INET6)
        return false;
    if (type == SOCK_STREAM)
        return protocol == 0 || protocol == IPPROTO_TCP;
    if (type == SOCK_DGRAM)
        return protocol == 0 || protocol == IPPROTO_UDP;
    return false;
}

static socklen_t inet_addr_size(int family)
{
    if (family == AF_INET)
        return sizeof(struct sockaddr_in);
    if (family == AF_INET6)
        return sizeof(struct sockaddr_in6);
    return 0;
}

/*
 * Copies an address the broker can judge: AF_INET/AF_INET6 with at least
 * the full struct. The copy also keeps another thread of the app from
 * changing the address between our decision and the request. (Like most
 * interposers we read the app's memory directly: a bad pointer faults here
 * instead of giving EFAULT.)
 */
static bool copy_inet_addr(const struct sockaddr *addr, socklen_t len, union inet_sockaddr *out)
{
    if (addr == NULL || len < sizeof addr->sa_family)
        return false;
    socklen_t size = inet_addr_size(addr->sa_family);
    if (size == 0 || len < size)
        return false;
    memset(out, 0, sizeof *out);
    memcpy(out, addr, size);
    return true;
}

static in_port_t port_of(const union inet_sockaddr *a)
{
    return a->sa.sa_family == AF_INET ? a->in.sin_port : a->in6.sin6_port;
}

static const char *proto_name(const struct fdt_sock *s)
{
    return s->type == SOCK_STREAM ? "tcp" : "udp";
}

/*
 * A decision (claim, ask, settle) runs with cancellation disabled, since a
 * cancellation mid-decision would leak the claim, a broker connection or a
 * received fd, and inside the fork guard (forkguard.h), since a fork
 * mid-decision would copy into the child a host socket on its way onto
 * the app's fd. The broker round trips release the guard while they wait.
 * What follows a decision (a blocking connect's wait) is outside both: a
 * cancellation point, as in connect(2), and no hindrance to a fork.
 */
struct scope {
    int cancel;
    struct forkguard guard;
};

static void scope_enter(struct scope *s)
{
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &s->cancel);
    forkguard_enter(&s->guard);
}

/* errno is the decision's: bind() and listen() return with it. */
static void scope_leave(struct scope *s)
{
    int saved = errno;
    forkguard_leave(&s->guard);
    pthread_setcancelstate(s->cancel, NULL);
    errno = saved;
}

/* ---- names (docs/dns.md) ---- */

/*
 * Before main(), the broker is asked to serve the tenant's resolver in this
 * process's network namespace (it learns the namespace from our pid), so
 * that a program launched by hand with the shim finds it there at its first
 * lookup: glibc's resolver opens its sockets with calls the shim never
 * sees. The answer changes nothing here (resolv.conf is the operator's, or
 * graft's, to point at the resolver), and a broker that is down or refuses
 * costs one debug line; the process's first graft reports it as usual.
 * GRAFT_DNS=off (graft run --no-dns) asks for none.
 *
 * Waiting for the answer costs a process start a round trip (it doubled a
 * fork+exec of /bin/true), and only the first process in a namespace needs
 * it: one whose GRAFT_RESOLVER_NETNS (set by the process, or `graft run`,
 * that had it served) names its own namespace only says that it is there
 * too, without waiting, so that the resolver serves while it lives.
 */
#define RESOLVER_ENV "GRAFT_RESOLVER_NETNS"

/* "dev:inode" of this process's network namespace, or "" if it cannot be read. */
static void netns_id(char *buf, size_t size)
{
    struct stat st;
    buf[0] = '\0';
    if (stat("/proc/self/ns/net", &st) == 0)
        snprintf(buf, size, "%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
}

static void announce(void)
{
    int saved = errno;
    const char *dns = getenv("GRAFT_DNS");
    if (dns != NULL && strcmp(dns, "off") == 0)
        return;
    char here[48];
    netns_id(here, sizeof here);
    const char *served = getenv(RESOLVER_ENV);
    bool wait = here[0] == '\0' || served == NULL || strcmp(served, here) != 0;
    struct scope scope;
    struct graft_reply rep;
    scope_enter(&scope);
    int err = broker_announce(&rep, wait, &scope.guard);
    scope_leave(&scope);
    if (err != 0)
        log_debug("resolver: broker unreachable at %s (%s)", broker_path(), broker_strerror(err));
    else if (!wait)
        log_debug("resolver: served here already; this process is there too");
    else if (rep.verdict == GRAFT_V_ERROR)
        log_debug("resolver: the broker cannot serve one here (%s)", log_errstr(rep.error));
    else if (rep.verdict != GRAFT_V_GRAFT)
        log_debug("resolver: none (the tenant's)");
    else {
        log_debug("resolver: served in this namespace");
        if (here[0] != '\0')
            setenv(RESOLVER_ENV, here, 1); /* before main(): the process's children need not wait */
    }
    errno = saved;
}

/* ---- adopting sockets the shim did not see created ---- */

static bool sockopt_int(int fd, int name, int *out)
{
    socklen_t len = sizeof *out;
    return getsockopt(fd, SOL_SOCKET, name, out, &len) == 0 && len == sizeof *out;
}

static bool netns_cookie(int fd, uint64_t *cookie)
{
    socklen_t len = sizeof *cookie;
    return getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, cookie, &len) == 0 && len == sizeof *cookie;
}

/* The calling thread's network namespace is where a new socket lives. */
static bool own_netns_cookie(uint64_t *cookie)
{
    int probe = graft_real.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (probe < 0)
        return false;
    bool ok = netns_cookie(probe, cookie);
    graft_real.close(probe);
    return ok;
}

/* Before Linux 5.14. SIOCGSKNS needs CAP_NET_ADMIN over the socket's netns. */
static bool same_netns_by_inode(int fd)
{
    int ns = ioctl(fd, SIOCGSKNS); /* the kernel opens it O_CLOEXEC */
    if (ns < 0)
        return false;
    struct stat theirs, ours;
    bool same = fstat(ns, &theirs) == 0 && stat("/proc/thread-self/ns/net", &ours) == 0 &&
                theirs.st_dev == ours.st_dev && theirs.st_ino == ours.st_ino;
    graft_real.close(ns);
    return same;
}

/*
 * Compares netns cookies where the kernel has them: unlike SIOCGSKNS, that
 * needs no privilege, and most applications in a container run without
 * CAP_NET_ADMIN.
 */
static bool in_own_netns(int fd)
{
    uint64_t theirs, ours;
    if (netns_cookie(fd, &theirs) && own_netns_cookie(&ours))
        return theirs == ours;
    return same_netns_by_inode(fd);
}

/* An adopted socket may have been bound natively (a deferred bind before exec). */
static void remember_native_bind(int fd, struct fdt_sock *sock)
{
    union inet_sockaddr local;
    socklen_t len = sizeof local;
    if (graft_real.getsockname(fd, &local.sa, &len) != 0 || local.sa.sa_family != sock->family ||
        port_of(&local) == 0)
        return;
    sock->bound = true;
    sock->bound_len = inet_addr_size(sock->family);
    memcpy(sock->bound_addr, &local, sock->bound_len);
}

/*
 * The description socket() would have recorded for fd, without options, if
 * it is a socket socket() would have tracked (TCP/UDP over IPv4/IPv6).
 */
static bool describe_socket(int fd, struct fdt_sock *sock)
{
    int domain, type, protocol;
    if (!sockopt_int(fd, SO_DOMAIN, &domain) || !sockopt_int(fd, SO_TYPE, &type) ||
        !sockopt_int(fd, SO_PROTOCOL, &protocol) || !graftable(domain, type, protocol))
        return false;
    memset(sock, 0, sizeof *sock);
    sock->family = domain;
    sock->type = type;
    sock->protocol = protocol;
    return true;
}

/*
 * A socket created where the shim could not see it (before an exec, or by a
 * raw system call) is adopted as a placeholder, without recorded options,
 * if it is what socket() would have tracked and still undecided: an
 * unconnected, non-listening TCP/UDP socket in the caller's own network
 * namespace. A grafted host socket lives in another namespace and so always
 * passes through. Returns the adopted entry claimed.
 */
static bool adopt_socket(int fd, ino_t ino, struct fdt_sock *sock)
{
    int listening;
    if (!describe_socket(fd, sock) || !sockopt_int(fd, SO_ACCEPTCONN, &listening) || listening)
        return false;

    union inet_sockaddr peer;
    socklen_t len = sizeof peer;
    if (getpeername(fd, &peer.sa, &len) == 0 || errno != ENOTCONN)
        return false;
    if (!in_own_netns(fd))
        return false;

    remember_native_bind(fd, sock);
    if (!fdt_adopt(fd, ino, sock))
        return false;
    log_debug("adopted fd %d: unconnected %s socket of this network namespace", fd,
              proto_name(sock));
    return true;
}

/*
 * Claims fd for a decision if it is a placeholder (or, with may_adopt, can
 * become one). The inode lets the table spot an entry left behind by an fd
 * that was closed where the shim could not see it.
 */
static bool claim_socket(int fd, bool may_adopt, struct fdt_sock *sock)
{
    struct stat st;
    if (!fdt_in_range(fd) || fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode))
        return false;
    switch (fdt_claim(fd, st.st_ino, sock)) {
    case FDT_CLAIMED:
        return true;
    case FDT_UNTRACKED:
        return may_adopt && adopt_socket(fd, st.st_ino, sock);
    default:
        return false;
    }
}

/* ---- asking the broker ---- */

/* The app's view of its fd, which the host socket must take over. */
struct app_fd {
    bool cloexec;
    bool nonblock;
    int timeout_ms; /* SO_SNDTIMEO: what bounds a blocking connect; -1 for none */
};

enum outcome_kind {
    OUT_NATIVE,  /* run the real call on the placeholder */
    OUT_FAILED,  /* fail the call with errno = error */
    OUT_GRAFTED, /* the host socket is on the app's fd */
    OUT_IN_PLACE, /* connect: the app's fd is the pre-issued host socket; connect it as it is */
};

struct outcome {
    enum outcome_kind kind;
    int error;         /* FAILED: errno for the call; GRAFTED: errno of the broker's connect/bind */
    struct app_fd app; /* GRAFTED */
};

/* One decision about a claimed placeholder. */
struct attempt {
    struct forkguard *guard; /* the decision's scope's */
    const char *call; /* "connect", "bind", "listen" or "sendto", for messages */
    uint16_t op;      /* GRAFT_OP_* */
    int fd;
    int unreachable_errno; /* the error under GRAFT_FALLBACK=fail */
    const struct fdt_sock *sock;
    const union inet_sockaddr *addr; /* what to connect or bind to */
    uint32_t flags;                  /* GRAFT_REQF_* */
    /*
     * bind() with a non-zero port: the address the app asked for, which
     * getsockname shows it if the host socket is bound elsewhere.
     */
    const union inet_sockaddr *app_bound;
};

static void build_request(struct graft_request *req, const struct attempt *a)
{
    memset(req, 0, sizeof *req); /* no stack garbage goes to the broker */
    req->magic = GRAFT_WIRE_MAGIC;
    req->version = GRAFT_WIRE_VERSION;
    req->op = a->op;
    req->family = a->sock->family;
    req->type = a->sock->type;
    req->protocol = a->sock->protocol;
    req->flags = a->flags;
    req->addr_len = inet_addr_size(a->addr->sa.sa_family);
    memcpy(req->addr, a->addr, req->addr_len);
    req->n_opts = a->sock->n_opts;
    memcpy(req->opts, a->sock->opts, sizeof req->opts[0] * a->sock->n_opts);
}

/* GRAFT_DEBUG: "connect tcp 127.0.0.1:8080 -> graft" plus an optional "(detail)". */
static void debug_verdict(const struct attempt *a, const char *verdict, const char *detail)
{
    if (!log_debug_on())
        return;
    char addr[LOG_ADDRSTR_MAX];
    log_format_addr(addr, sizeof addr, &a->addr->sa);
    log_debug("%s %s %s -> %s%s%s%s", a->call, proto_name(a->sock), addr, verdict,
              detail != NULL ? " (" : "", detail != NULL ? detail : "", detail != NULL ? ")" : "");
}

static void debug_graft(const struct attempt *a, const struct graft_reply *rep)
{
    if (!log_debug_on())
        return;
    char detail[LOG_ADDRSTR_MAX + 8] = "";
    union inet_sockaddr host;
    memset(&host, 0, sizeof host);
    memcpy(&host, rep->addr, rep->addr_len); /* addr_len <= GRAFT_ADDR_MAX: checked */
    if (rep->error != 0 && rep->error != EINPROGRESS) {
        snprintf(detail, sizeof detail, "%s", log_errstr(rep->error));
    } else if (a->op == GRAFT_OP_BIND && inet_addr_size(host.sa.sa_family) != 0 &&
               rep->addr_len >= inet_addr_size(host.sa.sa_family)) {
        char addr[LOG_ADDRSTR_MAX];
        log_format_addr(addr, sizeof addr, &host.sa);
        snprintf(detail, sizeof detail, "host %s", addr);
    }
    debug_verdict(a, "graft", detail[0] != '\0' ? detail : NULL);
}

static void read_verdict(const struct attempt *a, const struct graft_reply *rep, struct outcome *o)
{
    switch (rep->verdict) {
    case GRAFT_V_GRAFT:
        o->kind = OUT_GRAFTED;
        o->error = rep->error;
        debug_graft(a, rep);
        break;
    case GRAFT_V_CONTAINER:
        o->kind = OUT_NATIVE;
        debug_verdict(a, "container", NULL);
        break;
    case GRAFT_V_DENY:
        o->kind = OUT_FAILED;
        o->error = rep->error;
        debug_verdict(a, "deny", log_errstr(rep->error));
        break;
    default: /* GRAFT_V_ERROR; broker_roundtrip rejects unknown verdicts */
        o->kind = OUT_FAILED;
        o->error = rep->error;
        debug_verdict(a, "error", log_errstr(rep->error));
        break;
    }
}

static void on_unreachable(const struct attempt *a, int reason, struct outcome *o)
{
    log_once(&unreachable_warned, "broker unreachable at %s (%s); connect/bind %s (GRAFT_FALLBACK=%s)",
             broker_path(), broker_strerror(reason),
             fallback_container ? "run in the container" : "fail",
             fallback_container ? "container" : "fail");
    debug_verdict(a, "broker unreachable", broker_strerror(reason));
    o->kind = fallback_container ? OUT_NATIVE : OUT_FAILED;
    o->error = a->unreachable_errno;
}

/* ---- putting the host socket on the app's fd ---- */

static int timeval_ms(const struct timeval *tv)
{
    if (tv->tv_sec == 0 && tv->tv_usec == 0)
        return -1;
    if (tv->tv_sec >= INT_MAX / 1000 - 1)
        return INT_MAX;
    return (int)(tv->tv_sec * 1000 + (tv->tv_usec + 999) / 1000);
}

static int read_app_fd(int fd, struct app_fd *app)
{
    struct timeval sndtimeo;
    socklen_t len = sizeof sndtimeo;
    int fd_flags = graft_real.fcntl(fd, F_GETFD);
    int fl_flags = graft_real.fcntl(fd, F_GETFL);
    if (fd_flags < 0 || fl_flags < 0 ||
        getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &sndtimeo, &len) < 0)
        return errno;
    app->cloexec = fd_flags & FD_CLOEXEC;
    app->nonblock = fl_flags & O_NONBLOCK;
    app->timeout_ms = timeval_ms(&sndtimeo);
    return 0;
}

/*
 * The broker hands out a non-blocking socket. File status flags belong to
 * the open file description, which dup3 shares, so setting them on hostfd
 * before the dup3 leaves no moment where the app's fd has the wrong mode.
 */
static int match_nonblock(int hostfd, bool nonblock)
{
    int flags = graft_real.fcntl(hostfd, F_GETFL);
    if (flags < 0)
        return errno;
    int want = nonblock ? flags | O_NONBLOCK : flags & ~O_NONBLOCK;
    if (want != flags && graft_real.fcntl(hostfd, F_SETFL, want) < 0)
        return errno;
    return 0;
}

/*
 * Runs under the fd's entry lock (fdt_commit), once for the claimed fd and
 * once for each duplicate of the placeholder. The inode check keeps a
 * duplicate's number that was closed behind the shim's back and reused
 * from being overwritten. FD_CLOEXEC is per fd number, so each keeps its
 * own; O_NONBLOCK was set on the shared file description beforehand.
 *
 * The fd number's epoll registrations move with it (fdtable.h, fdt_polls):
 * each is taken off the placeholder first, which also proves it is still
 * there (an epoll fd closed since, or its number reused, answers ENOENT or
 * EINVAL and is skipped), so a placeholder file that lives on elsewhere (a
 * fork child's copy) reports nothing more under this number; and made
 * again on the host socket, whose readiness epoll checks as it adds it.
 */
static int dup_onto_app_fd(int fd, ino_t placeholder_ino, const struct fdt_polls *polls, void *arg)
{
    const int *hostfd = arg;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode) || st.st_ino != placeholder_ino)
        return EBADF;
    int fd_flags = graft_real.fcntl(fd, F_GETFD);
    if (fd_flags < 0)
        return errno;
    bool moved[FDT_MAX_POLLS] = {false};
    for (unsigned int i = 0; i < polls->n; i++)
        moved[i] = graft_real.epoll_ctl(polls->at[i].epfd, EPOLL_CTL_DEL, fd, NULL) == 0;
    int err = 0;
    if (graft_real.dup3(*hostfd, fd, fd_flags & FD_CLOEXEC ? O_CLOEXEC : 0) < 0)
        err = errno; /* the placeholder stays: its registrations go back on it */
    for (unsigned int i = 0; i < polls->n; i++) {
        struct epoll_event event = polls->at[i].event;
        if (moved[i] && graft_real.epoll_ctl(polls->at[i].epfd, EPOLL_CTL_ADD, fd, &event) != 0)
            log_debug("fd %d: its registration in epoll fd %d is lost (errno %d)", fd, polls->at[i].epfd,
                      errno);
    }
    return err;
}

static bool same_inet_addr(const union inet_sockaddr *a, const union inet_sockaddr *b)
{
    if (a->sa.sa_family != b->sa.sa_family)
        return false;
    if (a->sa.sa_family == AF_INET)
        return a->in.sin_port == b->in.sin_port && a->in.sin_addr.s_addr == b->in.sin_addr.s_addr;
    return a->in6.sin6_port == b->in6.sin6_port &&
           memcmp(&a->in6.sin6_addr, &b->in6.sin6_addr, sizeof a->in6.sin6_addr) == 0 &&
           a->in6.sin6_scope_id == b->in6.sin6_scope_id;
}

/*
 * The container's view of a published bind: when the host socket is bound
 * to another address than the app asked bind() for (a bind rule with
 * `host`), remember both, so that getsockname() gives the app back what it
 * bound, byte for byte as the kernel would have (flowinfo 0, sin_zero 0).
 * The host side is read from the socket itself rather than the reply, so
 * it is exactly what the kernel's getsockname returns later.
 */
static const struct fdt_names *published_names(const union inet_sockaddr *app_bound, int hostfd,
                                                struct fdt_names *names)
{
    union inet_sockaddr host, app;
    socklen_t len = sizeof host;
    if (app_bound == NULL)
        return NULL;
    memset(&host, 0, sizeof host);
    if (graft_real.getsockname(hostfd, &host.sa, &len) != 0 ||
        len != inet_addr_size(app_bound->sa.sa_family) || same_inet_addr(app_bound, &host))
        return NULL;
    app = *app_bound;
    if (app.sa.sa_family == AF_INET6)
        app.in6.sin6_flowinfo = 0;
    memset(names, 0, sizeof *names);
    names->len = len;
    memcpy(names->app, &app, len);
    memcpy(names->host, &host, len);
    return names;
}

/* Replaces the placeholder on fd, and its duplicates, with hostfd (consumed). 0 or an errno. */
static int install_host_socket(int fd, uint64_t gen, int hostfd, ino_t host_ino, struct app_fd *app,
                               const union inet_sockaddr *app_bound)
{
    struct stat st;
    int err = read_app_fd(fd, app);
    if (err == 0)
        err = match_nonblock(hostfd, app->nonblock);
    if (err == 0 && host_ino == 0) {
        if (fstat(hostfd, &st) < 0)
            err = errno;
        else
            host_ino = st.st_ino;
    }
    if (err == 0) {
        struct fdt_names names;
        err = fdt_commit(fd, gen, host_ino, published_names(app_bound, hostfd, &names),
                         dup_onto_app_fd, &hostfd);
    } else {
        fdt_release(fd, gen, FDT_PLACEHOLDER);
    }
    graft_real.close(hostfd);
    return err;
}

/*
 * The options the app set, on another socket for its fd: a pre-issued
 * host socket (the app's own doing, with the app's privileges, as a
 * setsockopt after the graft would be), or a container socket put in
 * place of one. What the kernel refuses is ignored. (The broker filters
 * what it replays through an allowlist because it applies options as
 * root.)
 */
static void apply_recorded_opts(int fd, const struct fdt_sock *sock)
{
    for (uint32_t i = 0; i < sock->n_opts; i++) {
        const struct graft_sockopt *opt = &sock->opts[i];
        graft_real.setsockopt(fd, opt->level, opt->name, opt->val, opt->len);
    }
}

/*
 * Puts a container socket, with the options the app set, in place of a
 * claimed placeholder's pre-issued host socket (on_host, see socket()):
 * for every decision but a connect in place, since a bind, a listen, a
 * send, or a connect the broker judges (its verdict may be the
 * container's) belongs to the container's stack until the broker says
 * otherwise. The claim goes on. 0 or an errno.
 */
static int to_container(int fd, struct fdt_sock *sock)
{
    int fl_flags = graft_real.fcntl(fd, F_GETFL);
    if (fl_flags < 0)
        return errno;
    int type = sock->type | SOCK_CLOEXEC | (fl_flags & O_NONBLOCK ? SOCK_NONBLOCK : 0);
    int placeholder = graft_real.socket(sock->family, type, sock->protocol);
    if (placeholder < 0)
        return errno;
    apply_recorded_opts(placeholder, sock);
    struct stat st;
    int err = fstat(placeholder, &st) == 0
                  ? fdt_replace(fd, sock->gen, st.st_ino, dup_onto_app_fd, &placeholder)
                  : errno;
    graft_real.close(placeholder);
    if (err == 0)
        sock->on_host = false;
    return err;
}

/*
 * claim_socket for a decision in the container's terms: a placeholder on a
 * host socket gets its container socket first. False with *err 0 to pass
 * the call through; false with *err set if the container socket could not
 * be made (the claim is released and the call fails with it, rather than
 * run on a host socket the broker never judged for it).
 */
static bool claim_in_container(int fd, bool may_adopt, struct fdt_sock *sock, int *err)
{
    *err = 0;
    if (!claim_socket(fd, may_adopt, sock))
        return false;
    if (sock->on_host && (*err = to_container(fd, sock)) != 0) {
        fdt_release(fd, sock->gen, FDT_PLACEHOLDER);
        return false;
    }
    return true;
}

/* Applies an outcome to the claimed entry, ending the claim. host_ino: hostfd's inode if known, or 0. */
static void settle(const struct attempt *a, struct outcome *o, int hostfd, ino_t host_ino)
{
    switch (o->kind) {
    case OUT_NATIVE:
        fdt_release(a->fd, a->sock->gen, FDT_NATIVE);
        break;
    case OUT_FAILED: /* still undecided: the app may try again */
        fdt_release(a->fd, a->sock->gen, FDT_PLACEHOLDER);
        break;
    case OUT_IN_PLACE: /* never an outcome to settle: connect_claimed settled it already */
        break;
    case OUT_GRAFTED: {
        int err = install_host_socket(a->fd, a->sock->gen, hostfd, host_ino, &o->app, a->app_bound);
        if (err != 0) {
            o->kind = OUT_FAILED;
            o->error = err;
        }
        break;
    }
    }
}

/* One round trip: o is the verdict, or the fallback; *hostfd a GRAFT's socket or -1. */
static void ask(const struct attempt *a, struct outcome *o, int *hostfd)
{
    struct graft_request req;
    struct graft_reply rep;

    build_request(&req, a);
    int reason = broker_roundtrip(&req, &rep, hostfd, a->guard);
    if (reason != 0)
        on_unreachable(a, reason, o);
    else
        read_verdict(a, &rep, o);
}

/*
 * Asks the broker about a claimed placeholder and settles the claim. No
 * lock is held meanwhile: other threads' calls on other fds proceed, and a
 * call on this fd sees it BUSY and passes through to the kernel.
 */
static void decide(const struct attempt *a, struct outcome *o)
{
    int hostfd;
    ask(a, o, &hostfd);
    settle(a, o, hostfd, 0);
}

/* ---- socket() and setsockopt() ---- */

/*
 * A TCP socket of a process whose connects take the fast way starts on a
 * pre-issued host socket when the pool has one ready (never waiting for
 * one): a connect to a granted destination then connects it where it is,
 * with the kernel's own blocking, timeout and signal semantics, and no
 * container socket is made only to be destroyed by the dup3 of a graft.
 * Every other decision puts a container socket in its place first
 * (to_container), as does an option the host socket refuses (setsockopt).
 * The fd is the lowest free number, as socket() would give.
 */
static int socket_on_host(int type, const struct fdt_sock *desc)
{
    struct scope scope;
    scope_enter(&scope);
    struct preissued got = preissue_take_ready(desc->family, desc->protocol, &scope.guard);
    int fd = -1;
    if (got.fd >= 0) {
        fd = graft_real.fcntl(got.fd, type & SOCK_CLOEXEC ? F_DUPFD_CLOEXEC : F_DUPFD, 0);
        /* The pool's sockets are non-blocking (issue.c), as the fast path's connect wants them. */
        if (fd >= 0 && (!fdt_in_range(fd) || ((type & SOCK_NONBLOCK) == 0 && graft_real.fcntl(fd, F_SETFL, 0) < 0))) {
            graft_real.close(fd);
            fd = -1;
        }
        graft_real.close(got.fd);
    }
    if (fd >= 0) {
        struct fdt_sock on_host = *desc;
        on_host.on_host = true;
        on_host.pool_gen = got.gen;
        fdt_track(fd, got.ino, &on_host);
        if (!fdt_is_tracked(fd)) { /* out of memory: an untracked host socket would connect natively */
            graft_real.close(fd);
            fd = -1;
        }
    }
    scope_leave(&scope);
    return fd;
}

EXPORT int socket(int domain, int type, int protocol)
{
    graft_init();
    int saved = errno;
    int base_type = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (!graftable(domain, base_type, protocol))
        return graft_real.socket(domain, type, protocol);

    struct fdt_sock desc;
    memset(&desc, 0, sizeof desc);
    desc.family = domain;
    desc.type = base_type;
    desc.protocol = protocol;
    int fd = base_type == SOCK_STREAM && preissue_in_use(domain) ? socket_on_host(type, &desc) : -1;
    if (fd < 0) {
        fd = graft_real.socket(domain, type, protocol);
        if (fd < 0)
            return fd;
        struct stat st;
        if (fstat(fd, &st) == 0)
            fdt_track(fd, st.st_ino, &desc);
    }
    errno = saved;
    return fd;
}

/*
 * An option that the pre-issued host socket under a placeholder refused (a
 * privilege the app holds over its own network namespace only, say), or
 * that the table cannot record and so could not carry over, is set where
 * it would have been without the shim: on a container socket, put in
 * place first. host_rc is the call's result on the host socket, and
 * stands (with its errno) if that cannot be done.
 */
static int setsockopt_in_container(int fd, int level, int name, const void *val, socklen_t len, int host_rc)
{
    int host_errno = errno, err;
    struct fdt_sock sock;
    struct scope scope;
    scope_enter(&scope);
    bool claimed = fdt_is_host_placeholder(fd) && claim_in_container(fd, false, &sock, &err);
    if (claimed)
        fdt_release(fd, sock.gen, FDT_PLACEHOLDER);
    scope_leave(&scope);
    if (!claimed) {
        errno = host_errno;
        return host_rc;
    }
    int rc = graft_real.setsockopt(fd, level, name, val, len);
    if (rc == 0) {
        int saved = errno;
        fdt_record_opt(fd, level, name, val, len);
        errno = saved;
    }
    return rc;
}

/*
 * The real call runs first, so the kernel validates the option and the
 * placeholder carries it; only what the kernel accepted is recorded, to be
 * replayed by the broker on a host socket as its allowlist admits.
 */
EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    graft_init();
    int rc = graft_real.setsockopt(fd, level, name, val, len);
    if (rc != 0)
        return fdt_is_host_placeholder(fd) ? setsockopt_in_container(fd, level, name, val, len, rc) : rc;
    int saved = errno;
    enum fdt_opt recorded = fdt_record_opt(fd, level, name, val, len);
    if ((recorded == FDT_OPT_TOO_LONG || recorded == FDT_OPT_TOO_MANY) && fdt_is_host_placeholder(fd)) {
        errno = saved;
        return setsockopt_in_container(fd, level, name, val, len, rc);
    }
    switch (recorded) {
    case FDT_OPT_TOO_LONG:
        log_debug("setsockopt fd %d level %d name %d: %u-byte value not recorded (limit %d)", fd,
                  level, name, (unsigned)len, GRAFT_OPT_VAL_MAX);
        break;
    case FDT_OPT_TOO_MANY:
        log_debug("setsockopt fd %d level %d name %d: not recorded (%d options already)", fd, level,
                  name, GRAFT_MAX_OPTS);
        break;
    default:
        break;
    }
    errno = saved;
    return rc;
}

/*
 * Only an undecided placeholder's registrations are remembered, to be made
 * again on its host socket (dup_onto_app_fd); anything else costs one
 * lock-free table lookup.
 */
EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event)
{
    graft_init();
    bool unrecorded;
    int rc = fdt_epoll_ctl(epfd, op, fd, event, graft_real.epoll_ctl, &unrecorded);
    if (unrecorded) {
        int saved = errno;
        log_debug("epoll_ctl fd %d: its registration in epoll fd %d will not move to a host socket "
                  "(%d epoll sets remembered already)", fd, epfd, FDT_MAX_POLLS);
        errno = saved;
    }
    return rc;
}

/* ---- connect() ---- */

/*
 * The connects a pre-issued socket stands in for, and so the grants worth
 * caching: plain TCP connects. One after a deferred bind stays with the
 * broker, where any handling of the bind belongs.
 */
static bool fast_path_fits(const struct fdt_sock *sock)
{
    return sock->type == SOCK_STREAM && !sock->bound;
}

/* GRAFT_DEBUG: "connect tcp 127.0.0.1:8080 -> graft (fast)", plus an error at once. */
static void debug_fast_graft(const struct attempt *a, int err)
{
    if (!log_debug_on())
        return;
    char detail[64] = "fast";
    if (err != 0 && err != EINPROGRESS)
        snprintf(detail, sizeof detail, "fast, %s", log_errstr(err));
    debug_verdict(a, "graft", detail);
}

/*
 * The connect fast path: a pre-issued socket, connected here, instead of a
 * round trip, for a destination this process has seen granted. The
 * kernel, not the cache, has the last word: EPERM means the grant is gone
 * (a policy reload or a broker restart), which makes every cached grant
 * and pooled socket suspect. Otherwise the outcome is what a GRAFT reply
 * with the connect's errno would have been. Returns false, the claim still
 * held and the app's fd untouched, when the broker must decide after all.
 */
static bool connect_fast(const struct attempt *a, struct outcome *o)
{
    if (!fast_path_fits(a->sock) || !grants_has(&a->addr->sa))
        return false;
    struct preissued got = preissue_take(a->sock->family, a->sock->protocol, a->guard);
    if (got.fd < 0 && got.unreachable != 0) { /* asking again would double the wait */
        on_unreachable(a, got.unreachable, o);
        settle(a, o, -1, 0);
        return true;
    }
    if (got.fd < 0)
        return false;
    int hostfd = got.fd;
    apply_recorded_opts(hostfd, a->sock);
    int err = 0;
    if (graft_real.connect(hostfd, &a->addr->sa, inet_addr_size(a->sock->family)) < 0)
        err = errno;
    if (err == EPERM) {
        graft_real.close(hostfd);
        grants_flush();
        preissue_refused(a->sock->family, got.gen);
        debug_verdict(a, "ask the broker", "pre-issued socket refused: grant gone");
        return false;
    }
    preissue_connected(a->sock->family);
    o->kind = OUT_GRAFTED;
    o->error = err;
    debug_fast_graft(a, err);
    settle(a, o, hostfd, got.ino); /* the pool checked its inode: no fstat of our own */
    return true;
}

/*
 * A claimed placeholder's connect: in place on its pre-issued host socket
 * (the kernel connects it once the caller has left the decision's scope,
 * refused_in_place), the fast way with a socket from the pool, or as the
 * broker decides. in_place: whether the first may be tried.
 */
static void connect_claimed(struct attempt *a, struct fdt_sock *sock, bool in_place, struct outcome *o)
{
    if (sock->on_host) {
        if (in_place && sock->family == a->addr->sa.sa_family && fast_path_fits(sock) &&
            grants_has(&a->addr->sa)) {
            fdt_release(a->fd, sock->gen, FDT_GRAFTED); /* its socket is the graft already */
            o->kind = OUT_IN_PLACE;
            if (log_debug_on())
                debug_verdict(a, "graft", "fast, in place");
            return;
        }
        int err = to_container(a->fd, sock);
        if (err != 0) {
            fdt_release(a->fd, sock->gen, FDT_PLACEHOLDER);
            o->kind = OUT_FAILED;
            o->error = err;
            return;
        }
    }
    if (sock->family != a->addr->sa.sa_family) { /* the kernel has the native errno */
        fdt_release(a->fd, sock->gen, FDT_PLACEHOLDER);
        return;
    }
    if (connect_fast(a, o))
        return;
    decide(a, o);
    if (o->kind == OUT_GRAFTED && fast_path_fits(sock))
        grants_add(&a->addr->sa);
}

/*
 * again: fd was connected in place and the kernel refused (EPERM); it is
 * claimed back from GRAFTED, and the broker decides, on a container socket.
 */
static void graft_connect(int fd, const union inet_sockaddr *target, struct fdt_sock *sock, bool again,
                          struct outcome *o, struct forkguard *guard)
{
    o->kind = OUT_NATIVE;
    if (again && !fdt_reclaim(fd, sock->gen, sock)) { /* closed or reused meanwhile: the kernel's answer stands */
        o->kind = OUT_FAILED;
        o->error = EPERM;
        return;
    }
    if (!again && !claim_socket(fd, true, sock))
        return;
    struct attempt a = {guard, "connect", GRAFT_OP_CONNECT, fd, ENETUNREACH, sock, target, 0, NULL};
    connect_claimed(&a, sock, !again, o);
}

/*
 * The connect of a placeholder's pre-issued host socket, where it is: the
 * kernel's own call, and so its own errno, blocking, SO_SNDTIMEO and
 * signal semantics. EPERM is the kernel's refusal, as in connect_fast: the
 * grant is gone, every cached grant and pooled socket is suspect, and the
 * caller has the broker decide after all. Whether it refused; *rc is the
 * call's result otherwise.
 */
static bool refused_in_place(int fd, const struct sockaddr *addr, socklen_t len, const struct fdt_sock *sock,
                             int saved, int *rc)
{
    errno = saved;
    *rc = graft_real.connect(fd, addr, len);
    if (*rc == 0 || errno != EPERM) {
        int err = errno;
        preissue_connected(sock->family);
        errno = err;
        return false;
    }
    grants_flush();
    preissue_refused(sock->family, sock->pool_gen);
    log_debug("connect fd %d: pre-issued socket refused in place: grant gone; ask the broker", fd);
    return true;
}

/*
 * The broker's connect was non-blocking; a blocking app socket waits here,
 * as connect(2) would, bounded by SO_SNDTIMEO. A signal interrupts the wait
 * with EINTR and a timeout gives EINPROGRESS, as for a native connect; the
 * connection attempt continues in the background either way.
 */
static int wait_connected(int fd, int timeout_ms, int saved)
{
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int n = poll(&p, 1, timeout_ms);
    if (n < 0)
        return -1;
    if (n == 0)
        return fail(EINPROGRESS);

    int err;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -1;
    return err != 0 ? fail(err) : succeed(saved);
}

static int connect_result(int fd, const struct outcome *o, int saved)
{
    if (o->kind == OUT_FAILED)
        return fail(o->error);
    if (o->error == 0)
        return succeed(saved);
    if (o->error != EINPROGRESS || o->app.nonblock)
        return fail(o->error);
    return wait_connected(fd, o->app.timeout_ms, saved);
}

static bool again_after_grant(int fd, const struct sockaddr *addr, socklen_t len, int saved); /* UDP, below */

EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    graft_init();
    int saved = errno;
    union inet_sockaddr target;
    if (copy_inet_addr(addr, len, &target)) {
        struct outcome o;
        struct fdt_sock sock;
        struct scope scope;
        int rc;
        scope_enter(&scope);
        graft_connect(fd, &target, &sock, false, &o, &scope.guard);
        scope_leave(&scope);
        if (o.kind == OUT_IN_PLACE) {
            if (!refused_in_place(fd, addr, len, &sock, saved, &rc))
                return rc;
            scope_enter(&scope);
            graft_connect(fd, &target, &sock, true, &o, &scope.guard);
            scope_leave(&scope);
        }
        if (o.kind != OUT_NATIVE)
            return connect_result(fd, &o, saved);
    }
    errno = saved;
    int rc = graft_real.connect(fd, addr, len);
    /* A grafted UDP socket re-pointed elsewhere than the kernel lets it yet: asked as a send. */
    if (rc < 0 && again_after_grant(fd, addr, len, saved))
        rc = graft_real.connect(fd, addr, len);
    return rc;
}

/* ---- bind() and listen() ---- */

static int bind_result(const struct outcome *o, int saved)
{
    switch (o->kind) {
    case OUT_NATIVE:
        return GO_NATIVE;
    case OUT_FAILED:
        return fail(o->error);
    default:
        return o->error != 0 ? fail(o->error) : succeed(saved);
    }
}

/*
 * bind() to port 0 only reserves a local port for a later connect or
 * listen, so it runs natively on the placeholder (errors and getsockname()
 * are native) and the broker is asked when the socket's use is known: a
 * connect is judged by the connect rules, a listen asks for the bind.
 */
static int bind_ephemeral(int fd, const struct fdt_sock *sock, const union inet_sockaddr *local,
                          const struct sockaddr *addr, socklen_t len, int saved)
{
    errno = saved;
    int rc = graft_real.bind(fd, addr, len);
    int err = errno;
    if (rc == 0)
        fdt_release_bound(fd, sock->gen, local, inet_addr_size(local->sa.sa_family));
    else
        fdt_release(fd, sock->gen, FDT_PLACEHOLDER);
    if (rc == 0 && log_debug_on()) {
        struct attempt a = {NULL, "bind", GRAFT_OP_BIND, fd, 0, sock, local, 0, NULL};
        debug_verdict(&a, "deferred", "port 0 bound in the container; the broker decides at connect or listen");
    }
    errno = err;
    return rc;
}

static int graft_bind(int fd, const union inet_sockaddr *local, const struct sockaddr *addr,
                      socklen_t len, int saved, struct forkguard *guard)
{
    struct fdt_sock sock;
    int err;
    if (!claim_in_container(fd, true, &sock, &err))
        return err != 0 ? fail(err) : GO_NATIVE;
    /* A mismatched family, or a second bind (EINVAL), is the kernel's to answer. */
    if (sock.family != local->sa.sa_family || sock.bound) {
        fdt_release(fd, sock.gen, FDT_PLACEHOLDER);
        return GO_NATIVE;
    }
    if (port_of(local) == 0)
        return bind_ephemeral(fd, &sock, local, addr, len, saved);

    struct attempt a = {guard, "bind", GRAFT_OP_BIND, fd, EADDRNOTAVAIL, &sock, local, 0, local};
    struct outcome o;
    decide(&a, &o);
    return bind_result(&o, saved);
}

EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    graft_init();
    int saved = errno;
    union inet_sockaddr local;
    if (copy_inet_addr(addr, len, &local)) {
        struct scope scope;
        scope_enter(&scope);
        int rc = graft_bind(fd, &local, addr, len, saved, &scope.guard);
        scope_leave(&scope);
        if (rc != GO_NATIVE)
            return rc;
    }
    errno = saved;
    return graft_real.bind(fd, addr, len);
}

/*
 * What a listen on a placeholder asks the broker to bind: the address of
 * its deferred bind, else the wildcard address with port 0, because
 * listen() on an unbound socket binds it that way.
 */
static void listen_address(const struct fdt_sock *sock, union inet_sockaddr *out)
{
    memset(out, 0, sizeof *out); /* INADDR_ANY and in6addr_any are all zeros */
    if (sock->bound)
        memcpy(out, sock->bound_addr, sock->bound_len);
    else
        out->sa.sa_family = (sa_family_t)sock->family;
}

static int graft_listen(int fd, int backlog, int saved, struct forkguard *guard)
{
    struct fdt_sock sock;
    int err;
    if (!claim_in_container(fd, false, &sock, &err))
        return err != 0 ? fail(err) : GO_NATIVE;
    if (sock.type != SOCK_STREAM) { /* EOPNOTSUPP, from the kernel */
        fdt_release(fd, sock.gen, FDT_PLACEHOLDER);
        return GO_NATIVE;
    }
    union inet_sockaddr local;
    listen_address(&sock, &local);
    /* No app_bound: the app asked for "any port", so the host's port is its answer. */
    struct attempt a = {guard, "listen", GRAFT_OP_BIND, fd, EADDRNOTAVAIL, &sock, &local, 0, NULL};
    struct outcome o;
    decide(&a, &o);
    int rc = bind_result(&o, saved);
    if (rc != 0 || o.kind != OUT_GRAFTED)
        return rc;
    return graft_real.listen(fd, backlog);
}

EXPORT int listen(int fd, int backlog)
{
    graft_init();
    int saved = errno;
    struct scope scope;
    scope_enter(&scope);
    int rc = graft_listen(fd, backlog, saved, &scope.guard);
    scope_leave(&scope);
    if (rc != GO_NATIVE)
        return rc;
    errno = saved;
    return graft_real.listen(fd, backlog);
}

/* ---- sendto(), sendmsg(), sendmmsg(): UDP's implicit first use ---- */

/*
 * An AF_INET6 UDP socket may send to an AF_INET address (as if to its
 * v4-mapped form, unless IPV6_V6ONLY); the request names the socket's own
 * family, and an IPv4 CIDR matches the mapped address.
 */
static bool dest_for_family(int family, const union inet_sockaddr *dest, union inet_sockaddr *out)
{
    if (dest->sa.sa_family == family) {
        *out = *dest;
        return true;
    }
    if (family != AF_INET6 || dest->sa.sa_family != AF_INET)
        return false;
    memset(out, 0, sizeof *out);
    out->in6.sin6_family = AF_INET6;
    out->in6.sin6_port = dest->in.sin_port;
    out->in6.sin6_addr.s6_addr[10] = 0xff;
    out->in6.sin6_addr.s6_addr[11] = 0xff;
    memcpy(&out->in6.sin6_addr.s6_addr[12], &dest->in.sin_addr, 4);
    return true;
}

/*
 * A datagram with a destination, on a UDP placeholder that is neither
 * connected nor bound (a deferred port-0 bind counts as unbound: it only
 * reserved a container port), is the socket's first use: the brief judges
 * it as a connect to that destination, with GRAFT_REQF_SENDTO. On graft
 * the broker leaves the host socket unconnected (bound to the wildcard
 * address, port 0), so the app may later send anywhere its confinement
 * allows and receive from any peer, as with a native unconnected socket.
 *
 * Returns 0 to go on with the real call (on the host socket after a graft,
 * on the placeholder for a container verdict, or because the shim has
 * nothing to decide) or -1 with errno: a denial (EPERM) sends nothing.
 *
 * Not judged here: sends on grafted or native sockets, whatever their
 * destination (the shim stays off the data path; on grafted sockets the
 * kernel confinement is what limits destinations, and a destination it
 * refuses is put to the broker by grant_destination), untracked fds (no
 * adoption here: it would cost system calls on every send of an untracked
 * socket), and TCP (MSG_FASTOPEN on a placeholder runs natively).
 */
static int graft_sendto(int fd, const struct sockaddr *addr, socklen_t len)
{
    if (addr == NULL || !fdt_is_placeholder(fd)) /* the fast path: one atomic load */
        return 0;
    union inet_sockaddr given, dest;
    if (!copy_inet_addr(addr, len, &given))
        return 0; /* not an address the kernel would take: its errno */

    struct outcome o = {.kind = OUT_NATIVE};
    struct fdt_sock sock;
    struct scope scope;
    int err;
    scope_enter(&scope);
    if (claim_in_container(fd, false, &sock, &err)) {
        if (sock.type != SOCK_DGRAM || !dest_for_family(sock.family, &given, &dest)) {
            fdt_release(fd, sock.gen, FDT_PLACEHOLDER);
        } else {
            struct attempt a = {&scope.guard, "sendto", GRAFT_OP_CONNECT, fd, ENETUNREACH, &sock,
                                &dest, GRAFT_REQF_SENDTO, NULL};
            decide(&a, &o);
        }
    } else if (err != 0) {
        o.kind = OUT_FAILED;
        o.error = err;
    }
    scope_leave(&scope);
    if (o.kind == OUT_FAILED || (o.kind == OUT_GRAFTED && o.error != 0))
        return fail(o.error);
    return 0;
}

/*
 * Whether fd is a grafted UDP socket, and its description: one the shim
 * grafted, or one it does not track that lives in another network
 * namespace than the caller's, which for an app in a container is a host
 * socket grafted before an exec (the table starts empty; adopt_socket
 * reasons the same way). The broker judges either way.
 */
static bool grafted_udp(int fd, struct fdt_sock *sock)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return false;
    if (fdt_get_grafted(fd, st.st_ino, sock))
        return sock->type == SOCK_DGRAM;
    return !fdt_is_tracked(fd) && describe_socket(fd, sock) && sock->type == SOCK_DGRAM &&
           !in_own_netns(fd);
}

/*
 * A grafted UDP socket's later destinations. Under confinement the kernel
 * lets a grafted UDP socket send only to destinations the broker has
 * granted its tenant, and refuses any other with EPERM. Such a refusal is
 * put to the broker once (GRAFT_OP_GRANT, judged as that sendto's
 * connect); a GRAFT reply means the kernel now lets the datagram through,
 * so the caller makes its call once more. Nothing of this runs for a send
 * that succeeds, nor without confinement (the kernel refuses nothing).
 *
 * Returns 0 to make the call again, or the errno the call fails with: the
 * kernel's EPERM when there is nothing to ask (not a grafted UDP socket,
 * or no destination it could judge), when the broker is unreachable,
 * whatever GRAFT_FALLBACK says (a host socket cannot fall back to the
 * container), when it answers CONTAINER (likewise), or when it is older
 * than GRANT (ERROR with EOPNOTSUPP, its answer to an unknown op: the app
 * sees what it saw before); a DENY or ERROR reply's errno otherwise.
 */
static int grant_destination(int fd, const struct sockaddr *addr, socklen_t len)
{
    union inet_sockaddr given, dest;
    if (!copy_inet_addr(addr, len, &given))
        return EPERM;

    struct fdt_sock sock;
    struct outcome o = {.kind = OUT_NATIVE}; /* nothing to ask */
    int hostfd; /* a GRAFT reply to a GRANT carries none (broker_conn.c checks) */
    struct scope scope;
    scope_enter(&scope); /* grafted_udp may open a probe socket, which no fork may copy */
    if (grafted_udp(fd, &sock) && dest_for_family(sock.family, &given, &dest)) {
        sock.n_opts = 0; /* the socket exists: a grant request carries no options */
        struct attempt a = {&scope.guard, "grant", GRAFT_OP_GRANT, fd, EPERM, &sock, &dest,
                            GRAFT_REQF_SENDTO, NULL};
        ask(&a, &o, &hostfd);
    }
    scope_leave(&scope);
    switch (o.kind) {
    case OUT_GRAFTED:
        return 0;
    case OUT_FAILED:
        return o.error == EOPNOTSUPP ? EPERM : o.error;
    default:
        return EPERM;
    }
}

/*
 * After a call naming destination addr failed (a send, or a connect, which
 * for UDP names where later sends go): whether to make it again (errno =
 * saved, as on entry), else errno is what the call fails with.
 */
static bool again_after_grant(int fd, const struct sockaddr *addr, socklen_t len, int saved)
{
    if (errno != EPERM || addr == NULL)
        return false;
    int err = grant_destination(fd, addr, len);
    errno = err != 0 ? err : saved;
    return err == 0;
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr,
                      socklen_t len)
{
    graft_init();
    int saved = errno;
    if (graft_sendto(fd, addr, len) < 0)
        return -1;
    errno = saved;
    ssize_t rc = graft_real.sendto(fd, buf, n, flags, addr, len);
    if (rc < 0 && again_after_grant(fd, addr, len, saved))
        rc = graft_real.sendto(fd, buf, n, flags, addr, len);
    return rc;
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    graft_init();
    int saved = errno;
    if (msg != NULL && graft_sendto(fd, msg->msg_name, msg->msg_namelen) < 0)
        return -1;
    errno = saved;
    ssize_t rc = graft_real.sendmsg(fd, msg, flags);
    if (rc < 0 && msg != NULL && again_after_grant(fd, msg->msg_name, msg->msg_namelen, saved))
        rc = graft_real.sendmsg(fd, msg, flags);
    return rc;
}

/* struct mmsghdr, which <sys/socket.h> declares only with _GNU_SOURCE. */
struct graft_mmsghdr {
    struct msghdr msg_hdr;
    unsigned int msg_len;
};

/*
 * The first message's destination decides, as a first sendto would; the
 * rest of the batch then goes out on whatever socket that left on fd. A
 * refusal shows as -1 only for the first message (one later in the batch
 * ends it early with the count sent, and the app's next call starts with
 * the refused message), so only the first message's destination is
 * granted before the batch is tried again.
 */
EXPORT int sendmmsg(int fd, struct graft_mmsghdr *vec, unsigned int vlen, int flags)
{
    graft_init();
    int saved = errno;
    if (vec != NULL && vlen > 0 &&
        graft_sendto(fd, vec[0].msg_hdr.msg_name, vec[0].msg_hdr.msg_namelen) < 0)
        return -1;
    errno = saved;
    int rc = graft_real.sendmmsg(fd, vec, vlen, flags);
    if (rc < 0 && vec != NULL && vlen > 0 &&
        again_after_grant(fd, vec[0].msg_hdr.msg_name, vec[0].msg_hdr.msg_namelen, saved))
        rc = graft_real.sendmmsg(fd, vec, vlen, flags);
    return rc;
}

/* ---- getsockname(): the container's view of a published bind ---- */

/*
 * Only a grafted socket bound by bind() to another host address than the
 * app asked for (a bind rule with `host`) is translated; the check is a
 * lock-free load for every other fd. The real getsockname runs first and
 * the translation applies only if it returns exactly the recorded host
 * address, so an entry left stale by a close behind the shim's back can
 * never make up an answer. Copy semantics are the kernel's: min(*len,
 * size) bytes are copied and *len is set to the full size.
 *
 * Known limit: sockets accept()ed from a published listener are not
 * tracked (accept stays native, off the shim), so their getsockname shows
 * the host address (e.g. 127.0.0.1:8080, not :80). getpeername is native.
 */
EXPORT int getsockname(int fd, struct sockaddr *restrict addr, socklen_t *restrict len)
{
    graft_init();
    struct fdt_names names;
    if (addr == NULL || len == NULL || !fdt_get_names(fd, &names))
        return graft_real.getsockname(fd, addr, len);
    if ((int)*len < 0) /* the kernel's EINVAL */
        return graft_real.getsockname(fd, addr, len);

    int saved = errno;
    union inet_sockaddr real;
    socklen_t size = sizeof real;
    memset(&real, 0, sizeof real);
    if (graft_real.getsockname(fd, &real.sa, &size) < 0)
        return -1;
    const void *src = &real;
    if (size == names.len && memcmp(&real, names.host, names.len) == 0)
        src = names.app;
    memcpy(addr, src, *len < size ? *len : size);
    *len = size;
    errno = saved;
    return 0;
}

/* ---- the close family: async-signal-safe, see fdtable.h ---- */

/* Forget first: once closed, another thread's socket() may reuse the number. */
EXPORT int close(int fd)
{
    graft_init();
    int saved = errno;
    fdt_drop(fd);
    errno = saved;
    return graft_real.close(fd);
}

/*
 * The dup family. A duplicate of a placeholder is the same socket under a
 * second number, so it joins the placeholder's ring (fdtable.h): the first
 * connect/bind/listen/sendto on either number decides the one socket, and
 * a graft dup3's the host socket onto every number in the ring. A
 * duplicate of a grafted or native fd gets a copy of its entry (the same
 * state, and the same getsockname translation). An untracked oldfd costs a
 * lock-free lookup only, so dup2 of pipes and files stays signal-safe.
 *
 * note_dup: newfd now refers to oldfd's file. Whatever the table held for
 * newfd goes first (a close the shim did not see, or what dup2/dup3
 * replaced); then the copy is tracked if oldfd is. errno is left as it was.
 */
static void note_dup(int oldfd, int newfd)
{
    int saved = errno;
    fdt_drop(newfd);
    struct stat st;
    if (fdt_is_tracked(oldfd) && fstat(newfd, &st) == 0 && S_ISSOCK(st.st_mode))
        fdt_dup(oldfd, newfd, st.st_ino);
    errno = saved;
}

EXPORT int dup(int oldfd)
{
    graft_init();
    int fd = graft_real.dup(oldfd);
    if (fd >= 0)
        note_dup(oldfd, fd);
    return fd;
}

/* Forget after: newfd is occupied throughout, so no other socket can take it. */
EXPORT int dup2(int oldfd, int newfd)
{
    graft_init();
    int rc = graft_real.dup2(oldfd, newfd);
    if (rc >= 0 && oldfd != newfd)
        note_dup(oldfd, newfd);
    return rc;
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
    graft_init();
    int rc = graft_real.dup3(oldfd, newfd, flags);
    if (rc >= 0)
        note_dup(oldfd, newfd);
    return rc;
}

/*
 * fcntl's third argument is an int or a pointer depending on cmd; like
 * glibc's own fcntl we take it as a pointer-sized vararg and pass it on
 * unchanged. Only F_DUPFD and F_DUPFD_CLOEXEC concern the shim.
 */
static int after_fcntl(int fd, int cmd, int rc)
{
    if (rc >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC))
        note_dup(fd, rc);
    return rc;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
    graft_init();
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return after_fcntl(fd, cmd, graft_real.fcntl(fd, cmd, arg));
}

/* Programs built with _FILE_OFFSET_BITS=64 call fcntl64 (glibc >= 2.28). */
EXPORT int fcntl64(int fd, int cmd, ...)
{
    graft_init();
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return after_fcntl(fd, cmd, graft_real.fcntl64(fd, cmd, arg));
}

/*
 * Entries are forgotten before the real call, as for close(), when the call
 * will close the range: valid flags without CLOSE_RANGE_CLOEXEC. It can
 * then only fail on ENOMEM/EMFILE (CLOSE_RANGE_UNSHARE) or ENOSYS; the
 * sockets it leaves open are merely untracked, and are adopted again at
 * their next connect or bind.
 */
EXPORT int close_range(unsigned int first, unsigned int last, int flags)
{
    graft_init();
    int saved = errno;
    if (first <= last && ((unsigned int)flags & ~CLOSE_RANGE_UNSHARE) == 0)
        fdt_drop_range(first, last);
    errno = saved;
    return graft_real.close_range(first, last, flags);
}
